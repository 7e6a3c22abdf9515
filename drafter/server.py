"""The drafter as a gRPC sidecar (`specdraft serve-drafter`): one bidirectional stream per generation
session, each with its own drafter state, on an asyncio server. Drafting runs in a thread pool so a
slow drafter never blocks the other streams, or inline on the event loop for cheap drafters
(workers: 0). The standard health and reflection services ride along.

A bad update ends its own stream with a precise status; every other session goes on."""

import asyncio
import bisect
import collections
import hmac
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from drafter.metrics import Metrics
from proto import checks
from proto import drafter_pb2 as pb
from proto import drafter_pb2_grpc as pb_grpc
from proto.interface import Drafter
from proto.tree import DraftTree
from proto.wire import API_VERSION, WireError, msg_to_update

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Drafter"].full_name  # "specdraft.v1.Drafter"


@dataclass
class ServerConfig:
    address: str = "127.0.0.1:50051"  # host:port; loopback by default, port 0 = any free port
    max_sessions: int = 64  # open streams at once; more get RESOURCE_EXHAUSTED
    max_nodes: int = 256  # cap on the node budget of any tree
    max_message_mb: float = 16.0  # larger messages get RESOURCE_EXHAUSTED
    session_ttl_s: float = 300.0  # a session idle this long is evicted
    drain_s: float = 5.0  # on SIGTERM/SIGINT, open streams get this long to finish
    workers: int = 0  # drafting threads; 0 = draft on the event loop itself, the
    # fastest for cheap drafters (ngram); a neural drafter wants >= 1
    tls_cert: str = ""  # PEM certificate chain; with tls_key turns TLS on
    tls_key: str = ""
    token_env: str = ""  # environment variable holding the shared-secret token; "" = none
    metrics_port: int = 0  # Prometheus /metrics over HTTP on the address's host at this port; 0 = off

    def validate(self) -> None:
        checks.host_port(self, "address")
        checks.positive(self, "max_sessions", "max_nodes", "max_message_mb", "session_ttl_s")
        checks.nonneg(self, "drain_s", "workers")
        if bool(self.tls_cert) != bool(self.tls_key):
            key, other = ("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert")
            raise ValueError(f"{key}: give server.{other} too (TLS needs both) or neither")
        checks.existing_file(self, "tls_cert")
        checks.existing_file(self, "tls_key")
        checks.token_set(self, "token_env")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port: must be a port number (0 = off), got {self.metrics_port}")


def percentile(values, q: float) -> float:
    """The q-quantile (0..1) of values by rank, 0.0 for none."""
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else 0.0


@dataclass
class DrafterInfo:
    """What GetInfo tells a client about the drafter behind the server."""

    kind: str  # ngram, specblock, random
    model: str  # the target model the drafter serves
    vocab_size: int  # the target's vocabulary: every update's tokens lie in it
    draft_vocab_size: int  # tokens the drafter can propose (a learned drafter's draft vocabulary)
    hidden_dim: int  # width of the hidden states an update must carry; 0 = none taken
    tree_builder: str  # how it builds trees, in words


class Session:
    def __init__(self, sid: str, drafter):
        self.id, self.drafter, self.label = sid, drafter, ""
        self.rounds = self.tokens = self.nodes = self.accepted = self.feedback_rounds = 0
        self.last_seen = time.monotonic()
        self.prev_tree: DraftTree | None = None  # the last tree sent, to check feedback against


class Stats:
    """Server-wide counters; latencies and round times kept for a bounded window."""

    def __init__(self):
        self.start = time.monotonic()
        self.sessions_total = self.sessions_evicted = self.rounds = self.nodes = 0
        self.feedback_rounds = self.accepted = 0
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=20_000)
        self.round_times: collections.deque[float] = collections.deque(maxlen=200_000)
        self.errors: collections.Counter[str] = collections.Counter()

    def add_round(self, nodes: int, ms: float) -> None:
        self.rounds += 1
        self.nodes += nodes
        self.latency_ms.append(ms)
        self.round_times.append(time.monotonic())

    def percentile(self, q: float) -> float:
        return percentile(self.latency_ms, q)

    def rounds_per_s(self, window: float = 60.0) -> float:
        now = time.monotonic()
        times = list(self.round_times)
        recent = len(times) - bisect.bisect_left(times, now - window)
        return recent / min(window, max(now - self.start, 1e-9))


