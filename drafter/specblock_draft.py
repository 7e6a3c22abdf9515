"""SpecBlockDrafter: draft trees from a SpecBlock model (drafter/specblock.py), one session per object.

The session's committed tokens (and the target's features) run through the model's context stream into a
ContextCache; each round drafts a block from the newest context position and grows a tree from it, by
SpecBlockDraftConfig.tree:

- best_first: nodes in order of path probability (the product of draft probabilities from the root),
  each position's candidates as many as the rank head says;
- frontier: EAGLE-2's dynamic tree, expanded depth by depth, then reranked;
- sampled: delayed tree expansion with i.i.d. sibling groups, carrying the draft distribution of every
  row (for the sampled verification rules).

A node whose continuation its block did not draft (not its position's top-1, or the block's last
position) is expanded by a new block that *inherits* the node's state and token, while max_blocks
allows.

Shapes: K = block_size, B = blocks started in one forward, D = dim, Vd = draft vocabulary size."""

import heapq
import typing
from dataclasses import dataclass, field, replace

import torch

from drafter.hybrid import Scored
from drafter.selector import cached_selector, step_features
from drafter.specblock import ContextCache, Drafted, Forward, NewContext, SpecBlock, Starts, Steps, drive
from proto import checks
from proto.interface import VerifierUpdate
from proto.tree import DraftTree


@dataclass
class SpecBlockDraftConfig:
    checkpoint: str = "models/specblock-smollm2"  # folder with drafter.safetensors + config.json (committed)
    max_blocks: int = 4  # drafter forwards per tree (the first from the context, then inheritances)
    max_branch: int = 4  # best_first: candidates per position at most, whatever the rank head says
    # best_first: deterministic tree, candidates chosen by path probability and the rank head, one
    # forward per node expanded by a new block. frontier: EAGLE-2's dynamic tree: depth by depth, the
    # max_branch most probable nodes of the newest depth get max_branch children each, their new blocks
    # in one batched forward; then the max_nodes most probable drafted nodes form the tree.
    # sampled: delayed tree expansion with i.i.d. sibling groups (for verify.rule specinfer / spectr /
    # traversal): one sampled path of `delay` tokens, then `branches` i.i.d. continuations of `rollout`
    # sampled tokens each (cut to fit the node budget)
    tree: typing.Literal["best_first", "frontier", "sampled"] = "best_first"
    # best_first: leave out nodes whose path probability (the product of draft probabilities from the root)
    # is below this: a chain verifier (vLLM) then verifies only the tokens the drafter is confident of, and a
    # step where even the best first token is below it proposes nothing. 0 = fill the budget
    min_prob: float = 0.0
    delay: int = 0  # d: depth of the single path before branching (0 = branch at the root)
    branches: int = 2  # k: i.i.d. continuations drawn at depth d
    rollout: int = 4  # tokens per continuation
    # how d is chosen per step: the fixed `delay`; uniformly among `delays` (to trace training data for
    # the selector, see eval.trace); or by the neural selector in folder `selector` (drafter/selector.py)
    select: typing.Literal["fixed", "random", "neural"] = "fixed"
    delays: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # select: random's choices (neural: its traces')
    selector: str = "models/selector-smollm2"

    def validate(self) -> None:
        checks.positive(self, "max_blocks", "max_branch", "branches", "rollout")
        checks.nonneg(self, "delay")
        if not 0 <= self.min_prob < 1:
            raise ValueError(f"min_prob: must be in [0, 1), got {self.min_prob}")
        if not self.delays or any(v < 0 for v in self.delays):
            raise ValueError(f"delays: a non-empty list of delays >= 0, got {self.delays}")


EXTEND_CHUNK = 512  # context positions encoded per forward: bounds attention's scores for a long prompt


class Block(typing.NamedTuple):
    """A drafted block (deterministic trees): its states and, per block position, its candidates."""

    states: torch.Tensor  # [K, D] normed
    tokens: list[list[int]]  # [K][n] candidate target token ids, best first
    probs: list[list[float]]  # [K][n] their draft probabilities
    start: int  # the position of its start; block position j drafts for position start + j + 1
    path: list[int]  # the tree's drafted starts it attends to (cache slots after the context), its own last


