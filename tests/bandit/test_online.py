"""The online-learning pieces: the feedback buffer's cap, updates that touch only the drafter's
trainable weights, bit-for-bit rollback, the bandit's statistics, and a simulated deployment where
updates cost more than they gain, from which the bandit must learn to stop updating."""

import random
from dataclasses import replace

import pytest
import torch

from bandit.online import BanditConfig, CostAwareBandit, FeedbackBuffer, OnlineAdapter, paired_gain
from proto.interface import Feedback, VerifierUpdate
from tests.tiny import tiny_specblock

D, V = 64, 200


def update(n_tokens: int, n_hidden: int, rng: random.Random) -> VerifierUpdate:
    return VerifierUpdate(
        [rng.randrange(V) for _ in range(n_tokens)], None, 8, V, torch.randn(n_hidden, D) if n_hidden else None
    )


def test_the_buffer_never_exceeds_its_cap_and_drops_the_oldest_rows():
    rng = random.Random(0)
    shared = FeedbackBuffer(cap=50, shared=True)
    mine = FeedbackBuffer(cap=50, shared=False)
    for step in range(200):
        sess = f"s{step % 3}"
        first = sess not in shared.sessions
        up = update(12 if first else 3, 11 if first else 3, rng)
        shared.add(sess, up)
        mine.add(sess, up)
        assert shared.positions() <= 50
        assert all(mine.positions(s) <= 50 for s in mine.sessions)
    assert shared.positions() == 50 and mine.positions() == 150
    # rows stay aligned with their tokens: each session keeps one token more than it has feature rows
    for buf in (shared, mine):
        for s in buf.sessions.values():
            assert len(s["tokens"]) == (0 if s["hidden"] is None else len(s["hidden"])) + 1
    mine.end("s0")
    shared.end("s0")
    assert "s0" not in mine.sessions and "s0" in shared.sessions  # a shared buffer outlives its sessions


def test_conversations_use_the_committed_next_token_as_the_target_choice():
    buf = FeedbackBuffer(cap=100, shared=True)
    buf.add("a", VerifierUpdate([1, 2, 3, 4], None, 8, V, torch.randn(3, D)))  # prompt: 4 tokens, 3 rows
    buf.add("a", VerifierUpdate([5, 6], None, 8, V, torch.randn(2, D)))
    (conv,) = buf.conversations()
    assert conv["tokens"].tolist() == [1, 2, 3, 4, 5]
    assert conv["topk_ids"][:, 0].tolist() == [2, 3, 4, 5, 6]
    assert conv["loss_mask"].tolist() == [0, 0, 0, 1, 1]  # predicting the prompt's own tokens is not learned


def test_conversations_carry_the_targets_top_k_where_the_verifier_sent_it():
    buf = FeedbackBuffer(cap=100, shared=True)
    buf.add("a", VerifierUpdate([1, 2, 3, 4], None, 8, V, torch.randn(3, D)))
    # the tree's node 0 (token 5) was accepted, then the bonus 6; rows: after token 4 (node -1), after 5 (node 0)
    fb = Feedback([0], {}, {-1: ([5, 9, 7], [0.6, 0.3, 0.1]), 0: ([6, 8, 2], [0.5, 0.4, 0.1]), 3: ([1], [1.0])})
    buf.add("a", VerifierUpdate([5, 6], fb, 8, V, torch.randn(2, D)))
    (conv,) = buf.conversations()
    assert conv["topk_ids"].tolist() == [[2, 0, 0], [3, 0, 0], [4, 0, 0], [5, 9, 7], [6, 8, 2]]
    assert torch.allclose(conv["topk_probs"][3:].float(), torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]]), atol=1e-3)
    assert conv["topk_probs"][:3, 1:].abs().sum() == 0  # no top-k: the committed token, one-hot


def test_the_buffer_keeps_what_was_drafted_at_each_verified_row_and_whether_it_was_accepted():
    from proto.tree import DraftTree

    buf = FeedbackBuffer(cap=100, shared=True)
    buf.add("a", VerifierUpdate([1, 2, 3, 4], None, 8, V, torch.randn(3, D)))
    # roots 5 and 7; 5 -> 6 and 9. Node 0 (5) accepted, then the bonus 8 (neither 6 nor 9)
    tree = DraftTree((5, 7, 6, 9), (-1, -1, 0, 0), V, 8)
    buf.add("a", VerifierUpdate([5, 8], Feedback([0], {}), 8, V, torch.randn(2, D)), tree)
    assert buf.sessions["a"]["drafted"] == [None, None, None, ((5, 7), True), ((6, 9), False)]
    assert buf.acceptance() == 0.5
    buf.cap = 4
    buf._evict("a")  # rows stay aligned when the oldest go
    assert buf.sessions["a"]["drafted"] == [None, None, ((5, 7), True), ((6, 9), False)]


