"""The sampled-tree rules on the real target with the committed SpecBlock drafter, at temperature 1.

One context (a chat prompt plus its greedy first token, pending), many verification steps: each draws a
fresh sampled tree (a 1-token path, then 2 i.i.d. continuations of 1 token: one sibling group below a
sampled node), verifies it with the rule
and records the first two emitted tokens (the second drawn from the target when the step emits one).
Their empirical joint distribution must match the target's, p(x1) p(x2 | x1), by a chi-square over the
most likely pairs (the rest pooled), p-value > 1e-4, 1200 steps per rule. Power: a rule that accepts
every drafted root, i.e. emits the drafter's q instead of p, fails the same test (500 steps).

Target rows are cached per token path (the tree's rows are the target's distributions after each path),
so a step costs one drafter call plus the rule, not a tree forward."""

import functools
from pathlib import Path

import pytest
import torch

from drafter.data import chat_prompt
from drafter.specblock import load_specblock
from drafter.specblock_draft import SpecBlockDraftConfig, SpecBlockDrafter
from proto.interface import SamplingParams, VerifierUpdate
from proto.tree import DraftTree
from tests.stats import chi_square_p_value
from verifier.rules import SAMPLED_TREE_RULES, Verdict, target_probs, verify

pytestmark = pytest.mark.model
CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "specblock-smollm2"
PARAMS = SamplingParams(temperature=1.0)
STEPS = 1200
TOP = 6  # pairs (x1, x2) with x1 among p's top 6 and x2 among the top 6 after it; the rest pooled per x1


@pytest.fixture(scope="module")
def setting(target_fp32, tokenizer):
    ids = chat_prompt(tokenizer, "Write one sentence about the sea.")
    target = target_fp32
    states = target.prefill(ids)
    pending = int(target.logits(states[-1:])[0].argmax())
    model = load_specblock(CHECKPOINT, target.args, target.embedding)
    drafter = SpecBlockDrafter(model, SpecBlockDraftConfig(tree="sampled", delay=1, branches=2, rollout=1))
    first = drafter.draft(VerifierUpdate(ids + [pending], None, 3, target.vocab_size, states, PARAMS))
    assert first is not None and first.draft_probs is not None

    @functools.cache
    def logits_after(path: tuple) -> torch.Tensor:
        """Target logits [V] after the committed context, the pending token and `path`."""
        tree = DraftTree(path, tuple(range(-1, len(path) - 1)), target.vocab_size, len(path)) if path else None
        return target.logits(target.verify_forward(pending, tree)[-1:])[0]

    def probs_after(path: tuple) -> torch.Tensor:
        return target_probs(logits_after(path)[None], PARAMS)[0].double()

    def new_tree() -> DraftTree:  # no new tokens: a fresh tree from the same context
        return drafter.draft(VerifierUpdate([], None, 3, target.vocab_size, states[:0], PARAMS))

    return logits_after, probs_after, new_tree


def cells(probs_after):
    """The chi-square cells and their exact probabilities: (x1, x2), (x1, None) = the rest after x1,
    (None, None) = any other x1."""
    p1 = probs_after(())
    exact = {}
    for x1 in p1.topk(TOP).indices.tolist():
        p2 = probs_after((x1,))
        top2 = p2.topk(TOP).indices.tolist()
        for x2 in top2:
            exact[(x1, x2)] = float(p1[x1] * p2[x2])
        exact[(x1, None)] = float(p1[x1] * (1 - p2[top2].sum()))
    exact[(None, None)] = 1.0 - sum(exact.values())
    return exact


def empirical(rule_fn, setting, seed: int, steps: int = STEPS) -> dict:
    logits_after, probs_after, new_tree = setting
    exact = cells(probs_after)
    gen = torch.Generator().manual_seed(seed)
    counts = {}
    for _ in range(steps):
        tree = new_tree()
        paths = [()]
        for tok, par in zip(tree.tokens, tree.parents):
            paths.append(paths[par + 1] + (tok,))
        verdict = rule_fn(lambda row: logits_after(paths[row]), tree, gen)
        out = [tree.tokens[i] for i in verdict.accepted] + [verdict.bonus]
        if len(out) == 1:  # the next step's token: the target's own draw after x1
            out.append(int(torch.multinomial(probs_after((out[0],)), 1, generator=gen)))
        x1, x2 = out[:2]
        cell = (x1, x2) if (x1, x2) in exact else (x1, None) if (x1, None) in exact else (None, None)
        counts[cell] = counts.get(cell, 0) + 1
    return counts, exact


@pytest.mark.parametrize("rule", SAMPLED_TREE_RULES)
def test_first_emitted_tokens_follow_the_target_distribution(rule, setting):
    counts, exact = empirical(lambda rows, tree, gen: verify(rows, tree, PARAMS, gen, rule), setting, seed=1)
    assert chi_square_p_value(counts, exact) > 1e-4, counts


def test_the_check_rejects_a_rule_that_emits_the_drafters_distribution(setting):
    def accept_root(rows, tree, gen):  # keep the first root whatever the target says: its token follows q
        return Verdict([0], int(torch.multinomial(target_probs(rows(1)[None], PARAMS)[0], 1, generator=gen)), {})

    counts, exact = empirical(accept_root, setting, seed=2, steps=500)  # far off: 500 steps show it
    assert chi_square_p_value(counts, exact) < 1e-4
