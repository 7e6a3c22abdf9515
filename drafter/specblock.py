"""SpecBlock: a block-iterative, feature-conditioned drafter.

Inputs, EAGLE-style: at committed position s, u_s = fc([f_s, e(x_{s+1})]) where f_s is the target's final
hidden state after reading x_{<=s} and e the target's (frozen, shared) token embedding. A *context
stream* of these inputs runs through a few causal decoder layers with a KV cache.

One forward drafts a block of K dependent positions from a start s: block position 1 is the context
stream's own position s (it predicts x_{s+2}); positions j = 2..K start from learned embeddings and see
earlier positions only through the **layer-wise shift**: at every layer, position j adds a projection of
position j-1's state, so position j depends on 1..j-1 without another forward. Every block position
attends to the context (keys and values of the context stream up to s), never to later positions.

Heads on the block states (normed): logits over a reduced **draft vocabulary** (rows of the target's
tied embedding, so the head costs |draft vocab| instead of 49152 columns), a **rank head** predicting
how deep in the drafter's sorted list the target's token sits (used to allocate branching per position),
and the state itself regresses the target's feature at that position, so a new block can **inherit** it:
a block may start from any drafted node, with that node's state standing in for f and its token as x.

Shapes: K = block_size, T = positions, D = dim, Vd = draft vocabulary size."""

import heapq
import json
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from drafter.selector import cached_selector, step_features
from kernels.layers import ModelArgs, RMSNorm, apply_rope, rope_tables
from proto import checks
from proto.interface import VerifierUpdate
from proto.tree import DraftTree


@dataclass
class SpecBlockConfig:
    block_size: int = 4  # K dependent positions per forward
    n_layers: int = 1
    n_heads: int = 9
    head_dim: int = 64
    intermediate_size: int = 1536
    draft_vocab: int = 4096  # most frequent target tokens in the training data
    max_rank: int = 8  # rank head classes 0..max_rank-1 (the last means "that deep or absent")
    max_seq_len: int = 4096
    # What a context position is conditioned on besides its next token: the target's hidden state there
    # ("features", EAGLE-like), or that position's own token embedding ("tokens": the context stream's
    # attention is then the drafter's own context encoder; for verifiers that expose no hidden states, vLLM)
    conditioning: typing.Literal["features", "tokens"] = "features"
    # False: no layer-wise shift, so positions 2..K are independent given the context (the parallel-heads
    # baseline, Medusa / blockwise-parallel style: the ablation of what the shift gives)
    shift: bool = True

    def validate(self) -> None:
        checks.positive(self, "block_size", "n_layers", "draft_vocab", "max_rank")


