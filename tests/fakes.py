"""Fakes for unit tests, named as such: a table-driven target over a tiny vocabulary and a drafter
that proposes a fixed tree. Never used outside tests."""

import functools

import torch

from proto.tree import DraftTree


def fake_logits(context: tuple[int, ...], vocab: int, seed: int = 0) -> torch.Tensor:
    """Deterministic next-token logits [V] for a context: depends on the last two tokens, spread
    enough that no token is negligible or dominant."""
    return _fake_logits(tuple(context[-2:]), vocab, seed)


@functools.cache
def _fake_logits(last_two: tuple[int, ...], vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash((seed,) + last_two) % (2**31))
    return 1.5 * torch.randn(vocab, generator=g)


class FakeTarget:
    """Implements the Target protocol with fake_logits; its 'KV cache' is the committed token list and
    its state rows are the logits themselves."""

    def __init__(self, vocab: int, max_seq_len: int = 10_000, seed: int = 0):
        self.vocab_size, self.max_seq_len, self.seed = vocab, max_seq_len, seed
        self.committed: list[int] = []
        self.length = 0
        self.max_tree_depth = 10_000  # no attention kernel here: any depth verifies exactly
        self._last = None

    def prefill(self, tokens):
        self.committed = list(tokens)
        self.length = len(tokens)
        return fake_logits(tuple(self.committed), self.vocab_size, self.seed)[None]

    def verify_forward(self, pending, tree):
        rows = [tuple(self.committed) + (pending,)]
        if tree is not None:
            paths = []
            for i, par in enumerate(tree.parents):
                paths.append((paths[par] if par >= 0 else ()) + (tree.tokens[i],))
                rows.append(rows[0] + paths[-1])
        self._last = (pending, tree)
        return torch.stack([fake_logits(r, self.vocab_size, self.seed) for r in rows])

    def logits(self, rows):
        return rows

    def commit(self, accepted):
        pending, tree = self._last
        self.committed += [pending] + [tree.tokens[i] for i in accepted]
        self.length = len(self.committed)


class FixedTreeDrafter:
    """Proposes the same tree shape every step: tokens[i] for node i under parents[i]."""

    def __init__(self, tokens, parents):
        self.tokens, self.parents = tokens, parents

    def draft(self, update):
        n = min(len(self.tokens), update.max_nodes)
        keep = [i for i in range(n) if self.parents[i] < n]
        return DraftTree(
            [self.tokens[i] for i in keep], [self.parents[i] for i in keep], update.vocab_size, update.max_nodes
        )

    def close(self):
        pass


def fake_draft_probs(context: tuple[int, ...], vocab: int) -> torch.Tensor:
    """A fake drafter's q [V] for a context: related to the fake target's p but different from it."""
    return (fake_logits(context, vocab, seed=0) * 0.5 + fake_logits(context, vocab, seed=7)).softmax(-1)


class FakeSampledDrafter:
    """Builds sampled trees: every node at depth d gets branching[d] children drawn i.i.d. from
    fake_draft_probs of its path (duplicates allowed), and the tree carries those q rows."""

    def __init__(self, branching: list[int], seed: int):
        self.branching, self.context = branching, []
        self.gen = torch.Generator().manual_seed(seed)

    def draft(self, update):
        self.context += update.new_tokens
        v = update.vocab_size
        tokens, parents, rows = [], [], [fake_draft_probs(tuple(self.context), v)]
        frontier = [(-1, tuple(self.context))]  # (node, its context) whose children are drawn next
        for k in self.branching:
            nxt = []
            for node, ctx in frontier:
                q = rows[node + 1]
                for tok in torch.multinomial(q, k, replacement=True, generator=self.gen).tolist():
                    if len(tokens) == update.max_nodes:
                        break
                    tokens.append(tok)
                    parents.append(node)
                    rows.append(fake_draft_probs(ctx + (tok,), v))
                    nxt.append((len(tokens) - 1, ctx + (tok,)))
            frontier = nxt
        if not tokens:
            return None
        return DraftTree(tokens, parents, v, update.max_nodes, torch.stack(rows))

    def close(self):
        pass
