"""`specdraft bench`: what a step costs, from one run (no timed assertions; these machines are noisy).
`specdraft bench-sidecar`: what drafting through the gRPC sidecar adds per round over in-process.

`bench` prints, in one run:
- the CPU's flags that decide the kernels and the dtype `target.dtype: auto` picks;
- per dtype: ms per plain decode step and per tree forward for several N (forward + the LM head on one
  row), and our decode step against transformers' `generate` on the same weights, both measured as
  (time for 1 + n tokens - time for 1 token) / n after the same prompt, three interleaved repetitions,
  medians reported; and how many rows of random trees differ from plain decoding at their position (in
  some bit, and in the argmax: exactness at temperature 0 needs none);
- per speculative step with real drafters on real prompts (the config's dtype and sampling): drafting, the
  tree forward, the LM head, the rule and the commit, in ms and as a fraction of a plain decode step
  measured on the same prompts in the same run, the measured tau, and the speedup ceiling
  tau * t_decode / (t_draft + t_verify) at tau = 2, 3, 4; of the drafting, the time a hybrid spends in its
  lookup source (the suffix cache); and the RSS of a suffix store filled past its bound."""

import dataclasses
import gc
import os
import platform
import random
import statistics
import subprocess
import tempfile
import time

import torch
from tqdm import tqdm

from drafter.data import chat_prompt
from drafter.metrics import percentile
from drafter.suffix import SuffixConfig, SuffixIndex
from drafter.synthetic import RandomDrafter
from kernels.linear import cpu_flags
from proto.interface import VerifierUpdate
from proto.tree import random_tree
from specdraft.assets import DTYPES, auto_dtype, load_target, load_transformer
from specdraft.build import DrafterConfig
from specdraft.config import Config
from specdraft.datasets import first_turns, load_dataset
from specdraft.evaluate import decode, drafter_factory, drafter_label
from specdraft.report import print_columns
from specdraft.serve import spawn
from verifier.engine import Step, generate, tau
from verifier.remote import RemoteConfig, RemoteDrafter, connect, server_info
from verifier.rules import SamplingParams
from verifier.target import TorchTarget, tree_divergence


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def ms_per_token(run, n: int) -> float:
    """run(k) generates k tokens after the prompt and returns seconds; the prefill and first token
    cancel in the difference."""
    return 1000 * (run(1 + n) - run(1)) / n


def ours_generate(target: TorchTarget, prompt: list[int]):
    def run(k):
        t0 = time.perf_counter()
        for _ in generate(target, prompt, SamplingParams(), k, stop_ids=set()):
            pass
        return time.perf_counter() - t0

    return run


def hf_generate(hf, prompt: list[int]):
    ids = torch.tensor([prompt])

    def run(k):
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, attention_mask=torch.ones_like(ids))
        return time.perf_counter() - t0

    return run


def run_bench(path, prefix_len: int, tree_sizes: list[int], reps: int, gen_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM  # no cycle: deferred, it takes seconds and only this uses it

    rng = random.Random(0)
    results = {}
    jobs = [(dtype, kind) for dtype in DTYPES for kind in ["decode", *tree_sizes, "generate"]]
    bar = tqdm(jobs, desc="bench", unit="case")
    for dtype in DTYPES:
        target = TorchTarget(load_transformer(path, dtype, prefix_len + max(tree_sizes) + gen_tokens + 8))
        vocab = target.vocab_size
        r = results[dtype] = {}
        bar.set_postfix_str(f"{dtype} tree rows vs plain decoding")
        r["divergence"] = tree_divergence(target, prompt_len=prefix_len)  # (rows, differing in a bit, in argmax)
        prompt = [rng.randrange(vocab) for _ in range(prefix_len)]
        target.prefill(prompt)
        bar.set_postfix_str(f"{dtype} decode")
        r["decode_ms"] = median_ms(lambda: target.logits(target.verify_forward(1, None)), reps)
        bar.update()
        for n in tree_sizes:
            bar.set_postfix_str(f"{dtype} tree N={n}")
            tree, _ = random_tree(n, vocab, rng).within_depth(target.max_tree_depth)  # as the decode loop cuts
            r[f"tree{n}_ms"] = median_ms(lambda: target.logits(target.verify_forward(1, tree)[:1]), reps)
            r[f"tree{n}_over_decode"] = r[f"tree{n}_ms"] / r["decode_ms"]
            bar.update()
        bar.set_postfix_str(f"{dtype} generate: ours vs transformers")
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
        ours, theirs = ours_generate(target, prompt), hf_generate(hf, prompt)
        ours(2), theirs(2)  # warm-up
        pairs = [(ms_per_token(ours, gen_tokens), ms_per_token(theirs, gen_tokens)) for _ in range(3)]  # interleaved
        r["ours_generate_ms_per_token"] = statistics.median(o for o, _ in pairs)
        r["hf_generate_ms_per_token"] = statistics.median(h for _, h in pairs)
        r["ours_over_hf"] = statistics.median(o / h for o, h in pairs)
        bar.update()
        del hf
    bar.close()
    return results


def print_bench(results: dict, tree_sizes: list[int], prefix_len: int) -> None:
    cols = (
        [("dtype", 10), ("decode ms", 20)]
        + [(f"N={n} ms (x decode)", 20) for n in tree_sizes]
        + [("ours gen ms/tok", 20), ("HF gen ms/tok", 20), ("ours/HF", 20), ("tree rows != plain", 24)]
    )
    print(f"\ntarget forward costs, {prefix_len}-token prefix, {torch.get_num_threads()} threads")
    print_columns(
        cols,
        [
            [dtype, f"{r['decode_ms']:.1f}"]
            + [f"{r[f'tree{n}_ms']:.1f} ({r[f'tree{n}_over_decode']:.2f})" for n in tree_sizes]
            + [
                f"{r['ours_generate_ms_per_token']:.1f}",
                f"{r['hf_generate_ms_per_token']:.1f}",
                f"{r['ours_over_hf']:.2f}",
                "{1}/{0}, argmax {2}".format(*r["divergence"]),
            ]
            for dtype, r in results.items()
        ],
    )


def print_cpu() -> None:
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu_flags().items())
    dtype, why = auto_dtype()
    print(f"CPU: {platform_cpu()}; {flags}; {torch.get_num_threads()} threads")
    print(f"target.dtype auto -> {dtype}: {why}")


