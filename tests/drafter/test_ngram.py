from drafter.ngram import LookupFirst, NgramConfig, NgramDrafter
from proto.interface import Feedback, VerifierUpdate
from proto.tree import DraftTree


def update(tokens, max_nodes=16):
    return VerifierUpdate(tokens, None, max_nodes, vocab_size=100)


def test_proposes_what_followed_the_longest_matching_suffix():
    d = NgramDrafter(NgramConfig(max_ngram=3, min_ngram=1, max_depth=4))
    tree = d.draft(update([1, 2, 3, 4, 5, 9, 9, 1, 2, 3]))
    # suffix (1, 2, 3) occurred at the start, followed by 4 5 9 9
    assert tree.tokens[:4] == (4, 5, 9, 9) and tree.parents[:4] == (-1, 0, 1, 2)


def test_branches_over_several_continuations_and_shares_prefixes():
    d = NgramDrafter(NgramConfig(max_ngram=2, min_ngram=1, max_depth=3, max_matches=8))
    tree = d.draft(update([7, 1, 2, 7, 1, 3, 7, 1, 2, 8, 7, 1]))
    # suffix (7, 1) was followed by 2 7 1, 3 7 1 and 2 8 7: "2" twice -> one shared root first
    roots = [t for t, p in zip(tree.tokens, tree.parents) if p == -1]
    assert roots[0] == 2 and set(roots) == {2, 3}
    assert len(set(zip(tree.parents, tree.tokens))) == len(tree)  # no duplicate siblings


def test_respects_budget_topological_order_and_incremental_updates():
    d = NgramDrafter(NgramConfig(max_ngram=2, min_ngram=1, max_depth=8))
    seq = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 5, 6, 1, 2]
    tree = d.draft(update(seq[:10], max_nodes=3))
    assert len(tree) <= 3 and all(p < i for i, p in enumerate(tree.parents))
    tree = d.draft(update(seq[10:], max_nodes=5))  # only the new tokens are sent
    assert len(tree) <= 5 and d.tokens == seq


def test_no_match_means_no_draft():
    d = NgramDrafter(NgramConfig(max_ngram=3, min_ngram=2))
    assert d.draft(update([1, 2, 3, 4])) is None


class Recording:
    """A fake drafter: a fixed two-node chain (tokens 50, 51) every step; records the feedback it got."""

    def __init__(self):
        self.feedback = []

    def draft(self, u):
        self.feedback.append(u.feedback)
        return DraftTree((50, 51), (-1, 0), u.vocab_size, u.max_nodes)

    def close(self):
        pass


def test_lookup_first_leads_with_the_match_and_restates_feedback_in_the_other_drafters_ids():
    inner = Recording()
    d = LookupFirst(NgramDrafter(NgramConfig(max_ngram=2, min_ngram=2, max_depth=3, max_matches=1)), inner)
    tree = d.draft(update([1, 2, 3, 4, 1, 2], max_nodes=4))
    assert tree.tokens == (3, 4, 1, 50) and tree.parents == (-1, 0, 1, -1)  # the budget cut the chain's 51
    # the target took the other drafter's node 3 (its node 0): it hears "your node 0"
    d.draft(VerifierUpdate([50, 7], Feedback([3], {0: 0.1, 3: 0.9}), 8, 100))
    assert inner.feedback[-1].accepted == [0] and inner.feedback[-1].target_probs == {0: 0.9}
    # no match now ([50, 7] is new): only the other drafter's chain, at offset 0
    tree = d.draft(VerifierUpdate([9], Feedback([], {}), 8, 100))
    assert tree.tokens == (50, 51)
    d.draft(VerifierUpdate([50, 51, 9], Feedback([0, 1], {0: 1.0, 1: 1.0}), 8, 100))
    assert inner.feedback[-1].accepted == [0, 1]


def test_lookup_first_passes_the_other_drafter_through_without_a_match():
    inner = Recording()
    d = LookupFirst(NgramDrafter(NgramConfig()), inner)
    tree = d.draft(update([1, 2, 3]))
    assert tree.tokens == (50, 51) and inner.feedback == [None]
