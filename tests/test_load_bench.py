"""load-bench: arrival schedules, summaries, goals, a tiny in-process run, and the CLI's input errors."""

from __future__ import annotations

import json
import math

import pytest
from apar_spec.cli.app import app
from apar_spec.experiments.load_bench import (
    LoadSettings,
    arrival_times,
    goals,
    load_bench,
    parse_rates,
    terminal_chart,
)
from apar_spec.experiments.load_rows import LoadRow, RequestRecord, percentile, summarize
from typer.testing import CliRunner

runner = CliRunner()


def test_arrivals_are_seeded_poisson_or_all_at_once():
    a = arrival_times(200, 4.0, seed=1)
    assert a == arrival_times(200, 4.0, seed=1) != arrival_times(200, 4.0, seed=2)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    assert 0.15 < (a[-1] / 199) < 0.40  # mean gap ~ 1/rate
    assert arrival_times(3, math.inf, seed=0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        arrival_times(3, 0.0, seed=0)


def test_parse_rates_and_percentile():
    assert parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf]
    for bad in ("", "0", "-1", "fast"):
        with pytest.raises(ValueError, match="--rates"):
            parse_rates(bad)
    assert percentile([3.0, 1.0, 2.0, None], 0.5) == 2.0 and percentile([], 0.5) is None
    assert percentile([0.0, 10.0], 0.9) == pytest.approx(9.0)


def rec(e2e, tokens=10, ok=True, wait=0.0):
    return RequestRecord("p", 0.0, 0.1, e2e, wait, tokens, tokens, 1, ok)


def test_summary_and_goals():
    rows = [
        summarize("ar", "b", 2.0, [rec(1.0, wait=0.2), rec(2.0, wait=0.4)], 1.0, 100, 200, "x", 1.0),  # waits < e2e/2
        summarize(
            "ar", "b", 4.0, [rec(2.0, wait=1.5), rec(4.0, wait=2.5), rec(3.0, ok=False)], 2.0, 100, 200, "x", 1.0
        ),  # queue-bound
        summarize("apar", "a", 4.0, [rec(1.0), rec(2.0), rec(1.5)], 1.0, 90, 200, "x", 1.0),
    ]
    assert rows[1].completed == 2 and rows[1].failed == 1 and rows[1].e2e_p50 == 3.0
    g = goals(rows)
    assert g.saturation_rate == 4.0
    assert g.throughput_ratio == pytest.approx((30 / 1.0) / (20 / 2.0))
    assert g.e2e_p50_ratio == pytest.approx(1.5 / 3.0)
    assert g.spec_throughput_ratio is None and g.capacity_ratio is None and g.failed == 1
    assert len(terminal_chart(rows)) == 3


def test_in_process_run_on_embedded_models_is_lossless():
    s = LoadSettings(
        modes=("ar", "apar"), num_requests=3, rates=(math.inf, 20.0), max_new_tokens=12, kv_budget=120, limit=3
    )
    rows = load_bench(s)
    assert [(r.mode, r.rate) for r in rows] == [("ar", math.inf), ("ar", 20.0), ("apar", math.inf), ("apar", 20.0)]
    for r in rows:
        assert r.completed == 3 and r.failed == 0 and r.lossless == 1.0
        assert 0 < r.peak_live_kv <= 120 and r.output_throughput > 0 and r.hf_generate_tok_s > 0
        assert isinstance(LoadRow(**{**r.__dict__}).to_dict()["rate"], (float, str))


def test_cli_json_and_input_errors(tmp_path):
    out = tmp_path / "rows.jsonl"
    res = runner.invoke(
        app,
        [
            "load-bench",
            "-n",
            "2",
            "--rates",
            "inf",
            "--modes",
            "ar",
            "--max-new-tokens",
            "6",
            "--limit",
            "2",
            "--kv-budget",
            "100",
            "--json",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["rows"][0]["completed"] == 2 and doc["rows"][0]["rate"] == "inf"
    assert len(out.read_text().splitlines()) == 1
    for command, args, fragment in (
        ("load-bench", ["--rates", "0"], "--rates"),
        ("load-bench", ["-n", "0"], "--num-requests"),
        ("load-bench", ["--kv-budget", "0"], "--kv-budget"),
        ("load-bench", ["--modes", "beam"], "beam"),
        ("load-bench", ["--rates", "nan"], "--rates"),
        ("load-bench", ["--rates", "-1"], "--rates"),
        ("load-bench", ["--threads", "0"], "--threads"),
        ("load-bench", ["--timeout", "nan"], "--timeout"),
        ("load-bench", ["--url", "localhost:8000"], "not a URL"),
        ("load-bench", ["--url", "a=http://x:1", "--url", "a=http://y:2"], "distinct"),
        ("serve", ["--kv-budget", "-5"], "--kv-budget"),
        ("serve", ["--threads", "0"], "--threads"),
        ("serve", ["--upstream", ","], "--upstream"),
        ("serve", ["--upstream", "localhost:8100"], "http://"),
        ("serve", ["--upstream", "http://127.0.0.1:9", "--kv-budget", "100"], "--kv-budget"),
    ):
        res = runner.invoke(app, [command, *args])
        assert res.exit_code == 2 and res.stderr.startswith("Error: ") and fragment in res.stderr, (args, res.output)
    res = runner.invoke(app, ["serve", "--mode", "beam"])
    assert res.exit_code == 2 and "unknown mode" in res.stderr
    res = runner.invoke(app, ["serve", "--fork-bias", "nan"])
    assert res.exit_code == 2 and res.stderr.startswith("Error: ") and "fork_bias" in res.stderr, res.output
