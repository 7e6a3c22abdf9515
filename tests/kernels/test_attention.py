"""kernels.attention against its reference (SDPA with the ancestor mask), and exact between a tree row and
the same row decoded alone (random trees, prefixes on both sides of a BLOCK boundary)."""

import random

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import BLOCK, ancestor_bias, max_tree_depth, reference_attention, tree_attention
from kernels.linear import fast_bf16
from kernels.tree import verify_ancestors
from proto.tree import random_tree

HKV, G, D = 3, 3, 64


def attend(q, k, v, length, ancestors):
    """tree_attention on a cache laid out as the target's: float32, a zero column beside the keys and a
    ones column beside the values."""
    kv = torch.stack([F.pad(k.float(), (0, 1)), F.pad(v.float(), (0, 1), value=1.0)])
    return tree_attention(q.float(), kv, length, ancestor_bias(ancestors))


@pytest.mark.parametrize("seed", range(12))
def test_tree_rows_equal_reference_and_plain_decoding(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    length = rng.choice([5, BLOCK - 3, 3 * BLOCK + 1, 7 * BLOCK + 40])
    tree, _ = random_tree(rng.choice([1, 4, 16, 64]), 100, rng).within_depth(max_tree_depth(length))
    if tree is None:
        pytest.skip("no depth left before the block boundary at this length")
    anc = verify_ancestors(tree.parents)  # [T, T]: the pending token, then the nodes
    t = anc.shape[0]
    s = length + t + 16  # room for the score product's MIN_KEYS columns
    q = torch.randn(HKV * G, t, D).bfloat16()
    k, v = torch.randn(HKV, s, D).bfloat16(), torch.randn(HKV, s, D).bfloat16()
    out = attend(q, k, v, length, anc)
    ref = reference_attention(q, k, v, length, length + torch.arange(t), anc)
    assert (out - ref.float()).abs().max() < 0.02  # the reference runs in bf16
    if not fast_bf16():
        return  # the exactness below is claimed only where auto picks bf16 (kernels.linear.fast_bf16)
    for r in range(t):  # decode row r alone: its ancestors copied to contiguous slots after the prefix
        path = anc[r].nonzero().flatten()
        k2, v2 = k.clone(), v.clone()
        k2[:, length : length + len(path)], v2[:, length : length + len(path)] = (
            k[:, length + path],
            v[:, length + path],
        )
        plain_len = length + len(path) - 1
        alone = attend(q[:, r : r + 1].contiguous(), k2, v2, plain_len, torch.ones(1, 1, dtype=torch.bool))
        assert torch.equal(alone[:, 0], out[:, r]), r
