"""`specdraft train`: fit a SpecBlock drafter to the teacher-forced shards of `specdraft prepare-data`.

Loss per block position j of the block started at s (it predicts tokens[s+j+2], whose target
distribution is topk[s+j+1]): cross-entropy to the target's top-k distribution restricted to the draft
vocabulary, counted only while every earlier position of the same block predicted the target's argmax
(**valid-prefix mask**) and where the predicted token lies in an assistant reply; a smooth-L1 feature
loss pulling the block state towards the target's feature at that position (what block inheritance
relies on); and the rank head's cross-entropy to the rank of the target's token in the drafter's list."""

import json
import logging
import math
import random
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from drafter.selector import SelectorTrainConfig
from drafter.specblock import SpecBlock, SpecBlockConfig, load_specblock
from proto import checks

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    kind: typing.Literal["specblock", "selector"] = "specblock"  # selector: the delay selector, from traces
    selector: SelectorTrainConfig = field(default_factory=SelectorTrainConfig)
    data_dir: str = "data/sharegpt-smollm2"
    heldout_dir: str = ""  # where the held-out split is read from; "" = data_dir
    out: str = "checkpoints/specblock-smollm2"  # drafter.safetensors + config.json (+ state.pt to resume)
    model: SpecBlockConfig = field(default_factory=SpecBlockConfig)
    # a trained drafter's folder to start from (its shape and draft vocabulary replace `model`): fine-tuning
    # on other data, e.g. the target's own replies (configs/data-replies.yaml); "" = random initialisation
    init: str = ""
    steps: int = 2000
    conversations_per_step: int = 4
    max_positions: int = 512  # a random window of each conversation
    lr: float = 1e-3
    warmup: int = 50
    feature_weight: float = 0.5
    rank_weight: float = 0.1
    eval_every: int = 200
    seed: int = 0

    def validate(self) -> None:
        checks.positive(self, "steps", "conversations_per_step", "max_positions", "eval_every", "lr")
        if self.init:
            try:
                checks.file_in(self.init, "drafter.safetensors")
            except OSError as e:
                raise ValueError(f"init: {e}") from None


def load_split(data_dir: Path, split: str) -> list[dict[str, torch.Tensor]]:
    """Every conversation of a split as its own dict of tensors."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    convs = []
    for shard in manifest["shards"]:
        if shard["split"] != split:
            continue
        sh = load_file(data_dir / shard["file"])
        off = sh["offsets"].tolist()
        for a, b in zip(off, off[1:]):
            convs.append({k: sh[k][a:b] for k in ("tokens", "loss_mask", "hidden", "topk_ids", "topk_probs")})
    return convs


def draft_vocabulary(convs: list[dict], size: int) -> torch.Tensor:
    """The `size` most frequent tokens of the training conversations (sorted ids)."""
    counts = torch.bincount(torch.cat([c["tokens"].long() for c in convs]))
    return counts.topk(min(size, int((counts > 0).sum()))).indices.sort().values


def draft_index(draft_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[V] target token id -> its index in the draft vocabulary, -1 where it has none."""
    to_draft = torch.full((vocab_size,), -1, dtype=torch.long)
    to_draft[draft_ids] = torch.arange(len(draft_ids))
    return to_draft


def valid_prefix(hit: torch.Tensor) -> torch.Tensor:
    """hit [K, T] bool (block position j of the block at s predicted the target's token) -> [K, T]: True
    where every earlier position of the same block hit, so the loss stops after the first miss."""
    return torch.cat([torch.ones_like(hit[:1]), hit[:-1].long().cumprod(0).bool()])


