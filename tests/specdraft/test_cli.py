"""The `specdraft` command: strict config errors (exit 2, one line naming the key or file) and a real
`specdraft eval` process on the real model."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specdraft.cli import main
from specdraft.config import COMMAND_SECTIONS, Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "yaml_text,needle",
    [
        ("target: {modle: x}\n", "target.modle: unknown key"),
        ("eval: {num_prompts: many}\n", "eval.num_prompts: expected int, got 'many'"),
        ("eval: {baseline: 1}\n", "eval.baseline: expected bool, got 1"),
        ("target: {dtype: float16}\n", "target.dtype: 'float16' is not one of auto, float32, bfloat16"),
        ("eval: {datasets: [mt_bench, gsm8k]}\n", "eval.datasets[1]: 'gsm8k' is not one of"),
        ("sampling: {top_p: 1.5}\n", "sampling.top_p: must be in (0, 1]"),
        ("drafter: {max_nodes: 0}\n", "drafter.max_nodes: must be > 0"),
        ("drafter: {ngram: {max_ngram: 1, min_ngram: 2}}\n", "drafter.ngram.max_ngram: 1 < min_ngram 2"),
        ("target: [1, 2]\n", "target: expected a mapping"),
        ("eval: {num_prompts: 3\n", "not valid YAML"),
        ("drafter: {mode: udp}\n", "drafter.mode: 'udp' is not one of inprocess, grpc"),
        ("drafter: {grpc: {timeout_ms: 0}}\n", "drafter.grpc.timeout_ms: must be > 0"),
        ("drafter: {grpc: {tls_ca: /nope/ca.pem}}\n", "drafter.grpc.tls_ca: /nope/ca.pem: file not found"),
        ("server: {max_sessions: 0}\n", "server.max_sessions: must be > 0"),
        ("server: {address: nowhere}\n", "server.address: 'nowhere' is not host:port"),
        ("server: {tls_cert: /x.pem}\n", "server.tls_cert: give server.tls_key too"),
        ("server: {token_env: SPECDRAFT_SURELY_UNSET}\n", "environment variable SPECDRAFT_SURELY_UNSET is not set"),
        ("server: {workers: -1}\n", "server.workers: must be >= 0"),
        ("server: {max_message_mb: .nan}\n", "server.max_message_mb: must be a finite number, got nan"),
        ("server: {max_message_mb: .inf}\n", "server.max_message_mb: must be a finite number, got inf"),
        ("server: {max_message_mb: 4096}\n", "server.max_message_mb: must be < 2048"),
        ("server: {drain_s: .nan}\n", "server.drain_s: must be a finite number"),
        ("server: {session_ttl_s: .nan}\n", "server.session_ttl_s: must be a finite number"),
        ("server: {max_nodes: 1099511627776}\n", "server.max_nodes: 1099511627776 is out of range"),
        ("server: {reply_timeout_s: 0}\n", "server.reply_timeout_s: must be > 0"),
        ("server: {max_session_tokens: 0}\n", "server.max_session_tokens: must be > 0"),
        ("train: {steps: 0}\n", "train.steps: must be > 0"),
        ("train: {model: {block_size: 0}}\n", "train.model.block_size: must be > 0"),
        ("train: {data: stream, stream: {chunk: 0}}\n", "train.stream.chunk: must be > 0"),
        ("train: {data: stream, stream: {source: /nope.jsonl}}\n", "train.stream.source: /nope.jsonl"),
        ("train: {data: stream, stream: {batch_tokens: 100}}\n", "train.stream.batch_tokens: 100 < max_tokens"),
        ("train: {data: stream, stream: {max_tokens: 4096, batch_tokens: 8192}}\n", "train.stream.max_tokens: 4096 >"),
        ("train: {publish: /tmp}\n", "train.publish: /tmp: no drafter.safetensors"),
        ("train: {baseline_publish: /tmp/x}\n", "train.baseline_publish: needs baseline_out"),
        ("drafter: {kind: specblock, specblock: {max_blocks: 0}}\n", "drafter.specblock.max_blocks: must be > 0"),
        ("verify: {rule: spectr}\n", "verify.rule: 'spectr' needs sampled trees"),
        ("verify: {rule: traversal}\n", "verify.rule: 'traversal' needs sampled trees"),
        ("verify: {rule: hydra}\n", "verify.rule: 'hydra' is not one of walk, specinfer, spectr, traversal"),
        ("drafter: {kind: specblock}\nverify: {rule: spectr}\n", "drafter.specblock.tree is 'best_first'"),
        (
            "drafter: {kind: specblock, specblock: {tree: sampled, delay: -1}}\n",
            "drafter.specblock.delay: must be >= 0",
        ),
        ("drafter: {kind: specblock, specblock: {branches: 0}}\n", "drafter.specblock.branches: must be > 0"),
        ("eval: {matrix: {rules: [traversal]}}\n", "eval.matrix: needs an in-process specblock drafter"),
        (
            "drafter: {kind: specblock, specblock: {tree: sampled}}\neval: {matrix: {rules: [spectr, magic]}}\n",
            "eval.matrix.rules[1]: 'magic' must be one of",
        ),
        (
            "drafter: {kind: specblock, specblock: {tree: sampled, select: neural, selector: /nope}}\n",
            "drafter.specblock.selector: /nope: no selector.safetensors",
        ),
        ("eval: {first_prompt: -2}\n", "eval.first_prompt: must be >= 0"),
        ("eval: {compare: [/nope.yaml]}\n", "eval.compare[0]: /nope.yaml: config file not found"),
        (
            f"eval: {{compare: [{ROOT}/configs/eval-eagle.yaml]}}\nverify: {{rule: spectr}}\n"
            "drafter: {kind: specblock, specblock: "
            f"{{tree: sampled, checkpoint: {ROOT}/models/specblock-smollm2}}}}\n",
            "eval.compare[0]: verify.rule: 'spectr' needs sampled trees",
        ),
        (
            "drafter: {kind: specblock, specblock: {checkpoint: /nope}}\n",
            "drafter.specblock.checkpoint: /nope: no drafter",
        ),
    ],
)
def test_bad_config_exits_2_with_one_line_naming_the_key(tmp_path, capsys, yaml_text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    command = {"server": "serve-drafter", "train": "train"}.get(yaml_text.split(":")[0], "eval")
    assert main([command, "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and str(cfg) in err, err


def test_serve_drafter_bad_config_and_busy_port_exit_2(tmp_path, capsys):
    import socket

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("server: {session_ttl_s: -1}\n")
    assert main(["serve-drafter", "--config", str(cfg)]) == 2
    assert "server.session_ttl_s: must be > 0" in capsys.readouterr().err
    cfg.write_text("drafter: {kind: ngram}\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve-drafter", "--config", str(cfg), "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"server.address: cannot listen on 127.0.0.1:{port}" in err, err


def test_non_pem_tls_files_exit_2_naming_the_file(tmp_path, capsys):
    cert, key, cfg = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "c.yaml"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    cfg.write_text(f"server: {{tls_cert: {cert}, tls_key: {key}}}\n")
    assert main(["serve-drafter", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"server.tls_cert: {cert}: no PEM certificate in it" in err, err


def test_missing_specblock_checkpoint_exits_2_naming_it(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"drafter: {{kind: specblock, specblock: {{checkpoint: {tmp_path / 'none'}}}}}\n")
    for command in ("serve-drafter", "generate"):
        argv = [command, "--config", str(cfg)] + (["hi"] if command == "generate" else [])
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "drafter.specblock.checkpoint:" in err and "no drafter.safetensors" in err


def test_missing_config_file_and_model_folder(tmp_path, capsys):
    assert main(["eval", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: config file not found" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"target: {{model: {tmp_path / 'no-model'}}}\n")
    assert main(["eval", "--config", str(cfg)]) == 2
    assert "no-model: not a model folder" in capsys.readouterr().err


def test_shipped_configs_load_and_defaults_match_default_yaml():
    """default.yaml states every section's defaults, but for the drafter: it drafts with the hybrid (the
    best measured), where the dataclass default stays the model-free n-gram drafter (needs no checkpoint)."""
    generated = load_config(ROOT / "configs" / "replies.yaml", "generate-replies").replies.out_dir
    for path in (ROOT / "configs").glob("*.yaml"):
        for command in COMMAND_SECTIONS:  # every section of every shipped config is valid
            try:
                load_config(path, command)
            except ConfigError as e:  # but shards generate-replies writes are absent on a fresh checkout
                assert f": {generated}/" in str(e) and "no file matches" in str(e), e
                assert not list((ROOT / generated).glob("*.jsonl")), e
    default = load_config(ROOT / "configs" / "default.yaml", "eval")
    assert dataclasses.replace(default, drafter=Config().drafter) == Config()
    assert (default.drafter.kind, default.drafter.lookup) == ("specblock", "suffix")


# One long test: a single `specdraft eval` process on the real model (minutes) serves all of its checks.
@pytest.mark.model
def test_eval_process_on_the_real_model_compares_drafters(tmp_path):
    """The n-gram drafter (configs/eval-ngram.yaml) and, through eval.compare, the committed SpecBlock and
    EAGLE-style checkpoints and an untrained copy of SpecBlock (random weights, the control), on the same
    prompts against one AR run: a row each, and the plot. The trained drafter clears a tau floor that the
    untrained one does not (T = 0 and fixed prompts: deterministic on a given machine)."""
    from safetensors.torch import load_file, save_file

    untrained = tmp_path / "untrained"
    untrained.mkdir()
    torch.manual_seed(0)
    sd = load_file(ROOT / "models" / "specblock-smollm2" / "drafter.safetensors")
    save_file(
        {k: torch.randn_like(v) * 0.05 if v.is_floating_point() else v for k, v in sd.items()},
        untrained / "drafter.safetensors",
    )
    (untrained / "config.json").write_text((ROOT / "models" / "specblock-smollm2" / "config.json").read_text())
    out, compared = tmp_path / "report.json", []
    for ckpt, tree in (
        (ROOT / "models" / "specblock-smollm2", "best_first"),
        (ROOT / "models" / "eagle-smollm2", "frontier"),
        (untrained, "best_first"),
    ):
        compared.append(tmp_path / f"{ckpt.name}.yaml")
        compared[-1].write_text(
            f"drafter: {{kind: specblock, max_nodes: 16, specblock: "
            f"{{checkpoint: {ckpt}, tree: {tree}, max_blocks: 4}}}}\n"
        )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        (ROOT / "configs" / "eval-ngram.yaml").read_text() + f"  compare: [{', '.join(map(str, compared))}]\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "specdraft.cli",
            "eval",
            "--config",
            str(cfg),
            "--num-prompts",
            "1",
            "--max-new-tokens",
            "24",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    for word in ("speedup", "mt_bench", "humaneval", "ngram", "specblock-smollm2", "eagle-smollm2"):
        assert word in proc.stdout, word
    report = json.loads(out.read_text())
    assert report["drafter"] == "ngram" and set(report["compare"]) == {
        "specblock-smollm2",
        "eagle-smollm2",
        "untrained",
    }
    for label, r in [("ngram", report)] + list(report["compare"].items()):
        for name in ("mt_bench", "humaneval"):
            s = r["datasets"][name]
            turns = 2 if name == "mt_bench" else 1  # one conversation: MT-Bench has two user turns
            assert s["prompts"] == turns and s["exact_match"] is True and s["tau"] >= 1.0
            assert 0 < s["speedup"] and s["verify_ms_per_step"] > 0
            assert r["outputs"][name][0]["text"]
            # n-gram lookup runs no network; a learned drafter runs at least one forward per tree
            assert (s["draft_forwards_per_step"] == 0) == (label == "ngram"), (label, s)
            assert (label != "eagle-smollm2") or s["draft_forwards_per_step"] > 1  # one position per forward

    def tau(label):
        ds = report["compare"][label]["datasets"].values()
        return sum(s["tau"] for s in ds) / len(ds)

    assert tau("specblock-smollm2") > 1.15 and tau("untrained") < 1.05, (tau("specblock-smollm2"), tau("untrained"))
    from matplotlib.image import imread

    # one 5.5 x 4 in panel per dataset at 110 dpi (what each panel draws: test_the_acceptance_plot_...)
    assert imread(out.with_suffix(".png")).shape[:2] == (440, 2 * 605)


def test_the_acceptance_plot_draws_each_drafters_acceptance_by_depth_per_dataset(tmp_path, monkeypatch):
    import matplotlib.figure
    from matplotlib.image import imread

    from specdraft.evaluate import plot_acceptance

    def summary(acc, tau):
        return {"acceptance_per_depth": acc, "tau": tau}

    report = {
        "drafter": "ngram",
        "config": {"sampling": {"temperature": 0.0}},
        "datasets": {"mt_bench": summary([0.5, 0.25], 1.6), "humaneval": summary([0.75, 0.5, 0.125], 2.1)},
        "compare": {
            "specblock": {"datasets": {"mt_bench": summary([0.625], 1.4), "humaneval": summary([], 1.0)}},
        },
    }
    saved, savefig = [], matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kw):  # the figure the plot saves, to read its curves back
        saved.append(fig)
        return savefig(fig, *args, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    plot_acceptance(report, tmp_path / "eval.png")
    assert imread(tmp_path / "eval.png").shape[:2] == (440, 2 * 605) and len(saved) == 1
    curves = {
        ax.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
        for ax in saved[0].axes
    }
    assert curves == {
        "mt_bench": {"ngram (tau 1.60)": ([1, 2], [0.5, 0.25]), "specblock (tau 1.40)": ([1], [0.625])},
        "humaneval": {"ngram (tau 2.10)": ([1, 2, 3], [0.75, 0.5, 0.125])},  # no acceptance, no curve
    }


def test_bad_bench_flag_exits_2_naming_it(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--tree-sizes", "16,abc"])
    assert e.value.code == 2
    assert "--tree-sizes: 'abc' is not a positive integer" in capsys.readouterr().err


@pytest.mark.model
def test_generate_streams_text_and_reports_tau(capsys):
    assert main(["--log-level", "WARNING", "generate", "List three colors.", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "12 tokens in" in err and "tau" in err


@pytest.mark.model
def test_an_explicit_dtype_that_is_not_exact_here_reports_its_measured_divergence(tmp_path, caplog):
    """float32 rows are not row-invariant on any CPU (kernels.linear): choosing it says so, with counts."""
    cfg = tmp_path / "fp32.yaml"
    cfg.write_text("target: {dtype: float32}\n")
    assert main(["generate", "Hi.", "--config", str(cfg), "--max-new-tokens", "2", "--no-draft"]) == 0
    warning = next(r.getMessage() for r in caplog.records if "is not exact on this CPU" in r.getMessage())
    assert "target.dtype float32" in warning and " rows differ from plain decoding in some bit, " in warning


@pytest.mark.model
def test_eval_matrix_and_selector_trace_on_the_real_model(tmp_path, capsys):
    """The sampled-tree matrix runs every (rule, d, k) against plain sampling and summarises it; a traced
    eval with random delays writes selector records that `specdraft train` (kind selector) fits."""
    ckpt = ROOT / "models" / "specblock-smollm2"
    cfg = tmp_path / "matrix.yaml"
    cfg.write_text(
        f"drafter: {{kind: specblock, max_nodes: 6, specblock: {{checkpoint: {ckpt}, tree: sampled}}}}\n"
        f"eval: {{datasets: [mt_bench], num_prompts: 1, max_new_tokens: 8, output: {tmp_path / 'm.json'},\n"
        "       matrix: {rules: [traversal, spectr], delays: [0, 1], branches: [2]}}\n"
    )
    assert main(["eval", "--config", str(cfg)]) == 0
    assert "neural/best" in capsys.readouterr().out
    report = json.loads((tmp_path / "m.json").read_text())
    assert {(r["rule"], r["delay"], r["branches"]) for r in report["matrix"]} == {
        (rule, d, 2) for rule in ("traversal", "spectr") for d in (0, 1)
    }
    assert all(r["tau"] >= 1 and r["speedup"] > 0 for r in report["matrix"])
    assert len(report["summary"]) == 2 and all(s["best_d"] in (0, 1) for s in report["summary"])

    trace = tmp_path / "trace.jsonl"
    cfg.write_text(
        f"drafter: {{kind: specblock, max_nodes: 6, specblock: {{checkpoint: {ckpt}, tree: sampled, "
        f"select: random, delays: [0, 2]}}}}\nsampling: {{temperature: 1.0}}\nverify: {{rule: traversal}}\n"
        f"eval: {{datasets: [mt_bench, humaneval], num_prompts: 1, max_new_tokens: 24, baseline: false, "
        f"output: {tmp_path / 't.json'}, trace: {trace}}}\n"
    )
    assert main(["eval", "--config", str(cfg)]) == 0
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(records) >= 20 and {r["delay"] for r in records} == {0, 2}
    assert all(len(r["features"]) == 10 and 0 <= r["accepted"] <= 6 for r in records)


@pytest.mark.model
def test_train_without_prepared_data_exits_2_naming_the_folder(tmp_path, capsys):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"train: {{data_dir: {tmp_path / 'nodata'}, out: {tmp_path / 'ck'}}}\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.data_dir:" in err and "no manifest.json" in err, err


def test_a_yaml_alias_bomb_exits_2_at_once_naming_the_file(tmp_path, capsys):
    """Issue 24, case 3: nine levels of aliases under target.model (RSS 3 GB after 35 s, growing) are
    refused while parsing, in one short line naming the file and the line of the first anchor."""
    levels = "".join(f"l{i + 1}: &l{i + 1} [{', '.join([f'*l{i}'] * 9)}]\n" for i in range(8))
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(f"l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n{levels}target: {{model: *l8}}\n")
    assert main(["eval", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"specdraft eval: error: {cfg}:1: not valid YAML (YAML anchors and aliases (&name, *name) are not "
        "allowed in a config, found &l0)"
    ), err


def test_a_huge_bad_value_is_quoted_short(tmp_path, capsys):
    """A 100k-element list where a string belongs, and a 1,000-character unknown key: the error quotes
    at most ~100 characters of either."""
    cfg = tmp_path / "big.yaml"
    cfg.write_text("target: {model: [" + "1, " * 100_000 + "1]}\n")
    assert main(["eval", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "target.model: expected str, got [1, 1, " in err and "... (300003 characters)" in err and len(err) < 300
    cfg.write_text("x" * 1000 + ": 1\n")
    assert main(["eval", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "... (1002 characters): unknown key" in err and len(err) < 400, err


def test_a_temperature_too_small_to_divide_by_exits_2(tmp_path, capsys):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("sampling: {temperature: 1.0e-45}\n")
    assert main(["eval", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("sampling.temperature: 1e-45 is below 1e-06, too small to divide logits by; 0 = greedy"), err


def test_version_is_the_installed_packages(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"specdraft {version('specdraft')}"


def test_each_subcommands_help_names_its_docs_page_and_config_sections(capsys):
    from specdraft.cli import parser

    root = Path(__file__).resolve().parents[2]
    commands = parser()._subparsers._group_actions[0].choices
    assert set(commands) >= set(COMMAND_SECTIONS) - {"proposer"}
    for name in commands:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        pages = [w.rstrip(".,") for w in text.split() if w.startswith("docs/")]
        assert pages and all((root / p).is_file() for p in pages), (name, pages)
        sections = COMMAND_SECTIONS.get(name, ())
        if sections:
            assert f"Config sections {', '.join(sections)}: every key in docs/config.md." in text, name
        config_doc = (root / "docs" / "config.md").read_text()
        assert all(f"\n## {s}\n" in config_doc for s in sections), name
