"""Model-free prompt-lookup drafter: find earlier occurrences of the longest suffix of the context and
propose what followed them, merged into a tree (continuations sharing a prefix share nodes)."""

import heapq
from collections import defaultdict
from dataclasses import dataclass, replace

from proto import checks
from proto.interface import Drafter, Feedback, VerifierUpdate
from proto.tree import DraftTree, TreeError


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

    def draft(self, update: VerifierUpdate) -> DraftTree | None:
        self._extend(update.new_tokens)
        conts = self._continuations()
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
        tokens, parents = [], []
        while heap and len(tokens) < update.max_nodes:
            _, _, path = heapq.heappop(heap)
            ids[path] = len(tokens)
            tokens.append(path[-1])
            parents.append(ids[path[:-1]] if len(path) > 1 else -1)
            for tok in {c[len(path)] for c in conts if len(c) > len(path) and tuple(c[: len(path)]) == path}:
                w, r = trie[path + (tok,)]
                heapq.heappush(heap, (-w, r, path + (tok,)))
        return DraftTree(tokens, parents, update.vocab_size, update.max_nodes)

    def close(self) -> None:
        self.tokens.clear()
        for table in self.index.values():
            table.clear()


class LookupFirst:
    """Prompt lookup in front of another drafter (`drafter.lookup`): when the n-gram drafter finds a match
    its tree comes first (its first path is what a chain verifier such as vLLM takes), and the other
    drafter's tree fills the rest of the node budget. The other drafter sees every update, with feedback
    restated in its own node ids (empty when the accepted path ran through the lookup's nodes)."""

    def __init__(self, lookup: NgramDrafter, drafter: Drafter):
        self.lookup, self.drafter = lookup, drafter
        self.offset = 0  # where the other drafter's nodes began in the last merged tree

    def draft(self, update: VerifierUpdate) -> DraftTree | None:
        fb, off = update.feedback, self.offset
        if fb is not None:
            ours = bool(fb.accepted) and fb.accepted[0] >= off
            fb = Feedback(
                [n - off for n in fb.accepted] if ours else [],
                {n - off: p for n, p in fb.target_probs.items() if n >= off},
                {n if n < 0 else n - off: v for n, v in fb.target_topk.items() if n < 0 or n >= off},
            )
        found = self.lookup.draft(update)  # the n-gram drafter takes no feedback
        tree, self.offset = merge(found, self.drafter.draft(replace(update, feedback=fb)), update.max_nodes)
        return tree

    def close(self) -> None:
        self.lookup.close()
        self.drafter.close()


def merge(first: DraftTree | None, second: DraftTree | None, max_nodes: int) -> tuple[DraftTree | None, int]:
    """first's nodes, then second's (their parents shifted) as far as max_nodes allows; returns the tree and
    the offset of second's nodes in it. Neither may be a sampled tree (draft_probs would not merge)."""
    trees = [t for t in (first, second) if t is not None]
    if any(t.draft_probs is not None for t in trees):
        raise TreeError("sampled trees cannot be merged")
    if not trees:
        return None, 0
    offset = len(first) if first is not None else 0
    tokens = (first.tokens if first is not None else ()) + (second.tokens if second is not None else ())
    parents = (first.parents if first is not None else ()) + (
        tuple(p + offset if p >= 0 else -1 for p in second.parents) if second is not None else ()
    )
    return DraftTree(tokens[:max_nodes], parents[:max_nodes], trees[0].vocab_size, max_nodes), offset
