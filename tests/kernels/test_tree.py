import random

import pytest
import torch

from kernels import compact_kv, sample_per_node, tree_attention_mask, verify_ancestors


def random_parents(n, rng):
    return [-1] + [rng.randrange(-1, i) for i in range(1, n)]


def reference_mask(parents):
    n = len(parents)
    m = [[False] * n for _ in range(n)]
    for i in range(n):
        j = i
        while j >= 0:
            m[i][j] = True
            j = parents[j]
    return torch.tensor(m)


@pytest.mark.parametrize("n", [1, 2, 7, 33, 64])
def test_tree_attention_mask_matches_reference(n):
    rng = random.Random(n)
    for _ in range(5):
        parents = random_parents(n, rng)
        assert torch.equal(tree_attention_mask(torch.tensor(parents)), reference_mask(parents))


def test_chain_mask_is_causal():
    parents = torch.arange(-1, 9)
    assert torch.equal(tree_attention_mask(parents), torch.ones(10, 10, dtype=torch.bool).tril())


def test_verify_ancestors_puts_the_pending_token_above_the_roots():
    m = verify_ancestors([-1, -1, 0, 2])
    assert m.shape == (5, 5)
    assert m[:, 0].all()  # every row sees the pending token
    assert m[0].tolist() == [True, False, False, False, False]
    assert m[4].tolist() == [True, True, False, True, True]  # node 3: pending, 0, 2, 3
    assert m[2].tolist() == [True, False, True, False, False]  # node 1 sees only itself


def test_compact_kv_moves_accepted_slots_and_keeps_prefix():
    kv = torch.arange(2 * 3 * 12 * 4, dtype=torch.float32).view(2, 3, 12, 4)
    before = kv.clone()
    src = torch.tensor([5, 7, 10])
    compact_kv(kv, src, 4)
    assert torch.equal(kv[..., :4, :], before[..., :4, :])
    assert torch.equal(kv[..., 4:7, :], before[..., src, :])


def test_compact_kv_in_place_identity_and_empty():
    kv = torch.randn(2, 10, 3)
    before = kv.clone()
    compact_kv(kv, torch.tensor([3, 4, 5]), 3)
    compact_kv(kv, torch.tensor([], dtype=torch.long), 3)
    assert torch.equal(kv, before)


def test_sample_per_node_distribution():
    # 3 rows with different distributions, 60k draws each: each cell's frequency within 5 sigma.
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7], [0.0, 0.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    n = 60_000
    counts = torch.zeros(3, 4)
    for _ in range(n // 1000):
        draws = sample_per_node(probs.repeat(1000, 1), g).view(1000, 3)
        counts += torch.nn.functional.one_hot(draws, 4).sum(0)
    freq = counts / n
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma + 1e-12).all(), freq
    assert counts[probs == 0].sum() == 0  # zero-probability tokens never drawn
