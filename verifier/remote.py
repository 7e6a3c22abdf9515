"""RemoteDrafter: the Drafter interface over a specdraft.v1 stream to a sidecar.

It never raises into the decode loop and never lets the sidecar decide what is emitted: a round whose
tree is late (past timeout_ms), malformed or missing returns None, which makes that step one plain
decoding step. A broken stream is reopened with exponential backoff, replaying the whole session so far
(tokens and hidden states) as the new session's first update, so speculation resumes where it was.

The client runs on grpc.aio with a private event loop that the caller's thread drives during each round
(no helper threads to hand messages through: on a 2-core machine every thread hop costs ~0.1 ms). Replies
that arrive late are read by a background task the next time the loop runs, and dropped by round number."""

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
import torch

from proto import checks
from proto import drafter_pb2 as pb
from proto import drafter_pb2_grpc as pb_grpc
from proto.interface import VerifierUpdate
from proto.tree import DraftTree, TreeError
from proto.wire import update_to_msg

log = logging.getLogger(__name__)
MIN_BACKOFF_S = 0.05
WRITE_TIMEOUT_S = 1.0


@dataclass
class RemoteConfig:
    """How the verifier reaches a sidecar."""

    address: str = "127.0.0.1:50051"
    timeout_ms: float = 50.0  # per-round deadline; a late tree costs one plain decoding step
    token_env: str = ""  # environment variable holding the shared-secret token; "" = none
    tls_ca: str = ""  # PEM file of the CA that signed the server's certificate; "" = plaintext
    max_backoff_s: float = 5.0  # reconnection backoff doubles from 50 ms up to this

    def validate(self) -> None:
        checks.host_port(self, "address")
        checks.positive(self, "timeout_ms", "max_backoff_s")
        checks.existing_file(self, "tls_ca")
        checks.token_set(self, "token_env")


class Connection:
    """One channel to a sidecar and the event loop it lives on; shared by the sessions of one thread."""

    def __init__(self, cfg: RemoteConfig):
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        token = checks.env_token(cfg.token_env)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        # gRPC's own reconnect backoff (1 s growing to 120 s) would keep the channel refusing calls long
        # after a restarted sidecar is back (12 s after 30 s down, measured): cap it at ours
        lo_ms, hi_ms = int(1000 * MIN_BACKOFF_S), int(1000 * max(cfg.max_backoff_s, MIN_BACKOFF_S))
        options = [
            ("grpc.max_receive_message_length", 64 * 2**20),
            ("grpc.max_send_message_length", 64 * 2**20),
            ("grpc.initial_reconnect_backoff_ms", lo_ms),
            ("grpc.min_reconnect_backoff_ms", lo_ms),
            ("grpc.max_reconnect_backoff_ms", hi_ms),
        ]
        self.channel = self.run(self._open(options))
        self.stub = pb_grpc.DrafterStub(self.channel)

    async def _open(self, options) -> grpc.aio.Channel:
        if self.cfg.tls_ca:
            with open(self.cfg.tls_ca, "rb") as f:
                return grpc.aio.secure_channel(self.cfg.address, grpc.ssl_channel_credentials(f.read()), options)
        return grpc.aio.insecure_channel(self.cfg.address, options)

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.channel.close())
        self.loop.close()


def connect(cfg: RemoteConfig) -> Connection:
    return Connection(cfg)


def server_info(conn: Connection, timeout_s: float = 5.0) -> pb.ServerInfo:
    """What the sidecar serves; raises grpc.RpcError when it cannot be reached."""

    async def call() -> pb.ServerInfo:  # grpc.aio calls must be made on the running loop
        return await conn.stub.GetInfo(pb.InfoRequest(), timeout=timeout_s, metadata=conn.metadata)

    return conn.run(call())


