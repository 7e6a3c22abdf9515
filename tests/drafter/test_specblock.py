"""SpecBlock's structure: no position sees a later one (neither through the context nor through the
layer-wise shift), incremental inference reproduces the training forward, the valid-prefix mask stops
at the first miss, trees respect the budget, sampled trees have the delayed-expansion shape and draw
each sibling group from the q they carry, and a short training run lowers the loss."""

import heapq
import json
import random
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from drafter.specblock import ContextCache, SpecBlock, Starts, drive
from drafter.specblock_draft import SpecBlockDraftConfig, SpecBlockDrafter
from drafter.train import TrainConfig, evaluate_checkpoint, train, valid_prefix
from proto.interface import SamplingParams, VerifierUpdate
from tests.stats import chi_square_p_value
from tests.tiny import ARGS, CFG, tiny_specblock


def test_no_block_position_sees_a_later_one():
    m = tiny_specblock()
    feats, toks = torch.randn(10, 64), torch.randint(0, 200, (10,))
    with torch.no_grad():
        base = m.forward_train(feats, toks)
        for j in range(1, CFG.block_size):
            m.block_emb.data[j - 1] += 1.0  # perturb the input of block position j+1 (0-based j)
            out = m.forward_train(feats, toks)
            # unchanged up to float rounding of the batched products (~1e-6); a leak would move it by ~1
            assert torch.allclose(out[:j], base[:j], atol=1e-5) and not torch.allclose(out[j], base[j], atol=0.1)
            m.block_emb.data[j - 1] -= 1.0
        s = 5  # nothing after a block's start reaches it through the context
        f2, t2 = feats.clone(), toks.clone()
        f2[s + 1 :] += 1.0
        t2[s + 2 :] = 7
        assert torch.allclose(m.forward_train(f2, t2)[:, : s + 1], base[:, : s + 1], atol=1e-5)


def test_without_the_shift_block_positions_are_independent_parallel_heads():
    m = tiny_specblock(shift=False)
    feats, toks = torch.randn(10, 64), torch.randint(0, 200, (10,))
    assert not any(name.endswith("shift.weight") for name in m.state_dict())
    with torch.no_grad():
        base = m.forward_train(feats, toks)
        for j in range(1, CFG.block_size):
            m.block_emb.data[j - 1] += 1.0  # moves position j+1 (0-based j) and no other
            out = m.forward_train(feats, toks)
            others = [i for i in range(CFG.block_size) if i != j]
            assert torch.allclose(out[others], base[others], atol=1e-5) and not torch.allclose(
                out[j], base[j], atol=0.1
            )
            m.block_emb.data[j - 1] -= 1.0


@pytest.mark.parametrize("conditioning", ["features", "tokens"])
def test_incremental_inference_equals_the_training_forward(conditioning):
    m = tiny_specblock(conditioning=conditioning)
    feats, toks = torch.randn(12, 64), torch.randint(0, 200, (12,))
    with torch.no_grad():
        ref = m.forward_train(feats, toks)  # [K, 11, D]
        # conditioned on tokens, the target's features play no part
        assert torch.equal(m.forward_train(feats + 1, toks), ref) == (conditioning == "tokens")
        u = m.inputs(feats[:-1], toks[:-1], toks[1:])
        for s in (3, 8):  # the context up to s, appended in two parts
            cache = ContextCache(m)
            m.extend([(cache, u[: s - 2])])
            m.extend([(cache, u[s - 2 : s + 1])])
            states = m.draft_blocks([Starts(cache, u[s][None], torch.tensor([s]))])[0].states[:, 0]
            assert torch.allclose(states, ref[:, s], atol=1e-5)
        # an inherited start that is not in the cache brings its own keys and values: same result; and a
        # chain of inherited starts, each attending to its ancestors' keys and values (the drafted starts
        # in the slots after the context), equals the context stream when their inputs are the true ones:
        # inheritance = drafting the path sequentially
        cache = ContextCache(m)
        m.extend([(cache, u[:6])])
        for s in (6, 7, 8, 9):
            seen = torch.ones(1, s - 6, dtype=torch.bool)  # every earlier drafted start is an ancestor
            states = m.draft_blocks([Starts(cache, u[s][None], torch.tensor([s]), seen)])[0].states
            assert torch.allclose(states[:, 0], ref[:, s], atol=1e-5), s
        assert cache.length == 6  # drafted starts are scratch after the context
        # batched (EAGLE-2's per-depth expansion): starts 7 and 9 in one forward after the drafted starts
        # 6, 7, 8, each seeing only its own ancestors
        seen = torch.tensor([[True, False, False], [True, True, True]])
        states = m.draft_blocks([Starts(cache, u[[7, 9]], torch.tensor([7, 9]), seen)])[0].states
        assert torch.allclose(states[:, 0], ref[:, 7], atol=1e-5) and torch.allclose(states[:, 1], ref[:, 9], atol=1e-5)


