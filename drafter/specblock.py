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


CAUSAL = "causal"  # Layer's mask for teacher forcing: every stream's row t sees context keys 0..t


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

    def forward(self, x: torch.Tensor, keys, values, cos, sin, mask, own=None) -> torch.Tensor:
        """x [K, T, D] block states (stream 0 = the context stream); keys/values [H, S, hd];
        cos/sin [K, T, hd] per query position; mask [K, T, S] bool, None, or CAUSAL (teacher forcing: the
        keys are the T context rows); own: None, or views (keys, values) [H, T, hd] of keys/values where
        stream 0's own keys and values are written before attention (inherited starts attend to
        themselves). With a mask, all K * T queries share the keys and run as one SDPA batch
        [1, H, K*T, hd]: the fused CPU kernel (K query batches against broadcast keys would take the
        unfused path with a mask; with CAUSAL they are K batches, causal flash)."""
        if self.shift is not None and x.shape[0] > 1:
            x = torch.cat([x[:1], x[1:] + self.shift(x[:-1])])  # layer-wise shift, from the layer's input
        kq, t, d = x.shape
        h, hd = self.cfg.n_heads, self.cfg.head_dim
        normed = self.attn_norm(x)
        if own is not None:
            k0, v0 = self.kv(normed[0], cos[0], sin[0])
            own[0].copy_(k0)
            own[1].copy_(v0)
        if mask is CAUSAL:  # training: stream row t sees context keys <= t; [K, H, T, hd] against [K, H, T, hd]
            q = apply_rope(self.wq(normed).view(kq, t, h, hd).transpose(1, 2), cos[:, None], sin[:, None])
            expand = (kq, *keys.shape)
            y = F.scaled_dot_product_attention(q, keys.expand(expand), values.expand(expand), is_causal=True)
            y = y.transpose(1, 2)  # [K, T, H, hd]
        else:
            q = self.wq(normed).view(kq * t, h, hd).transpose(0, 1)[None]  # [1, H, K*T, hd]
            q = apply_rope(q, cos.reshape(kq * t, hd), sin.reshape(kq * t, hd))
            y = F.scaled_dot_product_attention(
                q, keys[None], values[None], attn_mask=None if mask is None else mask.reshape(kq * t, -1)
            )[0].transpose(0, 1)  # [K*T, H, hd]
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
        """The model that drafts: this one when the target runs in float32; else a copy with every weight
        in the target's dtype and the linears prepacked for this CPU (kernels.linear), made again when the
        weights change (version). The parameters stay float32: training and online updates use them."""
        if self.draft_dtype == torch.float32:
            return self
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
            keys, values = layer.kv(layer.attn_norm(x[0]), ctx_cos, ctx_sin)
            x = layer(x, keys, values, cos, sin, CAUSAL)
        return self.norm(x)

    @torch.no_grad()
    def extend(self, cache: "ContextCache", u_new: torch.Tensor) -> None:
        """Run new committed positions' inputs u_new [n, D] through the context stream, writing their
        keys and values into the cache after the context so far."""
        n, start = u_new.shape[0], cache.length
        end = start + n
        cache.reserve(end)
        pos = torch.arange(start, end)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # [n, hd]
        mask = torch.ones(n, end, dtype=torch.bool).tril(diagonal=start)
        x = u_new[None].to(self.embedding.dtype)  # [1, n, D]
        for i, layer in enumerate(self.layers):
            cache.keys[i, :, start:end], cache.values[i, :, start:end] = layer.kv(layer.attn_norm(x[0]), cos, sin)
            if i + 1 < len(self.layers):  # the last layer's output feeds no keys: skip it
                x = layer(x, cache.keys[i, :, :end], cache.values[i, :, :end], cos[None], sin[None], mask[None])
        cache.length = end

    @torch.no_grad()
    def draft_blocks(
        self, cache: "ContextCache", start_u: torch.Tensor, pos: torch.Tensor, seen: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Blocks at inference from B starts at once: inputs start_u [B, D] at positions pos [B]. Returns
        normed block states [K, B, D].

        seen None: a committed start, the newest context position (B = 1); its block attends to the
        context. seen [B, M]: inherited starts (drafted nodes, their states standing in for f). A tree's
        inherited starts live in the cache's slots after the context, in the order they were started: the
        M earlier ones, then these B (written here). Each attends to the context, to the earlier drafted
        starts that its row of `seen` marks as its ancestors (the context it would have had were they
        committed), and to itself."""
        k, b, n = self.cfg.block_size, start_u.shape[0], cache.length
        x = torch.cat([start_u[None].to(self.embedding.dtype), self.block_emb[:, None].expand(-1, b, -1)])  # [K, B, D]
        qpos = pos[None] + torch.arange(k)[:, None]  # [K, B]
        cos, sin = self.rope_cos[qpos], self.rope_sin[qpos]
        end, mask = n, None
        if seen is not None:
            slot = n + seen.shape[1]
            end = slot + b
            cache.reserve(end)
            mask = torch.cat([torch.ones(b, n, dtype=torch.bool), seen, torch.eye(b, dtype=torch.bool)], 1)
            mask = mask[None].expand(k, -1, -1)  # [K, B, S]
        for i, layer in enumerate(self.layers):
            keys, values = cache.keys[i, :, :end], cache.values[i, :, :end]
            own = None if seen is None else (keys[:, slot:], values[:, slot:])
            x = layer(x, keys, values, cos, sin, mask, own)
        return self.norm(x)


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
