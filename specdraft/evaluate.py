"""Offline acceptance-rate evaluation (`specdraft eval`): every prompt is decoded plainly (AR) and
speculatively, by the config's drafter and each drafter of eval.compare, with the same backend in the
same run; per drafter and dataset we report tau, acceptance per depth, drafter forwards, drafting and
verification cost, tokens/s, speedup and (at temperature 0) exact match with AR, and plot acceptance
by depth per drafter.

Multi-turn conversations are evaluated as MT-Bench does: each user turn is answered with the target's
own earlier answers in context (never the dataset's), and every number is also reported per turn."""

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

import grpc
import torch
from tqdm import tqdm

from drafter.data import chat_prompt
from proto.interface import Drafter
from specdraft.assets import load_target
from specdraft.build import DrafterConfig, Shared, load_drafter_model, make_drafter
from specdraft.config import Config, ConfigError, compared_drafter
from specdraft.datasets import Conversation, load_dataset
from specdraft.report import print_columns
from specdraft.vllm import run_vllm_eval
from verifier.engine import generate, tau
from verifier.remote import RemoteDrafter, connect, server_info

log = logging.getLogger(__name__)


def drafter_factory(cfg: DrafterConfig, target) -> Callable[[str], Drafter]:
    """label -> a fresh drafter session: in-process, or a stream to the sidecar (checked once here, so
    a wrong address or a sidecar for another vocabulary is a config error, not a silent plain run)."""
    vocab_size = target.vocab_size
    if cfg.mode == "inprocess":
        # one suffix store per drafter row, fed only by that row's own speculative sessions, in prompt
        # order, from empty: never by plain decoding (whose output at temperature 0 is the answer)
        model, shared = load_drafter_model(cfg, target.args, target.embedding), Shared(cfg)
        return lambda label: make_drafter(cfg, model, shared)
    conn = connect(cfg.grpc)
    try:
        info = server_info(conn)
    except grpc.RpcError as e:
        raise ConfigError(
            f"drafter.grpc.address: no specdraft drafter at {cfg.grpc.address} ({e.code().name}: {e.details()})"
        ) from None
    if info.vocab_size != vocab_size:
        raise ConfigError(
            f"drafter.grpc.address: the sidecar at {cfg.grpc.address} drafts for a vocabulary of "
            f"{info.vocab_size}, the target has {vocab_size}"
        )
    log.info("drafting through the sidecar at %s (%s drafter, %s)", cfg.grpc.address, info.drafter, info.model)
    return lambda label: RemoteDrafter(conn, label)


def drafter_label(cfg: DrafterConfig) -> str:
    if cfg.mode == "grpc":
        return f"sidecar {cfg.grpc.address}"
    return Path(cfg.specblock.checkpoint).name if cfg.kind == "specblock" else cfg.kind


def drafters_to_run(cfg: Config) -> list[tuple[str, DrafterConfig]]:
    """(label, drafter config): the config's own drafter, then every eval.compare file's `drafter:`
    section (validated with this config's other settings by specdraft.config.validate)."""
    out = [(drafter_label(cfg.drafter), cfg.drafter)]
    for path in cfg.eval.compare:
        d = compared_drafter(path)
        label = drafter_label(d)
        labels = [lb for lb, _ in out]
        out.append((label if label not in labels else f"{label} ({path})", d))
    return out


def decode(target, prompt_ids: list[int], cfg: Config, stops: set[int], drafter, max_new_tokens: int):
    """verifier.engine.generate with the config's sampling, node budget and verification rule."""
    return generate(
        target,
        prompt_ids,
        cfg.sampling,
        max_new_tokens,
        stops,
        drafter,
        cfg.drafter.max_nodes,
        cfg.verify.rule,
        cfg.verify.feedback_topk,
    )


def run_prompt(target, prompt_ids, cfg: Config, stops, drafter) -> dict:
    t0 = time.perf_counter()
    steps = list(decode(target, prompt_ids, cfg, stops, drafter, cfg.eval.max_new_tokens))
    return {"steps": steps, "wall_s": time.perf_counter() - t0, "tokens": [t for s in steps for t in s.tokens]}


