"""The linear layer of the hot path: weights prepacked once for this CPU's fastest kernel, and every
call row-invariant, so that a row computed inside a tree forward of N+1 rows is bit-identical to the
same row computed alone by a plain decoding step (exactness at temperature 0 rests on it).

Kernels, by weight dtype:
  bfloat16  oneDNN (brgemm) with the weight reordered once into its blocked layout. Fast only where
            the CPU has bf16 dot products (avx512_bf16) or AMX; elsewhere bf16 falls to slow paths.
  float32   one row (a decode step): torch's matrix-vector product on the plain weight; 2+ rows (tree
            forwards): oneDNN with the reordered weight, as for bf16. torch's own fp32 `linear` takes
            MKL's sgemm, which on AMD CPUs runs ~2-3x slower than oneDNN's JIT kernels at 2-16 rows
            (measured on an AVX2-only AMD EPYC: README "Benchmark"), and MKL's packed sgemm serves only
            the one row count it was packed for.
Where oneDNN has no bf16 kernels (no avx512bw/vl/dq nor avx_ne_convert), bf16 weights run plain torch.
Row invariance: with K > 576 (the MLP's down projection, K = 1536) a single-row call takes a
matrix-vector kernel whose accumulation order differs from the matrix-matrix kernel that 2+ rows take;
rows of every 2+ row call agree with each other. So bf16 calls of fewer than MIN_ROWS rows run padded
to MIN_ROWS: the weight streams once either way, and here 3-6 row calls are the fastest of all (a decode
step's linears: ~12 ms at 4 rows, ~14 ms at 2, ~17 ms at 17; 30 layers, this EPYC). float32 kernels are
not row-invariant at any padding we can afford (rows of 1-2 and 4+ row calls differ by ~1e-6, and four
fp32 rows cost more than one), which is why `target.dtype: auto` prefers bf16 where it is fast.

`reference_linear` is the plain torch implementation the fast one is tested against."""

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 4  # bf16 calls run with at least this many rows (see module doc)


def cpu_flags() -> dict[str, bool]:
    """The CPU features that decide the kernels (as torch's own dispatcher sees them)."""
    return {
        "avx2": torch.cpu._is_avx2_supported(),
        "avx512": torch.cpu._is_avx512_supported(),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "amx": torch.cpu._is_amx_tile_supported(),
    }


def fast_bf16() -> bool:
    """bf16 matrix products have hardware support here (avx512_bf16 or AMX)."""
    flags = cpu_flags()
    return flags["avx512_bf16"] or flags["amx"]


def reference_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


class PackedLinear(nn.Module):
    """y = x @ W^T (no bias) with W prepacked for this CPU; x: [..., K] -> [..., N], row-invariant."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        w = weight.detach().contiguous()
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, MIN_ROWS)
        except RuntimeError:  # oneDNN's bf16 needs avx512bw/vl/dq or avx_ne_convert: plain torch then
            packed = None
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("weight", w, persistent=False)  # the plain layout: for the reference and .weight users

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        if self.packed is None or (self.dtype != torch.bfloat16 and m == 1):  # fp32 decode: matrix-vector
            return F.linear(x2, self.weight).reshape(*shape[:-1], self.out_features)
        if self.dtype == torch.bfloat16 and m < MIN_ROWS:
            x2 = F.pad(x2, (0, 0, 0, MIN_ROWS - m))  # the matrix-matrix kernel, as for any other row count
        y = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), self.packed, None, "none", [], "")
        return y[:m].reshape(*shape[:-1], self.out_features)


def pack_linears(module: nn.Module) -> nn.Module:
    """Replace every bias-free nn.Linear in module (recursively) by a PackedLinear of its weight."""
    for name, child in module.named_children():
        if (
            isinstance(child, nn.Linear)
            and child.bias is None
            and child.weight.dtype in (torch.float32, torch.bfloat16)
        ):
            setattr(module, name, PackedLinear(child.weight))
        else:
            pack_linears(child)
    return module
