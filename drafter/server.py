"""The drafter as a gRPC sidecar (`specdraft serve-drafter`): one bidirectional stream per generation
session, each with its own drafter state, on an asyncio server. Drafting runs in a thread pool so a
slow drafter never blocks the other streams, or inline on the event loop for cheap drafters
(workers: 0). The standard health and reflection services ride along.

A bad update ends its own stream with a precise status; every other session goes on. Each session is
bounded in tokens, in drafting time per round, in how long it may wait before its first update and in how
long a reply may wait for its client to read it; all sessions together in tokens held. Every bound is
reserved before any await (so concurrent streams cannot all pass one check) and given back on every way
out. An update's work is bounded by the tree it answers, not by its bytes (proto.wire.msg_to_update).

With server.token_env set every method needs the token, health Watch included; health Check stays open
(load balancers and Kubernetes probes carry no token) and tells only SERVING / NOT_SERVING. Watch streams
are capped at server.max_watches. /metrics (server.metrics_port) is served on its own small HTTP server:
server.metrics_host (default: the gRPC address's host), HTTPS with the gRPC pair when tls_cert / tls_key
are set, at most METRICS_CONNECTIONS connections at once, each closed after server.metrics_timeout_s of
silence. SIGTERM, SIGINT and SIGHUP all drain (`serve`). Every key and its default: ServerConfig below."""

import asyncio
import collections
import contextlib
import hmac
import inspect
import logging
import signal
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from drafter.batch import Batcher
from drafter.metrics import Metrics, percentiles
from proto import checks
from proto import drafter_pb2 as pb
from proto import drafter_pb2_grpc as pb_grpc
from proto.interface import Drafter
from proto.tree import DraftTree
from proto.wire import API_VERSION, WireError, msg_to_update, quote

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Drafter"].full_name  # "specdraft.v1.Drafter"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
LABEL_CHARS = 100  # a client_label is kept (and logged, escaped) up to this many characters
INLINE_UPDATE_BYTES = 1 << 16  # larger updates are checked on a thread, off the event loop
LATENCY_WINDOW = 4096  # the latest rounds whose latencies GetStats' percentiles cover
RATE_WINDOW_S = 60  # seconds over which GetStats' rounds_per_s counts
METRICS_CONNECTIONS = 16  # /metrics connections served at once; more are closed unread