def summarize(records: list[dict], temperature: float) -> dict:
    spec_steps = [s for r in records for s in r["spec"]["steps"][1:]]  # [0] is the prefill's token
    max_depth = max((s.tree_depth for s in spec_steps), default=0)
    acc = []
    for d in range(1, max_depth + 1):
        tried = [s for s in spec_steps if s.tree_depth >= d]
        acc.append(sum(s.accepted >= d for s in tried) / len(tried))
    n_tokens = sum(len(r["spec"]["tokens"]) for r in records)
    spec_s = sum(r["spec"]["wall_s"] for r in records)
    out = {
        "prompts": len(records),
        "tokens": n_tokens,
        "tau": tau(spec_steps),
        "steps_with_tree": sum(s.tree_nodes > 0 for s in spec_steps) / max(len(spec_steps), 1),
        "mean_tree_nodes": sum(s.tree_nodes for s in spec_steps) / max(len(spec_steps), 1),
        "acceptance_per_depth": acc,
        "draft_forwards_per_step": sum(r["forwards"] for r in records) / max(len(spec_steps), 1),
        "draft_ms_per_step": 1000 * sum(s.draft_s for s in spec_steps) / max(len(spec_steps), 1),
        "verify_ms_per_step": 1000 * sum(s.verify_s for s in spec_steps) / max(len(spec_steps), 1),
        "spec_tokens_per_s": n_tokens / spec_s,
        "fallback_rounds": sum(r["fallback_rounds"] for r in records),
    }
    if "ar" in records[0]:
        ar_tokens = sum(len(r["ar"]["tokens"]) for r in records)
        out["ar_tokens_per_s"] = ar_tokens / sum(r["ar"]["wall_s"] for r in records)
        out["ar_ms_per_step"] = (
            1000
            * sum(s.verify_s for r in records for s in r["ar"]["steps"][1:])
            / max(sum(len(r["ar"]["steps"]) - 1 for r in records), 1)
        )
        out["speedup"] = out["spec_tokens_per_s"] / out["ar_tokens_per_s"]
        if temperature == 0:
            out["exact_match"] = all(r["spec"]["tokens"] == r["ar"]["tokens"] for r in records)
            out["mismatched"] = [
                f"{r['id']} turn {r['turn']}" for r in records if r["spec"]["tokens"] != r["ar"]["tokens"]
            ]
    return out


def summarize_turns(records: list[dict], temperature: float) -> dict:
    """summarize() over all turns, with the same per turn number under "turns" when there are several."""
    out = summarize(records, temperature)
    turns = sorted({r["turn"] for r in records})
    if len(turns) > 1:
        out["turns"] = {str(t): summarize([r for r in records if r["turn"] == t], temperature) for t in turns}
    return out


def eval_jobs(cfg: Config) -> list[tuple[str, Conversation]]:
    """(dataset, conversation) for every conversation the eval runs (eval.first_prompt, eval.num_prompts
    per dataset)."""
    jobs = []
    first, n = cfg.eval.first_prompt, cfg.eval.num_prompts
    for name in cfg.eval.datasets:
        jobs += [(name, c) for c in load_dataset(name, cfg.eval.strict)[first : first + n if n else None]]
    return jobs


def turn_prompts(cfg: Config, tokenizer, conv: Conversation) -> Iterator[tuple[int, list[int], list[dict]]]:
    """(turn number, chat-templated token ids, the messages they encode) for each user turn. The dataset's
    assistant turns are dropped: the caller appends the target's own answer (`answered`) to the messages
    before taking the next turn. Stops at a turn that leaves no room in target.max_seq_len."""
    room = cfg.target.max_seq_len - cfg.eval.max_new_tokens - cfg.drafter.max_nodes - 1
    context, turn = [], 0
    for m in conv.messages:
        if m["role"] == "assistant":
            continue
        context.append(m)
        if m["role"] != "user":
            continue
        turn += 1
        ids = chat_prompt(tokenizer, context)
        if len(ids) > room:
            log.warning(
                "%s turn %d: prompt of %d tokens leaves no room in target.max_seq_len=%d; skipped with later turns",
                conv.id,
                turn,
                len(ids),
                cfg.target.max_seq_len,
            )
            return
        yield turn, ids, context


def answered(context: list[dict], tokenizer, tokens: list[int]) -> None:
    """The target's answer joins the conversation, as the context of the next turn."""
    context.append({"role": "assistant", "content": tokenizer.decode(tokens, skip_special_tokens=True)})


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }


