"""Draws docs/learning-curve.png from a streamed training run's learning curve (train.out/curve.jsonl,
one line per held-out evaluation; the committed copy is docs/learning-curve.jsonl) and prints what a
straight line in log(tokens), fitted to the last half of the points, predicts for 2x and 10x the tokens.
Run: .venv/bin/python docs/learning-curve.py [curve.jsonl]"""

import json
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent


def fit(tokens: np.ndarray, values: np.ndarray) -> np.poly1d:
    """values ~ a + b log10(tokens) over the last half of the points (the early ones are warm-up)."""
    half = len(tokens) // 2
    return np.poly1d(np.polyfit(np.log10(tokens[half:]), values[half:], 1))


def main(path: Path) -> None:
    points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    tokens = np.array([p["tokens"] for p in points], dtype=float)
    fig, (top, tau) = plt.subplots(1, 2, figsize=(11, 4.2))
    for j in range(len(points[0]["specblock"]["top1"])):
        top.plot(tokens, [p["specblock"]["top1"][j] for p in points], marker=".", label=f"SpecBlock position {j + 1}")
    series = {"SpecBlock": "specblock"} | ({"EAGLE-style": "eagle"} if "eagle" in points[0] else {})
    if "eagle" in points[0]:
        top.plot(tokens, [p["eagle"]["top1"][0] for p in points], "k--", marker=".", label="EAGLE-style position 1")
    top.axhline(0.6, color="grey", lw=0.8, ls=":")
    top.set(xscale="log", xlabel="training tokens seen", ylabel="held-out top-1 (target's argmax)", ylim=(0, None))
    top.legend(fontsize=8)
    lines = []
    for label, key in series.items():
        ys = np.array([p[key]["tau_chain"] for p in points])
        tau.plot(tokens, ys, marker=".", label=label)
        for name, values in (("tau-estimate", ys), ("position-1 top-1", [p[key]["top1"][0] for p in points])):
            line = fit(tokens, np.array(values))
            now = tokens[-1]
            lines.append(
                f"{label} {name}: {values[-1]:.3f} at {now / 1e6:.2f}M tokens; the log-linear fit predicts "
                f"{line(np.log10(2 * now)):.3f} at 2x and {line(np.log10(10 * now)):.3f} at 10x"
            )
    tau.set(xscale="log", xlabel="training tokens seen", ylabel="held-out chain tau-estimate (1 + leading hits)")
    tau.legend(fontsize=8)
    fig.suptitle("Drafters for SmolLM2-135M-Instruct: streaming teacher forcing on ShareGPT, 57 held-out conversations")
    fig.tight_layout()
    fig.savefig(HERE / "learning-curve.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "learning-curve.jsonl")
