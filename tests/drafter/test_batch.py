"""Batched drafting across sessions (drafter/batch.py): concurrent drafts' forwards run as one and draft
the trees each session would alone; a forward that fails fails the drafts of its batch and no other; a
cancelled draft leaves the others served; and through a real sidecar, concurrent SpecBlock sessions get
the trees an in-process drafter drafts, with /metrics counting batches of several drafts."""

import asyncio
import random
import threading

import pytest
import torch

from drafter.batch import Batcher
from drafter.specblock_draft import SpecBlockDraftConfig, SpecBlockDrafter
from proto import drafter_pb2 as pb
from proto.interface import VerifierUpdate
from proto.wire import tensor_to_msg
from tests.drafter.test_hostile import specblock_yaml
from tests.drafter.test_metrics import scrape
from tests.sidecar import AUTH, VOCAB, Sidecar, free_port
from tests.tiny import tiny_specblock


def updates(seed: int, rounds: int = 3) -> list[VerifierUpdate]:
    """A session's updates: a prompt, then a few tokens a round, with random features (tiny model)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out, n = [], 9 + seed % 5
    for r in range(rounds):
        toks = [rng.randrange(200) for _ in range(n if r == 0 else 1 + r % 3)]
        out.append(VerifierUpdate(toks, None, 12, 200, torch.randn(len(toks) - (r == 0), 64, generator=g)))
    return out


@pytest.mark.parametrize("tree", ["best_first", "frontier", "sampled"])
def test_concurrent_drafts_get_their_own_trees_from_shared_forwards(tree):
    m = tiny_specblock()
    cfg = SpecBlockDraftConfig(tree=tree, max_blocks=3, max_branch=3)
    sessions = [updates(i) for i in range(5)]

    def alone_trees(ups):
        d = SpecBlockDrafter(m, cfg)
        return [d.draft(u) for u in ups]

    alone = [alone_trees(ups) for ups in sessions]
    seen = []
    batcher = Batcher(max_rows=64, wait_s=0.05, on_batch=seen.append)

    async def session(ups):
        d = SpecBlockDrafter(m, cfg)
        return [await batcher.draft(d.draft_steps(u)) for u in ups]

    async def all_sessions():
        return await asyncio.gather(*(session(ups) for ups in sessions))

    together = asyncio.run(all_sessions())
    for a, b in zip(alone, together):
        for ta, tb in zip(a, b):
            assert ta.tokens == tb.tokens and ta.parents == tb.parents
            if tree == "sampled":
                assert torch.allclose(ta.draft_probs, tb.draft_probs, atol=1e-5)
    assert max(s.drafts for s in seen) == 5  # all five sessions' forwards ran as one at least once
    assert sum(s.drafts for s in seen) > len(seen)  # and batches were not all of one


def test_a_failing_forward_fails_its_batch_only_and_a_cancelled_draft_leaves_the_rest():
    m = tiny_specblock()
    cfg = SpecBlockDraftConfig(max_blocks=2, max_branch=2)
    batcher = Batcher(max_rows=64, wait_s=0.05)
    good, bad, slow = (SpecBlockDrafter(m, cfg) for _ in range(3))
    for d, i in ((good, 0), (bad, 1), (slow, 2)):
        d.draft(updates(i)[0])
    broken = updates(1)[1]
    broken.hidden = torch.randn(len(broken.new_tokens), 63)  # features one column short: encoding raises

    async def run():
        # bad and good encode together: both fail; then a new session drafts again
        results = await asyncio.gather(
            batcher.draft(good.draft_steps(updates(0)[1])),
            batcher.draft(bad.draft_steps(broken)),
            return_exceptions=True,
        )
        again = await batcher.draft(SpecBlockDrafter(m, cfg).draft_steps(updates(3)[0]))
        # a draft cancelled while its forward is pending: the batcher drops it and serves the rest
        cancelled = asyncio.ensure_future(batcher.draft(slow.draft_steps(updates(2)[1])))
        other = asyncio.ensure_future(batcher.draft(SpecBlockDrafter(m, cfg).draft_steps(updates(4)[0])))
        await asyncio.sleep(0)
        cancelled.cancel()
        return results, again, await other, batcher

    results, again, other, b = asyncio.run(run())
    assert all(isinstance(r, Exception) for r in results)
    assert again is not None and other is not None and b.drafts == 0 and not b.pending


def test_a_sidecar_batches_concurrent_specblock_sessions_and_drafts_their_own_trees(tmp_path):
    """Six sessions at once on the shipped SpecBlock (features): every tree equals the in-process
    drafter's for the same updates, and /metrics shows forwards that served several drafts."""
    from specdraft.assets import model_dir, target_embedding
    from specdraft.build import DrafterConfig, load_drafter_model, make_drafter
    from specdraft.config import read_config

    port = free_port()
    yaml = specblock_yaml("specblock-smollm2", tree="frontier")
    s = Sidecar(tmp_path, f"max_sessions: 8, metrics_port: {port}, batch_wait_ms: 20", other_yaml=yaml)
    try:
        (tmp_path / "c.yaml").write_text(yaml + "\n")
        dcfg: DrafterConfig = read_config(tmp_path / "c.yaml").drafter
        targs, emb = target_embedding(model_dir("smollm2-135m-instruct"))
        model = load_drafter_model(dcfg, targs, emb)
        g = torch.Generator().manual_seed(0)
        sessions = []
        for i in range(6):
            prompt = torch.randint(0, VOCAB, (20 + i,), generator=g).tolist()
            rounds = [(prompt, torch.randn(len(prompt) - 1, 576, generator=g))]
            rounds += [([7 + r, 9], torch.randn(2, 576, generator=g)) for r in range(3)]
            sessions.append(rounds)
        got = [None] * len(sessions)

        def client(i):
            msgs = []
            for r, (toks, hidden) in enumerate(sessions[i]):
                msg = pb.VerifierUpdate(round=r, new_tokens=toks, max_nodes=8, hidden=tensor_to_msg(hidden))
                if r == 0:
                    msg.vocab_size = VOCAB
                msgs.append(msg)
            got[i] = list(s.stub.Session(iter(msgs), metadata=AUTH, timeout=60))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(sessions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, rounds in enumerate(sessions):
            d = make_drafter(dcfg, model)
            want = [d.draft(VerifierUpdate(toks, None, 8, VOCAB, hidden)) for toks, hidden in rounds]
            assert [(tuple(r.tokens), tuple(r.parents)) for r in got[i]] == [(w.tokens, w.parents) for w in want]
        got = scrape(port)
        batches, drafts = got[("specdraft_batch_drafts_count", ())], got[("specdraft_batch_drafts_sum", ())]
        assert batches > 0 and drafts > batches  # some forward served more than one session's draft
    finally:
        assert s.stop() == 0
