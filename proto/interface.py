"""The contract between the decode loop and any drafter, in-process or remote. One Drafter object is
one generation session: the verifier sends an update per step and gets a tree (or None) back."""

from dataclasses import dataclass, field
from typing import Protocol

import torch

from proto import checks
from proto.tree import DraftTree

# Sampling below this temperature is greedy to float precision (a logit gap of 1e-4 already means odds of
# e^100), and the smallest temperatures overflow logits / temperature in float32 (1e-45: inf, then NaN
# probabilities). So 0 < temperature < MIN_TEMPERATURE is refused in a config and read as greedy (0) from
# the wire (proto.wire.msg_to_update).
MIN_TEMPERATURE = 1e-6


@dataclass
class SamplingParams:
    """How the verifier samples from the target; drafters that sample their trees may follow it."""

    temperature: float = 0.0  # 0 = greedy; 0 < t < 1e-6 is refused (too small to divide by: MIN_TEMPERATURE)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0  # the verifier's own rng seed (not sent to a remote drafter)

    def validate(self) -> None:
        checks.nonneg(self, "temperature", "top_k")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature: {self.temperature} is below {MIN_TEMPERATURE}, too small to divide logits by; 0 = greedy"
            )
        checks.fraction(self, "top_p", low_open=True)


def client_of(label: str) -> str:
    """The client a session's client_label names: the label up to its first "/" ("vllm/17" -> "vllm",
    "HumanEval/3" -> "HumanEval"). What a drafter shares per client (the suffix cache under scope client,
    the arms' tallies) is keyed by it."""
    return label.split("/", 1)[0]


@dataclass
class Feedback:
    """The verifier's verdict on the previous tree."""

    accepted: list[int]  # node ids of the accepted root-to-node path (may be empty)
    target_probs: dict[int, float]  # node -> target probability of its token given its path, for every
    # node whose parent the verifier evaluated (the accepted path's
    # children and the roots)
    # Optional: node (-1 = the roots' parent) -> the target's top-k (tokens, probs) at that row.
    target_topk: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)
    verify_ms: float = 0.0  # the verifier's time for the tree (forward, rule, commit); 0 = not measured


@dataclass
class VerifierUpdate:
    new_tokens: list[int]  # tokens committed since the last update (the prompt on the first)
    feedback: Feedback | None  # verdict on the previous tree, None if there was none
    max_nodes: int  # node budget for the tree to return
    vocab_size: int
    # Target hidden states [M, dim] (final, normed) of the tokens that entered the target's KV cache
    # since the last update: the prompt on the first update, then the previous newest token and the
    # accepted draft tokens. So they cover every committed token but the newest one, which the target
    # has not read yet. None if the backend exposes none.
    hidden: torch.Tensor | None = None
    sampling: SamplingParams | None = None


class Drafter(Protocol):
    def draft(self, update: VerifierUpdate) -> DraftTree | None:
        """Absorb the update and propose a tree within update.max_nodes, or None to skip drafting."""

    def close(self) -> None:
        """End the session and free its state."""
