"""The neural delay selector: features, training on traces (it must learn a rule a static d cannot
follow), the drafter's tracing and its use of the selector, and the train command's CLI."""

import json
import random
from dataclasses import replace

import pytest
import torch

from drafter.selector import SelectorTrainConfig, load_selector, step_features, train_selector
from drafter.specblock import SpecBlock
from drafter.specblock_draft import SpecBlockDraftConfig, SpecBlockDrafter
from proto.interface import Feedback, SamplingParams, VerifierUpdate
from specdraft.cli import main
from tests.tiny import ARGS, tiny_specblock


def test_features_summarise_the_block_and_the_history():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.25, 0.25]])
    f = step_features(probs, [1, 3, 0, 2, 4], committed=10)
    assert f.shape == (2 * 2 + 2,)
    assert torch.allclose(f[:2], torch.tensor([1.0, 0.5]))
    assert f[2] == pytest.approx(0.0, abs=1e-6) and f[3] == pytest.approx(1.0397, abs=1e-4)  # entropies
    assert f[4] == pytest.approx((3 + 0 + 2 + 4) / 4) and f[5] == pytest.approx(2.3979, abs=1e-4)


def synthetic_traces(n, seed=0):
    """Steps where the best delay depends on the first feature: confident drafter -> go deep (d = 3),
    unsure -> branch at the root (d = 0); the per-delay means are equal, so no static d wins."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        conf = rng.random()
        d = rng.choice([0, 1, 2, 3])
        mean = 1 + (2 * conf if d == 3 else 2 * (1 - conf) if d == 0 else 1.0)
        out.append(
            {
                "features": [conf] + [rng.random() for _ in range(9)],
                "delay": d,
                "accepted": max(0.0, mean + rng.gauss(0, 0.3)),
            }
        )
    return out


def test_training_learns_what_a_static_delay_cannot(tmp_path):
    cfg = SelectorTrainConfig(out=str(tmp_path / "sel"), steps=600, seed=0)
    metrics = train_selector(cfg, synthetic_traces(1500))
    assert metrics["heldout_mse"] < 0.5 * metrics["heldout_mse_per_delay_mean"]
    sel = load_selector(tmp_path / "sel")
    assert sel.delays == [0, 1, 2, 3]
    picks = [sel.choose(torch.tensor([c] + [0.5] * 9)) for c in (0.05, 0.1, 0.9, 0.95)]
    assert picks == [0, 0, 3, 3]


def test_training_refuses_traces_without_a_choice(tmp_path):
    one_delay = [dict(r, delay=1) for r in synthetic_traces(100)]
    with pytest.raises(ValueError, match="need >= 20 steps and >= 2 delays"):
        train_selector(SelectorTrainConfig(out=str(tmp_path / "sel")), one_delay)


def test_the_drafter_traces_random_delays_and_follows_the_selector(tmp_path, monkeypatch):
    m = tiny_specblock()
    d = SpecBlockDrafter(
        m, SpecBlockDraftConfig(tree="sampled", select="random", delays=[0, 2], branches=2, rollout=1, max_blocks=8)
    )
    params = SamplingParams(temperature=1.0)
    prompt = [random.Random(i).randrange(200) for i in range(9)]
    tree = d.draft(VerifierUpdate(prompt, None, 8, 200, torch.randn(8, 64), params))
    for _ in range(30):
        tree = d.draft(VerifierUpdate([5], Feedback([0], {}), 8, 200, torch.randn(2, 64)[:1], params))
        stem = 0  # the traced delay is the depth of the single path before the two-way branch
        while sum(p == stem - 1 for p in tree.parents) == 1:
            stem += 1
        assert stem == d.trace[-1]["delay"]
    assert [r["accepted"] for r in d.trace[:-1]] == [1] * 30 and "accepted" not in d.trace[-1]
    assert {r["delay"] for r in d.trace} == {0, 2} and all(len(r["features"]) == 2 * 4 + 2 for r in d.trace)

    train_selector(SelectorTrainConfig(out=str(tmp_path / "sel"), steps=10), synthetic_traces(100))
    neural = SpecBlockDrafter(
        m,
        SpecBlockDraftConfig(
            tree="sampled", select="neural", selector=str(tmp_path / "sel"), branches=2, rollout=1, max_blocks=8
        ),
    )
    monkeypatch.setattr(neural.selector, "choose", lambda feats: 3)
    tree = neural.draft(VerifierUpdate(prompt, None, 8, 200, torch.randn(8, 64), params))
    assert list(tree.parents[:3]) == [-1, 0, 1] and sum(p == 2 for p in tree.parents) == 2
    one = SpecBlock(replace(m.cfg, block_size=1), ARGS, m.embedding, m.draft_ids)  # features of another shape
    with pytest.raises(ValueError, match="selector: .* trained on a drafter with blocks of 4, this one has 1"):
        SpecBlockDrafter(one, SpecBlockDraftConfig(tree="sampled", select="neural", selector=str(tmp_path / "sel")))


def test_train_command_fits_a_selector_and_names_a_missing_trace(tmp_path, capsys):
    traces = tmp_path / "trace.jsonl"
    traces.write_text("".join(json.dumps(r) + "\n" for r in synthetic_traces(200)))
    cfg = tmp_path / "sel.yaml"
    cfg.write_text(f"train: {{kind: selector, selector: {{traces: [{traces}], out: {tmp_path / 'sel'}, steps: 50}}}}\n")
    assert main(["train", "--config", str(cfg)]) == 0
    assert (tmp_path / "sel" / "selector.safetensors").is_file()
    assert "heldout_mse" in capsys.readouterr().out
    cfg.write_text(f"train: {{kind: selector, selector: {{traces: [{tmp_path / 'none.jsonl'}]}}}}\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.selector.traces:" in err and "none.jsonl" in err, err
