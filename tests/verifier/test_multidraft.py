"""Losslessness of the multi-draft rules (SpecInfer, SpecTr K-SEQ) on sampled trees.

Exact: on a 3-4 token vocabulary every tuple of i.i.d. candidates is enumerated with its probability
under q, and the rule's plan (acceptance per candidate, residual) gives the exact output distribution,
which must equal p to 1e-12, for adversarial q (disjoint support, q = p, one-hot) and k = 1..4; then the
same for whole depth-2 and depth-3 trees, fresh subtrees under every accepted child, duplicate tokens
among siblings included. Closed forms: at k = 1 both rules accept with probability Σ min(p, q); K-SEQ
accepts at least as often as single draft. Statistical: the real decode loop with a fake sampled drafter."""
import itertools
import math

import pytest
import torch

from drafter.tree import DraftTree
from tests.fakes import FakeSampledDrafter, FakeTarget, fake_draft_probs
from tests.verifier.test_rules import (GEN, PROMPT, TRIALS, V, chi_square_p_value, exact_distribution, probs_after,
                                       seq_prob)
from verifier.engine import generate
from verifier.rules import MULTI_DRAFT_RULES, SamplingParams, multi_draft_plan, spectr_rho, verify

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


def output_and_acceptance(p, q, k, rule):
    """Exact distribution of the emitted token [V] and the probability that a candidate is accepted."""
    p, q = p.double(), q.double()
    out, accepted = torch.zeros_like(p), 0.0
    for drafts in itertools.product(range(len(p)), repeat=k):
        w = math.prod(float(q[x]) for x in drafts)
        if w == 0:
            continue
        accept, residual = multi_draft_plan(p, q, list(drafts), rule)
        reach = w
        for x, a in zip(drafts, accept):
            out[x] += reach * a
            accepted += reach * a
            reach *= 1 - a
        out += reach * residual
    return out, accepted


@pytest.mark.parametrize("rule", MULTI_DRAFT_RULES)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("case", CASES)
def test_one_sibling_group_emits_exactly_p(rule, k, case):
    p, q = CASES[case]
    out, _ = output_and_acceptance(p, q, k, rule)
    assert torch.allclose(out, p.double(), atol=1e-12), (out, p)


@pytest.mark.parametrize("rule", MULTI_DRAFT_RULES)
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


def tree_output(context, branching, rule, params):
    """Exact distribution of the tokens one verification step emits for a random sampled tree of the
    given branching per depth below `context`: {emitted tuple: probability}."""
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


@pytest.mark.parametrize("rule", MULTI_DRAFT_RULES)
@pytest.mark.parametrize("branching", [[2, 2], [3, 1], [1, 3], [2, 1, 2]], ids=str)
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=2)],
                         ids=["T1", "T0.7-k2"])
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


@pytest.mark.parametrize("rule", MULTI_DRAFT_RULES)
def test_decode_loop_with_sampled_trees_matches_target_distribution(rule):
    params = SamplingParams(temperature=1.0)
    counts: dict[tuple, int] = {}
    target = FakeTarget(V)
    for seed in range(TRIALS):
        p = SamplingParams(params.temperature, params.top_k, params.top_p, seed)
        drafter = FakeSampledDrafter([2, 2], seed=10**6 + seed)
        toks = tuple(t for s in generate(target, PROMPT, p, GEN, set(), drafter, max_nodes=8, rule=rule)
                     for t in s.tokens)
        counts[toks] = counts.get(toks, 0) + 1
    # the same test and threshold as the per-node rule's (its power is shown by the control there)
    assert chi_square_p_value(counts, exact_distribution(params)) > 1e-4


def test_multi_draft_rule_refuses_a_deterministic_tree():
    tree = DraftTree([1, 2], [-1, 0], V, 4)
    with pytest.raises(ValueError, match="'spectr' needs a sampled tree"):
        verify(lambda r: torch.zeros(V), tree, SamplingParams(temperature=1.0), None, rule="spectr")
