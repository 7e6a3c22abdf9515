"""Drafters (n-gram lookup, SpecBlock, the EAGLE-style and parallel-heads baselines via SpecBlock's
config), their trees, the gRPC sidecar server and offline training."""
