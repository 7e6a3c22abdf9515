"""Attention for decoding and tree verification that is exact across the two: a tree row computes, bit
for bit, what plain decoding computes at that position.

Why not one SDPA call: the kernels' result for a query row depends on how many query rows share the
call and on where its keys sit among masked ones (a node's ancestors are scattered over the tree's
slots, a decoded token's are contiguous), so a tree row and the same token decoded alone round
differently.

So the pieces are arranged to leave nothing position- or row-count-dependent:
- Scores: one float32 product of every query row with every key [0, length + T) (committed keys, then
  the step's own rows); a tree row's non-ancestors get -inf. An element of a product depends only on its
  query and key row (MKL's fp32 products with 4+ rows; a 1-3 row product takes other kernels, so a
  decoding step's rows are padded to MIN_ROWS, and a short sequence's keys to MIN_KEYS).
- No softmax kernel (its vectorised sum depends on where the valid scores sit): e = exp(s - max), and the
  normaliser comes out of the value product itself, from a ones column kept beside every value row
  (the cache's column D). Where a tree row has a non-ancestor, e is exactly 0.
- Values, split at P = committed length rounded down to BLOCK: the prefix [0, P) is one product of the
  same K = P for a tree and for the plain decoding of any of its rows; the tail [P, length + T) is at
  most BLOCK + T columns, where a tree row's zeros sit between its ancestors. MKL accumulates a product
  element along K in order, so the exact zeros change nothing (tested: tests/kernels/test_attention.py
  and the real model's tests/verifier/test_exact.py). A row whose logical length would cross P + BLOCK
  would have a different split when decoded, so verification drafts no deeper than `max_tree_depth`.
Everything runs in float32 on a float32 cache (the bf16 target writes bf16-valued keys and values into it):
small fp32 products cost about half of bf16 ones here (oneDNN's per-call overhead dominates at these
sizes), and no key or value is gathered.

`reference_attention` (plain SDPA with an ancestor mask) is what this is tested against."""

import torch
import torch.nn.functional as F

BLOCK = 64  # alignment of the prefix split: a value product's tail holds < BLOCK committed keys
MIN_ROWS = 4  # fp32 products of this many rows or more agree row for row (see module doc)
MIN_KEYS = 16  # ... and of this many key columns or more (under 12 columns MKL takes other kernels here)


def prefix_split(length: int) -> int:
    """P for a step whose committed length (tokens in the cache before it) is `length`."""
    return length // BLOCK * BLOCK


def max_tree_depth(length: int) -> int:
    """Deepest draft node a step from `length` committed tokens can verify exactly: the pending token
    sits at logical position length, a node of depth d at length + d, and that must stay below P + BLOCK."""
    return prefix_split(length) + BLOCK - 1 - length


def tree_attention(q: torch.Tensor, kv: torch.Tensor, length: int, bias: torch.Tensor) -> torch.Tensor:
    """q: [Hq, T, D] float32 (RoPE applied); kv: [2, Hkv, S, D + 1] float32, the layer's cache with this
    step's rows written at slots length .. length + T - 1 and the ones column (value side) at D;
    length: committed tokens before the step; bias: [T, T] float32, 0 where row c is row r or an
    ancestor of it, -inf elsewhere. Returns [Hq, T, D] float32. Query head h reads kv head h // G."""
    hq, t, d = q.shape
    hkv = kv.shape[1]
    g = hq // hkv
    p = prefix_split(length)
    rows = t * g
    qg = q.view(hkv, g, t, d).transpose(1, 2).reshape(hkv, rows, d) * d**-0.5  # [Hkv, T*G, D], row = (t, g)
    qg = F.pad(qg, (0, 1, 0, max(MIN_ROWS - rows, 0)))  # [Hkv, R, D + 1]: meets the keys' zero column
    n = length + t
    s = torch.bmm(qg, kv[0, :, : max(n, MIN_KEYS)].transpose(1, 2))[..., :n]  # [Hkv, R, length + T]
    s[:, :rows, length:].view(hkv, t, g, t).add_(bias[None, :, None, :])
    e = s.sub_(s.amax(-1, keepdim=True)).exp_()
    out = torch.bmm(e[..., :p], kv[1, :, :p]).add_(torch.bmm(e[..., p:], kv[1, :, p : length + t]))
    out = out[:, :rows, :d] / out[:, :rows, d:]  # [Hkv, T*G, D]: the ones column summed e
    return out.view(hkv, t, g, d).permute(0, 2, 1, 3).reshape(hq, t, d)


def ancestor_bias(ancestors: torch.Tensor) -> torch.Tensor:
    """ancestors [T, T] bool -> tree_attention's bias [T, T] float32 (0 / -inf)."""
    return torch.zeros(ancestors.shape).masked_fill_(~ancestors, float("-inf"))


def reference_attention(q, k, v, length: int, slots: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """The same attention by SDPA over all slots with a boolean mask (committed prefix + ancestors)."""
    t = q.shape[1]
    mask = torch.zeros(t, k.shape[1], dtype=torch.bool)
    mask[:, :length] = True
    mask[:, slots] = ancestors
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)[0]
