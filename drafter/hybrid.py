"""One draft tree from several sources of candidates: a lookup (the suffix cache or prompt-lookup
n-grams) and a learned drafter (SpecBlock or the EAGLE-style baseline).

Glossary:
- *scored candidates* (`Scored`): a source's tree before ranking, each node with the source's own
  estimate of its probability given its parent (a draft probability, a count ratio).
- *calibration*: the two sources' estimates are not comparable raw (a count ratio of 1.0 from one
  earlier occurrence is not a sure thing; a draft probability of 0.3 may be accepted half the time). So
  each estimate is mapped to P(accepted | parent accepted), learned from the verifier's feedback per
  source and cell (depth, probability bin, match length), starting from the raw estimate as a prior.
- *path score*: the product of calibrated probabilities from the root, an estimate of the probability
  that the verifier accepts the node. The sum of the path scores of a tree's nodes is its expected
  number of accepted tokens (at temperature 0).

The builder merges the sources' paths into one trie (a path both propose is one node, with the better
of their calibrated probabilities) and takes the max_nodes nodes of highest path score best-first, so
every node's parent is in and the first-listed child of each node is its best (the path a chain
verifier such as vLLM takes). Worked example, budget 3: the suffix cache proposes `a b c` with
calibrated probabilities 0.9, 0.9, 0.9 and the model proposes `a` 0.6 and `x` 0.3; the merged `a` scores
0.9, then `a b` 0.81, `a b c` 0.73; `x` (0.3) does not fit. When the lookup's candidates alone promise
`skip_model_at` accepted tokens, the model drafts nothing that step (its context still advances).
`use` restricts a step to one source (bandit/arms.py chooses it per step): the other still absorbs the
step's tokens, so either can draft again at the next step.

A lookup path is a deterministic candidate: the tree carries no draft distribution, so only the per-node
rule (`walk`) verifies it, which is lossless for any fixed candidates."""

import heapq
import threading
import time
import typing
from dataclasses import dataclass, replace

from drafter.specblock import Steps, drive
from proto import checks
from proto.interface import Feedback, VerifierUpdate
from proto.tree import DraftTree


class Scored(typing.NamedTuple):
    """A source's candidate tree: flat, parents before children (parents[i] < i, -1 at the root)."""

    tokens: list[int]
    parents: list[int]
    probs: list[float]  # each node's probability given its parent, as the source estimates it
    feature: int = 0  # source-specific context for calibration: the suffix cache's longest match

    def tree(self, vocab_size: int, max_nodes: int) -> DraftTree:
        return DraftTree(self.tokens, self.parents, vocab_size, max_nodes)


@dataclass
class HybridConfig:
    # score: nodes by calibrated path score; source_order: the lookup's nodes first, then the model's
    # (the old `lookup: true` ranking, kept as a compare row)
    rank: typing.Literal["score", "source_order"] = "score"
    min_score: float = 0.0  # leave out nodes whose path score is below this (0 = fill the budget)
    # skip the learned drafter's forward when the lookup's own tree promises this many accepted tokens
    # (the sum of its path scores); 0 = never skip
    skip_model_at: float = 0.0
    prior_weight: float = 4.0  # pseudo-trials of the raw estimate in each calibration cell

    def validate(self) -> None:
        checks.nonneg(self, "skip_model_at")
        checks.positive(self, "prior_weight")
        if not 0 <= self.min_score < 1:
            raise ValueError(f"min_score: must be in [0, 1), got {self.min_score}")


BINS = 10  # probability bins per calibration cell


def match_bucket(n: int) -> int:
    return 0 if n <= 2 else 1 if n == 3 else 2 if n <= 5 else 3 if n <= 9 else 4


class Calibration:
    """P(node accepted | parent accepted) per (source, depth, raw-probability bin, feature bucket):
    running counts over every session that shares it, with prior_weight pseudo-trials at the raw
    estimate, so the first step already ranks by the sources' own probabilities."""

    def __init__(self, prior_weight: float = 4.0):
        self.prior_weight = prior_weight
        self.counts: dict[tuple, list[float]] = {}  # cell -> [trials, accepted]
        self.lock = threading.Lock()

    def cell(self, source: str, depth: int, raw: float, feature: int) -> tuple:
        return source, min(depth, 8), min(int(raw * BINS), BINS - 1), match_bucket(feature)

    def score(self, cell: tuple, raw: float) -> float:
        n, k = self.counts.get(cell, (0.0, 0.0))
        return (k + self.prior_weight * raw) / (n + self.prior_weight)

    def observe(self, cells: list[tuple], accepted: bool) -> None:
        with self.lock:
            for c in cells:
                entry = self.counts.setdefault(c, [0.0, 0.0])
                entry[0] += 1
                entry[1] += accepted

    def table(self) -> dict[str, float]:
        """'source/depth/bin/match' -> calibrated acceptance, for cells with trials (stats, tests)."""
        with self.lock:
            return {"/".join(map(str, c)): k / n for c, (n, k) in self.counts.items() if n}


class Built(typing.NamedTuple):
    tree: DraftTree | None
    cells: list[list[tuple]]  # per node: the calibration cell of every source that proposed it
    scores: list[float]  # per node: its path score
    origin: list[list[tuple[str, int]]]  # per node: (source, its node id in that source's candidates)