class DrafterService(pb_grpc.DrafterServicer):
    def __init__(self, cfg: ServerConfig, new_drafter: Callable[[], Drafter], info: DrafterInfo, adapter=None):
        self.cfg, self.new_drafter, self.info = cfg, new_drafter, info
        self.token = checks.env_token(cfg.token_env)
        self.sessions: dict[str, Session] = {}
        self.stats = Stats()
        self.metrics = Metrics(lambda: len(self.sessions), adapter)
        self.pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="draft") if cfg.workers else None
        self.closing = False
        # online learning (bandit.online.OnlineAdapter): observes every round and may update the shared
        # drafter model between rounds
        self.adapter = adapter
        self.model_lock = threading.Lock()  # an update never overlaps a draft running on a worker thread

    def _draft(self, drafter, update):
        with self.model_lock:
            return drafter.draft(update)

    async def _fail(self, context, code: grpc.StatusCode, message: str):
        self.stats.errors[code.name] += 1
        self.metrics.errors.labels(code.name).inc()
        log.warning("%s: %s", code.name, message)
        await context.abort(code, message)

    async def _authorize(self, context) -> None:
        if not self.token:
            return
        got = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode()):
            await self._fail(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong shared-secret token (metadata 'authorization: Bearer <token>')",
            )

    async def Session(self, request_iterator, context):
        await self._authorize(context)
        if self.closing:
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if len(self.sessions) >= self.cfg.max_sessions:
            await self._fail(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(self.sessions)} sessions open, the server's limit is {self.cfg.max_sessions}",
            )
        sess = Session(uuid.uuid4().hex[:16], self.new_drafter())
        self.sessions[sess.id] = sess
        self.stats.sessions_total += 1
        self.metrics.sessions.inc()
        loop = asyncio.get_running_loop()
        requests = request_iterator.__aiter__()
        ended = "client closed"
        try:
            while True:
                try:
                    async with asyncio.timeout(self.cfg.session_ttl_s):
                        msg = await anext(requests)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    self.stats.sessions_evicted += 1
                    ended = "evicted"
                    await self._fail(
                        context,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"session {sess.id} idle for more than {self.cfg.session_ttl_s} s; evicted",
                    )
                t0 = time.perf_counter()
                first = sess.rounds == 0
                try:
                    prev_parents = sess.prev_tree.parents if sess.prev_tree else None
                    update = msg_to_update(
                        msg, self.info.vocab_size, self.info.hidden_dim, prev_parents, self.cfg.max_nodes, first
                    )
                except WireError as e:
                    ended = "bad update"
                    await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, f"session {sess.id}: {e}")
                if first:
                    sess.label = msg.client_label
                    log.info(
                        "session %s opened (%s, %d prompt tokens)",
                        sess.id,
                        sess.label or "no label",
                        len(update.new_tokens),
                    )
                tree: DraftTree | None = None
                try:
                    if update.max_nodes > 0 and self.pool is None:
                        tree = sess.drafter.draft(update)
                    elif update.max_nodes > 0:
                        tree = await loop.run_in_executor(self.pool, self._draft, sess.drafter, update)
                except Exception as e:  # a drafter bug ends this session only, with its traceback in the log
                    log.exception("session %s: drafter failed", sess.id)
                    ended = "drafter failed"
                    await self._fail(context, grpc.StatusCode.INTERNAL, f"session {sess.id}: drafter failed: {e!r}")
                if self.adapter is not None:  # may run an online update: between rounds, under the model lock
                    with self.model_lock:
                        self.adapter.observe(sess.id, update, first, sess.prev_tree)
                sess.rounds += 1
                sess.tokens += len(update.new_tokens)
                sess.last_seen = time.monotonic()
                if update.feedback is not None:
                    sess.feedback_rounds += 1
                    sess.accepted += len(update.feedback.accepted)
                    self.stats.feedback_rounds += 1
                    self.stats.accepted += len(update.feedback.accepted)
                n = len(tree) if tree else 0
                sess.nodes += n
                sess.prev_tree = tree
                ms = 1000 * (time.perf_counter() - t0)
                self.stats.add_round(n, ms)
                accepted = None if update.feedback is None else len(update.feedback.accepted)
                self.metrics.round(ms / 1000, update.max_nodes > 0, n, accepted)
                yield pb.DraftTree(
                    session_id=sess.id,
                    round=msg.round,
                    tokens=tree.tokens if tree else (),
                    parents=tree.parents if tree else (),
                    draft_ms=ms,
                )
        except asyncio.CancelledError:
            ended = "client cancelled"
            raise
        finally:
            del self.sessions[sess.id]
            if self.adapter is not None:
                self.adapter.buffer.end(sess.id)
            sess.drafter.close()
            log.info(
                "session %s ended (%s): %d rounds, %d tokens, %.1f nodes/tree",
                sess.id,
                ended,
                sess.rounds,
                sess.tokens,
                sess.nodes / max(sess.rounds, 1),
            )

    async def GetInfo(self, request, context):
        await self._authorize(context)
        i = self.info
        return pb.ServerInfo(
            api_version=API_VERSION,
            server_version=version("specdraft"),
            drafter=i.kind,
            model=i.model,
            vocab_size=i.vocab_size,
            draft_vocab_size=i.draft_vocab_size,
            hidden_dim=i.hidden_dim,
            tree_builders=[i.tree_builder],
            max_nodes=self.cfg.max_nodes,
            max_sessions=self.cfg.max_sessions,
            auth_required=bool(self.token),
        )

    async def GetStats(self, request, context):
        await self._authorize(context)
        s = self.stats
        return pb.ServerStats(
            sessions_open=len(self.sessions),
            sessions_total=s.sessions_total,
            sessions_evicted=s.sessions_evicted,
            rounds_total=s.rounds,
            rounds_per_s=s.rounds_per_s(),
            mean_nodes=s.nodes / max(s.rounds, 1),
            latency_p50_ms=s.percentile(0.5),
            latency_p90_ms=s.percentile(0.9),
            latency_p99_ms=s.percentile(0.99),
            errors=dict(s.errors),
            uptime_s=time.monotonic() - s.start,
            feedback_rounds=s.feedback_rounds,
            accepted_tokens=s.accepted,
            bandit=self._bandit_stats(),
        )

    def _bandit_stats(self) -> dict[str, float]:
        if self.adapter is None:
            return {}
        st = self.adapter.stats()
        flat = {k: float(st[k]) for k in ("decisions", "updates", "rollbacks", "update_s", "buffer_positions")}
        for arm, a in st["arms"].items():
            flat[f"{arm}_pulls"], flat[f"{arm}_mean_tok_s"] = a["pulls"], a["mean_tok_s"]
        if st["buffer_acceptance"] is not None:
            flat["buffer_acceptance"] = st["buffer_acceptance"]
        flat |= {f"last_{k}": float(st["last"][k]) for k in ("arm", "tok_s", "tau", "gain") if k in st["last"]}
        return flat

    async def GetSessionStats(self, request, context):
        await self._authorize(context)
        sess = self.sessions.get(request.session_id)
        if sess is None:
            await self._fail(
                context, grpc.StatusCode.NOT_FOUND, f"session {request.session_id!r}: no such open session"
            )
        return pb.SessionStats(
            session_id=sess.id,
            client_label=sess.label,
            rounds=sess.rounds,
            tokens=sess.tokens,
            mean_nodes=sess.nodes / max(sess.rounds, 1),
            mean_accepted=sess.accepted / max(sess.feedback_rounds, 1),
            idle_s=time.monotonic() - sess.last_seen,
        )


