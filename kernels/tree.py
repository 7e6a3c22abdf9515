import torch


def tree_attention_mask(parents) -> torch.Tensor:
    """Ancestor mask of a tree in topological order.

    parents: N ints, parents[i] < i, -1 for a root. Returns [N, N] bool, mask[i, j] = j is i or an
    ancestor of i. Built row by row on the host (each row is its parent's plus itself): no tensor op per
    level and no device sync."""
    rows: list[list[bool]] = []
    n = len(parents)
    for i, p in enumerate(parents):
        row = list(rows[p]) if p >= 0 else [False] * n
        row[i] = True
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).view(n, n)


def verify_ancestors(parents) -> torch.Tensor:
    """Ancestor mask of one verification forward's rows: the pending token (row 0, the parent of the
    draft roots), then the N draft nodes. parents: N ints. Returns [N+1, N+1] bool."""
    return tree_attention_mask([-1] + [p + 1 for p in parents])


def compact_kv(kv: torch.Tensor, src: torch.Tensor, dst_start: int) -> None:
    """Move the KV entries at cache slots src (increasing, src[j] >= dst_start + j) to the contiguous
    slots dst_start .. dst_start+len(src)-1, in place, for every layer at once.

    kv: [..., S, D] with the slot axis second to last (the model keeps all layers in one tensor)."""
    if src.numel() == 0:
        return
    kv[..., dst_start : dst_start + src.numel(), :] = kv[..., src, :]  # gather copies first: overlap is safe


def sample_per_node(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One independent sample from each row of probs [M, V] -> [M] int64.

    Exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. picks index x with probability p(x).
    The decode loop draws one row per visited node (M = 1); rules over many rows draw them at once."""
    e = torch.empty(probs.shape, dtype=torch.float32, device=probs.device).exponential_(1.0, generator=generator)
    return (probs.float() / e).argmax(dim=-1)