def run_eval(cfg: Config) -> dict:
    if cfg.eval.matrix.rules:
        return run_matrix(cfg)
    jobs = eval_jobs(cfg)  # before the model loads: a bad dataset file fails at once
    drafters = drafters_to_run(cfg)
    target, tokenizer, stops = load_target(cfg.target)
    factories = [(label, replace(cfg, drafter=d), drafter_factory(d, target)) for label, d in drafters]
    records = {label: {name: [] for name in cfg.eval.datasets} for label, _ in drafters}  # drafter -> dataset -> runs
    prompts = []  # (dataset, id, token ids) of every turn decoded: the vLLM rows decode the same prompts
    trace = []
    bar = tqdm(jobs, desc="eval", unit="conversation")
    for name, conv in bar:
        for turn, ids, context in turn_prompts(cfg, tokenizer, conv):
            pid = conv.id if turn == 1 else f"{conv.id} turn {turn}"
            prompts.append((name, pid, ids))
            ar = run_prompt(target, ids, cfg, stops, None) if cfg.eval.baseline else None
            taus = []
            for label, dcfg, new_drafter in factories:
                rec = {"id": conv.id, "turn": turn, "prompt_tokens": len(ids)} | ({"ar": ar} if ar else {})
                drafter = new_drafter(pid)
                rec["spec"] = run_prompt(target, ids, dcfg, stops, drafter)
                if label == drafters[0][0]:
                    trace += [r for r in getattr(drafter, "trace", []) if "accepted" in r]
                rec["forwards"] = getattr(drafter, "forwards", 0)  # drafter (neural) forwards, all steps
                rec["fallback_rounds"] = getattr(drafter, "fallbacks", 0)  # sidecar rounds lost to faults/deadlines
                drafter.close()
                records[label][name].append(rec)
                taus.append(f"{tau(rec['spec']['steps']):.2f}")
            # the next turn sees plain decoding's answer (the config's drafter's without a baseline): one
            # context for every drafter, so their rows stay comparable; at T=0 all answers are equal anyway
            answered(context, tokenizer, (ar or records[drafters[0][0]][name][-1]["spec"])["tokens"])
            bar.set_postfix(tau="/".join(taus), turn=turn)
    if cfg.eval.trace:
        Path(cfg.eval.trace).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.eval.trace).write_text("".join(json.dumps(r) + "\n" for r in trace))
        log.info("%d traced steps -> %s", len(trace), cfg.eval.trace)
    return write_report(cfg, [label for label, _ in drafters], records, prompts, stops, tokenizer)


def drafter_results(by_name: dict[str, list], temperature: float, tokenizer) -> dict:
    """One drafter's summaries per dataset and its decoded outputs."""
    return {
        "datasets": {name: summarize_turns(recs, temperature) for name, recs in by_name.items() if recs},
        "outputs": {
            name: [
                {
                    "id": r["id"],
                    "turn": r["turn"],
                    "tokens": len(r["spec"]["tokens"]),
                    "text": tokenizer.decode(r["spec"]["tokens"]),
                }
                for r in recs
            ]
            for name, recs in by_name.items()
        },
    }


