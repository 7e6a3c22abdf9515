"""vLLM as the verifier: a vLLM proposer that drafts through the specdraft sidecar, and the vLLM rows of
`specdraft eval` (`verifier.backend: vllm`).

vLLM 0.32 verifies *chains* (no tree attention) and hands an external drafter token ids only, through
its `custom_class` extension point: vLLM builds `SpecdraftProposer(vllm_config)` inside its engine
process and calls `propose(...)` once per step with every running request's tokens. So, per request:

- one sidecar stream (`RemoteDrafter`: deadline fallback, reconnect with replay), opened at its first
  proposal and closed when the request leaves the batch (finished or preempted; a preempted request
  that comes back opens a new stream with its whole context);
- the proposal is the tree's *first path*: from the roots down, the first-listed child at each level
  (every specdraft drafter lists children best first), cut to num_speculative_tokens;
- acceptance is inferred from the next call: the tokens vLLM committed since the last proposal begin
  with the accepted draft tokens, then one token of its own, and that is sent back as feedback.

vLLM does not say which request a batch row belongs to, so rows are matched to streams by content: a
stream owns a row whose tokens extend the tokens the stream has seen. Requests with identical
contexts are interchangeable until they diverge, so a swap between them changes nothing.

Whatever the sidecar does, vLLM's own verification decides the output: a late, lost or bad tree
proposes nothing and vLLM decodes that step normally.

Configuration (read in vLLM's engine process, so through the environment):
  SPECDRAFT_CONFIG   a specdraft YAML whose `drafter` section says how to reach the sidecar
                     (drafter.grpc: address, timeout, token, TLS) and the tree budget (drafter.max_nodes)
  SPECDRAFT_SIDECAR  host:port, overriding drafter.grpc.address
"""
import gc
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from drafter.build import DrafterConfig
from drafter.interface import Feedback, VerifierUpdate
from drafter.tree import DraftTree

log = logging.getLogger(__name__)

PROPOSER = "verifier.vllm_backend.SpecdraftProposer"  # speculative_config["model"] for method custom_class
CONFIG_ENV, ADDRESS_ENV = "SPECDRAFT_CONFIG", "SPECDRAFT_SIDECAR"


def first_path(tree: DraftTree, k: int) -> list[int]:
    """Node ids of the tree's first path (first-listed child at each level), at most k long."""
    path, parent = [], -1
    while len(path) < k:
        child = next((i for i in range(path[-1] + 1 if path else 0, len(tree)) if tree.parents[i] == parent), None)
        if child is None:
            break
        path.append(child)
        parent = child
    return path


def proposer_config() -> DrafterConfig:
    from verifier.config import load_config

    path = os.environ.get(CONFIG_ENV)
    cfg = load_config(path).drafter if path else DrafterConfig()
    if os.environ.get(ADDRESS_ENV):
        cfg.grpc.address = os.environ[ADDRESS_ENV]
    return cfg


@dataclass(eq=False)  # identity: two requests may hold equal tokens
class _Request:
    drafter: object                      # RemoteDrafter: one sidecar stream
    seen: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # tokens the stream has been sent
    path: list[int] = field(default_factory=list)       # node ids of the last proposal
    proposal: list[int] = field(default_factory=list)   # and their tokens

    def extends(self, ctx: np.ndarray) -> bool:
        n = len(self.seen)
        return n <= len(ctx) and bool((ctx[:n] == self.seen).all())


