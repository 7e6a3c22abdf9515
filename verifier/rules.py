"""Verification rules: pure functions of (target logits per tree node, draft tree, sampling params,
rng) -> Verdict. No model inside; the decode loop feeds them.

Logits come per *row*, on demand: row 0 is the target's next-token distribution after the last
committed token (the parent of the draft roots), row i+1 the distribution after draft node i. A rule
asks only for the rows it visits, so the target's LM head runs ~tau times per step, not N+1 times."""
from dataclasses import dataclass
from typing import Callable

import torch

from drafter.interface import SamplingParams
from drafter.tree import DraftTree
from kernels import sample_per_node

__all__ = ["SamplingParams", "Verdict", "next_token", "target_probs", "verify", "walk"]


@dataclass
class Verdict:
    accepted: list[int]        # accepted node ids, root to deepest
    bonus: int                 # the token the target adds after the accepted path
    target_probs: dict[int, float]  # node -> target probability of its token, for nodes whose parent was visited


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


def next_token(logits: torch.Tensor, params: SamplingParams,
               generator: torch.Generator | None) -> tuple[int, torch.Tensor | None]:
    """The target's own choice from logits [V]: argmax at temperature 0, else a sample of the filtered
    distribution. Returns (token, that distribution [V], or None at temperature 0). Plain decoding
    and every visited tree node go through this one function."""
    if params.temperature == 0:
        return int(logits.argmax()), None
    probs = target_probs(logits[None], params)
    return int(sample_per_node(probs, generator)[0]), probs[0]


def walk(tree: DraftTree, choose: Callable[[int], int]) -> tuple[list[int], int]:
    """Follow the target's choices through the tree. choose(row) is its token at a row (row 0 after
    the last committed token, row i+1 after node i); it is called once per visited row, in order.
    Descend into the first child carrying the chosen token; stop at the first node without one.
    Returns (accepted node ids, bonus token)."""
    children: dict[int, list[int]] = {}
    for i, par in enumerate(tree.parents):
        children.setdefault(par, []).append(i)
    accepted, node = [], -1
    while True:
        want = choose(node + 1)
        nxt = next((c for c in children.get(node, ()) if tree.tokens[c] == want), None)
        if nxt is None:
            return accepted, want
        accepted.append(nxt)
        node = nxt


def verify(row_logits: Callable[[int], torch.Tensor], tree: DraftTree | None, params: SamplingParams,
           generator: torch.Generator | None) -> Verdict:
    """Greedy (temperature 0) or lossless sampling for a deterministic tree: at each visited node the
    target picks its token (argmax, or a fresh sample of p) and the walk descends while a child
    carries it. Each visited node uses an independent draw from its own target distribution, so the
    emitted tokens are distributed exactly as plain decoding's. row_logits(row) -> logits [V]."""
    if tree is None:
        return Verdict([], next_token(row_logits(0), params, generator)[0], {})
    probs: dict[int, torch.Tensor] = {}  # visited row -> the target distribution there [V]

    def choose(row: int) -> int:
        logits = row_logits(row)
        token, dist = next_token(logits, params, generator)
        probs[row] = logits.softmax(dim=-1) if dist is None else dist  # greedy: plain softmax, for feedback
        return token

    accepted, bonus = walk(tree, choose)
    target = {i: float(probs[par + 1][tok]) for i, (tok, par) in enumerate(zip(tree.tokens, tree.parents))
              if par + 1 in probs}
    return Verdict(accepted, bonus, target)
