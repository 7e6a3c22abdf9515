"""The `specdraft` command: argument parsing and dispatch. What a command does lives in its module
(specdraft.evaluate, bench, serve, training, experiment); cmd_* apply the arguments to the config and call it."""

import argparse
import logging
import sys
from importlib.metadata import version

EPILOG = "Bad input (config key, type, missing file) exits with code 2 and one line naming it."
# Each subcommand's page in docs/; its config sections (specdraft.config.COMMAND_SECTIONS, not imported here:
# --help stays fast) are listed in docs/config.md, one heading per section.
DOCS = {
    "eval": ("evaluation.md", ("target", "drafter", "sampling", "verify", "verifier", "eval")),
    "generate": ("evaluation.md", ("target", "drafter", "sampling", "verify")),
    "bench": ("benchmarks.md", ("target", "sampling", "verify")),
    "bench-sidecar": ("sidecar.md", ()),
    "bench-load": ("sidecar.md", ("server",)),
    "serve-drafter": ("sidecar.md", ("target", "drafter", "server")),
    "prepare-data": ("training.md", ("target", "data")),
    "generate-replies": ("training.md", ("target", "verifier", "replies")),
    "train": ("training.md", ("target", "train")),
    "experiment": ("bandit.md", ("target", "drafter", "sampling", "verify", "experiment")),
    "prepare": ("setup.md", ()),
}


