"""Random trees of exactly the requested size. A benchmark and load-test drafter (`kind: random`): it
measures what the transport and the verifier cost for a given tree size, and earns nothing."""

import random

from proto.interface import VerifierUpdate
from proto.tree import DraftTree, random_tree


class RandomDrafter:
    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def draft(self, update: VerifierUpdate) -> DraftTree | None:
        if update.max_nodes <= 0:
            return None
        return random_tree(update.max_nodes, update.vocab_size, self.rng)

    def close(self) -> None:
        pass
