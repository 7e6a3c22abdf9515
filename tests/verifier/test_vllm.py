"""vLLM as the verifier. Unit tests drive SpecdraftProposer the way vLLM's model runner calls it (with a
fake vllm_config) against a real sidecar; the integration test runs a real vllm.LLM on SmolLM2-135M."""

import logging
import os
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from drafter.ngram import NgramConfig, NgramDrafter
from proto.interface import VerifierUpdate
from proto.tree import DraftTree
from specdraft.vllm import ADDRESS_ENV, CONFIG_ENV, PROPOSER, SpecdraftProposer
from tests.sidecar import TOKEN, TOKEN_ENV, VOCAB, Sidecar, free_port
from verifier.vllm_backend import first_path

K = 4


def test_first_path_takes_the_first_listed_child_at_each_level():
    #   roots 0, 1; 0 -> 2, 3; 2 -> 4; 3 -> 5; 1 -> 6
    tree = DraftTree((10, 11, 12, 13, 14, 15, 16), (-1, -1, 0, 0, 2, 3, 1), VOCAB, 8)
    assert first_path(tree, 8) == [0, 2, 4]
    assert first_path(tree, 2) == [0, 2]
    assert first_path(DraftTree((5,), (-1,), VOCAB, 8), 4) == [0]


def fake_vllm_config(max_model_len=2048):
    """A stand-in for vllm.config.VllmConfig with the three fields the proposer reads."""
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=K),
        model_config=SimpleNamespace(get_vocab_size=lambda: VOCAB, max_model_len=max_model_len),
    )


class Batch:
    """vLLM's persistent batch as the proposer sees it: token_ids_cpu [max_reqs, max_model_len] and
    num_tokens_no_spec per row."""

    def __init__(self, rows: list[list[int]]):
        self.rows = [list(r) for r in rows]

    def call(self, proposer, sampled):
        ids = np.zeros((8, 256), np.int32)
        for i, r in enumerate(self.rows):
            ids[i, : len(r)] = r
            ids[i, len(r) : len(r) + K] = 999  # stale draft slots past num_tokens_no_spec must be ignored
        return proposer.propose(sampled, np.array([len(r) for r in self.rows]), ids)


@pytest.fixture
def proposer(sidecar, tmp_path, monkeypatch):
    cfg = tmp_path / "proposer.yaml"
    cfg.write_text(f"drafter: {{mode: grpc, max_nodes: 8, grpc: {{timeout_ms: 2000, token_env: {TOKEN_ENV}}}}}\n")
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    monkeypatch.setenv(CONFIG_ENV, str(cfg))
    monkeypatch.setenv(ADDRESS_ENV, sidecar.address)
    p = SpecdraftProposer(fake_vllm_config())
    yield p
    p.propose([], np.zeros(0, np.int32), np.zeros((0, 256), np.int32))  # an empty batch closes every stream
    p.conn.close()


def reference_path(ref: NgramDrafter, new_tokens: list[int]) -> list[int]:
    tree = ref.draft(VerifierUpdate(new_tokens, None, 8, VOCAB))
    return tree.path_tokens(first_path(tree, K)) if tree is not None else []


def test_proposals_are_the_sidecar_trees_first_paths_and_acceptance_is_fed_back(proposer, sidecar):
    a, b = [1, 2, 3, 4, 5, 6] * 3, [40, 41, 42, 43] * 4
    ref_a, ref_b = NgramDrafter(NgramConfig()), NgramDrafter(NgramConfig())
    before = sidecar.stats()
    batch = Batch([a, b])
    drafts = batch.call(proposer, [[a[-1]], [b[-1]]])  # both just finished prefill
    assert drafts == [reference_path(ref_a, a), reference_path(ref_b, b)] == [[1, 2, 3, 4], [40, 41, 42, 43]]
    # vLLM accepted 2 of a's draft tokens and then sampled 9; b's first token was rejected (vLLM chose 7)
    batch.rows[0] += [1, 2, 9]
    batch.rows[1] += [7]
    drafts = batch.call(proposer, [[1, 2, 9], [7]])
    assert drafts == [reference_path(ref_a, [1, 2, 9]), reference_path(ref_b, [7])]
    after = sidecar.stats()
    assert after.feedback_rounds - before.feedback_rounds == 2
    assert after.accepted_tokens - before.accepted_tokens == 2


def test_the_proposer_logs_what_proposing_costs_every_timing_every_steps(proposer, caplog, monkeypatch):
    from verifier import vllm_backend

    monkeypatch.setattr(vllm_backend, "TIMING_EVERY", 3)
    a = [1, 2, 3, 4, 5, 6] * 3
    batch = Batch([a])
    with caplog.at_level(logging.INFO, logger="verifier.vllm_backend"):
        for step in range(6):
            batch.call(proposer, [[a[-1]] if step == 0 else [7]])
            batch.rows[0] += [7]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("specdraft proposer: 3 steps")]
    assert len(lines) == 2 and all("propose p50" in line and " ms, mean " in line for line in lines)


