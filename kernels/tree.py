import torch


def tree_attention_mask(parents: torch.Tensor) -> torch.Tensor:
    """Ancestor mask of a tree in topological order.

    parents: [N] int64, parents[i] < i, -1 for a root. Returns [N, N] bool, mask[i, j] = j is i or an
    ancestor of i. Pointer jumping: one vectorised pass per tree level, not per node."""
    n = parents.shape[0]
    rows = torch.arange(n, device=parents.device)
    mask = torch.eye(n, dtype=torch.bool, device=parents.device)
    cur = parents.clone()
    while bool((cur >= 0).any()):
        live = cur >= 0
        mask[rows[live], cur[live]] = True
        cur = torch.where(live, parents[cur.clamp(min=0)], cur)
    return mask


def verify_attention_mask(prefix_len: int, parents: torch.Tensor) -> torch.Tensor:
    """Mask for one verification forward: the pending token followed by the N draft nodes.

    Row 0 is the pending (last committed, not yet cached) token; draft roots (parent -1) are its
    children. Every row sees the whole committed prefix plus its own ancestors.
    parents: [N] int64. Returns [N+1, prefix_len+N+1] bool."""
    ext = torch.cat([parents.new_full((1,), -1), parents + 1])  # roots -> the pending token at 0
    anc = tree_attention_mask(ext)
    prefix = torch.ones(ext.shape[0], prefix_len, dtype=torch.bool, device=parents.device)
    return torch.cat([prefix, anc], dim=1)


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