@dataclass
class ServerConfig:
    address: str = "127.0.0.1:50051"  # host:port; loopback by default, port 0 = any free port
    max_sessions: int = 64  # open streams at once; more get RESOURCE_EXHAUSTED
    max_nodes: int = 256  # cap on the node budget of any tree
    max_topk: int = 64  # tokens per feedback.target_topk row at most (verify.feedback_topk of the clients)
    max_message_mb: float = 16.0  # larger messages get RESOURCE_EXHAUSTED
    session_ttl_s: float = 300.0  # a session idle this long is evicted
    first_update_s: float = 10.0  # a stream that sends no first update this long is closed: DEADLINE_EXCEEDED
    max_session_tokens: int = 65536  # committed tokens one session may hold; an update past it: RESOURCE_EXHAUSTED
    max_total_tokens: int = 1048576  # committed tokens all open sessions hold together; past it: RESOURCE_EXHAUSTED
    reply_timeout_s: float = 10.0  # a reply its client leaves unread this long ends the session: RESOURCE_EXHAUSTED
    max_draft_s: float = 10.0  # a round drafting longer ends its session: DEADLINE_EXCEEDED
    drain_s: float = 5.0  # on SIGTERM/SIGINT/SIGHUP, open streams get this long to finish
    workers: int = 0  # drafting threads for drafters that draft in one call (ngram, suffix, random); 0 =
    # on the event loop itself, the fastest for cheap ones. SpecBlock drafts (alone or in a hybrid) always
    # run on the event loop, their forwards batched across sessions (drafter/batch.py)
    batch_max_rows: int = 64  # block starts (or new context positions) one batched SpecBlock forward holds at most
    batch_wait_ms: float = 2.0  # how long a pending forward waits for other sessions' rounds to join it
    tls_cert: str = ""  # PEM certificate chain; with tls_key turns TLS on
    tls_key: str = ""
    token_env: str = ""  # environment variable holding the shared-secret token; "" = none
    max_watches: int = 64  # health Watch streams open at once (token required); more get RESOURCE_EXHAUSTED
    metrics_port: int = 0  # Prometheus /metrics at this port (HTTPS when tls_cert/tls_key are set); 0 = off
    metrics_host: str = ""  # the host /metrics binds; "" = the host of address
    metrics_timeout_s: float = 5.0  # a /metrics connection silent this long is closed

    def validate(self) -> None:
        checks.host_port(self, "address")
        checks.positive(
            self,
            "max_sessions",
            "max_nodes",
            "max_topk",
            "max_message_mb",
            "session_ttl_s",
            "first_update_s",
            "max_session_tokens",
            "max_total_tokens",
            "reply_timeout_s",
            "max_draft_s",
            "max_watches",
            "metrics_timeout_s",
            "batch_max_rows",
        )
        checks.nonneg(self, "drain_s", "workers", "batch_wait_ms")
        if self.max_message_mb >= 2048:  # grpc takes the byte limit as an int32
            raise ValueError(f"max_message_mb: must be < 2048, got {self.max_message_mb}")
        if bool(self.tls_cert) != bool(self.tls_key):
            key, other = ("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert")
            raise ValueError(f"{key}: give server.{other} too (TLS needs both) or neither")
        checks.existing_file(self, "tls_cert")
        checks.existing_file(self, "tls_key")
        checks.pem_pair(self, "tls_cert", "tls_key")
        checks.token_set(self, "token_env")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port: must be a port number (0 = off), got {self.metrics_port}")


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
    def __init__(self, sid: str):
        self.id, self.label = sid, ""
        self.drafter: Drafter | None = None  # made on the first update, for its client_label
        self.rounds = self.tokens = self.nodes = self.accepted = self.feedback_rounds = 0
        self.last_seen = time.monotonic()
        self.prev_tree: DraftTree | None = None  # the last tree sent, to check feedback against
        self.task = asyncio.current_task()  # its handler: the drain's end cancels it
        self.drafting: asyncio.Future | None = None  # a draft running on a worker thread
        self.ended = "aborted"  # why it ended, for the log; every ending but a status of ours says


class Stats:
    """Server-wide counters, the latencies of the last LATENCY_WINDOW rounds and rounds per whole second
    of the last RATE_WINDOW_S: a round adds in O(1), and a read costs the same after a billion rounds."""

    def __init__(self):
        self.start = time.monotonic()
        self.sessions_total = self.sessions_evicted = self.rounds = self.nodes = 0
        self.feedback_rounds = self.accepted = 0
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self.per_second: collections.deque[list[int]] = collections.deque(maxlen=RATE_WINDOW_S + 1)  # [second, rounds]
        self.errors: collections.Counter[str] = collections.Counter()

    def add_round(self, nodes: int, ms: float) -> None:
        self.rounds += 1
        self.nodes += nodes
        self.latency_ms.append(ms)
        second = int(time.monotonic())
        if self.per_second and self.per_second[-1][0] == second:
            self.per_second[-1][1] += 1
        else:
            self.per_second.append([second, 1])

    def latency_percentiles(self, *qs: float) -> list[float]:
        return percentiles(self.latency_ms, *qs)

    def rounds_per_s(self) -> float:
        """Rounds per second over the last RATE_WINDOW_S seconds (whole seconds; since the start if shorter)."""
        now = time.monotonic()
        recent = sum(n for second, n in self.per_second if second > now - RATE_WINDOW_S)
        return recent / min(RATE_WINDOW_S, max(now - self.start, 1e-9))