def block_loss(model: SpecBlock, conv: dict, to_draft: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    """Loss on one conversation window; to_draft [V] maps target ids to draft indices (-1 if absent)."""
    k = model.cfg.block_size
    tokens, hidden = conv["tokens"].long(), conv["hidden"].float()
    states = model.forward_train(hidden, tokens)  # [K, T', D], T' = T - 1
    t = states.shape[1]
    pos = torch.arange(t)[None] + torch.arange(k)[:, None] + 1  # [K, T'] index of the target distribution
    inside = pos < len(tokens)
    pos = pos.clamp(max=len(tokens) - 1)
    logits = model.draft_logits(states)  # [K, T', Vd]
    logq = logits.log_softmax(-1)
    tid = to_draft[conv["topk_ids"].long()[pos]]  # [K, T', k] draft indices of the target's top-k
    tp = conv["topk_probs"].float()[pos] * (tid >= 0)
    tp = tp / tp.sum(-1, keepdim=True).clamp(min=1e-9)
    ce = -(tp * logq.gather(-1, tid.clamp(min=0))).sum(-1)  # [K, T']
    target_top1 = tid[..., 0]  # the target's argmax (-1 if not draftable)
    hit = logits.argmax(-1) == target_top1
    valid = valid_prefix(hit)
    scored = inside & conv["loss_mask"].bool()[pos]  # [K, T'] positions that predict reply tokens
    weight = (valid & scored).float()
    feat = F.smooth_l1_loss(states, hidden[pos], reduction="none").mean(-1)
    rank_label = (logits > logits.gather(-1, target_top1.clamp(min=0)[..., None])).sum(-1)
    rank_label = torch.where(target_top1 >= 0, rank_label, model.cfg.max_rank - 1).clamp(max=model.cfg.max_rank - 1)
    rank = F.cross_entropy(model.rank_head(states.detach()).flatten(0, 1), rank_label.flatten(), reduction="none")
    n = weight.sum().clamp(min=1)
    loss = ((ce + cfg.feature_weight * feat + cfg.rank_weight * rank.view(k, t)) * weight).sum() / n
    top1 = (hit & scored).float().sum(1) / scored.float().sum(1).clamp(min=1)  # [K] accuracy per position
    # hits: per scored row, whether block position 1 agrees with the target's top-1 (the bandit's paired guard)
    return loss, {"loss": float(loss.detach()), "top1": top1.tolist(), "hits": hit[0][scored[0]]}


def window(conv: dict, n: int, rng: random.Random) -> dict:
    if len(conv["tokens"]) <= n:
        return conv
    a = rng.randrange(len(conv["tokens"]) - n + 1)
    return {k: v[a : a + n] for k, v in conv.items()}


@torch.no_grad()
def evaluate(model: SpecBlock, convs: list[dict], to_draft: torch.Tensor, cfg: TrainConfig) -> dict:
    """Held-out loss and top-1 accuracy per block position (argmax equals the target's argmax)."""
    losses, top1 = [], []
    for conv in convs:
        loss, m = block_loss(model, conv, to_draft, cfg)
        losses.append(m["loss"])
        top1.append(m["top1"])
    return {
        "loss": sum(losses) / max(len(losses), 1),
        "top1": [sum(col) / len(col) for col in zip(*top1)] if top1 else [],
    }


def evaluate_checkpoint(folder: Path, cfg: TrainConfig, target_args, embedding: torch.Tensor) -> dict:
    """A trained drafter's held-out loss and top-1 per block position, on cfg's held-out split."""
    data = Path(cfg.heldout_dir or cfg.data_dir)
    held = load_split(data, "heldout")
    if not held:
        raise FileNotFoundError(f"{data}: no held-out shards (prepare them: configs/data-heldout.yaml)")
    model = load_specblock(folder, target_args, embedding)
    return {
        "conversations": len(held),
        "tokens": sum(len(c["tokens"]) for c in held),
        **evaluate(model, held, draft_index(model.draft_ids, embedding.shape[0]), cfg),
    }


def save(model: SpecBlock, cfg: TrainConfig, metrics: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(sd, out / "drafter.safetensors")
    (out / "config.json").write_text(
        json.dumps({"model": asdict(cfg.model), "train": asdict(cfg), "metrics": metrics}, indent=2)
    )


def data_dirs(cfg: TrainConfig) -> tuple[Path, Path]:
    """The training and held-out data folders, each checked to hold prepared shards."""
    data, held_dir = Path(cfg.data_dir), Path(cfg.heldout_dir or cfg.data_dir)
    for key, folder in (("train.data_dir", data), ("train.heldout_dir", held_dir)):
        if not (folder / "manifest.json").is_file():
            raise FileNotFoundError(
                f"{key}: {folder}: no manifest.json (run `specdraft prepare-data` first; the "
                "held-out set: --config configs/data-heldout.yaml)"
            )
    return data, held_dir


def train(cfg: TrainConfig, target_args, embedding: torch.Tensor, progress=None) -> dict:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    data, held_dir = data_dirs(cfg)
    train_convs, held = load_split(data, "train"), load_split(held_dir, "heldout")
    if not train_convs:
        raise FileNotFoundError(f"{data}: no training shards (run `specdraft prepare-data` first)")
    if cfg.init:
        model = load_specblock(Path(cfg.init), target_args, embedding).train()
        cfg.model = model.cfg
    else:
        draft_ids = draft_vocabulary(train_convs, cfg.model.draft_vocab)
        cfg.model.draft_vocab = len(draft_ids)
        model = SpecBlock(cfg.model, target_args, embedding, draft_ids)
    to_draft = draft_index(model.draft_ids, embedding.shape[0])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s / cfg.steps, 1.0)))
    )
    out = Path(cfg.out)
    state_path = out / "state.pt"
    step = 0
    if state_path.is_file():  # resume
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, rng = state["step"], state["rng"]
        log.info("resumed from %s at step %d", state_path, step)
    metrics: dict = {}
    t0 = time.perf_counter()
    while step < cfg.steps:
        opt.zero_grad()
        total = 0.0
        for _ in range(cfg.conversations_per_step):
            loss, _ = block_loss(model, window(rng.choice(train_convs), cfg.max_positions, rng), to_draft, cfg)
            (loss / cfg.conversations_per_step).backward()
            total += float(loss.detach()) / cfg.conversations_per_step
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        metrics = {"step": step, "train_loss": total, "minutes": (time.perf_counter() - t0) / 60}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics["heldout"] = evaluate(model, held, to_draft, cfg)
            save(model, cfg, metrics, out)
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "step": step,
                    "rng": rng,
                },
                state_path,
            )
        if progress is not None:
            progress(metrics)
    return metrics
