"""drafter.suffix: matches of any length with weighted continuations, the shared store's scopes, its
bound, and what it learns from (committed output, never prompts)."""

from drafter.suffix import Occurrence, SuffixConfig, SuffixIndex, SuffixSession, suffix_candidates
from proto.interface import VerifierUpdate


def upd(tokens, max_nodes=16):
    return VerifierUpdate(tokens, None, max_nodes, vocab_size=100)


def paths(s):
    """Every node's root-to-node token path."""
    out = []
    for tok, par in zip(s.tokens, s.parents):
        out.append((out[par] if par >= 0 else ()) + (tok,))
    return out


def test_the_longest_match_decides_and_probabilities_are_weight_ratios():
    # the longest match (5 tokens) was followed by 7 8; a 2-token match by 9: weights 1 and 2^-3
    s = suffix_candidates([Occurrence(5, [7, 8]), Occurrence(2, [9])])
    assert s.feature == 5 and paths(s)[0] == (7,)
    probs = dict(zip(paths(s), s.probs))
    assert abs(probs[(7,)] - 1 / 1.125) < 1e-9 and abs(probs[(9,)] - 0.125 / 1.125) < 1e-9
    assert probs[(7, 8)] == 1.0
    assert all(p < i for i, p in enumerate(s.parents))


def test_a_session_matches_its_own_text_at_any_length():
    cfg = SuffixConfig(scope="session", min_match=2, max_match=8)
    sess = SuffixSession(cfg, None)
    text = [5, 1, 2, 3, 4, 6, 7, 9, 1, 2, 3, 4]  # "1 2 3 4" occurred before, followed by 6 7 9
    s = sess.scored(upd(text))
    assert s.feature == 4 and paths(s)[:3] == [(6,), (6, 7), (6, 7, 9)]
    assert sess.scored(upd([6], max_nodes=0)) is None  # 0 nodes: absorb only


def test_client_scope_never_shows_one_clients_text_to_another():
    cfg = SuffixConfig(scope="client")
    store = SuffixIndex(cfg, cfg.max_tokens)
    a = SuffixSession(cfg, store, client="a")
    a.scored(upd([1]))  # the prompt: never shared
    a.scored(upd([10, 11, 12, 13, 14]))  # committed output
    b = SuffixSession(cfg, store, client="b")
    assert b.scored(upd([0, 10, 11])) is None
    a2 = SuffixSession(cfg, store, client="a")
    assert paths(a2.scored(upd([0, 10, 11])))[0] == (12,)
    g = SuffixConfig(scope="global")
    shared = SuffixIndex(g, g.max_tokens)
    x, y = SuffixSession(g, shared, "a"), SuffixSession(g, shared, "b")
    x.scored(upd([1]))
    x.scored(upd([10, 11, 12]))
    assert paths(y.scored(upd([0, 10, 11])))[0] == (12,)


def test_prompts_never_enter_the_shared_store():
    cfg = SuffixConfig(scope="global")
    store = SuffixIndex(cfg, cfg.max_tokens)
    s = SuffixSession(cfg, store)
    s.scored(upd([1, 2, 3, 4, 5]))
    assert store.tokens == 0
    s.scored(upd([6, 7]))
    assert store.tokens == 2 and store.docs[s.shared_doc][1] == [6, 7]


def test_the_store_is_bounded_and_evicts_the_oldest_session_first():
    cfg = SuffixConfig(scope="global", max_tokens=10)
    store = SuffixIndex(cfg, cfg.max_tokens)
    sessions = []
    for i in range(4):
        s = SuffixSession(cfg, store)
        s.scored(upd([0]))
        s.scored(upd([100 + i, 1, 2, 3, 200 + i]))
        sessions.append(s)
    assert store.tokens <= 10 and sessions[0].shared_doc not in store.docs
    # the evicted session's continuation is gone from the index, a recent one's is found
    probe = SuffixSession(cfg, store)
    found = probe.scored(upd([9, 1, 2, 3]))
    assert {p[0] for p in paths(found) if len(p) == 1} == {
        200 + i for i in range(4) if sessions[i].shared_doc in store.docs
    }


def test_a_config_store_learns_only_from_its_own_speculative_output_in_order():
    """Eval integrity: one store per drafter row, fed by that row's sessions only; plain decoding (no
    drafter) of the same prompts adds nothing, and no prompt token enters it."""
    from specdraft.build import DrafterConfig, Shared, make_drafter
    from tests.fakes import FakeTarget
    from verifier.engine import generate
    from verifier.rules import SamplingParams

    cfg = DrafterConfig(kind="suffix", suffix=SuffixConfig(scope="global", min_match=1))
    shared, target, greedy = Shared(cfg), FakeTarget(5), SamplingParams()
    prompts = [[1, 2, 3], [3, 2, 1], [1, 2, 3]]
    outs = []
    for prompt in prompts:
        list(generate(target, prompt, greedy, 30, set()))  # the AR baseline of the same prompt
        d = make_drafter(cfg, None, shared)
        outs.append([t for s in generate(target, prompt, greedy, 30, set(), d, max_nodes=8) for t in s.tokens])
        d.close()
    docs = [t for _, t in shared.store.docs.values()]
    assert len(docs) == len(prompts)
    for doc, out in zip(docs, outs):  # every token after the first, up to the last step's (never sent)
        assert doc == out[1 : 1 + len(doc)] and len(doc) >= len(out) - 1 - 9