STATS_LOG_S = 60.0


async def log_stats(service: DrafterService, every_s: float) -> None:
    """A stats line in the log every every_s seconds in which rounds were served."""
    last = 0
    while True:
        await asyncio.sleep(every_s)
        s = service.stats
        if s.rounds > last:
            log.info(
                "stats: %d sessions open, %d rounds (%.1f/s over the last minute), %.1f nodes/tree, "
                "latency p50 %.2f ms p99 %.2f ms, errors %s",
                len(service.sessions),
                s.rounds - last,
                s.rounds_per_s(),
                s.nodes / max(s.rounds, 1),
                s.percentile(0.5),
                s.percentile(0.99),
                dict(s.errors) or "none",
            )
            last = s.rounds


async def serve(
    cfg: ServerConfig, new_drafter: Callable[[], Drafter], info: DrafterInfo, adapter=None, ready=None
) -> None:
    """Run until SIGTERM/SIGINT, then drain: health turns NOT_SERVING, new sessions are refused and
    open streams get cfg.drain_s to finish. ready("host:port") is called once the port is bound."""
    limit = int(cfg.max_message_mb * 2**20)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ]
    )
    service = DrafterService(cfg, new_drafter, info, adapter)
    pb_grpc.add_DrafterServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        if cfg.tls_cert:
            with open(cfg.tls_key, "rb") as k, open(cfg.tls_cert, "rb") as c:
                port = server.add_secure_port(cfg.address, grpc.ssl_server_credentials([(k.read(), c.read())]))
        else:
            port = server.add_insecure_port(cfg.address)
    except RuntimeError as e:  # grpc's "Failed to bind": the port is taken or the host is not ours
        raise OSError(f"server.address: cannot listen on {cfg.address} ({e})") from None
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    host = cfg.address.rsplit(":", 1)[0]
    if cfg.metrics_port:
        try:
            service.metrics.serve(host.strip("[]"), cfg.metrics_port)
        except OSError as e:
            raise OSError(f"server.metrics_port: cannot listen on {host}:{cfg.metrics_port} ({e})") from None
        log.info("Prometheus metrics on http://%s:%d/metrics", host, cfg.metrics_port)
    log.info(
        "specdraft drafter (%s, vocab %d) serving %s on %s:%d%s%s",
        info.kind,
        info.vocab_size,
        API_VERSION,
        host,
        port,
        " with TLS" if cfg.tls_cert else "",
        " with token auth" if service.token else "",
    )
    if ready is not None:
        ready(f"{host}:{port}")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reporter = asyncio.ensure_future(log_stats(service, STATS_LOG_S))
    await stop.wait()
    reporter.cancel()
    log.info("shutting down: draining %d open sessions for up to %.1f s", len(service.sessions), cfg.drain_s)
    service.closing = True
    await health_servicer.enter_graceful_shutdown()
    await server.stop(cfg.drain_s)
    if service.pool is not None:
        service.pool.shutdown(wait=False, cancel_futures=True)
    log.info("stopped after %d rounds in %d sessions", service.stats.rounds, service.stats.sessions_total)
