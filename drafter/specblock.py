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

The trees drafted from these blocks (best-first, frontier, sampled) are built in drafter/specblock_draft.py.

Shapes: K = block_size, T = positions, D = dim, Vd = draft vocabulary size."""

import json
import typing
from collections.abc import Callable, Generator
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from kernels.layers import ModelArgs, RMSNorm, apply_rope, rope_tables
from kernels.linear import PackedLinear, pack_linears
from proto import checks


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


class Causal(typing.NamedTuple):
    """Teacher forcing (Layer.forward): every stream's row t sees the context keys 0..t."""

    keys: torch.Tensor  # [H, T, hd], rotated
    values: torch.Tensor


class Group(typing.NamedTuple):
    """One session's share of an inference forward (Layer.forward): its columns and what they attend to."""

    cols: slice  # its columns of the forward's T axis
    keys: torch.Tensor  # [H, S, hd]: its context cache's keys (rotated) ...
    values: torch.Tensor  # ... and values
    mask: torch.Tensor | None  # [K, T_g, S] bool; None: every key
    own: tuple[torch.Tensor, torch.Tensor] | None  # views [H, T_g, hd] of keys/values its starts write first


class Starts(typing.NamedTuple):
    """Blocks to draft from B starts of one session (SpecBlock.draft_blocks)."""

    cache: "ContextCache"
    u: torch.Tensor  # [B, D] their inputs
    pos: torch.Tensor  # [B] their positions
    # None: the committed start, the newest context position (B = 1), attending to the context. [B, M]:
    # inherited starts (drafted nodes, their states standing in for f), see SpecBlock.draft_blocks
    seen: torch.Tensor | None = None


class Drafted(typing.NamedTuple):
    """What a forward drafts from one Starts: normed block states [K, B, D] and their logits over the
    draft vocabulary [K, B, Vd] (float32)."""

    states: torch.Tensor
    logits: torch.Tensor


class NewContext(typing.NamedTuple):
    """One session's newly committed positions, to encode into its cache (SpecBlock.encode)."""

    cache: "ContextCache"
    feats: torch.Tensor | None  # [n, D] the target's features there (None when conditioning on tokens)
    tokens: torch.Tensor  # [n]
    next_tokens: torch.Tensor  # [n]


class Forward(typing.NamedTuple):
    """A forward a draft asks for: getattr(model, op)(items), one result per item. op "encode": items
    NewContext, results the newest position's input u [D]; op "draft_blocks": items Starts, results
    Drafted. Items of several sessions' Forwards with one model and op run as one call."""

    model: "SpecBlock"  # the drafting copy (SpecBlock.drafting)
    op: typing.Literal["encode", "draft_blocks"]
    items: list

    def run(self) -> list:
        return getattr(self.model, self.op)(self.items)

    def rows(self) -> int:
        """Query rows it adds to a batch: starts, or positions to encode."""
        return sum(i.u.shape[0] if isinstance(i, Starts) else i.tokens.shape[0] for i in self.items)


T = typing.TypeVar("T")
# A draft as steps: a generator that yields each Forward it needs and is sent back its results, returning
# its own result. `drive` runs one alone; the sidecar's batcher (drafter/batch.py) runs many sessions'
# steps together, their pending forwards as one.
Steps = Generator[Forward, list, T]


