"""Losslessness of the sampled-tree rules (SpecInfer, SpecTr K-SEQ, Traversal) on sampled trees.

Exact: on a 3-4 token vocabulary every tuple of i.i.d. candidates is enumerated with its probability
under q, and the rule's plan (acceptance per candidate, residual) gives the exact output distribution,
which must equal p to 1e-12, for adversarial q (disjoint support, q = p, one-hot) and k = 1..4; then the
same for whole depth-2 and depth-3 trees, fresh subtrees under every accepted child, duplicate tokens
among siblings included. Closed forms: at k = 1 both rules accept with probability Σ min(p, q); K-SEQ
accepts at least as often as single draft. Traversal is not a per-node plan (it decides leaf to root), so
its trees are enumerated whole, and for each tree every run of its coins (j rejections, then an
acceptance) with its probability; on chains it keeps at least as many tokens as token-level SpecInfer.
Statistical: the real decode loop with a fake sampled drafter."""

import itertools
import math

import pytest
import torch

from proto.tree import DraftTree
from tests.fakes import FakeSampledDrafter, fake_draft_probs
from tests.stats import V, chi_square_p_value, empirical, exact_distribution, probs_after, seq_prob
from verifier.rules import (
    SAMPLED_TREE_RULES,
    SamplingParams,
    multi_draft_plan,
    spectr_rho,
    traverse,
    verify,
)


def T(values):
    return torch.tensor(values, dtype=torch.float64)


CASES = {
    "generic": (T([0.5, 0.3, 0.15, 0.05]), T([0.1, 0.2, 0.3, 0.4])),
    "disjoint": (T([0.6, 0.4, 0.0, 0.0]), T([0.0, 0.0, 0.7, 0.3])),
    "q=p": (T([0.4, 0.3, 0.2, 0.1]), T([0.4, 0.3, 0.2, 0.1])),
    "one-hot q": (T([0.25, 0.25, 0.25, 0.25]), T([0.0, 1.0, 0.0, 0.0])),
    "one-hot p": (T([0.0, 0.0, 1.0, 0.0]), T([0.3, 0.3, 0.2, 0.2])),
    "peaked": (T([0.97, 0.01, 0.01, 0.01]), T([0.01, 0.01, 0.01, 0.97])),
}


def traversal_outcomes(tree, p_row):
    """Every way one traversal of `tree` can end: [(accepted nodes, bonus distribution, probability)].
    The traversal stops at its first kept node, so its coin runs are j rejections then one acceptance,
    or rejections only (the root, which flips no coin, emits); a coin of probability 1 cannot reject."""
    out, j = [], 0
    while True:
        calls = []

        def coin(a):
            calls.append(a)
            return a >= 1.0 or len(calls) == j + 1

        accepted, bonus = traverse(tree, p_row, coin)
        if not accepted:  # every coin rejected
            out.append((accepted, bonus, math.prod(1 - a for a in calls)))
            return out
        if len(calls) < j + 1:  # a certain coin accepted before the j-th rejection
            return out
        w = math.prod(1 - a for a in calls[:-1]) * calls[-1]
        if w > 0:  # a coin of probability 0 was forced: the run cannot happen (and its bonus may be 0/0)
            out.append((accepted, bonus, w))
        j += 1


def output_and_acceptance(p, q, k, rule):
    """Exact distribution of the emitted token [V] and the probability that a candidate is accepted."""
    p, q = p.double(), q.double()
    out, accepted = torch.zeros_like(p), 0.0
    for drafts in itertools.product(range(len(p)), repeat=k):
        w = math.prod(float(q[x]) for x in drafts)
        if w == 0:
            continue
        if rule == "traversal":  # a one-level tree: its leaves' bonus rows do not matter here
            tree = DraftTree(drafts, [-1] * k, len(p), k, torch.stack([q] * (k + 1)))
            for nodes, bonus, pr in traversal_outcomes(tree, lambda row: p if row == 0 else q):
                if nodes:
                    out[drafts[nodes[0]]] += w * pr
                    accepted += w * pr
                else:
                    out += w * pr * bonus
            continue
        accept, residual = multi_draft_plan(p, q, list(drafts), rule)
        reach = w
        for x, a in zip(drafts, accept):
            out[x] += reach * a
            accepted += reach * a
            reach *= 1 - a
        out += reach * residual
    return out, accepted


@pytest.mark.parametrize("rule", SAMPLED_TREE_RULES)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("case", CASES)
def test_one_sibling_group_emits_exactly_p(rule, k, case):
    p, q = CASES[case]
    out, _ = output_and_acceptance(p, q, k, rule)
    assert torch.allclose(out, p.double(), atol=1e-12), (out, p)


