"""Report math on hand-made rows: ratios of medians, acceptance conventions, lossless checks."""

from __future__ import annotations

import io
import json

import pytest
from apar_spec.cli.report_view import render
from apar_spec.experiments.bench_files import read_rows
from apar_spec.experiments.report import (
    ALL,
    acceptance_per_position,
    compare_outputs,
    ratio_of_medians,
    summarize,
)
from rich.console import Console


def row(variant, prompt, repeat, tps, *, config=None, category="c", model="m", out=(1, 2, 3), temperature=0.0, **kw):
    tokens = kw.pop("tokens", 10)
    base = {
        "variant": variant,
        "config": config or variant,
        "prompt_id": prompt,
        "category": category,
        "repeat": repeat,
        "model": model,
        "setup_id": "s",
        "temperature": temperature,
        "tokens": tokens,
        "wall_s": tokens / tps,
        "tokens_per_s": tps,
        "target_steps": tokens,
        "steps_per_token": 1.0,
        "mean_acceptance_length": 1.0,
        "acceptance_rate_per_position": [],
        "peak_live_kv": 20,
        "attended_keys": 100,
        "steps_per_critical_path": 1.0,
        "output_ids": list(out),
    }
    base.update(kw)
    return base


def by_variant(report, group=ALL):
    return {v.variant: v for v in report.groups[group]}


def test_speedup_is_ratio_of_medians_over_repeats_then_prompts():
    rows = [
        # ar: prompt p1 repeats 10, 12, 100 (median 12); p2: 20, 22, 21 (median 21) -> median over prompts 16.5
        *(row("ar", "p1", r, t) for r, t in enumerate([10, 12, 100])),
        *(row("ar", "p2", r, t) for r, t in enumerate([20, 22, 21])),
        # apar: p1 median 30, p2 median 36 -> 33
        *(row("apar", "p1", r, t) for r, t in enumerate([30, 29, 31])),
        *(row("apar", "p2", r, t) for r, t in enumerate([36, 35, 90])),
        # hf-generate: p1 11, p2 22 -> 16.5 as well... make it 11 and 44 -> 27.5
        *(row("hf-generate", "p1", r, 11) for r in range(3)),
        *(row("hf-generate", "p2", r, 44) for r in range(3)),
    ]
    v = by_variant(summarize(rows))
    assert v["ar"].tokens_per_s == pytest.approx(16.5)
    assert v["apar"].tokens_per_s == pytest.approx(33.0)
    assert v["apar"].speedup_vs_ar == pytest.approx(33.0 / 16.5)
    assert v["apar"].speedup_vs_hf == pytest.approx(33.0 / 27.5)
    assert v["ar"].speedup_vs_ar == pytest.approx(1.0)
    assert v["hf-generate"].speedup_vs_hf == pytest.approx(1.0)


def test_speedup_uses_only_prompts_both_finished():
    # an interrupted run: apar never reached p2, where ar was slow; comparing all of ar's prompts would flatter apar
    rows = [row("ar", "p1", 0, 10), row("ar", "p2", 0, 1), row("apar", "p1", 0, 20)]
    assert by_variant(summarize(rows))["apar"].speedup_vs_ar == pytest.approx(2.0)
    assert ratio_of_medians(rows[2:], rows[:2], "tokens_per_s") == pytest.approx(2.0)
    assert ratio_of_medians(rows[2:], [row("ar", "p9", 0, 1)], "tokens_per_s") is None


def test_kv_and_attended_keys_relative_to_ar():
    rows = [
        row("ar", "p1", 0, 10, peak_live_kv=100, attended_keys=1000),
        row("apar", "p1", 0, 20, peak_live_kv=60, attended_keys=400),
        row("hf-generate", "p1", 0, 10, peak_live_kv=None, attended_keys=None),
    ]
    v = by_variant(summarize(rows))
    assert v["apar"].peak_kv_vs_ar == pytest.approx(0.6)
    assert v["apar"].attended_keys_vs_ar == pytest.approx(0.4)
    assert v["hf-generate"].peak_kv_vs_ar is None  # HF has no such counter: shown as '-', never invented


def test_acceptance_length_includes_bonus_and_per_position_rates():
    rows = [
        row("ar", "p1", 0, 10),  # plain decoding: acceptance length 1.0 by convention
        row("spec", "p1", 0, 15, mean_acceptance_length=3.0, acceptance_rate_per_position=[1.0, 0.5, 0.0]),
        row("spec", "p2", 0, 15, mean_acceptance_length=2.0, acceptance_rate_per_position=[0.5]),
    ]
    v = by_variant(summarize(rows))
    assert v["ar"].acceptance_length == pytest.approx(1.0)
    assert v["spec"].acceptance_length == pytest.approx(2.5)
    # position 0: mean(1.0, 0.5); positions 1-2: only the row that drafted that far votes
    assert v["spec"].acceptance_per_position == pytest.approx([0.75, 0.5, 0.0])
    assert acceptance_per_position([row("x", "p", 0, 1, acceptance_rate_per_position=None)]) == []