def build(
    sources: list[tuple[str, Scored]], cal: Calibration, max_nodes: int, vocab_size: int, cfg: HybridConfig
) -> Built:
    """The one tree from the sources' candidates (see the module doc)."""
    trie: dict[tuple[int, ...], list] = {}  # path -> [calibrated prob, cells, first (source rank, node), origin]
    children: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for rank, (name, s) in enumerate(sources):
        paths: list[tuple[int, ...]] = []
        for i, (tok, par, raw) in enumerate(zip(s.tokens, s.parents, s.probs)):
            path = (paths[par] if par >= 0 else ()) + (tok,)
            paths.append(path)
            cell = cal.cell(name, len(path), raw, s.feature)
            q = cal.score(cell, raw)
            node = trie.get(path)
            if node is None:
                trie[path] = [q, [cell], (rank, i), [(name, i)]]
                children.setdefault(path[:-1], []).append(path)
            else:
                node[0] = max(node[0], q)
                node[1].append(cell)
                node[3].append((name, i))

    def key(path: tuple[int, ...], score: float) -> tuple:
        return (-score, trie[path][2]) if cfg.rank == "score" else (trie[path][2],)

    heap = [(key(p, trie[p][0]), trie[p][0], p) for p in children.get((), [])]
    heapq.heapify(heap)
    ids: dict[tuple[int, ...], int] = {}
    tokens, parents, cells, scores, origin = [], [], [], [], []
    while heap and len(tokens) < max_nodes:
        _, score, path = heapq.heappop(heap)
        if score < cfg.min_score:
            continue
        ids[path] = len(tokens)
        tokens.append(path[-1])
        parents.append(ids[path[:-1]] if len(path) > 1 else -1)
        cells.append(trie[path][1])
        scores.append(score)
        origin.append(trie[path][3])
        for child in children.get(path, []):
            s = score * trie[child][0]
            heapq.heappush(heap, (key(child, s), s, child))
    tree = DraftTree(tokens, parents, vocab_size, max_nodes) if tokens else None
    return Built(tree, cells, scores, origin)


class Source(typing.Protocol):
    def scored(self, update: VerifierUpdate) -> Scored | None:
        """Absorb the update (its new tokens) and return candidates within update.max_nodes (none at 0)."""

    def close(self) -> None: ...


class LearnedSource(Source, typing.Protocol):
    def scored_steps(self, update: VerifierUpdate) -> Steps[Scored | None]:
        """scored, as steps that yield each forward (drafter.specblock.Steps)."""


class Hybrid:
    """The Drafter over a lookup source and an optional learned one (`model`), one session per object;
    the calibration is shared by every session of a config (and learns from all of them)."""

    def __init__(
        self, lookup: Source, lookup_name: str, model: LearnedSource | None, cal: Calibration, cfg: HybridConfig
    ):
        self.lookup, self.lookup_name, self.model, self.cal, self.cfg = lookup, lookup_name, model, cal, cfg
        self.last: Built | None = None
        self.use: typing.Literal["both", "lookup", "model"] = "both"  # the sources that draft the next step
        self.steps = self.model_skips = 0
        self.lookup_s = 0.0  # time in the lookup source over the session (the bench's step table shows it)

    @property
    def forwards(self) -> int:  # the learned drafter's forwards over the session (evaluation reports them)
        return getattr(self.model, "forwards", 0)

    def _learn(self, fb: Feedback) -> None:
        """Every node the verifier evaluated (its parent was accepted, or it is a root) is one trial for
        each source that proposed it."""
        last = self.last
        accepted = set(fb.accepted)
        tried = fb.target_probs.keys() or [i for i, p in enumerate(last.tree.parents) if p < 0 or p in accepted]
        for i in tried:
            if 0 <= i < len(last.cells):
                self.cal.observe(last.cells[i], i in accepted)

    def _model_feedback(self, fb: Feedback | None) -> Feedback | None:
        """The previous tree's verdict restated in the model's own node ids (empty where the accepted path
        left the model's nodes)."""
        if fb is None or self.last is None:
            return None
        ids = [dict(o).get("model") for o in self.last.origin]
        path = [ids[i] for i in fb.accepted]
        mine = path if None not in path else path[: path.index(None)]
        probs = {ids[n]: p for n, p in fb.target_probs.items() if 0 <= n < len(ids) and ids[n] is not None}
        return Feedback(mine, probs)

    def draft(self, update: VerifierUpdate) -> DraftTree | None:
        return drive(self.draft_steps(update))

    def draft_steps(self, update: VerifierUpdate) -> Steps[DraftTree | None]:
        """draft, as steps that yield the learned drafter's forwards (drafter.specblock.Steps)."""
        if update.feedback is not None and self.last is not None and self.last.tree is not None:
            self._learn(update.feedback)
        self.steps += 1
        sources = []
        t0 = time.perf_counter()
        found = self.lookup.scored(replace(update, max_nodes=0) if self.use == "model" else update)
        self.lookup_s += time.perf_counter() - t0
        if found is not None:
            sources.append((self.lookup_name, found))
        if self.model is not None:
            skip = self.use == "lookup"
            if not skip and found is not None and self.cfg.skip_model_at > 0:
                alone = build(sources, self.cal, update.max_nodes, update.vocab_size, self.cfg)
                skip = sum(alone.scores) >= self.cfg.skip_model_at
            self.model_skips += skip
            fb = self._model_feedback(update.feedback)
            asked = replace(update, feedback=fb, max_nodes=0 if skip else update.max_nodes)
            proposed = yield from self.model.scored_steps(asked)
            if proposed is not None:
                sources.append(("model", proposed))
        self.last = build(sources, self.cal, update.max_nodes, update.vocab_size, self.cfg)
        return self.last.tree

    def close(self) -> None:
        self.lookup.close()
        if self.model is not None:
            self.model.close()
