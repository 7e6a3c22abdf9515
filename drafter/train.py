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
import pickle
import random
import re
import shutil
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from drafter.data import tokenize_conversation, trainable, write_whole
from drafter.selector import SelectorTrainConfig
from drafter.specblock import SpecBlock, SpecBlockConfig, load_specblock
from kernels.linear import fast_bf16
from proto import checks

log = logging.getLogger(__name__)


@dataclass
class StreamConfig:
    """train.data: stream. Conversations are read in file order, teacher-forced by the target inside the
    training loop (batched, in the target's dtype) and dropped: nothing per token goes to disk. The data
    cursor (the last record of the finished chunks, the batches done in the current one) is saved with
    each checkpoint, so a resumed or continued run goes on with data it has not seen."""

    source: str = "sharegpt"  # the packaged ShareGPT set, a .jsonl / .json file, or a glob of .jsonl shards
    max_tokens: int = 1024  # per conversation (longer ones are cut)
    batch_tokens: int = 4096  # tokens per target forward and optimizer step, padding included
    chunk: int = 64  # conversations read ahead and sorted by length so that batches pad little
    topk: int = 16  # the target's next-token distribution kept per reply position
    vocab_conversations: int = 2000  # the first training conversations, whose reply tokens pick the draft vocabulary
    # passes over the source: the first teacher-forces and writes the teacher cache (train.out/teacher-cache:
    # features bf16, top-k ids and probabilities per batch file), later ones read it at the drafter's speed
    epochs: int = 1
    cache_gb: float = 4.0  # the teacher cache's bound; batches past it are left out of later epochs (logged)

    def validate(self) -> None:
        checks.conversation_source(self, "source")
        checks.positive(self, "max_tokens", "batch_tokens", "chunk", "topk", "vocab_conversations", "epochs")
        checks.nonneg(self, "cache_gb")
        if self.batch_tokens < self.max_tokens:
            raise ValueError(f"batch_tokens: {self.batch_tokens} < max_tokens {self.max_tokens} (one conversation)")


@dataclass
class CompanionConfig:
    """Another trained drafter that goes on training on the very same batches as the main one (one teacher
    forward feeds both), checkpointed, evaluated and published like it: e.g. the token-conditioned drafter
    that serves vLLM beside the hidden-state one."""

    init: str = ""  # its folder (drafter.safetensors + config.json)
    out: str = ""  # its checkpoints and resumable state
    publish: str = ""  # gets it (bf16) when its held-out tau-estimate beats the drafter there; "" = never

    def validate(self) -> None:
        if not self.init:
            raise ValueError("init: a companion needs a trained drafter's folder")
        checks.file_in(self.init, "drafter.safetensors")
        if not self.out:
            raise ValueError("out: a companion needs a folder for its checkpoints")


