"""RemoteDrafter: the Drafter interface over a specdraft.v1 stream to a sidecar.

It never raises into the decode loop and never lets the sidecar decide what is emitted: a round whose
tree is late (past timeout_ms), malformed or missing returns None, which makes that step one plain
decoding step. A broken stream is reopened with exponential backoff, replaying the whole session so far
(tokens and hidden states) as the new session's first update, so speculation resumes where it was."""
import logging
import os
import queue
import threading
import time

import grpc
import torch

from drafter.build import RemoteConfig
from drafter.interface import VerifierUpdate
from drafter.tree import DraftTree, TreeError
from proto import drafter_pb2 as pb
from proto import drafter_pb2_grpc as pb_grpc
from proto.wire import update_to_msg

log = logging.getLogger(__name__)
MIN_BACKOFF_S = 0.05


def connect(cfg: RemoteConfig) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20)]
    if cfg.tls_ca:
        with open(cfg.tls_ca, "rb") as f:
            return grpc.secure_channel(cfg.address, grpc.ssl_channel_credentials(f.read()), options)
    return grpc.insecure_channel(cfg.address, options)


def auth_metadata(cfg: RemoteConfig) -> tuple[tuple[str, str], ...]:
    token = os.environ.get(cfg.token_env, "") if cfg.token_env else ""
    return (("authorization", f"Bearer {token}"),) if token else ()


def server_info(channel: grpc.Channel, cfg: RemoteConfig, timeout_s: float = 5.0) -> pb.ServerInfo:
    """What the sidecar serves; raises grpc.RpcError when it cannot be reached."""
    return pb_grpc.DrafterStub(channel).GetInfo(pb.InfoRequest(), timeout=timeout_s, metadata=auth_metadata(cfg))


class _Stream:
    """One open Session call: requests go in through a queue, replies come out through another (a
    reader thread drains the call, so a late reply never blocks the decode loop)."""

    def __init__(self, stub: pb_grpc.DrafterStub, metadata):
        self.requests: queue.Queue = queue.Queue()
        self.replies: queue.Queue = queue.Queue()
        self.call = stub.Session(iter(self.requests.get, None), metadata=metadata)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for reply in self.call:
                self.replies.put(reply)
            self.replies.put(EOFError("the sidecar ended the stream"))
        except grpc.RpcError as e:
            self.replies.put(e)

    def close(self, cancel: bool = False) -> None:
        self.requests.put(None)  # half-close: the server ends the session cleanly
        if cancel:
            self.call.cancel()


class RemoteDrafter:
    def __init__(self, channel: grpc.Channel, cfg: RemoteConfig, label: str = ""):
        self.cfg, self.label = cfg, label
        self.stub = pb_grpc.DrafterStub(channel)
        self.metadata = auth_metadata(cfg)
        self.tokens: list[int] = []               # every committed token of the session, to replay
        self.hidden: list[torch.Tensor] = []      # and every hidden-state block
        self.stream: _Stream | None = None
        self.round = 0
        self.backoff_s, self.retry_at = 0.0, 0.0
        self.reopening = False
        self.fallbacks = self.reconnects = 0      # rounds answered None by a fault; streams restored

    def draft(self, update: VerifierUpdate) -> DraftTree | None:
        self.tokens += update.new_tokens
        if update.hidden is not None:
            self.hidden.append(update.hidden)
        if self.stream is None:
            if time.monotonic() < self.retry_at:
                self.fallbacks += 1
                return None
            self.stream = _Stream(self.stub, self.metadata)
            self.reopening = self.round > 0
            hidden = torch.cat(self.hidden) if self.hidden else None
            update = VerifierUpdate(list(self.tokens), None, update.max_nodes, update.vocab_size, hidden, update.sampling)
            msg = update_to_msg(update, self.round, first=True, label=self.label)
        else:
            msg = update_to_msg(update, self.round, first=False)
        self.round += 1
        self.stream.requests.put(msg)
        deadline = time.monotonic() + self.cfg.timeout_ms / 1000
        while True:
            try:
                reply = self.stream.replies.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                self.fallbacks += 1  # late: this step decodes plainly; the late tree is dropped on arrival
                return None
            if isinstance(reply, Exception):
                self._broken(reply)
                return None
            if reply.round == msg.round:
                break
        self.backoff_s = 0.0
        if self.reopening:
            self.reopening = False
            self.reconnects += 1
            log.info("%s: drafter stream restored (%d tokens replayed)", self.label, len(self.tokens))
        if not reply.tokens:
            return None
        try:
            return DraftTree(reply.tokens, reply.parents, update.vocab_size, update.max_nodes)
        except TreeError as e:
            log.warning("%s: the sidecar sent a bad tree (%s); decoding this step plainly", self.label, e)
            self.fallbacks += 1
            return None

    def _broken(self, err: Exception) -> None:
        self.fallbacks += 1
        detail = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.RpcError) else str(err)
        self.backoff_s = min(max(2 * self.backoff_s, MIN_BACKOFF_S), self.cfg.max_backoff_s)
        self.retry_at = time.monotonic() + self.backoff_s
        log.warning("%s: drafter stream lost (%s); decoding plainly, retrying in %.2f s", self.label, detail,
                    self.backoff_s)
        self.stream.close(cancel=True)
        self.stream = None

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