@pytest.mark.parametrize("rule", SAMPLED_TREE_RULES)
@pytest.mark.parametrize("case", CASES)
def test_single_draft_acceptance_is_one_minus_total_variation(rule, case):
    p, q = CASES[case]
    _, acc = output_and_acceptance(p, q, 1, rule)
    assert acc == pytest.approx(float(torch.minimum(p, q).double().sum()), abs=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("case", CASES)
def test_kseq_accepts_at_least_as_often_as_single_draft_and_rho_is_valid(k, case):
    p, q = (t.double() for t in CASES[case])
    _, single = output_and_acceptance(p, q, 1, "spectr")
    _, kseq = output_and_acceptance(p, q, k, "spectr")
    rho = spectr_rho(p, q, k)
    beta = float(torch.minimum(q, p / rho).sum())
    assert 1.0 <= rho <= k and 1 - (1 - beta) ** k <= rho * beta + 1e-15
    assert kseq >= single - 1e-6  # ρ is searched to ~1e-7: γ may fall short of γ(ρ*) by that much
    assert kseq == pytest.approx(1 - (1 - beta) ** k, abs=1e-12)  # the closed form γ(ρ)


def q_after(context):
    q = fake_draft_probs(tuple(context), V).double()
    return tuple((q / q.sum()).tolist())  # renormalised in float64, as probs_after is


def sampled_trees(context, branching):
    """Every sampled tree with `branching[d]` i.i.d. children per node at depth d below `context`, with
    its probability under q: [(tokens, parents, q row per node, probability)], nodes in pre-order."""
    if not branching:
        return [((), (), (), 1.0)]
    q = q_after(context)
    out = []
    for drafts in itertools.product(range(V), repeat=branching[0]):
        if math.prod(q[x] for x in drafts) == 0:
            continue
        for subs in itertools.product(*[sampled_trees(list(context) + [x], branching[1:]) for x in drafts]):
            tokens, parents, rows, w = [], [], [], 1.0
            for x, (st, sp, sr, sw) in zip(drafts, subs):
                me = len(tokens)
                tokens.append(x)
                parents.append(-1)
                rows.append(q_after(list(context) + [x]))
                tokens += st
                parents += [me if par < 0 else par + me + 1 for par in sp]
                rows += sr
                w *= q[x] * sw
            out.append((tuple(tokens), tuple(parents), tuple(rows), w))
    return out


def traversal_tree_output(context, branching, params):
    """tree_output for Traversal: every whole tree, every way its traversal ends."""
    out: dict[tuple, float] = {}
    for tokens, parents, rows, w in sampled_trees(context, branching):
        tree = DraftTree(tokens, parents, V, len(tokens), torch.tensor((q_after(context),) + rows, dtype=torch.float64))
        paths = [tuple(context)]  # row -> the context after that row's node
        for tok, par in zip(tokens, parents):
            paths.append(paths[par + 1] + (tok,))

        def p_row(row):
            return torch.tensor(probs_after(paths[row], params), dtype=torch.float64)

        for nodes, bonus, pr in traversal_outcomes(tree, p_row):
            for y in range(V):
                seq = tuple(tokens[i] for i in nodes) + (y,)
                out[seq] = out.get(seq, 0.0) + w * pr * float(bonus[y])
    return out


def tree_output(context, branching, rule, params):
    """Exact distribution of the tokens one verification step emits for a random sampled tree of the
    given branching per depth below `context`: {emitted tuple: probability}."""
    if rule == "traversal":
        return traversal_tree_output(context, branching, params)
    p = torch.tensor(probs_after(context, params), dtype=torch.float64)
    if not branching:
        return {(y,): float(p[y]) for y in range(V) if p[y] > 0}
    q = torch.tensor(q_after(context), dtype=torch.float64)
    out: dict[tuple, float] = {}
    for drafts in itertools.product(range(V), repeat=branching[0]):
        w = math.prod(float(q[x]) for x in drafts)
        accept, residual = multi_draft_plan(p, q, list(drafts), rule)
        reach = w
        for x, a in zip(drafts, accept):
            if reach * a > 0:
                for seq, pr in tree_output(list(context) + [x], branching[1:], rule, params).items():
                    out[(x,) + seq] = out.get((x,) + seq, 0.0) + reach * a * pr
            reach *= 1 - a
        for y in range(V):
            out[(y,)] = out.get((y,), 0.0) + reach * float(residual[y])
    return out


@pytest.mark.parametrize("rule", SAMPLED_TREE_RULES)
@pytest.mark.parametrize("branching", [[2, 2], [3, 1], [1, 3], [2, 1, 2], [1, 1, 1]], ids=str)
@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=2)], ids=["T1", "T0.7-k2"]
)
def test_sampled_tree_step_is_exactly_lossless(rule, branching, params):
    context = [1, 0]
    D = len(branching) + 2
    got: dict[tuple, float] = {}
    for emitted, w in tree_output(context, branching, rule, params).items():
        for rest in itertools.product(range(V), repeat=D - len(emitted)):
            seq = emitted + rest
            got[seq] = got.get(seq, 0.0) + w * seq_prob(context + list(emitted), rest, params)
    for seq in itertools.product(range(V), repeat=D):
        assert got.get(seq, 0.0) == pytest.approx(seq_prob(context, seq, params), abs=1e-12), seq


@pytest.mark.parametrize("rule", SAMPLED_TREE_RULES)
def test_decode_loop_with_sampled_trees_matches_target_distribution(rule):
    params = SamplingParams(temperature=1.0)
    counts = empirical(lambda seed: FakeSampledDrafter([2, 2], seed=10**6 + seed), params, rule=rule)
    # the same test and threshold as the per-node rule's (its power is shown by the control there)
    assert chi_square_p_value(counts, exact_distribution(params)) > 1e-4


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=2)], ids=["T1", "T0.7-k2"]
)
def test_traversal_keeps_at_least_as_many_tokens_as_token_level_on_chains(depth, params):
    """Traversal's claim for a single drafted path: it is the optimal chain rule, so its expected number
    of emitted tokens is at least token-level rejection sampling's (SpecInfer with k = 1)."""
    for context in ([1, 0], [2], [0, 0, 1]):
        mean = {
            rule: sum(len(seq) * pr for seq, pr in tree_output(context, [1] * depth, rule, params).items())
            for rule in ("specinfer", "traversal")
        }
        assert mean["traversal"] >= mean["specinfer"] - 1e-12, (context, mean)


def test_multi_draft_rule_refuses_a_deterministic_tree():
    tree = DraftTree([1, 2], [-1, 0], V, 4)
    with pytest.raises(ValueError, match="'spectr' needs a sampled tree"):
        verify(lambda r: torch.zeros(V), tree, SamplingParams(temperature=1.0), None, rule="spectr")