class DrafterService(pb_grpc.DrafterServicer):
    def __init__(
        self,
        cfg: ServerConfig,
        new_drafter: Callable[[str], Drafter],
        info: DrafterInfo,
        adapter=None,
        arms=None,
    ):
        # new_drafter(client_label): a session's drafter, made when its first update arrives;
        # arms (bandit.arms.ArmChooser): the per-client choice of drafter and budget, read for stats
        self.cfg, self.new_drafter, self.info, self.arms = cfg, new_drafter, info, arms
        self.token = checks.env_token(cfg.token_env)
        self.sessions: dict[str, Session] = {}
        self.stats = Stats()
        self.metrics = Metrics(lambda: len(self.sessions), adapter, arms)
        self.pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="draft") if cfg.workers else None
        self.closing = False  # draining: new sessions are refused
        self.cutting = False  # the drain is over: open sessions are being cut
        self.tokens_held = 0  # committed tokens of all open sessions (cfg.max_total_tokens)
        # online learning (bandit.online.OnlineAdapter): observes every round and may update the shared
        # drafter model between rounds
        self.adapter = adapter
        # runs the steps of SpecBlock drafts, their forwards batched across sessions
        self.batcher = Batcher(cfg.batch_max_rows, cfg.batch_wait_ms / 1000, self.metrics.batch)

    async def _fail(self, context, code: grpc.StatusCode, message: str):
        self._status(context, code, message)
        await context.abort(code, message)

    def _status(self, context, code: grpc.StatusCode, message: str) -> None:
        """Count, log and set the status the call ends with once its handler returns. Unlike abort this
        waits for nothing: a status can wait behind replies the client has not read."""
        self._count_error(code)
        log.warning("%s: %s", code.name, message)
        context.set_code(code)
        context.set_details(message)

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
        """One generation session: admission, then one round per update until the client closes or a bound
        ends it; however it ends, what it holds is given back (_close)."""
        sess = await self._admit(context)
        requests = request_iterator.__aiter__()
        try:
            while (msg := await self._next_update(context, sess, requests)) is not None:
                if not await self._round(context, sess, msg):
                    return
        except asyncio.CancelledError:
            if not self.cutting:
                sess.ended = "client cancelled"
                raise
            sess.ended = "cut at the end of the drain"
            asyncio.current_task().uncancel()
            self._status(
                context, grpc.StatusCode.UNAVAILABLE, f"session {sess.id}: server shut down after {self.cfg.drain_s} s"
            )
        finally:
            self._close(sess)

    async def _admit(self, context) -> Session:
        """A new session, open and counted; UNAUTHENTICATED, UNAVAILABLE while draining, or RESOURCE_EXHAUSTED
        at cfg.max_sessions end the call instead."""
        await self._authorize(context)
        if self.closing:
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if len(self.sessions) >= self.cfg.max_sessions:
            await self._fail(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(self.sessions)} sessions open, the server's limit is {self.cfg.max_sessions}",
            )
        sess = Session(uuid.uuid4().hex[:16])
        self.sessions[sess.id] = sess
        self._count_session()
        return sess

    async def _next_update(self, context, sess: Session, requests) -> pb.VerifierUpdate | None:
        """The client's next update; None when it closed its side. A session silent for cfg.session_ttl_s
        (before its first update: cfg.first_update_s) is closed with DEADLINE_EXCEEDED."""
        cfg = self.cfg
        wait = cfg.session_ttl_s if sess.rounds else min(cfg.first_update_s, cfg.session_ttl_s)
        try:
            async with asyncio.timeout(wait):
                return await anext(requests)
        except StopAsyncIteration:
            sess.ended = "client closed"
            return None
        except TimeoutError:
            self._count_eviction()
            sess.ended = "evicted" if sess.rounds else "no first update"
            await self._fail(
                context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"session {sess.id} idle for more than {wait} s; evicted"
                if sess.rounds
                else f"session {sess.id} sent no first update within {wait} s; closed",
            )

    async def _round(self, context, sess: Session, msg: pb.VerifierUpdate) -> bool:
        """One round: the update's tokens reserved and checked, the drafter made on the first one, the
        tree drafted (none when the update asks for none), the online learner shown the round, the round
        counted and the tree sent. False when the client left the reply unread (the session ends)."""
        t0 = time.perf_counter()
        first = sess.rounds == 0
        await self._reserve_tokens(context, sess, len(msg.new_tokens))
        try:
            update = await self._check_update(msg, sess, first)
        except WireError as e:
            sess.ended = "bad update"
            await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, f"session {sess.id}: {e}")
        if first:
            sess.label = msg.client_label[:LABEL_CHARS]
            await self._new_drafter(context, sess)
            log.info(
                "session %s opened (%s, %d prompt tokens)",
                sess.id,
                quote(sess.label) if sess.label else "no label",
                len(update.new_tokens),
            )
        tree = await self._draft_round(context, sess, update) if update.max_nodes > 0 else None
        if self.adapter is not None:  # may run an online update: on the loop, so never inside a forward
            self.adapter.observe(sess.id, update, first, sess.prev_tree)
        ms = self._count_round(sess, update, tree, t0)
        sess.prev_tree = tree
        reply = pb.DraftTree(
            session_id=sess.id,
            round=msg.round,
            tokens=tree.tokens if tree else (),
            parents=tree.parents if tree else (),
            draft_ms=ms,
        )
        return await self._send(context, sess, reply)

    def _close(self, sess: Session) -> None:
        """Give back what an ended session holds (its slot, its tokens, its drafter, its learner buffer)
        and log how it ended."""
        del self.sessions[sess.id]
        self.tokens_held -= sess.tokens
        if self.adapter is not None:
            self.adapter.buffer.end(sess.id)
        drafter = sess.drafter
        if drafter is not None and sess.drafting is not None and not sess.drafting.done():
            sess.drafting.add_done_callback(lambda _: drafter.close())  # close once the worker lets go
        elif drafter is not None:
            drafter.close()
        log.info(
            "session %s ended (%s): %d rounds, %d tokens, %.1f nodes/tree",
            sess.id,
            sess.ended,
            sess.rounds,
            sess.tokens,
            sess.nodes / max(sess.rounds, 1),
        )

    # Accounting: the only place where the per-session counters, Stats and the Prometheus metrics change,
    # each event updating all of them together. (sess.tokens and tokens_held are a bound, not a count:
    # _reserve_tokens reserves them before any await, _close gives them back.)

    def _count_session(self) -> None:
        self.stats.sessions_total += 1
        self.metrics.sessions.inc()

    def _count_eviction(self) -> None:
        self.stats.sessions_evicted += 1

    def _count_error(self, code: grpc.StatusCode) -> None:
        self.stats.errors[code.name] += 1
        self.metrics.errors.labels(code.name).inc()

    def _count_round(self, sess: Session, update, tree: DraftTree | None, t0: float) -> float:
        """A round served, from perf_counter t0 to now; returns its milliseconds."""
        sess.rounds += 1
        sess.last_seen = time.monotonic()
        accepted = None if update.feedback is None else len(update.feedback.accepted)
        if accepted is not None:
            sess.feedback_rounds += 1
            sess.accepted += accepted
            self.stats.feedback_rounds += 1
            self.stats.accepted += accepted
        n = len(tree) if tree else 0
        sess.nodes += n
        ms = 1000 * (time.perf_counter() - t0)
        self.stats.add_round(n, ms)
        self.metrics.round(ms / 1000, update.max_nodes > 0, n, accepted)
        return ms

    async def _reserve_tokens(self, context, sess: Session, n: int) -> None:
        """Count an update's n new tokens against the session's and the server's bounds before anything
        reads them: RESOURCE_EXHAUSTED where they would pass one. Check and count run with no await between
        them, so concurrent updates (each awaiting a worker thread later) cannot all pass the same check;
        the session's tokens are given back when it ends, however it ends (Session's finally)."""
        cfg, why = self.cfg, ""
        if sess.tokens + n > cfg.max_session_tokens:
            why = f"{n} more would make {sess.tokens + n}, a session holds at most {cfg.max_session_tokens}"
        elif self.tokens_held + n > cfg.max_total_tokens:
            why = f"{n} more would make {self.tokens_held + n} over all sessions, the server holds at most "
            why += f"{cfg.max_total_tokens}"
        if why:
            sess.ended = "too many tokens"
            await self._fail(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"session {sess.id}: new_tokens: {why}")
        sess.tokens += n
        self.tokens_held += n

    async def _check_update(self, msg: pb.VerifierUpdate, sess: Session, first: bool):
        """msg_to_update against the session: on the event loop for a small message, on a thread for a
        large one (its checks are bounded by its size and by the previous tree, but a long prompt or a
        wide hidden tensor still takes milliseconds that other sessions' rounds should not wait for)."""
        prev_parents = sess.prev_tree.parents if sess.prev_tree else None
        cfg, info = self.cfg, self.info
        args = (msg, info.vocab_size, info.hidden_dim, prev_parents, cfg.max_nodes, first, cfg.max_topk)
        if msg.ByteSize() <= INLINE_UPDATE_BYTES:
            return msg_to_update(*args)
        return await asyncio.to_thread(msg_to_update, *args)

    async def _new_drafter(self, context, sess: Session) -> None:
        """The session's drafter, for its client label; an error making it ends this session only."""
        try:
            sess.drafter = self.new_drafter(sess.label)
        except Exception as e:
            log.exception("session %s: making its drafter failed", sess.id)
            sess.ended = "drafter failed"
            await self._fail(context, grpc.StatusCode.INTERNAL, f"session {sess.id}: making its drafter failed: {e!r}")

    async def _draft_round(self, context, sess: Session, update) -> DraftTree | None:
        """This round's tree, on the event loop or a worker thread; a drafter error or a round slower than
        cfg.max_draft_s ends the session (a worker's draft is then left to finish on its own)."""
        t0 = time.perf_counter()
        try:
            steps = getattr(sess.drafter, "draft_steps", None)
            if steps is None and self.pool is None:
                tree = sess.drafter.draft(update)
            else:
                if steps is not None:  # SpecBlock: on the loop, forwards batched with other sessions'
                    drafting = self.batcher.draft(steps(update))
                else:
                    sess.drafting = asyncio.get_running_loop().run_in_executor(self.pool, sess.drafter.draft, update)
                    drafting = asyncio.shield(sess.drafting)
                tree = None
                with contextlib.suppress(TimeoutError):  # failed below
                    async with asyncio.timeout(self.cfg.max_draft_s):
                        tree = await drafting
        except Exception as e:  # a drafter bug ends this session only, with its traceback in the log
            log.exception("session %s: drafter failed", sess.id)
            sess.ended = "drafter failed"
            await self._fail(context, grpc.StatusCode.INTERNAL, f"session {sess.id}: drafter failed: {e!r}")
        if time.perf_counter() - t0 > self.cfg.max_draft_s:
            sess.ended = "drafting too slow"
            await self._fail(
                context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"session {sess.id}: drafting a round took more than max_draft_s {self.cfg.max_draft_s} s",
            )
        return tree

    async def _send(self, context, sess: Session, reply: pb.DraftTree) -> bool:
        """Write a reply. A client that leaves it unread (its receive window full) for cfg.reply_timeout_s
        loses the session (False: the caller returns), so it cannot hold a slot by not reading."""
        try:
            async with asyncio.timeout(self.cfg.reply_timeout_s):
                await context.write(reply)
            return True
        except TimeoutError:
            sess.ended = "client not reading"
            self._status(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"session {sess.id}: a reply stayed unread for {self.cfg.reply_timeout_s} s (reply_timeout_s); "
                "read the replies",
            )
            return False

    async def drain(self, seconds: float) -> None:
        """Wait up to `seconds` for the open sessions to end, then cut the rest with UNAVAILABLE."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while self.sessions and loop.time() < end:
            await asyncio.sleep(0.05)
        self.cutting = True
        for sess in list(self.sessions.values()):
            sess.task.cancel()
        end = loop.time() + 0.5
        while self.sessions and loop.time() < end:
            await asyncio.sleep(0.01)

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
        """Counters since the start; latency percentiles over the last LATENCY_WINDOW (4,096) rounds and
        rounds_per_s over the last RATE_WINDOW_S (60) seconds, so that a poll costs the same however
        long the server has run."""
        await self._authorize(context)
        s = self.stats
        p50, p90, p99 = s.latency_percentiles(0.5, 0.9, 0.99)
        return pb.ServerStats(
            sessions_open=len(self.sessions),
            sessions_total=s.sessions_total,
            sessions_evicted=s.sessions_evicted,
            rounds_total=s.rounds,
            rounds_per_s=s.rounds_per_s(),
            mean_nodes=s.nodes / max(s.rounds, 1),
            latency_p50_ms=p50,
            latency_p90_ms=p90,
            latency_p99_ms=p99,
            errors=dict(s.errors),
            uptime_s=time.monotonic() - s.start,
            feedback_rounds=s.feedback_rounds,
            accepted_tokens=s.accepted,
            bandit=self._bandit_stats(),
            arms=[
                pb.ClientArms(
                    client=client,
                    arm=c["arm"],
                    why=c["why"],
                    tokens_per_s={a: v["tokens_per_s"] for a, v in c["arms"].items()},
                    rounds={a: v["rounds"] for a, v in c["arms"].items()},
                )
                for client, c in (self.arms.stats() if self.arms is not None else {}).items()
            ],
        )

    def _bandit_stats(self) -> dict[str, float]:
        if self.adapter is None:
            return {}
        st = self.adapter.stats()
        keys = ("decisions", "updates", "rollbacks", "update_s", "updating", "buffer_positions")
        flat = {k: float(st[k]) for k in keys}
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
                context, grpc.StatusCode.NOT_FOUND, f"session {quote(request.session_id)}: no such open session"
            )
        arm, why = getattr(sess.drafter, "chosen", ("", ""))
        return pb.SessionStats(
            session_id=sess.id,
            client_label=sess.label,
            rounds=sess.rounds,
            tokens=sess.tokens,
            mean_nodes=sess.nodes / max(sess.rounds, 1),
            mean_accepted=sess.accepted / max(sess.feedback_rounds, 1),
            idle_s=time.monotonic() - sess.last_seen,
            arm=arm,
            arm_why=why,
        )


class Undecodable:
    """What a request parser returns for bytes that are no valid message."""

    def __init__(self, size: int, error: DecodeError):
        self.size, self.error = size, error


def lenient(parse: Callable):
    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError as e:
            return Undecodable(len(data), e)

    return deserialize


class RejectUndecodable(grpc.aio.ServerInterceptor):
    """Bytes that are no valid request message, sent to any method, get INVALID_ARGUMENT through `fail`
    (counted, one log line) instead of grpc's UNKNOWN and a traceback: every handler's parser is made
    lenient, and its behaviour checks each request before the method sees it."""

    def __init__(self, fail: Callable):
        self.fail = fail

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = details.method

        async def check(request, context):
            if isinstance(request, Undecodable):
                await self.fail(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{method}: a request of {request.size} bytes is not a valid message ({quote(str(request.error))})",
                )
            return request

        async def check_stream(requests, context):
            async def checked():
                async for request in requests:
                    yield await check(request, context)

            return checked()

        prepare = check_stream if handler.request_streaming else check
        streams = (handler.request_streaming, handler.response_streaming)
        kind = "_".join("stream" if streaming else "unary" for streaming in streams)  # unary_stream, ...
        inner = getattr(handler, kind)
        if inspect.isasyncgenfunction(inner):

            async def behaviour(request, context):
                async for reply in inner(await prepare(request, context), context):
                    yield reply
        else:

            async def behaviour(request, context):
                return await inner(await prepare(request, context), context)

        return handler._replace(request_deserializer=lenient(handler.request_deserializer), **{kind: behaviour})


class GuardedHealth(health.aio.HealthServicer):
    """grpc's health service with Watch authorized like every other method and bounded: at most
    cfg.max_watches streams at once (RESOURCE_EXHAUSTED past it), each on a service name of at most
    LABEL_CHARS characters. Check stays open: probes carry no token."""

    def __init__(self, service: DrafterService):
        super().__init__()
        self.service, self.watching = service, 0

    async def Watch(self, request, context):
        service, most = self.service, self.service.cfg.max_watches
        await service._authorize(context)
        if self.watching >= most:
            await service._fail(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.watching} health watches open, the server's limit is {most}",
            )
        if len(request.service) > LABEL_CHARS:
            await service._fail(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"service: {quote(request.service)}: no such service"
            )
        self.watching += 1  # counted with no await since the check
        try:
            await super().Watch(request, context)
        finally:
            self.watching -= 1


class MetricsServer(ThreadingWSGIServer):
    """prometheus_client's threaded WSGI server, bounded: METRICS_CONNECTIONS connections at once (more are
    closed unread); a connection that goes silent for its handler's timeout is closed and logged at debug
    level, not as a traceback."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slots = threading.BoundedSemaphore(METRICS_CONNECTIONS)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # the connection's own thread
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        log.debug("/metrics: connection from %s dropped", client_address, exc_info=True)


