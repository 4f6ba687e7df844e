"""Explaining a lossless difference: the first differing token in APAR time, the target's
logit gap there, what the bench records, and ``--strict``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from apar_spec.cli.app import app
from apar_spec.experiments.bench_runner import _Runner
from micro import CHILD, FORK, micro_model, micro_tokenizer
from typer.testing import CliRunner

from apar_spec.decoding.lossless import NEAR_TIE, context_of, explain, first_difference, logit_gap

PROMPT = [1, 10, 11]
# root: 20 [Fork] 22 23 24 25 ; child at root index 1: [Child] 30 31 32 (times 2, 3, 4)
REF = [(None, None, [20, FORK, 22, 23, 24, 25]), (0, 1, [CHILD, 30, 31, 32])]


def test_the_first_difference_is_the_earliest_in_apar_time():
    late_root = [(None, None, [20, FORK, 22, 23, 24, 59]), (0, 1, [CHILD, 30, 31, 32])]  # root index 5: time 5
    d = first_difference(PROMPT, REF, late_root)
    assert (d.branch, d.index, d.time, d.want, d.got) == (0, 5, 5, 25, 59)
    both = [(None, None, [20, FORK, 22, 23, 24, 59]), (0, 1, [CHILD, 30, 57, 32])]  # the child's index 2 is time 3
    d = first_difference(PROMPT, REF, both)
    assert (d.branch, d.index, d.time, d.want, d.got, d.level) == (1, 2, 3, 31, 57, 1)
    assert d.context == PROMPT + [20, FORK, CHILD, 30]  # what the child saw: the parent up to its [Fork]
    assert first_difference(PROMPT, REF, [tuple(b) for b in REF]) is None
    short = [(None, None, [20, FORK, 22]), (0, 1, [CHILD, 30, 31, 32])]  # a different stop: no token to compare
    d = first_difference(PROMPT, REF, short)
    assert (d.branch, d.index, d.want, d.got) == (0, 3, 23, None)
    assert context_of(PROMPT, REF, 1, 1) == PROMPT + [20, FORK, CHILD]


def test_logit_gap_is_the_targets_own_and_counts_the_fork_offset():
    model = micro_model("llama", seed=0)
    d = first_difference(PROMPT, REF, [(None, None, [20, FORK, 22, 23, 24, 25]), (0, 1, [CHILD, 30, 57, 32])])
    with torch.no_grad():
        logits = model(torch.tensor([d.context])).logits[0, -1]
    assert logit_gap(model, d) == pytest.approx(abs(float(logits[31] - logits[57])))
    fork = first_difference(PROMPT, REF, [(None, None, [20, 21, 22]), (0, 1, [CHILD, 30, 31, 32])])
    with torch.no_grad():
        root_logits = model(torch.tensor([fork.context])).logits[0, -1]
    assert logit_gap(model, fork, FORK, 2.0) == pytest.approx(abs(float(root_logits[FORK] + 2.0 - root_logits[21])))
    assert logit_gap(model, fork, FORK, 2.0, max_depth=0) == pytest.approx(
        abs(float(root_logits[FORK] - root_logits[21]))
    )
    stop = first_difference(PROMPT, REF, [(None, None, [20, FORK]), (0, 1, [CHILD, 30, 31, 32])])
    assert logit_gap(model, stop) is None
    assert [
        explain("bfloat16", 5.0),
        explain("float32", NEAR_TIE / 2),
        explain("float32", NEAR_TIE),
        explain("float32", None),
    ] == ["low precision", "near-tie", "bug", "bug"]


def test_the_bench_records_where_a_row_parts_from_its_reference():
    model, tok = micro_model("llama", seed=0), micro_tokenizer()
    runner = SimpleNamespace(trees={})
    loaded = SimpleNamespace(model=model, tokenizer=tok)
    common = {"model": "m", "prompt_id": "p", "repeat": 0, "temperature": 0.0, "fork_bias": None, "max_depth": None}
    ar = {**common, "config": "ar", "branches": [[None, None, [20, 21, 22], "eos"]]}
    _Runner.check_lossless(runner, ar, loaded, PROMPT)
    assert "first_difference" not in ar  # the reference itself has none
    same = {**common, "config": "spec", "branches": [[None, None, [20, 21, 22], "eos"]]}
    _Runner.check_lossless(runner, same, loaded, PROMPT)
    assert "first_difference" not in same
    spec = {**common, "config": "spec", "branches": [[None, None, [20, 40, 22], "eos"]]}
    _Runner.check_lossless(runner, spec, loaded, PROMPT)
    rec = spec["first_difference"]
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + [20]])).logits[0, -1]
    assert (rec["reference"], rec["branch"], rec["index"], rec["want"], rec["got"]) == ("ar", 0, 1, 21, 40)
    assert rec["logit_gap"] == pytest.approx(abs(float(logits[21] - logits[40])))
    warm = {**common, "repeat": -1, "config": "spec", "branches": [[None, None, [9], "eos"]]}
    _Runner.check_lossless(runner, warm, loaded, PROMPT)  # warm-up rows are never compared
    assert "first_difference" not in warm


def _rows(gap, dtype="float32"):
    base = {
        "prompt_id": "p",
        "category": "c",
        "repeat": 0,
        "model": "m",
        "setup_id": "s",
        "temperature": 0.0,
        "tokens": 4,
        "wall_s": 1.0,
        "tokens_per_s": 4.0,
        "target_steps": 4,
        "steps_per_token": 1.0,
        "dtype": dtype,
    }
    return [
        {**base, "variant": "apar", "config": "apar", "output_ids": [1, 2, 3]},
        {
            **base,
            "variant": "apar+spec",
            "config": "apar+spec",
            "output_ids": [1, 2, 4],
            "first_difference": {
                "reference": "apar",
                "branch": 0,
                "index": 2,
                "time": 2,
                "want": 3,
                "got": 4,
                "logit_gap": gap,
            },
        },
    ]


@pytest.mark.parametrize(
    "gap,dtype,code", [(0.3, "float32", 2), (None, "float32", 2), (2e-6, "float32", 0), (0.3, "bfloat16", 0)]
)
def test_report_strict_fails_on_a_bug_only(tmp_path, gap, dtype, code):
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _rows(gap, dtype)))
    res = CliRunner().invoke(app, ["report", str(f), "--strict"])
    assert res.exit_code == code, res.output
    assert "differs from apar on 1 prompt(s)" in res.output
    if code:
        assert "lossless check failed: apar+spec differs from apar on 1 prompt(s)" in res.output
        assert "Traceback" not in res.output
    assert CliRunner().invoke(app, ["report", str(f)]).exit_code == 0  # without --strict a report never fails
