"""kernels.linear against its reference (F.linear), and row-invariant in bf16: a row computed alone equals
the same row inside a call of any other row count (the model's shapes, K = 576 and the MLP's K = 1536)."""

import pytest
import torch

from kernels.linear import PackedLinear, fast_bf16, pack_linears, reference_linear

# Where bf16 has no hardware support, target.dtype auto never uses it, and its kernels there are others.
needs_fast_bf16 = pytest.mark.skipif(not fast_bf16(), reason="no avx512_bf16/AMX: auto picks float32 here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (3072, 576)])
def test_packed_linear_matches_reference(dtype, shape):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.05).to(dtype)
    x = torch.randn(2, 7, shape[1]).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 0.05
    assert (PackedLinear(w)(x).float() - reference_linear(x, w).float()).abs().max() < tol


@needs_fast_bf16
@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (3072, 576), (4096, 576)])
def test_bf16_rows_do_not_depend_on_the_row_count(shape):
    torch.manual_seed(1)
    lin = PackedLinear((torch.randn(shape) * 0.05).bfloat16())
    x = torch.randn(80, shape[1]).bfloat16()
    alone = torch.cat([lin(x[i : i + 1]) for i in range(80)])
    for n in (2, 5, 6, 17, 65, 80):
        assert torch.equal(lin(x[:n]), alone[:n]), n


def test_pack_linears_replaces_bias_free_linears_only():
    m = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8))
    pack_linears(m)
    assert isinstance(m[0], PackedLinear) and isinstance(m[1], torch.nn.Linear)