class Counted:
    """A SpecBlockDrafter whose block forwards (drafter.specblock.Forward, op draft_blocks) are recorded in
    .calls."""

    def __init__(self, drafter: SpecBlockDrafter):
        self.drafter, self.calls = drafter, []

    def draft(self, update: VerifierUpdate):
        return drive(self.drafter.draft_steps(update), self._run)

    def _run(self, f):
        if f.op == "draft_blocks":
            self.calls.append(f)
        return f.run()

    def __getattr__(self, name):
        return getattr(self.drafter, name)


def test_one_forward_over_several_sessions_drafts_what_each_would_alone():
    """The sidecar's batched forward (drafter/batch.py): blocks of three sessions with different context
    lengths, one of them from inherited starts that see different ancestors, in one forward, equal
    each session's own forward up to float rounding."""
    m = tiny_specblock()
    torch.manual_seed(1)
    batch = []
    for n, seen in ((5, None), (9, torch.tensor([[True, False], [True, True]])), (3, None)):
        cache = ContextCache(m)
        m.extend([(cache, torch.randn(n, 64))])
        if seen is None:
            batch.append(Starts(cache, torch.randn(1, 64), torch.tensor([n - 1])))
        else:  # two drafted starts already in the slots after the context, then two new ones
            m.draft_blocks([Starts(cache, torch.randn(2, 64), torch.tensor([n, n + 1]), torch.zeros(2, 0, dtype=bool))])
            batch.append(Starts(cache, torch.randn(2, 64), torch.tensor([n + 1, n + 2]), seen))
    alone = [m.draft_blocks([s])[0] for s in batch]
    together = m.draft_blocks(batch)
    for a, b in zip(alone, together):
        assert a.states.shape == b.states.shape and a.logits.shape == b.logits.shape
        assert torch.allclose(a.states, b.states, atol=1e-5) and torch.allclose(a.logits, b.logits, atol=1e-4)
    assert not torch.allclose(together[0].states, together[2].states[:, :1], atol=1e-3)  # each its own context


