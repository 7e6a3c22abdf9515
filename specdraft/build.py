"""Which drafter a config names, and where it runs: in this process (`mode: inprocess`, built here) or
behind a specdraft gRPC sidecar (`mode: grpc`, reached by verifier/remote.py)."""

import typing
from dataclasses import dataclass, field
from pathlib import Path

from bandit.online import BanditConfig
from drafter.ngram import LookupFirst, NgramConfig, NgramDrafter
from drafter.specblock import SpecBlock, SpecBlockDraftConfig, SpecBlockDrafter, load_specblock
from drafter.synthetic import RandomDrafter
from proto import checks
from proto.interface import Drafter
from verifier.remote import RemoteConfig


@dataclass
class DrafterConfig:
    mode: typing.Literal["inprocess", "grpc"] = "inprocess"
    kind: typing.Literal["ngram", "specblock", "random"] = "ngram"  # random: benchmark trees, never a speed-up
    max_nodes: int = 8  # node budget per draft tree
    # specblock: prompt lookup first (drafter.ngram): where the context's suffix occurred before, what
    # followed it leads the tree, and the learned drafter's tree fills the rest (drafter/ngram.py LookupFirst)
    lookup: bool = False
    ngram: NgramConfig = field(default_factory=NgramConfig)
    specblock: SpecBlockDraftConfig = field(default_factory=SpecBlockDraftConfig)
    grpc: RemoteConfig = field(default_factory=RemoteConfig)
    bandit: BanditConfig = field(default_factory=BanditConfig)  # online updates from feedback (sidecar, specblock)

    def validate(self) -> None:
        checks.positive(self, "max_nodes")
        sb = self.specblock
        if self.mode == "inprocess" and self.kind == "specblock":
            try:
                checks.file_in(sb.checkpoint, "drafter.safetensors", "train one with `specdraft train`")
            except OSError as e:
                raise ValueError(f"specblock.checkpoint: {e}") from None
            try:
                if sb.tree == "sampled" and sb.select == "neural":
                    hint = "train one: specdraft train --config configs/train-selector.yaml"
                    checks.file_in(sb.selector, "selector.safetensors", hint)
            except OSError as e:
                raise ValueError(f"specblock.selector: {e}") from None
        if self.lookup and (self.kind != "specblock" or sb.tree == "sampled"):
            raise ValueError(
                "lookup: only in front of a specblock drafter with a deterministic tree "
                f"(kind {self.kind!r}, specblock.tree {sb.tree!r})"
            )
        if self.bandit.enabled and self.kind != "specblock":
            raise ValueError(
                f"bandit.enabled: the {self.kind} drafter has no weights to update online; "
                "use drafter.kind specblock or leave the bandit off"
            )


def load_drafter_model(cfg: DrafterConfig, target_args, embedding) -> SpecBlock | None:
    """The model a learned drafter kind shares across its sessions (None for model-free kinds)."""
    if cfg.kind != "specblock":
        return None
    return load_specblock(Path(cfg.specblock.checkpoint), target_args, embedding)


def make_drafter(cfg: DrafterConfig, model: SpecBlock | None = None) -> Drafter:
    """A fresh in-process drafter (one per generation session) of the configured kind; a learned kind
    shares one loaded model across sessions (drafter.specblock.load_specblock)."""
    if cfg.kind == "random":
        return RandomDrafter()
    if cfg.kind == "specblock":
        drafter = SpecBlockDrafter(model, cfg.specblock)
        return LookupFirst(NgramDrafter(cfg.ngram), drafter) if cfg.lookup else drafter
    return NgramDrafter(cfg.ngram)