def platform_cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


STEP_PARTS = ("draft", "forward", "head", "rule", "commit")


def step_costs(steps: list[Step]) -> dict[str, float]:
    """Mean ms per speculative step (prefill steps excluded) of each part, and their sum."""
    spec = [s for s in steps if not s.prefill]
    n = max(len(spec), 1)
    out = {
        "draft": sum(s.draft_s for s in spec),
        "forward": sum(s.forward_s for s in spec),
        "head": sum(s.head_s for s in spec),
        "commit": sum(s.commit_s for s in spec),
        "rule": sum(s.verify_s - s.forward_s - s.head_s - s.commit_s for s in spec),
    }
    return {k: 1000 * v / n for k, v in out.items()} | {
        "step": 1000 * sum(s.draft_s + s.verify_s for s in spec) / n,
        "nodes": sum(s.tree_nodes for s in spec) / n,
    }


def run_step_bench(cfg: Config, drafters: list[DrafterConfig], prompts: int, max_new_tokens: int) -> dict:
    """Plain decoding, then each drafter, on the same MT-Bench first turns (cfg's target, sampling and
    verification); per drafter the mean cost of each part of a speculative step and the measured tau."""
    target, tokenizer, stops = load_target(cfg.target)
    ids = [chat_prompt(tokenizer, text) for _, text in first_turns(load_dataset("mt_bench:1"))[:prompts]]
    runs = [("plain decoding", None)] + [(drafter_label(d), d) for d in drafters]
    factories = {label: drafter_factory(d, target) if d else None for label, d in runs}
    steps: dict[str, list[Step]] = {label: [] for label, _ in runs}
    lookup_s = dict.fromkeys(steps, 0.0)  # time in a hybrid's lookup source (the suffix cache, n-grams)
    choose_s = dict.fromkeys(steps, 0.0)  # time in the arms' bandit (drafter.arms.choose): its own cost
    for prompt in tqdm(ids, desc="step bench", unit="prompt"):
        for label, d in runs:  # interleaved per prompt: the machine's drift falls on all alike
            drafter = factories[label](label) if d else None
            run_cfg = cfg if d is None else dataclasses.replace(cfg, drafter=d)
            steps[label] += list(decode(target, prompt, run_cfg, stops, drafter, max_new_tokens))
            if drafter is not None:
                lookup_s[label] += getattr(drafter, "lookup_s", 0.0)
                choose_s[label] += getattr(drafter, "choose_s", 0.0)
                drafter.close()
    decode_ms = step_costs(steps["plain decoding"])["step"]
    rows = {}
    for label, st in steps.items():
        if label != "plain decoding":
            n = max(sum(not s.prefill for s in st), 1)
            rows[label] = step_costs(st) | {
                "tau": tau(st),
                "lookup": 1000 * lookup_s[label] / n,
                "bandit": 1000 * choose_s[label] / n,
            }
    return {"decode_ms": decode_ms, "rows": rows, "suffix_store": suffix_store_rss(cfg.drafter.suffix)}