class MetricsRequest(WSGIRequestHandler):
    """One /metrics connection: reads time out (the `timeout` of the subclass serve_metrics makes), and a
    TLS handshake runs here, on the connection's thread, not in the accept loop."""

    def setup(self):
        super().setup()  # applies self.timeout to the socket
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def log_message(self, format, *args):
        pass


def serve_metrics(
    registry, host: str, port: int, timeout_s: float, tls: tuple[str, str] | None = None
) -> Callable[[], None]:
    """/metrics of `registry` on host:port from a daemon thread (MetricsServer, MetricsRequest), over HTTPS
    with tls = (cert, key); returns the function that stops it."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServerFor", (MetricsServer,), {"address_family": family})
    handler = type("MetricsRequestFor", (MetricsRequest,), {"timeout": timeout_s})
    httpd = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=handler)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True)
    thread.start()

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=1)

    return stop


def enable_reflection(server, services: list[str]) -> None:
    """Server reflection as grpc.reflection.v1 and v1alpha. grpcio-reflection ships v1alpha only; v1 has
    the same messages under another package, so v1alpha's servicer answers both, and v1's descriptor
    (v1alpha's, renamed) joins the pool so that clients can resolve it too."""
    fd = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    fd.name, fd.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    for m in fd.message_type:
        for f in m.field:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(".v1alpha.", ".v1.")
    for method in fd.service[0].method:
        method.input_type = method.input_type.replace(".v1alpha.", ".v1.")
        method.output_type = method.output_type.replace(".v1alpha.", ".v1.")
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(fd.name)
    except KeyError:  # not there yet (a second server in this process finds it)
        pool.AddSerializedFile(fd.SerializeToString())
    servicer = reflection.aio.ReflectionServicer([*services, reflection.SERVICE_NAME, REFLECTION_V1])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    info = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": info}),)
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
                *s.latency_percentiles(0.5, 0.99),
                dict(s.errors) or "none",
            )
            last = s.rounds


