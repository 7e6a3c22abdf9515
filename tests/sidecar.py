"""Real sidecar processes on loopback for tests: `specdraft serve-drafter` started as a subprocess."""

import signal
import time
from pathlib import Path

import grpc

from proto import drafter_pb2 as pb
from proto import drafter_pb2_grpc as pb_grpc
from specdraft.serve import free_port, spawn  # noqa: F401  (free_port: for the tests)

TOKEN_ENV, TOKEN = "SPECDRAFT_TEST_TOKEN", "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
VOCAB = 49152


class Sidecar:
    def __init__(
        self, tmp: Path, server_yaml: str, address: str = "127.0.0.1:0", other_yaml: str = "drafter: {kind: ngram}"
    ):
        cfg = tmp / f"sidecar-{time.monotonic_ns()}.yaml"
        cfg.write_text(f"{other_yaml}\nserver: {{{server_yaml}}}\n")
        self.log_path = tmp / f"{cfg.stem}.log"
        self.log = open(self.log_path, "w")
        try:
            self.proc, self.address = spawn(str(cfg), address, {TOKEN_ENV: TOKEN}, self.log)
        except RuntimeError as e:
            raise RuntimeError(f"{e}: {self.log_path.read_text()[-2000:]}") from None
        self.channel = grpc.insecure_channel(self.address, [("grpc.max_send_message_length", 64 * 2**20)])
        self.stub = pb_grpc.DrafterStub(self.channel)

    def stats(self) -> pb.ServerStats:
        return self.stub.GetStats(pb.StatsRequest(), metadata=AUTH, timeout=5)

    def wait_sessions_closed(self, timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        while self.stats().sessions_open and time.monotonic() < end:
            time.sleep(0.02)

    def stop(self, sig=signal.SIGTERM) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=15)
        finally:
            self.log.close()


def session(stub, updates, metadata=AUTH, timeout=10):
    """Send updates on one stream, return the replies (raises grpc.RpcError on a status)."""
    return list(stub.Session(iter(updates), metadata=metadata, timeout=timeout))
