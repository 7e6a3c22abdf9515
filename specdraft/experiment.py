"""`specdraft experiment`: does choosing the drafter and tree budget by measured cost pay, and do online
updates pay on top of it?

One process, one target, one mixed stream of requests (experiment.stream: blocks of each source, then
`interleaved` requests taking turns among them), decoded once per policy, each policy from the same
checkpoint; the policies take turns request by request, the order rotating, so the machine's drift
falls on all alike (each is timed on its own clock):
  ar               plain decoding (temperature 0: every other policy must equal it token for token);
  fixed            every arm of drafter.arms.choose alone (one policy per arm, named by it);
  bandit           the per-session choice among those arms (bandit/arms.py);
  bandit+updates   the same, and the drafter updated online (bandit/online.py, drafter.bandit), its
                   update time charged to the stream.
A request's client_label is its id, so its client is its source ("mt_bench", "HumanEval", a JSONL's ids'
prefix): the bandit's prior is per source, as it would be per application behind a sidecar.
Reported per policy: tokens/s over the stream and per segment, against the best fixed arm in hindsight
and against the first arm (the shipped default's); the regret against the best fixed arm; the share of
rounds per arm; and a PNG of cumulative tokens/s and regret over the stream."""

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

from bandit.arms import ArmDrafter
from bandit.online import OnlineAdapter
from drafter.data import chat_prompt
from proto.interface import client_of
from specdraft.assets import load_target
from specdraft.build import Shared, load_drafter_model, make_drafter
from specdraft.config import ConfigError
from specdraft.datasets import first_turns, load_dataset
from specdraft.evaluate import run_prompt
from specdraft.report import print_columns
from verifier.engine import tau

log = logging.getLogger(__name__)


class AdaptingDrafter:
    """A drafter session whose every update also feeds the online adapter (which may update the shared
    model between this session's rounds)."""

    def __init__(self, inner, adapter: OnlineAdapter, session: str):
        self.inner, self.adapter, self.session, self.first, self.prev = inner, adapter, session, True, None

    def draft(self, update):
        tree = self.inner.draft(update)
        self.adapter.observe(self.session, update, self.first, self.prev)
        self.first, self.prev = False, tree
        return tree

    def close(self) -> None:
        self.inner.close()
        self.adapter.buffer.end(self.session)


class PolicyClock:
    """Wall time spent in one policy's own requests (policies take turns request by request): the clock
    its online learner measures windows and updates with."""

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


def stream_jobs(ex, tokenizer) -> list[tuple[str, str, list[int]]]:
    """(segment, request id, prompt ids): each source's block, then `interleaved` requests taking turns
    among the sources, each continuing after the prompts its block used."""
    prompts = {s: first_turns(load_dataset(s)) for s in dict.fromkeys(ex.stream)}
    used = dict.fromkeys(prompts, 0)
    picked = []
    for s, n in zip(ex.stream, ex.prompts_per_segment):
        picked += [(Path(s).stem if s.endswith((".jsonl", ".json")) else s, s)] * n
    picked += [("mixed", ex.stream[i % len(ex.stream)]) for i in range(ex.interleaved)]
    jobs = []
    for segment, s in picked:
        if used[s] == len(prompts[s]):
            raise ConfigError(f"experiment: {s} has {len(prompts[s])} prompts; the stream asks for more")
        pid, text = prompts[s][used[s]]
        used[s] += 1
        jobs.append((segment, pid, chat_prompt(tokenizer, text)))
    return jobs


def policy_drafters(cfg, target) -> dict:
    """policy -> (config the requests decode with, label -> drafter session or None for ar, adapter)."""
    ex, arms = cfg.experiment, cfg.drafter.arms
    out = {}
    for policy in ex.policies:
        names = arms.choose if policy == "fixed" else [policy]
        for name in names:
            if name == "ar":
                out[name] = (cfg, None, None)
                continue
            choose = [name] if policy == "fixed" else arms.choose
            dcfg = replace(cfg.drafter, arms=replace(arms, choose=choose))
            model = load_drafter_model(dcfg, target.args, target.embedding)
            shared = Shared(dcfg)
            adapter = None
            pcfg = replace(cfg, drafter=dcfg)
            if name == "bandit+updates":
                adapter = OnlineAdapter(model, replace(cfg.drafter.bandit, enabled=True), PolicyClock())
                pcfg = replace(pcfg, verify=replace(cfg.verify, feedback_topk=ex.feedback_topk))
            new = lambda label, dcfg=dcfg, model=model, shared=shared: make_drafter(dcfg, model, shared, label)
            out[name] = (pcfg, new, adapter)
    return out


