"""The decode loop: prefill -> repeat {draft tree -> tree forward -> verification rule -> commit ->
feedback} -> stop at a stop token or max_new_tokens. Without a drafter the same loop is plain
autoregressive decoding on the same backend (the baseline). Committed tokens stream out per step."""

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from proto.interface import Drafter, Feedback, VerifierUpdate
from proto.tree import DraftTree
from verifier.rules import SamplingParams, Verdict, next_token, verify
from verifier.target import Target


@dataclass
class Step:
    tokens: list[int]  # committed by this step, in order (already cut at a stop token / budget)
    accepted: int  # draft tokens accepted (tokens = accepted draft tokens + 1 bonus)
    tree_nodes: int  # 0 for a plain decoding step
    tree_depth: int
    draft_s: float
    verify_s: float  # target forward + LM head + rule + commit, itemised below
    forward_s: float = 0.0  # the target's forward over the pending token and the tree
    head_s: float = 0.0  # LM head over the rows the rule read
    commit_s: float = 0.0  # KV compaction
    prefill: bool = False  # the prompt's forward and its first token: no draft could have changed it


class RowLogits:
    """Target logits per row for a verification rule: row 0 and the rows of the drafter's first path
    (first-listed child at each depth: where a walk goes while the drafts are right) in one batched LM
    head call, any other row on demand. In bf16 the LM head is row-invariant (kernels.linear), so a row's
    logits do not depend on which call computed them; in fp32 they may differ by ~1e-6."""

    def __init__(self, target: Target, states: torch.Tensor, tree: DraftTree | None):
        t0 = time.perf_counter()
        self.target, self.states = target, states
        rows = [0]
        if tree is not None:
            parent = -1
            for i, p in enumerate(tree.parents):
                if p == parent:  # parents come first, so the first child of `parent` is met first
                    rows.append(i + 1)
                    parent = i
        self.rows = dict(zip(rows, target.logits(states[rows])))  # row -> logits [V] float32
        self.seconds = time.perf_counter() - t0

    def __call__(self, row: int) -> torch.Tensor:
        if row not in self.rows:
            t0 = time.perf_counter()
            self.rows[row] = self.target.logits(self.states[row : row + 1])[0]
            self.seconds += time.perf_counter() - t0
        return self.rows[row]


def tau(steps: list[Step]) -> float:
    """Mean accepted length: tokens committed per speculative step, bonus included (plain decoding: 1),
    over the steps of one or more generations; their prefill steps do not count."""
    spec = [s for s in steps if not s.prefill]
    return sum(len(s.tokens) for s in spec) / max(len(spec), 1)


def committed_tokens(tree: DraftTree | None, verdict: Verdict, stop_ids: set[int], room: int) -> list[int]:
    """The tokens a step commits: the accepted path and the bonus token, cut after the first stop token
    (plain decoding would have stopped there) and to the room left in the generation budget."""
    tokens = (tree.path_tokens(verdict.accepted) if tree else []) + [verdict.bonus]
    for i, tok in enumerate(tokens):
        if tok in stop_ids:
            tokens = tokens[: i + 1]
            break
    return tokens[:room]


def drafter_feedback(
    tree: DraftTree, verdict: Verdict, feedback_topk: int, kept: list[int] | None, verify_s: float
) -> Feedback:
    """What the next update tells the drafter about its tree: the accepted nodes, the target's
    probabilities, what verifying it cost (verify_s) and (feedback_topk > 0) the target's top-k at every
    row verification visited, in the drafter's node ids where the tree was cut to the target's depth
    (kept: new node id -> drafter's)."""
    topk = {}
    for row, dist in verdict.visited.items() if feedback_topk else ():
        top = dist.topk(min(feedback_topk, dist.shape[-1]))
        topk[row - 1] = (top.indices.tolist(), top.values.tolist())
    feedback = Feedback(verdict.accepted, verdict.target_probs, topk, 1000 * verify_s)
    if kept is not None:
        feedback = Feedback(
            [kept[i] for i in feedback.accepted],
            {kept[i]: p for i, p in feedback.target_probs.items()},
            {kept[i] if i >= 0 else -1: top for i, top in feedback.target_topk.items()},
            feedback.verify_ms,
        )
    return feedback


def generate(
    target: Target,
    prompt: list[int],
    params: SamplingParams,
    max_new_tokens: int,
    stop_ids: set[int],
    drafter: Drafter | None = None,
    max_nodes: int = 32,
    rule: str = "walk",
    feedback_topk: int = 0,
) -> Iterator[Step]:
    """Yield one Step per target forward (the first from the prefill). rule: see verifier.rules.verify;
    feedback_topk > 0 also sends the drafter the target's top-k at every row verification visited."""
    generator = torch.Generator().manual_seed(params.seed)
    t0 = time.perf_counter()
    states = target.prefill(prompt)
    first, _ = next_token(target.logits(states[-1:])[0], params, generator)
    yield Step([first], 0, 0, 0, 0.0, time.perf_counter() - t0, prefill=True)
    produced, pending = 1, first
    new_tokens, feedback, hidden = prompt + [first], None, states
    while produced < max_new_tokens and pending not in stop_ids:
        t0 = time.perf_counter()
        # never draft past the generation budget or the KV cache
        budget = min(max_nodes, max_new_tokens - produced - 1, target.max_seq_len - target.length - 1)
        tree, kept = None, None
        if drafter is not None and budget > 0:
            tree = drafter.draft(VerifierUpdate(new_tokens, feedback, budget, target.vocab_size, hidden, params))
        if tree is not None and tree.depth > target.max_tree_depth:  # deeper rows would not be exact
            tree, kept = tree.within_depth(target.max_tree_depth)
        t1 = time.perf_counter()
        states = target.verify_forward(pending, tree)
        t_forward = time.perf_counter()
        logits = RowLogits(target, states, tree)
        verdict = verify(logits, tree, params, generator, rule)
        t_rule = time.perf_counter()
        target.commit(verdict.accepted)
        t2 = time.perf_counter()
        tokens = committed_tokens(tree, verdict, stop_ids, max_new_tokens - produced)
        produced += len(tokens)
        pending = tokens[-1]
        new_tokens = tokens
        feedback = drafter_feedback(tree, verdict, feedback_topk, kept, t2 - t1) if tree else None
        hidden = states[[0] + [i + 1 for i in verdict.accepted]]  # rows of pending + accepted nodes
        yield Step(
            tokens,
            len(verdict.accepted),
            len(tree) if tree else 0,
            tree.depth if tree else 0,
            t1 - t0,
            t2 - t1,
            t_forward - t1,
            logits.seconds,
            t2 - t_rule,
        )
