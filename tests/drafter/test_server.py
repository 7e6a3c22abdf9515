"""The sidecar as a real process on loopback: its trees equal the in-process drafter's, every bad
input gets a precise status while other sessions go on, a hypothesis fuzz never finds an internal
error, a bounded load test loses and corrupts nothing, and SIGTERM drains gracefully."""

import random
import statistics
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drafter.ngram import NgramConfig, NgramDrafter
from proto import drafter_pb2 as pb
from proto.interface import Feedback, VerifierUpdate
from proto.wire import msg_to_update, update_to_msg
from tests.sidecar import AUTH, VOCAB, session

Code = grpc.StatusCode


def first(tokens, **kw) -> pb.VerifierUpdate:
    return pb.VerifierUpdate(vocab_size=VOCAB, new_tokens=tokens, max_nodes=kw.pop("max_nodes", 8), **kw)


def round_trip_ok(sidecar) -> None:
    """The server still serves a fresh session."""
    replies = session(sidecar.stub, [first([5, 6, 7, 5, 6]), pb.VerifierUpdate(round=1, new_tokens=[7], max_nodes=8)])
    assert [r.round for r in replies] == [0, 1] and list(replies[1].tokens[:2]) == [5, 6]


def updates_with_feedback(rng: random.Random, rounds: int, period: int):
    """A session's VerifierUpdates: a repetitive prompt, then each round commits 1-3 tokens of the same
    cycle; feedback accepts a random prefix of the previous tree's first path (filled in by the caller)."""
    cycle = [rng.randrange(VOCAB) for _ in range(period)]
    prompt = cycle * 3
    ups, pos = [VerifierUpdate(prompt, None, 16, VOCAB)], len(prompt)
    for _ in range(rounds):
        k = rng.randint(1, 3)
        ups.append(VerifierUpdate([cycle[(pos + i) % period] for i in range(k)], None, 16, VOCAB))
        pos += k
    return ups


def feedback_for(tree, rng: random.Random) -> Feedback | None:
    if tree is None:
        return None
    path, node = [], -1
    for i, p in enumerate(tree.parents):  # the first root-to-leaf chain
        if p == node:
            path.append(i)
            node = i
    acc = path[: rng.randint(0, len(path))]
    return Feedback(acc, {i: rng.random() for i in range(len(tree)) if tree.parents[i] == -1})


def run_checked_session(sidecar, seed: int, rounds: int, latencies: list | None = None) -> int:
    """Drive one stream round by round, comparing every tree with an in-process NgramDrafter fed the
    same updates. Returns the number of rounds whose tree matched."""
    rng = random.Random(seed)
    ups = updates_with_feedback(rng, rounds, period=rng.randint(3, 9))
    ref = NgramDrafter(NgramConfig())
    import queue

    q: queue.Queue = queue.Queue()
    call = sidecar.stub.Session(iter(q.get, None), metadata=AUTH, timeout=120)
    matched, prev = 0, None
    for r, up in enumerate(ups):
        up.feedback = feedback_for(prev, rng) if r else None
        t0 = time.perf_counter()
        q.put(update_to_msg(up, r, first=r == 0, label=f"load-{seed}"))
        reply = next(call)
        if latencies is not None:
            latencies.append(time.perf_counter() - t0)
        prev = ref.draft(up)
        got = (tuple(reply.tokens), tuple(reply.parents))
        want = (prev.tokens, prev.parents) if prev else ((), ())
        matched += reply.round == r and got == want
    q.put(None)
    assert list(call) == []  # clean end after half-close
    return matched


def test_info_health_and_reflection(sidecar):
    info = sidecar.stub.GetInfo(pb.InfoRequest(), metadata=AUTH, timeout=5)
    assert (info.api_version, info.drafter, info.vocab_size, info.max_nodes, info.max_sessions) == (
        "specdraft.v1",
        "ngram",
        VOCAB,
        64,
        34,
    )
    assert info.auth_required
    health = health_pb2_grpc.HealthStub(sidecar.channel)
    for service in ("", "specdraft.v1.Drafter"):  # no token needed: probes carry none
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    services = ProtoReflectionDescriptorDatabase(sidecar.channel).get_services()
    assert {"specdraft.v1.Drafter", "grpc.health.v1.Health"} <= set(services)


