import pytest
import torch


@pytest.fixture(scope="session")
def model_path():
    from verifier.assets import model_dir

    torch.set_num_threads(2)
    return model_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from verifier.assets import load_tokenizer

    return load_tokenizer(model_path)


@pytest.fixture(scope="session")
def target_fp32(model_path):
    from verifier.assets import load_transformer
    from verifier.target import TorchTarget

    return TorchTarget(load_transformer(model_path, "float32", 1024))
