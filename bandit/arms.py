"""Which drafter and tree budget a stream of traffic gets: a bandit over arms, by measured cost.

An arm is a source mix of the hybrid drafter (drafter/hybrid.py) and a node budget, written
`<sources>:<nodes>`: `lookup:8` (the suffix cache or prompt lookup alone), `model:6` (SpecBlock alone),
`both:8` (one tree from both). Its value is committed tokens per second of a round's whole time: the
drafter's own (this module's choice included) plus verifying the tree, which the verifier reports in
the feedback (`Feedback.verify_ms`: our engine and the vLLM proposer send it) or, where it does not,
the time from returning the tree to receiving the next update.

The choice is per session and per round: UCB over the arms' throughput (tokens / seconds, ratios of
sums), starting from what earlier sessions of the same `client_label` measured (their pooled rounds,
scaled down to at most `prior_rounds` per arm), or of all clients for a label not seen yet. The client is
the label up to its first "/" ("vllm/17" and "vllm/18" are one client, as are "HumanEval/0" and
"HumanEval/1"). So a new session of a known client starts on what its traffic taught, and its own rounds
soon outweigh that.
An ended session's rounds join its client's pool; older sessions fade by `client_discount` per session.

Every arm decodes losslessly (the verifier judges whatever tree comes), so choosing never changes the
output; it changes only the time."""

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from drafter.hybrid import Hybrid
from drafter.specblock import Steps, drive
from proto import checks
from proto.interface import VerifierUpdate, client_of
from proto.tree import DraftTree

SOURCES = ("lookup", "model", "both")
ALL_CLIENTS = ""  # the pool of every client's sessions: a new label's starting point


def parse_arm(arm: str) -> tuple[str, int]:
    """'both:8' -> ('both', 8); ValueError naming what is wrong."""
    sources, _, nodes = arm.partition(":")
    if sources not in SOURCES or not nodes.isdigit() or int(nodes) < 1:
        raise ValueError(f"{arm!r} is not <sources>:<nodes> with sources one of {', '.join(SOURCES)} and nodes >= 1")
    return sources, int(nodes)


@dataclass
class ArmsConfig:
    # the arms a session chooses among each round; empty = no choice (the drafter drafts as configured).
    # Needs the hybrid (drafter.kind specblock with a lookup); nodes <= drafter.max_nodes
    choose: list[str] = field(default_factory=list)
    exploration: float = 0.15  # UCB bonus scale, in units of the best arm's tokens/s
    prior_rounds: float = 32.0  # a client's pooled rounds count as at most this many per arm in a new session
    client_discount: float = 0.9  # per ended session, the weight left to the client's older sessions
    max_clients: int = 256  # client labels remembered (least recently seen forgotten first)

    def validate(self) -> None:
        for i, arm in enumerate(self.choose):
            try:
                parse_arm(arm)
            except ValueError as e:
                raise ValueError(f"choose[{i}]: {e}") from None
        if len(set(self.choose)) != len(self.choose):
            raise ValueError(f"choose: an arm is listed twice in {self.choose}")
        checks.nonneg(self, "exploration", "prior_rounds")
        checks.fraction(self, "client_discount", low_open=True)
        checks.positive(self, "max_clients")


class Tally:
    """Per arm: rounds, committed tokens and seconds (weights: pooled sessions fade, so they are floats)."""

    def __init__(self, k: int):
        self.rounds, self.tokens, self.seconds = [0.0] * k, [0.0] * k, [0.0] * k

    def add(self, arm: int, tokens: float, seconds: float, weight: float = 1.0) -> None:
        self.rounds[arm] += weight
        self.tokens[arm] += weight * tokens
        self.seconds[arm] += weight * seconds

    def rate(self, arm: int) -> float:
        return self.tokens[arm] / self.seconds[arm] if self.seconds[arm] > 0 else 0.0

    def scaled(self, most: float) -> "Tally":
        """A copy whose arms count at most `most` rounds each (their rates unchanged)."""
        out = Tally(len(self.rounds))
        for a, n in enumerate(self.rounds):
            w = min(1.0, most / n) if n else 0.0
            out.add(a, self.tokens[a] / n if n else 0.0, self.seconds[a] / n if n else 0.0, w * n)
        return out

    def merge(self, other: "Tally", keep: float) -> None:
        """self = keep * self + other."""
        for a in range(len(self.rounds)):
            self.rounds[a] = keep * self.rounds[a] + other.rounds[a]
            self.tokens[a] = keep * self.tokens[a] + other.tokens[a]
            self.seconds[a] = keep * self.seconds[a] + other.seconds[a]


def ucb(t: Tally, exploration: float) -> tuple[int, str]:
    """The arm to pull and why: an untried arm first, else the highest upper bound on tokens/s (the bonus
    in units of the best rate, so it is scale-free); ties go to the earlier-listed arm."""
    untried = [a for a, n in enumerate(t.rounds) if n <= 0]
    if untried:
        return untried[0], "untried"
    rates = [t.rate(a) for a in range(len(t.rounds))]
    best, total = max(rates), sum(t.rounds)
    score = [r + exploration * best * math.sqrt(2 * math.log(max(total, 1.0)) / n) for r, n in zip(rates, t.rounds)]
    arm = max(range(len(score)), key=lambda a: (score[a], -a))
    return arm, "best" if rates[arm] >= best * (1 - 1e-9) else "exploring"  # (float sums: equal rates differ)


