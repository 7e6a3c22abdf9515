"""Deployment / evaluation config: dataclasses with defaults that run, loaded from YAML strictly
(an unknown key, a wrong type or a bad value is a ConfigError naming the key).

Each section's dataclass lives beside the code it configures and checks its own values (`validate()`,
raising ValueError naming the field); this module joins the sections into `Config`, checks types while
loading, and runs the validators of the sections a command uses, once, prefixing each message with the
section's path. Checks that span sections are `cross_checks` here."""

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from drafter.data import DataConfig, RepliesConfig
from drafter.server import ServerConfig
from drafter.train import TrainConfig
from proto import checks
from proto.interface import SamplingParams
from proto.wire import quote
from specdraft.build import DrafterConfig
from verifier.rules import SAMPLED_TREE_RULES

DATASETS = ("mt_bench", "mt_bench:1", "humaneval")  # built in; a .jsonl / .json path is a dataset too


def check_dataset(key: str, name: str) -> None:
    """A dataset name is a built-in one or an existing JSONL / JSON file (specdraft.datasets reads it)."""
    if name in DATASETS:
        return
    if not name.endswith((".jsonl", ".json")):
        raise ValueError(f"{key}: {name!r} is not one of {', '.join(DATASETS)}, nor a .jsonl / .json file")
    if not Path(name).is_file():
        raise ValueError(f"{key}: {name}: file not found")


class ConfigError(ValueError):
    pass


@dataclass
class TargetConfig:
    model: str = "smollm2-135m-instruct"  # an embedded model's name or a safetensors model folder
    # auto: bfloat16 where the CPU has bf16 dot-product units (exact at T=0 and fastest there), else float32
    dtype: typing.Literal["auto", "float32", "bfloat16"] = "auto"
    max_seq_len: int = 2048  # KV cache slots: prompt + generated + one tree
    threads: int = 0  # torch CPU threads; 0 = torch's default

    def validate(self) -> None:
        checks.positive(self, "max_seq_len")
        checks.nonneg(self, "threads")


@dataclass
class VerifyConfig:
    # walk: greedy at temperature 0, else the per-node sampling rule (any tree);
    # specinfer / spectr: token-level multi-draft rules; traversal: sequence-level, leaf to root;
    # all three for sampled trees only (i.i.d. sibling groups with their q)
    rule: typing.Literal["walk", "specinfer", "spectr", "traversal"] = "walk"
    feedback_topk: int = 0  # also send the drafter the target's top-k at visited rows; 0 = off

    def validate(self) -> None:
        checks.nonneg(self, "feedback_topk")


@dataclass
class VllmConfig:
    """The vLLM rows of `specdraft eval` (verifier.backend: vllm): vLLM plain, vLLM's own ngram method and
    vLLM drafting through each listed sidecar, one engine each, on the eval's prompts."""

    spec_tokens: int = 4  # draft tokens per step (vLLM verifies chains, not trees)
    ngram_min: int = 2  # vLLM's ngram method: prompt-lookup n-gram sizes
    ngram_max: int = 3
    sidecars: list[str] = field(default_factory=lambda: ["configs/sidecar.yaml"])  # serve-drafter configs
    # float32: on CPUs without bf16 matrix units (this project's) a bf16 step over more than one token takes a
    # slow path, so verifying a chain costs 2-5x a float32 one (README, "vLLM as the verifier")
    dtype: typing.Literal["float32", "bfloat16"] = "float32"
    # extra vLLM plain rows in these dtypes, for reference (speedups stay over plain decoding in `dtype`)
    plain_dtypes: list[typing.Literal["float32", "bfloat16"]] = field(default_factory=list)
    enforce_eager: bool = False  # True skips torch.compile: minutes less start-up, slower steps
    memory_fraction: float = 0.2  # of CPU memory vLLM reserves for its KV cache (when kv_cache_mib is 0)
    # an explicit KV cache size; 0 = by memory_fraction, which vLLM's CPU worker takes as that fraction of
    # host memory minus its own RSS, so a big parent process (it forks from it) can leave nothing
    kv_cache_mib: int = 0

    def validate(self) -> None:
        checks.positive(self, "spec_tokens", "ngram_min")
        if self.ngram_max < self.ngram_min:
            raise ValueError(f"ngram_max: {self.ngram_max} < ngram_min {self.ngram_min}")
        checks.nonneg(self, "kv_cache_mib")
        checks.fraction(self, "memory_fraction", low_open=True)


