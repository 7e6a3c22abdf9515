"""Losslessness of the verification rules.

Exact test: for a tiny vocabulary we enumerate every vector of per-node target choices (each node's
choice is an independent draw from its own target distribution, which is what `verify` draws), apply
the walk, complete the sequence with plain sampling, and require the distribution of the first D tokens
to equal the target's to 1e-12. Statistical test: the full decode loop on a fake target, many seeded
runs, chi-square against the exact target distribution; a deliberately biased rule must fail it."""

import itertools
import math

import pytest
import torch

from proto.tree import DraftTree
from tests.fakes import FakeTarget, FixedTreeDrafter
from tests.stats import PROMPT, V, chi_square_p_value, empirical, exact_distribution, probs_after, seq_prob
from verifier.engine import generate
from verifier.rules import SamplingParams, Verdict, follow, target_probs, verify, walk

TREES = [
    ([0], [-1]),
    ([0, 1, 2, 0], [-1, -1, 0, 1]),
    ([1, 1, 0, 2, 1], [-1, -1, 0, 1, 2]),  # duplicate root tokens: the first one must be taken
    ([2, 0, 1, 1, 0], [-1, 0, 1, 2, 3]),  # a chain of depth 5
]
PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=2),
    SamplingParams(temperature=1.3, top_p=0.6),
]


@pytest.mark.parametrize("tokens,parents", TREES)
@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_walk_with_independent_node_samples_is_exactly_lossless(tokens, parents, params):
    tree = DraftTree(tokens, parents, V, 8)
    context = [1, 0]
    rows = [context] + [context + tree.path_tokens(path_of(tree, i)) for i in range(len(tree))]
    p = [probs_after(r, params) for r in rows]  # [N+1] target distributions
    D = tree.depth + 2
    got: dict[tuple, float] = {}
    for choice in itertools.product(range(V), repeat=len(rows)):
        w = math.prod(p[i][c] for i, c in enumerate(choice))
        if w == 0:
            continue
        accepted, bonus = walk(tree, follow(tree, choice.__getitem__))
        emitted = tree.path_tokens(accepted) + [bonus]
        for rest in itertools.product(range(V), repeat=D - len(emitted)):
            seq = tuple(emitted) + rest
            got[seq] = got.get(seq, 0.0) + w * seq_prob(context + emitted, rest, params)
    for seq in itertools.product(range(V), repeat=D):
        assert got.get(seq, 0.0) == pytest.approx(seq_prob(context, seq, params), abs=1e-12), seq


def path_of(tree, i):
    path = []
    while i >= 0:
        path.append(i)
        i = tree.parents[i]
    return path[::-1]


def test_greedy_follows_argmax_and_takes_the_bonus_token():
    tree = DraftTree([4, 2, 3, 1], [-1, -1, 1, 2], 5, 8)
    logits = torch.full((5, 5), -1.0)
    for row, best in enumerate([2, 0, 3, 0, 4]):  # after root: 2 -> node 1; after node 1: 3 -> node 2; ...
        logits[row, best] = 1.0
    visited = []
    v = verify(lambda r: visited.append(r) or logits[r], tree, SamplingParams(), None)
    assert v.accepted == [1, 2] and v.bonus == 0
    assert visited == [0, 2, 3]  # the LM head is needed only along the walk
    # feedback covers nodes whose parent row was evaluated: roots 0, 1 and children 2 (of 1), 3 (of 2)
    assert set(v.target_probs) == {0, 1, 2, 3}
    assert v.target_probs[1] == pytest.approx(torch.softmax(logits[0], 0)[2].item())


def test_greedy_rejects_everything_when_root_token_differs():
    tree = DraftTree([1, 2], [-1, 0], 5, 8)
    logits = torch.zeros(3, 5)
    logits[0, 3] = 5.0
    v = verify(logits.__getitem__, tree, SamplingParams(), None)
    assert v.accepted == [] and v.bonus == 3 and set(v.target_probs) == {0}


def test_top_k_top_p_match_plain_sampling_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    p = target_probs(logits, SamplingParams(temperature=1.0, top_k=2))[0]
    assert (p[2:] == 0).all() and p[:2].sum() == pytest.approx(1.0)
    full = logits.softmax(-1)[0]
    p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))[0]
    keep = int((full.cumsum(0) - full < 0.8).sum())  # smallest prefix with mass >= 0.8
    assert (p[keep:] == 0).all() and (p[:keep] > 0).all()


# ---- statistical test of the whole decode loop --------------------------------------------------

# node 0 and 1 are duplicate roots, so the test also covers the first-match rule inside the loop
TREE_TOKENS, TREE_PARENTS = [0, 0, 1, 2, 1, 0], [-1, -1, 0, 0, 2, 4]


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_p=0.9)], ids=["T1", "T0.8-p0.9"]
)
def test_decode_loop_sampling_matches_target_distribution(params):
    counts = empirical(lambda seed: FixedTreeDrafter(TREE_TOKENS, TREE_PARENTS), params)
    # 81 cells, 12k runs: a shift of 0.02 in total variation gives chi-square far above this threshold
    assert chi_square_p_value(counts, exact_distribution(params)) > 1e-4


def test_statistical_test_has_power_against_a_biased_rule(monkeypatch):
    """Control: a rule that accepts a drafted root whenever the target gives it >= 25% probability
    (a classic non-lossless shortcut) must be rejected by the same test."""
    import verifier.engine as engine

    def biased(row_logits, tree, params, generator, rule):
        v = verify(row_logits, tree, params, generator, rule)
        if tree is not None and not v.accepted and v.target_probs[0] >= 0.25:
            return Verdict([0], int(row_logits(1).argmax()), v.target_probs)
        return v

    monkeypatch.setattr(engine, "verify", biased)
    params = SamplingParams(temperature=1.0)
    counts = empirical(lambda seed: FixedTreeDrafter(TREE_TOKENS, TREE_PARENTS), params)
    assert chi_square_p_value(counts, exact_distribution(params)) < 1e-6


def test_feedback_carries_the_target_top_k_of_every_visited_row():
    class Recorder(FixedTreeDrafter):
        def draft(self, update):
            self.feedback.append(update.feedback)
            return super().draft(update)

    drafter = Recorder(TREE_TOKENS, TREE_PARENTS)
    drafter.feedback = []
    params = SamplingParams(temperature=1.0, seed=3)
    list(generate(FakeTarget(V), PROMPT, params, 12, set(), drafter, max_nodes=8, feedback_topk=2))
    fbs = [f for f in drafter.feedback if f is not None]
    assert fbs
    for fb in fbs:
        # rows visited = the roots' parent (-1) and every accepted node; top-2 in descending order
        assert set(fb.target_topk) == {-1, *fb.accepted}
        for tokens, probs in fb.target_topk.values():
            assert len(tokens) == 2 and probs[0] >= probs[1] > 0
        tokens, probs = fb.target_topk[-1]
        for node in (0, 1):  # root nodes carry token 0: its probability is the one in target_probs
            if 0 in tokens:
                assert fb.target_probs[node] == pytest.approx(probs[tokens.index(0)])