def test_valid_prefix_mask_stops_at_the_first_miss():
    hit = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)  # [K=4, T=4]
    want = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1], [0, 1, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(valid_prefix(hit), want)


@pytest.mark.parametrize("tree", ["best_first", "frontier"])
@pytest.mark.parametrize("budget,max_blocks", [(1, 1), (8, 1), (16, 3), (40, 6)])
def test_trees_respect_budget_and_block_limit(budget, max_blocks, tree):
    m = tiny_specblock()
    d = Counted(SpecBlockDrafter(m, SpecBlockDraftConfig(max_blocks=max_blocks, max_branch=3, tree=tree)))
    calls = d.calls
    prompt = [random.Random(i).randrange(200) for i in range(9)]
    tree = d.draft(VerifierUpdate(prompt, None, budget, 200, torch.randn(8, 64)))
    assert tree is not None and 1 <= len(tree) <= budget and len(calls) <= max_blocks
    assert all(40 <= t < 160 for t in tree.tokens)  # only draft-vocabulary tokens
    calls.clear()
    tree2 = d.draft(VerifierUpdate([5, 6], None, budget, 200, torch.randn(2, 64)))  # the next round
    assert tree2 is not None and len(tree2) <= budget and d.cache.length == 10


def test_min_prob_keeps_exactly_the_nodes_above_it(monkeypatch):
    m = tiny_specblock()
    prompt = [random.Random(i).randrange(200) for i in range(9)]
    hidden = torch.randn(8, 64)
    probs = []  # path probability of each node, in the order the best-first builder takes them
    pop = heapq.heappop
    monkeypatch.setattr(heapq, "heappop", lambda h: probs.append(-h[0][0]) or pop(h))
    full = SpecBlockDrafter(m, SpecBlockDraftConfig(max_blocks=2, max_branch=3)).draft(
        VerifierUpdate(prompt, None, 16, 200, hidden)
    )
    monkeypatch.setattr(heapq, "heappop", pop)
    assert len(probs) == len(full) == 16
    cut = sorted(probs)[len(probs) // 2]
    part = SpecBlockDrafter(m, SpecBlockDraftConfig(max_blocks=2, max_branch=3, min_prob=cut)).draft(
        VerifierUpdate(prompt, None, 16, 200, hidden)
    )
    keep = [i for i, p in enumerate(probs) if p >= cut]  # best-first order: the kept nodes are the first ones
    assert keep == list(range(len(keep))) and part.tokens == full.tokens[: len(keep)]
    nothing = SpecBlockDrafter(m, SpecBlockDraftConfig(max_blocks=2, max_branch=3, min_prob=max(probs) + 1e-6))
    assert nothing.draft(VerifierUpdate(prompt, None, 16, 200, hidden)) is None


def test_drafter_lookup_puts_the_prompt_lookup_chain_before_the_specblock_tree():
    from drafter.hybrid import HybridConfig
    from drafter.ngram import NgramConfig
    from specdraft.build import DrafterConfig, make_drafter

    cfg = DrafterConfig(
        kind="specblock",
        lookup="ngram",
        hybrid=HybridConfig(rank="source_order"),
        ngram=NgramConfig(max_depth=3, max_matches=1),
        specblock=SpecBlockDraftConfig(max_blocks=1, max_branch=1),
    )
    m = tiny_specblock(conditioning="tokens")
    prompt = [50, 51, 52, 53, 54, 50, 51]  # (50, 51) occurred before, followed by 52 53 54
    tree = make_drafter(cfg, m).draft(VerifierUpdate(prompt, None, 8, 200))
    alone = SpecBlockDrafter(m, cfg.specblock).draft(VerifierUpdate(prompt, None, 8, 200))
    assert tree.tokens == (52, 53, 54) + alone.tokens and tree.parents[:3] == (-1, 0, 1)
    assert make_drafter(replace(cfg, lookup="none"), m).draft(VerifierUpdate(prompt, None, 8, 200)) == alone


def test_frontier_tree_expands_one_depth_per_batched_forward():
    """EAGLE-2 on a one-position model (EAGLE-style): every forward after the first starts the blocks of
    up to max_branch nodes of one depth at once, so a tree of depth D costs D forwards; the tree holds
    the most probable of all drafted nodes, each path probability the product along its path."""
    torch.manual_seed(0)
    m = SpecBlock(replace(CFG, block_size=1), ARGS, torch.randn(200, 64), torch.arange(40, 160)).eval()
    m.rank_head.bias.data[0] = 50.0  # the rank head says one candidate: EAGLE-2 takes max_branch anyway
    d = Counted(SpecBlockDrafter(m, SpecBlockDraftConfig(tree="frontier", max_blocks=4, max_branch=3)))
    prompt = [random.Random(i).randrange(200) for i in range(9)]
    tree = d.draft(VerifierUpdate(prompt, None, 10, 200, torch.randn(8, 64)))
    # the context block, then one forward per depth
    assert [f.items[0].u.shape[0] for f in d.calls] == [1, 3, 3, 3] and d.forwards == 4
    depth = [0] * len(tree)
    for i, p in enumerate(tree.parents):
        depth[i] = 1 if p < 0 else depth[p] + 1
    assert len(tree) == 10 and max(depth) <= 4 and all(p < i for i, p in enumerate(tree.parents))
    assert sum(p == -1 for p in tree.parents) <= 3 and max(depth) >= 2


def sampled_drafter(m, **cfg):
    d = Counted(SpecBlockDrafter(m, SpecBlockDraftConfig(tree="sampled", **cfg)))
    return d, d.calls


@pytest.mark.parametrize(
    "delay,branches,rollout,budget,max_blocks",
    [(0, 2, 4, 16, 8), (2, 3, 2, 16, 8), (3, 2, 4, 8, 8), (5, 2, 3, 4, 8), (1, 4, 6, 32, 2)],
)
def test_sampled_trees_have_the_delayed_expansion_shape(delay, branches, rollout, budget, max_blocks):
    m = tiny_specblock()
    d, calls = sampled_drafter(m, delay=delay, branches=branches, rollout=rollout, max_blocks=max_blocks)
    prompt = [random.Random(i).randrange(200) for i in range(9)]
    for new, hidden in ((prompt, torch.randn(8, 64)), ([5, 6], torch.randn(2, 64))):
        calls.clear()
        tree = d.draft(VerifierUpdate(new, None, budget, 200, hidden, SamplingParams(temperature=0.8)))
        assert len(tree) <= budget and len(calls) <= max_blocks
        kids = {i: [c for c, p in enumerate(tree.parents) if p == i] for i in range(-1, len(tree))}
        path_len = min(delay, budget)
        stem = [-1]
        while len(stem) <= path_len and len(kids[stem[-1]]) == 1:  # the single path of the delay
            stem.append(kids[stem[-1]][0])
        if max_blocks >= 8:  # forwards to spare: the whole shape is there
            assert len(stem) - 1 == path_len
            length = min(rollout, (budget - path_len) // branches)
            group = kids[stem[-1]] if length > 0 else []
            assert len(group) == (branches if length > 0 else 0)
            for child in group:  # each continuation is a path of `length` tokens
                n, node = 1, child
                while kids[node]:
                    assert len(kids[node]) == 1
                    node, n = kids[node][0], n + 1
                assert n == length
        q = tree.draft_probs
        for row in range(len(tree) + 1):  # a row with children is a distribution; the others are zeros
            assert (abs(float(q[row].sum()) - 1) < 1e-4) if kids[row - 1] else float(q[row].abs().sum()) == 0
            assert not kids[row - 1] or bool((q[row][:40] == 0).all() and (q[row][160:] == 0).all())


@pytest.mark.parametrize("temperature", [5.0, 8.0])  # the random tiny model is peaked: flatten it to ~50-100 cells
def test_a_sampled_sibling_group_is_iid_from_the_q_it_carries(temperature):
    """The multi-draft rules are exact only if each sibling group really is i.i.d. from its row: 3000
    groups of 2 roots from one context, chi-square against the carried row 0 (the drafter's q at the
    verifier's temperature); the same counts against q at 0.75x that temperature must fail (the test's power)."""
    m = tiny_specblock()
    d = SpecBlockDrafter(m, SpecBlockDraftConfig(tree="sampled", delay=0, branches=2, rollout=1))
    prompt = [random.Random(i).randrange(200) for i in range(9)]
    params = SamplingParams(temperature=temperature)
    first = d.draft(VerifierUpdate(prompt, None, 2, 200, torch.randn(8, 64), params))
    q = first.draft_probs[0].double()
    counts = {}
    for _ in range(3000):  # no new tokens: the same context, fresh draws
        tree = d.draft(VerifierUpdate([], None, 2, 200, torch.zeros(0, 64), params))
        assert torch.equal(tree.draft_probs[0], first.draft_probs[0])
        for tok in tree.tokens:
            counts[tok] = counts.get(tok, 0) + 1
    exact = {t: float(q[t]) for t in range(200) if q[t] > 0}
    assert chi_square_p_value(counts, exact) > 1e-4
    colder = (q[q > 0].log() / 0.75).softmax(-1)
    assert chi_square_p_value(counts, dict(zip(exact, colder.tolist()))) < 1e-4


def test_a_token_conditioned_drafter_needs_no_hidden_states():
    m = tiny_specblock(conditioning="tokens")
    d = SpecBlockDrafter(m, SpecBlockDraftConfig(max_blocks=2, max_branch=3))
    prompt = [random.Random(i).randrange(200) for i in range(9)]
    first = d.draft(VerifierUpdate(prompt, None, 8, 200))
    assert first is not None and d.cache.length == 8  # every prompt token but the newest is context
    assert d.draft(VerifierUpdate([5, 6], None, 8, 200)) is not None and d.cache.length == 10
    # and drafting from hidden states it ignores gives the same tree
    d2 = SpecBlockDrafter(m, SpecBlockDraftConfig(max_blocks=2, max_branch=3))
    assert d2.draft(VerifierUpdate(prompt, None, 8, 200, torch.randn(8, 64))) == first


@pytest.mark.parametrize("conditioning", ["features", "tokens"])
def test_a_session_recomputes_its_context_when_the_weights_change_under_it(conditioning):
    """An online update (bandit) changes the shared weights between rounds: a live session's next tree
    must equal that of a session that saw the same history with the new weights only."""
    m = tiny_specblock(conditioning=conditioning)
    m.version = 0  # as an online learner sets it
    rng = random.Random(0)
    ups = [
        VerifierUpdate([rng.randrange(200) for _ in range(n)], None, 8, 200, torch.randn(h, 64))
        for n, h in ((10, 9), (3, 3), (2, 2))
    ]
    live = SpecBlockDrafter(m, SpecBlockDraftConfig(max_blocks=2, max_branch=3))
    for up in ups[:2]:
        live.draft(up)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.version += 1
    fresh = SpecBlockDrafter(m, SpecBlockDraftConfig(max_blocks=2, max_branch=3))
    for up in ups[:2]:
        fresh.draft(up)
    n = live.cache.length
    stale_keys = live.cache.keys[:, :, :n].clone()
    assert live.draft(ups[2]) == fresh.draft(ups[2])
    assert not torch.equal(live.cache.keys[:, :, :n], stale_keys)  # it did recompute
    # a session keeps its features whether or not the weights can change: sliding past max_seq_len
    # re-encodes the kept context from them (at most max_seq_len rows: the slide drops the rest)
    frozen = SpecBlockDrafter(
        tiny_specblock(conditioning=conditioning), SpecBlockDraftConfig(max_blocks=2, max_branch=3)
    )
    frozen.draft(ups[0])
    assert (frozen.feats != []) == (live.feats != []) == (conditioning == "features")


@pytest.mark.parametrize("conditioning", ["features", "tokens"])
def test_a_session_past_max_seq_len_slides_and_holds_at_most_max_seq_len_rows(conditioning):
    """Past max_seq_len a session keeps its newest max_seq_len / 2 context positions, re-encoded from
    position 0 (from its kept features): its tree equals a fresh session's on just those, and the
    tokens and features it holds stay within max_seq_len rows however long it runs."""
    m = tiny_specblock(conditioning=conditioning)
    m.cfg = replace(m.cfg, max_seq_len=32)
    rng = random.Random(0)
    cfg = SpecBlockDraftConfig(tree="frontier", max_blocks=3, max_branch=3)
    live = SpecBlockDrafter(m, cfg)
    slid = 0
    for n in [10] + [5] * 12:  # 70 tokens: the context slides (at 25+ positions with 8-node trees) 3 times
        hidden = torch.randn(n - (live.cache.length == 0), 64)
        tree = live.draft(VerifierUpdate([rng.randrange(200) for _ in range(n)], None, 8, 200, hidden))
        assert live.cache.length + 8 <= 32 and len(live.tokens) <= 33
        assert sum(len(f) for f in live.feats) == (live.cache.length if conditioning == "features" else 0)
        if live.dropped > slid:  # it just slid: a fresh session on the kept window drafts the same tree
            slid = live.dropped
            kept = torch.cat(live.feats) if live.feats else None
            assert SpecBlockDrafter(m, cfg).draft(VerifierUpdate(live.tokens, None, 8, 200, kept)) == tree
    assert live.dropped >= 3 * 16


@pytest.mark.parametrize("conditioning", ["features", "tokens"])
def test_short_training_run_lowers_the_loss(tmp_path, conditioning):
    """Synthetic shards where the next token is a function of the current one: learnable in seconds."""
    g = torch.Generator().manual_seed(0)
    table = torch.randperm(200, generator=g)
    convs = []
    for _ in range(8):
        toks = [int(torch.randint(0, 200, (1,), generator=g))]
        for _ in range(47):
            toks.append(int(table[toks[-1]]))
        toks = torch.tensor(toks)
        nxt = torch.cat([toks[1:], table[toks[-1:]]])
        probs = torch.tensor([0.9, 0.05, 0.03, 0.02]).repeat(48, 1).half()
        ids = torch.stack([nxt, (nxt + 1) % 200, (nxt + 2) % 200, (nxt + 3) % 200], 1).int()
        convs.append(
            {
                "tokens": toks.int(),
                "loss_mask": torch.ones(48, dtype=torch.uint8),
                "hidden": torch.randn(48, 64, generator=g).bfloat16(),
                "topk_ids": ids,
                "topk_probs": probs,
            }
        )
    shard = {k: torch.cat([c[k] for c in convs]) for k in convs[0]}
    shard["offsets"] = torch.arange(0, 8 * 48 + 1, 48)
    save_file(shard, tmp_path / "train-00000.safetensors")
    save_file(
        {**{k: v[:48] for k, v in shard.items() if k != "offsets"}, "offsets": torch.tensor([0, 48])},
        tmp_path / "heldout-00001.safetensors",
    )
    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {
                "shards": [
                    {"file": "train-00000.safetensors", "split": "train"},
                    {"file": "heldout-00001.safetensors", "split": "heldout"},
                ]
            }
        )
    )
    cfg = TrainConfig(
        data_dir=str(tmp_path),
        out=str(tmp_path / "ck"),
        model=replace(CFG, conditioning=conditioning),
        steps=40,
        conversations_per_step=2,
        lr=3e-3,
        warmup=5,
        eval_every=40,
        max_positions=48,
    )
    torch.manual_seed(0)
    first = []
    emb = torch.randn(200, 64)
    metrics = train(cfg, ARGS, emb, progress=lambda m: first.append(m["train_loss"]))
    assert metrics["train_loss"] < 0.5 * first[0], (first[0], metrics["train_loss"])
    assert metrics["heldout"]["top1"][0] > 0.5  # position 1 learned the table
    assert (tmp_path / "ck" / "drafter.safetensors").is_file() and (tmp_path / "ck" / "state.pt").is_file()
    # the published (bf16) checkpoint, evaluated on its own, gives the held-out accuracy training reported
    again = evaluate_checkpoint(tmp_path / "ck", cfg, ARGS, emb)
    assert again["conversations"] == 1 and again["top1"] == pytest.approx(metrics["heldout"]["top1"], abs=0.1)
