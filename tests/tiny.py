"""Tiny models for unit tests: a SpecBlock drafter on a 200-token vocabulary with random weights (the
drafter's, the selector's and the online learner's tests), and a random Llama-shaped target folder."""

from dataclasses import replace
from pathlib import Path

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


def tiny_llama_folder(path: Path, seed: int = 0) -> Path:
    """A Hugging Face folder (config.json, model.safetensors) of a Llama with random weights, SmolLM2's
    structure (grouped-query attention, tied embeddings) and a tiny shape (2 layers, width 64, 256 tokens):
    what specdraft.assets.load_transformer and transformers both read."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path