class Layer(nn.Module):
    """A pre-norm decoder layer whose queries may come from several streams but whose keys and values
    come from the context stream only."""

    def __init__(self, dim: int, cfg: SpecBlockConfig, eps: float):
        super().__init__()
        self.cfg = cfg
        self.wq = nn.Linear(dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * cfg.n_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, dim, bias=False)
        self.w13 = nn.Linear(dim, 2 * cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, dim, bias=False)
        self.shift = nn.Linear(dim, dim, bias=False) if cfg.shift else None  # position j-1's state into j
        self.attn_norm, self.ffn_norm = RMSNorm(dim, eps), RMSNorm(dim, eps)
        if cfg.shift:
            nn.init.zeros_(self.shift.weight)

    def kv(self, ctx: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """ctx [T, D] context-stream states -> keys, values [H, T, hd] (keys rotated)."""
        h, hd = self.cfg.n_heads, self.cfg.head_dim
        k, v = self.wkv(self.attn_norm(ctx)).view(-1, 2, h, hd).unbind(1)
        return apply_rope(k.transpose(0, 1)[None], cos, sin)[0], v.transpose(0, 1)

    def forward(self, x: torch.Tensor, keys, values, cos, sin, mask) -> torch.Tensor:
        """x [K, T, D] block states (stream 0 = the context stream); keys/values [H, S, hd];
        cos/sin [K, T, hd] per query position; mask [K, T, S] bool or None."""
        if self.shift is not None:
            x = torch.cat([x[:1], x[1:] + self.shift(x[:-1])])  # layer-wise shift, from the layer's input
        kq, t, d = x.shape
        h, hd = self.cfg.n_heads, self.cfg.head_dim
        q = self.wq(self.attn_norm(x)).view(kq, t, h, hd).transpose(1, 2)  # [K, H, T, hd]
        q = apply_rope(q, cos[:, None], sin[:, None])
        y = F.scaled_dot_product_attention(
            q, keys[None], values[None], attn_mask=None if mask is None else mask[:, None]
        )
        x = x + self.wo(y.transpose(1, 2).reshape(kq, t, h * hd))
        gate, up = self.w13(self.ffn_norm(x)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


class SpecBlock(nn.Module):
    def __init__(self, cfg: SpecBlockConfig, target_args: ModelArgs, embedding: torch.Tensor, draft_ids: torch.Tensor):
        """embedding: the target's token embedding [V, D] (shared, frozen; SmolLM2 ties it to its LM head);
        draft_ids [Vd]: target token ids of the draft vocabulary."""
        super().__init__()
        self.cfg, self.dim = cfg, target_args.dim
        d, eps = target_args.dim, target_args.norm_eps
        self.register_buffer("embedding", embedding.detach().float(), persistent=False)
        self.register_buffer("draft_ids", draft_ids.long())
        self.register_buffer("draft_head", self.embedding[self.draft_ids].contiguous(), persistent=False)  # [Vd, D]
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.block_emb = nn.Parameter(torch.randn(cfg.block_size - 1, d) * 0.02)  # inputs of positions 2..K
        self.layers = nn.ModuleList(Layer(d, cfg, eps) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(d, eps)
        self.rank_head = nn.Linear(d, cfg.max_rank)
        args = ModelArgs(dim=d, head_dim=cfg.head_dim, rope_theta=target_args.rope_theta)
        cos, sin = rope_tables(args, cfg.max_seq_len + cfg.block_size)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # None: frozen weights. An online learner (bandit/online.py) sets it to 0 and bumps it at every kept
        # update; sessions then keep their features, to recompute their cached context when it changes
        self.version: int | None = None

    def inputs(self, feats: torch.Tensor | None, tokens: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """Positions' target features [T, D] (unused, may be None, when conditioning on tokens), their
        tokens [T] and next tokens [T] -> context-stream inputs u [T, D]."""
        cond = self.embedding[tokens] if self.cfg.conditioning == "tokens" else feats.float()
        return self.fc(torch.cat([cond, self.embedding[next_tokens]], dim=-1))

    def draft_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Normed states [..., D] -> logits over the draft vocabulary [..., Vd]."""
        return states @ self.draft_head.T

    def forward_train(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing over one sequence: feats [T, D], tokens [T]. Returns normed block states
        [K, T-1, D]: entry (j, s) is block position j+1 of the block started at s (it predicts
        tokens[s + j + 2]); every start s runs in parallel."""
        k = self.cfg.block_size
        u = self.inputs(feats[:-1], tokens[:-1], tokens[1:])  # [T', D]
        t = u.shape[0]
        x = torch.cat([u[None], self.block_emb[:, None].expand(k - 1, t, -1)])  # [K, T', D]
        pos = torch.arange(t)[None] + torch.arange(k)[:, None]  # [K, T'] query positions
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        ctx_cos, ctx_sin = self.rope_cos[:t], self.rope_sin[:t]
        mask = torch.ones(t, t, dtype=torch.bool).tril()[None].expand(k, t, t)  # query at start s sees keys <= s
        for layer in self.layers:
            keys, values = layer.kv(x[0], ctx_cos, ctx_sin)
            x = layer(x, keys, values, cos, sin, mask)
        return self.norm(x)

    @torch.no_grad()
    def extend(self, cache: "ContextCache", u_new: torch.Tensor) -> None:
        """Run new committed positions' inputs u_new [n, D] through the context stream, appending their
        keys and values to the cache."""
        n, start = u_new.shape[0], cache.length
        pos = torch.arange(start, start + n)
        cos, sin = self.rope_cos[pos][None], self.rope_sin[pos][None]
        mask = torch.ones(n, start + n, dtype=torch.bool).tril(diagonal=start)[None]
        x = u_new[None].float()
        for i, layer in enumerate(self.layers):
            k, v = layer.kv(x[0], self.rope_cos[pos], self.rope_sin[pos])
            cache.keys[i] = torch.cat([cache.keys[i], k], dim=1)
            cache.values[i] = torch.cat([cache.values[i], v], dim=1)
            x = layer(x, cache.keys[i], cache.values[i], cos, sin, mask)
        cache.length += n

    @torch.no_grad()
    def draft_blocks(
        self,
        cache: "ContextCache",
        start_u: torch.Tensor,
        pos: torch.Tensor,
        n_ctx: int,
        inherited: bool,
        pool: list | None = None,
        seen: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list]:
        """Blocks at inference from B starts at once: inputs start_u [B, D] at positions pos [B]. Every
        block attends to the first n_ctx cached context positions; a committed start is the last of them
        (then B = 1). Inherited starts (drafted nodes, their states standing in for f) are not cached:
        each attends, after the context, to the drafted starts of `pool` (per layer (keys, values)
        [H, M, hd]) that `seen` [B, M] marks as its ancestors (None: all of them), i.e. the context it
        would have had were they committed, then to itself. Returns normed block states [K, B, D] and the
        starts' own per-layer (keys, values) [H, B, hd] (empty for a committed start) for descendants' pools."""
        k, b = self.cfg.block_size, start_u.shape[0]
        x = torch.cat([start_u[None].float(), self.block_emb[:, None].expand(-1, b, -1)])  # [K, B, D]
        qpos = pos[None] + torch.arange(k)[:, None]  # [K, B]
        cos, sin = self.rope_cos[qpos], self.rope_sin[qpos]
        mask = None
        if inherited:
            m = pool[0][0].shape[1] if pool else 0
            seen = torch.ones(b, m, dtype=torch.bool) if seen is None else seen
            mask = torch.cat([torch.ones(b, n_ctx, dtype=torch.bool), seen, torch.eye(b, dtype=torch.bool)], 1)
            mask = mask[None].expand(k, -1, -1)  # [K, B, S]
        own = []
        for i, layer in enumerate(self.layers):
            keys, values = cache.keys[i][:, :n_ctx], cache.values[i][:, :n_ctx]
            if inherited:
                k0, v0 = layer.kv(x[0], self.rope_cos[pos], self.rope_sin[pos])
                own.append((k0, v0))
                parts = [(keys, values)] + ([pool[i]] if pool else []) + [(k0, v0)]
                keys, values = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
            x = layer(x, keys, values, cos, sin, mask)
        return self.norm(x), own


def grow_pool(pool: list, own: list) -> list:
    """Per layer (keys, values) [H, M, hd] with new starts' own [H, B, hd] appended."""
    if not pool:
        return own
    return [(torch.cat([pk, ok], 1), torch.cat([pv, ov], 1)) for (pk, pv), (ok, ov) in zip(pool, own)]


class ContextCache:
    """Per-layer keys and values of the context stream for one session."""

    def __init__(self, model: SpecBlock):
        h, hd = model.cfg.n_heads, model.cfg.head_dim
        self.keys = [torch.zeros(h, 0, hd) for _ in model.layers]
        self.values = [torch.zeros(h, 0, hd) for _ in model.layers]
        self.length = 0


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


def load_specblock(folder: Path, target_args: ModelArgs, embedding: torch.Tensor) -> SpecBlock:
    meta = json.loads((folder / "config.json").read_text())
    sd = load_file(folder / "drafter.safetensors")
    model = SpecBlock(SpecBlockConfig(**meta["model"]), target_args, embedding, sd["draft_ids"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return model.eval()


EXTEND_CHUNK = 512  # context positions encoded per forward: bounds attention's scores for a long prompt


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
        self.feats: list[torch.Tensor] = []  # [n, D] chunks, one row per context position (features conditioning)
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

    def _candidates(self, states: torch.Tensor, ranked: bool = True) -> list[list[tuple[int, float]]]:
        """Per block position: [(target token id, draft probability)], best first: as many as the rank
        head says (at most max_branch), or max_branch each when not ranked."""
        m = self.model
        probs = m.draft_logits(states).softmax(-1)  # [K, Vd]
        counts = (
            (m.rank_head(states).argmax(-1) + 1).clamp(max=self.cfg.max_branch)
            if ranked
            else torch.full((states.shape[0],), self.cfg.max_branch)
        )
        out = []
        for j in range(states.shape[0]):
            top = probs[j].topk(int(counts[j]))
            out.append([(int(m.draft_ids[i]), float(p)) for i, p in zip(top.indices, top.values)])
        return out

    @torch.no_grad()
    def draft(self, update: VerifierUpdate) -> DraftTree | None:
        m = self.model
        if update.max_nodes > m.cfg.max_seq_len // 2:  # a tree's depth must fit in the positions after the context
            update = replace(update, max_nodes=m.cfg.max_seq_len // 2)
        self.tokens += update.new_tokens
        if update.feedback is not None:
            self.recent.append(len(update.feedback.accepted))
            if self.trace and "accepted" not in self.trace[-1]:
                self.trace[-1]["accepted"] = self.recent[-1]
        if self.version != m.version:  # the weights changed under this session: recompute its context
            self._recompute()
        start = self.cache.length  # context positions so far; the update brings the next ones
        if m.cfg.conditioning == "tokens":
            n_f = len(self.tokens) - 1  # every committed token but the newest (its next token is pending)
        elif update.hidden is None:
            raise ValueError(
                "this SpecBlock drafter conditions on the target's hidden states: send them in every "
                "update, or serve a drafter trained with conditioning: tokens"
            )
        else:
            n_f = start + update.hidden.shape[0]  # committed positions with a feature; tokens[n_f] is pending
        if update.hidden is not None and m.cfg.conditioning != "tokens":
            self.feats.append(update.hidden)
        if n_f + update.max_nodes > m.cfg.max_seq_len:  # a tree would run past the model's positions
            n_f = self._slide(n_f)
        elif n_f > start:
            toks = torch.tensor(self.tokens[start : n_f + 1])
            u = m.inputs(update.hidden, toks[:-1], toks[1:])
            for i in range(0, len(u), EXTEND_CHUNK):
                m.extend(self.cache, u[i : i + EXTEND_CHUNK])
            self.last_u = u[-1]
        if self.last_u is None or update.max_nodes <= 0:
            return None
        t = n_f - 1
        states = m.draft_blocks(self.cache, self.last_u[None], torch.tensor([t]), n_f, inherited=False)[0][:, 0]
        self.forwards += 1
        if self.cfg.tree == "sampled":
            temperature = update.sampling.temperature if update.sampling and update.sampling.temperature > 0 else 1.0
            q = (m.draft_logits(states) / temperature).softmax(-1)  # [K, Vd]: the selector's features and the roots' q
            return self._sampled_tree(
                states, q, t, n_f, update.max_nodes, update.vocab_size, temperature, self._delay(q)
            )
        if self.cfg.tree == "frontier":
            return self._frontier_tree(states, t, n_f, update.max_nodes, update.vocab_size)
        return self._best_first_tree(states, t, n_f, update.max_nodes, update.vocab_size)

    def _slide(self, n_f: int) -> int:
        """Sliding context: keep the newest max_seq_len / 2 of the n_f context positions (a tree of at most
        that many nodes fits after them), re-encoded from position 0 with the current weights, in chunks
        that bound attention's memory. Returns the new context length."""
        m = self.model
        keep = m.cfg.max_seq_len // 2
        drop = n_f - keep
        self.tokens, self.dropped = self.tokens[drop:], self.dropped + drop
        self.feats = [torch.cat(self.feats)[-keep:]] if self.feats else []
        self.cache, self.version = ContextCache(m), m.version
        toks = torch.tensor(self.tokens[: keep + 1])
        u = m.inputs(self.feats[0] if self.feats else None, toks[:-1], toks[1:])
        for i in range(0, keep, EXTEND_CHUNK):
            m.extend(self.cache, u[i : i + EXTEND_CHUNK])
        self.last_u = u[-1]
        return keep

    def _recompute(self) -> None:
        """The context cache again from the session's tokens and features, with the current weights."""
        m, n = self.model, self.cache.length
        self.cache, self.version = ContextCache(m), m.version
        if n:
            toks = torch.tensor(self.tokens[: n + 1])
            u = m.inputs(torch.cat(self.feats)[:n] if self.feats else None, toks[:-1], toks[1:])
            m.extend(self.cache, u)
            self.last_u = u[-1]

    def _inherit(self, state: torch.Tensor, tok: int, pos: int, n_f: int, pool: list) -> tuple[torch.Tensor, list]:
        """A new block from a drafted node (its state [D] standing in for the feature, its token) at
        position pos, attending to its ancestors' `pool`: the block's states [K, D] and its descendants' pool."""
        m = self.model
        u = m.fc(torch.cat([state, m.embedding[tok]]))
        st, own = m.draft_blocks(self.cache, u[None], torch.tensor([pos]), n_f, inherited=True, pool=pool)
        return st[:, 0], grow_pool(pool, own)

    def _best_first_tree(
        self, states: torch.Tensor, t: int, n_f: int, max_nodes: int, vocab_size: int
    ) -> DraftTree | None:
        m = self.model
        blocks = 1
        # heap entries: (-path prob, order, parent node, token, its block's states, block position j,
        # P + j for a block started at position P, whether it is its position's top-1)
        # block -> (candidates per position, the keys and values its inheriting blocks attend to)
        block_of = {id(states): (self._candidates(states), [])}
        heap = [
            (-p, order, -1, tok, states, 0, t, order == 0) for order, (tok, p) in enumerate(block_of[id(states)][0][0])
        ]
        order = len(heap)
        heapq.heapify(heap)
        tokens, parents = [], []
        while heap and len(tokens) < max_nodes and -heap[0][0] >= self.cfg.min_prob:
            negp, _, parent, tok, st, j, pos, is_top1 = heapq.heappop(heap)
            node = len(tokens)
            tokens.append(tok)
            parents.append(parent)
            if is_top1 and j + 1 < m.cfg.block_size:  # the block already drafted the next position
                kids, nst, nj, npos = block_of[id(st)][0][j + 1], st, j + 1, pos + 1
            elif blocks < self.cfg.max_blocks:  # inherit: a new block from this node
                blocks += 1
                self.forwards += 1
                nst, carried = self._inherit(st[j], tok, pos + 1, n_f, block_of[id(st)][1])
                block_of[id(nst)] = (self._candidates(nst), carried)
                kids, nj, npos = block_of[id(nst)][0][0], 0, pos + 1
            else:
                continue
            for rank, (ktok, kp) in enumerate(kids):
                heapq.heappush(heap, (negp * kp, order, node, ktok, nst, nj, npos, rank == 0))
                order += 1
        return DraftTree(tokens, parents, vocab_size, max_nodes) if tokens else None

    def _frontier_tree(self, states: torch.Tensor, t: int, n_f: int, max_nodes: int, vocab_size: int) -> DraftTree:
        """EAGLE-2's dynamic tree. Expansion, depth by depth: the max_branch drafted nodes of the newest
        depth with the highest path probability get max_branch children each (no rank head):
        from the next position of their block when they are its top-1, else from new blocks that inherit
        them, all started in one batched forward (each attending to its own drafted ancestors), while
        max_blocks allows. Rerank: the max_nodes drafted nodes of highest path probability form the tree
        (a parent's is never below its child's, so every chosen node's parent is chosen)."""
        m, cfg = self.model, self.cfg
        k = m.cfg.block_size
        # per drafted node: path prob, parent, token, depth, its block's states and candidates, block
        # position j, query position, its block's inherited start (pool index, -1 = the context block)
        nodes: list[tuple] = []
        ancestors: list[
            list[int]
        ] = []  # per pool entry (an inherited start): pool indices of its path, itself included
        pool: list = []

        def add_children(parent: int, cands: list, st, cand_rows, j: int, pos: int, start: int) -> list[int]:
            p, depth = (1.0, 0) if parent < 0 else (nodes[parent][0], nodes[parent][3])
            if depth >= max_nodes:
                return []
            for tok, q in cands:
                nodes.append((p * q, parent, tok, depth + 1, st, cand_rows, j, pos, start))
            return list(range(len(nodes) - len(cands), len(nodes)))

        root_rows = self._candidates(states, ranked=False)
        newest = add_children(-1, root_rows[0], states, root_rows, 0, t, -1)
        blocks = 1
        while newest:
            chosen = sorted(newest, key=lambda i: -nodes[i][0])[: cfg.max_branch]
            newest = []
            inherit = []
            for i in chosen:
                _, _, tok, _, st, rows, j, pos, start = nodes[i]
                if j + 1 < k and tok == rows[j][0][0]:  # its block's top-1: the block drafted what follows
                    newest += add_children(i, rows[j + 1], st, rows, j + 1, pos + 1, start)
                else:
                    inherit.append(i)
            if not inherit or blocks >= cfg.max_blocks:
                continue
            blocks += 1
            self.forwards += 1
            u = m.fc(
                torch.cat(
                    [
                        torch.stack([nodes[i][4][nodes[i][6]] for i in inherit]),
                        m.embedding[torch.tensor([nodes[i][2] for i in inherit])],
                    ],
                    -1,
                )
            )  # [B, D]
            paths = [ancestors[nodes[i][8]] if nodes[i][8] >= 0 else [] for i in inherit]
            seen = torch.zeros(len(inherit), len(ancestors), dtype=torch.bool)  # [B, M]
            for b, path in enumerate(paths):
                seen[b, path] = True
            bst, own = m.draft_blocks(
                self.cache,
                u,
                torch.tensor([nodes[i][7] + 1 for i in inherit]),
                n_f,
                inherited=True,
                pool=pool,
                seen=seen,
            )
            pool = grow_pool(pool, own)
            for b, i in enumerate(inherit):
                ancestors.append(paths[b] + [len(ancestors)])
                rows = self._candidates(bst[:, b], ranked=False)
                newest += add_children(i, rows[0], bst[:, b], rows, 0, nodes[i][7] + 1, len(ancestors) - 1)
        keep = sorted(range(len(nodes)), key=lambda i: (-nodes[i][0], nodes[i][3]))[:max_nodes]
        index = {old: new for new, old in enumerate(keep)}
        return DraftTree(
            [nodes[i][2] for i in keep],
            [index[nodes[i][1]] if nodes[i][1] >= 0 else -1 for i in keep],
            vocab_size,
            max_nodes,
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

    def _sampled_tree(
        self,
        states: torch.Tensor,
        q: torch.Tensor,
        t: int,
        n_f: int,
        max_nodes: int,
        vocab_size: int,
        temperature: float,
        delay: int,
    ) -> DraftTree | None:
        """Delayed tree expansion: a path of `delay` tokens sampled one after another, then
        cfg.branches i.i.d. draws from the row at its end, each continued by a sampled path to
        cfg.rollout tokens (cut to fit max_nodes). A node's children are drawn from
        q = softmax(draft logits / temperature) of a block position: the next position of the same block
        when the node's token is that position's top-1 (what the block assumed), else the first position
        of a new block inheriting the node's state and token; a path stops early once max_blocks
        forwards are spent. The tree carries every row's q over the full vocabulary (zeros where no
        children are drawn)."""
        m, cfg = self.model, self.cfg
        blocks = 1
        tokens, parents = [], []
        # per row: (block's q [K, Vd], position j, block states, query position, the block's keys and
        # values for its inheriting blocks), or None
        cursors = []
        delay = min(delay, max_nodes)
        length = min(cfg.rollout, (max_nodes - delay) // cfg.branches)  # tokens per continuation

        def block(st: torch.Tensor, carried: list, pos: int):  # a block's states [K, D] at position pos -> its cursor
            return (m.draft_logits(st) / temperature).softmax(-1), 0, st, pos, carried

        def add(tok: int, parent: int, grow: bool) -> int:
            """Append a node drawn at its parent's cursor, and its own cursor (None when it gets no
            children: grow False, or no forward left). Returns its id."""
            nonlocal blocks
            tokens.append(tok)
            parents.append(parent)
            q, j, st, pos, carried = cursors[parent + 1]
            nxt = None
            if grow and j + 1 < m.cfg.block_size and tok == int(m.draft_ids[q[j].argmax()]):
                nxt = (q, j + 1, st, pos + 1, carried)
            elif grow and blocks < cfg.max_blocks:
                blocks += 1
                self.forwards += 1
                nxt = block(*self._inherit(st[j], tok, pos + 1, n_f, carried), pos + 1)
            cursors.append(nxt)
            return len(tokens) - 1

        def draw(row: int, n: int) -> list[int]:  # n i.i.d. tokens from a row's q, over the draft vocabulary
            q, j = cursors[row][:2]
            return m.draft_ids[torch.multinomial(q[j], n, replacement=True, generator=self.generator)].tolist()

        node = -1
        cursors.append((q, 0, states, t, []))  # the context block's q, computed once by draft
        for i in range(delay):
            node = add(draw(node + 1, 1)[0], node, grow=i + 1 < delay or length > 0)
            if cursors[node + 1] is None:
                break
        if cursors[node + 1] is not None and length > 0:
            for tok in draw(node + 1, cfg.branches):  # the i.i.d. sibling group, drawn at once
                child = add(tok, node, grow=length > 1)
                for i in range(length - 1):
                    if cursors[child + 1] is None:
                        break
                    child = add(draw(child + 1, 1)[0], child, grow=i + 2 < length)
        if not tokens:
            return None
        q_rows = torch.zeros(len(cursors), m.draft_ids.shape[0])  # [N+1, Vd], zeros where no children
        for row, c in enumerate(cursors):
            if c is not None:
                q_rows[row] = c[0][c[1]]
        draft_probs = torch.zeros(len(cursors), vocab_size).index_copy_(1, m.draft_ids, q_rows)
        return DraftTree(tokens, parents, vocab_size, max_nodes, draft_probs)

    def close(self) -> None:
        self.cache = ContextCache(self.model)
        self.tokens, self.feats, self.last_u, self.recent = [], [], None, []