@dataclass
class TrainConfig:
    kind: typing.Literal["specblock", "selector"] = "specblock"  # selector: the delay selector, from traces
    selector: SelectorTrainConfig = field(default_factory=SelectorTrainConfig)
    # shards: prepare-data's teacher-forced files in data_dir (windows drawn at random);
    # stream: teacher forcing inside the loop (`stream`), data_dir unused
    data: typing.Literal["shards", "stream"] = "shards"
    stream: StreamConfig = field(default_factory=StreamConfig)
    data_dir: str = "data/sharegpt-smollm2"
    heldout_dir: str = ""  # where the held-out split is read from; "" = data_dir
    # more held-out folders, evaluated with every checkpoint and reported beside heldout_dir's (which alone
    # decides publishing): e.g. the target's own replies beside ShareGPT's
    heldout_also: list[str] = field(default_factory=list)
    out: str = "checkpoints/specblock-smollm2"  # drafter.safetensors + config.json (+ state.pt to resume)
    model: SpecBlockConfig = field(default_factory=SpecBlockConfig)
    # a trained drafter's folder to start from (its shape and draft vocabulary replace `model`; with
    # data: stream, training goes on after the data cursor its config records); "" = random initialisation
    init: str = ""
    # a folder (e.g. models/specblock-smollm2) that gets the drafter, in bf16, whenever its held-out
    # tau-estimate beats the drafter already there (evaluated on the same held-out set at the start)
    publish: str = ""
    # also train the EAGLE-style baseline (this model with block_size 1) on the very same batches, into
    # this folder, and publish it like the main one to baseline_publish; "" = no baseline
    baseline_out: str = ""
    baseline_publish: str = ""
    # more trained drafters that go on training on the very same batches, each {init, out, publish}: e.g.
    # the token-conditioned one beside this one (one teacher forward feeds all)
    companions: list[CompanionConfig] = field(default_factory=list)
    # the drafter's matrix products in bf16 (autocast; weights and optimizer stay fp32): auto = where
    # the CPU has bf16 dot products
    precision: typing.Literal["auto", "float32", "bfloat16"] = "auto"
    steps: int = 2000
    conversations_per_step: int = 4  # data: shards
    max_positions: int = 512  # data: shards, a random window of each conversation
    lr: float = 1e-3
    warmup: int = 50
    feature_weight: float = 0.5
    rank_weight: float = 0.1
    eval_every: int = 200
    seed: int = 0

    def validate(self) -> None:
        checks.positive(self, "steps", "conversations_per_step", "max_positions", "eval_every", "lr")
        for key in ("init", "publish"):
            folder = getattr(self, key)
            if folder and (key == "init" or Path(folder).exists()):
                try:
                    checks.file_in(folder, "drafter.safetensors")
                except OSError as e:
                    raise ValueError(f"{key}: {e}") from None
        if self.baseline_publish and not self.baseline_out:
            raise ValueError("baseline_publish: needs baseline_out (where the baseline trains)")
        names = ["specblock", "eagle"] + [Path(c.out).name for c in self.companions]
        for i, c in enumerate(self.companions):
            if Path(c.out).name in names[: i + 2]:
                raise ValueError(f"companions[{i}].out: {c.out} is named like another learner ({Path(c.out).name})")
            try:
                c.validate()
            except OSError as e:
                raise ValueError(f"companions[{i}].init: {e}") from None
            except ValueError as e:
                raise ValueError(f"companions[{i}].{e}") from None


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
    """Loss on one conversation window; to_draft [V] maps target ids to draft indices (-1 if absent).
    conv's topk_* rows are read only where loss_mask is set (a streaming teacher computes only those)."""
    k = model.cfg.block_size
    tokens, hidden = conv["tokens"].long(), conv["hidden"].float()
    states = model.forward_train(hidden, tokens)  # [K, T', D], T' = T - 1
    t = states.shape[1]
    pos = torch.arange(t)[None] + torch.arange(k)[:, None] + 1  # [K, T'] index of the target distribution
    inside = pos < len(tokens)
    pos = pos.clamp(max=len(tokens) - 1)
    scored = inside & conv["loss_mask"].bool()[pos]  # [K, T'] positions that predict reply tokens
    cols = scored.any(0).nonzero()[:, 0]  # the starts with anything to score: the rest costs no head
    states, pos, scored = states[:, cols], pos[:, cols], scored[:, cols]  # [K, C, ...]
    logits = model.draft_logits(states)  # [K, C, Vd]
    logq = logits.log_softmax(-1)
    tid = to_draft[conv["topk_ids"].long()[pos]]  # [K, C, k] draft indices of the target's top-k
    tp = conv["topk_probs"].float()[pos] * (tid >= 0)
    tp = tp / tp.sum(-1, keepdim=True).clamp(min=1e-9)
    ce = -(tp * logq.gather(-1, tid.clamp(min=0))).sum(-1)  # [K, C]
    target_top1 = tid[..., 0]  # the target's argmax (-1 if not draftable)
    own_top1 = logq.argmax(-1)
    hit = own_top1 == target_top1
    valid = valid_prefix(hit)
    weight = (valid & scored).float()
    feat = F.smooth_l1_loss(states.float(), hidden[pos], reduction="none").mean(-1)
    rank_label = (logq > logq.gather(-1, target_top1.clamp(min=0)[..., None])).sum(-1)
    rank_label = torch.where(target_top1 >= 0, rank_label, model.cfg.max_rank - 1).clamp(max=model.cfg.max_rank - 1)
    rank_logits = model.rank_head(states.detach()).flatten(0, 1).float()
    rank = F.cross_entropy(rank_logits, rank_label.flatten(), reduction="none")
    n = weight.sum().clamp(min=1)
    loss = ((ce + cfg.feature_weight * feat + cfg.rank_weight * rank.view(weight.shape)) * weight).sum() / n
    top1 = (hit & scored).float().sum(1) / scored.float().sum(1).clamp(min=1)  # [K] accuracy per position
    # leading hits of each block whose first position is scored: the accepted length of a K-token chain
    run = hit.long().cumprod(0).sum(0)[scored[0]]
    return loss, {
        "loss": float(loss.detach()),
        "top1": top1.tolist(),
        "run": run,
        # per scored row, whether block position 1 agrees with the target's top-1 (the bandit's paired guard)
        "hits": hit[0][scored[0]],
        "covered": (target_top1[0] >= 0)[scored[0]],  # the target's argmax lies in the draft vocabulary
    }


