"""bandit.arms: the per-session choice of the hybrid's sources x node budget by measured tokens/s, its
per-client priors, the hybrid obeying the chosen sources, the config's refusals, and a real sidecar
reporting which arm each client gets (GetStats, GetSessionStats, /metrics)."""

import math

import pytest

from bandit.arms import ArmChooser, ArmDrafter, ArmsConfig, Tally, parse_arm, ucb
from drafter.hybrid import Calibration, Hybrid, HybridConfig, Scored
from proto.interface import Feedback, VerifierUpdate
from proto.tree import DraftTree
from tests.drafter.test_hybrid import FakeSource


class FakeHybrid:
    """A fake of drafter.hybrid.Hybrid: records the sources and budget each round drafted with; drafting
    moves the fake clock `now` on by `cost` seconds."""

    def __init__(self, now=None, cost=0.0):
        self.use, self.asked, self.forwards, self.lookup_s, self.closed = "both", [], 0, 0.0, False
        self.now, self.cost = now, cost

    def draft_steps(self, update):
        self.asked.append((self.use, update.max_nodes))
        if self.now is not None:
            self.now[0] += self.cost
        return DraftTree([5], [-1], update.vocab_size, update.max_nodes)
        yield

    def close(self):
        self.closed = True


def up(tokens=1, verify_ms=0.0, feedback=True):
    return VerifierUpdate([1] * tokens, Feedback([], {}, verify_ms=verify_ms) if feedback else None, 8, 100)


def test_arms_parse_and_the_config_refuses_bad_ones():
    assert parse_arm("both:8") == ("both", 8) and parse_arm("lookup:16") == ("lookup", 16)
    for bad in ("both:0", "suffix:8", "both", "both:x"):
        with pytest.raises(ValueError, match="is not <sources>:<nodes>"):
            parse_arm(bad)
    with pytest.raises(ValueError, match=r"choose\[1\]"):
        ArmsConfig(choose=["both:8", "model"]).validate()
    with pytest.raises(ValueError, match="listed twice"):
        ArmsConfig(choose=["both:8", "both:8"]).validate()


