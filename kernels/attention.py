"""Attention for decoding and tree verification that is exact across the two: a tree row computes, bit
for bit, what plain decoding computes at that position.

Why not one SDPA call: the kernels' result for a query row depends on how many query rows share the
call (a 1-row product takes another kernel than a 2+ row one) and on where its keys sit among masked
ones (a node's ancestors are scattered over the tree's slots, a decoded token's are contiguous), so a
tree row and the same token decoded alone round differently.

So every query row attends to its *logical* key sequence (the committed tokens, then the pending token
and the node's ancestors in depth order, then itself), split at an absolute position:
  prefix  keys [0, P) with P = committed length rounded down to BLOCK: read in place from the cache,
          one matrix product over all query rows (the same P for every row of the step, and for the
          plain decoding of any of those rows' positions);
  tail    the rest of the logical sequence, at most BLOCK keys, gathered per row into a fixed-length
          window (masked padding), one batched product per row.
Softmax runs over [prefix | tail] as one row. A row whose logical length would cross P + BLOCK has a
different split than plain decoding there, so verification drafts no deeper than `max_tree_depth`.
Every product has 2+ rows (the G query heads that share a kv head), so the kernels do not switch to
their single-row variants (see kernels.linear).

`reference_attention` (plain SDPA with an ancestor mask) is what this is tested against."""

import torch
import torch.nn.functional as F

BLOCK = 64  # tail window: the most keys gathered per row; also the alignment of the prefix split


def prefix_split(length: int) -> int:
    """P for a step whose committed length (tokens in the cache before it) is `length`."""
    return length // BLOCK * BLOCK


def max_tree_depth(length: int) -> int:
    """Deepest draft node a step from `length` committed tokens can verify exactly: the pending token
    sits at logical position length, a node of depth d at length + d, and that must stay below P + BLOCK."""
    return prefix_split(length) + BLOCK - 1 - length


def tail_slots(length: int, slots: torch.Tensor, depths: torch.Tensor, ancestors: torch.Tensor, kv_shape):
    """Per query row, the cache slots of its logical keys from P on, in a BLOCK-wide window.

    slots [T]: where each new row's own K/V were written; depths [T]: 0 for the pending token, d for a
    node at depth d; ancestors [T, T] bool: ancestors[r, c] = row c is row r or an ancestor of it (rows
    in topological order, so an ancestor's depth orders it); kv_shape: a layer cache's [2, Hkv, S, D].
    Returns (index [2 * Hkv * T * BLOCK] int64: rows of the cache viewed as [2 * Hkv * S, D], window by
    window; bias [T, BLOCK] float32: 0 where the window holds a key, -inf past it)."""
    p = prefix_split(length)
    t = slots.shape[0]
    committed = torch.arange(p, length).expand(t, -1)  # [T, length - P]
    # row r's path slots in depth order: ancestor c goes to column depths[c]
    path = torch.zeros(t, t + 1, dtype=torch.long)  # column t collects the non-ancestors
    path.scatter_(1, depths.expand(t, -1).masked_fill(~ancestors, t), slots.expand(t, -1).contiguous())
    index = torch.cat([committed, path[:, :t], torch.zeros(t, BLOCK, dtype=torch.long)], 1)[:, :BLOCK]
    valid = torch.arange(BLOCK) < (length - p + depths + 1)[:, None]
    bias = torch.zeros(t, BLOCK).masked_fill_(~valid, float("-inf"))
    rows = torch.arange(kv_shape[0] * kv_shape[1])[:, None] * kv_shape[2]  # each (K or V, head)'s first row
    return (rows + index.masked_fill(~valid, 0).view(1, -1)).view(-1), bias


def tree_attention(q: torch.Tensor, kv: torch.Tensor, length: int, index: torch.Tensor, bias: torch.Tensor):
    """q: [Hq, T, D] (RoPE applied); kv: [2, Hkv, S, D] the layer's cache with this step's rows written;
    length: committed tokens before the step; index, bias: tail_slots(...). Returns [Hq, T, D].
    Query head h reads kv head h // G (G = Hq / Hkv >= 2 rows per product: the 2+ row kernels)."""
    hq, t, d = q.shape
    hkv = kv.shape[1]
    g = hq // hkv
    if g == 1:  # no grouped queries: each head twice (heads 2i, 2i+1 read kv head i), so products keep 2+ rows
        return tree_attention(q.repeat_interleave(2, 0), kv, length, index, bias)[::2]
    p = prefix_split(length)
    qg = q.view(hkv, g, t, d).transpose(1, 2).reshape(hkv, t * g, d)  # [Hkv, T*G, D], row = (t, g)
    tail = kv.view(-1, d).index_select(0, index).view(2, hkv * t, BLOCK, d)  # [2, Hkv*T, BLOCK, D] windows
    s_pre = torch.bmm(qg, kv[0, :, :p].transpose(1, 2)).view(hkv, t, g, p)
    s_tail = torch.bmm(qg.view(hkv * t, g, d), tail[0].transpose(1, 2)).view(hkv, t, g, BLOCK)
    s = torch.cat([s_pre, s_tail], -1).float().mul_(d**-0.5)
    s[..., p:] += bias[None, :, None, :]
    probs = s.softmax(-1).to(q.dtype)
    out = torch.bmm(probs[..., :p].reshape(hkv, t * g, p), kv[1, :, :p]).float()
    out += torch.bmm(probs[..., p:].reshape(hkv * t, g, BLOCK), tail[1]).view(hkv, t * g, d).float()
    return out.to(q.dtype).view(hkv, t, g, d).permute(0, 2, 1, 3).reshape(hq, t, d)


def reference_attention(q, k, v, length: int, slots: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """The same attention by SDPA over all slots with a boolean mask (committed prefix + ancestors)."""
    t = q.shape[1]
    mask = torch.zeros(t, k.shape[1], dtype=torch.bool)
    mask[:, :length] = True
    mask[:, slots] = ancestors
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)[0]
