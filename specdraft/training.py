"""`specdraft prepare-data` and `specdraft train` behind their argument parsing (specdraft/cli.py): the
training data teacher-forced through the target into shards, and the drafter (or the delay selector)
fitted to it, with progress bars and a printed summary. Each takes the config the command validated."""

import json
from pathlib import Path

from tqdm import tqdm

from drafter.data import SHAREGPT, build_cache, read_sharegpt, sharegpt_conversations
from drafter.selector import load_traces, train_selector
from drafter.train import Stream, data_dirs, evaluate_checkpoint, train
from proto import checks
from specdraft.assets import load_target, model_dir, package_file, target_embedding
from specdraft.config import ConfigError
from specdraft.datasets import read_file


def source_conversations(source: str, strict: bool):
    """A function giving the (id, messages) of a conversation source in file order, afresh at each call:
    the packaged ShareGPT set (read incrementally), or a user's file, read whole now (before the target
    loads: a bad record under strict is one line, at once)."""
    if source == "sharegpt":
        path = package_file(*SHAREGPT)
        return lambda: sharegpt_conversations(read_sharegpt(path))
    convs = [(c.id, c.messages) for c in read_file(source, strict)]
    return lambda: iter(convs)


def teacher_stream(cfg):
    """train.data: stream's input: the conversations of train.stream.source in file order, and the target
    (target section) as a batched teacher."""
    conversations = source_conversations(cfg.train.stream.source, False)
    target, tokenizer, _ = load_target(cfg.target)
    return Stream(conversations, tokenizer, target.teacher)


def target_replies(cfg, stops: set[int]):
    """data.replies: target's reply generator (vLLM), or None for the conversations' own replies."""
    if cfg.data.replies != "target":
        return None
    try:
        import vllm  # noqa: F401  (optional: only data.replies target needs it)
    except ImportError as e:
        raise ConfigError(f"data.replies: target needs vLLM to generate the replies (make setup-vllm): {e}") from None
    from specdraft.vllm import reply_generator  # imports vLLM's modules: only once it is known to be there

    return reply_generator(cfg, stops)


def run_prepare_data(cfg) -> None:
    """Teacher-force data.source through the target into shards under data.out_dir (resumable), then
    print what each split holds."""
    conversations = source_conversations(cfg.data.source, cfg.data.strict)()
    target, tokenizer, stops = load_target(cfg.target)
    replies = target_replies(cfg, stops)

    def features(ids):
        return target.prefill(ids), target.logits

    with tqdm(desc="teacher forcing", unit="tok") as bar:
        try:
            manifest = build_cache(conversations, tokenizer, features, cfg.data, cfg.target.model, bar.update, replies)
        except ValueError as e:  # an out_dir written by another config
            raise ConfigError(f"data.out_dir: {e}") from None
    for split in ("train", "heldout"):
        shards = [s for s in manifest["shards"] if s["split"] == split]
        print(
            f"{split}: {sum(s['conversations'] for s in shards)} conversations, "
            f"{sum(s['tokens'] for s in shards)} tokens in {len(shards)} shards"
        )
    print(f"data: {cfg.data.out_dir}")
    if any(s["split"] == "heldout" for s in manifest["shards"]):
        print(f"held-out conversations (for specdraft eval --datasets): {cfg.data.out_dir}/heldout.jsonl")


def run_train(cfg, evaluate: str | None = None) -> None:
    """train.kind selector: fit the delay selector to its traces. Else, with evaluate (a drafter folder):
    that drafter's held-out metrics; without: train the drafter (resuming from train.out)."""
    if cfg.train.kind == "selector":
        fit_selector(cfg)
        return
    targs, embedding = target_embedding(model_dir(cfg.target.model))
    if evaluate:
        try:
            checks.file_in(evaluate, "drafter.safetensors")
        except OSError as e:
            raise ConfigError(f"--evaluate: {e}") from None
        print(json.dumps(evaluate_checkpoint(Path(evaluate), cfg.train, targs, embedding)))
        return
    data_dirs(cfg.train)  # before the progress bar: a missing folder is one line
    stream = None
    if cfg.train.data == "stream":
        stream = teacher_stream(cfg)
    with tqdm(total=cfg.train.steps, desc="train", unit="step") as bar:
        post = {}

        def progress(m):
            bar.n = m["step"]
            post.update(loss=f"{m['train_loss']:.3f}", tokens=f"{m['tokens'] / 1e6:.2f}M", tok_s=f"{m['tok_s']:.0f}")
            if "heldout" in m:
                post["heldout top1"] = ",".join(f"{a:.2f}" for a in m["heldout"]["top1"])
                post["tau~"] = f"{m['heldout']['tau_chain']:.2f}"
            bar.set_postfix(post)

        metrics = train(cfg.train, targs, embedding, progress, stream)
    print(json.dumps(metrics))
    print(f"drafter: {cfg.train.out}")


def fit_selector(cfg) -> None:
    """train.kind selector: the delay selector fitted to train.selector.traces, saved to its out."""
    sc = cfg.train.selector
    try:
        metrics = train_selector(sc, load_traces(sc.traces))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(json.dumps({k: v for k, v in metrics.items() if k != "train_config"}))
    print(f"selector: {sc.out}")