async def serve(
    cfg: ServerConfig,
    new_drafter: Callable[[str], Drafter],
    info: DrafterInfo,
    adapter=None,
    ready=None,
    arms=None,
) -> None:
    """Run until SIGTERM, SIGINT or SIGHUP, then drain: health turns NOT_SERVING, new sessions get
    UNAVAILABLE, the port stays open while open streams get cfg.drain_s to finish, and those still open
    then are cut with UNAVAILABLE. ready("host:port") is called once the port is bound."""
    service = DrafterService(cfg, new_drafter, info, adapter, arms)
    server, health_servicer, port = await start_grpc(cfg, service)
    host = cfg.address.rsplit(":", 1)[0]
    stop_metrics = start_metrics(cfg, service, host) if cfg.metrics_port else None
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
    reporter = asyncio.ensure_future(log_stats(service, STATS_LOG_S))
    sig = await stop_signal()
    reporter.cancel()
    log.info(
        "%s: shutting down, draining %d open sessions for up to %.1f s",
        sig.name,
        len(service.sessions),
        cfg.drain_s,
    )
    service.closing = True
    await health_servicer.enter_graceful_shutdown()
    await service.drain(cfg.drain_s)
    await server.stop(0.2)
    if service.pool is not None:
        service.pool.shutdown(wait=False, cancel_futures=True)
    if stop_metrics is not None:
        stop_metrics()
    if adapter is not None:  # an online update training in the background finishes before the process ends
        await asyncio.to_thread(adapter.wait)
    log.info("stopped after %d rounds in %d sessions", service.stats.rounds, service.stats.sessions_total)


