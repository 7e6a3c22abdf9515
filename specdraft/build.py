"""Which drafter a config names, and where it runs: in this process (`mode: inprocess`, built here) or
behind a specdraft gRPC sidecar (`mode: grpc`, reached by verifier/remote.py)."""
import typing
from dataclasses import dataclass, field
from pathlib import Path

from bandit.online import BanditConfig
from drafter.interface import Drafter
from drafter.ngram import LookupFirst, NgramConfig, NgramDrafter
from drafter.specblock import SpecBlock, SpecBlockDraftConfig, SpecBlockDrafter, load_specblock
from drafter.synthetic import RandomDrafter


@dataclass
class RemoteConfig:
    """How the verifier reaches a sidecar."""
    address: str = "127.0.0.1:50051"
    timeout_ms: float = 50.0       # per-round deadline; a late tree costs one plain decoding step
    token_env: str = ""            # environment variable holding the shared-secret token; "" = none
    tls_ca: str = ""               # PEM file of the CA that signed the server's certificate; "" = plaintext
    max_backoff_s: float = 5.0     # reconnection backoff doubles from 50 ms up to this


@dataclass
class DrafterConfig:
    mode: typing.Literal["inprocess", "grpc"] = "inprocess"
    kind: typing.Literal["ngram", "specblock", "random"] = "ngram"  # random: benchmark trees, never a speed-up
    max_nodes: int = 8                      # node budget per draft tree
    # specblock: prompt lookup first (drafter.ngram): where the context's suffix occurred before, what
    # followed it leads the tree, and the learned drafter's tree fills the rest (drafter/ngram.py LookupFirst)
    lookup: bool = False
    ngram: NgramConfig = field(default_factory=NgramConfig)
    specblock: SpecBlockDraftConfig = field(default_factory=SpecBlockDraftConfig)
    grpc: RemoteConfig = field(default_factory=RemoteConfig)
    bandit: BanditConfig = field(default_factory=BanditConfig)  # online updates from feedback (sidecar, specblock)


def load_drafter_model(cfg: DrafterConfig, target_args, embedding) -> SpecBlock | None:
    """The model a learned drafter kind shares across its sessions (None for model-free kinds)."""
    if cfg.kind != "specblock":
        return None
    folder = Path(cfg.specblock.checkpoint)
    if not (folder / "drafter.safetensors").is_file():
        raise FileNotFoundError(f"drafter.specblock.checkpoint: {folder}: no drafter.safetensors "
                                "(train one with `specdraft train`)")
    return load_specblock(folder, target_args, embedding)


def make_drafter(cfg: DrafterConfig, model: SpecBlock | None = None) -> Drafter:
    """A fresh in-process drafter (one per generation session) of the configured kind; a learned kind
    shares one loaded model across sessions (drafter.specblock.load_specblock)."""
    if cfg.kind == "random":
        return RandomDrafter()
    if cfg.kind == "specblock":
        drafter = SpecBlockDrafter(model, cfg.specblock)
        return LookupFirst(NgramDrafter(cfg.ngram), drafter) if cfg.lookup else drafter
    return NgramDrafter(cfg.ngram)
