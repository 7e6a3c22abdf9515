"""Model-free prompt-lookup drafter: find earlier occurrences of the longest suffix of the context and
propose what followed them, merged into a tree (continuations sharing a prefix share nodes)."""

import heapq
from collections import defaultdict
from dataclasses import dataclass

from drafter.hybrid import Scored
from proto import checks
from proto.interface import VerifierUpdate
from proto.tree import DraftTree


@dataclass
class NgramConfig:
    max_ngram: int = 3  # longest suffix looked up
    min_ngram: int = 2  # shortest suffix worth a match (1-token matches mostly get rejected)
    max_depth: int = 8  # tokens taken from each earlier occurrence
    max_matches: int = 8  # earlier occurrences merged into one tree

    def validate(self) -> None:
        checks.positive(self, "max_depth", "min_ngram", "max_matches")
        if self.max_ngram < self.min_ngram:
            raise ValueError(f"max_ngram: {self.max_ngram} < min_ngram {self.min_ngram}")


class NgramDrafter:
    def __init__(self, cfg: NgramConfig):
        self.cfg = cfg
        self.tokens: list[int] = []
        # n -> n-gram -> end positions j (tokens[j-n:j] is the n-gram), oldest first
        self.index = {n: defaultdict(list) for n in range(cfg.min_ngram, cfg.max_ngram + 1)}

    def _extend(self, new_tokens: list[int]) -> None:
        for tok in new_tokens:
            self.tokens.append(tok)
            j = len(self.tokens)
            for n, table in self.index.items():
                if j >= n:
                    table[tuple(self.tokens[j - n : j])].append(j)

    def _continuations(self) -> list[list[int]]:
        """Continuations after earlier occurrences of the context's suffix: longest match first, then
        most recent first; each occurrence counted once."""
        end, seen, out = len(self.tokens), set(), []
        for n in range(self.cfg.max_ngram, self.cfg.min_ngram - 1, -1):
            if end < n:
                continue
            for j in reversed(self.index[n].get(tuple(self.tokens[end - n :]), ())):
                if j < end and j not in seen:
                    seen.add(j)
                    out.append(self.tokens[j : j + self.cfg.max_depth])
                    if len(out) == self.cfg.max_matches:
                        return out
        return out

    def scored(self, update: VerifierUpdate) -> Scored | None:
        """The tree `draft` returns, with each node's share of its parent's continuations (the roots': of
        all continuations) as its probability given its parent."""
        self._extend(update.new_tokens)
        conts = self._continuations() if update.max_nodes > 0 else []
        if not conts:
            return None
        # Trie of continuations; a node's weight is how many continuations pass through it.
        trie: dict[tuple[int, ...], list] = {}  # path -> [weight, first-seen rank]
        for rank, cont in enumerate(conts):
            for d in range(1, len(cont) + 1):
                node = trie.setdefault(tuple(cont[:d]), [0, rank])
                node[0] += 1
        # Best-first expansion within the budget: a child is offered only once its parent is in,
        # so the output is in topological order.
        heap = [(-w, r, path) for path, (w, r) in trie.items() if len(path) == 1]
        heapq.heapify(heap)
        ids: dict[tuple[int, ...], int] = {}
        tokens, parents, probs = [], [], []
        while heap and len(tokens) < update.max_nodes:
            neg_w, _, path = heapq.heappop(heap)
            ids[path] = len(tokens)
            tokens.append(path[-1])
            parents.append(ids[path[:-1]] if len(path) > 1 else -1)
            probs.append(-neg_w / (trie[path[:-1]][0] if len(path) > 1 else len(conts)))
            for tok in {c[len(path)] for c in conts if len(c) > len(path) and tuple(c[: len(path)]) == path}:
                w, r = trie[path + (tok,)]
                heapq.heappush(heap, (-w, r, path + (tok,)))
        return Scored(tokens, parents, probs)

    def draft(self, update: VerifierUpdate) -> DraftTree | None:
        found = self.scored(update)
        return found.tree(update.vocab_size, update.max_nodes) if found else None

    def close(self) -> None:
        self.tokens.clear()
        for table in self.index.values():
            table.clear()
