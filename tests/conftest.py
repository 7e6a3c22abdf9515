import pytest
import torch


@pytest.fixture(scope="session")
def model_path():
    from specdraft.assets import model_dir

    torch.set_num_threads(2)
    return model_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from specdraft.assets import load_tokenizer

    return load_tokenizer(model_path)


@pytest.fixture(scope="session")
def target_fp32(model_path):
    from specdraft.assets import load_transformer
    from verifier.target import TorchTarget

    return TorchTarget(load_transformer(model_path, "float32", 1024))


@pytest.fixture(scope="session")
def sidecar(tmp_path_factory):
    """A shared real sidecar process: token auth, and limits small enough for the tests to reach."""
    from tests.sidecar import TOKEN_ENV, Sidecar

    s = Sidecar(
        tmp_path_factory.mktemp("sidecar"),
        f"max_sessions: 34, max_nodes: 64, max_message_mb: 1, session_ttl_s: 3, token_env: {TOKEN_ENV}",
    )
    yield s
    assert s.stop() == 0
