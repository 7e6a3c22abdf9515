"""Top-k of an LM head over many state rows, a chunk of rows at a time: what teacher forcing stores
(drafter.data) and what the verifier hands the drafter as feedback (verifier.target)."""

from collections.abc import Callable

import torch


def top_k(
    logits: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, k: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's top-k next-token ids [M, k] int32 and probabilities [M, k] float16 for state rows
    [M, dim], through its LM head `logits`, chunk rows at a time ([chunk, V] float32 logits each: a full
    [M, V] would be hundreds of MB)."""
    top_ids, top_p = [torch.zeros(0, k, dtype=torch.int32)], [torch.zeros(0, k, dtype=torch.float16)]
    for s in range(0, len(rows), chunk):
        top = logits(rows[s : s + chunk]).float().softmax(-1).topk(k, dim=-1)
        top_ids.append(top.indices.int())
        top_p.append(top.values.half())
    return torch.cat(top_ids), torch.cat(top_p)
