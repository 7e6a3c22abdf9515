"""The sidecar's Prometheus endpoint (server.metrics_port), scraped from a real sidecar process after a
few rounds: every counter and histogram holds exactly what the rounds sent and received."""

import urllib.request
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from drafter.metrics import Metrics
from drafter.ngram import NgramConfig, NgramDrafter
from proto import drafter_pb2 as pb
from proto.interface import Feedback, VerifierUpdate
from proto.wire import update_to_msg
from tests.sidecar import VOCAB, Sidecar, free_port, session


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_endpoint_counts_sessions_rounds_trees_acceptance_and_errors(tmp_path):
    """One session of four rounds (three carrying feedback that accepts up to two nodes of the first
    path of the previous tree), then one session ended by a bad update."""
    port = free_port()
    sidecar = Sidecar(tmp_path, f"metrics_port: {port}")
    try:
        ref = NgramDrafter(NgramConfig())  # the sidecar's drafter: its trees, to send valid feedback
        cycle = [11, 12, 13, 14]
        ups, trees, accepted, pos = [VerifierUpdate(cycle * 3, None, 8, VOCAB)], [], [], 0
        for _ in range(3):
            tree = ref.draft(ups[-1])
            trees.append(tree)
            path = [0] + [1] * (len(tree) > 1 and tree.parents[1] == 0)  # up to two nodes of the first chain
            accepted.append(len(path))
            roots = {i: 0.5 for i, p in enumerate(tree.parents) if p == -1}
            pos += len(path) + 1  # the accepted tokens (the cycle's next ones) and the bonus token
            committed = [tree.tokens[i] for i in path] + [cycle[(pos - 1) % 4]]
            ups.append(VerifierUpdate(committed, Feedback(path, roots), 8, VOCAB))
        trees.append(ref.draft(ups[-1]))
        replies = session(sidecar.stub, [update_to_msg(u, r, first=r == 0) for r, u in enumerate(ups)])
        assert [len(r.tokens) for r in replies] == [len(t) for t in trees] and all(trees)
        with pytest.raises(grpc.RpcError) as e:
            session(sidecar.stub, [pb.VerifierUpdate(vocab_size=VOCAB, new_tokens=[VOCAB + 1], max_nodes=8)])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        sidecar.wait_sessions_closed()

        m = scrape(port)
        nodes = sum(len(t) for t in trees)
        assert m[("specdraft_sessions_open", ())] == 0
        assert m[("specdraft_sessions_total", ())] == 2
        assert m[("specdraft_rounds_total", ())] == 4
        assert m[("specdraft_round_seconds_count", ())] == 4 and 0 < m[("specdraft_round_seconds_sum", ())] < 4
        assert m[("specdraft_tree_nodes_count", ())] == 4 and m[("specdraft_tree_nodes_sum", ())] == nodes
        assert m[("specdraft_accepted_tokens_count", ())] == 3
        assert m[("specdraft_accepted_tokens_sum", ())] == sum(accepted) > 0
        assert m[("specdraft_empty_trees_total", ())] == 0
        assert m[("specdraft_errors_total", (("code", "INVALID_ARGUMENT"),))] == 1
        assert not any(name.startswith("specdraft_bandit") for name, _ in m)  # no online learner here
    finally:
        assert sidecar.stop() == 0


def test_bandit_counters_and_open_sessions_are_read_at_scrape_time():
    adapter = SimpleNamespace(decisions=5, updates=2, rollbacks=1)
    metrics = Metrics(lambda: 3, adapter)
    adapter.decisions += 1
    m = {
        s.name: s.value
        for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in f.samples
    }
    assert m["specdraft_sessions_open"] == 3
    assert (m["specdraft_bandit_decisions_total"], m["specdraft_bandit_updates_total"]) == (6, 2)
    assert m["specdraft_bandit_rollbacks_total"] == 1
