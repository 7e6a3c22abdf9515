"""vLLM from the application: the proposer class that vLLM builds (its config read from the environment,
because vLLM builds it in its own engine process), the target's replies for self-distillation data, and the
vLLM rows of `specdraft eval` (`verifier.backend: vllm`).

Environment read by the proposer:
  SPECDRAFT_CONFIG   a specdraft YAML whose `drafter` section says how to reach the sidecar
                     (drafter.grpc: address, timeout, token, TLS) and the tree budget (drafter.max_nodes)
  SPECDRAFT_SIDECAR  host:port, overriding drafter.grpc.address
"""

import gc
import os
import time

from tqdm import tqdm

from specdraft.assets import model_dir, resolved_dtype
from specdraft.build import DrafterConfig
from specdraft.config import load_config
from specdraft.report import print_columns
from specdraft.serve import spawn
from verifier.vllm_backend import SidecarProposer

PROPOSER = "specdraft.vllm.SpecdraftProposer"  # speculative_config["model"] for method custom_class
CONFIG_ENV, ADDRESS_ENV = "SPECDRAFT_CONFIG", "SPECDRAFT_SIDECAR"


def proposer_config() -> DrafterConfig:
    path = os.environ.get(CONFIG_ENV)
    cfg = load_config(path, "proposer").drafter if path else DrafterConfig()
    if os.environ.get(ADDRESS_ENV):
        cfg.grpc.address = os.environ[ADDRESS_ENV]
    return cfg


class SpecdraftProposer(SidecarProposer):
    """vLLM `custom_class` proposer: `speculative_config={"method": "custom_class", "model":
    "specdraft.vllm.SpecdraftProposer", "num_speculative_tokens": K}`."""

    def __init__(self, vllm_config):
        cfg = proposer_config()
        super().__init__(vllm_config, cfg.grpc, cfg.max_nodes)


def engine(cfg, model_path: str, dtype: str, max_model_len: int, seed: int | None = None, **kwargs):
    """A vllm.LLM sized and compiled as verifier.vllm says, seeded by `seed` (default sampling.seed); kwargs
    go to vllm.LLM (speculative_config, ...)."""
    from vllm import LLM

    v = cfg.verifier.vllm
    return LLM(
        model=model_path,
        dtype=dtype,
        max_model_len=max_model_len,
        seed=cfg.sampling.seed if seed is None else seed,
        gpu_memory_utilization=v.memory_fraction,
        kv_cache_memory_bytes=v.kv_cache_mib * 2**20 or None,
        enforce_eager=v.enforce_eager,
        **kwargs,
    )


# ---- the target's own replies, for `specdraft generate-replies` ----


def reply_generator(cfg, stops: set[int]):
    """drafter.data.Generate on one vLLM engine in the target's dtype, seeded by replies.seed: all prompts
    of a call batched, each with its own temperature (0 = greedy) and length limit. No per-request seeds:
    vLLM 0.32's CPU worker fails on a seeded request whose prefill is chunked ("CPU Generator does not use
    offset"), so sampled replies are reproducible for an uninterrupted run only."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    path, dtype = str(model_dir(cfg.target.model)), resolved_dtype(cfg.target.dtype)
    llm = engine(cfg, path, dtype, cfg.replies.max_tokens, seed=cfg.replies.seed)

    def generate(prompts, temperatures, limits):
        params = [
            SamplingParams(temperature=t, max_tokens=m, stop_token_ids=sorted(stops))
            for t, m in zip(temperatures, limits)
        ]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason == "stop") for o in outs]

    return generate


# ---- `specdraft eval` with verifier.backend: vllm ----


def vllm_variants(cfg) -> list[tuple[str, dict | None, str | None, str]]:
    """(name, speculative_config, sidecar config, dtype) per row, in the order they run."""
    v = cfg.verifier.vllm
    rows = [
        ("vLLM plain", None, None, v.dtype),
        (
            "vLLM ngram",
            {
                "method": "ngram",
                "num_speculative_tokens": v.spec_tokens,
                "prompt_lookup_min": v.ngram_min,
                "prompt_lookup_max": v.ngram_max,
            },
            None,
            v.dtype,
        ),
    ]
    for path in v.sidecars:
        rows.append(
            (
                f"vLLM + sidecar ({os.path.basename(path)})",
                {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": v.spec_tokens},
                path,
                v.dtype,
            )
        )
    rows += [(f"vLLM plain {dtype}", None, None, dtype) for dtype in v.plain_dtypes]
    return rows


def _spec_counters(llm) -> tuple[float, float]:
    """(drafted steps, accepted draft tokens) so far, from vLLM's metrics."""
    got = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    return got.get("vllm:spec_decode_num_drafts", 0.0), got.get("vllm:spec_decode_num_accepted_tokens", 0.0)