def run_policies(cfg, target, stops, jobs, progress=None) -> dict:
    """Every policy over the same requests, taking turns request by request (the order rotating)."""
    policies = policy_drafters(cfg, target)
    names = list(policies)
    rows = {p: [] for p in names}
    clocks = {p: (policies[p][2].clock if policies[p][2] else PolicyClock()) for p in names}
    for i, (segment, pid, ids) in enumerate(jobs):
        for j in range(len(names)):
            policy = names[(i + j) % len(names)]
            pcfg, new, adapter = policies[policy]
            drafter = new(pid) if new else None
            if adapter is not None:
                drafter = AdaptingDrafter(drafter, adapter, pid)
            clock = clocks[policy]
            clock.start()
            rec = run_prompt(target, ids, pcfg, stops, drafter)
            wall = clock.stop()  # includes any update run inside this request's rounds
            arms = drafter.inner if isinstance(drafter, AdaptingDrafter) else drafter
            chose = isinstance(arms, ArmDrafter)
            pulls = dict(zip(pcfg.drafter.arms.choose, arms.pulls)) if chose else {}
            if drafter is not None:
                drafter.close()
            rows[policy].append(
                {
                    "segment": segment,
                    "id": pid,
                    "tokens": len(rec["tokens"]),
                    "output": rec["tokens"],
                    "wall_s": wall,
                    "tau": tau(rec["steps"]),
                    "pulls": pulls,
                    "choose_s": arms.choose_s if chose else 0.0,  # the bandit's own time in this request
                    "updates": adapter.updates if adapter else 0,
                    "update_s": adapter.update_s if adapter else 0.0,
                }
            )
            if progress is not None:
                progress(policy, rows[policy][-1])
    for _, _, adapter in policies.values():
        if adapter is not None:
            adapter.wait()
    return {p: {"rows": rows[p], "adapter": policies[p][2].stats() if policies[p][2] else None} for p in names}


def rate(rows: list[dict]) -> float:
    return sum(r["tokens"] for r in rows) / max(sum(r["wall_s"] for r in rows), 1e-9)


def cumulative(rows: list[dict]) -> list[tuple[int, float]]:
    """(tokens, seconds) committed and spent up to and including each request."""
    out, toks, wall = [], 0, 0.0
    for r in rows:
        toks, wall = toks + r["tokens"], wall + r["wall_s"]
        out.append((toks, wall))
    return out


def regret_curve(rows: list[dict], best_rate: float) -> list[float]:
    """Cumulative regret in tokens after each request: what the best fixed arm's rate (in hindsight, over
    the whole stream) would have committed in the policy's time so far, minus what the policy committed."""
    return [best_rate * wall - toks for toks, wall in cumulative(rows)]


def oracles(runs: dict, arms: list[str]) -> dict:
    """Upper bounds of a choice among the fixed arms, in hindsight (tokens/s): the best arm per client
    (a per-client choice that never explores) and per request (a per-session one)."""
    fixed = [a for a in arms if a in runs]
    if not fixed:
        return {}
    by_request = list(zip(*(runs[a]["rows"] for a in fixed)))  # the same request under every arm
    per_request = [max(rs, key=lambda r: r["tokens"] / r["wall_s"]) for rs in by_request]
    per_client = []
    for client in dict.fromkeys(client_of(rs[0]["id"]) for rs in by_request):
        mine = [i for i, rs in enumerate(by_request) if client_of(rs[0]["id"]) == client]
        best = max(range(len(fixed)), key=lambda a: rate([by_request[i][a] for i in mine]))
        per_client += [by_request[i][best] for i in mine]
    return {"per_client": rate(per_client), "per_request": rate(per_request)}


def summarize(runs: dict, arms: list[str], temperature: float) -> dict:
    fixed = {a: rate(runs[a]["rows"]) for a in arms if a in runs}
    best = max(fixed, key=fixed.get) if fixed else None
    out = {"best_fixed": best, "default_arm": arms[0] if arms else None, "oracles": oracles(runs, arms)}
    out["policies"] = {}
    for policy, run in runs.items():
        rows = run["rows"]
        segments = {}
        for s in dict.fromkeys(r["segment"] for r in rows):
            seg = [r for r in rows if r["segment"] == s]
            segments[s] = {"tokens_per_s": rate(seg), "tau": sum(r["tau"] for r in seg) / len(seg)}
        pulls = {}
        for r in rows:
            for a, n in r["pulls"].items():
                pulls[a] = pulls.get(a, 0) + n
        p = {
            "tokens_per_s": rate(rows),
            "tau": sum(r["tau"] for r in rows) / len(rows),
            "segments": segments,
            "arm_share": {a: n / max(sum(pulls.values()), 1) for a, n in pulls.items()},
            "choose_us_per_round": 1e6 * sum(r["choose_s"] for r in rows) / max(sum(pulls.values()), 1),
            "updates": rows[-1]["updates"],
            "update_s": rows[-1]["update_s"],
        }
        if best is not None:
            p["vs_best_fixed"] = p["tokens_per_s"] / fixed[best]
            p["vs_default"] = p["tokens_per_s"] / fixed[arms[0]] if arms[0] in fixed else None
            p["regret_tokens"] = regret_curve(rows, fixed[best])[-1]
        if "ar" in runs and policy != "ar":
            p["vs_ar"] = p["tokens_per_s"] / rate(runs["ar"]["rows"])
            if temperature == 0:
                p["equals_ar"] = all(a["output"] == b["output"] for a, b in zip(rows, runs["ar"]["rows"]))
        out["policies"][policy] = p
    return out


