"""Tensor primitives of the hot path: tree masks, KV compaction and per-node sampling here; the fast paths
in linear.py and attention.py (each beside its plain-torch reference); the layers the target and the
drafters share in layers.py."""

from kernels.tree import compact_kv, sample_per_node, tree_attention_mask, verify_ancestors

__all__ = ["compact_kv", "sample_per_node", "tree_attention_mask", "verify_ancestors"]