@pytest.mark.parametrize(
    "drafter, message",
    [
        ("{kind: ngram, arms: {choose: [both:8]}}", "drafter.arms.choose: arms mix the hybrid's sources"),
        (
            "{kind: specblock, lookup: suffix, max_nodes: 8, arms: {choose: [both:16]}}",
            "drafter.arms.choose: both:16 asks for more nodes than max_nodes 8",
        ),
    ],
)
def test_a_config_with_arms_the_drafter_cannot_draw_is_refused(tmp_path, capsys, drafter, message):
    from specdraft.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"drafter: {drafter}\n")
    assert main(["serve-drafter", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_an_experiment_with_bandit_policies_and_no_arms_exits_2_naming_the_field(tmp_path, capsys):
    from specdraft.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("drafter: {kind: ngram}\nexperiment: {policies: [ar, bandit]}\n")
    assert main(["experiment", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "drafter.arms.choose: the experiment's fixed and bandit policies" in err


def test_ucb_tries_every_arm_then_follows_the_rates_and_ties_go_to_the_earlier_arm():
    t = Tally(3)
    assert ucb(t, 0.2) == (0, "untried")
    t.add(0, 2, 0.1)  # 20 tok/s
    assert ucb(t, 0.2) == (1, "untried")
    t.add(1, 3, 0.1)  # 30 tok/s
    t.add(2, 3, 0.1)  # 30 tok/s
    assert ucb(t, 0.0) == (1, "best")  # no bonus: the best rate, the earlier of the two
    for _ in range(50):
        t.add(1, 3, 0.1)
    assert ucb(t, 0.5) == (2, "best")  # as fast as arm 1 and far less tried: the bonus decides
    t.add(2, 1, 0.1)
    for _ in range(50):
        t.add(2, 3, 0.1)
    # arm 0 (20 tok/s, one round): 20 + 0.5 x 30 x sqrt(2 ln 103 / 1) = 66 beats 30 + ~5 on the others
    bonus = 0.5 * 30 * math.sqrt(2 * math.log(sum(t.rounds)) / 1)
    assert 20 + bonus > 36 and ucb(t, 0.5) == (0, "exploring")
    assert ucb(t, 0.05)[0] == 1  # a small bonus: back to the best rate


def test_a_prior_counts_at_most_prior_rounds_per_arm_with_its_rates():
    t = Tally(2)
    for _ in range(100):
        t.add(0, 2, 0.05)
    t.add(1, 1, 0.1)
    s = t.scaled(32)
    assert s.rounds == [pytest.approx(32), pytest.approx(1)]
    assert s.rate(0) == pytest.approx(40) and s.rate(1) == pytest.approx(10)


def test_each_round_is_rewarded_with_its_tokens_over_drafting_plus_verification():
    """A fake clock: drafting takes 1 s in each round. With verify_ms in the feedback the round's time is
    that; without it, the time from returning the tree to the next update."""
    now = [0.0]
    inner = FakeHybrid(now, cost=1.0)
    d = ArmDrafter(inner, ArmChooser(ArmsConfig(choose=["both:8", "lookup:4"])), "app/1", clock=lambda: now[0])

    def round_(update, gap):
        now[0] += gap  # the verifier's time, since the previous tree was returned
        d.draft(update)

    round_(up(10, feedback=False), 0.0)  # the prompt: nothing to book yet; arm 0 is untried
    round_(up(2, verify_ms=100.0), 5.0)  # not booked: that round's drafting read the prompt
    assert inner.asked == [("both", 8), ("both", 8)] and d.own.rounds == [0, 0]
    round_(up(3, verify_ms=500.0), 7.0)  # arm 0: 3 tokens / (1 s drafting + 0.5 s verifying)
    assert d.own.rounds == [1, 0] and d.own.rate(0) == pytest.approx(3 / 1.5)
    assert inner.asked[-1] == ("lookup", 4)  # arm 1 untried: its sources and budget (capped at 4)
    round_(up(1, feedback=False), 2.0)  # arm 1, no feedback (no tree judged): 1 token / (1 s + 2 s gap)
    assert d.own.rate(1) == pytest.approx(1 / 3.0)
    assert d.chosen == ("both:8", "best")
    d.close()
    assert inner.closed


def test_a_session_settles_on_the_faster_arm_and_a_new_one_of_its_client_starts_there():
    """A fake world where the lookup alone commits 4 tokens a round and the hybrid 2, at equal cost:
    sessions learn it, a new session of the same client starts on the lookup, and a client never seen
    starts from every client's pool."""
    chooser = ArmChooser(ArmsConfig(choose=["both:8", "lookup:8"], exploration=0.1))
    now = [0.0]
    tokens = {"both": 2, "lookup": 4}

    def run_session(label, rounds=40):
        inner = FakeHybrid()
        d = ArmDrafter(inner, chooser, label, clock=lambda: now[0])
        first = d.draft(up(10, feedback=False))
        assert first is not None
        for _ in range(rounds):
            now[0] += 0.1
            d.draft(up(tokens[inner.use], verify_ms=100.0))
        d.close()
        return inner

    inner = run_session("code/1")
    late = [u for u, _ in inner.asked[10:]]
    assert late.count("lookup") / len(late) > 0.8
    new = run_session("code/2", rounds=1)
    assert new.asked[0] == ("lookup", 8)  # the client's pool says the lookup; no untried arm
    stats = chooser.stats()
    assert stats["code"]["arm"] == "lookup:8" and stats["code"]["why"] == "best"
    assert stats["code"]["arms"]["lookup:8"]["tokens_per_s"] > stats["code"]["arms"]["both:8"]["tokens_per_s"]
    other = run_session("chat/1", rounds=1)
    assert other.asked[0] == ("lookup", 8)  # from every client's pool
    assert chooser.pulled[1] > chooser.pulled[0]


def test_the_hybrid_drafts_with_the_sources_it_is_told_and_both_keep_absorbing_tokens():
    lookup = FakeSource(Scored([7, 8], [-1, 0], [0.9, 0.9]))
    model = FakeSource(Scored([30], [-1], [0.6]))
    h = Hybrid(lookup, "suffix", model, Calibration(), HybridConfig())
    trees = {}
    for use in ("both", "lookup", "model"):
        h.use = use
        trees[use] = h.draft(VerifierUpdate([1, 2], None, 4, 100)).tokens
    assert trees == {"both": (7, 8, 30), "lookup": (7, 8), "model": (30,)}
    assert [u.max_nodes for u in lookup.updates] == [4, 4, 0]  # told nothing to draft, it still absorbs
    assert [u.max_nodes for u in model.updates] == [4, 0, 4]


@pytest.mark.model
def test_a_sidecar_with_arms_reports_each_clients_arm_in_stats_and_metrics(tmp_path):
    """A real sidecar (the shipped hybrid, arms on): sessions of client "app" and one of "other"; GetStats
    lists both clients with an arm from the list, GetSessionStats the open session's, /metrics counts
    rounds per arm."""
    import torch

    from proto import drafter_pb2 as pb
    from proto.wire import tensor_to_msg
    from tests.drafter.test_hostile import specblock_yaml
    from tests.drafter.test_metrics import scrape
    from tests.sidecar import AUTH, VOCAB, Sidecar, free_port

    port = free_port()
    yaml = specblock_yaml("specblock-smollm2", tree="frontier").replace(
        "drafter: {", "drafter: {lookup: suffix, arms: {choose: [both:8, lookup:8, both:4]}, "
    )
    s = Sidecar(tmp_path, f"metrics_port: {port}", other_yaml=yaml)
    try:
        g = torch.Generator().manual_seed(0)
        for label in ("app/1", "app/2", "other/1"):
            prompt = torch.randint(0, VOCAB, (12,), generator=g).tolist()
            msgs = [
                pb.VerifierUpdate(
                    round=0,
                    vocab_size=VOCAB,
                    client_label=label,
                    new_tokens=prompt,
                    max_nodes=8,
                    hidden=tensor_to_msg(torch.randn(11, 576, generator=g)),
                )
            ]
            msgs += [
                pb.VerifierUpdate(round=r, new_tokens=[5], max_nodes=8, hidden=tensor_to_msg(torch.randn(1, 576)))
                for r in range(1, 6)
            ]
            replies = list(s.stub.Session(iter(msgs), metadata=AUTH, timeout=60))
            assert len(replies) == 6
        s.wait_sessions_closed()
        clients = {c.client: c for c in s.stats().arms}
        assert set(clients) == {"all", "app", "other"}
        for c in ("app", "other"):
            assert clients[c].arm in ("both:8", "lookup:8", "both:4") and clients[c].why
            assert sum(clients[c].rounds.values()) > 0
        m = scrape(port)
        rounds = sum(v for (name, labels), v in m.items() if name == "specdraft_arm_rounds_total")
        assert rounds == 3 * 6
        assert ("specdraft_arm_tokens_per_second", (("arm", "both:8"),)) in m
    finally:
        assert s.stop() == 0