def write_report(cfg: Config, labels: list[str], records: dict, prompts: list, stops, tokenizer) -> dict:
    """The JSON report (the config's own drafter at the top level, eval.compare's under "compare", by
    label; the vLLM rows when the backend is vLLM) and the acceptance plot beside it."""
    temperature = cfg.sampling.temperature
    report = {
        "config": asdict(cfg),
        "environment": environment(),
        "drafter": labels[0],
        **drafter_results(records[labels[0]], temperature, tokenizer),
    }
    if len(labels) > 1:
        report["compare"] = {label: drafter_results(records[label], temperature, tokenizer) for label in labels[1:]}
    if cfg.verifier.backend == "vllm":
        report["vllm"] = run_vllm_eval(cfg, prompts, stops, report)
    out = Path(cfg.eval.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot_acceptance(report, out.with_suffix(".png"))
    return report


def eval_rows(report: dict) -> list[tuple[str, str, dict]]:
    """(drafter, dataset, summary) for the config's drafter and every compared one."""
    runs = [(report["drafter"], report)] + list(report.get("compare", {}).items())
    return [(label, name, s) for label, r in runs for name, s in r["datasets"].items()]


def plot_acceptance(report: dict, path: Path) -> None:
    """Acceptance by depth, one line per drafter, one panel per dataset (matplotlib PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = eval_rows(report)
    names = list(dict.fromkeys(name for _, name, _ in rows))
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for label, n, s in rows:
            acc = s["acceptance_per_depth"]
            if n == name and acc:
                ax.plot(range(1, len(acc) + 1), acc, marker="o", ms=4, label=f"{label} (tau {s['tau']:.2f})")
        ax.set(title=name, xlabel="tree depth d", ylabel="P(accepted >= d | tree reaches d)", ylim=(0, 1))
        ax.grid(alpha=0.3)
        if ax.lines:  # a drafter that accepted nothing has no curve
            ax.legend(fontsize=8)
    fig.suptitle(f"acceptance by depth, temperature {report['config']['sampling']['temperature']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("acceptance by depth -> %s", path)


def matrix_variants(cfg: Config) -> list[tuple[str, object, int]]:
    """(rule, delay or "neural", branches) for every matrix row."""
    mx = cfg.eval.matrix
    delays = list(mx.delays) + (["neural"] if mx.neural else [])
    return [(rule, d, k) for rule in mx.rules for k in mx.branches for d in delays]


def run_matrix(cfg: Config) -> dict:
    """The sampled-tree matrix (eval.matrix): per temperature and prompt (each turn of a conversation,
    after plain decoding's answers at that temperature), plain decoding once, then every (rule, d, k)
    variant, all in one process on the same prompts."""
    jobs = eval_jobs(cfg)
    target, tokenizer, stops = load_target(cfg.target)
    model = load_drafter_model(cfg.drafter, target.args, target.embedding)
    variants = matrix_variants(cfg)
    rows = []
    bar = tqdm(total=len(cfg.eval.matrix.temperatures) * len(jobs), desc="eval matrix", unit="conversation")
    for temp in cfg.eval.matrix.temperatures:
        records = {v: {name: [] for name in cfg.eval.datasets} for v in variants}
        base = replace(cfg, sampling=replace(cfg.sampling, temperature=temp))
        for name, conv in jobs:
            bar.update()
            for turn, ids, context in turn_prompts(cfg, tokenizer, conv):
                ar = run_prompt(target, ids, base, stops, None)
                for rule, d, k in variants:
                    vcfg = variant_config(base, rule, d, k)
                    drafter = make_drafter(vcfg.drafter, model)
                    spec = run_prompt(target, ids, vcfg, stops, drafter)
                    rec = {"id": conv.id, "turn": turn, "ar": ar, "fallback_rounds": 0, "spec": spec}
                    records[(rule, d, k)][name].append(rec | {"forwards": drafter.forwards})
                    drafter.close()
                answered(context, tokenizer, ar["tokens"])
        rows += matrix_rows(records, temp)
    bar.close()
    report = {"config": asdict(cfg), "environment": environment(), "matrix": rows, "summary": matrix_summary(rows)}
    out = Path(cfg.eval.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


def variant_config(base: Config, rule: str, d, k: int) -> Config:
    """base with one matrix variant's rule, delay (or the neural selector) and branches."""
    neural = d == "neural"
    sb = replace(base.drafter.specblock, branches=k, delay=0 if neural else d, select="neural" if neural else "fixed")
    return replace(base, verify=replace(base.verify, rule=rule), drafter=replace(base.drafter, specblock=sb))


MATRIX_KEYS = (
    "tau",
    "spec_tokens_per_s",
    "ar_tokens_per_s",
    "speedup",
    "draft_ms_per_step",
    "verify_ms_per_step",
    "acceptance_per_depth",
)


def matrix_rows(records: dict, temp: float) -> list[dict]:
    """One row per (variant, dataset) with records at this temperature."""
    rows = []
    for (rule, d, k), by_name in records.items():
        for name, recs in by_name.items():
            if recs:
                s = summarize(recs, temp)
                head = {"dataset": name, "temperature": temp, "rule": rule, "delay": d, "branches": k}
                rows.append(head | {key: s[key] for key in MATRIX_KEYS})
    return rows


def matrix_summary(rows: list[dict]) -> list[dict]:
    """Per (dataset, temperature, rule, k): d = 0, the best static d by tokens/s (chosen on these same
    prompts, so optimistic for it) and the neural selector, side by side."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["temperature"], r["rule"], r["branches"]), []).append(r)
    for (name, temp, rule, k), rs in groups.items():
        static = [r for r in rs if r["delay"] != "neural"]
        best = max(static, key=lambda r: r["spec_tokens_per_s"])
        root = next((r for r in static if r["delay"] == 0), None)
        neural = next((r for r in rs if r["delay"] == "neural"), None)
        out.append(
            {
                "dataset": name,
                "temperature": temp,
                "rule": rule,
                "branches": k,
                "d0_tau": root and root["tau"],
                "d0_tok_s": root and root["spec_tokens_per_s"],
                "best_d": best["delay"],
                "best_tau": best["tau"],
                "best_tok_s": best["spec_tokens_per_s"],
                "neural_tau": neural and neural["tau"],
                "neural_tok_s": neural and neural["spec_tokens_per_s"],
                "neural_vs_best": neural and neural["spec_tokens_per_s"] / best["spec_tokens_per_s"],
            }
        )
    return out


def print_matrix(report: dict) -> None:
    cols = [
        ("dataset", 10),
        ("T", 5),
        ("rule", 10),
        ("d", 7),
        ("k", 3),
        ("tau", 6),
        ("acc/depth 1,2,3", 16),
        ("draft ms", 9),
        ("verify ms", 10),
        ("tok/s", 7),
        ("AR tok/s", 9),
        ("speedup", 8),
    ]
    print_columns(
        cols,
        [
            [
                r["dataset"],
                r["temperature"],
                r["rule"],
                r["delay"],
                r["branches"],
                f"{r['tau']:.2f}",
                ",".join(f"{a:.2f}" for a in r["acceptance_per_depth"][:3]) or "-",
                f"{r['draft_ms_per_step']:.1f}",
                f"{r['verify_ms_per_step']:.1f}",
                f"{r['spec_tokens_per_s']:.2f}",
                f"{r['ar_tokens_per_s']:.2f}",
                f"{r['speedup']:.2f}",
            ]
            for r in report["matrix"]
        ],
    )
    print()
    print_matrix_summary(report["summary"])


def print_matrix_summary(summary: list[dict]) -> None:
    """Per (dataset, T, rule, k): d = 0, the best static d and the neural selector."""

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    cols = [
        ("dataset", 10),
        ("T", 5),
        ("rule", 10),
        ("k", 3),
        ("d=0 tau", 8),
        ("tok/s", 7),
        ("best d", 7),
        ("tau", 6),
        ("tok/s", 7),
        ("neural tau", 11),
        ("tok/s", 7),
        ("neural/best", 12),
    ]
    print_columns(
        cols,
        [
            [
                s["dataset"],
                s["temperature"],
                s["rule"],
                s["branches"],
                f(s["d0_tau"], ".2f"),
                f(s["d0_tok_s"], ".2f"),
                s["best_d"],
                f"{s['best_tau']:.2f}",
                f"{s['best_tok_s']:.2f}",
                f(s["neural_tau"], ".2f"),
                f(s["neural_tok_s"], ".2f"),
                f(s["neural_vs_best"], ".3f"),
            ]
            for s in summary
        ],
    )


def print_table(report: dict) -> None:
    """One row per drafter and dataset, followed by one per turn number for multi-turn datasets."""
    rows = []
    for label, name, s in eval_rows(report):
        name = Path(name).name  # a dataset file by its name alone
        rows.append((label, name, s))
        rows += [(label, f"{name} turn {t}", st) for t, st in s.get("turns", {}).items()]
    width = max(len(label) for label, _, _ in rows) + 2
    cols = [
        ("drafter", width),
        ("dataset", max(len(name) for _, name, _ in rows) + 2),
        ("prompts", 8),
        ("tokens", 7),
        ("tau", 6),
        ("acc/depth 1,2,3,4", 20),
        ("fwd", 5),
        ("draft ms", 9),
        ("verify ms", 10),
        ("AR ms", 7),
        ("spec tok/s", 11),
        ("AR tok/s", 9),
        ("speedup", 8),
        ("=AR", 5),
    ]
    cells_rows = []
    for label, name, s in rows:
        acc = ",".join(f"{a:.2f}" for a in s["acceptance_per_depth"][:4]) or "-"
        cells = [
            label,
            name,
            s["prompts"],
            s["tokens"],
            f"{s['tau']:.2f}",
            acc,
            f"{s['draft_forwards_per_step']:.2f}",
            f"{s['draft_ms_per_step']:.2f}",
            f"{s['verify_ms_per_step']:.1f}",
            f"{s.get('ar_ms_per_step', float('nan')):.1f}",
            f"{s['spec_tokens_per_s']:.1f}",
            f"{s.get('ar_tokens_per_s', float('nan')):.1f}",
            f"{s.get('speedup', float('nan')):.2f}",
            {True: "yes", False: "NO"}.get(s.get("exact_match"), "-"),
        ]
        cells_rows.append(cells)
    print_columns(cols, cells_rows)
