"""The sidecar under load (`specdraft bench-load`): a real sidecar process, and many sessions drafting at once
against it from one client process, as an inference server's decode loop would: each round commits one
token plus an accepted prefix of the last tree, with the target's hidden states when the drafter takes
them, and waits for the next tree. Per server variant (workers, batching): rounds/s, the client's p50 / p99
round latency, the share of rounds over the client's default timeout, errors, the mean batch (drafts per
forward, from /metrics) and the sidecar's peak RSS.

The client shares the machine's cores with the sidecar, so rounds/s is what both together reach; the
table says how many cores each kept busy on average."""

import asyncio
import collections
import os
import random
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

import grpc
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from drafter.metrics import percentiles
from proto import drafter_pb2 as pb
from proto import drafter_pb2_grpc as pb_grpc
from proto.tree import DraftTree
from proto.wire import tensor_to_msg
from specdraft.config import read_config
from specdraft.serve import free_port, peak_rss_mib, spawn
from verifier.remote import RemoteConfig
from verifier.vllm_backend import first_path

PROMPT_TOKENS = 128
CLIENT_TIMEOUT_MS = RemoteConfig().timeout_ms  # what a client waits for a tree before decoding plainly


@dataclass
class Variant:
    name: str
    server: dict  # server keys over the config's own
    rounds: int = 0
    errors: int = 0
    latency_ms: list[float] = field(default_factory=list)


def config_with_server(path: str, server: dict, metrics_port: int) -> str:
    """The config at path (read and checked like any config: no aliases) with server keys overridden;
    returns the temporary file's path."""
    read_config(path)
    raw = yaml.safe_load(open(path)) or {}
    raw["server"] = {**raw.get("server", {}), **server, "metrics_port": metrics_port}
    raw["server"].setdefault("max_sessions", 64)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(raw, f)
    return f.name


async def one_session(stub, info: pb.ServerInfo, v: Variant, end: float, seed: int) -> None:
    """Rounds until `end` (perf_counter): commit one token and an accepted prefix (0-2 nodes of the last
    tree's first path), with hidden rows when the drafter takes them."""
    rng = random.Random(seed)
    width, vocab = info.hidden_dim, info.vocab_size
    call = stub.Session()
    new = [rng.randrange(vocab) for _ in range(PROMPT_TOKENS)]
    hidden_rows, accepted, rnd = len(new) - 1, [], 0
    try:
        while time.perf_counter() < end:
            msg = pb.VerifierUpdate(round=rnd, new_tokens=new, max_nodes=8)
            if rnd == 0:
                msg.vocab_size, msg.client_label = vocab, f"load-{seed % 4}"
            if width:
                msg.hidden.CopyFrom(tensor_to_msg(torch.randn(hidden_rows, width)))
            if rnd:
                msg.feedback.SetInParent()
                msg.feedback.accepted.extend(accepted)
            t0 = time.perf_counter()
            await call.write(msg)
            tree = await call.read()
            v.latency_ms.append(1000 * (time.perf_counter() - t0))
            v.rounds += 1
            rnd += 1
            depth = rng.randrange(3)  # an empty reply (no draft this round) accepts nothing
            accepted = first_path(DraftTree(tree.tokens, tree.parents, vocab, 8), depth) if tree.tokens else []
            new = [tree.tokens[i] for i in accepted] + [rng.randrange(vocab)]
            hidden_rows = len(new)
        await call.done_writing()
    except grpc.RpcError:
        v.errors += 1
    finally:
        call.cancel()


async def fill_session(stub, info: pb.ServerInfo, chunk: int, cap: int, seed: int, settled, done) -> tuple:
    """Updates of `chunk` new tokens (with hidden rows when the drafter takes them), a tree drafted each
    round, until the session holds `cap` tokens or the sidecar refuses one (`settled` is set then); a full
    session holds its stream open until `done`, so its tokens stay held while the others fill. Returns
    (tokens held, the status that ended it or None)."""
    rng = random.Random(seed)
    call, held, code = stub.Session(), 0, None
    try:
        while held + chunk <= cap:
            new = [rng.randrange(info.vocab_size) for _ in range(chunk)]
            msg = pb.VerifierUpdate(round=0 if not held else 1, new_tokens=new, max_nodes=8)
            if not held:
                msg.vocab_size = info.vocab_size
            if info.hidden_dim:
                msg.hidden.CopyFrom(tensor_to_msg(torch.randn(chunk - (not held), info.hidden_dim)))
            await call.write(msg)
            await call.read()
            held += chunk
        settled.set()
        await done.wait()
    except grpc.RpcError as e:
        code, held = e.code().name, 0  # the session ended: the sidecar gave its tokens back
    finally:
        settled.set()
        call.cancel()
    return held, code


async def fill(address: str, sessions: int, chunk: int, cap: int) -> tuple[list[tuple], int]:
    """Sessions filling at once (fill_session); returns what each held or why it ended, and the sessions
    the sidecar counted open once all had settled."""
    options = [("grpc.max_send_message_length", 64 * 2**20)]
    async with grpc.aio.insecure_channel(address, options) as channel:
        stub = pb_grpc.DrafterStub(channel)
        info = await stub.GetInfo(pb.InfoRequest(), timeout=10)
        settled, done = [asyncio.Event() for _ in range(sessions)], asyncio.Event()
        tasks = [
            asyncio.ensure_future(fill_session(stub, info, chunk, cap, i, settled[i], done)) for i in range(sessions)
        ]
        await asyncio.gather(*(e.wait() for e in settled))
        stats = await stub.GetStats(pb.StatsRequest(), timeout=10)
        done.set()
        return [await t for t in tasks], stats.sessions_open