class SampledBlock(typing.NamedTuple):
    """A drafted block of a sampled tree."""

    q: torch.Tensor  # [K, Vd] softmax(draft logits / temperature) per block position
    top1: list[int]  # [K] each position's most probable token: what the block's next position assumed
    states: torch.Tensor  # [K, D] normed
    start: int
    path: list[int]


class Candidate(typing.NamedTuple):
    """A best-first heap entry: a drafted token not yet in the tree. Entries order by (neg_prob, order)."""

    neg_prob: float  # minus its path probability (the product of draft probabilities from the root)
    order: int  # insertion order: ties go to the earlier entry
    parent: int  # its parent node, -1 at the root
    token: int
    block: Block  # the block that drafted it, at block position j
    j: int
    top1: bool  # its position's first candidate: its block already drafted what follows it


class Node(typing.NamedTuple):
    """A drafted node of a frontier tree (before the rerank picks the tree's nodes)."""

    prob: float  # path probability
    parent: int  # -1 at the root
    token: int
    depth: int  # 1 for a root
    block: Block  # the block that drafted it, at block position j
    j: int


class Cursor(typing.NamedTuple):
    """Where a sampled node's children are drawn from: position j of a block."""

    block: SampledBlock
    j: int


class SpecBlockDrafter:
    """The Drafter interface over a SpecBlock model, one session per object. Needs the target's hidden
    states in every update (VerifierUpdate.hidden).

    Tree growth, best-first by path probability within the node budget: the context block's positions
    form a chain (each position's candidates hang under the previous position's top-1); the rank head
    says how many candidates a position gets (its predicted rank + 1, at most max_branch). A node whose
    continuation is not in its block (a non-top-1 candidate, or the block's last position) is expanded by
    a new block that inherits the node's state and token, while max_blocks allows."""

    def __init__(self, model: SpecBlock, cfg: SpecBlockDraftConfig):
        self.model, self.cfg = model, cfg
        self.cache = ContextCache(model)
        self.version = model.version  # the weights the cache was computed with
        # the session's tokens and target features from the context's first position on: a session longer
        # than the model's positions slides (see _slide), so both stay within max_seq_len
        self.tokens: list[int] = []
        # [n, D] chunks, one row per context position (features conditioning): what _slide re-encodes the
        # kept context from, and _recompute the whole context when the weights change
        self.feats: list[torch.Tensor] = []
        self.dropped = 0  # committed tokens slid out of the context
        self.last_u: torch.Tensor | None = None  # input of the newest context position: the next block's start
        self.generator = torch.Generator().manual_seed(0)  # sampled trees: the drafter's own draws
        self.selector = cached_selector(cfg.selector) if cfg.tree == "sampled" and cfg.select == "neural" else None
        if self.selector is not None and self.selector.mean.shape[0] != 2 * model.cfg.block_size + 2:
            raise ValueError(
                f"drafter.specblock.selector: {cfg.selector} was trained on a drafter with blocks of "
                f"{(self.selector.mean.shape[0] - 2) // 2}, this one has {model.cfg.block_size}"
            )
        self.recent: list[int] = []  # accepted draft tokens of the session's steps so far
        self.trace: list[dict] = []  # sampled trees: per step {"features", "delay", "accepted"} (selector data)
        self.forwards = 0  # drafter forwards (blocks) over the session

    def _blocks(
        self, m: SpecBlock, drafted: Drafted, starts: list[int], paths: list[list[int]], ranked: bool
    ) -> list[Block]:
        """Blocks from one forward's B starts, every position's candidates at once: as many as the rank
        head says (at most max_branch), or max_branch each when not ranked."""
        states = drafted.states  # [K, B, D]
        top = drafted.logits.softmax(-1).topk(self.cfg.max_branch)  # [K, B, max_branch]
        tokens, probs = m.draft_ids[top.indices].tolist(), top.values.tolist()
        if ranked:
            counts = (m.rank_head(states).argmax(-1) + 1).tolist()  # [K, B]
            tokens = [[row[:c] for row, c in zip(rows, cs)] for rows, cs in zip(tokens, counts)]
            probs = [[row[:c] for row, c in zip(rows, cs)] for rows, cs in zip(probs, counts)]
        return [
            Block(states[:, b], [rows[b] for rows in tokens], [rows[b] for rows in probs], start, path)
            for b, (start, path) in enumerate(zip(starts, paths))
        ]

    def _inherit(
        self, m: SpecBlock, nodes: list[tuple[Block | SampledBlock, int, int]], drafted: int
    ) -> Steps[tuple[Drafted, list[int], list[list[int]]]]:
        """New blocks from drafted nodes (their block, block position j, token), in one forward: each
        starts at its node's position with the node's state standing in for the feature, in the cache slot
        after the tree's `drafted` earlier starts, attending to those of its own path. Returns what the
        forward drafted, their start positions and paths."""
        self.forwards += 1
        starts = [blk.start + j + 1 for blk, j, _ in nodes]
        paths = [blk.path + [drafted + b] for b, (blk, _, _) in enumerate(nodes)]
        seen = torch.zeros(len(nodes), drafted, dtype=torch.bool)  # [B, drafted]
        for b, (blk, _, _) in enumerate(nodes):
            seen[b, blk.path] = True
        feats = torch.stack([blk.states[j] for blk, j, _ in nodes])  # [B, D]
        u = m.fc(torch.cat([feats, m.embedding[torch.tensor([tok for _, _, tok in nodes])]], -1))
        return (yield Forward(m, "draft_blocks", [Starts(self.cache, u, torch.tensor(starts), seen)]))[0], starts, paths

    def _encode(self, m: SpecBlock, feats: torch.Tensor | None, toks: torch.Tensor) -> Steps[None]:
        """n new context positions into the cache: their features [n, D] (None when conditioning on tokens)
        and tokens toks [n + 1] (each position's token, then the next one), in forwards of at most
        EXTEND_CHUNK positions. Each is a step, so a long prompt bounds attention's memory and, in the
        sidecar, lets other sessions' forwards run between its chunks."""
        n = len(toks) - 1
        for i in range(0, n, EXTEND_CHUNK):
            j = min(i + EXTEND_CHUNK, n)
            new = NewContext(self.cache, None if feats is None else feats[i:j], toks[i:j], toks[i + 1 : j + 1])
            self.last_u = (yield Forward(m, "encode", [new]))[0]

    def _absorb(self, update: VerifierUpdate) -> Steps[tuple[SpecBlock, int] | None]:
        """The update's committed tokens (and features) into the context cache; returns the drafting
        model and the newest context position t, or None when there is nothing to draft from."""
        cfg = self.model.cfg
        self.tokens += update.new_tokens
        if update.feedback is not None:
            self.recent.append(len(update.feedback.accepted))
            if self.trace and "accepted" not in self.trace[-1]:
                self.trace[-1]["accepted"] = self.recent[-1]
        m = self.model.drafting()
        if self.version != self.model.version:  # the weights changed under this session: recompute its context
            yield from self._recompute(m)
        start = self.cache.length  # context positions so far; the update brings the next ones
        if cfg.conditioning == "tokens":
            n_f = len(self.tokens) - 1  # every committed token but the newest (its next token is pending)
        elif update.hidden is None:
            raise ValueError(
                "this SpecBlock drafter conditions on the target's hidden states: send them in every "
                "update, or serve a drafter trained with conditioning: tokens"
            )
        else:
            n_f = start + update.hidden.shape[0]  # committed positions with a feature; tokens[n_f] is pending
            self.feats.append(update.hidden)
        if n_f + update.max_nodes > cfg.max_seq_len:  # a tree would run past the model's positions
            n_f = yield from self._slide(m, n_f)
        elif n_f > start:
            yield from self._encode(m, update.hidden, torch.tensor(self.tokens[start : n_f + 1]))
        if self.last_u is None or update.max_nodes <= 0:
            return None
        return m, n_f - 1

    def _capped(self, update: VerifierUpdate) -> VerifierUpdate:
        half = self.model.cfg.max_seq_len // 2  # a tree's depth must fit in the positions after the context
        return replace(update, max_nodes=half) if update.max_nodes > half else update

    def draft(self, update: VerifierUpdate) -> DraftTree | None:
        return drive(self.draft_steps(update))

    def scored(self, update: VerifierUpdate) -> Scored | None:
        """A deterministic tree with each node's draft probability given its parent (drafter.hybrid's
        source interface); max_nodes 0 only advances the context."""
        return drive(self.scored_steps(update))

    # inference_mode, not no_grad: no autograd bookkeeping per op; what it creates (a sampled tree's
    # draft_probs) is only read outside it. On a generator it holds while the generator runs.
    @torch.inference_mode()
    def draft_steps(self, update: VerifierUpdate) -> Steps[DraftTree | None]:
        """draft, as steps that yield each forward (see Steps)."""
        update = self._capped(update)
        if self.cfg.tree != "sampled":
            found = yield from self._scored(update)
            return found.tree(update.vocab_size, update.max_nodes) if found else None
        absorbed = yield from self._absorb(update)
        if absorbed is None:
            return None
        m, t = absorbed
        drafted = yield from self._root(m, t)
        temperature = update.sampling.temperature if update.sampling and update.sampling.temperature > 0 else 1.0
        q = (drafted.logits[:, 0] / temperature).softmax(-1)  # [K, Vd]: the selector's features
        return (
            yield from self._sampled_tree(
                m, drafted.states[:, 0], q, t, update.max_nodes, update.vocab_size, temperature, self._delay(q)
            )
        )

    @torch.inference_mode()
    def scored_steps(self, update: VerifierUpdate) -> Steps[Scored | None]:
        """scored, as steps that yield each forward (see Steps)."""
        return (yield from self._scored(self._capped(update)))

    def _root(self, m: SpecBlock, t: int) -> Steps[Drafted]:
        """The context block: drafted from the newest context position t."""
        self.forwards += 1
        return (yield Forward(m, "draft_blocks", [Starts(self.cache, self.last_u[None], torch.tensor([t]))]))[0]

    def _scored(self, update: VerifierUpdate) -> Steps[Scored | None]:
        absorbed = yield from self._absorb(update)
        if absorbed is None:
            return None
        m, t = absorbed
        root = self._blocks(m, (yield from self._root(m, t)), [t], [[]], ranked=self.cfg.tree == "best_first")[0]
        if self.cfg.tree == "frontier":
            return (yield from self._frontier_tree(m, root, update.max_nodes))
        return (yield from self._best_first_tree(m, root, update.max_nodes))

    def _slide(self, m: SpecBlock, n_f: int) -> Steps[int]:
        """Sliding context: keep the newest max_seq_len / 2 of the n_f context positions (a tree of at most
        that many nodes fits after them), re-encoded from position 0 with the current weights, in chunks
        that bound attention's memory. Returns the new context length."""
        keep = m.cfg.max_seq_len // 2
        drop = n_f - keep
        self.tokens, self.dropped = self.tokens[drop:], self.dropped + drop
        self.feats = [torch.cat(self.feats)[-keep:].clone()] if self.feats else []  # not a view of the whole
        self.cache, self.version = ContextCache(m), self.model.version
        yield from self._encode(m, self.feats[0] if self.feats else None, torch.tensor(self.tokens[: keep + 1]))
        return keep

    def _recompute(self, m: SpecBlock) -> Steps[None]:
        """The context cache again from the session's tokens and features, with the current weights."""
        n = self.cache.length
        self.cache, self.version = ContextCache(m), self.model.version
        if n:
            feats = torch.cat(self.feats)[:n] if self.feats else None
            yield from self._encode(m, feats, torch.tensor(self.tokens[: n + 1]))

    def _best_first_tree(self, m: SpecBlock, root: Block, max_nodes: int) -> Steps[Scored | None]:
        k = m.cfg.block_size
        blocks, drafted = 1, 0
        heap = [
            Candidate(-p, order, -1, tok, root, 0, order == 0)
            for order, (tok, p) in enumerate(zip(root.tokens[0], root.probs[0]))
        ]
        order = len(heap)
        heapq.heapify(heap)
        tokens, parents, path_probs = [], [], []
        while heap and len(tokens) < max_nodes and -heap[0].neg_prob >= self.cfg.min_prob:
            c = heapq.heappop(heap)
            node = len(tokens)
            tokens.append(c.token)
            parents.append(c.parent)
            path_probs.append(-c.neg_prob)
            if c.top1 and c.j + 1 < k:  # the block already drafted the next position
                blk, j = c.block, c.j + 1
            elif blocks < self.cfg.max_blocks:  # inherit: a new block from this node
                blocks += 1
                new = yield from self._inherit(m, [(c.block, c.j, c.token)], drafted)
                blk, j = self._blocks(m, *new, ranked=True)[0], 0
                drafted += 1
            else:
                continue
            for rank, (tok, p) in enumerate(zip(blk.tokens[j], blk.probs[j])):
                heapq.heappush(heap, Candidate(c.neg_prob * p, order, node, tok, blk, j, rank == 0))
                order += 1
        if not tokens:
            return None
        return Scored(tokens, parents, [p / (path_probs[a] if a >= 0 else 1.0) for p, a in zip(path_probs, parents)])

    def _frontier_tree(self, m: SpecBlock, root: Block, max_nodes: int) -> Steps[Scored]:
        """EAGLE-2's dynamic tree. Expansion, depth by depth: the max_branch drafted nodes of the newest
        depth with the highest path probability get max_branch children each (no rank head):
        from the next position of their block when they are its top-1, else from new blocks that inherit
        them, all started in one batched forward (each attending to its own drafted ancestors), while
        max_blocks allows. Rerank: the max_nodes drafted nodes of highest path probability form the tree
        (a parent's is never below its child's, so every chosen node's parent is chosen)."""
        cfg, k = self.cfg, m.cfg.block_size
        nodes: list[Node] = []

        def add_children(parent: int, block: Block, j: int) -> list[int]:
            p, depth = (1.0, 0) if parent < 0 else (nodes[parent].prob, nodes[parent].depth)
            if depth >= max_nodes:
                return []
            first = len(nodes)
            nodes.extend(
                Node(p * q, parent, tok, depth + 1, block, j) for tok, q in zip(block.tokens[j], block.probs[j])
            )
            return list(range(first, len(nodes)))

        newest = add_children(-1, root, 0)
        blocks, drafted = 1, 0
        while newest:
            chosen = sorted(newest, key=lambda i: -nodes[i].prob)[: cfg.max_branch]
            newest, inherit = [], []
            for i in chosen:
                n = nodes[i]
                if n.j + 1 < k and n.token == n.block.tokens[n.j][0]:  # its block's top-1: it drafted what follows
                    newest += add_children(i, n.block, n.j + 1)
                else:
                    inherit.append(i)
            if not inherit or blocks >= cfg.max_blocks:
                continue
            blocks += 1
            starts = [(nodes[i].block, nodes[i].j, nodes[i].token) for i in inherit]
            new = self._blocks(m, *(yield from self._inherit(m, starts, drafted)), ranked=False)
            drafted += len(inherit)
            for i, block in zip(inherit, new):
                newest += add_children(i, block, 0)
        keep = sorted(range(len(nodes)), key=lambda i: (-nodes[i].prob, nodes[i].depth))[:max_nodes]
        index = {old: new for new, old in enumerate(keep)}
        return Scored(
            [nodes[i].token for i in keep],
            [index[nodes[i].parent] if nodes[i].parent >= 0 else -1 for i in keep],
            [nodes[i].prob / (nodes[nodes[i].parent].prob if nodes[i].parent >= 0 else 1.0) for i in keep],
        )

    def _delay(self, q: torch.Tensor) -> int:
        """This step's d (see SpecBlockDraftConfig.select); traced with its features when not fixed."""
        cfg = self.cfg
        if cfg.select == "fixed":
            return cfg.delay
        feats = step_features(q, self.recent, self.dropped + len(self.tokens))
        if cfg.select == "neural":
            d = self.selector.choose(feats)
        else:
            d = cfg.delays[int(torch.randint(len(cfg.delays), (1,), generator=self.generator))]
        if self.trace and "accepted" not in self.trace[-1]:
            self.trace.pop()  # its step got no feedback (the verifier skipped it)
        self.trace.append({"features": [round(v, 5) for v in feats.tolist()], "delay": d})
        return d

    # One function, longer than most: add and draw are closures over the tree being grown (tokens, parents,
    # cursors, the blocks started), which a split would have to pass around as one more object.
    def _sampled_tree(
        self,
        m: SpecBlock,
        states: torch.Tensor,
        q: torch.Tensor,
        t: int,
        max_nodes: int,
        vocab_size: int,
        temperature: float,
        delay: int,
    ) -> Steps[DraftTree | None]:
        """Delayed tree expansion: a path of `delay` tokens sampled one after another, then
        cfg.branches i.i.d. draws from the row at its end, each continued by a sampled path to
        cfg.rollout tokens (cut to fit max_nodes). A node's children are drawn from
        q = softmax(draft logits / temperature) of a block position: the next position of the same block
        when the node's token is that position's top-1 (what the block assumed), else the first position
        of a new block inheriting the node's state and token; a path stops early once max_blocks
        forwards are spent. The tree carries every row's q over the full vocabulary (zeros where no
        children are drawn)."""
        cfg = self.cfg
        blocks, drafted = 1, 0
        tokens, parents = [], []
        cursors: list[Cursor | None] = []  # per row (0: the root, i + 1: node i): where its children come from
        delay = min(delay, max_nodes)
        length = min(cfg.rollout, (max_nodes - delay) // cfg.branches)  # tokens per continuation

        def block(q: torch.Tensor, st: torch.Tensor, start: int, path: list[int]) -> SampledBlock:
            return SampledBlock(q, m.draft_ids[q.argmax(-1)].tolist(), st, start, path)

        def add(tok: int, parent: int, grow: bool) -> Steps[int]:
            """Append a node drawn at its parent's cursor, and its own cursor (None when it gets no
            children: grow False, or no forward left). Returns its id."""
            nonlocal blocks, drafted
            tokens.append(tok)
            parents.append(parent)
            blk, j = cursors[parent + 1]
            nxt = None
            if grow and j + 1 < m.cfg.block_size and tok == blk.top1[j]:
                nxt = Cursor(blk, j + 1)
            elif grow and blocks < cfg.max_blocks:
                blocks += 1
                new, starts, paths = yield from self._inherit(m, [(blk, j, tok)], drafted)
                drafted += 1
                q = (new.logits[:, 0] / temperature).softmax(-1)
                nxt = Cursor(block(q, new.states[:, 0], starts[0], paths[0]), 0)
            cursors.append(nxt)
            return len(tokens) - 1

        def draw(row: int, n: int) -> list[int]:  # n i.i.d. tokens from a row's q, over the draft vocabulary
            blk, j = cursors[row]
            return m.draft_ids[torch.multinomial(blk.q[j], n, replacement=True, generator=self.generator)].tolist()

        node = -1
        cursors.append(Cursor(block(q, states, t, []), 0))  # the context block's q, computed once by draft
        for i in range(delay):
            node = yield from add(draw(node + 1, 1)[0], node, grow=i + 1 < delay or length > 0)
            if cursors[node + 1] is None:
                break
        if cursors[node + 1] is not None and length > 0:
            for tok in draw(node + 1, cfg.branches):  # the i.i.d. sibling group, drawn at once
                child = yield from add(tok, node, grow=length > 1)
                for i in range(length - 1):
                    if cursors[child + 1] is None:
                        break
                    child = yield from add(draw(child + 1, 1)[0], child, grow=i + 2 < length)
        if not tokens:
            return None
        q_rows = torch.zeros(len(cursors), m.draft_ids.shape[0])  # [N+1, Vd], zeros where no children
        for row, c in enumerate(cursors):
            if c is not None:
                q_rows[row] = c.block.q[c.j]
        draft_probs = torch.zeros(len(cursors), vocab_size).index_copy_(1, m.draft_ids, q_rows)
        return DraftTree(tokens, parents, vocab_size, max_nodes, draft_probs)

    def close(self) -> None:
        self.cache = ContextCache(self.model)
        self.tokens, self.feats, self.last_u, self.recent = [], [], None, []