def fed_adapter(cfg: BanditConfig, m=None, rounds: int = 40, clock=None) -> OnlineAdapter:
    """An adapter fed `rounds` rounds of session "a"; its updates run on the caller's thread (deterministic)."""
    rng = random.Random(1)
    kw = {"clock": clock} if clock else {}
    ad = OnlineAdapter(m if m is not None else tiny_specblock(), cfg, background=False, **kw)
    for r in range(rounds):
        ad.observe("a", update(30 if r == 0 else 4, 29 if r == 0 else 4, rng), first=r == 0)
    return ad


@pytest.mark.parametrize("verdict", [False, True])
def test_an_update_changes_only_the_drafters_trainable_weights_and_a_rolled_back_one_nothing(verdict, monkeypatch):
    m = tiny_specblock()
    frozen = {k: v.clone() for k, v in m.named_buffers()}
    ad = fed_adapter(BanditConfig(enabled=True, arms=[4], decide_every=10_000, guard_positions=16), m)
    train = ad.train
    monkeypatch.setattr(ad, "train", lambda *a: train(*a) | {"rolled_back": verdict})  # both verdicts, for sure
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    ad.start(4)  # trained and landed before it returns (the fed adapter's updates run on this thread)
    result = ad.last
    assert "guard_top1" in result and result["rolled_back"] == verdict
    changed = [k for k, v in m.named_parameters() if not torch.equal(v, before[k])]
    if verdict:
        assert not changed and m.version == 0 and ad.opt_state is None and ad.rollbacks == 1
    else:  # a kept update tells sessions to recompute, and the next update goes on from its optimizer state
        assert changed and all(m.get_parameter(k).requires_grad for k in changed) and m.version == 1
        assert ad.opt_state is not None
    assert all(torch.equal(v, frozen[k]) for k, v in m.named_buffers())  # embedding, draft head, rope: untouched


def test_a_background_update_trains_a_copy_and_lands_only_at_the_next_round(monkeypatch):
    m = tiny_specblock()
    ad = fed_adapter(BanditConfig(enabled=True, arms=[4], decide_every=10_000, guard_positions=16), m)
    train = ad.train
    monkeypatch.setattr(ad, "train", lambda *a: train(*a) | {"rolled_back": False})
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    ad.background = True
    ad.start(4)
    ad.running.join()  # trained, not landed: the drafting model is untouched until the next observe
    assert ad.done is not None and m.version == 0
    assert all(torch.equal(v, before[k]) for k, v in m.named_parameters())
    ad.observe("a", update(2, 2, random.Random(5)), first=False)
    assert m.version == 1 and ad.updates == 1 and ad.running is None and ad.charged_s > 0
    assert any(not torch.equal(v, before[k]) for k, v in m.named_parameters())


def test_the_guard_holds_out_the_newest_generated_rows_across_sessions():
    ad = OnlineAdapter(tiny_specblock(), BanditConfig(enabled=True, guard_positions=12, decide_every=10_000))
    rng = random.Random(0)
    for sess, gen in (("a", 20), ("b", 8)):  # prompts of 10 tokens (9 rows), then gen generated rows each
        ad.observe(sess, update(10, 9, rng), first=True)
        ad.observe(sess, update(gen, gen, rng), first=False)
    train, guard = ad.split()
    # b's 8 generated rows, then a's last 4; prompt rows never (they are not scored)
    assert [len(g["tokens"]) for g in guard] == [8, 4] and all(bool(g["loss_mask"].all()) for g in guard)
    (a_rest,) = train  # b has nothing left to learn from; a keeps its prompt and first 16 generated rows
    assert len(a_rest["tokens"]) == 9 + 16 and int(a_rest["loss_mask"].sum()) == 16


def test_the_credited_gain_is_the_paired_lower_confidence_bound():
    before = torch.zeros(100, dtype=torch.bool)
    after = before.clone()
    after[:10] = True  # 10 rows gained, none lost
    assert paired_gain(before, after, 1.64) == pytest.approx((10 - 1.64 * 10**0.5) / 100)
    after[:10], before[10:12], after[10], after[90:93] = False, True, True, True  # 3 gained, 1 lost, 1 held
    assert paired_gain(before, after, 1.64) == 0.0  # within noise: no credit
    assert paired_gain(before, after, 0.0) == pytest.approx(0.02)