def drive(steps: Steps[T], run: Callable[[Forward], list] = Forward.run) -> T:
    """Run a draft's steps to their end, each forward by `run` (default: the model itself)."""
    try:
        forward = next(steps)
        while True:
            forward = steps.send(run(forward))
    except StopIteration as end:
        return end.value


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

    def kv(self, normed: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """normed [T, D] context-stream states after attn_norm -> keys, values [H, T, hd] (keys rotated)."""
        h, hd = self.cfg.n_heads, self.cfg.head_dim
        k, v = self.wkv(normed).view(-1, 2, h, hd).unbind(1)
        return apply_rope(k.transpose(0, 1)[None], cos, sin)[0], v.transpose(0, 1)

    def forward(self, x: torch.Tensor, cos, sin, groups: "list[Group] | Causal") -> torch.Tensor:
        """x [K, T, D] block states (stream 0 = the context stream); cos/sin [K, T, hd] per query position;
        groups: how the T columns attend.

        Causal(keys, values) [H, T, hd]: teacher forcing, stream row t sees context keys <= t ([K, H, T, hd]
        against broadcast keys: K batches, causal flash).

        A list of Group: each owns a slice of the columns (one session's starts, when a forward batches
        several sessions) and attends to its own keys and values, under its own mask; its stream-0 keys
        and values are first written where `own` says (inherited starts attend to themselves). A group's
        K * T_g queries share the keys and run as one SDPA batch [1, H, K*T_g, hd]: the fused CPU kernel
        (K query batches against broadcast keys would take the unfused path with a mask). Everything but
        attention (the shift, the norms, every linear) runs once over all columns."""
        if self.shift is not None and x.shape[0] > 1:
            x = torch.cat([x[:1], x[1:] + self.shift(x[:-1])])  # layer-wise shift, from the layer's input
        kq, t, d = x.shape
        h, hd = self.cfg.n_heads, self.cfg.head_dim
        normed = self.attn_norm(x)
        if isinstance(groups, Causal):
            q = apply_rope(self.wq(normed).view(kq, t, h, hd).transpose(1, 2), cos[:, None], sin[:, None])
            expand = (kq, *groups.keys.shape)
            y = F.scaled_dot_product_attention(
                q, groups.keys.expand(expand), groups.values.expand(expand), is_causal=True
            ).transpose(1, 2)  # [K, T, H, hd]
        else:
            q = self.wq(normed)  # [K, T, H*hd]
            if any(g.own is not None for g in groups):
                k0, v0 = self.kv(normed[0], cos[0], sin[0])  # [H, T, hd]
            parts = []
            for g in groups:
                if g.own is not None:
                    g.own[0].copy_(k0[:, g.cols])
                    g.own[1].copy_(v0[:, g.cols])
                qg = q[:, g.cols]
                tg = qg.shape[1]
                qg = qg.reshape(kq * tg, h, hd).transpose(0, 1)[None]  # [1, H, K*T_g, hd]
                qg = apply_rope(qg, cos[:, g.cols].reshape(kq * tg, hd), sin[:, g.cols].reshape(kq * tg, hd))
                mask = None if g.mask is None else g.mask.reshape(kq * tg, -1)
                yg = F.scaled_dot_product_attention(qg, g.keys[None], g.values[None], attn_mask=mask)
                parts.append(yg[0].transpose(0, 1).reshape(kq, tg, h, hd))
            y = torch.cat(parts, 1)
        x = x + self.wo(y.reshape(kq, t, h * hd))
        gate, up = self.w13(self.ffn_norm(x)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


class TiedHead(nn.Module):
    """Logits over the draft vocabulary: x [..., D] -> [..., Vd] against rows [Vd, D] of the target's tied
    embedding (frozen, and rebuilt from the embedding, so not saved)."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", rows, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class SpecBlock(nn.Module):
    def __init__(self, cfg: SpecBlockConfig, target_args: ModelArgs, embedding: torch.Tensor, draft_ids: torch.Tensor):
        """embedding: the target's token embedding [V, D] (shared, frozen; SmolLM2 ties it to its LM head),
        in the target's dtype, which drafting then runs in (see `drafting`); draft_ids [Vd]: target token
        ids of the draft vocabulary."""
        super().__init__()
        self.cfg, self.dim = cfg, target_args.dim
        d, eps = target_args.dim, target_args.norm_eps
        self.draft_dtype = embedding.dtype
        self.register_buffer("embedding", embedding.detach().float(), persistent=False)
        self.register_buffer("draft_ids", draft_ids.long())
        self.head = TiedHead(self.embedding[self.draft_ids].contiguous())
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
        # update; sessions then recompute their cached context, and `drafting` its copy of the weights
        self.version: int | None = None
        self._drafting: tuple[int | None, SpecBlock] | None = None  # (version, copy); a tuple: not a submodule

    def drafting(self) -> "SpecBlock":
        """The model that drafts: a copy with every weight in the target's dtype and the linears prepacked
        for this CPU (kernels.linear: 2-3x faster than torch's own fp32 linear at a block's few rows on an
        AVX2 EPYC), made again when the weights change (version). The parameters stay float32: training and
        online updates use them."""
        if self._drafting is None or self._drafting[0] != self.version:
            dtype = self.draft_dtype
            memo = {id(self.embedding): self.embedding.to(dtype), id(self._drafting): None}
            copy = deepcopy(self, memo).to(dtype).requires_grad_(False).eval()
            copy.rope_cos, copy.rope_sin = self.rope_cos, self.rope_sin  # positions stay float32
            pack_linears(copy)
            copy.head = PackedLinear(copy.head.weight)
            self._drafting = (self.version, copy)
        return self._drafting[1]

    def inputs(self, feats: torch.Tensor | None, tokens: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """Positions' target features [T, D] (unused, may be None, when conditioning on tokens), their
        tokens [T] and next tokens [T] -> context-stream inputs u [T, D]."""
        emb = self.embedding
        cond = emb[tokens] if self.cfg.conditioning == "tokens" else feats.to(emb.dtype)
        return self.fc(torch.cat([cond, emb[next_tokens]], dim=-1))

    def draft_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Normed states [..., D] -> logits over the draft vocabulary [..., Vd]."""
        return self.head(states)

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
        for layer in self.layers:  # the query at start s sees keys <= s
            x = layer(x, cos, sin, Causal(*layer.kv(layer.attn_norm(x[0]), ctx_cos, ctx_sin)))
        return self.norm(x)

    @torch.inference_mode()  # the caches it writes may be inference tensors (made while drafting)
    def extend(self, batch: list[tuple["ContextCache", torch.Tensor]]) -> None:
        """Run new committed positions' inputs u_new [n, D] through the context stream, writing their
        keys and values into each one's cache after its context so far; several sessions' (cache, u_new)
        in one forward."""
        spans, pos, col = [], [], 0  # per session: (its columns, start, end, mask)
        for cache, u_new in batch:
            n, start = u_new.shape[0], cache.length
            cache.reserve(start + n)
            pos.append(torch.arange(start, start + n))
            mask = torch.ones(n, start + n, dtype=torch.bool).tril(diagonal=start)
            spans.append((slice(col, col + n), start, start + n, mask))
            col += n
        pos = torch.cat(pos)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # [sum n, hd]
        x = torch.cat([u for _, u in batch])[None].to(self.embedding.dtype)  # [1, sum n, D]
        for i, layer in enumerate(self.layers):
            keys, values = layer.kv(layer.attn_norm(x[0]), cos, sin)  # [H, sum n, hd]
            groups = []
            for (cache, _), (cols, start, end, mask) in zip(batch, spans):
                cache.keys[i, :, start:end], cache.values[i, :, start:end] = keys[:, cols], values[:, cols]
                groups.append(Group(cols, cache.keys[i, :, :end], cache.values[i, :, :end], mask[None], None))
            if i + 1 < len(self.layers):  # the last layer's output feeds no keys: skip it
                x = layer(x, cos[None], sin[None], groups)
        for (cache, _), (_, _, end, _) in zip(batch, spans):
            cache.length = end

    @torch.inference_mode()
    def encode(self, batch: list[NewContext]) -> list[torch.Tensor]:
        """Sessions' new committed positions into their caches, in one forward (inputs, then extend);
        returns each one's newest input u [D], the start of its next block."""
        feats = None if self.cfg.conditioning == "tokens" else torch.cat([c.feats for c in batch])
        u = self.inputs(feats, torch.cat([c.tokens for c in batch]), torch.cat([c.next_tokens for c in batch]))
        parts = u.split([c.tokens.shape[0] for c in batch])
        self.extend([(c.cache, p) for c, p in zip(batch, parts)])
        return [p[-1] for p in parts]

    @torch.inference_mode()  # the caches it writes may be inference tensors (made while drafting)
    def draft_blocks(self, batch: list[Starts]) -> list[Drafted]:
        """Blocks at inference, from the starts of one or more sessions in one forward (each session's
        columns attend to its own cache: Group); one Drafted per Starts.

        A committed start (seen None) is the newest context position; its block attends to the context.
        Inherited starts (seen [B, M]) live in the cache's slots after the context, in the order they were
        started: the tree's M earlier ones, then these B (written here). Each attends to the context, to
        the earlier drafted starts that its row of `seen` marks as its ancestors (the context it would
        have had were they committed), and to itself."""
        k, dtype = self.cfg.block_size, self.embedding.dtype
        xs, qpos, spans = [], [], []  # per Starts: [K, B, D] inputs, [K, B] positions, (cols, end, slot, mask)
        col = 0
        for s in batch:
            b, n = s.u.shape[0], s.cache.length
            xs.append(torch.cat([s.u[None].to(dtype), self.block_emb[:, None].expand(-1, b, -1)]))
            qpos.append(s.pos[None] + torch.arange(k)[:, None])
            end, slot, mask = n, None, None
            if s.seen is not None:
                slot = n + s.seen.shape[1]
                end = slot + b
                s.cache.reserve(end)
                mask = torch.cat([torch.ones(b, n, dtype=torch.bool), s.seen, torch.eye(b, dtype=torch.bool)], 1)
                mask = mask[None].expand(k, -1, -1)  # [K, B, S]
            spans.append((slice(col, col + b), end, slot, mask))
            col += b
        x = torch.cat(xs, 1)  # [K, sum B, D]
        pos = torch.cat(qpos, 1)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        for i, layer in enumerate(self.layers):
            groups = []
            for s, (cols, end, slot, mask) in zip(batch, spans):
                keys, values = s.cache.keys[i, :, :end], s.cache.values[i, :, :end]
                own = None if slot is None else (keys[:, slot:], values[:, slot:])
                groups.append(Group(cols, keys, values, mask, own))
            x = layer(x, cos, sin, groups)
        states = self.norm(x)
        logits = self.draft_logits(states).float()  # [K, sum B, Vd]
        return [Drafted(states[:, cols], logits[:, cols]) for cols, *_ in spans]


class ContextCache:
    """One session's context-stream keys and values, [L, H, S, hd] in the drafting dtype, written by
    position: slots [0, length) hold the committed context, the slots after them the current tree's
    drafted starts (scratch: the next step's context overwrites them). The slots double as needed, up
    to max_seq_len (a session slides before its context and a tree would pass that)."""

    def __init__(self, model: SpecBlock, slots: int = 256):
        cfg = model.cfg
        self.max_slots = cfg.max_seq_len
        shape = (cfg.n_layers, cfg.n_heads, min(slots, self.max_slots), cfg.head_dim)
        self.keys = torch.zeros(shape, dtype=model.draft_dtype)
        self.values = torch.zeros(shape, dtype=model.draft_dtype)
        self.length = 0

    def reserve(self, n: int) -> None:
        """Room for slots [0, n)."""
        have = self.keys.shape[2]
        if n > have:
            grown = max(n, min(2 * have, self.max_slots))
            pad = (0, 0, 0, grown - have)
            self.keys, self.values = F.pad(self.keys, pad), F.pad(self.values, pad)


def load_specblock(folder: Path, target_args: ModelArgs, embedding: torch.Tensor) -> SpecBlock:
    meta = json.loads((folder / "config.json").read_text())
    sd = load_file(folder / "drafter.safetensors")
    model = SpecBlock(SpecBlockConfig(**meta["model"]), target_args, embedding, sd["draft_ids"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return model.eval()
