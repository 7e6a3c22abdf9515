import pytest

from proto.tree import DraftTree, TreeError


def test_valid_tree_derives_depths():
    t = DraftTree([5, 6, 7, 8], [-1, 0, 0, 2], vocab_size=10, max_nodes=8)
    assert t.depths == (1, 2, 2, 3)
    assert t.depth == 3 and len(t) == 4
    assert t.path_tokens([0, 2, 3]) == [5, 7, 8]


@pytest.mark.parametrize(
    "tokens,parents,match",
    [
        ([], [], "empty draft tree"),
        ([1, 2], [-1, 1], "node 1: parent 1 must be -1 or an earlier node"),
        ([1, 2, 3], [-1, 2, 0], "node 1: parent 2"),
        ([1, 2], [-1, -2], "node 1: parent -2"),
        ([1, 10], [-1, 0], r"node 1: token 10 outside the vocabulary \[0, 10\)"),
        ([-1], [-1], "node 0: token -1 outside"),
        ([1] * 9, [-1] * 9, "9 nodes, over the budget of 8"),
        ([1, 2], [-1], "2 tokens but 1 parents"),
    ],
)
def test_invalid_trees_are_rejected_with_the_bad_value(tokens, parents, match):
    with pytest.raises(TreeError, match=match):
        DraftTree(tokens, parents, vocab_size=10, max_nodes=8)