def run_fill_bench(config: str, sessions: int, chunk: int) -> dict:
    """The sidecar of `config` (its own server section) filled by `sessions` clients, each toward its
    max_session_tokens, together past max_total_tokens: peak RSS against the process's RSS at start, and
    the tokens the full sessions hold against the bound."""
    cfg = read_config(config).server
    proc, address = spawn(config_with_server(config, {}, free_port()))
    try:
        start_rss = peak_rss_mib(proc.pid)
        ended, open_ = asyncio.run(fill(address, sessions, chunk, cfg.max_session_tokens))
        peak = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    codes = collections.Counter(code for _, code in ended if code)
    return {
        "sessions": sessions,
        "chunk": chunk,
        "held": sum(h for h, _ in ended),
        "full_sessions": sum(1 for h, c in ended if c is None),
        "open_at_end": open_,
        "ended": dict(codes),
        "max_session_tokens": cfg.max_session_tokens,
        "max_total_tokens": cfg.max_total_tokens,
        "max_sessions": cfg.max_sessions,
        "start_rss_mib": start_rss,
        "peak_rss_mib": peak,
    }


def print_fill_bench(r: dict, config: str) -> None:
    print(
        f"\n{config}: {r['sessions']} sessions filling at once, {r['chunk']} tokens per update, each toward "
        f"max_session_tokens {r['max_session_tokens']:,} (max_total_tokens {r['max_total_tokens']:,})"
    )
    print(
        f"full sessions holding: {r['full_sessions']} ({r['open_at_end']} open on the sidecar), "
        f"{r['held']:,} tokens held ({'within' if r['held'] <= r['max_total_tokens'] else 'PAST'} the bound); "
        f"ended: {r['ended'] or 'none'}"
    )
    print(f"sidecar RSS: {r['start_rss_mib']:.0f} MiB at start, peak {r['peak_rss_mib']:.0f} MiB")


async def drive(address: str, sessions: int, seconds: float, v: Variant) -> None:
    options = [("grpc.max_send_message_length", 64 * 2**20)]
    async with grpc.aio.insecure_channel(address, options) as channel:
        stub = pb_grpc.DrafterStub(channel)
        info = await stub.GetInfo(pb.InfoRequest(), timeout=10)
        end = time.perf_counter() + seconds
        await asyncio.gather(*(one_session(stub, info, v, end, i) for i in range(sessions)))


def batch_means(metrics_port: int) -> tuple[float, float]:
    """Mean drafts per batched forward and mean wait (ms), from the sidecar's /metrics (nan: none ran)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    got = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            got[s.name] = s.value
    drafts = got.get("specdraft_batch_drafts_sum", 0) / max(got.get("specdraft_batch_drafts_count", 0), 1)
    wait = got.get("specdraft_batch_wait_seconds_sum", 0) / max(got.get("specdraft_batch_wait_seconds_count", 0), 1)
    return (drafts or float("nan")), 1000 * wait


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_load_bench(config: str, variants: list[Variant], sessions: int, seconds: float) -> list[dict]:
    results = []
    for v in tqdm(variants, desc="load bench", unit="variant"):
        port = free_port()
        proc, address = spawn(config_with_server(config, v.server, port))
        try:
            server0, client0 = cpu_seconds(proc.pid), time.process_time()
            asyncio.run(drive(address, sessions, seconds, v))
            server_cpu, client_cpu = cpu_seconds(proc.pid) - server0, time.process_time() - client0
            drafts, wait_ms = batch_means(port)
            rss = peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        p50, p99 = percentiles(v.latency_ms, 0.5, 0.99)
        late = sum(ms > CLIENT_TIMEOUT_MS for ms in v.latency_ms) / max(len(v.latency_ms), 1)
        results.append(
            {
                "variant": v.name,
                "server": v.server,
                "sessions": sessions,
                "seconds": seconds,
                "rounds": v.rounds,
                "rounds_per_s": v.rounds / seconds,
                "p50_ms": p50,
                "p99_ms": p99,
                "late": late,
                "errors": v.errors,
                "batch_drafts": drafts,
                "batch_wait_ms": wait_ms,
                "peak_rss_mib": rss,
                "server_cpu": server_cpu / seconds,  # cores busy on average
                "client_cpu": client_cpu / seconds,
            }
        )
    return results


def print_load_bench(results: list[dict], config: str) -> None:
    from specdraft.report import print_columns

    r0 = results[0]
    print(f"\n{config}: {r0['sessions']} sessions for {r0['seconds']:.0f} s per variant (client round latency)")
    cols = [("variant", 26), ("rounds/s", 10), ("p50 ms", 9), ("p99 ms", 9), (f">{CLIENT_TIMEOUT_MS}ms", 9)]
    cols += [("errors", 8), ("drafts/batch", 14), ("wait ms", 9), ("peak RSS MiB", 14), ("CPU server/client", 19)]
    rows = [
        [
            r["variant"],
            f"{r['rounds_per_s']:.0f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            f"{100 * r['late']:.0f}%",
            r["errors"],
            f"{r['batch_drafts']:.1f}",
            f"{r['batch_wait_ms']:.2f}",
            f"{r['peak_rss_mib']:.0f}",
            f"{r['server_cpu']:.2f} / {r['client_cpu']:.2f}",
        ]
        for r in results
    ]
    print_columns(cols, rows)
    base = results[0]["rounds_per_s"]
    for r in results[1:]:
        print(f"{r['variant']}: {r['rounds_per_s'] / base:.2f}x the rounds/s of {results[0]['variant']}")
