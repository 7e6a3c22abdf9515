"""The decode loop on the real target at temperature 0: speculative output equals plain greedy
decoding token for token, whatever the drafter proposes."""

import inspect
import random
from pathlib import Path

import pytest
import torch

from drafter.data import chat_prompt
from drafter.ngram import NgramConfig, NgramDrafter
from drafter.synthetic import RandomDrafter
from proto.tree import DraftTree
from verifier.engine import generate
from verifier.rules import SamplingParams

pytestmark = pytest.mark.model

MESSAGES = [
    "Write a Python function that checks whether a number is prime.",
    "Compose an engaging travel blog post about a recent trip to Hawaii.",
    "Explain the difference between a list and a tuple in Python, with examples.",
]
GREEDY = SamplingParams()


class OracleDrafter:
    """Fake drafter that knows the AR output: drafts its next `depth` tokens as a chain plus a wrong
    sibling at every level, so long paths are accepted and rejected branches sit between them."""

    def __init__(self, reference, depth=6):
        self.ref, self.n, self.depth = reference, 0, depth  # n = tokens committed so far
        self.rng = random.Random(0)

    def draft(self, update):
        self.n += len(update.new_tokens)
        nxt = self.ref[self.n : self.n + self.depth]
        if not nxt:
            return None
        tokens, parents, last = [], [], -1
        for tok in nxt[: update.max_nodes // 2]:
            tokens += [(tok + 1 + self.rng.randrange(100)) % update.vocab_size, tok]  # wrong sibling first
            parents += [last, last]
            last = len(tokens) - 1
        return DraftTree(tokens, parents, update.vocab_size, update.max_nodes) if tokens else None

    def close(self):
        pass


def run(target, prompt, drafter, max_new=48, stops=frozenset({2}), max_nodes=12):
    return [t for s in generate(target, prompt, GREEDY, max_new, set(stops), drafter, max_nodes) for t in s.tokens]


@pytest.fixture(scope="module")
def prompts_and_ar(target_fp32, tokenizer):
    out = []
    for text in MESSAGES:
        ids = chat_prompt(tokenizer, text)
        out.append((ids, run(target_fp32, ids, None)))
    return out


def untrained_specblock(target):
    """A SpecBlock drafter with random weights on the real target's embedding: real trees from the real
    code path (hidden states, blocks, inheritance), mostly rejected."""
    from drafter.specblock import SpecBlock, SpecBlockConfig
    from drafter.specblock_draft import SpecBlockDraftConfig, SpecBlockDrafter

    torch.manual_seed(0)
    model = SpecBlock(
        SpecBlockConfig(n_layers=1, draft_vocab=4096),
        target.args,
        target.embedding,
        torch.arange(4096),
    ).eval()
    return SpecBlockDrafter(model, SpecBlockDraftConfig(max_blocks=3))


@pytest.mark.parametrize("kind", ["ngram", "oracle", "random", "specblock"])
def test_greedy_speculative_equals_ar_token_for_token(kind, target_fp32, prompts_and_ar):
    for ids, ar in prompts_and_ar[:1] if kind == "specblock" else prompts_and_ar:  # specblock: slow untrained
        drafter = {
            "ngram": lambda: NgramDrafter(NgramConfig()),
            "oracle": lambda: OracleDrafter(ids + ar),
            "random": lambda: RandomDrafter(seed=1),  # random trees: nearly all rejected, output unchanged
            "specblock": lambda: untrained_specblock(target_fp32),
        }[kind]()
        assert run(target_fp32, ids, drafter) == ar


def test_the_default_configs_drafter_equals_ar_token_for_token(target_fp32, prompts_and_ar):
    """configs/default.yaml's drafter (the hybrid with its arms' bandit on, the committed SpecBlock), its
    sessions sharing the suffix cache and the client's arm tallies as a sidecar's do."""
    from specdraft.build import Shared, load_drafter_model, make_drafter
    from specdraft.config import load_config

    cfg = load_config(Path(__file__).parents[2] / "configs" / "default.yaml", "eval").drafter
    model = load_drafter_model(cfg, target_fp32.args, target_fp32.embedding)
    shared = Shared(cfg)
    for i, (ids, ar) in enumerate(prompts_and_ar):
        drafter = make_drafter(cfg, model, shared, f"test/{i}")
        assert run(target_fp32, ids, drafter, max_nodes=cfg.max_nodes) == ar
        drafter.close()
    assert cfg.arms.choose and sum(shared.arms.pulled) > 0


def test_oracle_drafts_are_accepted_in_long_runs(target_fp32, prompts_and_ar):
    ids, ar = prompts_and_ar[0]
    steps = list(generate(target_fp32, ids, GREEDY, 48, {2}, OracleDrafter(ids + ar), 12))
    assert max(s.accepted for s in steps) == 6  # the whole drafted chain
    assert len(steps) < len(ar) / 3


def test_stop_token_inside_an_accepted_path_ends_generation_like_ar(target_fp32, prompts_and_ar):
    ids, ar = prompts_and_ar[1]
    stop = ar[10]  # a token the oracle will draft mid-chain
    expected = ar[: ar.index(stop) + 1]
    assert run(target_fp32, ids, None, stops={stop}) == expected
    assert run(target_fp32, ids, OracleDrafter(ids + ar), stops={stop}) == expected


def test_generation_streams_steps(target_fp32, prompts_and_ar):
    ids, ar = prompts_and_ar[0]
    stream = generate(target_fp32, ids, GREEDY, 48, {2}, NgramDrafter(NgramConfig()))
    assert inspect.isgenerator(stream)
    first = next(stream)  # available before the rest is decoded
    assert first.tokens == ar[:1] and first.tree_nodes == 0
    assert first.tokens + [t for s in stream for t in s.tokens] == ar


class RecordingDrafter:
    """Wraps a drafter and records every update it receives."""

    def __init__(self, inner):
        self.inner, self.updates = inner, []

    def draft(self, update):
        self.updates.append(update)
        return self.inner.draft(update)

    def close(self):
        pass


def test_drafter_receives_hidden_states_of_every_committed_token_but_the_newest(target_fp32, prompts_and_ar):
    ids, ar = prompts_and_ar[0]
    rec = RecordingDrafter(OracleDrafter(ids + ar))  # long accepted paths: rows of accepted nodes are covered
    out = run(target_fp32, ids, rec, max_new=24)
    hidden = [u.hidden for u in rec.updates]
    tokens = [t for u in rec.updates for t in u.new_tokens]
    assert tokens == (ids + out)[: len(tokens)]
    assert sum(h.shape[0] for h in hidden) == len(tokens) - 1  # every token but the newest
    assert all(h.shape[0] == len(u.new_tokens) - (i == 0) for i, (h, u) in enumerate(zip(hidden, rec.updates)))
    seq = tokens[:-1]
    ref = target_fp32.prefill(seq)  # the same tokens read in one plain prefill
    assert (torch.cat(hidden) - ref).abs().max() < 1e-3
    # every verdict says what verifying its tree cost (the arms' reward): milliseconds, measured
    assert all(0 < u.feedback.verify_ms < 60_000 for u in rec.updates[1:])
