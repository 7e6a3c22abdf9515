"""Tiny models for unit tests: a SpecBlock drafter on a 200-token vocabulary with random weights, shared
by the drafter's, the selector's and the online learner's tests."""

from dataclasses import replace

import torch

from drafter.specblock import SpecBlock, SpecBlockConfig
from kernels.layers import ModelArgs

ARGS = ModelArgs(vocab_size=200, dim=64, n_heads=4, n_kv_heads=2, head_dim=16)  # the (fake) target's shape
CFG = SpecBlockConfig(block_size=4, n_layers=2, n_heads=4, head_dim=16, intermediate_size=128, draft_vocab=120)


def tiny_specblock(seed=0, conditioning="features", shift=True) -> SpecBlock:
    """A SpecBlock of CFG's shape with random weights; its draft vocabulary is tokens 40..159."""
    torch.manual_seed(seed)
    m = SpecBlock(
        replace(CFG, conditioning=conditioning, shift=shift), ARGS, torch.randn(200, 64), torch.arange(40, 160)
    )
    for layer in m.layers if shift else []:  # the shift starts at zero in training; make it matter here
        torch.nn.init.normal_(layer.shift.weight, std=0.2)
    return m.eval()
