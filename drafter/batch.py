"""Batched drafting across sessions, on the sidecar's event loop. A SpecBlock draft runs as steps
(drafter.specblock.Steps): a generator that yields each forward it needs, first the encoding of the round's
new context positions, then each block forward. Every session's round runs its steps here; the forwards
they wait on run together, one call over all their rows (SpecBlock.encode, SpecBlock.draft_blocks), each
session's columns attending to its own context cache.

A batch runs as soon as every draft in progress waits on a forward (nobody else can join soon), when the
pending rows reach max_rows, or when the oldest has waited wait_s (a round that arrives a little later
joins it). Everything runs on the event loop's thread, forwards included: the tree building of many
sessions and their batched forwards never contend for the GIL, and an online update (which also runs on
the loop, between rounds) can never land inside a forward. A draft that was already under way keeps the
drafting copy of the weights it started with (SpecBlock.drafting); its next round recomputes its context.

Drafters without steps (n-gram, the suffix cache alone) never come here."""

import asyncio
import contextlib
import time
import typing
from collections.abc import Callable

from drafter.specblock import Forward, Steps


class Pending(typing.NamedTuple):
    forward: Forward
    result: asyncio.Future  # list[Drafted], or the exception the batch's forward raised
    since: float  # perf_counter when it was asked for
    size: int  # its rows (Forward.rows)


class BatchStats(typing.NamedTuple):
    """One forward run by the batcher: the drafts it served, their rows and how long each waited (s)."""

    drafts: int
    rows: int
    waits: list[float]


T = typing.TypeVar("T")
SETTLE_YIELDS = 3  # loop iterations a pending forward lets pass first: rounds already arrived reach theirs


class Batcher:
    def __init__(self, max_rows: int, wait_s: float, on_batch: Callable[[BatchStats], None] | None = None):
        self.max_rows, self.wait_s, self.on_batch = max_rows, wait_s, on_batch
        self.pending: list[Pending] = []
        self.drafts = 0  # drafts in progress: their steps are running or waiting on a forward
        self.changed = asyncio.Event()  # a forward was asked for, or a draft ended
        self.runner: asyncio.Task | None = None

    async def draft(self, steps: Steps[T]) -> T:
        """Run one draft's steps to their end, each forward batched with the other drafts' pending ones."""
        self.drafts += 1
        try:
            forward = next(steps)
            while True:
                result = asyncio.get_running_loop().create_future()
                self.pending.append(Pending(forward, result, time.perf_counter(), forward.rows()))
                self._wake()
                try:
                    drafted = await result
                except Exception as e:  # the batch's forward failed: the draft fails with it
                    forward = steps.throw(e)
                else:
                    forward = steps.send(drafted)
        except StopIteration as end:
            return end.value
        finally:
            self.drafts -= 1
            steps.close()
            self._wake()  # the drafts left may all be waiting now

    def _wake(self) -> None:
        self.changed.set()
        if self.pending and (self.runner is None or self.runner.done()):
            self.runner = asyncio.ensure_future(self._run_pending())

    async def _run_pending(self) -> None:
        """Run batches while forwards are pending: each once every draft in progress waits on one, once
        they hold max_rows rows, or once the oldest has waited wait_s."""
        while True:
            for _ in range(SETTLE_YIELDS):
                await asyncio.sleep(0)
            self.pending = [p for p in self.pending if not p.result.done()]  # their drafts were cancelled
            if not self.pending:
                return
            left = self.pending[0].since + self.wait_s - time.perf_counter()
            full = sum(p.size for p in self.pending) >= self.max_rows
            if len(self.pending) < self.drafts and not full and left > 0:
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self.changed.wait()
                continue
            self._run_batch()

    def _run_batch(self) -> None:
        """The oldest pending forwards with one model and op (up to max_rows rows) as one forward; results
        (or its error) to each."""
        first, batch, size = self.pending[0].forward, [], 0
        for p in self.pending:
            same = p.forward.model is first.model and p.forward.op == first.op
            if same and (not batch or size + p.size <= self.max_rows):
                batch.append(p)
                size += p.size
        taken = {id(p) for p in batch}
        self.pending = [p for p in self.pending if id(p) not in taken]
        start = time.perf_counter()
        try:
            results = first._replace(items=[item for p in batch for item in p.forward.items]).run()
        except Exception as e:  # every draft in the batch fails with it (its session ends, see the server)
            for p in batch:
                p.result.set_exception(e)
        else:
            i = 0
            for p in batch:
                n = len(p.forward.items)
                p.result.set_result(results[i : i + n])  # not done: _run_pending dropped the cancelled ones
                i += n
        if self.on_batch is not None:
            self.on_batch(BatchStats(len(batch), size, [start - p.since for p in batch]))
