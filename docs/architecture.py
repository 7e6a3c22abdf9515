"""Draws docs/architecture.png: the layers (left) and one decoding step's data path (right), coloured by
the folder that owns each box. Run: .venv/bin/python docs/architecture.py"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

COLOURS = {
    "specdraft": "#d9d9d9",
    "verifier": "#9ecae1",
    "bandit": "#fdd0a2",
    "drafter": "#a1d99b",
    "proto": "#dadaeb",
    "kernels": "#fcbba1",
}
OWNS = {
    "specdraft": "the application: CLI, YAML config, assets, eval, bench, experiment, serve, vLLM rows",
    "verifier": "target model, decode loop, verification rules, RemoteDrafter, vLLM proposer",
    "bandit": "drafter and budget by measured cost; online updates",
    "drafter": "n-gram / SpecBlock / random drafters, trees, training, the gRPC sidecar",
    "proto": "the API: Drafter, VerifierUpdate, Feedback, DraftTree, specdraft.v1 wire, config checks",
    "kernels": "tensor primitives: tree mask, attention, linear, KV compaction, shared layers",
}


def box(ax, x, y, w, h, text, owner, size=9, bold=False):
    ax.add_patch(
        FancyBboxPatch(
            (x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.01,rounding_size=0.015", fc=COLOURS[owner], ec="#444"
        )
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=size, weight="bold" if bold else "normal", wrap=True)


def arrow(ax, a, b, text="", rad=0.0, offset=(0.0, 0.0), style="-|>", colour="#222", size=8):
    ax.add_patch(
        FancyArrowPatch(
            a, b, arrowstyle=style, mutation_scale=12, color=colour, lw=1.2, connectionstyle=f"arc3,rad={rad}"
        )
    )
    if text:
        ax.text((a[0] + b[0]) / 2 + offset[0], (a[1] + b[1]) / 2 + offset[1], text, fontsize=size, ha="center")


def layers(ax):
    ax.set_title("Layers: each imports only those below it (import-linter)", fontsize=11)
    for i, name in enumerate(COLOURS):
        y = 0.9 - i * 0.155
        box(ax, 0.5, y, 0.94, 0.11, "", name)
        ax.text(0.05, y + 0.02, f"{name}/", fontsize=11, weight="bold", va="center")
        ax.text(0.05, y - 0.025, OWNS[name], fontsize=7.5, va="center")
        if i:
            arrow(ax, (0.93, y + 0.155 - 0.055), (0.93, y + 0.055), colour="#666")
    ax.text(0.5, 0.02, "nothing imports specdraft; drafter never imports verifier; no cycles", ha="center", fontsize=8)


def data_path(ax):
    ax.set_title("One step of the data path: prompt -> tree -> verify -> commit -> feedback", fontsize=11)
    box(ax, 0.13, 0.92, 0.22, 0.08, "prompt tokens", "specdraft")
    box(ax, 0.13, 0.72, 0.24, 0.1, "target.prefill\n(verifier/target, model)", "verifier")
    box(ax, 0.45, 0.92, 0.34, 0.1, "VerifierUpdate\nnew tokens, Feedback, hidden [n, D]", "proto")
    box(ax, 0.84, 0.93, 0.3, 0.1, "OnlineAdapter (bandit/)\nin the sidecar: learns from updates", "bandit", size=8)
    box(
        ax,
        0.84,
        0.7,
        0.3,
        0.15,
        "drafter.draft (drafter/)\nin process, or remote:\nRemoteDrafter -- gRPC specdraft.v1 --\n"
        "sidecar (drafter/server)",
        "drafter",
        size=8,
    )
    box(ax, 0.84, 0.48, 0.26, 0.1, "DraftTree\ntokens, parents [N]", "proto")
    box(
        ax,
        0.45,
        0.48,
        0.32,
        0.12,
        "target.verify_forward\n(pending, tree): states [N+1, D]\nkernels: mask, attention",
        "verifier",
    )
    box(
        ax,
        0.45,
        0.26,
        0.32,
        0.12,
        "verify (verifier/rules)\nwalk / SpecInfer / K-SEQ /\nTraversal -> Verdict",
        "verifier",
    )
    box(ax, 0.13, 0.26, 0.24, 0.1, "target.commit\n(accepted KV kept)", "verifier")
    box(ax, 0.13, 0.07, 0.24, 0.08, "Step: tokens out", "specdraft")

    arrow(ax, (0.13, 0.88), (0.13, 0.77))
    arrow(ax, (0.25, 0.75), (0.33, 0.87), "first token,\nhidden", offset=(-0.07, 0.0))
    arrow(ax, (0.62, 0.89), (0.69, 0.78))
    arrow(ax, (0.84, 0.88), (0.84, 0.775), "weights", offset=(0.06, 0.0), style="-|>", colour="#a05a00")
    arrow(ax, (0.84, 0.625), (0.84, 0.53))
    arrow(ax, (0.71, 0.48), (0.61, 0.48))
    arrow(ax, (0.45, 0.42), (0.45, 0.32), "row logits\non demand", offset=(0.08, 0.0))
    arrow(ax, (0.29, 0.26), (0.25, 0.26), "accepted\n+ bonus", offset=(0.0, 0.07))
    arrow(ax, (0.13, 0.21), (0.13, 0.11))
    arrow(
        ax, (0.2, 0.31), (0.38, 0.87), "feedback: accepted ids,\ntarget probs; new tokens", rad=-0.3, offset=(-0.1, 0.0)
    )


OUT = Path(__file__).with_name("architecture.png")


def main(out: Path = OUT) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [1, 1.25]})
    for ax in (left, right):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.axis("off")
    layers(left)
    data_path(right)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
