"""Real sidecar processes on loopback for tests: `specdraft serve-drafter` started as a subprocess."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from proto import drafter_pb2 as pb
from proto import drafter_pb2_grpc as pb_grpc

TOKEN_ENV, TOKEN = "SPECDRAFT_TEST_TOKEN", "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
VOCAB = 49152


class Sidecar:
    def __init__(self, tmp: Path, server_yaml: str, address: str = "127.0.0.1:0", drafter_yaml: str = "kind: ngram"):
        cfg = tmp / f"sidecar-{time.monotonic_ns()}.yaml"
        cfg.write_text(f"drafter: {{{drafter_yaml}}}\nserver: {{{server_yaml}}}\n")
        self.log = open(tmp / f"{cfg.stem}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "verifier.cli", "serve-drafter", "--config", str(cfg), "--address", address],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env={**os.environ, TOKEN_ENV: TOKEN})
        line = self.proc.stdout.readline()  # "listening on HOST:PORT", or EOF if it died
        if not line.startswith("listening on"):
            self.proc.kill()
            raise RuntimeError(f"sidecar did not start: {(tmp / f'{cfg.stem}.log').read_text()[-2000:]}")
        self.address = line.split()[-1]
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