@dataclass
class VerifierConfig:
    # torch: our target and tree verifier only; vllm: also the vLLM rows above, side by side in one run
    backend: typing.Literal["torch", "vllm"] = "torch"
    vllm: VllmConfig = field(default_factory=VllmConfig)

    def validate(self) -> None:
        if self.backend == "vllm":
            for i, path in enumerate(self.vllm.sidecars):
                if not Path(path).is_file():
                    raise ValueError(f"vllm.sidecars[{i}]: {path}: file not found")


@dataclass
class MatrixConfig:
    """The sampled-tree matrix of `specdraft eval` (needs an in-process specblock drafter with tree:
    sampled): every rule x delay x branches at every temperature, each against plain decoding at that
    temperature on the same prompts. Empty rules = no matrix."""

    rules: list[str] = field(default_factory=list)
    delays: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # static d
    neural: bool = False  # also a row with d chosen per step by drafter.specblock.selector
    branches: list[int] = field(default_factory=lambda: [2, 4])
    temperatures: list[float] = field(default_factory=lambda: [1.0])

    def validate(self) -> None:
        for key, values, ok, want in (
            (
                "rules",
                self.rules,
                lambda r: r in SAMPLED_TREE_RULES + ("walk",),
                f"one of {', '.join(SAMPLED_TREE_RULES + ('walk',))}",
            ),
            ("delays", self.delays, lambda v: v >= 0, ">= 0"),
            ("branches", self.branches, lambda v: v > 0, "> 0"),
            ("temperatures", self.temperatures, lambda v: v > 0, "> 0 (sampled trees)"),
        ):
            for i, v in enumerate(values):
                if not ok(v):
                    raise ValueError(f"{key}[{i}]: {v!r} must be {want}")


@dataclass
class EvalConfig:
    datasets: list[str] = field(default_factory=lambda: ["mt_bench", "humaneval"])  # names or file paths
    num_prompts: int = 6  # per dataset; 0 = all
    first_prompt: int = 0  # skip this many per dataset (e.g. trace on prompts the eval won't use)
    max_new_tokens: int = 96
    output: str = "reports/eval.json"
    strict: bool = False  # a bad record in a dataset file is an error, not a skip
    baseline: bool = True  # also run plain AR decoding for speedup and exact match
    trace: str = ""  # JSONL of the drafter's per-step selector records (select: random)
    matrix: MatrixConfig = field(default_factory=MatrixConfig)
    # more drafters side by side, on the same prompts against the same AR run: config files whose
    # `drafter:` section each is (the rest of those files is ignored; this config's sampling and verify apply)
    compare: list[str] = field(default_factory=list)

    def validate(self) -> None:
        checks.positive(self, "max_new_tokens")
        checks.nonneg(self, "num_prompts", "first_prompt")
        if not self.datasets:
            raise ValueError("datasets: empty; name at least one of " + ", ".join(DATASETS))
        for i, name in enumerate(self.datasets):
            check_dataset(f"datasets[{i}]", name)
        if self.compare and self.matrix.rules:
            raise ValueError("compare: not with eval.matrix (the matrix varies one sampled-tree drafter)")