def window(conv: dict, n: int, rng: random.Random) -> dict:
    if len(conv["tokens"]) <= n:
        return conv
    a = rng.randrange(len(conv["tokens"]) - n + 1)
    return {k: v[a : a + n] for k, v in conv.items()}


@torch.no_grad()
def evaluate(model: SpecBlock, convs: list[dict], to_draft: torch.Tensor, cfg: TrainConfig, bf16: bool = False) -> dict:
    """Held-out loss, top-1 accuracy per block position (argmax equals the target's argmax), the chain
    tau-estimate: 1 + the mean number of leading hits of a block (the tokens one drafting forward's top-1
    chain would commit per verification at T=0, bonus token included; trees do better), and the draft
    vocabulary's coverage of the target's argmax tokens."""
    losses, top1, runs, covered = [], [], [], []
    for conv in convs:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # bf16: as training's steps run
            loss, m = block_loss(model, conv, to_draft, cfg)
        losses.append(m["loss"])
        top1.append(m["top1"])
        runs.append(m["run"])
        covered.append(m["covered"])
    run = torch.cat(runs).float() if runs else torch.zeros(0)
    return {
        "loss": sum(losses) / max(len(losses), 1),
        "top1": [sum(col) / len(col) for col in zip(*top1)] if top1 else [],
        "tau_chain": 1 + float(run.mean()) if len(run) else 1.0,
        # the share of the target's argmax tokens on held-out replies that the draft vocabulary holds
        "coverage": float(torch.cat(covered).float().mean()) if covered else 0.0,
    }


def evaluate_checkpoint(folder: Path, cfg: TrainConfig, target_args, embedding: torch.Tensor) -> dict:
    """A trained drafter's held-out loss and top-1 per block position, on cfg's held-out split."""
    data = Path(cfg.heldout_dir or cfg.data_dir)
    held = load_split(data, "heldout")
    if not held:
        raise FileNotFoundError(f"{data}: no held-out shards (prepare them: configs/data-heldout.yaml)")
    model = load_specblock(folder, target_args, embedding)
    to_draft = draft_index(model.draft_ids, embedding.shape[0])
    return {
        "conversations": len(held),
        "tokens": sum(len(c["tokens"]) for c in held),
        **evaluate(model, held, to_draft, cfg),
        **also_metrics(model, heldout_also(cfg), to_draft, cfg),
    }


def heldout_also(cfg: TrainConfig) -> dict[str, list[dict]]:
    """cfg.heldout_also's held-out conversations by folder."""
    return {f: load_split(Path(f), "heldout") for f in cfg.heldout_also}


def also_metrics(model: SpecBlock, also: dict[str, list[dict]], to_draft, cfg: TrainConfig, bf16=False) -> dict:
    """{"also": {folder: held-out metrics}} for heldout_also's sets, {} without any."""
    return {"also": {f: evaluate(model, convs, to_draft, cfg, bf16) for f, convs in also.items()}} if also else {}


def save(model: SpecBlock, cfg: TrainConfig, metrics: dict, out: Path, data: dict | None = None) -> None:
    """The drafter in bf16 (drafter.safetensors) and its config.json: shape, training config, metrics and,
    for streamed training, the data cursor and tokens seen."""
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(sd, out / "drafter.safetensors")
    meta = {"model": asdict(model.cfg), "train": asdict(cfg), "metrics": metrics}
    if data is not None:
        meta["data"] = data
    (out / "config.json").write_text(json.dumps(meta, indent=2))