def suffix_store_rss(cfg: SuffixConfig, session_tokens: int = 400) -> dict:
    """A suffix store filled to twice its bound (drafter.suffix.max_tokens) with synthetic sessions (Zipf
    token ids over the vocabulary: many distinct keys, so more memory than real text): the tokens it holds
    and the process's RSS growth in MiB."""
    rng = random.Random(0)
    vocab = 49152
    text = rng.choices(range(vocab), [1 / (i + 1) for i in range(vocab)], k=100_000)
    before = process_rss_mib()
    store = SuffixIndex(cfg, cfg.max_tokens)
    for _ in range(2 * cfg.max_tokens // session_tokens + 1):
        doc = store.open("")
        i = rng.randrange(len(text) - session_tokens)
        store.extend(doc, text[i : i + session_tokens])
    return {"max_tokens": cfg.max_tokens, "tokens": store.tokens, "rss_mib": process_rss_mib() - before}


def process_rss_mib() -> float:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def print_step_bench(results: dict) -> None:
    d = results["decode_ms"]
    print(f"\nper speculative step, ms (x plain decode step = {d:.1f} ms, same prompts and run)")
    cols = [("drafter", 28), ("nodes", 7)] + [(p, 14) for p in STEP_PARTS] + [("verify", 14), ("tau", 6)]
    cols += [("lookup", 14), ("bandit", 8)]
    cols += [(f"ceiling t{t}", 11) for t in (2, 3, 4)]
    rows = []
    for label, r in results["rows"].items():
        verify = r["forward"] + r["head"] + r["rule"] + r["commit"]
        cells = [f"{r[p]:.2f} ({r[p] / d:.2f})" for p in STEP_PARTS] + [f"{verify:.1f} ({verify / d:.2f})"]
        ceilings = [f"{t * d / r['step']:.2f}" for t in (2, 3, 4)]
        lookup = f"{r['lookup']:.2f} ({r['lookup'] / d:.3f})"
        extra = [f"{r['tau']:.2f}", lookup, f"{r['bandit']:.3f}"]
        rows.append([label, f"{r['nodes']:.1f}"] + cells + extra + ceilings)
    print_columns(cols, rows)
    print("(lookup: of draft, the time in a hybrid's lookup source: the suffix cache or n-grams; bandit: of draft,")
    print(" the time the arms' bandit spends booking rewards and choosing, drafter.arms.choose)")
    st = results["suffix_store"]
    print(
        f"suffix store filled to twice drafter.suffix.max_tokens = {st['max_tokens']:,}: holds {st['tokens']:,} "
        f"tokens, RSS +{st['rss_mib']:.0f} MiB (synthetic Zipf text)"
    )


def run_sidecar_bench(tree_sizes: list[int], rounds: int, hidden_rows: int = 4, hidden_dim: int = 576) -> list[dict]:
    """Per-round latency of the same random trees drafted in-process and through a real sidecar process
    on loopback, interleaved round by round. A round commits hidden_rows tokens; with hidden states it
    also ships their [hidden_rows, hidden_dim] fp32 rows (SmolLM2's width), as a feature drafter needs."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(f"drafter: {{kind: random}}\nserver: {{max_nodes: {max(tree_sizes)}, max_message_mb: 64}}\n")
    proc, address = spawn(f.name, stderr=subprocess.DEVNULL)
    try:
        cfg = RemoteConfig(address=address, timeout_ms=10_000)
        conn = connect(cfg)
        vocab = server_info(conn).vocab_size
        rng = random.Random(0)
        results = []
        cases = [(n, h) for n in tree_sizes for h in (False, True)]
        for n, with_hidden in tqdm(cases, desc="sidecar bench", unit="case"):
            local, remote = RandomDrafter(), RemoteDrafter(conn, f"bench-{n}")
            times = {"inprocess": [], "sidecar": []}
            prompt = [rng.randrange(vocab) for _ in range(128)]
            for i in range(rounds + 20):  # the first 20 rounds warm up
                new = prompt if i == 0 else [rng.randrange(vocab) for _ in range(hidden_rows)]
                hidden = torch.randn(len(new) - (i == 0), hidden_dim) if with_hidden else None
                up = VerifierUpdate(new, None, n, vocab, hidden)
                for name, drafter in (("inprocess", local), ("sidecar", remote)):
                    t0 = time.perf_counter()
                    tree = drafter.draft(up)
                    if i >= 20:
                        times[name].append(1000 * (time.perf_counter() - t0))
                    assert tree is not None and len(tree) == n, f"{name} drafted no {n}-node tree"
            remote.close()
            row = {"nodes": n, "hidden": with_hidden}
            for name, ts in times.items():
                row[f"{name}_p50_ms"] = percentile(ts, 0.5)
                row[f"{name}_p99_ms"] = percentile(ts, 0.99)
            row["added_p50_ms"] = row["sidecar_p50_ms"] - row["inprocess_p50_ms"]
            row["added_p99_ms"] = row["sidecar_p99_ms"] - row["inprocess_p99_ms"]
            results.append(row)
        conn.close()
        return results
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def print_sidecar_bench(results: list[dict], rounds: int) -> None:
    print(f"\ndrafting round latency, in-process vs sidecar on loopback ({rounds} rounds per case, ms)")
    cols = [
        (c, 12)
        for c in ("nodes", "hidden", "inproc p50", "inproc p99", "sidecar p50", "sidecar p99", "added p50", "added p99")
    ]
    print_columns(
        cols,
        [
            [r["nodes"], "[4,576]" if r["hidden"] else "-"]
            + [
                f"{r[k]:.3f}"
                for k in (
                    "inprocess_p50_ms",
                    "inprocess_p99_ms",
                    "sidecar_p50_ms",
                    "sidecar_p99_ms",
                    "added_p50_ms",
                    "added_p99_ms",
                )
            ]
            for r in results
        ],
    )