@dataclass
class ExperimentConfig:
    # the stream: a block of each source in turn (mt_bench:1, humaneval or a .jsonl / .json of
    # conversations), prompts_per_segment[i] requests each; then `interleaved` requests taking turns among
    # the sources (segment "mixed"), each source continuing after the prompts its block used
    stream: list[str] = field(default_factory=lambda: ["mt_bench:1", "humaneval"])
    prompts_per_segment: list[int] = field(default_factory=lambda: [8, 8])  # one count per stream source
    interleaved: int = 0
    max_new_tokens: int = 32
    # ar: plain decoding; fixed: each arm of drafter.arms.choose alone (the first: the shipped default's);
    # bandit: the choice among them; bandit+updates: and online updates (drafter.bandit)
    policies: list[str] = field(default_factory=lambda: ["ar", "fixed", "bandit"])
    feedback_topk: int = 8  # bandit+updates: the target's top-k it learns from (the other policies get none)
    output: str = "reports/experiment"  # experiment.json and experiment.png

    def validate(self) -> None:
        for i, name in enumerate(self.stream):
            check_dataset(f"stream[{i}]", name)
        for i, name in enumerate(self.policies):
            if name not in POLICIES:
                raise ValueError(f"policies[{i}]: {name!r} is not one of {', '.join(POLICIES)}")
        if len(self.prompts_per_segment) != len(self.stream) or any(n < 0 for n in self.prompts_per_segment):
            raise ValueError(
                f"prompts_per_segment: one count >= 0 per stream source ({len(self.stream)}), "
                f"got {self.prompts_per_segment}"
            )
        if sum(self.prompts_per_segment) + self.interleaved == 0:
            raise ValueError("prompts_per_segment, interleaved: the stream has no request")
        checks.nonneg(self, "interleaved", "feedback_topk")
        checks.positive(self, "max_new_tokens")


POLICIES = ("ar", "fixed", "bandit", "bandit+updates")


@dataclass
class Config:
    target: TargetConfig = field(default_factory=TargetConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    server: ServerConfig = field(default_factory=ServerConfig)  # `specdraft serve-drafter` only
    data: DataConfig = field(default_factory=DataConfig)  # `specdraft prepare-data` only
    replies: RepliesConfig = field(default_factory=RepliesConfig)  # `specdraft generate-replies` only
    train: TrainConfig = field(default_factory=TrainConfig)  # `specdraft train` only
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)  # `specdraft experiment` only


# The sections each command reads; a command validates these, once.
COMMAND_SECTIONS = {
    "eval": ("target", "drafter", "sampling", "verify", "verifier", "eval"),
    "generate": ("target", "drafter", "sampling", "verify"),
    "bench": ("target", "sampling", "verify"),
    "serve-drafter": ("target", "drafter", "server"),
    "prepare-data": ("target", "data"),
    "generate-replies": ("target", "verifier", "replies"),
    "train": ("target", "train"),
    "experiment": ("target", "drafter", "sampling", "verify", "experiment"),
    "proposer": ("drafter",),
}
WIRE_INT = 2**31  # integers travel as (u)int32 on the wire and in tensor sizes: beyond that is a typo


