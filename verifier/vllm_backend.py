"""vLLM as the verifier: a vLLM proposer that drafts through the specdraft sidecar (the vLLM rows of
`specdraft eval` and the proposer's config loading are in specdraft/vllm.py).

vLLM 0.32 verifies *chains* (no tree attention) and hands an external drafter token ids only, through
its `custom_class` extension point: vLLM builds `SpecdraftProposer(vllm_config)` inside its engine
process and calls `propose(...)` once per step with every running request's tokens. So, per request:

- one sidecar stream (`RemoteDrafter`: deadline fallback, reconnect with replay), opened at its first
  proposal and closed when the request leaves the batch (finished or preempted; a preempted request
  that comes back opens a new stream with its whole context);
- the proposal is the tree's *first path*: from the roots down, the first-listed child at each level
  (every specdraft drafter lists children best first), cut to num_speculative_tokens;
- acceptance is inferred from the next call: the tokens vLLM committed since the last proposal begin
  with the accepted draft tokens, then one token of its own, and that is sent back as feedback.

vLLM does not say which request a batch row belongs to, so rows are matched to streams by content: a
stream owns a row whose tokens extend the tokens the stream has seen. Requests with identical
contexts are interchangeable until they diverge, so a swap between them changes nothing.

Whatever the sidecar does, vLLM's own verification decides the output: a late, lost or bad tree
proposes nothing and vLLM decodes that step normally.
"""

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from proto.interface import Feedback, VerifierUpdate
from proto.tree import DraftTree
from verifier.remote import RemoteConfig, RemoteDrafter, connect

log = logging.getLogger(__name__)
TIMING_EVERY = 500  # proposer steps between the timing lines in vLLM's log


def first_path(tree: DraftTree, k: int) -> list[int]:
    """Node ids of the tree's first path (first-listed child at each level), at most k long."""
    path, parent = [], -1
    while len(path) < k:
        child = next((i for i in range(path[-1] + 1 if path else 0, len(tree)) if tree.parents[i] == parent), None)
        if child is None:
            break
        path.append(child)
        parent = child
    return path


@dataclass(eq=False)  # identity: two requests may hold equal tokens
class _Request:
    drafter: object  # RemoteDrafter: one sidecar stream
    seen: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # tokens the stream has been sent
    path: list[int] = field(default_factory=list)  # node ids of the last proposal
    proposal: list[int] = field(default_factory=list)  # and their tokens

    def extends(self, ctx: np.ndarray) -> bool:
        n = len(self.seen)
        return n <= len(ctx) and bool((ctx[:n] == self.seen).all())


class SidecarProposer:
    """The body of a vLLM `custom_class` proposer; vLLM builds specdraft.vllm.SpecdraftProposer, which reads
    its remote config and node budget from the environment and passes them here."""

    def __init__(self, vllm_config, remote: RemoteConfig, max_nodes: int):
        self.k = vllm_config.speculative_config.num_speculative_tokens
        self.vocab_size = vllm_config.model_config.get_vocab_size()
        self.max_model_len = vllm_config.model_config.max_model_len
        self.remote = remote
        self.max_nodes = max(max_nodes, self.k)
        self.conn = connect(remote)
        self.requests: list[_Request] = []  # in the row order of the last call
        self.opened = 0
        self.step_s: list[float] = []  # propose() wall time of the steps since the last timing line
        self.returned: float | None = None  # when the last propose() returned: vLLM's step runs until the next
        log.info(
            "specdraft proposer: drafting through the sidecar at %s, up to %d tokens per step from %d-node trees",
            remote.address,
            self.k,
            self.max_nodes,
        )

    def load_model(self, *args, **kwargs) -> None:
        """vLLM's hook for loading draft weights: the sidecar holds the drafter, so nothing to do."""

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings=None,
        **_,
    ) -> list[list[int]]:
        """sampled_token_ids[i]: the tokens row i committed this step (empty while it is mid-prefill);
        token_ids_cpu[i, :num_tokens_no_spec[i]]: row i's whole context. Returns draft tokens per row."""
        t0 = time.perf_counter()
        # vLLM's step between two calls (the batch's forward, rejection sampling, scheduling): what the
        # sidecar is told verifying its last proposal cost
        verify_ms = 1000 * (t0 - self.returned) if self.returned is not None else 0.0
        free = list(self.requests)
        live, drafts = [], []
        for i, sampled in enumerate(sampled_token_ids):
            ctx = token_ids_cpu[i, : int(num_tokens_no_spec[i])]
            req = self._claim(free, i, ctx)
            if req is None and sampled:  # a new request (or one back from preemption)
                self.opened += 1
                req = _Request(RemoteDrafter(self.conn, f"vllm/{self.opened}"))
            if req is not None:
                live.append(req)
            drafts.append(self._step(req, ctx, verify_ms) if sampled else [])
        for req in free:  # finished or preempted
            req.drafter.close()
        self.requests = live
        self.returned = time.perf_counter()
        self._timed(self.returned - t0)
        return drafts

    def _timed(self, seconds: float) -> None:
        """Every TIMING_EVERY steps, a log line with what proposing cost per step (vLLM waits for it)."""
        self.step_s.append(seconds)
        if len(self.step_s) == TIMING_EVERY:
            ms = sorted(1000 * s for s in self.step_s)
            log.info(
                "specdraft proposer: %d steps, propose p50 %.2f ms, mean %.2f ms, max %.2f ms",
                len(ms),
                ms[len(ms) // 2],
                sum(ms) / len(ms),
                ms[-1],
            )
            self.step_s.clear()

    def _claim(self, free: list[_Request], row: int, ctx: np.ndarray) -> _Request | None:
        """The stream whose tokens this row extends; the one that had this row last time first."""
        hint = [self.requests[row]] if row < len(self.requests) and self.requests[row] in free else []
        req = next((r for r in hint + free if r.extends(ctx)), None)
        if req is not None:
            free.remove(req)
        return req

    def _step(self, req: _Request, ctx: np.ndarray, verify_ms: float) -> list[int]:
        new = ctx[len(req.seen) :]
        feedback = None
        if req.proposal:
            # vLLM committed the accepted draft tokens and then one of its own
            m = max(0, min(len(req.proposal), len(new) - 1))
            hits = int(np.cumprod(new[:m] == np.asarray(req.proposal[:m])).sum())
            feedback = Feedback(accepted=req.path[:hits], target_probs={}, verify_ms=verify_ms)
        update = VerifierUpdate(new.tolist(), feedback, self.max_nodes, self.vocab_size)
        req.seen = ctx.copy()
        tree = req.drafter.draft(update)
        room = self.max_model_len - len(ctx)
        req.path = first_path(tree, min(self.k, room)) if tree is not None else []
        req.proposal = tree.path_tokens(req.path) if req.path else []
        return req.proposal