def test_ucb_statistics_follow_the_discounted_formulas():
    b = CostAwareBandit([0, 4, 16], "ucb", exploration=1.0, discount=0.5)
    assert [b.choose() for _ in range(1)] == [0]  # untried arms first, in order
    b.record(0, 10.0)
    assert b.choose() == 1
    b.record(1, 20.0)
    assert b.n == [0.5, 1.0, 0.0] and b.sum == [5.0, 20.0, 0.0]
    assert b.choose() == 2
    b.record(2, 4.0)
    assert b.n == [0.25, 0.5, 1.0] and b.sum == [2.5, 10.0, 4.0]
    # UCB: mean + scale * sqrt(2 ln N / n), scale = the largest mean (20)
    import math

    total = 1.75
    score = [m + 20 * math.sqrt(2 * math.log(total) / n) for m, n in zip([10.0, 20.0, 4.0], [0.25, 0.5, 1.0])]
    assert b.choose() == max(range(3), key=lambda i: score[i])


@pytest.mark.parametrize("algorithm", ["ucb", "thompson"])
def test_the_bandit_is_deterministic_for_a_seed(algorithm):
    """Arms close enough (3 tok/s apart, noise 10) that both algorithms keep choosing among them: the
    same seed repeats the choices exactly, and Thompson's draws come from its seed."""

    def run(seed):
        b, rng, picks = CostAwareBandit([0, 4, 16], algorithm, exploration=1.0, seed=seed), random.Random(0), []
        for _ in range(60):
            arm = b.choose()
            picks.append(arm)
            b.record(arm, 100 - 3 * arm + rng.gauss(0, 10))
        return picks

    picks = run(3)
    assert picks == run(3)
    assert picks[:3] == [0, 1, 2] and len(set(picks[3:])) >= 2, picks  # not one arm after the first tries
    if algorithm == "thompson":
        assert run(4) != picks


class SimulatedDeployment:
    """A fake serving process: each window of rounds commits tau tokens per round at a fixed round time;
    an update of s steps costs s * step_s seconds of the same clock and raises tau by gain_per_step *
    s (with diminishing returns), so the bandit's reward is the tokens/s that really results."""

    def __init__(self, step_s: float, gain_per_step: float, seed: int = 0):
        self.t, self.tau, self.step_s, self.gain = 0.0, 1.5, step_s, gain_per_step
        self.rng = random.Random(seed)

    def clock(self) -> float:
        return self.t

    def window(self, rounds: int) -> int:
        self.t += rounds * 0.05 * self.rng.uniform(0.95, 1.05)
        return round(rounds * self.tau)


def simulate(step_s: float, gain: float, algorithm: str, decisions: int = 300) -> list[int]:
    env = SimulatedDeployment(step_s, gain)
    b = CostAwareBandit([0, 4, 16], algorithm, seed=0)
    arms, start, tokens, arm = [], env.clock(), 0, None
    for _ in range(decisions):
        tokens = env.window(64)
        if arm is not None:
            b.record(arm, tokens / (env.clock() - start))
        arm = b.choose()
        arms.append(b.arms[arm])
        start = env.clock()
        env.t += b.arms[arm] * step_s  # the update's wall time
        env.tau = min(env.tau + gain * b.arms[arm], 4.0)  # what it buys, capped
    return arms


