"""Deployment / evaluation config: dataclasses with defaults that run, loaded from YAML strictly
(an unknown key, a wrong type or a bad value is a ConfigError naming the key)."""
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bandit.experiment import ExperimentConfig
from drafter.build import DrafterConfig
from drafter.data import DataConfig
from drafter.interface import SamplingParams
from drafter.server import ServerConfig
from drafter.train import TrainConfig

DATASETS = ("mt_bench", "humaneval")


class ConfigError(ValueError):
    pass


@dataclass
class TargetConfig:
    model: str = "smollm2-135m-instruct"   # an embedded model's name or a safetensors model folder
    dtype: typing.Literal["float32", "bfloat16"] = "float32"
    max_seq_len: int = 2048                 # KV cache slots: prompt + generated + one tree
    threads: int = 0                        # torch CPU threads; 0 = torch's default


@dataclass
class VerifyConfig:
    # walk: greedy at temperature 0, else the per-node sampling rule (any tree);
    # specinfer / spectr: token-level multi-draft rules; traversal: sequence-level, leaf to root;
    # all three for sampled trees only (i.i.d. sibling groups with their q)
    rule: typing.Literal["walk", "specinfer", "spectr", "traversal"] = "walk"
    feedback_topk: int = 0                  # also send the drafter the target's top-k at visited rows; 0 = off


@dataclass
class VllmConfig:
    """The vLLM rows of `specdraft eval` (verifier.backend: vllm): vLLM plain, vLLM's own ngram method and
    vLLM drafting through each listed sidecar, one engine each, on the eval's prompts."""
    spec_tokens: int = 4                    # draft tokens per step (vLLM verifies chains, not trees)
    ngram_min: int = 2                      # vLLM's ngram method: prompt-lookup n-gram sizes
    ngram_max: int = 3
    sidecars: list[str] = field(default_factory=lambda: ["configs/sidecar.yaml"])  # serve-drafter configs
    # float32: on CPUs without bf16 matrix units (this project's) a bf16 step over more than one token takes a
    # slow path, so verifying a chain costs 2-5x a float32 one (README, "vLLM as the verifier")
    dtype: typing.Literal["float32", "bfloat16"] = "float32"
    # extra vLLM plain rows in these dtypes, for reference (speedups stay over plain decoding in `dtype`)
    plain_dtypes: list[typing.Literal["float32", "bfloat16"]] = field(default_factory=list)
    enforce_eager: bool = False             # True skips torch.compile: minutes less start-up, slower steps
    memory_fraction: float = 0.2            # of CPU memory vLLM reserves for its KV cache (when kv_cache_mib is 0)
    # an explicit KV cache size; 0 = by memory_fraction, which vLLM's CPU worker takes as that fraction of
    # host memory minus its own RSS, so a big parent process (it forks from it) can leave nothing
    kv_cache_mib: int = 0


@dataclass
class VerifierConfig:
    # torch: our target and tree verifier only; vllm: also the vLLM rows above, side by side in one run
    backend: typing.Literal["torch", "vllm"] = "torch"
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass
class MatrixConfig:
    """The sampled-tree matrix of `specdraft eval` (needs an in-process specblock drafter with tree:
    sampled): every rule x delay x branches at every temperature, each against plain decoding at that
    temperature on the same prompts. Empty rules = no matrix."""
    rules: list[str] = field(default_factory=list)
    delays: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # static d
    neural: bool = False                    # also a row with d chosen per step by drafter.specblock.selector
    branches: list[int] = field(default_factory=lambda: [2, 4])
    temperatures: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class EvalConfig:
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    num_prompts: int = 6                    # per dataset; 0 = all
    first_prompt: int = 0                   # skip this many per dataset (e.g. trace on prompts the eval won't use)
    max_new_tokens: int = 96
    output: str = "reports/eval.json"
    baseline: bool = True                   # also run plain AR decoding for speedup and exact match
    trace: str = ""                         # JSONL of the drafter's per-step selector records (select: random)
    matrix: MatrixConfig = field(default_factory=MatrixConfig)
    # more drafters side by side, on the same prompts against the same AR run: config files whose
    # `drafter:` section each is (the rest of those files is ignored; this config's sampling and verify apply)
    compare: list[str] = field(default_factory=list)


