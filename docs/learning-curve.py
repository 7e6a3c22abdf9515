"""Draws docs/learning-curve.png from the drafters' learning curve across training runs (docs/learning-curve.jsonl,
one line per held-out evaluation) and prints what a straight line in log(tokens), fitted to the last half of
the newest run's points, predicts for 2x and 10x the tokens.

A line: {"run", "step", "tokens" (seen since the first run), "tok_s", "specblock": metrics on ShareGPT's
held-out set, "replies": metrics on the target's own replies' held-out set (runs that had it), "eagle"}.

  .venv/bin/python docs/learning-curve.py                      # draw
  .venv/bin/python docs/learning-curve.py --append checkpoints/specblock-self-smollm2/curve.jsonl \\
      --run "self-distilled 2026-12-07" --replies data/smollm2-self-heldout --sharegpt data/sharegpt-smollm2-heldout
appends a run's train.out/curve.jsonl (its heldout_dir's metrics are `specblock` there, heldout_also's under
`also`), then draws."""

import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
CURVE = HERE / "learning-curve.jsonl"
FIRST_RUN = "ShareGPT stream (2026-11)"


def fit(tokens: np.ndarray, values: np.ndarray) -> np.poly1d:
    """values ~ a + b log10(tokens) over the last half of the points (the early ones are warm-up)."""
    half = len(tokens) // 2
    return np.poly1d(np.polyfit(np.log10(tokens[half:]), values[half:], 1))


def held_out(metrics: dict, folder: str, heldout_dir: str) -> dict:
    """A checkpoint's metrics on one held-out folder: its heldout_dir's, or one of heldout_also's."""
    if folder == heldout_dir:
        return metrics
    if folder not in metrics.get("also", {}):
        raise SystemExit(
            f"{folder}: not a held-out folder of this run ({heldout_dir}, {', '.join(metrics.get('also', {}))})"
        )
    return metrics["also"][folder]


def append(curve: Path, run: str, replies: str, sharegpt: str) -> None:
    """A training run's curve.jsonl as docs points: ShareGPT's held-out metrics under specblock, the replies'
    under replies (whichever of heldout_dir / heldout_also each was: the run's config.json says)."""
    heldout_dir = json.loads((curve.parent / "config.json").read_text())["train"]["heldout_dir"]
    with open(CURVE, "a") as out:
        for line in curve.read_text().splitlines():
            p = json.loads(line)
            m = p["specblock"]
            point = {"run": run, "step": p["step"], "tokens": p["tokens"], "tok_s": p["tok_s"]}
            for key, folder in (("specblock", sharegpt), ("replies", replies)):
                point[key] = {k: v for k, v in held_out(m, folder, heldout_dir).items() if k != "also"}
            out.write(json.dumps(point) + "\n")


def draw() -> None:
    points = [json.loads(line) for line in CURVE.read_text().splitlines() if line.strip()]
    runs = list(dict.fromkeys(p.get("run", FIRST_RUN) for p in points))
    tokens = np.array([p["tokens"] for p in points], dtype=float)
    fig, (top, tau) = plt.subplots(1, 2, figsize=(12, 4.6))
    lines = []
    for key, label, style in (("specblock", "ShareGPT held-out", "-"), ("replies", "target's replies held-out", "--")):
        have = [i for i, p in enumerate(points) if key in p]
        if not have:
            continue
        xs = tokens[have]
        for j in range(2):
            ys = [points[i][key]["top1"][j] for i in have]
            top.plot(xs, ys, style, marker=".", label=f"SpecBlock position {j + 1}, {label}")
        taus = np.array([points[i][key]["tau_chain"] for i in have])
        tau.plot(xs, taus, style, marker=".", label=f"SpecBlock, {label}")
        newest = [i for i in have if points[i].get("run", FIRST_RUN) == runs[-1]]
        for name, values in (("tau-estimate", taus), ("position-1 top-1", [points[i][key]["top1"][0] for i in have])):
            values = np.array(values)[-len(newest) :]
            if len(newest) < 4:
                continue
            line = fit(tokens[newest], values)
            now = tokens[newest[-1]]
            lines.append(
                f"{runs[-1]}, {label}, {name}: {values[-1]:.3f} at {now / 1e6:.2f}M tokens; the log-linear fit "
                f"predicts {line(np.log10(2 * now)):.3f} at 2x and {line(np.log10(10 * now)):.3f} at 10x"
            )
    if "eagle" in points[0]:
        have = [i for i, p in enumerate(points) if "eagle" in p]
        top.plot(
            tokens[have], [points[i]["eagle"]["top1"][0] for i in have], "k:", marker=".", label="EAGLE-style pos 1"
        )
    for run in runs[1:]:
        start = tokens[next(i for i, p in enumerate(points) if p.get("run") == run)]
        for ax in (top, tau):
            ax.axvline(start, color="grey", lw=0.8, ls=":")
        top.annotate(run, (start, 0.02), fontsize=7, rotation=90, color="grey")
    top.set(xscale="log", xlabel="training tokens seen (all runs)", ylabel="held-out top-1 (target's argmax)")
    top.set_ylim(0, None)
    top.legend(fontsize=7)
    tau.set(xscale="log", xlabel="training tokens seen (all runs)", ylabel="held-out chain tau-estimate")
    tau.legend(fontsize=7)
    fig.suptitle(f"SpecBlock for SmolLM2-135M-Instruct, runs: {'; '.join(runs)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(HERE / "learning-curve.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--append", type=Path, help="a training run's curve.jsonl to add first")
    ap.add_argument("--run", help="the appended run's name")
    ap.add_argument("--replies", help="the appended run's held-out folder of the target's replies")
    ap.add_argument("--sharegpt", help="the appended run's held-out folder of ShareGPT")
    args = ap.parse_args()
    if args.append and not (args.run and args.replies and args.sharegpt):
        ap.error("--append needs --run, --replies and --sharegpt")
    if args.append:
        append(args.append, args.run, args.replies, args.sharegpt)
    draw()