def test_trees_equal_the_inprocess_drafter_and_session_stats(sidecar):
    assert run_checked_session(sidecar, seed=1, rounds=40) == 41
    stats = sidecar.stats()
    assert stats.rounds_total >= 41 and stats.latency_p50_ms > 0 and stats.mean_nodes > 0


def test_feedback_with_target_top_k_is_accepted(sidecar):
    fb = pb.Feedback(
        accepted=[0],
        prob_nodes=[0],
        probs=[0.9],
        target_topk=[pb.TopK(node=-1, tokens=[3, 7], probs=[0.9, 0.05]), pb.TopK(node=0, tokens=[1], probs=[0.8])],
    )
    update = pb.VerifierUpdate(round=1, new_tokens=[3, 1], feedback=fb, max_nodes=4)
    replies = session(sidecar.stub, FB_TREE + [update])
    assert [r.round for r in replies] == [0, 1]
    # and the drafter gets the top-k rows: the sidecar's own parse of this update against the tree it sent
    got = msg_to_update(update, VOCAB, 0, tuple(replies[0].parents), 64, first=False).feedback.target_topk
    assert got == {-1: ([3, 7], pytest.approx([0.9, 0.05])), 0: ([1], pytest.approx([0.8]))}


def test_budget_is_capped_by_the_server_and_zero_means_no_draft(sidecar):
    prompt = list(range(10, 20)) * 20
    replies = session(
        sidecar.stub, [first(prompt, max_nodes=1000), pb.VerifierUpdate(round=1, new_tokens=[10], max_nodes=0)]
    )
    assert 0 < len(replies[0].tokens) <= 64 and len(replies[1].tokens) == 0


def test_session_stats_of_an_open_session_and_an_unknown_one(sidecar):
    import queue

    q: queue.Queue = queue.Queue()
    call = sidecar.stub.Session(iter(q.get, None), metadata=AUTH, timeout=10)
    q.put(first([1, 2, 3, 1, 2], client_label="req-42"))
    sid = next(call).session_id
    s = sidecar.stub.GetSessionStats(pb.SessionStatsRequest(session_id=sid), metadata=AUTH, timeout=5)
    assert (s.client_label, s.rounds, s.tokens) == ("req-42", 1, 5)
    q.put(None)
    list(call)
    with pytest.raises(grpc.RpcError) as e:
        sidecar.stub.GetSessionStats(pb.SessionStatsRequest(session_id="nope"), metadata=AUTH, timeout=5)
    assert e.value.code() == Code.NOT_FOUND and "'nope': no such open session" in e.value.details()


def hidden(dtype="float32", shape=(2, 576), nbytes=None) -> pb.Tensor:
    n = nbytes if nbytes is not None else 4 * shape[0] * shape[1]
    return pb.Tensor(dtype=dtype, shape=list(shape), data=bytes(n))


