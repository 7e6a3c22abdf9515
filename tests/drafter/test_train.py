"""Training state on disk (issue 24, case 5): state.pt holds tensors and plain data, read back with
weights_only=True, so a crafted state.pt is refused before any of it runs, with one line naming it."""

import json

import pytest
import torch

from drafter.train import TrainConfig, learner, load_state, train
from tests.tiny import ARGS, tiny_specblock


class Payload:
    """Unpickled, it creates the file `marker`: what a crafted state.pt could do with any callable."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def crafted_state(path, marker) -> None:
    torch.save({"model": Payload(marker), "opt": {}, "sched": {}, "step": 0, "cursor": {}, "tokens": 0}, path)


def test_a_saved_state_loads_back_with_weights_only(tmp_path):
    """What checkpoint() saves (model, AdamW and LambdaLR state dicts, the data cursor) resumes."""
    lr = learner("specblock", tiny_specblock(), TrainConfig(steps=4, warmup=1), str(tmp_path), "", 200)
    params = [p for p in lr.model.parameters() if p.requires_grad]
    sum(p.float().square().sum() for p in params).backward()
    lr.opt.step()
    lr.sched.step()
    state = {
        "model": lr.model.state_dict(),
        "opt": lr.opt.state_dict(),
        "sched": lr.sched.state_dict(),
        "step": 1,
        "cursor": {"record": 7, "batch": 2},
        "tokens": 96,
    }
    torch.save(state, tmp_path / "state.pt")
    back = load_state(tmp_path / "state.pt")
    assert back["cursor"] == {"record": 7, "batch": 2} and back["step"] == 1
    again = learner("specblock", tiny_specblock(), TrainConfig(steps=4, warmup=1), str(tmp_path), "", 200)
    again.model.load_state_dict(back["model"])
    again.opt.load_state_dict(back["opt"])
    again.sched.load_state_dict(back["sched"])
    assert again.sched.last_epoch == 1


def test_a_crafted_state_is_refused_unread(tmp_path):
    """train() on an out folder whose state.pt would run code: an OSError of one line, and no code ran."""
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": []}))
    (tmp_path / "ck").mkdir()
    marker = tmp_path / "ran"
    crafted_state(tmp_path / "ck" / "state.pt", marker)
    cfg = TrainConfig(data_dir=str(tmp_path), out=str(tmp_path / "ck"), steps=1)
    with pytest.raises(OSError) as e:
        train(cfg, ARGS, torch.randn(200, 64))
    text = str(e.value)
    assert "state.pt: not a training state of tensors and plain data, refused unread" in text, text
    assert "(it calls io.open)" in text and "weights_only=False" not in text and "\n" not in text
    assert not marker.exists()


def test_a_state_of_other_plain_data_is_refused(tmp_path):
    torch.save([1, 2, 3], tmp_path / "state.pt")
    with pytest.raises(OSError, match="not a training state \\(needs the keys model, opt"):
        load_state(tmp_path / "state.pt")


@pytest.mark.model
def test_train_on_a_crafted_state_exits_2_with_one_line(tmp_path, capsys):
    from specdraft.cli import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({"shards": []}))
    (tmp_path / "ck").mkdir()
    marker = tmp_path / "ran"
    crafted_state(tmp_path / "ck" / "state.pt", marker)
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"train: {{data_dir: {tmp_path / 'data'}, out: {tmp_path / 'ck'}, steps: 1}}\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err  # the progress bar's frames, then the error
    last = err.strip().split("\r")[-1].splitlines()[-1]
    assert last.startswith("specdraft train: error: ") and "state.pt: not a training state" in last, err
    assert "Traceback" not in err
    assert not marker.exists()
