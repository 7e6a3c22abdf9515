from drafter.ngram import NgramConfig, NgramDrafter
from proto.interface import VerifierUpdate


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
