"""The torch target on the real SmolLM2-135M-Instruct weights: equal to transformers, and tree
forwards equal to sequential decoding of every root-to-node path."""

import random

import pytest
import torch

from proto.tree import DraftTree, random_tree
from specdraft.assets import load_transformer
from verifier.target import TorchTarget

pytestmark = pytest.mark.model

# fp32: observed max |diff| ~1e-4 on logits of magnitude ~30 (summation order differs between the
# fused and separate projections); 2e-3 leaves margin while any real bug (wrong RoPE position, mask,
# cache slot) moves logits by >= 0.1.
FP32_TOL = 2e-3
# bf16 rounds activations to 8 bits of mantissa per layer: logits move by up to ~0.5 between two
# computation orders; a wrong position or mask moves them by several units.
BF16_TOL = 1.0


@pytest.fixture(scope="module")
def hf_fp32(model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def target_bf16(model_path):
    return TorchTarget(load_transformer(model_path, "bfloat16", 512))


def hf_last_logits(hf, tokens):
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def path_tokens(tree, i):
    out = []
    while i >= 0:
        out.append(tree.tokens[i])
        i = tree.parents[i]
    return out[::-1]


def test_prefill_logits_equal_transformers(target_fp32, hf_fp32):
    tokens = random.Random(0).sample(range(49152), 60)
    ours = target_fp32.logits(target_fp32.prefill(tokens))
    ref = hf_last_logits(hf_fp32, tokens)
    assert (ours - ref).abs().max() < FP32_TOL


def test_bf16_prefill_logits_match_transformers_bf16(model_path, target_bf16):
    """Both round activations to bf16 but at different places (transformers applies RoPE in bf16, we
    in fp32): observed max |diff| 0.6-0.9 and mean 0.11-0.16 on logits of magnitude ~33. A real bug
    (wrong weight, position or norm) moves the mean by whole units."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).eval()
    tokens = random.Random(0).sample(range(49152), 60)
    diff = (target_bf16.logits(target_bf16.prefill(tokens)) - hf_last_logits(hf, tokens)).abs()
    assert diff.max() < 1.5 and diff.mean() < 0.25


def test_tree_logits_equal_transformers_on_each_path(target_fp32, hf_fp32):
    rng = random.Random(1)
    prefix = [rng.randrange(49152) for _ in range(40)]
    tree = random_tree(12, 49152, rng)
    target_fp32.prefill(prefix[:-1])
    logits = target_fp32.logits(target_fp32.verify_forward(prefix[-1], tree))
    assert (logits[0] - hf_last_logits(hf_fp32, prefix)[-1]).abs().max() < FP32_TOL
    for i in range(len(tree)):
        ref = hf_last_logits(hf_fp32, prefix + path_tokens(tree, i))[-1]
        assert (logits[i + 1] - ref).abs().max() < FP32_TOL, i


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tree_logits_equal_sequential_decoding_of_each_path(dtype, target_fp32, target_bf16):
    target, tol = (target_fp32, FP32_TOL) if dtype == "float32" else (target_bf16, BF16_TOL)
    rng = random.Random(2)
    prefix = [rng.randrange(49152) for _ in range(30)]
    tree = random_tree(16, 49152, rng)
    target.prefill(prefix[:-1])
    logits = target.logits(target.verify_forward(prefix[-1], tree))
    for i in range(len(tree)):
        path = path_tokens(tree, i)
        target.prefill(prefix[:-1])
        seq = [target.logits(target.verify_forward(prefix[-1], None))]
        for tok in path:  # plain decoding, one token per forward
            target.commit([])
            seq.append(target.logits(target.verify_forward(tok, None)))
        assert (logits[i + 1] - seq[-1][0]).abs().max() < tol, (dtype, i)
        assert logits[i + 1].argmax() == seq[-1][0].argmax() or dtype == "bfloat16"


def test_commit_compacts_accepted_path_and_drops_the_rest(target_fp32, hf_fp32):
    rng = random.Random(3)
    prefix = [rng.randrange(49152) for _ in range(20)]
    tree = DraftTree([11, 22, 33, 44, 55, 66], [-1, -1, 1, 0, 2, 4], 49152, 8)
    target_fp32.prefill(prefix[:-1])
    target_fp32.verify_forward(prefix[-1], tree)
    target_fp32.commit([1, 2, 4])  # tokens 22, 33, 55; nodes 0, 3, 5 are dropped
    assert target_fp32.length == len(prefix) + 3
    after = target_fp32.logits(target_fp32.verify_forward(77, None))[0]
    ref = hf_last_logits(hf_fp32, prefix + [22, 33, 55, 77])[-1]
    assert (after - ref).abs().max() < FP32_TOL