def data_dirs(cfg: TrainConfig) -> tuple[Path, Path]:
    """The training and held-out data folders, each checked to hold prepared shards (with data: stream,
    only the held-out one)."""
    data, held_dir = Path(cfg.data_dir), Path(cfg.heldout_dir or cfg.data_dir)
    also = [(f"train.heldout_also[{i}]", Path(f)) for i, f in enumerate(cfg.heldout_also)]
    for key, folder in [("train.data_dir", data), ("train.heldout_dir", held_dir), *also]:
        if key == "train.data_dir" and cfg.data == "stream":
            continue
        if not (folder / "manifest.json").is_file():
            raise FileNotFoundError(
                f"{key}: {folder}: no manifest.json (run `specdraft prepare-data` first; the "
                "held-out set: --config configs/data-heldout.yaml)"
            )
    return data, held_dir


# one optimizer step's conversations (training.block_loss's input) and the data cursor after it
Batches = Iterator[tuple[list[dict], dict]]
# (tokens [B, T], need [B, T] bool, k) -> hidden [B, T, D], top-k ids and probs [B, T, k] where need
Teacher = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class Stream(typing.NamedTuple):
    """What data: stream reads: conversations in file order ((id, messages or None), see
    drafter.data.sharegpt_conversations), the target's tokenizer and its batched teacher."""

    conversations: Callable[[], Iterable[tuple[str, list[dict] | None]]]
    tokenizer: object
    teacher: Teacher


def shard_batches(convs: list[dict], cfg: TrainConfig, cursor: dict) -> Batches:
    """Random windows of the prepared conversations, the same ones for a step on every run (seeded by step)."""
    step = cursor.get("step", 0)
    while True:
        rng = random.Random(cfg.seed * 1_000_003 + step)
        step += 1
        yield (
            [window(rng.choice(convs), cfg.max_positions, rng) for _ in range(cfg.conversations_per_step)],
            {"step": step},
        )


def tokenized(stream: Stream, sc: StreamConfig, excluded: range, after: int) -> Iterator[tuple[int, list, list]]:
    """(record number, token ids, reply mask) of each trainable conversation after record `after`, in
    file order, skipping the held-out records `excluded`."""
    for n, (_, msgs) in enumerate(stream.conversations(), start=1):
        if n <= after or n in excluded or msgs is None or (msgs := trainable(msgs)) is None:
            continue
        ids, mask = tokenize_conversation(stream.tokenizer, msgs, sc.max_tokens)
        if len(ids) >= 2 and any(mask):
            yield n, ids, mask


