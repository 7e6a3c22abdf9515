"""Verification rules: pure functions of (target logits per tree node, draft tree, sampling params,
rng) -> Verdict. No model inside; the decode loop feeds them.

Row 0 of `logits` is the target's next-token distribution after the last committed token (the parent
of the draft roots); row i+1 is the distribution after draft node i."""
from dataclasses import dataclass

import torch

from drafter.tree import DraftTree
from kernels import sample_per_node


@dataclass
class SamplingParams:
    temperature: float = 0.0   # 0 = greedy
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1 = off
    seed: int = 0


@dataclass
class Verdict:
    accepted: list[int]        # accepted node ids, root to deepest
    bonus: int                 # the token the target adds after the accepted path
    target_probs: list[float]  # per draft node: target probability of its token given its path


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p, exactly as plain sampling applies them.
    logits: [M, V] float32 -> probs [M, V]."""
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass strictly before it already reaches top_p (the first always stays)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= params.top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """The target's own choice at every row: argmax at temperature 0, else one independent sample per
    row. Returns (tokens [M] int64, probs [M, V]); probs at temperature 0 is the plain softmax, used
    only for feedback."""
    if params.temperature == 0:
        return logits.argmax(dim=-1), logits.softmax(dim=-1)
    probs = target_probs(logits, params)
    return sample_per_node(probs, generator), probs


def walk(tree: DraftTree, choice: list[int]) -> tuple[list[int], int]:
    """Follow the target's choices through the tree. choice[0] is its token after the last committed
    token, choice[i+1] its token after node i. Descend into the first child carrying the chosen token;
    stop at the first node without one. Returns (accepted node ids, bonus token)."""
    children: dict[int, list[int]] = {}
    for i, par in enumerate(tree.parents):
        children.setdefault(par, []).append(i)
    accepted, node = [], -1
    while True:
        want = choice[node + 1]
        nxt = next((c for c in children.get(node, ()) if tree.tokens[c] == want), None)
        if nxt is None:
            return accepted, want
        accepted.append(nxt)
        node = nxt


def verify(logits: torch.Tensor, tree: DraftTree | None, params: SamplingParams,
           generator: torch.Generator | None) -> Verdict:
    """Greedy (temperature 0) or lossless sampling for a deterministic tree: at each node the target
    picks its token (argmax, or a sample of p) and the walk descends while a child carries it. Each
    visited node uses an independent draw from its own target distribution, so the emitted tokens are
    distributed exactly as plain decoding's."""
    choice, probs = next_tokens(logits, params, generator)  # [N+1], [N+1, V]
    choice = choice.tolist()
    if tree is None:
        return Verdict([], choice[0], [])
    accepted, bonus = walk(tree, choice)
    rows = torch.tensor([p + 1 for p in tree.parents])
    return Verdict(accepted, bonus, probs[rows, torch.tensor(tree.tokens)].tolist())