class SpecdraftProposer:
    """vLLM `custom_class` proposer: `speculative_config={"method": "custom_class", "model":
    "verifier.vllm_backend.SpecdraftProposer", "num_speculative_tokens": K}`."""

    def __init__(self, vllm_config):
        from verifier.remote import connect

        self.k = vllm_config.speculative_config.num_speculative_tokens
        self.vocab_size = vllm_config.model_config.get_vocab_size()
        self.max_model_len = vllm_config.model_config.max_model_len
        self.cfg = proposer_config()
        self.max_nodes = max(self.cfg.max_nodes, self.k)
        self.conn = connect(self.cfg.grpc)
        self.requests: list[_Request] = []  # in the row order of the last call
        self.opened = 0
        log.info("specdraft proposer: drafting through the sidecar at %s, up to %d tokens per step from %d-node trees",
                 self.cfg.grpc.address, self.k, self.max_nodes)

    def load_model(self, *args, **kwargs) -> None:
        """vLLM's hook for loading draft weights: the sidecar holds the drafter, so nothing to do."""

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings=None, **_) -> list[list[int]]:
        """sampled_token_ids[i]: the tokens row i committed this step (empty while it is mid-prefill);
        token_ids_cpu[i, :num_tokens_no_spec[i]]: row i's whole context. Returns draft tokens per row."""
        from verifier.remote import RemoteDrafter

        free = list(self.requests)
        live, drafts = [], []
        for i, sampled in enumerate(sampled_token_ids):
            ctx = token_ids_cpu[i, :int(num_tokens_no_spec[i])]
            req = self._claim(free, i, ctx)
            if req is None and sampled:  # a new request (or one back from preemption)
                self.opened += 1
                req = _Request(RemoteDrafter(self.conn, f"vllm-{self.opened}"))
            if req is not None:
                live.append(req)
            drafts.append(self._step(req, ctx) if sampled else [])
        for req in free:  # finished or preempted
            req.drafter.close()
        self.requests = live
        return drafts

    def _claim(self, free: list[_Request], row: int, ctx: np.ndarray) -> _Request | None:
        """The stream whose tokens this row extends; the one that had this row last time first."""
        hint = [self.requests[row]] if row < len(self.requests) and self.requests[row] in free else []
        req = next((r for r in hint + free if r.extends(ctx)), None)
        if req is not None:
            free.remove(req)
        return req

    def _step(self, req: _Request, ctx: np.ndarray) -> list[int]:
        new = ctx[len(req.seen):]
        feedback = None
        if req.proposal:
            # vLLM committed the accepted draft tokens and then one of its own
            m = max(0, min(len(req.proposal), len(new) - 1))
            hits = int(np.cumprod(new[:m] == np.asarray(req.proposal[:m])).sum())
            feedback = Feedback(accepted=req.path[:hits], target_probs={})
        update = VerifierUpdate(new.tolist(), feedback, self.max_nodes, self.vocab_size)
        req.seen = ctx.copy()
        tree = req.drafter.draft(update)
        room = self.max_model_len - len(ctx)
        req.path = first_path(tree, min(self.k, room)) if tree is not None else []
        req.proposal = tree.path_tokens(req.path) if req.path else []
        return req.proposal


def engine(cfg, model_path: str, dtype: str, max_model_len: int, **kwargs):
    """A vllm.LLM sized and compiled as verifier.vllm says; kwargs go to vllm.LLM (speculative_config, ...)."""
    from vllm import LLM

    v = cfg.verifier.vllm
    return LLM(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=cfg.sampling.seed,
               gpu_memory_utilization=v.memory_fraction, kv_cache_memory_bytes=v.kv_cache_mib * 2**20 or None,
               enforce_eager=v.enforce_eager, **kwargs)


# ---- the target's own replies, for `specdraft prepare-data` with data.replies: target ----

def reply_generator(cfg, stops: set[int]):
    """A function from prompts' token ids to the target's greedy replies (at most data.reply_tokens each),
    on one vLLM engine in the target's dtype, all prompts of a call batched."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from verifier.assets import model_dir

    llm = engine(cfg, str(model_dir(cfg.target.model)), cfg.target.dtype, cfg.data.max_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=cfg.data.reply_tokens, stop_token_ids=sorted(stops))

    def replies(prompts: list[list[int]]) -> list[list[int]]:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    return replies


# ---- `specdraft eval` with verifier.backend: vllm ----

def vllm_variants(cfg) -> list[tuple[str, dict | None, str | None, str]]:
    """(name, speculative_config, sidecar config, dtype) per row, in the order they run."""
    v = cfg.verifier.vllm
    rows = [("vLLM plain", None, None, v.dtype),
            ("vLLM ngram", {"method": "ngram", "num_speculative_tokens": v.spec_tokens,
                            "prompt_lookup_min": v.ngram_min, "prompt_lookup_max": v.ngram_max}, None, v.dtype)]
    for path in v.sidecars:
        rows.append((f"vLLM + sidecar ({os.path.basename(path)})",
                     {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": v.spec_tokens}, path,
                     v.dtype))
    rows += [(f"vLLM plain {dtype}", None, None, dtype) for dtype in v.plain_dtypes]
    return rows


def _spec_counters(llm) -> tuple[float, float]:
    """(drafted steps, accepted draft tokens) so far, from vLLM's metrics."""
    got = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    return got.get("vllm:spec_decode_num_drafts", 0.0), got.get("vllm:spec_decode_num_accepted_tokens", 0.0)


