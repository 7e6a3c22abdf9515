"""The target backend interface and our torch implementation of it.

Cache convention: the last committed token is *pending*, not yet in the KV cache; every forward takes
it as its first input. So a step is: verify_forward(pending, tree) -> one state row for the pending
token and one per node; logits(rows) only for the rows the verification rule visits; commit(accepted)
keeps the pending token's and the accepted nodes' KV, drops the rest."""

import random
from typing import Protocol

import torch

from kernels import compact_kv, verify_ancestors
from kernels.attention import max_tree_depth
from kernels.layers import ModelArgs
from kernels.topk import top_k
from proto.tree import DraftTree, random_tree
from verifier.model import Transformer


class Target(Protocol):
    vocab_size: int
    max_seq_len: int
    length: int  # committed tokens in the KV cache
    max_tree_depth: int  # the deepest draft node the next verify_forward may take (deeper: prune first)

    def prefill(self, tokens: list[int]) -> torch.Tensor:
        """Start a new sequence; returns a state row per prompt token [T, ...]."""

    def verify_forward(self, pending: int, tree: DraftTree | None) -> torch.Tensor:
        """State rows [N+1, ...]: row 0 after `pending`, row i+1 after draft node i (N = 0 without a tree)."""

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Next-token logits [M, V] float32 for state rows [M, ...]."""

    def commit(self, accepted: list[int]) -> None:
        """Keep the pending token and the accepted nodes (root to deepest) of the last forward."""


ONE_ROW = torch.ones(1, 1, dtype=torch.bool)  # a decoding step's ancestors: the pending token itself


class TorchTarget:
    def __init__(self, model: Transformer):
        self.model = model
        self.vocab_size = model.args.vocab_size
        self.max_seq_len = model.max_seq_len
        self.length = 0

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @property
    def embedding(self) -> torch.Tensor:
        """The token embedding [V, dim], which learned drafters share."""
        return self.model.tok_embeddings.weight

    @property
    def max_tree_depth(self) -> int:
        return max_tree_depth(self.length)

    def prefill(self, tokens: list[int]) -> torch.Tensor:
        n = len(tokens)
        if not 0 < n <= self.max_seq_len:
            raise ValueError(f"prompt of {n} tokens does not fit the KV cache of {self.max_seq_len}")
        states = self.model(torch.tensor(tokens), torch.arange(n), 0, None)
        self.length = n
        return states

    def verify_forward(self, pending: int, tree: DraftTree | None) -> torch.Tensor:
        start = self.length
        n = 0 if tree is None else len(tree)
        if start + n + 1 > self.max_seq_len:
            raise ValueError(f"KV cache full: {start} cached + {n + 1} new > {self.max_seq_len}")
        if tree is None:
            return self.model(torch.tensor([pending]), torch.tensor([start]), start, ONE_ROW)
        if tree.depth > self.max_tree_depth:
            raise ValueError(f"draft tree of depth {tree.depth} at length {start}: prune it to max_tree_depth first")
        tokens = torch.tensor((pending,) + tree.tokens)
        positions = start + torch.tensor((0,) + tree.depths)  # depth along the path, as sequential decoding
        return self.model(tokens, positions, start, verify_ancestors(tree.parents))

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(rows)

    def commit(self, accepted: list[int]) -> None:
        # the forward wrote the pending token at slot `length` and node i at slot length + 1 + i
        compact_kv(self.model.kv, torch.tensor(accepted, dtype=torch.long) + self.length + 1, self.length + 1)
        self.length += 1 + len(accepted)

    def teacher(self, tokens: torch.Tensor, need: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        """Batched teacher forcing for drafter training, the KV cache untouched: tokens [B, T] (rows
        right-padded), need [B, T] bool (the positions whose next-token distribution the loss reads).
        Returns the final hidden states [B, T, dim] and, where `need`, the target's top-k next-token ids
        [B, T, k] int32 and probabilities [B, T, k] float16 (zeros elsewhere: the LM head is the costly
        part, so it runs only there)."""
        hidden = self.model.teacher_forward(tokens)
        ids = torch.zeros(*tokens.shape, k, dtype=torch.int32)
        probs = torch.zeros(*tokens.shape, k, dtype=torch.float16)
        ids[need], probs[need] = top_k(self.model.lm_head, hidden[need], k, chunk=1024)
        return hidden, ids, probs


def plain_rows(target: TorchTarget, pending: int, tree: DraftTree) -> torch.Tensor:
    """What plain decoding computes at each row of verify_forward(pending, tree): logits [N+1, V], row 0
    after the pending token, row i+1 after node i. One decoding forward per row, walking the tree depth
    first: a node's token is decoded at slot start + depth with the pending token and its ancestors, the
    most recent writes, in the slots before it. The committed prefix is left as it was (tree within
    max_tree_depth)."""
    start = target.length
    rows = [target.logits(target.verify_forward(pending, None))[0]]
    children: dict[int, list[int]] = {}
    for i, p in enumerate(tree.parents):
        children.setdefault(p, []).append(i)
    plain: dict[int, torch.Tensor] = {}
    stack = list(reversed(children.get(-1, [])))
    while stack:
        node = stack.pop()
        target.length = start + tree.depths[node]
        plain[node] = target.logits(target.verify_forward(tree.tokens[node], None))[0]
        stack += reversed(children.get(node, []))
    target.length = start
    return torch.stack(rows + [plain[i] for i in range(len(tree))])


def tree_divergence(target: TorchTarget, trees: int = 2, nodes: int = 16, prompt_len: int = 96, seed: int = 0):
    """How often this target's tree rows differ from plain decoding's (exactness at temperature 0 needs
    never): random prompts, random trees cut to max_tree_depth. Returns (rows compared, rows whose logits
    differ in some bit, rows whose argmax differs). Leaves the cache empty."""
    rng = random.Random(seed)
    v = target.vocab_size
    rows = differ = flips = 0
    for _ in range(trees):
        target.prefill([rng.randrange(v) for _ in range(prompt_len)])
        tree, _ = random_tree(nodes, v, rng).within_depth(target.max_tree_depth)
        if tree is None:
            continue
        pending = rng.randrange(v)
        spec = target.logits(target.verify_forward(pending, tree))
        plain = plain_rows(target, pending, tree)
        rows += len(spec)
        differ += int((spec != plain).any(-1).sum())
        flips += int((spec.argmax(-1) != plain.argmax(-1)).sum())
    target.length = 0
    return rows, differ, flips