def stream_vocabulary(stream: Stream, sc: StreamConfig, excluded: range, size: int, vocab_size: int) -> torch.Tensor:
    """The `size` most frequent reply tokens of the first sc.vocab_conversations training conversations."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for i, (_, ids, mask) in enumerate(tokenized(stream, sc, excluded, 0)):
        if i == sc.vocab_conversations:
            break
        counts += torch.bincount(torch.tensor(ids[1:])[torch.tensor(mask[:-1])], minlength=vocab_size)
    return counts.topk(min(size, int((counts > 0).sum()))).indices.sort().values


def stream_batches(stream: Stream, sc: StreamConfig, excluded: range, cursor: dict, cache: Path, seed: int) -> Batches:
    """Epoch 1: teacher-forced batches in file order (teacher_batches), each also written to the teacher
    cache (TeacherCache) when sc.epochs > 1; epochs 2..sc.epochs: the cached batches' conversations,
    shuffled anew each epoch (cached_batches). cursor: teacher_batches' for epoch 1 (plus "epoch": 1),
    else {"epoch": e, "batch": b, "record": the source's last record read in epoch 1}."""
    epoch, record = cursor.get("epoch", 1), cursor.get("record", 0)
    if epoch == 1:
        writer = TeacherCache(cache, sc.cache_gb) if sc.epochs > 1 else None
        where = (record, cursor.get("batch", 0))  # the batch about to be made
        for convs, after in teacher_batches(stream, sc, excluded, cursor):
            if writer is not None:
                writer.add(f"{where[0]:09d}-{where[1]:04d}", convs)
            where, record = (after["record"], after["batch"]), after["record"]
            yield convs, {"epoch": 1, **after}
        epoch, cursor = 2, {}
    for e in range(epoch, sc.epochs + 1):
        for convs, b in cached_batches(cache, sc, e, cursor.get("batch", 0) if e == epoch else 0, seed):
            yield convs, {"epoch": e, "batch": b, "record": record}


def teacher_batches(stream: Stream, sc: StreamConfig, excluded: range, cursor: dict) -> Batches:
    """Teacher-forced batches in file order: chunks of sc.chunk conversations, each sorted by length and
    cut into batches of at most sc.batch_tokens (padding included), one target forward per batch.
    cursor {"record": r, "batch": b, "until": u}: the chunk that starts after record r and ends at record
    u (it is rebuilt as it was, even if a glob source grew since), b of its batches done."""
    start, skip, until = cursor.get("record", 0), cursor.get("batch", 0), cursor.get("until")
    chunk: list[tuple[int, list, list]] = []
    for item in tokenized(stream, sc, excluded, start):
        chunk.append(item)
        if len(chunk) == sc.chunk or item[0] == until:
            yield from teach_chunk(stream.teacher, sc, chunk, start, skip)
            start, skip, until, chunk = item[0], 0, None, []
    yield from teach_chunk(stream.teacher, sc, chunk, start, skip)


def pack(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices of ascending `lengths` cut into batches of at most batch_tokens once padded to their
    longest (which is their last)."""
    batches: list[list[int]] = []
    for i, n in enumerate(lengths):
        if batches and (len(batches[-1]) + 1) * n <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def teach_chunk(teacher: Teacher, sc: StreamConfig, chunk: list, start: int, skip: int) -> Batches:
    chunk = sorted(chunk, key=lambda c: len(c[1]))
    batches = [[chunk[i] for i in b] for b in pack([len(c[1]) for c in chunk], sc.batch_tokens)]
    end = max((c[0] for c in chunk), default=start)
    for i, batch in enumerate(batches[skip:], start=skip):
        t = len(batch[-1][1])
        tokens = torch.zeros(len(batch), t, dtype=torch.long)
        need = torch.zeros(len(batch), t, dtype=torch.bool)
        for r, (_, ids, mask) in enumerate(batch):
            tokens[r, : len(ids)], need[r, : len(ids)] = torch.tensor(ids), torch.tensor(mask)
        hidden, top_ids, top_p = teacher(tokens, need, sc.topk)
        convs = [
            {
                "tokens": tokens[r, : len(ids)],
                "loss_mask": need[r, : len(ids)],
                "hidden": hidden[r, : len(ids)],
                "topk_ids": top_ids[r, : len(ids)],
                "topk_probs": top_p[r, : len(ids)],
            }
            for r, (_, ids, _) in enumerate(batch)
        ]
        last = i + 1 == len(batches)
        yield convs, {"record": end, "batch": 0} if last else {"record": start, "batch": i + 1, "until": end}


# a cached conversation's tensors and the dtypes they are kept in
CACHED = {
    "tokens": torch.int32,
    "loss_mask": torch.bool,
    "hidden": torch.bfloat16,
    "topk_ids": torch.int32,
    "topk_probs": torch.float16,
}


class TeacherCache:
    """Epoch 1's teacher-forced batches on disk, one safetensors file per batch named by the data cursor
    it started at (a resumed run rewrites a batch it redoes under the same name), until the files hold
    gb gigabytes; from the first batch that does not fit (recorded in the file FULL, which a resumed run
    reads) the rest are logged and left out of later epochs."""

    def __init__(self, folder: Path, gb: float):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.left = gb * 1e9 - sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        if (folder / "FULL").is_file():
            self.left = -1.0

    def add(self, name: str, convs: list[dict]) -> None:
        if self.left < 0:
            return
        sh = {k: torch.cat([c[k] for c in convs]).to(dtype) for k, dtype in CACHED.items()}
        sh["offsets"] = torch.tensor([0] + [len(c["tokens"]) for c in convs]).cumsum(0)
        size = sum(t.numel() * t.element_size() for t in sh.values())
        if size > self.left:
            log.warning(
                "%s: the teacher cache is full; later epochs read only the batches before %s", self.folder, name
            )
            (self.folder / "FULL").write_text(name + "\n")
            self.left = -1.0
            return
        write_whole(self.folder / f"{name}.safetensors", lambda p: save_file(sh, p))
        self.left -= (self.folder / f"{name}.safetensors").stat().st_size


def cached_batches(cache: Path, sc: StreamConfig, epoch: int, skip: int, seed: int) -> Iterator[tuple[list[dict], int]]:
    """One later epoch: the teacher cache's conversations shuffled (seeded by epoch), in chunks of sc.chunk
    sorted by length and packed like epoch 1's batches, each with the number of batches done after it."""
    convs = []
    for f in sorted(cache.glob("*.safetensors")):
        sh = load_file(f)
        off = sh["offsets"].tolist()
        convs += [{k: sh[k][a:b] for k in CACHED} for a, b in zip(off, off[1:])]
    if not convs:
        log.warning("%s: no cached batch: epoch %d has nothing to read", cache, epoch)
        return
    random.Random(seed * 1_000_003 + epoch).shuffle(convs)
    batches = []
    for c in range(0, len(convs), sc.chunk):
        chunk = sorted(convs[c : c + sc.chunk], key=lambda conv: len(conv["tokens"]))
        batches += [[chunk[i] for i in b] for b in pack([len(conv["tokens"]) for conv in chunk], sc.batch_tokens)]
    for i, batch in enumerate(batches[skip:], start=skip):
        yield batch, i + 1


def heldout_records(held_dir: Path, source: str) -> range:
    """The record numbers (1-based, file order) of `source` that the held-out set was prepared from: a
    stream skips them. Empty when the held-out set comes from another source (nothing to skip), or is a
    hash split of this one (logged: the stream may then overlap it)."""
    c = json.loads((held_dir / "manifest.json").read_text())["config"]
    if c.get("source", "sharegpt") != source:
        return range(0)
    if c.get("heldout_fraction", 0) < 1:
        log.warning("%s: a hash split of %s, not a record range; the stream may overlap it", held_dir, source)
        return range(0)
    return range(c["first_record"] + 1, c["first_record"] + (c["max_conversations"] or 10**9) + 1)


class Learner(typing.NamedTuple):
    """One drafter being trained: its model, optimizer, schedule and folders."""

    name: str
    model: SpecBlock
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    to_draft: torch.Tensor
    out: Path
    publish: Path | None


def learner(name: str, model: SpecBlock, cfg: TrainConfig, out: str, publish: str, vocab_size: int) -> Learner:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s / cfg.steps, 1.0)))
    )
    return Learner(
        name, model, opt, sched, draft_index(model.draft_ids, vocab_size), Path(out), Path(publish) if publish else None
    )


