"""Layers the target and the drafters share: the Llama shape (ModelArgs), RMSNorm and rotary position
embeddings (RoPE) in the rotate-half layout of Hugging Face weights."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        rope = cfg.get("rope_parameters") or {}
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg["num_key_value_heads"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            norm_eps=float(cfg["rms_norm_eps"]),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [x, -x] has mean 0 and variance mean(x^2), so its layer norm's first half is x's RMS norm: one
        # fused kernel that normalises in fp32 and rounds once (torch's rms_norm on CPU is ~6 small ops)
        d = x.shape[-1]
        w = self.weight
        return F.layer_norm(torch.cat([x, -x], -1), (2 * d,), torch.cat([w, w]), None, self.eps)[..., :d]


def rope_tables(args: ModelArgs, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos [max_pos, head_dim] and the signed sin [max_pos, head_dim] that apply_rope takes: rotate-half
    layout (HF weights), the sin's first half negated so that the rotation is a roll of x."""
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    sign = torch.cat([-torch.ones_like(inv_freq), torch.ones_like(inv_freq)])
    return emb.cos().float(), (emb.sin() * sign).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype | None = None):
    """x: [..., T, D]; cos, sin: rope_tables' rows [T, D]. Returns x rotated, in `dtype` (default x's):
    x * cos + [-x2, x1] * sin, with [-x2, x1] * sin as roll(x) * signed sin (the same products)."""
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, -1) * sin).to(dtype or x.dtype)