class ArmChooser:
    """What the sessions of one drafter config share: the arms, each client's pooled tally and what its
    newest round drew, and rounds per arm (metrics). Thread-safe: sessions may draft on worker threads."""

    def __init__(self, cfg: ArmsConfig):
        self.cfg = cfg
        self.arms = [parse_arm(a) for a in cfg.choose]
        self.pools: OrderedDict[str, Tally] = OrderedDict({ALL_CLIENTS: Tally(len(self.arms))})
        self.current: OrderedDict[str, tuple[str, str]] = OrderedDict()  # client -> (arm, why), newest round
        self.pulled = [0] * len(self.arms)  # rounds drawn per arm since the start
        self.lock = threading.Lock()

    def chose(self, client: str, arm: int, why: str) -> None:
        with self.lock:
            self.pulled[arm] += 1
            self.current[client] = (self.cfg.choose[arm], why)
            self.current.move_to_end(client)
            if len(self.current) > self.cfg.max_clients:
                self.current.popitem(last=False)

    def start(self, client: str) -> Tally:
        with self.lock:
            pool = self.pools.get(client) or self.pools[ALL_CLIENTS]
            return pool.scaled(self.cfg.prior_rounds)

    def end(self, client: str, own: Tally) -> None:
        with self.lock:
            for key in {client, ALL_CLIENTS}:
                pool = self.pools.setdefault(key, Tally(len(self.arms)))
                pool.merge(own, self.cfg.client_discount)
                self.pools.move_to_end(key)
            while len(self.pools) > self.cfg.max_clients + 1:
                del self.pools[next(k for k in self.pools if k != ALL_CLIENTS)]

    def stats(self) -> dict:
        """Per client (ALL_CLIENTS as 'all'): its newest arm and why, and per arm the pooled tokens/s and rounds."""
        with self.lock:
            return {
                client or "all": {
                    "arm": self.current.get(client, ("", ""))[0],
                    "why": self.current.get(client, ("", ""))[1],
                    "arms": {
                        arm: {"tokens_per_s": round(pool.rate(a), 3), "rounds": round(pool.rounds[a], 3)}
                        for a, arm in enumerate(self.cfg.choose)
                    },
                }
                for client, pool in self.pools.items()
            }


class ArmDrafter:
    """A hybrid session whose every round drafts with the arm its session bandit picks. A round's reward
    is booked when the next update arrives: the tokens it commits over the round's drafting time plus its
    verification time. The first round is not booked: its drafting reads the prompt, whatever the arm."""

    def __init__(self, inner: Hybrid, chooser: ArmChooser, label: str, clock=time.perf_counter):
        self.inner, self.chooser, self.client, self.clock = inner, chooser, client_of(label), clock
        self.tally = chooser.start(self.client)
        self.own = Tally(len(chooser.arms))  # this session's rounds only (what joins the pool)
        self.arm: int | None = None
        self.why = ""
        self.prompt_round = True  # the newest round drafted right after reading the prompt
        self.draft_s = 0.0
        self.sent = 0.0  # when the previous tree was returned
        self.choose_s = 0.0  # the bandit's own time over the session (bookkeeping and choice)
        self.pulls = [0] * len(chooser.arms)

    @property
    def chosen(self) -> tuple[str, str]:
        """The arm of the newest round and why (GetSessionStats)."""
        return (self.chooser.cfg.choose[self.arm], self.why) if self.arm is not None else ("", "")

    @property
    def forwards(self) -> int:
        return self.inner.forwards

    @property
    def lookup_s(self) -> float:
        return self.inner.lookup_s

    def draft(self, update: VerifierUpdate) -> DraftTree | None:
        return drive(self.draft_steps(update))

    def draft_steps(self, update: VerifierUpdate) -> Steps[DraftTree | None]:
        t0 = self.clock()
        if self.arm is not None and not self.prompt_round:
            fb = update.feedback
            verify_s = fb.verify_ms / 1000 if fb is not None and fb.verify_ms > 0 else t0 - self.sent
            for tally in (self.tally, self.own):
                tally.add(self.arm, len(update.new_tokens), self.draft_s + verify_s)
        self.prompt_round = self.arm is None
        self.arm, self.why = ucb(self.tally, self.chooser.cfg.exploration)
        self.pulls[self.arm] += 1
        self.chooser.chose(self.client, self.arm, self.why)
        sources, nodes = self.chooser.arms[self.arm]
        self.inner.use = sources
        self.choose_s += self.clock() - t0
        tree = yield from self.inner.draft_steps(replace(update, max_nodes=min(update.max_nodes, nodes)))
        self.sent = self.clock()
        self.draft_s = self.sent - t0
        return tree

    def close(self) -> None:
        if sum(self.own.rounds):
            self.chooser.end(self.client, self.own)
        self.inner.close()