def test_lossless_compares_whole_lists_not_zipped():
    ref = [row("ar", "p1", 0, 1, out=[5, 6, 7, 2]), row("ar", "p2", 0, 1, out=[5, 6])]
    truncated = [row("spec", "p1", 0, 1, out=[5, 6, 7]), row("spec", "p2", 0, 1, out=[5, 6])]
    got = compare_outputs(truncated, ref, "ar")
    assert (got.equal, got.compared, got.ok) == (1, 2, False)  # zip() would have called p1 equal
    assert got.first_difference.startswith("prompt p1: lengths 3 vs 4, first differs at answer token 3")
    assert got.short() == "NO 1/2 (1 bug)"  # no gap recorded: nothing says it was rounding
    same = compare_outputs(ref, ref, "ar")
    assert same.ok and same.short() == "yes 2/2"


def test_lossless_pairs_and_when_it_does_not_apply():
    rows = [
        row("hf-generate", "p1", 0, 1),
        row("ar", "p1", 0, 1),
        row("spec", "p1", 0, 1),
        row("apar", "p1", 0, 1, out=[9]),
        row("apar+spec", "p1", 0, 1, out=[9, 9]),
        row("hf-assisted", "p1", 0, 1),
    ]
    v = by_variant(summarize(rows))
    assert v["spec"].lossless.reference == "ar" and v["spec"].lossless.ok
    assert v["ar"].lossless.reference == "hf-generate" and v["ar"].lossless.ok
    assert v["hf-assisted"].lossless.reference == "hf-generate" and v["hf-assisted"].lossless.ok
    assert v["apar+spec"].lossless.reference == "apar" and v["apar+spec"].lossless.ok is False
    assert v["apar"].lossless is None and v["hf-generate"].lossless is None
    sampled = compare_outputs(
        [row("spec", "p1", 0, 1, temperature=0.7)], [row("ar", "p1", 0, 1, temperature=0.7)], "ar"
    )
    assert sampled.ok is None and sampled.short() == "n/a (sampled)"
    mixed = compare_outputs([row("spec", "p1", 0, 1, model="a")], [row("ar", "p1", 0, 1, model="b")], "ar")
    assert mixed.short() == "n/a (different models)"


def test_lossless_uses_first_repeat_both_have():
    ref = [row("ar", "p1", 1, 1, out=[1]), row("ar", "p1", 0, 1, out=[2])]
    mine = [row("spec", "p1", 0, 1, out=[2]), row("spec", "p1", 1, 1, out=[3])]
    assert compare_outputs(mine, ref, "ar").ok


def test_per_category_groups_and_single_category_collapses():
    rows = [
        row("ar", "a1", 0, 10, category="list"),
        row("apar", "a1", 0, 30, category="list"),
        row("ar", "b1", 0, 10, category="short"),
        row("apar", "b1", 0, 10, category="short"),
    ]
    rep = summarize(rows)
    assert list(rep.groups) == [ALL, "list", "short"]
    assert by_variant(rep, "list")["apar"].speedup_vs_ar == pytest.approx(3.0)
    assert by_variant(rep, "short")["apar"].speedup_vs_ar == pytest.approx(1.0)
    assert by_variant(rep)["apar"].speedup_vs_ar == pytest.approx(2.0)  # median of (30, 10) / 10
    assert list(summarize(rows[:2]).groups) == [ALL]


def test_sweep_variants_share_the_ar_baseline():
    rows = [
        row("ar", "p", 0, 10),
        row("spec ngram k=2", "p", 0, 20, config="spec"),
        row("spec ngram k=4", "p", 0, 5, config="spec"),
    ]
    v = by_variant(summarize(rows))
    assert v["spec ngram k=2"].speedup_vs_ar == pytest.approx(2.0)
    assert v["spec ngram k=4"].speedup_vs_ar == pytest.approx(0.5)
    assert v["spec ngram k=4"].lossless.reference == "ar"


def test_mixed_setups_are_flagged_and_empty_is_an_error():
    rows = [row("ar", "p", 0, 10), {**row("apar", "p", 0, 10), "setup_id": "other"}]
    assert any("different setups" in n for n in summarize(rows).notes)
    with pytest.raises(ValueError, match="no rows"):
        summarize([])