def test_rows_follow_their_requests_through_reorders_arrivals_and_departures(proposer, sidecar):
    a, b, c = [1, 2, 3, 4, 5, 6] * 3, [40, 41, 42, 43] * 4, [70, 71, 72] * 5
    ref = {"a": NgramDrafter(NgramConfig()), "b": NgramDrafter(NgramConfig()), "c": NgramDrafter(NgramConfig())}
    opened = sidecar.stats().sessions_total
    batch = Batch([a, b])
    batch.call(proposer, [[6], [43]])
    ref["a"].draft(VerifierUpdate(a, None, 8, VOCAB))
    ref["b"].draft(VerifierUpdate(b, None, 8, VOCAB))
    # a finished; b moved to row 0 and committed one token; c arrived in row 1, c mid-prefill first
    batch.rows = [b + [40], c[:6]]
    assert batch.call(proposer, [[40], []]) == [reference_path(ref["b"], [40]), []]
    batch.rows = [b + [40, 41], c]
    assert batch.call(proposer, [[41], [72]]) == [reference_path(ref["b"], [41]), reference_path(ref["c"], c)]
    stats = sidecar.stats()
    assert stats.sessions_total - opened == 3  # a, b, c: one stream each, b's kept across rows
    deadline = time.monotonic() + 5
    while sidecar.stats().sessions_open > 2 and time.monotonic() < deadline:  # a's stream was closed
        time.sleep(0.02)
    assert sidecar.stats().sessions_open == 2


def test_an_unreachable_sidecar_proposes_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setenv(ADDRESS_ENV, f"127.0.0.1:{free_port()}")
    p = SpecdraftProposer(fake_vllm_config())
    row = [1, 2, 3, 4] * 4
    t0 = time.perf_counter()
    assert Batch([row]).call(p, [[4]]) == [[]]
    assert Batch([row + [1]]).call(p, [[1]]) == [[]]  # in backoff: no new connection attempt per step
    assert time.perf_counter() - t0 < 1.0
    p.conn.close()


# ---- a real vllm.LLM on SmolLM2-135M ----

PROMPTS = [
    "List the numbers from 1 to 20, separated by commas.",
    "Write a Python function that returns the sum of a list, then the same function with a docstring.",
    "Repeat this sentence three times: the quick brown fox jumps over the lazy dog.",
]


