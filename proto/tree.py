"""DraftTree: the drafter's proposal, flat arrays in topological order."""

import random
from dataclasses import dataclass, field

import torch


class TreeError(ValueError):
    """A draft tree that breaks the contract; the message names the bad node and value."""


@dataclass(frozen=True)
class DraftTree:
    """tokens[i] is the drafted token of node i; parents[i] is its parent node, or -1 when node i
    continues the last committed token directly. Parents come before children (parents[i] < i).
    Siblings may repeat a token (sampled trees do); deterministic verification takes the first.

    A *sampled* tree also carries draft_probs [N+1, V]: row 0 is the drafter's distribution q the roots
    were drawn from, row i+1 the one node i's children were drawn from, each sibling group i.i.d. from
    its row. Multi-draft rules (SpecInfer, SpecTr) need it; a tree without it is deterministic (its
    children were chosen, not sampled) and only the per-node rule may verify it.

    Validated on construction against the target's vocabulary and the node budget."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    vocab_size: int
    max_nodes: int
    draft_probs: torch.Tensor | None = field(default=None, compare=False, repr=False)
    depths: tuple[int, ...] = field(init=False, repr=False)  # root nodes have depth 1

    def __post_init__(self):
        tokens, parents = tuple(int(t) for t in self.tokens), tuple(int(p) for p in self.parents)
        n = len(tokens)
        if n == 0:
            raise TreeError("empty draft tree: propose None for no draft")
        if n > self.max_nodes:
            raise TreeError(f"draft tree has {n} nodes, over the budget of {self.max_nodes}")
        if len(parents) != n:
            raise TreeError(f"draft tree has {n} tokens but {len(parents)} parents")
        depths = []
        for i, (tok, par) in enumerate(zip(tokens, parents)):
            if not 0 <= tok < self.vocab_size:
                raise TreeError(f"node {i}: token {tok} outside the vocabulary [0, {self.vocab_size})")
            if not -1 <= par < i:
                raise TreeError(f"node {i}: parent {par} must be -1 or an earlier node (parents before children)")
            depths.append(1 if par < 0 else depths[par] + 1)
        if self.draft_probs is not None:
            q = self.draft_probs
            if tuple(q.shape) != (n + 1, self.vocab_size):
                raise TreeError(
                    f"draft_probs has shape {list(q.shape)}, a sampled tree of {n} nodes needs "
                    f"[{n + 1}, {self.vocab_size}]"
                )
            drawn = q[torch.tensor(parents) + 1, torch.tensor(tokens)]
            if not bool((drawn > 0).all()):
                i = int((drawn <= 0).nonzero()[0])
                raise TreeError(f"node {i}: token {tokens[i]} has draft probability 0 in the row it was sampled from")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "depths", tuple(depths))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depth(self) -> int:
        return max(self.depths)

    def path_tokens(self, nodes: list[int]) -> list[int]:
        return [self.tokens[i] for i in nodes]

    def within_depth(self, depth: int) -> tuple["DraftTree | None", list[int]]:
        """The nodes of depth <= depth (None if none), and for each kept node its id in this tree. Whole
        sibling groups stay or go together, so a sampled tree stays a sampled tree."""
        kept = [i for i, d in enumerate(self.depths) if d <= depth]
        if not kept:
            return None, []
        new = {old: j for j, old in enumerate(kept)}
        parents = [new[self.parents[i]] if self.parents[i] >= 0 else -1 for i in kept]
        probs = None if self.draft_probs is None else self.draft_probs[[0] + [i + 1 for i in kept]]
        return DraftTree([self.tokens[i] for i in kept], parents, self.vocab_size, self.max_nodes, probs), kept


def random_tree(n: int, vocab: int, rng: random.Random) -> DraftTree:
    """n nodes, each under a uniformly chosen earlier node or the root, random tokens (benchmarks, load
    tests and the tests of tree forwards; drafter.synthetic's RandomDrafter draws these)."""
    parents = [-1] + [rng.randrange(-1, i) for i in range(1, n)]
    return DraftTree([rng.randrange(vocab) for _ in range(n)], parents, vocab, n)