def published_score(lr: Learner, held: list[dict], cfg: TrainConfig, target_args, embedding, bf16: bool) -> float:
    """The held-out tau-estimate of the drafter in lr.publish (-inf where there is none yet)."""
    if lr.publish is None or not (lr.publish / "drafter.safetensors").is_file():
        return -math.inf
    model = load_specblock(lr.publish, target_args, embedding)
    score = evaluate(model, held, draft_index(model.draft_ids, embedding.shape[0]), cfg, bf16)["tau_chain"]
    log.info("%s: the drafter in %s: held-out tau-estimate %.3f, to beat", lr.name, lr.publish, score)
    return score


def data_position(
    cfg: TrainConfig, data: Path, held_dir: Path, state: dict | None, stream: Stream | None
) -> tuple[range, dict, int, list[dict] | None]:
    """Where training reads from: the records a stream skips (the held-out set's), the data cursor and the
    tokens seen (from the resumable state; else, for a stream of the same source, from the published
    drafter it starts from), and the training conversations of the shards (None for a stream)."""
    init_meta = json.loads((Path(cfg.init) / "config.json").read_text()) if cfg.init else {}
    excluded, train_convs = range(0), None
    if cfg.data == "stream":
        excluded = heldout_records(held_dir, cfg.stream.source)
        if stream is None:
            raise ValueError("data: stream needs the target's teacher (specdraft train builds it)")
        # a published drafter's cursor applies to the same source only; its tokens seen carry over to any
        # (the learning curve goes on across runs)
        before = init_meta.get("data", {})
        published = before.get("cursor", {}) if before.get("source") == cfg.stream.source else {}
        if published.get("epoch", 1) > 1:  # it read the whole source then: a new run reads what came after
            published = {"record": published["record"]}
        cursor = state["cursor"] if state else published
        tokens_seen = state["tokens"] if state else before.get("tokens", 0)
    else:
        train_convs = load_split(data, "train")
        if not train_convs:
            raise FileNotFoundError(f"{data}: no training shards (run `specdraft prepare-data` first)")
        cursor, tokens_seen = (state["cursor"] if state else {}), (state["tokens"] if state else 0)
    return excluded, cursor, tokens_seen, train_convs


