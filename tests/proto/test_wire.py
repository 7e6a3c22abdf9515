"""The wire format: tensors and updates survive a round trip exactly, and the committed generated
code is what grpcio-tools makes from drafter.proto today."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from proto.interface import Feedback, SamplingParams, VerifierUpdate
from proto.wire import msg_to_tensor, msg_to_update, tensor_to_msg, update_to_msg

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_round_trip_is_bit_exact(dtype):
    h = torch.randn(3, 576).to(dtype)
    assert torch.equal(msg_to_tensor(tensor_to_msg(h), "hidden"), h)
    assert msg_to_tensor(tensor_to_msg(torch.empty(0, 576)), "hidden").shape == (0, 576)


def test_update_round_trip():
    up = VerifierUpdate(
        [5, 6, 7],
        Feedback([0, 2], {0: 0.5, 1: 0.25}, {-1: ([5, 9], [0.75, 0.125])}, 12.5),
        12,
        100,
        torch.randn(2, 8),  # the first update: a row per token but the newest
        SamplingParams(0.5, 4, 0.875),
    )
    prev_parents = (-1, -1, 0)
    got = msg_to_update(update_to_msg(up, 3, first=True, label="x"), 100, 8, prev_parents, max_nodes=64, first=True)
    assert (got.new_tokens, got.feedback, got.max_nodes, got.vocab_size) == (up.new_tokens, up.feedback, 12, 100)
    assert torch.equal(got.hidden, up.hidden)
    assert (got.sampling.temperature, got.sampling.top_k, got.sampling.top_p) == (0.5, 4, 0.875)
    capped = msg_to_update(update_to_msg(up, 4, first=False), 100, 0, prev_parents, max_nodes=5, first=False)
    assert capped.max_nodes == 5


def test_generated_code_is_up_to_date(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT),
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(ROOT / "proto" / "drafter.proto"),
        ],
        check=True,
    )
    for name in ("drafter_pb2.py", "drafter_pb2_grpc.py", "drafter_pb2.pyi"):
        assert (tmp_path / "proto" / name).read_text() == (ROOT / "proto" / name).read_text(), (
            f"proto/{name} is stale: run `make proto`"
        )