@pytest.mark.model
def test_vllm_with_the_sidecar_decodes_exactly_like_vllm_and_survives_losing_it(model_path, tokenizer, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed here (make setup-vllm installs it)")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from drafter.data import chat_prompt

    prompts = [TokensPrompt(prompt_token_ids=chat_prompt(tokenizer, p)) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=64)

    def engine(spec):
        # an explicit KV cache size: vLLM's CPU worker otherwise sizes it as memory fraction minus its own
        # RSS, which a worker forked from this grown test process can exceed (CI failed so once)
        return LLM(
            model=str(model_path),
            dtype="float32",
            max_model_len=1024,
            enforce_eager=True,
            kv_cache_memory_bytes=512 * 2**20,
            speculative_config=spec,
            seed=0,
        )

    def run(llm, ps):
        return [list(o.outputs[0].token_ids) for o in llm.generate(ps, params, use_tqdm=False)]

    llm = engine(None)
    plain = run(llm, prompts) + run(llm, prompts)
    llm.llm_engine.engine_core.shutdown()
    del llm

    side = Sidecar(tmp_path, "max_sessions: 8")
    os.environ[ADDRESS_ENV] = side.address  # read by vLLM's engine process, spawned below
    os.environ.pop(CONFIG_ENV, None)
    try:
        llm = engine({"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": K})
        assert run(llm, prompts) == plain[:3]
        stats = side.stats()
        assert stats.sessions_total >= len(PROMPTS) and stats.accepted_tokens > 0, stats

        def kill_when_drafting():  # SIGKILL the sidecar in the middle of the second batch
            start, deadline = side.stats().rounds_total, time.monotonic() + 60
            while side.stats().rounds_total < start + 10 and time.monotonic() < deadline:
                time.sleep(0.005)
            side.proc.send_signal(signal.SIGKILL)

        killer = threading.Thread(target=kill_when_drafting, daemon=True)
        killer.start()
        second = run(llm, prompts)
        killer.join(timeout=30)
        assert side.proc.poll() is not None, "the sidecar was not killed during the second batch"
        assert second == plain[3:]
        llm.llm_engine.engine_core.shutdown()
    finally:
        os.environ.pop(ADDRESS_ENV, None)
        side.stop()


def test_vllm_eval_builds_its_table_and_restores_the_environment(monkeypatch):
    """run_vllm_eval's bookkeeping with vLLM faked (named fake: run_vllm_variant replaced): one sidecar
    spawned per sidecar row and pointed at through the environment, which is left as the caller had it."""
    from specdraft import vllm as vb
    from specdraft.config import Config

    monkeypatch.setenv(CONFIG_ENV, "callers.yaml")
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    stopped = []

    class FakeProcess:
        def terminate(self):
            stopped.append(1)

        def wait(self):
            return 0

    monkeypatch.setattr(vb, "spawn", lambda path: (FakeProcess(), "127.0.0.1:1"))
    monkeypatch.setattr(vb, "model_dir", lambda name: "/model")
    seen = []

    def fake_variant(cfg, model_path, spec, dtype, prompts, stops, progress):
        seen.append((spec and spec["method"], dtype, os.environ.get(CONFIG_ENV), os.environ.get(ADDRESS_ENV)))
        speed = {None: 10.0 if dtype == "float32" else 12.5, "ngram": 12.0, "custom_class": 15.0}[
            spec and spec["method"]
        ]
        tokens = [1, 2, 3] if spec is None or spec["method"] == "custom_class" else [1, 2, 4]
        return {
            ds: {
                "tokens": 3,
                "wall_s": 3 / speed,
                "tokens_per_s": speed,
                "mean_accepted_length": 2.0 if spec else None,
                "outputs": [{"tokens": tokens}],
            }
            for ds in prompts
        }

    monkeypatch.setattr(vb, "run_vllm_variant", fake_variant)
    cfg = Config()
    cfg.target.dtype = "float32"
    cfg.verifier.vllm.sidecars = ["configs/sidecar.yaml"]
    cfg.verifier.vllm.plain_dtypes = ["bfloat16"]
    report = vb.run_vllm_eval(
        cfg,
        [("mt_bench", "q1", [5, 6])],
        set(),
        {"datasets": {"mt_bench": {"tau": 1.5, "tokens": 3, "spec_tokens_per_s": 5.0}}},
    )
    assert seen == [
        (None, "float32", "callers.yaml", None),
        ("ngram", "float32", "callers.yaml", None),
        ("custom_class", "float32", "configs/sidecar.yaml", "127.0.0.1:1"),
        (None, "bfloat16", "callers.yaml", None),
    ]
    assert os.environ[CONFIG_ENV] == "callers.yaml" and ADDRESS_ENV not in os.environ and stopped == [1]
    rows = report["datasets"]["mt_bench"]
    assert rows["vLLM ngram"]["speedup"] == pytest.approx(1.2) and rows["vLLM ngram"]["equal_to_plain"] is False
    assert rows["vLLM + sidecar (sidecar.yaml)"]["speedup"] == pytest.approx(1.5)
    assert rows["vLLM + sidecar (sidecar.yaml)"]["equal_to_plain"] is True
    assert rows["specdraft tree verifier (float32)"]["speedup"] == pytest.approx(0.5)
    assert rows["vLLM plain bfloat16"]["speedup"] == pytest.approx(1.25)  # the reference row, over plain float32


# One long test: a single vLLM server and sidecar (minutes to start) serve all of its checks.
@pytest.mark.model
def test_vllm_serve_drafts_through_the_sidecar(model_path, tmp_path):
    """The README's deployment: vLLM's OpenAI-compatible server (started as a module, as the README says)
    with the proposer, next to a sidecar: chat completions are served and drafted for, and a finished
    request's stream is closed at the engine's next step (here: the next request's first). (Exactness
    against plain vLLM is the LLM test's.)"""
    pytest.importorskip("vllm", reason="vLLM is not installed here (make setup-vllm installs it)")
    import json
    import subprocess
    import sys
    import urllib.request

    side = Sidecar(tmp_path, "max_sessions: 8")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != CONFIG_ENV} | {ADDRESS_ENV: side.address}
    spec = json.dumps({"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": K})
    log_path = tmp_path / "vllm-serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(model_path),
                "--served-model-name",
                "smollm2",
                "--dtype",
                "float32",
                "--max-model-len",
                "1024",
                "--enforce-eager",
                "--kv-cache-memory-bytes",
                str(512 * 2**20),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--speculative-config",
                spec,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"vLLM's server exited: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"vLLM's server not up in 300 s: {log_path.read_text()[-3000:]}"
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        for n, prompt in enumerate(PROMPTS[:2], 1):
            body = json.dumps(
                {
                    "model": "smollm2",
                    "max_tokens": 48,
                    "temperature": 0,
                    "messages": [{"role": "user", "content": prompt}],
                }
            ).encode()
            req = urllib.request.Request(f"{base}/v1/chat/completions", body, {"content-type": "application/json"})
            reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
            assert reply["choices"][0]["message"]["content"].strip() and reply["usage"]["completion_tokens"] > 8, reply
            stats = side.stats()
            assert stats.sessions_total >= n and stats.sessions_open == 1, stats  # the previous stream was closed
        assert stats.accepted_tokens > 0 and stats.feedback_rounds > 0, stats
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        side.stop()