def _check(value, hint, key: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key}: {quote(value)} is not one of {', '.join(map(str, typing.get_args(hint)))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {quote(value)}")
        return [_check(v, typing.get_args(hint)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        return _check(value, hint, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {quote(value)}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {quote(value)}")
    if hint is int and not -WIRE_INT < value < WIRE_INT:
        raise ConfigError(f"{key}: {value} is out of range (|value| < 2**31)")
    return value


def _build(cls, data, key: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {quote(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            name = k if isinstance(k, str) and len(k) <= 100 else quote(k)
            raise ConfigError(f"{key + '.' if key else ''}{name}: unknown key (known: {', '.join(sorted(names))})")
    return cls(**{k: _check(v, hints[k], f"{key + '.' if key else ''}{k}") for k, v in data.items()})


def _validate_section(section, key: str) -> None:
    """Run a section's own validate() after those of its nested sections; messages get the key path."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _validate_section(value, f"{key}.{f.name}")
    if hasattr(section, "validate"):
        try:
            section.validate()
        except (ValueError, OSError) as e:
            raise ConfigError(f"{key}.{e}") from None


def cross_checks(cfg: Config, sections: tuple[str, ...]) -> None:
    """Value checks that span sections."""
    d = cfg.drafter
    if "data" in sections and cfg.data.max_tokens > cfg.target.max_seq_len:
        raise ConfigError(f"data.max_tokens: {cfg.data.max_tokens} > target.max_seq_len {cfg.target.max_seq_len}")
    stream = cfg.train.stream
    if "train" in sections and cfg.train.data == "stream" and stream.max_tokens > cfg.target.max_seq_len:
        raise ConfigError(f"train.stream.max_tokens: {stream.max_tokens} > target.max_seq_len {cfg.target.max_seq_len}")
    sampled = d.mode == "inprocess" and d.kind == "specblock" and d.specblock.tree == "sampled"
    if "verify" in sections and cfg.verify.rule != "walk" and not sampled:
        builds = (
            "the sidecar's trees carry no draft distributions"
            if d.mode == "grpc"
            else f"drafter.kind {d.kind!r} builds deterministic trees"
            if d.kind != "specblock"
            else f"drafter.specblock.tree is {d.specblock.tree!r} (deterministic)"
        )
        raise ConfigError(
            f"verify.rule: {cfg.verify.rule!r} needs sampled trees (i.i.d. sibling groups with "
            f"their draft distribution); {builds}: use rule 'walk', or an in-process specblock "
            "drafter with specblock.tree: sampled"
        )
    if "eval" not in sections:
        return
    mx = cfg.eval.matrix
    if mx.rules and not sampled:
        raise ConfigError("eval.matrix: needs an in-process specblock drafter with specblock.tree: sampled")
    if mx.rules and mx.neural:
        try:
            checks.file_in(
                d.specblock.selector,
                "selector.safetensors",
                "train one: specdraft train --config configs/train-selector.yaml",
            )
        except OSError as e:
            raise ConfigError(f"drafter.specblock.selector: {e}") from None
    for i, path in enumerate(cfg.eval.compare):  # each drafter must work with this config's other settings
        try:
            drafter = compared_drafter(path)
            _validate_section(drafter, "drafter")
            cross_checks(dataclasses.replace(cfg, drafter=drafter), ("verify",))
        except ConfigError as e:
            raise ConfigError(f"eval.compare[{i}]: {e}") from None


@functools.cache
def compared_drafter(path: str) -> DrafterConfig:
    """The `drafter:` section of an eval.compare file (read once per process)."""
    return read_config(path).drafter


def validate(cfg: Config, command: str) -> Config:
    """Check the values of the sections `command` uses (COMMAND_SECTIONS), once."""
    sections = COMMAND_SECTIONS[command]
    for name in sections:
        _validate_section(getattr(cfg, name), name)
    cross_checks(cfg, sections)
    return cfg


class NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses anchors and aliases (&name, *name): a config has no use for them, and a
    few nested aliases expand to billions of nodes (an alias bomb)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                problem=f"YAML anchors and aliases (&name, *name) are not allowed in a config, found "
                f"{'*' if isinstance(event, yaml.AliasEvent) else '&'}{quote(event.anchor)[1:-1]}",
                problem_mark=event.start_mark,
            )
        return super().compose_node(parent, index)


def read_config(path: str | Path) -> Config:
    """A YAML file's Config, types checked but values not validated (validate; load_config does both)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(), Loader=NoAliasLoader)
    except yaml.MarkedYAMLError as e:
        where = f":{e.problem_mark.line + 1}" if e.problem_mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({e.problem or e.context})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not readable YAML (nested too deeply)") from None
    try:
        return _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except RecursionError:  # quoting a deeply nested value
        raise ConfigError(f"{path}: a value nested too deeply") from None


def load_config(path: str | Path, command: str) -> Config:
    """read_config, then validate for `command` (for a command whose arguments override nothing)."""
    cfg = read_config(path)
    try:
        return validate(cfg, command)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