@pytest.mark.parametrize("algorithm", ["ucb", "thompson"])
def test_the_bandit_stops_updating_when_updates_cost_more_than_they_gain(algorithm):
    arms = simulate(step_s=0.4, gain=0.0, algorithm=algorithm)
    late = arms[len(arms) // 2 :]
    assert sum(a > 0 for a in late) / len(late) <= 0.15, late
    # and a control: when updates pay (cheap, and each one lifts tau), it does update early on
    paying = simulate(step_s=0.01, gain=0.02, algorithm=algorithm)
    assert sum(a > 0 for a in paying[:30]) >= 10


def test_the_adapter_decides_every_window_and_reports_it():
    t = [0.0]

    def clock():
        t[0] += 0.01
        return t[0]

    cfg = BanditConfig(enabled=True, arms=[0, 2], decide_every=10, guard_positions=16, window_positions=32)
    ad = fed_adapter(cfg, rounds=40, clock=clock)
    s = ad.stats()
    assert s["decisions"] == 4 and s["updates"] >= 1 and s["buffer_positions"] == 29 + 39 * 4
    assert set(s["arms"]) == {"arm0", "arm2"}


def test_a_kept_update_is_credited_with_its_guard_measured_gain_over_the_horizon():
    """Reward = the next window's tokens/s x (1 + horizon x relative gain); the gain is the guard's credited
    (lower-bound) top-1 gain relative to its level before, times (tau - 1) / tau, and nothing for an update
    the guard rolled back."""
    t = [0.0]
    ad = OnlineAdapter(
        tiny_specblock(),
        BanditConfig(enabled=True, arms=[4], decide_every=10, horizon=8, discount=1.0, guard_positions=8),
        clock=lambda: t[0],
        background=False,
    )
    verdicts = iter(
        [
            {"guard_top1": [0.2, 0.26], "gain_lcb": 0.05, "rolled_back": False},
            {"guard_top1": [0.2, 0.3], "gain_lcb": 0.08, "rolled_back": True},
            {"guard_top1": [0.2, 0.2], "gain_lcb": 0.0, "rolled_back": False},
        ]
    )
    ad.train = lambda *a: next(verdicts) | {"params": {}, "opt_state": {}, "seconds": 0.0, "cpu_s": 0.0}
    rng = random.Random(0)
    for r in range(30):  # one second per round; 2 tokens per round after the prompt: tau 2, 2 tok/s
        t[0] += 1.0
        ad.observe("a", update(10 if r == 0 else 2, 9 if r == 0 else 2, rng), first=r == 0)
    assert ad.last["gain"] == 0.0 and ad.last["tau"] == 2.0
    # decision 2 rewards update 1 (kept, +0.05 / 0.2 = 25% agreement -> +12.5% throughput, 8 windows):
    # 2 x (1 + 8 x 0.125);
    # decision 3 rewards update 2 (rolled back): the window's 2 tok/s alone
    assert ad.bandit.n == [2.0] and ad.bandit.sum == [pytest.approx(4.0 + 2.0)]


def test_a_policy_clock_runs_only_while_its_policy_decodes(monkeypatch):
    from types import SimpleNamespace

    from specdraft import experiment
    from specdraft.experiment import PolicyClock

    now = [100.0]  # a fake perf_counter: the test moves time, no sleeping, no timing tolerance
    monkeypatch.setattr(experiment, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    c = PolicyClock()
    assert c() == 0.0
    c.start()
    now[0] += 2.0
    assert c() == 2.0  # running: counts up to now
    assert c.stop() == 2.0 and c() == 2.0
    now[0] += 5.0  # another policy's turn: not counted
    assert c() == 2.0
    c.start()
    now[0] += 1.0
    assert c() == 3.0 and c.stop() == 1.0 and c() == 3.0


@pytest.mark.model
def test_a_sidecar_with_the_bandit_learns_between_rounds_and_reports_it(model_path, tmp_path):
    """A real sidecar process serving an (untrained) SpecBlock drafter of SmolLM2's shape, bandit on:
    sessions keep getting valid trees while it decides and updates, and GetStats shows it."""
    from drafter.specblock import SpecBlock, SpecBlockConfig
    from drafter.train import TrainConfig, save
    from proto import drafter_pb2 as pb
    from proto import drafter_pb2_grpc as pb_grpc
    from specdraft.assets import target_embedding
    from specdraft.serve import spawn
    from verifier.remote import RemoteConfig, RemoteDrafter, connect

    args, emb = target_embedding(model_path)
    torch.manual_seed(0)
    cfg = SpecBlockConfig(draft_vocab=512)
    save(SpecBlock(cfg, args, emb, torch.arange(512)), TrainConfig(model=cfg), {}, tmp_path / "ckpt")
    yaml = tmp_path / "sidecar.yaml"
    yaml.write_text(
        f"drafter: {{kind: specblock, specblock: {{checkpoint: {tmp_path / 'ckpt'}}}, bandit: "
        "{enabled: true, arms: [0, 2], decide_every: 8, guard_positions: 4, window_positions: 64}}\n"
    )
    proc, address = spawn(str(yaml))
    try:
        conn = connect(RemoteConfig(address=address, timeout_ms=5000))
        rng = random.Random(0)
        for s in range(2):
            d = RemoteDrafter(conn, f"s{s}")
            toks = [rng.randrange(args.vocab_size) for _ in range(40)]
            assert d.draft(VerifierUpdate(toks, None, 8, args.vocab_size, torch.randn(39, args.dim))) is not None
            for _ in range(20):
                tree = d.draft(
                    VerifierUpdate([rng.randrange(args.vocab_size)], None, 8, args.vocab_size, torch.randn(1, args.dim))
                )
                assert tree is not None and len(tree) <= 8
            d.close()
            assert d.fallbacks == 0
        stats = pb_grpc.DrafterStub(conn.channel)

        async def get_stats():  # a grpc.aio call is made on the running loop (no loop outside it)
            return await stats.GetStats(pb.StatsRequest(), timeout=5)

        got = conn.run(get_stats())
        b = dict(got.bandit)
        # decisions wait while an update trains in the background, so there are at most 42 // 8 of them
        assert 2 <= b["decisions"] <= 42 // 8 and b["updates"] + b["updating"] >= 1 and "arm2_pulls" in b, b
        assert b["buffer_positions"] == 2 * (39 + 20)
        assert not got.errors
        conn.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


@pytest.mark.model
def test_the_experiment_runs_every_policy_on_the_same_stream_and_plots_it(model_path, tmp_path, monkeypatch):
    """The experiment's plumbing on the real target with an untrained drafter (its speeds mean nothing
    here): every policy decodes the same requests (each fixed arm its own policy), all equal plain
    decoding at temperature 0, the bandits' rounds are counted per arm, and the plot draws each policy's
    cumulative tokens/s and the bandits' regret from the report's rows."""
    import matplotlib.figure

    from drafter.specblock import SpecBlock, SpecBlockConfig
    from drafter.train import TrainConfig, save
    from specdraft.assets import target_embedding
    from specdraft.config import load_config
    from specdraft.experiment import regret_curve, run_experiment

    args, emb = target_embedding(model_path)
    torch.manual_seed(0)
    sb = SpecBlockConfig(draft_vocab=512)
    save(SpecBlock(sb, args, emb, torch.arange(512)), TrainConfig(model=sb), {}, tmp_path / "ckpt")
    cfg = load_config("configs/experiment.yaml", "experiment")
    cfg.drafter.specblock.checkpoint = str(tmp_path / "ckpt")
    cfg.drafter.bandit = replace(cfg.drafter.bandit, decide_every=4, guard_positions=4, window_positions=64)
    cfg.experiment = replace(
        cfg.experiment,
        stream=["mt_bench:1", "humaneval"],
        prompts_per_segment=[1, 1],
        interleaved=2,
        max_new_tokens=12,
        output=str(tmp_path / "out"),
    )
    saved, savefig = [], matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kw):  # the figure the plot saves, to read its curves back
        saved.append(fig)
        return savefig(fig, *args, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    report = run_experiment(cfg)
    runs, summary = report["runs"], report["summary"]
    assert list(runs) == ["ar", "both:8", "lookup:8", "both:4", "bandit", "bandit+updates"]
    ids = {p: [r["id"] for r in run["rows"]] for p, run in runs.items()}
    assert all(i == ids["ar"] for i in ids.values()) and len(ids["ar"]) == 4
    assert [r["segment"] for r in runs["ar"]["rows"]] == ["mt_bench:1", "humaneval", "mixed", "mixed"]
    assert all(summary["policies"][p]["equals_ar"] for p in runs if p != "ar")
    for p in ("bandit", "bandit+updates"):
        rounds = sum(sum(r["pulls"].values()) for r in runs[p]["rows"])
        assert rounds > 0 and sum(summary["policies"][p]["arm_share"].values()) == pytest.approx(1.0)
    assert runs["bandit"]["adapter"] is None and runs["bandit+updates"]["adapter"]["decisions"] >= 1
    assert summary["best_fixed"] in ("both:8", "lookup:8", "both:4") and summary["default_arm"] == "both:8"
    # at temperature 0 every arm commits the same tokens, so choosing in hindsight never loses to a fixed arm
    best_fixed = summary["policies"][summary["best_fixed"]]["tokens_per_s"]
    assert summary["oracles"]["per_request"] >= summary["oracles"]["per_client"] >= best_fixed * (1 - 1e-9)
    assert (tmp_path / "out" / "experiment.png").is_file() and len(saved) == 1
    speed_panel, regret_panel = saved[0].axes
    best = summary["policies"][summary["best_fixed"]]["tokens_per_s"]
    for panel, policies, value in (
        (speed_panel, list(runs), lambda rows: [cumulative_tokens_per_s(rows, i) for i in range(len(rows))]),
        (regret_panel, ["bandit", "bandit+updates"], lambda rows: regret_curve(rows, best)),
    ):
        curves = {line.get_label(): line for line in panel.lines if not line.get_label().startswith("_")}
        assert set(curves) == set(policies)
        for policy in policies:
            rows = runs[policy]["rows"]
            assert list(curves[policy].get_xdata()) == list(range(1, len(rows) + 1))
            assert list(curves[policy].get_ydata()) == pytest.approx(value(rows))


def cumulative_tokens_per_s(rows: list[dict], i: int) -> float:
    return sum(r["tokens"] for r in rows[: i + 1]) / sum(r["wall_s"] for r in rows[: i + 1])
