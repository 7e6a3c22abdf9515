"""drafter.hybrid: one tree from a lookup's and a model's candidates, ranked by calibrated path score;
shared prefixes merge; feedback calibrates; the model skips when the lookup promises enough; and the
merged deterministic trees stay lossless at temperature > 0 (chi-square on the fake target)."""

import pytest

from drafter.hybrid import Calibration, Hybrid, HybridConfig, Scored, build
from proto.interface import Feedback, VerifierUpdate
from tests.stats import chi_square_p_value, empirical, exact_distribution
from verifier.rules import SamplingParams


class FakeSource:
    """A fake candidate source: fixed candidates every step; records the updates it absorbed."""

    def __init__(self, scored):
        self.fixed, self.updates = scored, []

    def scored(self, update):
        self.updates.append(update)
        return self.fixed if update.max_nodes > 0 else None

    def scored_steps(self, update):  # a learned source's steps, here with no forward to yield
        return self.scored(update)
        yield

    def close(self):
        pass


def upd(tokens=(1,), max_nodes=4, feedback=None):
    return VerifierUpdate(list(tokens), feedback, max_nodes, vocab_size=100)


LOOKUP = Scored([7, 8, 9], [-1, 0, 1], [0.9, 0.9, 0.9], 6)
MODEL = Scored([7, 30], [-1, -1], [0.6, 0.3])


def test_merges_shared_prefixes_and_ranks_by_path_score():
    built = build([("suffix", LOOKUP), ("model", MODEL)], Calibration(), 3, 100, HybridConfig())
    assert built.tree.tokens == (7, 8, 9) and built.tree.parents == (-1, 0, 1)
    assert [o for o, _ in built.origin[0]] == ["suffix", "model"]  # the shared root is one node
    assert built.scores == sorted(built.scores, reverse=True)
    wide = build([("suffix", LOOKUP), ("model", MODEL)], Calibration(), 4, 100, HybridConfig())
    assert wide.tree.tokens == (7, 8, 9, 30)


def test_source_order_puts_the_lookup_first_whatever_the_scores():
    low = Scored([7, 8], [-1, 0], [0.1, 0.1])
    built = build([("ngram", low), ("model", MODEL)], Calibration(), 3, 100, HybridConfig(rank="source_order"))
    assert built.tree.tokens == (7, 8, 30)
    by_score = build([("ngram", low), ("model", MODEL)], Calibration(), 3, 100, HybridConfig())
    assert by_score.tree.tokens[:2] == (7, 30)  # 30's 0.3 beats 7 -> 8's 0.1 * 0.6


def test_feedback_calibrates_each_source_per_cell():
    cal = Calibration(prior_weight=4)
    h = Hybrid(FakeSource(LOOKUP), "suffix", None, cal, HybridConfig())
    h.draft(upd())
    cell = cal.cell("suffix", 1, 0.9, 6)
    for _ in range(20):  # the root is always evaluated and always rejected
        h.draft(upd(feedback=Feedback([], {0: 0.01})))
    assert cal.score(cell, 0.9) < 0.2
    assert cal.cell("suffix", 2, 0.9, 6) not in cal.counts  # node 1's parent was never accepted: no trial


def test_the_model_skips_when_the_lookup_promises_enough_and_keeps_its_context():
    model = FakeSource(MODEL)
    h = Hybrid(FakeSource(LOOKUP), "suffix", model, Calibration(), HybridConfig(skip_model_at=2.0))
    tree = h.draft(upd([1, 2, 3]))  # 0.9 + 0.81 + 0.73 = 2.44 expected accepted tokens >= 2
    assert model.updates[-1].max_nodes == 0 and model.updates[-1].new_tokens == [1, 2, 3]
    assert tree.tokens == (7, 8, 9) and h.model_skips == 1
    never = Hybrid(FakeSource(LOOKUP), "suffix", model, Calibration(), HybridConfig(skip_model_at=5.0))
    never.draft(upd([4]))
    assert model.updates[-1].max_nodes == 4 and never.model_skips == 0


def test_the_model_hears_feedback_in_its_own_node_ids():
    model = FakeSource(MODEL)
    h = Hybrid(FakeSource(LOOKUP), "suffix", model, Calibration(), HybridConfig())
    h.draft(upd(max_nodes=4))  # tree: 7 8 9 (7 shared: the model's node 0), 30 (the model's node 1)
    h.draft(upd([30, 5], feedback=Feedback([3], {0: 0.1, 3: 0.8})))
    assert model.updates[-1].feedback.accepted == [1] and model.updates[-1].feedback.target_probs == {0: 0.1, 1: 0.8}
    h.draft(upd([7, 8, 5], feedback=Feedback([0, 1], {0: 0.9, 1: 0.9, 3: 0.0})))
    assert model.updates[-1].feedback.accepted == [0]  # the path left the model's nodes after node 0


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0)], ids=["T1"])
def test_merged_trees_are_lossless_when_sampling(params):
    """Lookup candidates are fixed paths (no draft distribution): the walk rule verifies them. The merged
    tree over the 3-token fake vocabulary overlaps at the root and branches below it."""
    lookup = Scored([0, 1, 2, 0], [-1, 0, 1, 2], [0.9, 0.9, 0.9, 0.9], 4)
    model = Scored([0, 2, 1, 2], [-1, -1, 0, 1], [0.5, 0.4, 0.5, 0.5])

    def drafter(seed):
        return Hybrid(FakeSource(lookup), "suffix", FakeSource(model), Calibration(), HybridConfig())

    counts = empirical(drafter, params)
    # 81 cells, 12k runs: as tests/verifier/test_rules.py, a 0.02 shift in total variation fails it
    assert chi_square_p_value(counts, exact_distribution(params)) > 1e-4