def run_vllm_variant(
    cfg,
    model_path: str,
    spec: dict | None,
    dtype: str,
    prompts: dict[str, list[tuple[str, list[int]]]],
    stops: set[int],
    progress=None,
) -> dict:
    """One vLLM engine over every prompt, one request at a time (single-stream latency, as the torch
    rows measure it). Returns per dataset: tokens, wall time, mean accepted length, outputs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = engine(cfg, model_path, dtype, cfg.target.max_seq_len, speculative_config=spec, disable_log_stats=False)
    params = SamplingParams(
        temperature=cfg.sampling.temperature,
        top_p=cfg.sampling.top_p,
        top_k=cfg.sampling.top_k or -1,
        max_tokens=cfg.eval.max_new_tokens,
        seed=cfg.sampling.seed,
        stop_token_ids=sorted(stops),
    )
    llm.generate(
        [TokensPrompt(prompt_token_ids=prompts[next(iter(prompts))][0][1])],
        SamplingParams(max_tokens=4),
        use_tqdm=False,
    )  # warm-up, untimed
    out = {}
    try:
        for name, items in prompts.items():
            drafts0, accepted0 = _spec_counters(llm)
            outputs, wall = [], 0.0
            for pid, ids in items:
                t0 = time.perf_counter()
                res = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
                wall += time.perf_counter() - t0
                outputs.append({"id": pid, "tokens": list(res[0].outputs[0].token_ids)})
                if progress is not None:
                    progress()
            drafts, accepted = (a - b for a, b in zip(_spec_counters(llm), (drafts0, accepted0)))
            n = sum(len(o["tokens"]) for o in outputs)
            out[name] = {
                "tokens": n,
                "wall_s": wall,
                "tokens_per_s": n / wall,
                "drafted_steps": drafts,
                "mean_accepted_length": 1 + accepted / drafts if drafts else None,
                "outputs": outputs,
            }
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return out


def run_vllm_eval(cfg, jobs: list[tuple[str, str, list[int]]], stops: set[int], torch_report: dict) -> dict:
    """The vLLM comparison, per dataset: every vLLM variant and specdraft's own tree verifier (the torch
    rows of torch_report), with speedup over vLLM plain and, at temperature 0, whether each variant's
    outputs equal vLLM plain's token for token."""

    prompts: dict[str, list[tuple[str, list[int]]]] = {}
    for name, pid, ids in jobs:
        prompts.setdefault(name, []).append((pid, ids))
    variants = vllm_variants(cfg)
    bar = tqdm(total=len(variants) * len(jobs), desc="eval vLLM", unit="prompt")
    runs = {}
    saved = {key: os.environ.get(key) for key in (CONFIG_ENV, ADDRESS_ENV)}
    for name, spec, sidecar, dtype in variants:
        bar.set_postfix_str(name)
        proc = None
        if sidecar is not None:
            proc, address = spawn(sidecar)
            os.environ[CONFIG_ENV], os.environ[ADDRESS_ENV] = sidecar, address  # read by vLLM's engine process
        try:
            runs[name] = run_vllm_variant(
                cfg, str(model_dir(cfg.target.model)), spec, dtype, prompts, stops, bar.update
            )
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait()
            for key, value in saved.items():  # the caller's environment as it was
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    bar.close()
    table = {}
    for ds in prompts:
        plain = runs["vLLM plain"][ds]
        rows = {}
        for name, run in runs.items():
            r = run[ds]
            rows[name] = {
                "tau": r["mean_accepted_length"],
                "tokens": r["tokens"],
                "tokens_per_s": r["tokens_per_s"],
                "speedup": r["tokens_per_s"] / plain["tokens_per_s"],
            }
            if cfg.sampling.temperature == 0:
                rows[name]["equal_to_plain"] = [o["tokens"] for o in r["outputs"]] == [
                    o["tokens"] for o in plain["outputs"]
                ]
        own = torch_report["datasets"].get(ds)
        if own is not None:
            rows[f"specdraft tree verifier ({resolved_dtype(cfg.target.dtype)})"] = {
                "tau": own["tau"],
                "tokens": own["tokens"],
                "tokens_per_s": own["spec_tokens_per_s"],
                "speedup": own["spec_tokens_per_s"] / plain["tokens_per_s"],
                "equal_to_plain": None,
            }
        table[ds] = rows
    return {"datasets": table, "runs": runs}


def print_vllm_table(vllm_report: dict) -> None:
    cols = [
        ("dataset", 10),
        ("verifier / drafter", 56),
        ("tau", 6),
        ("tokens", 7),
        ("tok/s", 7),
        ("vs vLLM plain", 14),
        ("=plain", 7),
    ]
    print_columns(
        cols,
        [
            [
                ds,
                name,
                "-" if r["tau"] is None else f"{r['tau']:.2f}",
                r["tokens"],
                f"{r['tokens_per_s']:.1f}",
                f"{r['speedup']:.2f}",
                {True: "yes", False: "NO"}.get(r.get("equal_to_plain"), "-"),
            ]
            for ds, rows in vllm_report["datasets"].items()
            for name, r in rows.items()
        ],
    )
