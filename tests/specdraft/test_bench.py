"""`specdraft bench` on a tiny random Llama folder: a result and a printed row for every dtype, a cost for
every tree size, and the printed ratios consistent with the printed milliseconds. No timed assertions
(these machines are noisy): only the report's structure and its arithmetic."""

import re

import pytest

from specdraft.assets import DTYPES
from specdraft.bench import print_bench, run_bench
from tests.tiny import tiny_llama_folder

SIZES = [4, 16]
PREFIX = 16
NUMBER = r"(-?\d+(?:\.\d+)?)"


def half_unit(printed: str) -> float:
    """Half the last printed digit's unit: how far the printed number may be from the one it rounds."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return 0.5 * 10**-decimals


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    path = tiny_llama_folder(tmp_path_factory.mktemp("tiny") / "llama")
    return run_bench(path, prefix_len=PREFIX, tree_sizes=SIZES, reps=3, gen_tokens=16)


def test_every_dtype_has_a_positive_cost_for_decode_and_every_tree_size(bench):
    assert set(bench) == set(DTYPES)
    for r in bench.values():
        assert r["decode_ms"] > 0
        for n in SIZES:
            assert r[f"tree{n}_ms"] > 0
            assert r[f"tree{n}_over_decode"] == pytest.approx(r[f"tree{n}_ms"] / r["decode_ms"])
        assert r["ours_generate_ms_per_token"] > 0 and r["hf_generate_ms_per_token"] > 0 and r["ours_over_hf"] > 0
        rows, differ, flips = r["divergence"]  # tree rows vs plain decoding: compared, differing, argmax flipped
        assert rows > 0 and 0 <= flips <= differ <= rows


def test_the_printed_table_has_a_row_per_dtype_whose_ratios_match_its_milliseconds(bench, capsys):
    print_bench(bench, SIZES, PREFIX)
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in DTYPES}
    assert set(rows) == set(DTYPES), lines
    for dtype, line in rows.items():
        decode = line.split()[1]  # the decode column follows the dtype
        assert float(decode) == pytest.approx(bench[dtype]["decode_ms"], abs=half_unit(decode))
        trees = re.findall(rf"{NUMBER} \({NUMBER}\)", line)  # "ms (x decode)", one per tree size
        assert len(trees) == len(SIZES), line
        assert line.endswith("{1}/{0}, argmax {2}".format(*bench[dtype]["divergence"])), line
        for n, (ms, ratio) in zip(SIZES, trees):
            assert float(ms) == pytest.approx(bench[dtype][f"tree{n}_ms"], abs=half_unit(ms))
            # the ratio lies within what the printed (rounded) milliseconds allow
            lo = (float(ms) - half_unit(ms)) / (float(decode) + half_unit(decode))
            hi = (float(ms) + half_unit(ms)) / max(float(decode) - half_unit(decode), 1e-9)
            assert lo - half_unit(ratio) <= float(ratio) <= hi + half_unit(ratio), line


def test_the_step_table_prints_each_part_as_a_fraction_of_a_decode_step_and_the_ceilings(capsys):
    """print_step_bench on made-up costs (a fake result, not a measurement): each part's fraction is its
    ms over the decode step's, and the ceiling at tau t is t * decode / (draft + verify)."""
    from specdraft.bench import print_step_bench

    row = {"draft": 2.0, "forward": 30.0, "head": 3.0, "rule": 1.0, "commit": 0.5, "nodes": 12.0, "tau": 2.5}
    row["step"] = row["draft"] + row["forward"] + row["head"] + row["rule"] + row["commit"]
    row["lookup"], row["bandit"] = 0.4, 0.012
    store = {"max_tokens": 1000, "tokens": 1000, "rss_mib": 3.0}
    print_step_bench({"decode_ms": 40.0, "rows": {"fake": row}, "suffix_store": store})
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("fake"))
    assert "2.00 (0.05)" in line and "30.00 (0.75)" in line and "34.5 (0.86)" in line  # verify = 30+3+1+0.5
    assert "0.40 (0.010)" in line and " 0.012 " in line and "holds 1,000 tokens, RSS +3 MiB" in out
    ceilings = [float(x) for x in line.split()[-3:]]
    assert ceilings == [pytest.approx(t * 40.0 / 36.5, abs=0.005) for t in (2, 3, 4)]


def test_a_suffix_store_filled_past_its_bound_holds_at_most_the_bound():
    from drafter.suffix import SuffixConfig
    from specdraft.bench import suffix_store_rss

    got = suffix_store_rss(SuffixConfig(max_tokens=4000), session_tokens=100)
    assert 4000 - 100 < got["tokens"] <= 4000 and got["rss_mib"] >= 0
