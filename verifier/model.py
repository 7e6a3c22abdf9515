"""Llama-family target model in plain torch (gpt-fast style): fused projections, one preallocated KV
cache for all layers, and a forward that takes explicit cache slots, RoPE positions and the rows'
ancestors, so plain decoding and tree verification are the same call (kernels.attention makes them agree
bit for bit). The LM head is separate
(`lm_head`): verification needs logits only at the tree nodes it visits."""

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import ancestor_bias, tree_attention
from kernels.layers import ModelArgs, RMSNorm, apply_rope, rope_tables
from kernels.linear import PackedLinear, pack_linears


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        a = args
        self.wqkv = nn.Linear(a.dim, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)

    def forward(self, x, cos, sin, kv, start: int, bias):
        # x: [B, T, dim] (B = 1 but for a cache-free teacher forward); kv: [2, 1, H_kv, S, D + 1] this
        # layer's float32 cache (column D: 0 for keys, 1 for values; kernels.attention), or None (teacher
        # forcing: causal over the B rows, nothing kept); bias: kernels.attention.ancestor_bias [T, T] for
        # a decoding / verification forward, None for a causal prefill from slot 0
        a = self.args
        b, t = x.shape[:2]
        hq, hkv = a.n_heads, a.n_kv_heads
        qkv = self.wqkv(x).view(b, t, hq + 2 * hkv, a.head_dim).transpose(1, 2)  # [B, Hq + 2 Hkv, T, D]
        if kv is None:
            qk = apply_rope(qkv[:, : hq + hkv], cos, sin)  # queries and keys rotated in one call
            y = F.scaled_dot_product_attention(
                qk[:, :hq], qk[:, hq:], qkv[:, hq + hkv :], is_causal=True, enable_gqa=True
            )
            return self.wo(y.transpose(1, 2).reshape(b, t, a.n_heads * a.head_dim))
        qk = apply_rope(qkv[:, : hq + hkv], cos, sin, torch.float32)  # the cache and the attention are fp32
        d = a.head_dim
        kv[0, :, :, start : start + t, :d] = qk[:, hq:]
        kv[1, :, :, start : start + t, :d] = qkv[:, hq + hkv :]
        if bias is None:
            keys, values = kv[0, :, :, :t, :d], kv[1, :, :, :t, :d]
            y = F.scaled_dot_product_attention(qk[:, :hq], keys, values, is_causal=True, enable_gqa=True)
        else:
            y = tree_attention(qk[0, :hq], kv[:, 0], start, bias)[None]
        return self.wo(y.to(x.dtype).transpose(1, 2).reshape(1, t, a.n_heads * a.head_dim))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, kv, start, bias):
        h = x + self.attention(self.attention_norm(x), cos, sin, kv, start, bias)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, max_seq_len: int):
        super().__init__()
        self.args = args
        self.max_seq_len = max_seq_len
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_tables(args, max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # All layers' K and V in one tensor so that KV compaction is a single gather; float32 whatever the
        # weights' dtype, one column wider than a head: 0 beside each key, 1 beside each value (kernels.attention)
        kv = torch.zeros(args.n_layers, 2, 1, args.n_kv_heads, max_seq_len, args.head_dim + 1)
        kv[:, 1, ..., -1] = 1
        self.register_buffer("kv", kv, persistent=False)

    @torch.no_grad()
    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, start: int, ancestors: torch.Tensor | None
    ) -> torch.Tensor:
        """tokens, positions: [T] int64; the T new entries are written to cache slots start..start+T-1.
        ancestors: [T, T] bool (row r attends to row c iff c is r or an ancestor of r; rows in topological
        order, positions = start + depth) for decoding and verification, after `start` committed tokens;
        None for a prefill (start 0, causal). Returns the final (normed) hidden states [T, dim]."""
        bias = None
        if ancestors is not None:
            bias = ancestor_bias(ancestors)
        elif start != 0:
            raise ValueError("a prefill starts at slot 0; later forwards give their ancestors")
        x = self.tok_embeddings(tokens).unsqueeze(0)  # [1, T, dim]
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, self.kv[i], start, bias)
        return self.norm(x)[0]

    @torch.no_grad()
    def teacher_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing without the cache: tokens [B, T] (rows right-padded as needed: attention is
        causal, so padding changes no earlier position) -> final (normed) hidden states [B, T, dim]."""
        t = tokens.shape[1]
        x = self.tok_embeddings(tokens)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        for layer in self.layers:
            x = layer(x, cos, sin, None, 0, None)
        return self.norm(x)

    @torch.no_grad()
    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """h: [M, dim] -> logits [M, V] float32."""
        return self.head(h.reshape(-1, self.args.dim)).float()

    def finalize(self) -> "Transformer":
        """Call once the weights are loaded and cast: keeps the RoPE tables in fp32 and prepacks every
        linear layer and the LM head for this CPU (kernels.linear: fast, and row-invariant so that
        tree rows equal plain decoding's); the KV cache stays float32 (kernels.attention)."""
        self.rope_cos, self.rope_sin, self.kv = self.rope_cos.float(), self.rope_sin.float(), self.kv.float()
        head = self.tok_embeddings.weight if self.output is None else self.output.weight
        self.head = PackedLinear(head)
        pack_linears(self.layers)
        return self.eval()

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load Llama weights named as in transformers (model.layers.N.self_attn.q_proj.weight, ...)."""
        own = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
        if self.output is not None:
            own["output.weight"] = sd["lm_head.weight"]
        for i in range(self.args.n_layers):
            p = f"model.layers.{i}."
            own[f"layers.{i}.attention.wqkv.weight"] = torch.cat(
                [
                    sd[p + "self_attn.q_proj.weight"],
                    sd[p + "self_attn.k_proj.weight"],
                    sd[p + "self_attn.v_proj.weight"],
                ]
            )
            own[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
            own[f"layers.{i}.feed_forward.w13.weight"] = torch.cat(
                [sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]
            )
            own[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
            own[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
            own[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        self.load_state_dict(own, strict=True)
