"""The sidecar as the application starts it: the drafter a config names, its GetInfo, the online learner
when the bandit is on, and `spawn` (a sidecar child process, for benchmarks, the vLLM rows and tests)."""

import asyncio
import ctypes
import os
import socket
import subprocess
import sys

from bandit.online import OnlineAdapter
from drafter.server import DrafterInfo, serve
from specdraft.assets import DTYPES, model_dir, resolved_dtype, target_embedding, use_threads
from specdraft.build import DrafterConfig, Shared, load_drafter_model, make_drafter
from specdraft.config import Config

TREE_BUILDERS = {
    "ngram": "prompt-lookup trie (deterministic)",
    "suffix": "suffix cache over the session and, by scope, other sessions' output (deterministic)",
    "random": "random trees of the full budget (benchmark)",
    "specblock": "block-iterative expansion, rank-head branching (deterministic)",
}


def tree_builder(cfg: DrafterConfig) -> str:
    """ServerInfo.tree_builders' entry for a drafter config."""
    if cfg.kind == "specblock" and cfg.specblock.tree == "sampled":  # the wire carries no draft distributions
        return "block-iterative delayed expansion, i.i.d. sampled groups (q not sent: verify with rule walk)"
    if cfg.kind == "specblock" and cfg.lookup != "none":
        arms = f"; per round one of {', '.join(cfg.arms.choose)} by measured cost" if cfg.arms.choose else ""
        return (
            f"one tree from {cfg.lookup} lookup and block-iterative expansion, by {cfg.hybrid.rank} "
            f"(deterministic){arms}"
        )
    return TREE_BUILDERS[cfg.kind]


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def pin_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """glibc raises its mmap threshold to the largest block freed (up to 32 MiB): after that, a sidecar's
    multi-MB updates, features and caches come from the heap, and sessions that interleave them fragment
    it for good. Pinned at 1 MiB they are mapped and go back to the OS when freed (64 sessions filling to
    the token bounds: see docs/sidecar.md). Nothing happens off glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes)
    except (OSError, AttributeError):
        pass


def serve_drafter(cfg: Config, ready=None) -> None:
    """Serve cfg.drafter under cfg.server until SIGTERM/SIGINT (drafter.server.serve)."""
    pin_mmap_threshold()
    use_threads(cfg.target)
    targs, embedding = target_embedding(model_dir(cfg.target.model))
    # the drafter drafts in the target's dtype (SpecBlock.drafting), which it reads off the embedding
    model = load_drafter_model(cfg.drafter, targs, embedding.to(DTYPES[resolved_dtype(cfg.target.dtype)]))
    # model-free drafters and token-conditioned SpecBlocks take no hidden states
    hidden_dim = 0 if model is None or model.cfg.conditioning == "tokens" else targs.dim
    draft_vocab = targs.vocab_size if model is None else int(model.draft_ids.shape[0])
    info = DrafterInfo(
        kind=cfg.drafter.kind,
        model=cfg.target.model,
        vocab_size=targs.vocab_size,
        draft_vocab_size=draft_vocab,
        hidden_dim=hidden_dim,
        tree_builder=tree_builder(cfg.drafter),
    )
    adapter = OnlineAdapter(model, cfg.drafter.bandit) if cfg.drafter.bandit.enabled and model is not None else None
    shared = Shared(cfg.drafter)  # the suffix cache, calibration and arm tallies every session here shares
    new_drafter = lambda client: make_drafter(cfg.drafter, model, shared, client)
    asyncio.run(serve(cfg.server, new_drafter, info, adapter, ready, shared.arms))


def spawn(
    config: str, address: str = "127.0.0.1:0", env: dict | None = None, stderr=None
) -> tuple[subprocess.Popen, str]:
    """Start `specdraft serve-drafter` as a child process; returns it and its bound host:port once it
    listens (for benchmarks and tests)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "specdraft.cli", "serve-drafter", "--config", config, "--address", address],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={**os.environ, **(env or {})},
    )
    line = proc.stdout.readline()  # "listening on HOST:PORT", or EOF if it died
    if not line.startswith("listening on"):
        proc.kill()
        raise RuntimeError(f"serve-drafter --config {config} did not start (exit {proc.wait()})")
    return proc, line.split()[-1]


def free_port() -> int:
    """A loopback port nothing listens on (for a sidecar to bind, or for a client to find unreachable)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    """A process's peak resident set so far (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
