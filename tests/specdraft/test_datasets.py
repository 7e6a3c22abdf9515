"""The user's own conversations: the three record formats read from JSONL and JSON files, a bad record
is one line naming file, line and problem (skipped and counted, or exit 2 under --strict), multi-turn
prompts carry the target's own answers and never the file's, and a drafter trains end to end from a
user JSONL at toy size (its held-out conversations written back for `specdraft eval`)."""

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from drafter.data import SHAREGPT, DataConfig, build_cache, read_sharegpt, sharegpt_conversations
from drafter.train import (
    CompanionConfig,
    Stream,
    StreamConfig,
    TrainConfig,
    evaluate_checkpoint,
    heldout_records,
    stream_batches,
    tokenized,
    train,
)
from kernels.layers import ModelArgs
from specdraft.assets import package_file
from specdraft.cli import main
from specdraft.config import Config, ConfigError
from specdraft.datasets import Conversation, eval_prompt_keys, first_turns, holds_eval_prompt, load_dataset, read_file
from specdraft.evaluate import answered, turn_prompts
from specdraft.training import source_conversations
from verifier.model import Transformer
from verifier.target import TorchTarget

HERE = Path(__file__).parent.parent / "datasets"


def test_each_format_reads_to_chat_messages():
    openai = read_file(str(HERE / "chats-openai.jsonl"), strict=True)
    assert [c.id for c in openai] == ["trip", "chats-openai.jsonl:2"]
    assert [m["role"] for m in openai[0].messages] == ["system", "user", "assistant", "user", "assistant"]
    sharegpt = read_file(str(HERE / "chats-sharegpt.json"), strict=True)
    assert [c.id for c in sharegpt] == ["sg-1", "chats-sharegpt.json:10"]  # a JSON file's records by line too
    assert sharegpt[1].messages == [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    prompts = load_dataset(str(HERE / "prompts.jsonl"), strict=True)  # the blank line is no record
    assert [(c.id, c.messages) for c in prompts] == [
        ("prompts.jsonl:1", [{"role": "user", "content": "List three prime numbers."}]),
        ("hola", [{"role": "user", "content": "Say hello in Spanish."}]),
    ]


def test_builtin_mt_bench_has_both_turns_and_mt_bench_1_the_first():
    both, first = load_dataset("mt_bench"), load_dataset("mt_bench:1")
    assert len(both) == len(first) == 80
    assert all(len(c.messages) == 2 for c in both) and all(len(c.messages) == 1 for c in first)
    assert first_turns(both) == first_turns(first)


def test_a_bad_record_is_one_line_naming_file_line_and_problem(caplog):
    path = str(HERE / "bad.jsonl")
    with caplog.at_level(logging.WARNING, logger="specdraft.datasets"):
        convs = read_file(path, strict=False)
    assert [c.id for c in convs] == ["bad.jsonl:1", "bad.jsonl:6"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"{path}:2: not valid JSON (Expecting ',' delimiter); skipped",
        f"{path}:3: messages[0]: unknown role 'robot' (expected one of system, user, assistant); skipped",
        f"{path}:4: no user turn; skipped",
        f"{path}:5: no 'messages', 'conversations' or 'prompt' field; skipped",
        f"{path}: 4 records skipped, 2 read (--strict makes a bad record an error)",
    ]
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not valid JSON"):
        read_file(path, strict=True)


def test_a_json_file_reports_the_line_of_its_bad_record(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('[\n  {"prompt": "ok"},\n  {"conversations": [{"from": "bot", "value": "x"}]}\n]\n')
    with pytest.raises(ConfigError, match=r"c.json:3: conversations\[0\]: unknown from 'bot' \(expected one of human"):
        read_file(str(path), strict=True)
    path.write_text('[\n  {"prompt": "ok"},\n  {"prompt": \n]\n')
    with pytest.raises(ConfigError, match=r"c.json:4: not valid JSON"):  # spoils the whole file, strict or not
        read_file(str(path), strict=False)


def test_strict_eval_exits_2_on_a_bad_record_before_loading_a_model(capsys):
    assert main(["eval", "--datasets", str(HERE / "bad.jsonl"), "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"specdraft eval: error: {HERE / 'bad.jsonl'}:2: not valid JSON (Expecting ',' delimiter)"]
    assert main(["eval", "--datasets", "mt_bench,/nope/chats.jsonl"]) == 2
    assert "eval.datasets[1]: /nope/chats.jsonl: file not found" in capsys.readouterr().err


class CharTokenizer:
    """A chat template at toy size: per message a role token, its characters, an end token (vocab 128)."""

    ROLE = {"system": 1, "user": 2, "assistant": 3}

    def apply_chat_template(self, messages, add_generation_prompt=False, return_dict=True):
        ids = [t for m in messages for t in [self.ROLE[m["role"]], *(4 + ord(c) % 124 for c in m["content"]), 0]]
        return {"input_ids": ids + [3] * add_generation_prompt}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i - 4) for i in ids if i >= 4)


def test_each_turn_sees_the_targets_own_answers_never_the_files():
    tok = CharTokenizer()
    conv = read_file(str(HERE / "chats-openai.jsonl"), strict=True)[0]
    seen = []
    for turn, ids, context in turn_prompts(Config(), tok, conv):
        seen.append((turn, [m["role"] for m in context], ids))
        answered(context, tok, [4 + ord(c) for c in f"own answer {turn}"])
    assert [(t, roles) for t, roles, _ in seen] == [
        (1, ["system", "user"]),
        (2, ["system", "user", "assistant", "user"]),
    ]
    text = tok.decode(seen[1][2])
    assert "own answer 1" in text and "FILE ANSWER" not in text
    # a turn that leaves no room in the KV cache ends the conversation there
    long = Conversation("long", [{"role": "user", "content": "hi"}, {"role": "user", "content": "x" * 3000}])
    assert [t for t, _, _ in turn_prompts(Config(), tok, long)] == [1]


def test_a_drafter_trains_end_to_end_from_a_user_jsonl(tmp_path):
    """User JSONL (mixed formats) -> build_cache through a toy target -> train -> the held-out
    conversations, written back as heldout.jsonl, read as an eval dataset and scored."""
    lines, questions = [], {}
    for i in range(40):
        a = i % 7
        q, r = f"Count from {a} to {a + 5}.", " ".join(str(a + k) for k in range(6))
        questions[f"c{i}"] = q
        if i % 2:
            lines.append(
                {"id": f"c{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}
            )
        else:
            lines.append({"id": f"c{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": r}]})
    src = tmp_path / "mine.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"messages": []}\n')  # one bad record, skipped

    torch.manual_seed(0)
    args = ModelArgs(vocab_size=128, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128)
    target = TorchTarget(Transformer(args, 256).finalize())

    def features(ids):
        return target.prefill(ids), target.logits

    data = DataConfig(source=str(src), out_dir=str(tmp_path / "d"), topk=4, heldout_fraction=0.2, max_conversations=0)
    data.validate()
    convs = [(c.id, c.messages) for c in read_file(data.source, data.strict)]
    m = build_cache(iter(convs), CharTokenizer(), features, data, "toy")
    held = load_dataset(str(tmp_path / "d" / "heldout.jsonl"), strict=True)
    n_held = sum(s["conversations"] for s in m["shards"] if s["split"] == "heldout")
    assert len(held) == n_held > 0 and sum(s["conversations"] for s in m["shards"]) == 40
    assert all(c.messages[0] == {"role": "user", "content": questions[c.id]} for c in held)

    cfg = TrainConfig(data_dir=data.out_dir, out=str(tmp_path / "ck"), steps=20, conversations_per_step=2)
    cfg.model.n_heads, cfg.model.head_dim, cfg.model.intermediate_size, cfg.model.draft_vocab = 4, 16, 128, 64
    losses = []
    metrics = train(cfg, args, target.embedding, lambda m: losses.append(m["train_loss"]))
    assert metrics["train_loss"] < losses[0]
    assert (tmp_path / "ck" / "drafter.safetensors").is_file()
    assert evaluate_checkpoint(tmp_path / "ck", cfg, args, target.embedding)["conversations"] == n_held


@pytest.mark.model
def test_eval_on_files_and_both_mt_bench_turns_equals_plain_decoding(tmp_path, capsys):
    """T=0, one conversation per dataset: every turn's output equals plain decoding's; multi-turn
    datasets get per-turn rows in the table and per-turn summaries in the JSON."""
    files = [str(HERE / f) for f in ("chats-openai.jsonl", "prompts.jsonl")]
    out = tmp_path / "eval.json"
    args = ["eval", "--datasets", ",".join(["mt_bench", *files]), "--num-prompts", "1", "--max-new-tokens", "16"]
    assert main([*args, "--output", str(out)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    mt = report["datasets"]["mt_bench"]
    assert mt["exact_match"] and set(mt["turns"]) == {"1", "2"} and all(t["exact_match"] for t in mt["turns"].values())
    assert [o["turn"] for o in report["outputs"]["mt_bench"]] == [1, 2]
    assert set(report["datasets"][files[0]]["turns"]) == {"1", "2"} and "turns" not in report["datasets"][files[1]]
    assert all(s["exact_match"] for s in report["datasets"].values())
    rows = [line.split() for line in table.splitlines()]
    turn_rows = [r for r in rows if r[1:4] == ["mt_bench", "turn", "2"]]
    assert len(turn_rows) == 1 and turn_rows[0][-1] == "yes"


def toy_stream_setup(tmp_path):
    """The toy target, 80 counting conversations in a user JSONL, and a held-out set of its records 1-8."""
    lines = []
    for i in range(80):
        a = i % 7
        q, r = f"Count from {a} to {a + 5}.", " ".join(str(a + k) for k in range(6))
        lines.append({"id": f"c{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]})
    src = tmp_path / "mine.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=128, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128)
    target = TorchTarget(Transformer(args, 256).finalize())
    convs = [(c.id, c.messages) for c in read_file(str(src), True)]
    held = DataConfig(source=str(src), out_dir=str(tmp_path / "held"), topk=4, heldout_fraction=1, max_conversations=8)
    build_cache(iter(convs), CharTokenizer(), lambda ids: (target.prefill(ids), target.logits), held, "toy")
    return args, target, Stream(lambda: iter(convs), CharTokenizer(), target.teacher)


def test_the_batched_teacher_equals_one_prefill_per_conversation(tmp_path):
    args, target, _ = toy_stream_setup(tmp_path)
    tokens = torch.randint(0, 128, (3, 20))
    need = torch.rand(3, 20) > 0.5
    hidden, ids, probs = target.teacher(tokens, need, 4)
    for r in range(3):
        alone = target.prefill(tokens[r].tolist())
        assert torch.allclose(hidden[r], alone, atol=1e-5)
        top = target.logits(alone).softmax(-1).topk(4)
        assert torch.equal(ids[r][need[r]], top.indices[need[r]].int())
        assert torch.allclose(probs[r][need[r]].float(), top.values[need[r]], atol=1e-3)
        assert not probs[r][~need[r]].any()  # the LM head ran only where the loss reads it


def test_the_stream_skips_held_out_records_and_resumes_where_it_stopped(tmp_path):
    _, _, stream = toy_stream_setup(tmp_path)
    sc = StreamConfig(max_tokens=64, batch_tokens=128, chunk=6)
    excluded = heldout_records(tmp_path / "held", str(tmp_path / "mine.jsonl"))
    assert excluded == range(1, 9) and heldout_records(tmp_path / "held", "sharegpt") == range(0)
    assert [n for n, _, _ in tokenized(stream, sc, excluded, 0)] == list(range(9, 81))
    whole = list(stream_batches(stream, sc, excluded, {}, tmp_path / "cache", 0))
    assert all(sum(1 for _ in c) * max(len(x["tokens"]) for x in c) <= 128 for c, _ in whole)
    assert sum(len(c) for c, _ in whole) == 72  # every training conversation once
    for i in (2, 5):  # a run resumed from the cursor after batch i sees exactly the rest
        rest = list(stream_batches(stream, sc, excluded, whole[i][1], tmp_path / "cache", 0))
        assert tokens_of(rest) == tokens_of(whole[i + 1 :])


def tokens_of(batches) -> list[list[list[int]]]:
    return [[x["tokens"].tolist() for x in c] for c, _ in batches]


def test_later_epochs_read_the_teacher_cache_reshuffled_and_resume_inside_an_epoch(tmp_path):
    """Epoch 1 teacher-forces and caches; epochs 2 and 3 hold the same conversations with the teacher's
    features and top-k (bf16 / fp16 as stored), in another order each, without calling the teacher; a
    cursor inside epoch 2 resumes exactly; a cache bound leaves batches out of later epochs."""
    _, target, stream = toy_stream_setup(tmp_path)
    sc = StreamConfig(max_tokens=64, batch_tokens=128, chunk=6, epochs=3)
    excluded = range(1, 9)
    cache = tmp_path / "cache"
    runs = list(stream_batches(stream, sc, excluded, {}, cache, 0))
    epochs = [[b for b in runs if b[1]["epoch"] == e] for e in (1, 2, 3)]
    first = {tuple(x["tokens"].tolist()): x for c, _ in epochs[0] for x in c}  # the toy repeats conversations
    every = sorted(tuple(x["tokens"].tolist()) for c, _ in epochs[0] for x in c)
    assert len(every) == 72 and all(len(e) > 0 for e in epochs)
    orders = []
    for e in epochs[1:]:
        convs = [x for c, _ in e for x in c]
        orders.append([tuple(x["tokens"].tolist()) for x in convs])
        assert sorted(orders[-1]) == every  # every conversation once per epoch
        for x in convs:
            y = first[tuple(x["tokens"].tolist())]
            assert torch.allclose(x["hidden"].float(), y["hidden"].float(), atol=0.05, rtol=0.01)
            m = y["loss_mask"]
            assert torch.equal(x["loss_mask"], m) and torch.equal(x["topk_ids"][m].long(), y["topk_ids"][m].long())
            assert torch.allclose(x["topk_probs"][m].float(), y["topk_probs"][m].float(), atol=1e-3)
    assert orders[0] != orders[1]

    def no_teacher(*_):
        raise AssertionError("a later epoch called the teacher")

    cold = Stream(stream.conversations, stream.tokenizer, no_teacher)
    i = len(epochs[0]) + 3  # the cursor after epoch 2's 4th batch
    assert tokens_of(list(stream_batches(cold, sc, excluded, runs[i][1], cache, 0))) == tokens_of(runs[i + 1 :])

    small = tmp_path / "small"  # room for the first two batches' files: later epochs read what fitted
    bound = sum(f.stat().st_size for f in sorted(cache.glob("*.safetensors"))[:2]) / 1e9
    runs = list(stream_batches(stream, replace(sc, cache_gb=bound), excluded, {}, small, 0))
    assert len(list(small.glob("*.safetensors"))) == 2
    assert sum(len(c) for c, cur in runs if cur["epoch"] == 2) == sum(len(c) for c, _ in epochs[0][:2])


def test_a_drafter_trains_by_streaming_teacher_forcing_and_publishes_improvements(tmp_path):
    args, target, stream = toy_stream_setup(tmp_path)
    cfg = TrainConfig(
        data="stream",
        stream=StreamConfig(str(tmp_path / "mine.jsonl"), 64, 128, chunk=8, topk=4, vocab_conversations=20),
        heldout_dir=str(tmp_path / "held"),
        out=str(tmp_path / "ck"),
        publish=str(tmp_path / "pub"),
        baseline_out=str(tmp_path / "eagle"),
        steps=12,
        eval_every=4,
        warmup=2,
        lr=3e-3,
    )
    cfg.model.n_heads, cfg.model.head_dim, cfg.model.intermediate_size, cfg.model.draft_vocab = 4, 16, 128, 64
    losses = []
    metrics = train(cfg, args, target.embedding, lambda m: losses.append(m["train_loss"]), stream)
    assert metrics["train_loss"] < losses[0] and metrics["tokens"] > 0
    curve = [json.loads(line) for line in (tmp_path / "ck" / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in curve] == [4, 8, 12] and all("eagle" in p for p in curve)
    published = json.loads((tmp_path / "pub" / "config.json").read_text())
    best = max(p["specblock"]["tau_chain"] for p in curve)
    assert published["metrics"]["heldout"]["tau_chain"] == best  # only an improvement is published
    assert published["data"]["tokens"] <= metrics["tokens"] and published["data"]["cursor"]["record"] > 8
    # a later run goes on from the published drafter's cursor, on data it has not seen
    more = replace(cfg, init=str(tmp_path / "pub"), out=str(tmp_path / "ck2"), baseline_out="", steps=2, eval_every=2)
    again = train(more, args, target.embedding, None, stream)
    assert again["tokens"] > published["data"]["tokens"]
    # another source (the target's replies, say) for two epochs: the cursor starts afresh, the tokens seen
    # go on, epoch 2 comes from the teacher cache, and a second held-out set is reported beside the first
    other = tmp_path / "other.jsonl"
    other.write_text("".join(line for line in (tmp_path / "mine.jsonl").read_text().splitlines(True)[8:40]))
    two = replace(
        more,
        stream=replace(more.stream, source=str(other), epochs=2),
        heldout_also=[str(tmp_path / "held")],
        companions=[
            CompanionConfig(init=str(tmp_path / "pub"), out=str(tmp_path / "side"), publish=str(tmp_path / "p2"))
        ],
        out=str(tmp_path / "ck3"),
        steps=40,
        eval_every=3,
    )
    seen = []
    last = train(
        two,
        args,
        target.embedding,
        lambda m: seen.append((m["epoch"], m["tokens"])),
        stream._replace(conversations=source_conversations(str(other), True)),
    )
    assert [e for e, _ in seen][0] == 1 and seen[-1][0] == 2 and last["step"] < 40  # two epochs, then no more data
    assert seen[0][1] > published["data"]["tokens"]
    assert list((tmp_path / "ck3" / "teacher-cache").glob("*.safetensors"))
    point = json.loads((tmp_path / "ck3" / "curve.jsonl").read_text().splitlines()[0])
    assert point["specblock"]["also"][str(tmp_path / "held")]["top1"] == point["specblock"]["top1"]  # same set
    # the companion trained on the same batches: its own checkpoints, curve entries and publication
    assert "side" in point and (tmp_path / "side" / "state.pt").is_file() and (tmp_path / "p2").is_dir()


def test_deep_huge_and_overlong_records_are_one_line_each(tmp_path, caplog):
    """Issue 24, case 4: a record nested 100k levels (a RecursionError traceback), a 5,000-digit integer
    (a ValueError traceback) and a 2 MB line (RSS past 12 GB at 200 MB) are bad records like any other:
    skipped with one line `file:line: problem`, or exit 2 under --strict."""
    from specdraft.datasets import MAX_RECORD_BYTES

    path = tmp_path / "hostile.jsonl"
    big = json.dumps({"prompt": "x" * (2 * MAX_RECORD_BYTES)})
    path.write_text(
        "\n".join(["[" * 100_000 + "]" * 100_000, '{"prompt": "hi", "n": ' + "9" * 5000 + "}", big, '{"prompt": "ok"}'])
    )
    with caplog.at_level(logging.WARNING, logger="specdraft.datasets"):
        convs = read_file(str(path), strict=False)
    assert [c.id for c in convs] == ["hostile.jsonl:4"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}:1: not readable JSON (nested too deeply); skipped",
        f"{path}:2: not readable JSON (Exceeds the limit (4300 digits) for integer string conversion: value has "
        "5000 digits); skipped",
        f"{path}:3: a record of more than {MAX_RECORD_BYTES} bytes; skipped",
        f"{path}: 3 records skipped, 1 read (--strict makes a bad record an error)",
    ]
    with pytest.raises(ConfigError, match=r"hostile.jsonl:1: not readable JSON \(nested too deeply\)$"):
        read_file(str(path), strict=True)
    doc = tmp_path / "hostile.json"  # a JSON list: unreadable JSON spoils the whole file
    doc.write_text("[" + "[" * 100_000 + "]" * 100_000 + "]")
    with pytest.raises(ConfigError, match=r"hostile.json: not readable JSON \(nested too deeply\)$"):
        read_file(str(doc), strict=False)
    doc.write_text(f'[\n{{"prompt": "ok"}},\n{big}\n]')
    with pytest.raises(ConfigError, match=rf"hostile.json:3: a record of more than {MAX_RECORD_BYTES} bytes$"):
        read_file(str(doc), strict=True)


def test_an_eval_with_no_usable_record_exits_2_with_one_line(tmp_path, capsys):
    """Every record skipped ended in `max() arg is an empty sequence` from the table printer."""
    path = tmp_path / "none.jsonl"
    path.write_text('{"prompt": 1}\n{"messages": []}\n')
    assert main(["eval", "--datasets", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"specdraft eval: error: {path}: no usable record (2 skipped)", err
    assert "Traceback" not in "\n".join(err)


def test_no_training_source_holds_an_evaluation_prompt(tmp_path):
    """The packaged ShareGPT set holds no MT-Bench turn or HumanEval stub (first 80 characters); any source
    read for training or reply generation (a file, a glob of shards) passes a conversation that does as
    (id, None), its record number kept, and the rest unchanged."""
    keys = eval_prompt_keys()
    assert len(keys) == 324  # 80 MT-Bench questions x 2 turns, 164 HumanEval stubs
    records = sharegpt_conversations(read_sharegpt(package_file(*SHAREGPT)))  # unfiltered
    assert not [cid for cid, msgs in records if msgs is not None and holds_eval_prompt(msgs, keys)]
    mt = load_dataset("mt_bench")[3].messages[1]["content"]  # a second turn, inside other text
    stub = load_dataset("humaneval")[7].messages[0]["content"].split("```python\n")[1]
    lines = [
        {"id": "fine", "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]},
        {
            "id": "mt",
            "messages": [{"role": "user", "content": f"Please:   {mt}"}, {"role": "assistant", "content": "x"}],
        },
        {"id": "he", "messages": [{"role": "user", "content": stub[:100]}, {"role": "assistant", "content": "y"}]},
        {"id": "reply", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": mt}]},
    ]
    short = next(k for k in keys if len(k) < 40)  # a short follow-up turn is an eval prompt only as a whole turn
    assert holds_eval_prompt([{"role": "user", "content": f" {short}\n"}], keys)
    assert not holds_eval_prompt([{"role": "user", "content": f"About my essay. {short}"}], keys)
    for i, name in enumerate(("train-00000.jsonl", "train-00001.jsonl")):
        (tmp_path / name).write_text("".join(json.dumps(x) + "\n" for x in lines[2 * i : 2 * i + 2]))
    (tmp_path / "train-00002.jsonl").write_text("")  # a batch with nothing in this split
    for source in (str(tmp_path / "train-0000*.jsonl"), str(tmp_path / "train-00000.jsonl")):
        got = list(source_conversations(source, True)())
        assert [(cid, msgs is None) for cid, msgs in got][:2] == [("fine", False), ("mt", True)]
    got = dict(source_conversations(str(tmp_path / "train-*.jsonl"), True)())
    # an assistant turn may quote anything: only user turns are prompts
    assert got["he"] is None and got["reply"] == lines[3]["messages"] and got["fine"] == lines[0]["messages"]
