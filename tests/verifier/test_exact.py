"""Exactness at temperature 0 on the real model: every row of a tree forward equals, bit for bit, what
plain decoding computes at that position (the same tokens decoded one per forward), in the dtype
`target.dtype: auto` picks on this CPU. Trees of 1, 4, 16 and 64 nodes (chains and random shapes), after
prompts that put the tree across a 64-slot boundary (kernels.attention.BLOCK: where the split of the
attention's value product between prefix and tail moves) and near the 1024-slot one, then the rows after a
commit. Trees are cut to the target's max_tree_depth, as the decode loop cuts them."""

import random

import pytest
import torch

from proto.tree import DraftTree, random_tree
from specdraft.assets import auto_dtype, load_transformer
from verifier.target import TorchTarget, plain_rows, tree_divergence

pytestmark = pytest.mark.model
V = 49152


@pytest.fixture(scope="module")
def target(model_path):
    dtype, _ = auto_dtype()
    return TorchTarget(load_transformer(model_path, dtype, 2048))


def assert_tree_exact(target: TorchTarget, pending: int, tree: DraftTree) -> DraftTree | None:
    """Verify-forward the tree (cut to the target's max_tree_depth, as the decode loop cuts it), then
    plain-decode every row (verifier.target.plain_rows) and compare. Returns the tree as verified; the
    committed prefix is left as it was."""
    tree, _ = tree.within_depth(target.max_tree_depth)
    if tree is None:
        return None
    logits = target.logits(target.verify_forward(pending, tree))  # [N+1, V]
    plain = plain_rows(target, pending, tree)
    for row in range(len(logits)):
        diff = (logits[row] - plain[row]).abs().max().item()
        where = "the pending token" if row == 0 else f"node {row - 1} at depth {tree.depths[row - 1]}"
        assert torch.equal(logits[row], plain[row]), f"row {row} ({where}): max |diff| {diff}"
    return tree


@pytest.mark.parametrize("prompt_len", [505, 961, 1020])
@pytest.mark.parametrize("n", [1, 4, 16, 64])
def test_tree_rows_equal_plain_decoding_bit_for_bit(target, n, prompt_len):
    if target.model.tok_embeddings.weight.dtype == torch.float32:
        pytest.skip(
            "auto picked float32 here (no fast bf16), whose kernels are not row-invariant: see kernels/linear.py"
        )
    rng = random.Random(n * 1000 + prompt_len)
    target.prefill([rng.randrange(V) for _ in range(prompt_len)])
    pending = rng.randrange(V)
    chain = DraftTree([rng.randrange(V) for _ in range(n)], list(range(-1, n - 1)), V, n)
    assert assert_tree_exact(target, pending, chain) is not None
    tree = assert_tree_exact(target, pending, random_tree(n, V, rng))
    # commit the random tree's deepest path, then check a second tree from the new prefix
    deepest = max(range(len(tree)), key=lambda i: tree.depths[i])
    path = []
    while deepest >= 0:
        path.append(deepest)
        deepest = tree.parents[deepest]
    target.verify_forward(pending, tree)
    target.commit(path[::-1])
    assert_tree_exact(target, tree.tokens[path[0]], random_tree(n, V, rng))


def test_divergence_counts_rows_and_is_zero_where_exact(target):
    """tree_divergence (what an explicitly chosen, non-exact dtype reports at load) compares every row."""
    rows, differ, flips = tree_divergence(target, trees=1, nodes=8)
    assert rows == 9 and target.length == 0
    if target.model.tok_embeddings.weight.dtype == torch.bfloat16:
        assert differ == flips == 0