def test_render_plain_text_has_columns_bars_and_failures():
    rows = [row("hf-generate", "p", 0, 10), row("ar", "p", 0, 10), row("spec", "p", 0, 25, out=[1, 2])]
    buf = io.StringIO()
    render(summarize(rows), Console(file=buf, width=200))
    text = buf.getvalue()
    assert "\x1b[" not in text and "━" not in text  # plain when not a terminal
    for header in (
        "tok/s",
        "xAR",
        "xHF",
        "steps/tok",
        "acc.len",
        "acc@pos",
        "KVxAR",
        "attnxAR",
        "steps/crit",
        "lossless",
    ):
        assert header in text
    assert "speed-up vs AR" in text and "2.50x" in text and "#" in text
    assert (
        "NO 0/1 (1 bug)" in text
        and "spec differs from ar on 1 prompt(s)" in text
        and "[bug] prompt p: lengths 2 vs 3" in text
    )
    rich_buf = io.StringIO()
    render(summarize(rows), Console(file=rich_buf, width=200, force_terminal=True))
    assert "█" in rich_buf.getvalue()


def test_report_json_round_trips():
    rep = summarize([row("ar", "p", 0, 10), row("apar", "p", 0, 20)])
    data = json.loads(json.dumps(rep.to_dict()))
    apar = next(v for v in data["groups"][ALL] if v["variant"] == "apar")
    assert apar["speedup_vs_ar"] == pytest.approx(2.0) and data["repeats"] == 1


def test_read_rows_ignores_a_cut_last_line_but_not_a_broken_middle(tmp_path):
    good = json.dumps(row("ar", "p", 0, 10))
    f = tmp_path / "r.jsonl"
    f.write_text(good + "\n" + good[:20])
    assert len(read_rows(f)) == 1
    f.write_text(good[:20] + "\n" + good + "\n")
    with pytest.raises(ValueError, match="line 1: not a JSON row"):
        read_rows(f)
    f.write_text(json.dumps({"a": 1}) + "\n")
    with pytest.raises(ValueError, match="line 1: not a benchmark row"):
        read_rows(f)
    with pytest.raises(FileNotFoundError):
        read_rows(tmp_path / "missing.jsonl")


def test_no_prompt_is_exempt_and_every_difference_is_explained():
    # answers that used the whole budget are compared like any other (the budget is deterministic)
    diff = {"reference": "apar", "branch": 1, "index": 4, "time": 9, "want": 3, "got": 2}
    ref = [
        row("apar", "p1", 0, 1, out=[1, 2, 3], tokens=8, max_new_tokens=8),
        row("apar", "p2", 0, 1, out=[4, 5], tokens=8, max_new_tokens=8),
        row("apar", "p3", 0, 1, out=[6, 7], tokens=8, max_new_tokens=8),
        row("apar", "p4", 0, 1, out=[6, 7], tokens=8, max_new_tokens=8),
    ]
    mine = [
        row(
            "apar+spec",
            "p1",
            0,
            1,
            out=[1, 3, 2],
            tokens=8,
            max_new_tokens=8,
            first_difference={**diff, "logit_gap": 3e-6},
        ),
        row("apar+spec", "p2", 0, 1, out=[4, 5], tokens=8, max_new_tokens=8),
        row("apar+spec", "p3", 0, 1, out=[6], tokens=8, max_new_tokens=8, first_difference={**diff, "logit_gap": 0.5}),
        row("apar+spec", "p4", 0, 1, out=[6, 8], tokens=8, max_new_tokens=8),
    ]
    got = compare_outputs(mine, ref, "apar")
    assert (got.equal, got.compared, got.ok, got.bugs) == (1, 4, False, 2)
    assert [d["reason"] for d in got.differences] == ["near-tie", "bug", "bug"]
    assert "3.00e-06" in got.differences[0]["detail"] and "branch 1 token 4" in got.differences[0]["detail"]
    assert (
        "not rounding" in got.differences[1]["detail"] and "no first-difference record" in got.differences[2]["detail"]
    )
    assert got.short() == "NO 1/4 (2 bug, 1 near-tie)"
    assert "budget" not in got.short()
    buf = io.StringIO()
    render(summarize(ref + mine), Console(file=buf, width=300))
    text = buf.getvalue()
    assert (
        "apar+spec differs from apar on 3 prompt(s)" in text
        and "[near-tie] prompt p1" in text
        and "[bug] prompt p3" in text
    )


def test_low_precision_differences_point_at_numerics():
    got = compare_outputs(
        [row("spec", "p1", 0, 1, out=[1, 2], dtype="bfloat16")],
        [row("ar", "p1", 0, 1, out=[1, 3], dtype="bfloat16")],
        "ar",
    )
    assert got.ok is False and "bfloat16" in got.first_difference and "float32" in got.first_difference
    fp32 = compare_outputs(
        [row("spec", "p1", 0, 1, out=[1, 2], dtype="float32")],
        [row("ar", "p1", 0, 1, out=[1, 3], dtype="float32")],
        "ar",
    )
    assert "float32" not in fp32.first_difference