def new_learners(
    cfg: TrainConfig, target_args, embedding: torch.Tensor, stream, excluded: range, train_convs
) -> list[Learner]:
    """The drafter to train (cfg.init's, else a new one over the training data's most frequent tokens),
    with cfg.baseline_out the EAGLE-style baseline (block_size 1) on the same draft vocabulary, and
    cfg.companions' drafters (named by their out folder)."""
    if cfg.init:
        model = load_specblock(Path(cfg.init), target_args, embedding).train()
        cfg.model = model.cfg
    else:
        size = cfg.model.draft_vocab
        draft_ids = (
            stream_vocabulary(stream, cfg.stream, excluded, size, embedding.shape[0])
            if cfg.data == "stream"
            else draft_vocabulary(train_convs, size)
        )
        cfg.model.draft_vocab = len(draft_ids)
        model = SpecBlock(cfg.model, target_args, embedding, draft_ids)
    learners = [learner("specblock", model, cfg, cfg.out, cfg.publish, embedding.shape[0])]
    if cfg.baseline_out:
        base = SpecBlock(replace(model.cfg, block_size=1), target_args, embedding, model.draft_ids)
        learners.append(learner("eagle", base, cfg, cfg.baseline_out, cfg.baseline_publish, embedding.shape[0]))
    for c in cfg.companions:
        other = load_specblock(Path(c.init), target_args, embedding).train()
        learners.append(learner(Path(c.out).name, other, cfg, c.out, c.publish, embedding.shape[0]))
    return learners


def train_step(learners: list[Learner], convs: list[dict], cfg: TrainConfig, bf16: bool) -> dict[str, float]:
    """One optimizer step of every learner on a batch of conversations; returns their mean losses by name."""
    losses = {}
    for lr in learners:
        lr.opt.zero_grad()
        total = 0.0
        for conv in convs:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = block_loss(lr.model, conv, lr.to_draft, cfg)
            (loss / len(convs)).backward()
            total += float(loss.detach()) / len(convs)
        torch.nn.utils.clip_grad_norm_(lr.model.parameters(), 1.0)
        lr.opt.step()
        lr.sched.step()
        losses[lr.name] = total
    return losses


def train(cfg: TrainConfig, target_args, embedding: torch.Tensor, progress=None, stream: Stream | None = None) -> dict:
    """Train cfg.model (and the EAGLE-style baseline where cfg.baseline_out is set) for cfg.steps steps on
    prepare-data's shards or, with data: stream, on `stream`; evaluate on the held-out split every
    cfg.eval_every steps, checkpoint (resumable), log the learning curve (out/curve.jsonl) and publish
    improvements. progress(metrics) after each step."""
    torch.manual_seed(cfg.seed)
    data, held_dir = data_dirs(cfg)
    held, also = load_split(held_dir, "heldout"), heldout_also(cfg)
    out = Path(cfg.out)
    state_path = out / "state.pt"
    state = load_state(state_path) if state_path.is_file() else None
    if state is None and (out / "teacher-cache").is_dir():  # a fresh run: another run's cache is not its data
        shutil.rmtree(out / "teacher-cache")
    excluded, cursor, tokens_seen, train_convs = data_position(cfg, data, held_dir, state, stream)
    learners = new_learners(cfg, target_args, embedding, stream, excluded, train_convs)
    step = 0
    if state:
        step = state["step"]
        for lr in learners:
            if lr.out != out and not (lr.out / "state.pt").is_file():
                raise OSError(f"{lr.out}: no state.pt to resume {lr.name} beside {out}; start the run afresh")
            own = state if lr.out == out else load_state(lr.out / "state.pt")
            lr.model.load_state_dict(own["model"])
            lr.opt.load_state_dict(own["opt"])
            lr.sched.load_state_dict(own["sched"])
        log.info("resumed from %s at step %d, %d tokens seen, data cursor %s", state_path, step, tokens_seen, cursor)
    bf16 = cfg.precision == "bfloat16" or (cfg.precision == "auto" and fast_bf16())
    best = {lr.name: published_score(lr, held, cfg, target_args, embedding, bf16) for lr in learners}
    batches = (
        stream_batches(stream, cfg.stream, excluded, cursor, out / "teacher-cache", cfg.seed)
        if cfg.data == "stream"
        else shard_batches(train_convs, cfg, cursor)
    )
    metrics: dict = {}
    seconds, tokens0 = 0.0, tokens_seen  # training time (teacher, data and drafter steps; evaluation excluded)
    while step < cfg.steps:
        t0 = time.perf_counter()
        try:
            convs, cursor = next(batches)
        except StopIteration:
            log.warning("data exhausted at step %d (cursor %s): stopping", step, cursor)
            if metrics and step % cfg.eval_every:
                metrics.update(checkpoint(learners, cfg, held, metrics, step, cursor, tokens_seen, best, bf16, also))
            break
        losses = train_step(learners, convs, cfg, bf16)
        step += 1
        tokens_seen += sum(len(c["tokens"]) for c in convs)
        seconds += time.perf_counter() - t0
        metrics = {
            "step": step,
            "train_loss": losses["specblock"],
            "tokens": tokens_seen,
            "tok_s": (tokens_seen - tokens0) / seconds,
            "minutes": seconds / 60,
            "epoch": cursor.get("epoch", 1),
        }
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics.update(checkpoint(learners, cfg, held, metrics, step, cursor, tokens_seen, best, bf16, also))
        if progress is not None:
            progress(metrics)
    return metrics


