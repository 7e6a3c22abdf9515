"""The neural selector of delayed tree expansion: before a sampled tree is built, predict for each
candidate delay d how many draft tokens the step will accept, and draft with the best d.

Features, all known at drafting time (F = 2K + 2): the drafter's top probability and entropy at each of
the K positions of the context block (how sure the drafter is along its own path), the mean accepted
length of the session's last 4 steps (how well it has been doing), and log(1 + tokens committed).
Model: an MLP F -> hidden -> |delays|, one output per candidate d. Trained offline on traces of steps
drafted with a uniformly random d (`drafter.specblock.select: random` plus `eval.trace`), each step's
loss on the output of the d it used (squared error against the accepted count): with d random, every
output learns E[accepted | features, d]. The traced steps are split (seeded) into train, validation
(early stopping: the weights with the best validation error are kept) and held-out (reported only)."""

import functools
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from proto import checks

RECENT = 4  # steps of acceptance history in the features


def step_features(probs: torch.Tensor, recent: list[int], committed: int) -> torch.Tensor:
    """probs [K, Vd]: the context block's draft distributions -> features [2K + 2]."""
    top = probs.max(-1).values
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)
    history = sum(recent[-RECENT:]) / len(recent[-RECENT:]) if recent else 0.0
    return torch.cat([top, entropy, torch.tensor([history, math.log1p(committed)])]).float()


class Selector(nn.Module):
    def __init__(self, n_features: int, delays: list[int], hidden: int = 32):
        super().__init__()
        self.delays = list(delays)
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, len(delays)))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [B, F] -> predicted accepted draft tokens per candidate delay [B, |delays|]."""
        return self.net((feats - self.mean) / self.std)

    @torch.no_grad()
    def choose(self, feats: torch.Tensor) -> int:
        return self.delays[int(self(feats[None])[0].argmax())]


def save_selector(sel: Selector, folder: Path, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sel.state_dict().items()}, folder / "selector.safetensors")
    (folder / "config.json").write_text(
        json.dumps(
            {"delays": sel.delays, "n_features": sel.mean.shape[0], "hidden": sel.net[0].out_features, **meta}, indent=2
        )
    )


@functools.lru_cache(maxsize=4)
def cached_selector(folder: str) -> Selector:
    """One loaded selector per folder for the process (sessions share it; it is never trained online)."""
    path = Path(folder)
    if not (path / "selector.safetensors").is_file():
        raise FileNotFoundError(
            f"drafter.specblock.selector: {path}: no selector.safetensors (train one: "
            "specdraft train --config configs/train-selector.yaml)"
        )
    return load_selector(path)


def load_selector(folder: Path) -> Selector:
    meta = json.loads((folder / "config.json").read_text())
    sel = Selector(meta["n_features"], meta["delays"], meta["hidden"])
    sel.load_state_dict(load_file(folder / "selector.safetensors"))
    return sel.eval()


@dataclass
class SelectorTrainConfig:
    traces: list[str] = field(default_factory=lambda: ["reports/selector-trace.jsonl"])  # `eval.trace` outputs
    out: str = "models/selector-smollm2"
    hidden: int = 32
    steps: int = 2000  # full-batch optimizer steps at most (early stopping keeps the best)
    lr: float = 3e-3
    heldout_fraction: float = 0.2  # of the traced steps, by a seeded shuffle; as much again for validation
    seed: int = 0

    def validate(self) -> None:
        checks.positive(self, "hidden", "steps", "lr")


def load_traces(paths: list[str]) -> list[dict]:
    """Records {"features": [F], "delay": d, "accepted": n} from JSONL files."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(
                f"train.selector.traces: {path}: file not found (run `specdraft eval` with "
                "eval.trace and drafter.specblock.select: random first)"
            )
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def train_selector(cfg: SelectorTrainConfig, records: list[dict]) -> dict:
    """Fit, report held-out squared error against the per-delay training mean (all that a static choice
    knows), save; returns the metrics."""
    delays = sorted({r["delay"] for r in records})
    if len(delays) < 2 or len(records) < 20:
        raise ValueError(
            f"train.selector.traces: {len(records)} steps over delays {delays}: need >= 20 steps "
            "and >= 2 delays (trace with drafter.specblock.select: random)"
        )
    rng = random.Random(cfg.seed)
    records = records[:]
    rng.shuffle(records)
    n_held = max(1, int(len(records) * cfg.heldout_fraction))
    held, val, train = records[:n_held], records[n_held : 2 * n_held], records[2 * n_held :]

    def tensors(rs):
        return (
            torch.tensor([r["features"] for r in rs]),
            torch.tensor([delays.index(r["delay"]) for r in rs]),
            torch.tensor([float(r["accepted"]) for r in rs]),
        )

    def mse(sel, x, d, y):
        return (sel(x).gather(1, d[:, None])[:, 0] - y).square().mean()

    x, d, y = tensors(train)
    vx, vd, vy = tensors(val)
    torch.manual_seed(cfg.seed)
    sel = Selector(x.shape[1], delays, cfg.hidden)
    sel.mean.copy_(x.mean(0))
    sel.std.copy_(x.std(0).clamp(min=1e-3))
    opt = torch.optim.AdamW(sel.parameters(), lr=cfg.lr, weight_decay=1e-3)
    best, best_state, best_step = float("inf"), None, 0
    for step in range(cfg.steps):  # full batch: traces are thousands of steps at most
        loss = mse(sel, x, d, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            v = float(mse(sel, vx, vd, vy))
        if v < best:
            best, best_step = v, step + 1
            best_state = {k: t.clone() for k, t in sel.state_dict().items()}
    sel.load_state_dict(best_state)
    hx, hd, hy = tensors(held)
    per_delay = torch.tensor([y[d == i].mean().item() if (d == i).any() else 0.0 for i in range(len(delays))])
    with torch.no_grad():
        pred = sel(hx).gather(1, hd[:, None])[:, 0]
    metrics = {
        "steps_traced": len(records),
        "train_steps": len(train),
        "validation_steps": len(val),
        "heldout_steps": len(held),
        "best_optimizer_step": best_step,
        "delays": delays,
        "per_delay_mean_accepted": per_delay.tolist(),
        "heldout_mse": float((pred - hy).square().mean()),
        "heldout_mse_per_delay_mean": float((per_delay[hd] - hy).square().mean()),
        "train_config": asdict(cfg),
    }
    save_selector(sel.eval(), Path(cfg.out), {"metrics": metrics})
    return metrics