def plot(runs: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for policy, run in runs.items():
        rows = run["rows"]
        cum = [toks / wall for toks, wall in cumulative(rows)]
        a.plot(range(1, len(rows) + 1), cum, label=policy, lw=2 if policy.startswith("bandit") else 1)
    best = summary["best_fixed"]
    if best is not None:
        best_rate = summary["policies"][best]["tokens_per_s"]
        for policy, run in runs.items():
            if policy.startswith("bandit"):
                curve = regret_curve(run["rows"], best_rate)
                b.plot(range(1, len(curve) + 1), curve, label=policy)
    segs = [r["segment"] for r in next(iter(runs.values()))["rows"]]
    for i in range(1, len(segs)):
        if segs[i] != segs[i - 1]:
            for ax in (a, b):
                ax.axvline(i + 0.5, color="grey", ls="--", lw=0.8)
    a.set(xlabel="request in stream", ylabel="tokens/s", title="cumulative tokens/s")
    b.set(xlabel="request in stream", ylabel="tokens", title=f"cumulative regret vs the best fixed arm ({best})")
    b.axhline(0, color="black", lw=0.6)
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.suptitle(" -> ".join(dict.fromkeys(segs)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_experiment(cfg, progress=None) -> dict:
    ex = cfg.experiment
    target, tokenizer, stops = load_target(cfg.target)
    cfg = replace(cfg, eval=replace(cfg.eval, max_new_tokens=ex.max_new_tokens))
    jobs = stream_jobs(ex, tokenizer)
    runs = run_policies(cfg, target, stops, jobs, progress)
    out = Path(ex.output)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs, cfg.drafter.arms.choose, cfg.sampling.temperature)
    report = {"config": asdict(cfg), "summary": summary, "runs": runs}
    (out / "experiment.json").write_text(json.dumps(report, indent=1))
    plot(runs, summary, out / "experiment.png")
    return report


def print_summary(report: dict) -> None:
    s = report["summary"]
    cols = [("policy", 15), ("tok/s", 8), ("vs best", 9), ("vs default", 12), ("vs ar", 7), ("=AR", 5)]
    cols += [("tau", 6), ("regret tok", 12), ("arms (share of rounds)", 40), ("updates", 12)]
    fmt = lambda v, f: "" if v is None else format(v, f)
    rows = []
    for policy, p in s["policies"].items():
        eq = p.get("equals_ar")
        rows.append(
            [
                policy,
                f"{p['tokens_per_s']:.2f}",
                fmt(p.get("vs_best_fixed"), ".3f"),
                fmt(p.get("vs_default"), ".3f"),
                fmt(p.get("vs_ar"), ".2f"),
                "" if eq is None else "yes" if eq else "NO",
                f"{p['tau']:.2f}",
                fmt(p.get("regret_tokens"), ".0f"),
                " ".join(f"{a} {v:.0%}" for a, v in p["arm_share"].items()) if len(p["arm_share"]) > 1 else "",
                f"{p['updates']} ({p['update_s']:.0f} s)" if p["updates"] else "",
            ]
        )
    print_columns(cols, rows)
    print(f"best fixed arm in hindsight: {s['best_fixed']}; the shipped default's arm: {s['default_arm']}")
    default = s["policies"].get(s["default_arm"], {}).get("tokens_per_s")
    for name, v in s["oracles"].items():
        print(
            f"in hindsight, the best fixed arm {name.replace('_', ' ')}: {v:.2f} tok/s ({v / default:.3f}x the default)"
        )
    for policy, p in s["policies"].items():
        if len(p["arm_share"]) > 1:
            print(f"{policy}: its own bookkeeping and choice {p['choose_us_per_round']:.1f} us a round")
    segs = list(next(iter(s["policies"].values()))["segments"])
    cols = [("policy", 15)] + [(f"{g} tok/s", len(g) + 8) for g in segs]
    print_columns(
        cols, [[p] + [f"{v['segments'][g]['tokens_per_s']:.2f}" for g in segs] for p, v in s["policies"].items()]
    )