FB_TREE = [first([1, 2, 3, 1, 2, 3, 1, 2])]  # its tree: a chain 3, 1, 2, ... (nodes 0, 1, 2 ...)
BAD = [
    ([first([1, 50000])], "new_tokens[1]: token 50000 outside the vocabulary [0, 49152)"),
    ([first([-3])], "new_tokens[0]: token -3 outside"),
    ([pb.VerifierUpdate(vocab_size=32000, new_tokens=[1])], "vocab_size: 32000 on the first update"),
    ([pb.VerifierUpdate(new_tokens=[1])], "vocab_size: 0 on the first update"),
    ([first([])], "new_tokens: empty"),
    ([first([1, 2]), pb.VerifierUpdate(round=1, max_nodes=4)], "new_tokens: empty"),
    ([first([1], max_nodes=-1)], "max_nodes: -1 is negative"),
    ([first([1, 2], feedback=pb.Feedback(accepted=[0]))], "feedback: there was no previous tree"),
    (
        FB_TREE + [pb.VerifierUpdate(round=1, new_tokens=[3], feedback=pb.Feedback(accepted=[1]))],
        "feedback.accepted[0]: node 1 does not continue the path []",
    ),
    (
        FB_TREE + [pb.VerifierUpdate(round=1, new_tokens=[3], feedback=pb.Feedback(accepted=[0, 2]))],
        "feedback.accepted[1]: node 2 does not continue the path [0]",
    ),
    (
        FB_TREE + [pb.VerifierUpdate(round=1, new_tokens=[3], feedback=pb.Feedback(prob_nodes=[0], probs=[1.5]))],
        "feedback.probs[0]: 1.5 is not a probability",
    ),
    (
        FB_TREE + [pb.VerifierUpdate(round=1, new_tokens=[3], feedback=pb.Feedback(verify_ms=float("nan")))],
        "feedback.verify_ms: nan is not a time in milliseconds",
    ),
    (
        FB_TREE + [pb.VerifierUpdate(round=1, new_tokens=[3], feedback=pb.Feedback(prob_nodes=[99], probs=[0.5]))],
        "feedback.prob_nodes[0]: node 99 outside the previous tree",
    ),
    (
        FB_TREE
        + [
            pb.VerifierUpdate(
                round=1,
                new_tokens=[3],
                feedback=pb.Feedback(target_topk=[pb.TopK(node=-1, tokens=[3, 49152], probs=[0.5, 0.25])]),
            )
        ],
        "feedback.target_topk[0].tokens[1]: token 49152 outside",
    ),
    (
        FB_TREE
        + [
            pb.VerifierUpdate(
                round=1,
                new_tokens=[3],
                feedback=pb.Feedback(target_topk=[pb.TopK(node=-1, tokens=[3], probs=[0.5, 0.25])]),
            )
        ],
        "feedback.target_topk[0].probs: 2 values for 1 tokens",
    ),
    ([first([1, 2, 3], hidden=hidden(dtype="int8"))], "hidden.dtype: 'int8' is not one of"),
    ([first([1, 2, 3], hidden=hidden(nbytes=100))], "hidden.data: 100 bytes, but float32 [2, 576] needs 4608"),
    (
        [first([1, 2, 3], hidden=pb.Tensor(dtype="float32", shape=[2, 2, 2], data=bytes(32)))],
        "hidden.shape: [2, 2, 2] is not [rows, hidden_dim]",
    ),
    ([first([1, 2], hidden=hidden(shape=(3, 576)))], "hidden.shape: 3 rows for 2 new tokens"),
    ([first([1], sampling=pb.SamplingParams(temperature=0.7, top_p=2.0))], "sampling.top_p: 2.0 is not in [0, 1]"),
    ([first([1], sampling=pb.SamplingParams(temperature=-1.0))], "sampling.temperature: -1.0"),
]


