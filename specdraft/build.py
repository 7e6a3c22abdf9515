"""Which drafter a config names, and where it runs: in this process (`mode: inprocess`, built here) or
behind a specdraft gRPC sidecar (`mode: grpc`, reached by verifier/remote.py)."""

import typing
from dataclasses import dataclass, field
from pathlib import Path

from bandit.arms import ArmChooser, ArmDrafter, ArmsConfig, parse_arm
from bandit.online import BanditConfig
from drafter.hybrid import Calibration, Hybrid, HybridConfig
from drafter.ngram import NgramConfig, NgramDrafter
from drafter.specblock import SpecBlock, load_specblock
from drafter.specblock_draft import SpecBlockDraftConfig, SpecBlockDrafter
from drafter.suffix import SuffixConfig, SuffixIndex, SuffixSession
from drafter.synthetic import RandomDrafter
from proto import checks
from proto.interface import Drafter
from verifier.remote import RemoteConfig


@dataclass
class DrafterConfig:
    mode: typing.Literal["inprocess", "grpc"] = "inprocess"
    # ngram: prompt lookup; suffix: the suffix cache (this session's text and, by suffix.scope, other
    # sessions' output); specblock: the learned drafter; random: benchmark trees, never a speed-up
    kind: typing.Literal["ngram", "suffix", "specblock", "random"] = "ngram"
    max_nodes: int = 8  # node budget per draft tree
    # specblock: one tree from a lookup's candidates and the learned drafter's (drafter/hybrid.py): none,
    # ngram (prompt lookup) or suffix (the suffix cache), ranked as `hybrid` says
    lookup: typing.Literal["none", "ngram", "suffix"] = "none"
    ngram: NgramConfig = field(default_factory=NgramConfig)
    suffix: SuffixConfig = field(default_factory=SuffixConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    specblock: SpecBlockDraftConfig = field(default_factory=SpecBlockDraftConfig)
    grpc: RemoteConfig = field(default_factory=RemoteConfig)
    bandit: BanditConfig = field(default_factory=BanditConfig)  # online updates from feedback (sidecar, specblock)
    arms: ArmsConfig = field(default_factory=ArmsConfig)  # per-round choice of sources x budget (the hybrid)

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
        if self.lookup != "none" and (self.kind != "specblock" or sb.tree == "sampled"):
            raise ValueError(
                "lookup: only in front of a specblock drafter with a deterministic tree "
                f"(kind {self.kind!r}, specblock.tree {sb.tree!r})"
            )
        if self.arms.choose and (self.kind != "specblock" or self.lookup == "none"):
            raise ValueError(
                "arms.choose: arms mix the hybrid's sources; needs drafter.kind specblock with a lookup "
                f"(kind {self.kind!r}, lookup {self.lookup!r})"
            )
        for arm in self.arms.choose:
            if parse_arm(arm)[1] > self.max_nodes:
                raise ValueError(f"arms.choose: {arm} asks for more nodes than max_nodes {self.max_nodes}")
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


class Shared:
    """What the sessions of one drafter config share besides the model: the suffix cache's store
    (bounded by suffix.max_tokens), the hybrid's calibration and the arms' per-client tallies."""

    def __init__(self, cfg: DrafterConfig):
        self.store = SuffixIndex(cfg.suffix, cfg.suffix.max_tokens)
        self.calibration = Calibration(cfg.hybrid.prior_weight)
        self.arms = ArmChooser(cfg.arms) if cfg.arms.choose else None


def make_drafter(
    cfg: DrafterConfig, model: SpecBlock | None = None, shared: Shared | None = None, client: str = ""
) -> Drafter:
    """A fresh in-process drafter (one per generation session) of the configured kind, for `client` (the
    session's client_label: the suffix cache's scope key under scope client, the arms' client). Sessions
    share one loaded model (drafter.specblock.load_specblock) and, through `shared`, the suffix cache, the
    calibration and the arms' tallies; without it the session has its own."""
    shared = shared or Shared(cfg)
    lookup = "suffix" if cfg.kind == "suffix" else cfg.lookup
    if cfg.kind == "random":
        return RandomDrafter()
    if cfg.kind == "ngram":
        return NgramDrafter(cfg.ngram)
    model_source = SpecBlockDrafter(model, cfg.specblock) if cfg.kind == "specblock" else None
    if lookup == "none":
        return model_source
    source = SuffixSession(cfg.suffix, shared.store, client) if lookup == "suffix" else NgramDrafter(cfg.ngram)
    hybrid = Hybrid(source, lookup, model_source, shared.calibration, cfg.hybrid)
    return ArmDrafter(hybrid, shared.arms, client) if shared.arms is not None else hybrid
