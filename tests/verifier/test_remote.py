"""RemoteDrafter, the verifier's side of the sidecar: lossless whatever the sidecar does (late, garbage,
killed), reconnects when it comes back, TLS, and `specdraft eval` through it gives the in-process tau."""

import subprocess
import time
from concurrent import futures
from dataclasses import replace

import grpc
import pytest

from drafter.ngram import NgramConfig, NgramDrafter
from proto import drafter_pb2 as pb
from proto import drafter_pb2_grpc as pb_grpc
from proto.interface import VerifierUpdate
from tests.sidecar import TOKEN_ENV, VOCAB, Sidecar, free_port
from verifier.remote import RemoteConfig, RemoteDrafter, connect, server_info

PROMPT = [7, 8, 9, 10] * 5


@pytest.fixture
def remote_cfg(sidecar, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret-token")
    return RemoteConfig(address=sidecar.address, timeout_ms=2000, token_env=TOKEN_ENV, max_backoff_s=0.2)


def test_late_trees_fall_back_and_are_dropped_on_arrival(remote_cfg):
    ref, d = NgramDrafter(NgramConfig()), RemoteDrafter(connect(replace(remote_cfg, timeout_ms=0.0)), "late")
    updates = [VerifierUpdate(PROMPT, None, 8, VOCAB)] + [VerifierUpdate([t], None, 8, VOCAB) for t in (7, 8, 9)]
    late = 0
    for up in updates[:3]:
        want = ref.draft(up)
        got = d.draft(up)  # no time to answer, unless the reply was already queued when the wait began
        if got is None:  # (it is, now and then, on a loaded machine: then it must be this round's tree)
            late += 1
        else:
            assert (got.tokens, got.parents) == (want.tokens, want.parents)
    assert late >= 1 and d.fallbacks == late
    d.cfg = remote_cfg
    want = ref.draft(updates[3])
    got = d.draft(updates[3])  # the three late replies are skipped; this round's tree comes back
    assert got is not None and (got.tokens, got.parents) == (want.tokens, want.parents)
    d.close()


def test_unreachable_sidecar_costs_no_wait_and_backs_off():
    d = RemoteDrafter(
        connect(RemoteConfig(address=f"127.0.0.1:{free_port()}", timeout_ms=2000, max_backoff_s=1.0)), "down"
    )
    t0 = time.monotonic()
    assert d.draft(VerifierUpdate(PROMPT, None, 8, VOCAB)) is None
    assert d.draft(VerifierUpdate([7], None, 8, VOCAB)) is None  # inside the backoff: no attempt at all
    assert time.monotonic() - t0 < 1.5 and d.stream is None and d.fallbacks == 2
    d.close()


def test_a_sidecar_back_after_a_long_outage_is_drafting_again_within_our_backoff(tmp_path):
    """gRPC's channel has its own reconnect backoff (1 s growing by 1.6x): unless capped at max_backoff_s,
    a sidecar restarted after 10 s down would see no call for seconds more (measured 4 s after 15 s down)."""
    port = free_port()
    s = Sidecar(tmp_path, "", address=f"127.0.0.1:{port}")
    d = RemoteDrafter(connect(RemoteConfig(address=s.address, timeout_ms=2000, max_backoff_s=0.2)), "outage")
    assert d.draft(VerifierUpdate(PROMPT, None, 8, VOCAB)) is not None
    s.proc.kill()
    s.proc.wait()
    end = time.monotonic() + 10
    while time.monotonic() < end:
        assert d.draft(VerifierUpdate([7], None, 8, VOCAB)) is None
        time.sleep(0.05)
    s = Sidecar(tmp_path, "", address=f"127.0.0.1:{port}")  # returns once the new process serves
    t0, tokens = time.monotonic(), iter([8, 9, 10, 7] * 100)
    while d.draft(VerifierUpdate([next(tokens)], None, 8, VOCAB)) is None:
        time.sleep(0.05)
    waited = time.monotonic() - t0
    d.close()
    s.stop()
    assert waited < 1.5 and d.reconnects == 1


class FakeGarbageDrafter(pb_grpc.DrafterServicer):
    """A broken sidecar for the test: answers every update with a tree that breaks the wire contract (a
    token outside the vocabulary, a node that is its own parent, more nodes than asked, tokens and parents of
    different lengths). Not drafter.synthetic.RandomDrafter, whose random trees are valid."""

    TREES = [([VOCAB + 1], [-1]), ([1, 2], [-1, 1]), ([1] * 100, [-1] * 100), ([1, 2], [-1])]

    def Session(self, request_iterator, context):
        for i, msg in enumerate(request_iterator):
            tokens, parents = self.TREES[i % len(self.TREES)]
            yield pb.DraftTree(round=msg.round, tokens=tokens, parents=parents)


def test_garbage_trees_are_rejected_by_the_client():
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_DrafterServicer_to_server(FakeGarbageDrafter(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    cfg = RemoteConfig(address=f"127.0.0.1:{port}", timeout_ms=2000)
    d = RemoteDrafter(connect(cfg), "garbage")
    results = [d.draft(VerifierUpdate(PROMPT if i == 0 else [7], None, 8, VOCAB)) for i in range(4)]
    assert results == [None] * 4 and d.fallbacks == 4 and d.stream is not None  # stream kept, trees refused
    d.close()
    server.stop(0)


def test_tls_and_token(tmp_path, monkeypatch):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    s = Sidecar(tmp_path, f"tls_cert: {cert}, tls_key: {key}, token_env: {TOKEN_ENV}")
    monkeypatch.setenv(TOKEN_ENV, "s3cret-token")
    cfg = RemoteConfig(address=s.address, tls_ca=str(cert), token_env=TOKEN_ENV, timeout_ms=2000)
    assert server_info(connect(cfg)).auth_required
    assert "with TLS with token auth" in s.log_path.read_text()
    d = RemoteDrafter(connect(cfg), "tls")
    update = VerifierUpdate(PROMPT, None, 8, VOCAB)
    got, want = d.draft(update), NgramDrafter(NgramConfig()).draft(update)
    assert (got.tokens, got.parents) == (want.tokens, want.parents) and d.fallbacks == 0
    d.close()
    with pytest.raises(grpc.RpcError) as e:  # TLS alone is not enough: the token is checked over it too
        server_info(connect(replace(cfg, token_env="")), timeout_s=2)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:  # plaintext to a TLS port
        plain = replace(cfg, tls_ca="")
        server_info(connect(plain), timeout_s=2)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert s.stop() == 0


@pytest.mark.model
def test_sidecar_killed_mid_generation_output_equals_ar_and_speculation_resumes(tmp_path, target_fp32, tokenizer):
    from drafter.data import chat_prompt
    from verifier.engine import generate
    from verifier.rules import SamplingParams

    port = free_port()
    s = Sidecar(tmp_path, "", address=f"127.0.0.1:{port}")
    cfg = RemoteConfig(address=s.address, timeout_ms=2000, max_backoff_s=0.2)
    prompt = chat_prompt(
        tokenizer, "Write a Python function that checks whether a number is prime, then write five unit tests for it."
    )
    stops = {tokenizer.eos_token_id}
    ar = [t for st in generate(target_fp32, prompt, SamplingParams(), 80, stops) for t in st.tokens]
    d = RemoteDrafter(connect(cfg), "kill-test")
    out, trees, phase = [], {"up": 0, "down": 0, "back": 0}, "up"
    for i, step in enumerate(generate(target_fp32, prompt, SamplingParams(), 80, stops, d, 8)):
        out += step.tokens
        trees[phase] += step.tree_nodes > 0
        if i == 17:  # prompt lookup has drafted by now (first at step 16 in fp32)
            s.proc.kill()
            s.proc.wait()
            phase = "down"
        elif i == 30:
            s = Sidecar(tmp_path, "", address=f"127.0.0.1:{port}")  # generation waits here until it is up
            phase = "back"
    d.close()
    s.stop()
    assert out == ar
    assert trees["up"] > 0 and trees["down"] == 0 and trees["back"] > 0, trees
    assert d.reconnects == 1


@pytest.mark.model
def test_eval_through_the_sidecar_gives_the_inprocess_tau(sidecar, remote_cfg, tmp_path):
    from specdraft.config import Config
    from specdraft.evaluate import run_eval

    base = Config()
    base.eval.num_prompts, base.eval.max_new_tokens, base.eval.baseline = 1, 48, False
    base.eval.output = str(tmp_path / "inproc.json")
    inproc = run_eval(base)
    base.drafter.mode, base.drafter.grpc = "grpc", remote_cfg
    base.verify.feedback_topk = 4  # also carried over the wire and validated by the sidecar
    base.eval.output = str(tmp_path / "grpc.json")
    remote = run_eval(base)
    for name in ("mt_bench", "humaneval"):
        a, b = inproc["datasets"][name], remote["datasets"][name]
        assert b["fallback_rounds"] == 0 and a["tau"] == b["tau"] and a["tokens"] == b["tokens"]
        assert inproc["outputs"][name] == remote["outputs"][name]


def test_eval_with_no_sidecar_is_a_config_error():
    from specdraft.build import DrafterConfig
    from specdraft.config import ConfigError
    from specdraft.evaluate import drafter_factory

    cfg = DrafterConfig(mode="grpc", grpc=RemoteConfig(address=f"127.0.0.1:{free_port()}"))
    with pytest.raises(ConfigError, match="drafter.grpc.address: no specdraft drafter at 127.0.0.1:"):
        drafter_factory(cfg, type("FakeTargetInfo", (), {"vocab_size": VOCAB})())
