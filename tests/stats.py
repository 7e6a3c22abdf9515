"""What the statistical losslessness tests share: the fake target's exact output law on a 3-token
vocabulary, the decode-loop setting they sample (prompt, length, trials), and the chi-square test that
compares the two. Used by tests/verifier/test_rules.py, test_multidraft.py and test_model_sampling.py."""

import functools
import itertools
import math

from tests.fakes import FakeTarget, fake_logits
from verifier.engine import generate
from verifier.rules import SamplingParams, target_probs

V = 3
PROMPT = [1, 2, 0]
GEN = 4
TRIALS = 12_000


@functools.cache
def _probs(context: tuple, params_key: tuple) -> tuple[float, ...]:
    p = target_probs(fake_logits(context, V)[None], SamplingParams(*params_key))[0].double()
    return tuple((p / p.sum()).tolist())  # renormalised in float64 so the sums below are exact to ~1e-15


def probs_after(context, params):
    """The fake target's next-token law [V] after a context, under the sampling filters of params."""
    return _probs(tuple(context), (params.temperature, params.top_k, params.top_p))


def seq_prob(context, seq, params):
    p, ctx = 1.0, list(context)
    for tok in seq:
        p *= probs_after(ctx, params)[tok]
        ctx.append(tok)
    return p


def exact_distribution(params):
    """{GEN-token continuation of PROMPT: its probability under plain sampling from the fake target}."""
    return {seq: seq_prob(PROMPT, seq, params) for seq in itertools.product(range(V), repeat=GEN)}


def empirical(drafter_factory, params, **generate_kw):
    """{continuation: count} over TRIALS seeded decode-loop runs on the fake target; drafter_factory(seed)
    gives each run a fresh drafter."""
    counts: dict[tuple, int] = {}
    target = FakeTarget(V)
    for seed in range(TRIALS):
        p = SamplingParams(params.temperature, params.top_k, params.top_p, seed)
        steps = generate(target, PROMPT, p, GEN, set(), drafter_factory(seed), max_nodes=8, **generate_kw)
        toks = tuple(t for s in steps for t in s.tokens)
        counts[toks] = counts.get(toks, 0) + 1
    return counts


def chi_square_p_value(counts, exact):
    """Pearson chi-square with cells of expected count < 5 pooled; p-value from the Wilson-Hilferty
    normal approximation (accurate to ~1e-3 at these degrees of freedom, ample for a 1e-4 threshold).
    counts: {cell: observed}; exact: {cell: probability}, covering every observed cell."""
    n = sum(counts.values())
    cells = sorted(exact, key=exact.get)
    stat, pool_o, pool_e, df = 0.0, 0, 0.0, -1
    for seq in cells:
        pool_o += counts.get(seq, 0)
        pool_e += exact[seq] * n
        if pool_e >= 5:
            stat += (pool_o - pool_e) ** 2 / pool_e
            pool_o, pool_e, df = 0, 0.0, df + 1
    assert set(counts) <= set(exact)
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))