def docs_epilog(command: str, epilog: str | None) -> str:
    page, sections = DOCS[command]
    keys = f"Config sections {', '.join(sections)}: every key in docs/config.md. " if sections else ""
    return f"{keys}More: docs/{page}." + (f" {epilog}" if epilog else "")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def nonneg_int(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


def positive_ints(text: str) -> list[int]:
    return [positive_int(v) for v in text.split(",")]


def config_for(args, command: str, override=None):
    """The --config file's Config, the command's argument overrides applied (override(cfg)), validated
    once for the sections the command uses."""
    from specdraft.config import ConfigError, read_config, validate

    cfg = read_config(args.config)
    if override is not None:
        override(cfg)
    try:
        return validate(cfg, command)
    except ConfigError as e:
        raise ConfigError(f"{args.config}: {e}") from None


def cmd_eval(args) -> None:
    from specdraft.evaluate import eval_rows, print_matrix, print_table, run_eval

    def override(cfg):
        if args.full:
            cfg.eval.num_prompts = 0
        for key in ("num_prompts", "max_new_tokens", "output"):
            if getattr(args, key) is not None:
                setattr(cfg.eval, key, getattr(args, key))
        if args.datasets is not None:
            cfg.eval.datasets = [d for d in args.datasets.split(",") if d.strip()]
        if args.no_baseline:
            cfg.eval.baseline = False
        if args.strict:
            cfg.eval.strict = True

    cfg = config_for(args, "eval", override)
    report = run_eval(cfg)
    if "matrix" in report:
        print_matrix(report)
        print(f"report: {cfg.eval.output}")
        return
    print_table(report)
    if "vllm" in report:
        from specdraft.vllm import print_vllm_table

        print_vllm_table(report["vllm"])
    lost = sum(s["fallback_rounds"] for _, _, s in eval_rows(report))
    if lost:
        print(
            f"note: {lost} sidecar rounds fell back to plain decoding (tree late, malformed or lost); "
            "see the log, or raise drafter.grpc.timeout_ms"
        )
    print(f"report: {cfg.eval.output}")


def cmd_generate(args) -> None:
    import time

    from drafter.data import chat_prompt
    from specdraft.assets import load_target
    from specdraft.config import ConfigError
    from specdraft.evaluate import decode, drafter_factory
    from verifier.engine import tau

    if not args.prompt.strip():
        raise ConfigError("prompt: empty; give the user message to answer")
    cfg = config_for(args, "generate")
    target, tokenizer, stops = load_target(cfg.target)
    prompt = chat_prompt(tokenizer, args.prompt)
    drafter = None if args.no_draft else drafter_factory(cfg.drafter, target)("generate")
    out, shown, steps, t0 = [], "", [], time.perf_counter()
    try:
        for step in decode(target, prompt, cfg, stops, drafter, args.max_new_tokens):
            out += step.tokens
            steps.append(step)
            text = tokenizer.decode(out, skip_special_tokens=True)
            print(text[len(shown) :], end="", flush=True)  # stream what this step committed
            shown = text
    finally:
        if drafter is not None:
            drafter.close()
    dt = time.perf_counter() - t0
    print(
        f"\n[{len(out)} tokens in {len(steps)} target forwards, tau {tau(steps):.2f}, {len(out) / dt:.1f} tok/s]",
        file=sys.stderr,
    )


def cmd_bench(args) -> None:
    from specdraft.assets import model_dir, use_threads
    from specdraft.bench import print_bench, print_cpu, print_step_bench, run_bench, run_step_bench
    from specdraft.config import load_config

    cfg = config_for(args, "bench")
    drafters = [load_config(path, "generate").drafter for path in args.drafters.split(",") if path.strip()]
    use_threads(cfg.target)
    print_cpu()
    if args.step_prompts:
        print_step_bench(run_step_bench(cfg, drafters, args.step_prompts, args.step_tokens))
    results = run_bench(model_dir(cfg.target.model), args.prefix_len, args.tree_sizes, args.reps, args.gen_tokens)
    print_bench(results, args.tree_sizes, args.prefix_len)


def cmd_serve_drafter(args) -> None:
    import os

    from specdraft.serve import serve_drafter

    def override(cfg):
        if args.address:
            cfg.server.address = args.address

    serve_drafter(
        config_for(args, "serve-drafter", override), ready=lambda address: print(f"listening on {address}", flush=True)
    )
    # stopped and drained: skip the interpreter's teardown (torch's alone takes ~1 s), so the process exits
    # within drain_s + 1 s of SIGTERM
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


def cmd_bench_sidecar(args) -> None:
    from specdraft.bench import print_sidecar_bench, run_sidecar_bench

    print_sidecar_bench(run_sidecar_bench(args.tree_sizes, args.rounds), args.rounds)


def cmd_bench_load(args) -> None:
    from specdraft.load import Variant, print_fill_bench, print_load_bench, run_fill_bench, run_load_bench

    config_for(args, "serve-drafter")  # a bad config fails here, in one line, before any sidecar starts
    if args.fill:
        print_fill_bench(run_fill_bench(args.config, args.sessions, args.fill), args.config)
        return
    alone = Variant("unbatched (batch_max_rows 1)", {"batch_max_rows": 1})
    own = Variant("batched (the config's server)", {})
    results = run_load_bench(args.config, [alone, own], args.sessions, args.seconds)
    print_load_bench(results, args.config)


def cmd_prepare_data(args) -> None:
    from specdraft.training import run_prepare_data

    def override(cfg):
        if args.max_conversations is not None:
            cfg.data.max_conversations = args.max_conversations
        if args.out_dir:
            cfg.data.out_dir = args.out_dir
        if args.source:
            cfg.data.source = args.source
        if args.strict:
            cfg.data.strict = True

    run_prepare_data(config_for(args, "prepare-data", override))


def cmd_generate_replies(args) -> None:
    from specdraft.training import run_generate_replies

    def override(cfg):
        if args.max_records is not None:
            cfg.replies.max_records = args.max_records

    run_generate_replies(config_for(args, "generate-replies", override))


def cmd_train(args) -> None:
    from specdraft.training import run_train

    def override(cfg):
        if args.steps is not None:
            if cfg.train.kind == "selector":
                cfg.train.selector.steps = args.steps
            else:
                cfg.train.steps = args.steps

    run_train(config_for(args, "train", override), args.evaluate)


def cmd_experiment(args) -> None:
    from tqdm import tqdm

    from specdraft.config import ConfigError
    from specdraft.experiment import print_summary, run_experiment

    def override(cfg):
        if args.prompts_per_segment is not None:
            cfg.experiment.prompts_per_segment = [args.prompts_per_segment] * len(cfg.experiment.stream)
        if args.interleaved is not None:
            cfg.experiment.interleaved = args.interleaved

    cfg = config_for(args, "experiment", override)
    ex = cfg.experiment
    if set(ex.policies) - {"ar"} and (cfg.drafter.mode != "inprocess" or not cfg.drafter.arms.choose):
        raise ConfigError(
            "drafter.arms.choose: the experiment's fixed and bandit policies need the in-process hybrid "
            "with its arms listed (e.g. [both:8, lookup:8, both:4])"
        )
    policies = sum(len(cfg.drafter.arms.choose) if p == "fixed" else 1 for p in ex.policies)
    requests = sum(ex.prompts_per_segment) + ex.interleaved
    with tqdm(total=policies * requests, desc="experiment", unit="request") as bar:

        def progress(policy, row):
            bar.update()
            bar.set_postfix(policy=policy, segment=row["segment"], tau=f"{row['tau']:.2f}")

        report = run_experiment(cfg, progress)
    print_summary(report)
    print(f"report: {ex.output}/experiment.json, plot: {ex.output}/experiment.png")


def cmd_prepare(args) -> None:
    from specdraft.assets import model_dir

    print(model_dir(args.model))


# The argument parser: one function per subcommand, in the order --help lists them.


def add_eval(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="offline acceptance-rate evaluation on MT-Bench, HumanEval or your own conversations",
        description="Decode each prompt plainly (AR) and speculatively with the same target in one run; "
        "print tau, acceptance per depth, drafting/verify ms, tokens/s, speedup and, at "
        "temperature 0, whether the outputs equal AR exactly. Writes a JSON report.",
        epilog=EPILOG,
    )
    e.add_argument("--config", default="configs/default.yaml", help="YAML config (default: %(default)s)")
    e.add_argument("--num-prompts", type=int, help="prompts per dataset (overrides eval.num_prompts; 0 = all)")
    e.add_argument("--full", action="store_true", help="every prompt of every dataset (80 MT-Bench + 164 HumanEval)")
    e.add_argument("--max-new-tokens", type=int, help="overrides eval.max_new_tokens")
    e.add_argument(
        "--datasets",
        help="comma-separated: mt_bench (both turns), mt_bench:1 (first turns), humaneval, or .jsonl / .json "
        "files of conversations (OpenAI messages, ShareGPT or {prompt})",
    )
    e.add_argument("--output", help="JSON report path (overrides eval.output)")
    e.add_argument("--no-baseline", action="store_true", help="skip the AR baseline (no speedup or exact match)")
    e.add_argument("--strict", action="store_true", help="a bad record in a dataset file is an error (exit 2)")
    e.set_defaults(func=cmd_eval)


def add_generate(sub) -> None:
    g = sub.add_parser(
        "generate",
        help="stream one chat answer, speculatively decoded",
        description="Answer one user message with the configured target, drafter and sampling, "
        "printing text as each step commits it; stats go to stderr.",
        epilog=EPILOG,
    )
    g.add_argument("prompt", help="the user message")
    g.add_argument("--config", default="configs/default.yaml", help="YAML config (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=positive_int, default=256, help="(default: %(default)s)")
    g.add_argument("--no-draft", action="store_true", help="plain autoregressive decoding")
    g.set_defaults(func=cmd_generate)


def add_bench(sub) -> None:
    b = sub.add_parser(
        "bench",
        help="step costs: CPU flags, per-part speculative step costs with real drafters, target forwards",
        description="Measure, in one run: the CPU flags that pick the kernels and the dtype auto picks; per "
        "speculative step with real drafters on MT-Bench prompts, drafting / tree forward / LM head / rule / "
        "commit in ms and as a fraction of a plain decode step, with tau and the speedup ceiling at tau 2, 3, 4; "
        "then ms per decode step and per tree forward in fp32 and bf16, and our decode speed against "
        "transformers' generate on the same weights.",
        epilog=EPILOG,
    )
    b.add_argument("--config", default="configs/default.yaml", help="YAML config for the target (default: %(default)s)")
    b.add_argument(
        "--tree-sizes", type=positive_ints, default=[16, 32, 64], help="tree node counts N (default: 16,32,64)"
    )
    b.add_argument(
        "--prefix-len", type=positive_int, default=128, help="cached context before each forward (default: %(default)s)"
    )
    b.add_argument(
        "--reps",
        type=positive_int,
        default=10,
        help="timed repetitions per case, median reported (default: %(default)s)",
    )
    b.add_argument(
        "--gen-tokens", type=positive_int, default=32, help="tokens per generate timing (default: %(default)s)"
    )
    b.add_argument(
        "--drafters",
        default="configs/default.yaml,configs/eval-specblock.yaml,configs/eval-eagle.yaml",
        help="comma-separated config files whose drafter sections the per-step table times "
        "(default: n-gram, SpecBlock, EAGLE-style: %(default)s)",
    )
    b.add_argument(
        "--step-prompts",
        type=nonneg_int,
        default=3,
        help="MT-Bench prompts for the per-step table (0 skips it; default: %(default)s)",
    )
    b.add_argument(
        "--step-tokens", type=positive_int, default=64, help="new tokens per prompt there (default: %(default)s)"
    )
    b.set_defaults(func=cmd_bench)


def add_bench_sidecar(sub) -> None:
    bs = sub.add_parser(
        "bench-sidecar",
        help="per-round latency the gRPC sidecar adds over an in-process drafter",
        description="Start a sidecar process serving random trees, then time the same tree sizes "
        "drafted in-process and through the sidecar on loopback, interleaved, with and "
        "without SmolLM2-width hidden states; prints p50/p99 and the added latency.",
        epilog=EPILOG,
    )
    bs.add_argument(
        "--tree-sizes", type=positive_ints, default=[16, 64, 256], help="tree node counts (default: 16,64,256)"
    )
    bs.add_argument("--rounds", type=positive_int, default=500, help="timed rounds per case (default: %(default)s)")
    bs.set_defaults(func=cmd_bench_sidecar)


def add_bench_load(sub) -> None:
    bl = sub.add_parser(
        "bench-load",
        help="the sidecar under load: many sessions drafting at once, batched against unbatched",
        description="Start the sidecar of --config twice: once with every SpecBlock forward alone "
        "(server.batch_max_rows 1: the sidecar before batching), once with the config's own server "
        "section (forwards batched across sessions). Each time, --sessions clients draft for --seconds as a "
        "decode loop would (one committed token plus an accepted prefix per round, hidden states when the "
        "drafter takes them). "
        "Prints rounds/s, the client's p50/p99 round latency, the share over the client's default timeout, "
        "errors, drafts per batched forward, the wait for a batch and the sidecar's peak RSS.",
        epilog=EPILOG,
    )
    bl.add_argument(
        "--config", default="configs/sidecar-specblock.yaml", help="the sidecar's YAML config (default: %(default)s)"
    )
    bl.add_argument("--sessions", type=positive_int, default=16, help="concurrent sessions (default: %(default)s)")
    bl.add_argument("--seconds", type=float, default=60.0, help="seconds per variant (default: %(default)s)")
    bl.add_argument(
        "--fill",
        type=positive_int,
        default=0,
        metavar="TOKENS",
        help="instead: the token bounds. Each session sends updates of TOKENS new tokens until it holds "
        "server.max_session_tokens or is refused; prints the tokens the full sessions hold against "
        "server.max_total_tokens and the sidecar's peak RSS (e.g. --sessions 64 --fill 4096)",
    )
    bl.set_defaults(func=cmd_bench_load)


def add_serve_drafter(sub) -> None:
    s = sub.add_parser(
        "serve-drafter",
        help="run the drafter as a gRPC sidecar (specdraft.v1)",
        description="Serve draft trees over gRPC (specdraft.v1.Drafter, plus grpc.health.v1 and "
        "server reflection) with the drafter and limits of the config's drafter and "
        "server sections. Prints 'listening on HOST:PORT' once ready; SIGTERM or Ctrl-C "
        "drains open sessions for server.drain_s and exits.",
        epilog=EPILOG,
    )
    s.add_argument("--config", default="configs/sidecar.yaml", help="YAML config (default: %(default)s)")
    s.add_argument("--address", help="host:port to listen on (overrides server.address; port 0 = any free port)")
    s.set_defaults(func=cmd_serve_drafter)


def add_prepare_data(sub) -> None:
    d = sub.add_parser(
        "prepare-data",
        help="teacher-force ShareGPT (or your own conversations) through the target into drafter training shards",
        description="Read the complete records of the packaged ShareGPT file (or data.source, a JSONL / JSON "
        "file of conversations), apply the chat template, run "
        "each conversation through the target once and cache its final hidden states and "
        "top-k next-token distributions in safetensors shards (train / held-out split by "
        "conversation id). Resumable: a rerun continues after the last written shard.",
        epilog=EPILOG,
    )
    d.add_argument(
        "--config", default="configs/default.yaml", help="YAML config: target and data sections (default: %(default)s)"
    )
    d.add_argument("--max-conversations", type=int, help="overrides data.max_conversations (0 = all)")
    d.add_argument("--out-dir", help="overrides data.out_dir")
    d.add_argument("--source", help="overrides data.source: sharegpt, or a .jsonl / .json file of conversations")
    d.add_argument("--strict", action="store_true", help="a bad record in the source file is an error (exit 2)")
    d.set_defaults(func=cmd_prepare_data)


def add_generate_replies(sub) -> None:
    g = sub.add_parser(
        "generate-replies",
        help="the target's own replies to ShareGPT user turns (self-distillation data), as sharded JSONL",
        description="Answer the user turns of replies.source (the packaged ShareGPT set by default) with the "
        "target itself, replies.batch records at a time on vLLM (make setup-vllm): the first turn, then later "
        "turns with the target's own earlier replies in the context, greedy or sampled per record "
        "(replies.temperatures). Each batch is written as train-NNNNN.jsonl and heldout-NNNNN.jsonl under "
        "replies.out_dir; resumable: a rerun goes on after the last batch written. prepare-data and "
        "train.stream.source read the shards (a glob such as data/smollm2-self/train-*.jsonl).",
        epilog=EPILOG,
    )
    g.add_argument("--config", default="configs/replies.yaml", help="YAML config (default: %(default)s)")
    g.add_argument("--max-records", type=nonneg_int, help="overrides replies.max_records (0 = all)")
    g.set_defaults(func=cmd_generate_replies)


def add_train(sub) -> None:
    t = sub.add_parser(
        "train",
        help="train a SpecBlock drafter on prepare-data's shards",
        description="Fit a SpecBlock drafter (config section train) to the teacher-forced shards; "
        "progress bar with loss and held-out top-1 per block position; checkpoints "
        "and resumes from train.out.",
        epilog=EPILOG,
    )
    t.add_argument("--config", default="configs/train-specblock.yaml", help="YAML config (default: %(default)s)")
    t.add_argument("--steps", type=int, help="overrides train.steps")
    t.add_argument(
        "--evaluate",
        metavar="CHECKPOINT",
        help="instead of training: a trained drafter folder's "
        "held-out loss and top-1 accuracy per block position, on train.heldout_dir (or data_dir)",
    )
    t.set_defaults(func=cmd_train)


def add_experiment(sub) -> None:
    x = sub.add_parser(
        "experiment",
        help="the cost-aware choice of drafter and tree budget (and online updates) on a mixed stream",
        description="Decode one mixed stream of requests (experiment.stream: a block of each source, then "
        "`interleaved` requests taking turns) once per policy: plain decoding, every arm of "
        "drafter.arms.choose alone, the bandit choosing among them per session, and the bandit with online "
        "drafter updates. Prints tokens/s against the best fixed arm in hindsight and the default arm, the "
        "regret, =AR at temperature 0 and the arms chosen; writes experiment.json and a PNG (cumulative "
        "tokens/s and regret over the stream) to experiment.output.",
        epilog=EPILOG,
    )
    x.add_argument("--config", default="configs/experiment.yaml", help="YAML config (default: %(default)s)")
    x.add_argument(
        "--prompts-per-segment",
        type=positive_int,
        help="requests in every source's block (overrides experiment.prompts_per_segment)",
    )
    x.add_argument("--interleaved", type=int, help="requests after the blocks (overrides experiment.interleaved)")
    x.set_defaults(func=cmd_experiment)


def add_prepare(sub) -> None:
    r = sub.add_parser("prepare", help="convert the embedded model into the local cache and print its folder")
    r.add_argument("--model", default="smollm2-135m-instruct", help="embedded model name (default: %(default)s)")
    r.set_defaults(func=cmd_prepare)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specdraft", description="Speculative-decoding drafting service.", epilog=EPILOG)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--version", action="version", version=f"%(prog)s {version('specdraft')}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (
        add_eval,
        add_generate,
        add_bench,
        add_bench_sidecar,
        add_bench_load,
        add_serve_drafter,
        add_generate_replies,
        add_prepare_data,
        add_train,
        add_experiment,
        add_prepare,
    ):
        add(sub)
    for name, command in sub.choices.items():
        command.epilog = docs_epilog(name, command.epilog)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from specdraft.config import ConfigError

    try:
        args.func(args)
    except (ConfigError, OSError) as e:  # bad config, missing file, port in use
        print(f"specdraft {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
