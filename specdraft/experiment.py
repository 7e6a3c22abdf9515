"""`specdraft bandit-experiment`: does online learning pay under a domain shift?

One process, one target, the same prompt stream (by default HumanEval code prompts, then MT-Bench chat)
decoded once per policy, each from the same drafter checkpoint and seed, the policies taking turns prompt
by prompt (each timed on its own clock):
  never   no updates;
  always  `always_steps` optimizer steps every `decide_every` rounds;
  bandit  the cost-aware bandit of drafter.bandit.
Reported per policy and stream segment: tokens/s (update time included: it runs in the same process),
tau, and the number and total cost of updates; plus a PNG of tau per prompt and cumulative tokens/s."""

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

from bandit.online import OnlineAdapter
from drafter.data import chat_prompt
from specdraft.assets import load_target
from specdraft.build import load_drafter_model, make_drafter
from specdraft.datasets import first_turns, load_dataset
from specdraft.evaluate import run_prompt
from specdraft.report import print_columns
from verifier.engine import tau

log = logging.getLogger(__name__)


class AdaptingDrafter:
    """A drafter session whose every update also feeds the online adapter (which may update the shared
    model between this session's rounds)."""

    def __init__(self, inner, adapter: OnlineAdapter | None, session: str):
        self.inner, self.adapter, self.session, self.first, self.prev = inner, adapter, session, True, None

    def draft(self, update):
        tree = self.inner.draft(update)
        if self.adapter is not None:
            self.adapter.observe(self.session, update, self.first, self.prev)
        self.first, self.prev = False, tree
        return tree

    def close(self) -> None:
        self.inner.close()
        if self.adapter is not None:
            self.adapter.buffer.end(self.session)


class PolicyClock:
    """Wall time spent in one policy's own prompts (policies take turns prompt by prompt): the clock its
    bandit measures windows and updates with."""

    def __init__(self):
        self.spent, self.since = 0.0, None

    def __call__(self) -> float:
        return self.spent + (time.perf_counter() - self.since if self.since is not None else 0.0)

    def start(self) -> None:
        self.since = time.perf_counter()

    def stop(self) -> float:
        """Stops the clock; returns the seconds since start."""
        dt = time.perf_counter() - self.since
        self.spent, self.since = self.spent + dt, None
        return dt


def run_policies(cfg, target, stops, jobs, progress=None) -> dict:
    """Every policy over the same prompts, taking turns prompt by prompt (the order rotating), so the
    machine's drift over the run (these machines are noisy) falls on all policies alike."""

    ex = cfg.experiment
    state = {}
    for policy in ex.policies:
        model = load_drafter_model(cfg.drafter, target.args, target.embedding)
        bandit_cfg = {
            "never": None,
            "bandit": replace(cfg.drafter.bandit, enabled=True),
            "always": replace(cfg.drafter.bandit, enabled=True, arms=[ex.always_steps]),
        }[policy]
        clock = PolicyClock()
        adapter = OnlineAdapter(model, bandit_cfg, clock) if bandit_cfg is not None else None
        state[policy] = (model, adapter, clock, [])
    for i, (segment, pid, ids) in enumerate(jobs):
        for j in range(len(ex.policies)):
            policy = ex.policies[(i + j) % len(ex.policies)]
            model, adapter, clock, rows = state[policy]
            drafter = AdaptingDrafter(make_drafter(cfg.drafter, model), adapter, pid)
            clock.start()
            rec = run_prompt(target, ids, cfg, stops, drafter)
            wall = clock.stop()  # includes any update run inside this prompt's rounds
            drafter.close()
            rows.append(
                {
                    "segment": segment,
                    "id": pid,
                    "tokens": len(rec["tokens"]),
                    "wall_s": wall,
                    "tau": tau(rec["steps"]),
                    "updates": adapter.updates if adapter else 0,
                    "update_s": adapter.update_s if adapter else 0.0,
                }
            )
            if progress is not None:
                progress(policy, rows[-1])
    return {
        p: {"rows": rows, "adapter": adapter.stats() if adapter else None} for p, (_, adapter, _, rows) in state.items()
    }


def summarize(runs: dict, segments: list[str]) -> dict:
    out = {}
    for policy, run in runs.items():
        rows = run["rows"]
        seg = {}
        prev_updates, prev_cost = 0, 0.0
        for s in segments:
            r = [x for x in rows if x["segment"] == s]
            if not r:
                continue
            seg[s] = {
                "tokens_per_s": sum(x["tokens"] for x in r) / sum(x["wall_s"] for x in r),
                "tau": sum(x["tau"] for x in r) / len(r),
                "updates": r[-1]["updates"] - prev_updates,
                "update_s": r[-1]["update_s"] - prev_cost,
            }
            prev_updates, prev_cost = r[-1]["updates"], r[-1]["update_s"]
        out[policy] = seg
    return out


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for policy, run in runs.items():
        rows = run["rows"]
        a.plot(range(1, len(rows) + 1), [r["tau"] for r in rows], marker="o", ms=3, label=policy)
        toks, wall, cum = 0, 0.0, []
        for r in rows:
            toks, wall = toks + r["tokens"], wall + r["wall_s"]
            cum.append(toks / wall)
        b.plot(range(1, len(rows) + 1), cum, label=policy)
    segs = [r["segment"] for r in next(iter(runs.values()))["rows"]]
    for i in range(1, len(segs)):
        if segs[i] != segs[i - 1]:
            for ax in (a, b):
                ax.axvline(i + 0.5, color="grey", ls="--", lw=0.8)
    a.set(xlabel="prompt in stream", ylabel="tau (tokens per target forward)", title="tau per prompt")
    b.set(xlabel="prompt in stream", ylabel="tokens/s", title="cumulative tokens/s")
    a.legend()
    b.legend()
    fig.suptitle(" -> ".join(dict.fromkeys(segs)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_experiment(cfg, progress=None) -> dict:

    ex = cfg.experiment
    target, tokenizer, stops = load_target(cfg.target)
    cfg = replace(cfg, eval=replace(cfg.eval, max_new_tokens=ex.max_new_tokens))
    jobs = [
        (s, pid, chat_prompt(tokenizer, text))
        for s, n in zip(ex.stream, ex.prompts_per_segment)
        for pid, text in first_turns(load_dataset(s)[:n])
    ]
    runs = run_policies(cfg, target, stops, jobs, progress)
    out = Path(ex.output)
    out.mkdir(parents=True, exist_ok=True)
    report = {"config": asdict(cfg), "segments": summarize(runs, ex.stream), "runs": runs}
    (out / "experiment.json").write_text(json.dumps(report, indent=2))
    plot(runs, out / "experiment.png")
    return report


def print_summary(report: dict) -> None:

    cols = [("policy", 8), ("segment", 11), ("tok/s", 8), ("vs never", 9), ("tau", 6), ("updates", 8), ("update s", 9)]
    never = report["segments"].get("never", {})
    rows = []
    for policy, segs in report["segments"].items():
        for s, r in segs.items():
            ratio = r["tokens_per_s"] / never[s]["tokens_per_s"] if s in never else float("nan")
            rows.append(
                [
                    policy,
                    s,
                    f"{r['tokens_per_s']:.2f}",
                    f"{ratio:.3f}",
                    f"{r['tau']:.2f}",
                    r["updates"],
                    f"{r['update_s']:.1f}",
                ]
            )
    print_columns(cols, rows)