@dataclass
class Config:
    target: TargetConfig = field(default_factory=TargetConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    server: ServerConfig = field(default_factory=ServerConfig)  # `specdraft serve-drafter` only
    data: DataConfig = field(default_factory=DataConfig)         # `specdraft prepare-data` only
    train: TrainConfig = field(default_factory=TrainConfig)      # `specdraft train` only
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)  # `specdraft bandit-experiment` only


def _check(value, hint, key: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, typing.get_args(hint)))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check(v, typing.get_args(hint)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        return _check(value, hint, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls, data, key: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"{key + '.' if key else ''}{k}: unknown key (known: {', '.join(sorted(names))})")
    return cls(**{k: _check(v, hints[k], f"{key + '.' if key else ''}{k}") for k, v in data.items()})


def validate(cfg: Config) -> Config:
    """Value checks the types cannot express."""
    d, s = cfg.drafter, cfg.server
    positive = {"target.max_seq_len": cfg.target.max_seq_len, "drafter.max_nodes": d.max_nodes,
                "drafter.ngram.max_depth": d.ngram.max_depth, "drafter.ngram.min_ngram": d.ngram.min_ngram,
                "drafter.ngram.max_matches": d.ngram.max_matches, "eval.max_new_tokens": cfg.eval.max_new_tokens,
                "drafter.grpc.timeout_ms": d.grpc.timeout_ms, "drafter.grpc.max_backoff_s": d.grpc.max_backoff_s,
                "server.max_sessions": s.max_sessions, "server.max_nodes": s.max_nodes,
                "server.max_message_mb": s.max_message_mb, "server.session_ttl_s": s.session_ttl_s}
    nonneg = {"target.threads": cfg.target.threads, "sampling.top_k": cfg.sampling.top_k,
              "eval.num_prompts": cfg.eval.num_prompts, "eval.first_prompt": cfg.eval.first_prompt,
              "sampling.temperature": cfg.sampling.temperature,
              "server.drain_s": s.drain_s, "server.workers": s.workers, "verify.feedback_topk": cfg.verify.feedback_topk}
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key}: must be > 0, got {v}")
    for key, v in nonneg.items():
        if v < 0:
            raise ConfigError(f"{key}: must be >= 0, got {v}")
    if cfg.drafter.ngram.max_ngram < cfg.drafter.ngram.min_ngram:
        raise ConfigError(f"drafter.ngram.max_ngram: {cfg.drafter.ngram.max_ngram} < min_ngram {cfg.drafter.ngram.min_ngram}")
    if not 0 < cfg.sampling.top_p <= 1:
        raise ConfigError(f"sampling.top_p: must be in (0, 1], got {cfg.sampling.top_p}")
    for key, addr in (("drafter.grpc.address", d.grpc.address), ("server.address", s.address)):
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"{key}: {addr!r} is not host:port")
    if bool(s.tls_cert) != bool(s.tls_key):
        raise ConfigError("server.tls_cert, server.tls_key: give both (TLS) or neither")
    for key, path in (("server.tls_cert", s.tls_cert), ("server.tls_key", s.tls_key), ("drafter.grpc.tls_ca", d.grpc.tls_ca)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{key}: {path}: file not found")
    for key, var in (("server.token_env", s.token_env), ("drafter.grpc.token_env", d.grpc.token_env)):
        if var and not os.environ.get(var):
            raise ConfigError(f"{key}: environment variable {var} is not set or empty")
    for key, v in (("data.max_conversations", cfg.data.max_conversations), ("data.first_record", cfg.data.first_record)):
        if v < 0:
            raise ConfigError(f"{key}: must be >= 0, got {v}")
    for key, v in (("data.max_tokens", cfg.data.max_tokens), ("data.topk", cfg.data.topk),
                   ("data.shard_tokens", cfg.data.shard_tokens), ("data.reply_tokens", cfg.data.reply_tokens),
                   ("data.reply_batch", cfg.data.reply_batch)):
        if v <= 0:
            raise ConfigError(f"{key}: must be > 0, got {v}")
    tr = cfg.train
    for key, v in (("train.steps", tr.steps), ("train.conversations_per_step", tr.conversations_per_step),
                   ("train.max_positions", tr.max_positions), ("train.eval_every", tr.eval_every), ("train.lr", tr.lr),
                   ("train.model.block_size", tr.model.block_size), ("train.model.n_layers", tr.model.n_layers),
                   ("train.model.draft_vocab", tr.model.draft_vocab), ("train.model.max_rank", tr.model.max_rank),
                   ("drafter.specblock.max_blocks", d.specblock.max_blocks),
                   ("drafter.specblock.max_branch", d.specblock.max_branch),
                   ("drafter.specblock.branches", d.specblock.branches),
                   ("drafter.specblock.rollout", d.specblock.rollout)):
        if v <= 0:
            raise ConfigError(f"{key}: must be > 0, got {v}")
    if cfg.data.max_tokens > cfg.target.max_seq_len:
        raise ConfigError(f"data.max_tokens: {cfg.data.max_tokens} > target.max_seq_len {cfg.target.max_seq_len}")
    if not 0 <= cfg.data.heldout_fraction <= 1:
        raise ConfigError(f"data.heldout_fraction: must be in [0, 1], got {cfg.data.heldout_fraction}")
    sampled = d.mode == "inprocess" and d.kind == "specblock" and d.specblock.tree == "sampled"
    if cfg.verify.rule != "walk" and not sampled:
        builds = "the sidecar's trees carry no draft distributions" if d.mode == "grpc" else \
            f"drafter.kind {d.kind!r} builds deterministic trees" if d.kind != "specblock" else \
            f"drafter.specblock.tree is {d.specblock.tree!r} (deterministic)"
        raise ConfigError(f"verify.rule: {cfg.verify.rule!r} needs sampled trees (i.i.d. sibling groups with "
                          f"their draft distribution); {builds}: use rule 'walk', or an in-process specblock "
                          "drafter with specblock.tree: sampled")
    if d.mode == "inprocess" and d.kind == "specblock" and not (Path(d.specblock.checkpoint) / "drafter.safetensors").is_file():
        raise ConfigError(f"drafter.specblock.checkpoint: {d.specblock.checkpoint}: no drafter.safetensors "
                          "(train one with `specdraft train`)")
    if tr.init and not (Path(tr.init) / "drafter.safetensors").is_file():
        raise ConfigError(f"train.init: {tr.init}: no drafter.safetensors")
    if d.lookup and (d.kind != "specblock" or d.specblock.tree == "sampled"):
        raise ConfigError("drafter.lookup: only in front of a specblock drafter with a deterministic tree "
                          f"(kind {d.kind!r}, specblock.tree {d.specblock.tree!r})")
    if not 0 <= d.specblock.min_prob < 1:
        raise ConfigError(f"drafter.specblock.min_prob: must be in [0, 1), got {d.specblock.min_prob}")
    if d.specblock.delay < 0:
        raise ConfigError(f"drafter.specblock.delay: must be >= 0, got {d.specblock.delay}")
    if not d.specblock.delays or any(v < 0 for v in d.specblock.delays):
        raise ConfigError(f"drafter.specblock.delays: a non-empty list of delays >= 0, got {d.specblock.delays}")
    mx = cfg.eval.matrix
    if sampled and (d.specblock.select == "neural" or (mx.rules and mx.neural)):
        if not (Path(d.specblock.selector) / "selector.safetensors").is_file():
            raise ConfigError(f"drafter.specblock.selector: {d.specblock.selector}: no selector.safetensors (train "
                              "one: specdraft train --config configs/train-selector.yaml)")
    if mx.rules:
        from verifier.rules import SAMPLED_TREE_RULES

        if not sampled:
            raise ConfigError("eval.matrix: needs an in-process specblock drafter with specblock.tree: sampled")
        for key, values, ok, want in (("rules", mx.rules, lambda r: r in SAMPLED_TREE_RULES + ("walk",),
                                       f"one of {', '.join(SAMPLED_TREE_RULES + ('walk',))}"),
                                      ("delays", mx.delays, lambda v: v >= 0, ">= 0"),
                                      ("branches", mx.branches, lambda v: v > 0, "> 0"),
                                      ("temperatures", mx.temperatures, lambda v: v > 0, "> 0 (sampled trees)")):
            for i, v in enumerate(values):
                if not ok(v):
                    raise ConfigError(f"eval.matrix.{key}[{i}]: {v!r} must be {want}")
    b = d.bandit
    if b.enabled and d.kind != "specblock":
        raise ConfigError(f"drafter.bandit.enabled: the {d.kind} drafter has no weights to update online; "
                          "use drafter.kind specblock or leave the bandit off")
    if not b.arms or any(a < 0 for a in b.arms):
        raise ConfigError(f"drafter.bandit.arms: a non-empty list of optimizer steps >= 0 (0 = skip), got {b.arms}")
    for key in ("buffer_positions", "decide_every", "window_positions", "guard_positions", "lr", "exploration"):
        if getattr(b, key) <= 0:
            raise ConfigError(f"drafter.bandit.{key}: must be > 0, got {getattr(b, key)}")
    if b.guard_z < 0:
        raise ConfigError(f"drafter.bandit.guard_z: must be >= 0, got {b.guard_z}")
    if b.horizon < 0:
        raise ConfigError(f"drafter.bandit.horizon: must be >= 0 (0 = no credit beyond the window), got {b.horizon}")
    if not 0 < b.discount <= 1:
        raise ConfigError(f"drafter.bandit.discount: must be in (0, 1], got {b.discount}")
    ex = cfg.experiment
    for i, name in enumerate(ex.stream):
        if name not in DATASETS:
            raise ConfigError(f"experiment.stream[{i}]: {name!r} is not one of {', '.join(DATASETS)}")
    for i, name in enumerate(ex.policies):
        if name not in ("never", "always", "bandit"):
            raise ConfigError(f"experiment.policies[{i}]: {name!r} is not one of never, always, bandit")
    if len(ex.prompts_per_segment) != len(ex.stream) or any(n <= 0 for n in ex.prompts_per_segment):
        raise ConfigError(f"experiment.prompts_per_segment: one count > 0 per stream segment ({len(ex.stream)}), "
                          f"got {ex.prompts_per_segment}")
    for key in ("max_new_tokens", "always_steps"):
        if getattr(ex, key) <= 0:
            raise ConfigError(f"experiment.{key}: must be > 0, got {getattr(ex, key)}")
    v = cfg.verifier.vllm
    if v.spec_tokens <= 0 or v.ngram_min <= 0:
        key = "spec_tokens" if v.spec_tokens <= 0 else "ngram_min"
        raise ConfigError(f"verifier.vllm.{key}: must be > 0, got {getattr(v, key)}")
    if v.ngram_max < v.ngram_min:
        raise ConfigError(f"verifier.vllm.ngram_max: {v.ngram_max} < ngram_min {v.ngram_min}")
    if v.kv_cache_mib < 0:
        raise ConfigError(f"verifier.vllm.kv_cache_mib: must be >= 0 (0 = by memory_fraction), got {v.kv_cache_mib}")
    if not 0 < v.memory_fraction <= 1:
        raise ConfigError(f"verifier.vllm.memory_fraction: must be in (0, 1], got {v.memory_fraction}")
    if cfg.verifier.backend == "vllm":
        for i, path in enumerate(v.sidecars):
            if not Path(path).is_file():
                raise ConfigError(f"verifier.vllm.sidecars[{i}]: {path}: file not found")
    if cfg.eval.compare and mx.rules:
        raise ConfigError("eval.compare: not with eval.matrix (the matrix varies one sampled-tree drafter)")
    for i, path in enumerate(cfg.eval.compare):  # each drafter must work with this config's other settings
        try:
            validate(dataclasses.replace(cfg, drafter=read_config(path).drafter,
                                         eval=dataclasses.replace(cfg.eval, compare=[])))
        except ConfigError as e:
            raise ConfigError(f"eval.compare[{i}]: {e}") from None
    for i, name in enumerate(cfg.eval.datasets):
        if name not in DATASETS:
            raise ConfigError(f"eval.datasets[{i}]: {name!r} is not one of {', '.join(DATASETS)}")
    return cfg


def read_config(path: str | Path) -> Config:
    """A YAML file's Config, types checked but values not validated (load_config does both)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        return _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_config(path: str | Path) -> Config:
    cfg = read_config(path)
    try:
        return validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
