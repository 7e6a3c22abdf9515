"""Tensor primitives of the hot path. Plain torch reference implementations for now; a faster CPU/GPU
kernel replaces one of these by keeping its signature, and callers import from here only."""

from kernels.tree import compact_kv, sample_per_node, tree_attention_mask, verify_ancestors

__all__ = ["compact_kv", "sample_per_node", "tree_attention_mask", "verify_ancestors"]