STATE_KEYS = ("model", "opt", "sched", "step", "cursor", "tokens")


def load_state(path: Path) -> dict:
    """The resumable state `checkpoint` saved in path: tensors and plain data only (state dicts, numbers,
    the data cursor), read with weights_only=True, so a crafted file is refused before any of it runs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        # torch's text is several lines and advises weights_only=False: name the refused global only
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        why = f"it calls {found[1]}" if found else type(e).__name__
        raise OSError(
            f"{path}: not a training state of tensors and plain data, refused unread ({why[:120]}); "
            "delete it to train from the start"
        ) from None
    if not isinstance(state, dict) or not all(k in state for k in STATE_KEYS):
        raise OSError(f"{path}: not a training state (needs the keys {', '.join(STATE_KEYS)})")
    return state


def checkpoint(
    learners: list[Learner], cfg: TrainConfig, held, metrics, step, cursor, tokens, best, bf16, also
) -> dict:
    """Evaluate every learner on the held-out set, save its checkpoint and resumable state, append the
    learning curve and publish what improved. Returns the metrics to report."""
    point = {"step": step, "tokens": tokens, "tok_s": round(metrics["tok_s"], 1)}
    data = {"cursor": cursor, "tokens": tokens, "source": cfg.stream.source if cfg.data == "stream" else cfg.data_dir}
    for lr in learners:
        held_m = evaluate(lr.model, held, lr.to_draft, cfg, bf16)
        if lr is learners[0]:
            held_m.update(also_metrics(lr.model, also, lr.to_draft, cfg, bf16))
        point[lr.name] = held_m
        own = {**metrics, "heldout": held_m}
        save(lr.model, cfg, own, lr.out, data)
        # tensors and plain data only: load_state reads it back with weights_only=True
        torch.save(
            {
                "model": lr.model.state_dict(),
                "opt": lr.opt.state_dict(),
                "sched": lr.sched.state_dict(),
                "step": step,
                "cursor": cursor,
                "tokens": tokens,
            },
            lr.out / "state.pt",
        )
        if lr.publish is not None and held_m["tau_chain"] > best[lr.name]:
            save(lr.model, cfg, own, lr.publish, data)
            best[lr.name] = held_m["tau_chain"]
            point[lr.name]["published"] = str(lr.publish)
            log.info("%s: published to %s (held-out tau-estimate %.3f)", lr.name, lr.publish, held_m["tau_chain"])
    with open(learners[0].out / "curve.jsonl", "a") as f:
        f.write(json.dumps(point) + "\n")
    return {"heldout": point["specblock"], **({"baseline": point["eagle"]} if "eagle" in point else {})}
