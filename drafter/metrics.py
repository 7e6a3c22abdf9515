"""Prometheus metrics of the sidecar (server.metrics_port), in a registry of each server's own so that
several servers can live in one process (tests). DrafterService calls the hooks; what can be read off
the service at scrape time (open sessions, the online learner's counters) is read then, not mirrored."""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# drafting is sub-millisecond for n-gram trees and tens of ms for a neural drafter on CPU
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
NODE_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ACCEPTED_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class BanditCollector:
    """The online learner's own counters (bandit.online.OnlineAdapter), read at scrape time."""

    def __init__(self, adapter):
        self.adapter = adapter

    def collect(self):
        for name, doc in (
            ("decisions", "Bandit decisions taken (update now or keep drafting)"),
            ("updates", "Online drafter updates run"),
            ("rollbacks", "Online updates rolled back by the held-out guard"),
        ):
            yield CounterMetricFamily(f"specdraft_bandit_{name}", doc, value=getattr(self.adapter, name))


class ArmsCollector:
    """The drafter-and-budget choice (bandit.arms.ArmChooser), read at scrape time: rounds per arm, and
    the tokens/s each arm measured over every client's ended sessions."""

    def __init__(self, chooser):
        self.chooser = chooser

    def collect(self):
        rounds = CounterMetricFamily("specdraft_arm_rounds", "Rounds drafted with each arm", labels=["arm"])
        rate = GaugeMetricFamily(
            "specdraft_arm_tokens_per_second",
            "Committed tokens per second of drafting + verification, per arm, pooled over ended sessions",
            labels=["arm"],
        )
        pool = self.chooser.stats()["all"]["arms"]
        for arm, n in zip(self.chooser.cfg.choose, self.chooser.pulled):
            rounds.add_metric([arm], n)
            rate.add_metric([arm], pool[arm]["tokens_per_s"])
        yield rounds
        yield rate


class Metrics:
    def __init__(self, sessions_open: Callable[[], int], adapter=None, arms=None):
        self.registry = r = CollectorRegistry()
        Gauge("specdraft_sessions_open", "Drafting sessions (streams) open now", registry=r).set_function(sessions_open)
        self.sessions = Counter("specdraft_sessions", "Drafting sessions opened", registry=r)
        self.rounds = Counter("specdraft_rounds", "Rounds served (one update in, one tree out)", registry=r)
        self.round_seconds = Histogram(
            "specdraft_round_seconds",
            "Server time per round, update parsed to tree built",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tree_nodes = Histogram("specdraft_tree_nodes", "Nodes per tree sent", buckets=NODE_BUCKETS, registry=r)
        self.accepted = Histogram(
            "specdraft_accepted_tokens",
            "Draft tokens the verifier accepted per round that reported feedback",
            buckets=ACCEPTED_BUCKETS,
            registry=r,
        )
        self.empty = Counter(
            "specdraft_empty_trees",
            "Rounds that asked for a tree and got none: the client decodes that step plainly",
            registry=r,
        )
        self.errors = Counter(
            "specdraft_errors", "Streams ended with an error status, by gRPC code", ["code"], registry=r
        )
        self.batch_drafts = Histogram(
            "specdraft_batch_drafts",
            "Sessions' drafts served by one batched drafter forward",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_wait = Histogram(
            "specdraft_batch_wait_seconds",
            "Time a draft's forward waited for its batch to start",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        if adapter is not None:
            r.register(BanditCollector(adapter))
        if arms is not None:
            r.register(ArmsCollector(arms))

    def batch(self, stats) -> None:
        """One batched forward ran (drafter.batch.BatchStats)."""
        self.batch_drafts.observe(stats.drafts)
        for w in stats.waits:
            self.batch_wait.observe(w)

    def round(self, seconds: float, requested: bool, nodes: int, accepted: int | None) -> None:
        """One round served: requested = the update asked for a tree (max_nodes > 0); accepted is None
        when the update carried no feedback."""
        self.rounds.inc()
        self.round_seconds.observe(seconds)
        self.tree_nodes.observe(nodes)
        if requested and nodes == 0:
            self.empty.inc()
        if accepted is not None:
            self.accepted.observe(accepted)


def percentiles(values, *qs: float) -> list[float]:
    """The q-quantiles (0..1) of values by rank (sorted once), 0.0 for none."""
    ordered = sorted(values)
    return [ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else 0.0 for q in qs]


def percentile(values, q: float) -> float:
    return percentiles(values, q)[0]