async def start_grpc(cfg: ServerConfig, service: DrafterService) -> tuple[grpc.aio.Server, GuardedHealth, int]:
    """The gRPC server with the drafter, health and reflection services, listening on cfg.address (TLS
    with tls_cert / tls_key) and SERVING; returns it, its health servicer and the bound port."""
    limit = int(cfg.max_message_mb * 2**20)
    server = grpc.aio.server(
        interceptors=[RejectUndecodable(service._fail)],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_DrafterServicer_to_server(service, server)
    health_servicer = GuardedHealth(service)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, [SERVICE, health.SERVICE_NAME])
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
    return server, health_servicer, port


def start_metrics(cfg: ServerConfig, service: DrafterService, host: str) -> Callable[[], None]:
    """/metrics on cfg.metrics_host (default: host, the gRPC address's) at cfg.metrics_port; returns the
    function that stops it."""
    mhost = cfg.metrics_host or host
    tls = (cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
    try:
        stop = serve_metrics(service.metrics.registry, mhost.strip("[]"), cfg.metrics_port, cfg.metrics_timeout_s, tls)
    except OSError as e:
        raise OSError(f"server.metrics_port: cannot listen on {mhost}:{cfg.metrics_port} ({e})") from None
    log.info("Prometheus metrics on http%s://%s:%d/metrics", "s" if tls else "", mhost, cfg.metrics_port)
    return stop


async def stop_signal() -> signal.Signals:
    """Wait for SIGTERM, SIGINT or SIGHUP (the terminal went away: drain too); returns the first."""
    stop = asyncio.Event()
    got: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        got.append(sig)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)
    await stop.wait()
    return got[0]