def run_vllm_variant(cfg, model_path: str, spec: dict | None, dtype: str,
                     prompts: dict[str, list[tuple[str, list[int]]]], stops: set[int], progress=None) -> dict:
    """One vLLM engine over every prompt, one request at a time (single-stream latency, as the torch
    rows measure it). Returns per dataset: tokens, wall time, mean accepted length, outputs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = engine(cfg, model_path, dtype, cfg.target.max_seq_len, speculative_config=spec, disable_log_stats=False)
    params = SamplingParams(temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                            top_k=cfg.sampling.top_k or -1, max_tokens=cfg.eval.max_new_tokens, seed=cfg.sampling.seed,
                            stop_token_ids=sorted(stops))
    llm.generate([TokensPrompt(prompt_token_ids=prompts[next(iter(prompts))][0][1])],
                 SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up, untimed
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
            out[name] = {"tokens": n, "wall_s": wall, "tokens_per_s": n / wall, "drafted_steps": drafts,
                         "mean_accepted_length": 1 + accepted / drafts if drafts else None, "outputs": outputs}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return out


def run_vllm_eval(cfg, jobs: list[tuple[str, str, list[int]]], stops: set[int], torch_report: dict) -> dict:
    """The vLLM comparison, per dataset: every vLLM variant and specdraft's own tree verifier (the torch
    rows of torch_report), with speedup over vLLM plain and, at temperature 0, whether each variant's
    outputs equal vLLM plain's token for token."""
    from tqdm import tqdm

    from drafter.server import spawn
    from verifier.assets import model_dir

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
            runs[name] = run_vllm_variant(cfg, str(model_dir(cfg.target.model)), spec, dtype, prompts, stops,
                                          bar.update)
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
            rows[name] = {"tau": r["mean_accepted_length"], "tokens": r["tokens"], "tokens_per_s": r["tokens_per_s"],
                          "speedup": r["tokens_per_s"] / plain["tokens_per_s"]}
            if cfg.sampling.temperature == 0:
                rows[name]["equal_to_plain"] = [o["tokens"] for o in r["outputs"]] == [o["tokens"] for o in plain["outputs"]]
        own = torch_report["datasets"].get(ds)
        if own is not None:
            rows[f"specdraft tree verifier ({cfg.target.dtype})"] = {
                "tau": own["tau"], "tokens": own["tokens"], "tokens_per_s": own["spec_tokens_per_s"],
                "speedup": own["spec_tokens_per_s"] / plain["tokens_per_s"], "equal_to_plain": None}
        table[ds] = rows
    return {"datasets": table, "runs": runs}


def print_vllm_table(vllm_report: dict) -> None:
    from verifier.evaluate import print_columns

    cols = [("dataset", 10), ("verifier / drafter", 56), ("tau", 6), ("tokens", 7), ("tok/s", 7),
            ("vs vLLM plain", 14), ("=plain", 7)]
    print_columns(cols, [[ds, name, "-" if r["tau"] is None else f"{r['tau']:.2f}", r["tokens"],
                          f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}",
                          {True: "yes", False: "NO"}.get(r.get("equal_to_plain"), "-")]
                         for ds, rows in vllm_report["datasets"].items() for name, r in rows.items()])