@pytest.mark.parametrize("updates,needle", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_update_gets_invalid_argument_naming_the_field(sidecar, updates, needle):
    with pytest.raises(grpc.RpcError) as e:
        session(sidecar.stub, updates)
    assert e.value.code() == Code.INVALID_ARGUMENT and needle in e.value.details(), e.value.details()
    round_trip_ok(sidecar)


def test_oversized_message_is_resource_exhausted(sidecar):
    big = first([1, 2, 3], hidden=hidden(shape=(3, 200_000)))  # 2.4 MB > the 1 MB limit
    with pytest.raises(grpc.RpcError) as e:
        session(sidecar.stub, [big])
    assert e.value.code() == Code.RESOURCE_EXHAUSTED, e.value.details()
    round_trip_ok(sidecar)


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", "s3cret-token"),)])
def test_missing_or_wrong_token_is_unauthenticated(sidecar, metadata):
    for call in (
        lambda: session(sidecar.stub, [first([1, 2])], metadata=metadata),
        lambda: sidecar.stub.GetInfo(pb.InfoRequest(), metadata=metadata, timeout=5),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == Code.UNAUTHENTICATED and "token" in e.value.details()


def test_session_limit_is_resource_exhausted_and_frees_up(sidecar):
    import queue

    sidecar.wait_sessions_closed()
    open_calls = []
    for i in range(34):
        q: queue.Queue = queue.Queue()
        call = sidecar.stub.Session(iter(q.get, None), metadata=AUTH, timeout=20)
        q.put(first([i + 1, 2]))
        next(call)
        open_calls.append((q, call))
    with pytest.raises(grpc.RpcError) as e:
        session(sidecar.stub, [first([1, 2])])
    assert e.value.code() == Code.RESOURCE_EXHAUSTED and "34 sessions open" in e.value.details()
    for q, call in open_calls:
        q.put(None)
        list(call)
    round_trip_ok(sidecar)


def test_idle_session_is_evicted_after_the_ttl(sidecar):
    import queue

    q: queue.Queue = queue.Queue()
    call = sidecar.stub.Session(iter(q.get, None), metadata=AUTH, timeout=20)
    q.put(first([1, 2, 3]))
    next(call)
    evicted = sidecar.stats().sessions_evicted
    with pytest.raises(grpc.RpcError) as e:
        next(call)  # send nothing for longer than session_ttl_s = 3
    assert e.value.code() == Code.DEADLINE_EXCEEDED and "idle for more than 3.0 s; evicted" in e.value.details()
    assert sidecar.stats().sessions_evicted == evicted + 1
    q.put(None)


FIELDS = st.fixed_dictionaries(
    {
        "vocab_size": st.sampled_from([0, VOCAB, VOCAB + 1]),
        "new_tokens": st.lists(st.integers(-5, VOCAB + 5), max_size=6),
        "max_nodes": st.integers(-2, 300),
        "round": st.integers(0, 2**40),
    },
    optional={
        "hidden": st.builds(
            lambda d, s, n: pb.Tensor(dtype=d, shape=s, data=bytes(n)),
            st.sampled_from(["float32", "bfloat16", "float16", "int8", ""]),
            st.lists(st.integers(-1, 600), max_size=3),
            st.integers(0, 4096),
        ),
        "feedback": st.builds(
            lambda a, pn, p: pb.Feedback(accepted=a, prob_nodes=pn, probs=p),
            st.lists(st.integers(-2, 20), max_size=4),
            st.lists(st.integers(-2, 20), max_size=3),
            st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=3),
        ),
        "sampling": st.builds(
            lambda t, k, p: pb.SamplingParams(temperature=t, top_k=k, top_p=p),
            st.floats(-1, 3, width=32),
            st.integers(-3, 50),
            st.floats(-1, 2, width=32),
        ),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(FIELDS, min_size=1, max_size=3))
def test_fuzzed_updates_get_a_tree_or_a_precise_status(sidecar, messages):
    try:
        replies = session(sidecar.stub, [pb.VerifierUpdate(**m) for m in messages])
    except grpc.RpcError as e:
        assert e.code() == Code.INVALID_ARGUMENT and e.details(), (e.code(), e.details())
    else:
        assert len(replies) == len(messages)
        for r in replies:
            assert len(r.tokens) == len(r.parents) <= 64
            assert all(0 <= t < VOCAB for t in r.tokens) and all(-1 <= p < i for i, p in enumerate(r.parents))
    # after every example: the server still serves, and has counted no internal error (the statuses other
    # tests provoke on the shared sidecar are all client errors)
    round_trip_ok(sidecar)
    errors = dict(sidecar.stats().errors)
    assert set(errors) <= {
        "INVALID_ARGUMENT",
        "RESOURCE_EXHAUSTED",
        "UNAUTHENTICATED",
        "NOT_FOUND",
        "DEADLINE_EXCEEDED",
    }, errors


def test_load_32_sessions_by_300_rounds_lose_and_corrupt_nothing(sidecar):
    sidecar.wait_sessions_closed()
    sessions, rounds = 32, 300
    matched, latencies, failures = [0] * sessions, [], []
    before = sidecar.stats().rounds_total

    def worker(i):
        try:
            matched[i] = run_checked_session(sidecar, seed=1000 + i, rounds=rounds - 1, latencies=latencies)
        except Exception as e:  # reported below with the session number
            failures.append((i, repr(e)))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    print(
        f"\nload: {sessions} sessions x {rounds} rounds in {wall:.1f} s = {sessions * rounds / wall:.0f} rounds/s; "
        f"round latency p50 {1000 * statistics.median(lat):.2f} ms, p99 {1000 * lat[int(0.99 * len(lat))]:.2f} ms "
        f"(client side, {sessions} client threads on the same machine)"
    )
    assert not failures, failures
    assert matched == [rounds] * sessions  # every round answered, in order, with the in-process tree
    assert sidecar.stats().rounds_total - before == sessions * rounds


def test_stats_stay_bounded_however_many_rounds():
    """Issue 24: GetStats read every round's time (12.6 ms of event loop after 134k rounds). Stats keep the
    last LATENCY_WINDOW latencies and one counter per second, so a read costs the same after 300k rounds."""
    from drafter.server import LATENCY_WINDOW, RATE_WINDOW_S, Stats

    s = Stats()
    for i in range(300_000):
        s.add_round(4, float(i % 100))
    assert s.rounds == 300_000 and len(s.latency_ms) == LATENCY_WINDOW and len(s.per_second) <= RATE_WINDOW_S + 1
    t0 = time.perf_counter()
    p50, p99 = s.latency_percentiles(0.5, 0.99)
    rate = s.rounds_per_s()
    took = time.perf_counter() - t0
    assert (p50, p99) == (50.0, 99.0) and rate > 0
    print(f"\nstats read after 300k rounds: {1000 * took:.2f} ms")


def test_the_drafter_is_made_on_the_first_update_for_its_client_label():
    """DrafterService calls new_drafter(client_label) when a session's first update arrives, not when the
    stream opens (the label is what a per-client drafter is keyed by), with the label cut as logged."""
    import asyncio

    from drafter.server import DrafterInfo, DrafterService, ServerConfig
    from proto import drafter_pb2_grpc as pb_grpc

    made = []

    def new_drafter(client: str):
        made.append(client)
        return NgramDrafter(NgramConfig())

    async def run():
        info = DrafterInfo("ngram", "test", VOCAB, VOCAB, 0, "trie")
        service = DrafterService(ServerConfig(), new_drafter, info)
        server = grpc.aio.server()
        pb_grpc.add_DrafterServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = pb_grpc.DrafterStub(channel).Session()
                for _ in range(100):  # the stream is open before any update
                    if service.sessions:
                        break
                    await asyncio.sleep(0.01)
                assert len(service.sessions) == 1 and made == []
                await call.write(first([1, 2, 3, 1, 2], client_label="tenant-7/" + "x" * 300))
                assert len((await call.read()).tokens) > 0
                await call.write(pb.VerifierUpdate(round=1, new_tokens=[3], max_nodes=8))
                await call.read()
                await call.done_writing()
                assert await call.read() == grpc.aio.EOF
        finally:
            await server.stop(0)

    asyncio.run(run())
    assert made == ["tenant-7/" + "x" * 91]  # LABEL_CHARS = 100


def test_the_suffix_cache_is_shared_within_a_client_and_never_across_clients(tmp_path):
    """A real sidecar with drafter.kind suffix, scope client: a later session of the same client (the
    client_label up to its first "/") drafts from an earlier session's committed output; another client's
    session gets nothing from it."""
    from tests.sidecar import TOKEN_ENV, Sidecar

    s = Sidecar(tmp_path, f"token_env: {TOKEN_ENV}", other_yaml="drafter: {kind: suffix, suffix: {scope: client}}")
    try:
        secret = [901, 902, 903, 904, 905, 906]
        session(s.stub, [first([1, 2], client_label="a/1"), pb.VerifierUpdate(round=1, new_tokens=secret, max_nodes=8)])
        probe = [7, 901, 902]  # a prompt that ends in the secret's first two tokens

        def drafted(label):
            return list(session(s.stub, [first(probe, client_label=label)])[0].tokens)

        assert drafted("a/2")[:4] == secret[2:6] and drafted("a")[:4] == secret[2:6]
        assert drafted("b") == [] and drafted("ab/1") == []  # other clients' sessions never saw a's text
    finally:
        assert s.stop() == 0