class _Stream:
    """One open Session call and a task that moves its replies into a queue (so a late reply never
    blocks a later round: it is read whenever the loop runs, and dropped by its round number)."""

    def __init__(self, conn: Connection):
        self.call = conn.stub.Session(metadata=conn.metadata)
        self.replies: asyncio.Queue = asyncio.Queue()
        self.reader = asyncio.ensure_future(self._read())
        self.sending = False

    async def _read(self) -> None:
        try:
            while (reply := await self.call.read()) is not grpc.aio.EOF:
                self.replies.put_nowait(reply)
            self.replies.put_nowait(EOFError("the sidecar ended the stream"))
        except grpc.RpcError as e:
            self.replies.put_nowait(e)

    async def close(self, cancel: bool) -> None:
        if not cancel:
            try:
                await asyncio.wait_for(self.call.done_writing(), 0.5)  # the server ends the session cleanly
                await asyncio.wait_for(asyncio.shield(self.reader), 0.5)
            except (TimeoutError, grpc.RpcError, asyncio.InvalidStateError):
                pass
        self.call.cancel()
        self.reader.cancel()


class RemoteDrafter:
    def __init__(self, conn: Connection, label: str = ""):
        self.conn, self.cfg, self.label = conn, conn.cfg, label
        self.tokens: list[int] = []  # every committed token of the session, to replay
        self.hidden: list[torch.Tensor] = []  # and every hidden-state block
        self.stream: _Stream | None = None
        self.round = 0
        self.backoff_s, self.retry_at = 0.0, 0.0
        self.reopening = False
        self.fallbacks = self.reconnects = 0  # rounds answered None by a fault; streams restored

    def draft(self, update: VerifierUpdate) -> DraftTree | None:
        self.tokens += update.new_tokens
        if update.hidden is not None:
            self.hidden.append(update.hidden)
        first = self.stream is None
        if first:
            if time.monotonic() < self.retry_at:
                self.fallbacks += 1
                return None
            self.reopening = self.round > 0
            hidden = torch.cat(self.hidden) if self.hidden else None
            update = VerifierUpdate(
                list(self.tokens), None, update.max_nodes, update.vocab_size, hidden, update.sampling
            )
        msg = update_to_msg(update, self.round, first=first, label=self.label)
        self.round += 1
        try:
            # The update always goes out, even past the deadline, so the sidecar's state stays in step;
            # only a write stuck for WRITE_TIMEOUT_S (a wedged sidecar) counts as a broken stream.
            reply = self.conn.run(self._round(msg, first))
        except TimeoutError:
            if self.stream is None or self.stream.sending:
                self._broken(TimeoutError(f"could not send an update within {WRITE_TIMEOUT_S} s"))
            else:
                self.fallbacks += 1  # late: this step decodes plainly; the late tree is dropped on arrival
            return None
        except Exception as e:  # the fault boundary: whatever the stream does, this step decodes plainly
            self._broken(e)
            return None
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

    async def _round(self, msg: pb.VerifierUpdate, first: bool) -> pb.DraftTree:
        if first:
            self.stream = _Stream(self.conn)
        self.stream.sending = True
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await self.stream.call.write(msg)
        self.stream.sending = False
        async with asyncio.timeout(self.cfg.timeout_ms / 1000):
            while True:
                reply = await self.stream.replies.get()
                if isinstance(reply, Exception):
                    raise reply
                if reply.round == msg.round:
                    return reply

    def _broken(self, err: Exception) -> None:
        self.fallbacks += 1
        detail = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.RpcError) else repr(err)
        self.backoff_s = min(max(2 * self.backoff_s, MIN_BACKOFF_S), self.cfg.max_backoff_s)
        self.retry_at = time.monotonic() + self.backoff_s
        log.warning(
            "%s: drafter stream lost (%s); decoding plainly, retrying in %.2f s", self.label, detail, self.backoff_s
        )
        if self.stream is not None:
            self.conn.run(self.stream.close(cancel=True))
            self.stream = None

    def close(self) -> None:
        if self.stream is not None:
            self.conn.run(self.stream.close(cancel=False))
            self.stream = None
