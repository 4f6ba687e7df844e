"""The quality pass end to end on the embedded pair: rows, resume, and the precision control."""

from __future__ import annotations

import json
import math

import pytest
import torch
from apar_spec.experiments.prompts import select_prompts
from apar_spec.experiments.quality import run_quality


def test_quality_pass_with_a_control_resumes_without_decoding_again(tmp_path, monkeypatch):
    ps = select_prompts("default", limit=4)
    out = tmp_path / "q.jsonl"
    kw = dict(max_new_tokens=40, batch_size=2, dtype="float32", out=out, control_dtype="float64")
    s = run_quality("tiny-apar", "tiny-base", ps, **kw)
    assert [r["prompt_id"] for r in s.rows] == [p.id for p in ps]
    ctl = [json.loads(line) for line in out.with_suffix(".control.jsonl").read_text().splitlines()]
    assert [c["dtype"] for c in ctl] == ["float64"] * 4
    by_id = {c["prompt_id"]: c for c in ctl}
    for r in s.rows:
        assert r["nll_control"] == by_id[r["prompt_id"]]["nll_control"]
    # the same model in float64: its greedy answers are the float32 ones here, so the control ratio is ~1
    assert sum(by_id[r["prompt_id"]]["control_text"] == r["ar_text"] for r in s.rows) >= 3
    assert s.by_category["all"]["nll_ratio_control"] == pytest.approx(1.0, abs=0.02)
    # a rerun reads every phase back: nothing is generated again
    import apar_spec

    monkeypatch.setattr(apar_spec, "generate", lambda *a, **k: pytest.fail("decoded again on resume"))
    again = run_quality("tiny-apar", "tiny-base", ps, **kw)
    assert [r["nll_control"] for r in again.rows] == [r["nll_control"] for r in s.rows]
    without = run_quality("tiny-apar", "tiny-base", ps, **{**kw, "control_dtype": None})
    assert math.isnan(without.by_category["all"]["nll_ratio_control"])
    # rows record the fork nesting cap they were decoded under (tiny-apar records none: the default 2);
    # only rows of the same cap are reused
    assert {r["max_depth"] for r in s.rows} == {2}
    assert len(run_quality("tiny-apar", "tiny-base", ps, **kw, max_depth=2).rows) == 4  # read back, not decoded
    with pytest.raises(pytest.fail.Exception, match="decoded again"):
        run_quality("tiny-apar", "tiny-base", ps, **kw, max_depth=1)
    # ... and the capped-child policy: rows say which, rows from before the option count as "mask"
    assert {r["depth_cap"] for r in s.rows} == {"end"}
    with pytest.raises(pytest.fail.Exception, match="decoded again"):
        run_quality("tiny-apar", "tiny-base", ps, **kw, depth_cap="mask")
    old = [{**json.loads(line), "depth_cap": None} for line in out.read_text().splitlines()]
    out.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "depth_cap"}) + "\n" for r in old))
    assert len(run_quality("tiny-apar", "tiny-base", ps, **kw, depth_cap="mask").rows) == 4
    # ... and the [Fork] logit offset: rows before the option were decoded at 0
    assert {r.get("fork_bias") for r in s.rows} == {0.0}
    assert len(run_quality("tiny-apar", "tiny-base", ps, **kw, depth_cap="mask", fork_bias=0.0).rows) == 4
    with pytest.raises(pytest.fail.Exception, match="decoded again"):
        run_quality("tiny-apar", "tiny-base", ps, **kw, depth_cap="mask", fork_bias=-2.0)
    # ... and the repeated-title rule: rows say which, rows from before the option count as "keep"
    assert {r["repeated_title"] for r in s.rows} == {"end"}
    assert all(r["repeat_ends"] == 0 or r["forked"] for r in s.rows)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    out.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "repeated_title"}) + "\n" for r in rows))
    assert len(run_quality("tiny-apar", "tiny-base", ps, **kw, depth_cap="mask", repeated_title="keep").rows) == 4
    with pytest.raises(pytest.fail.Exception, match="decoded again"):
        run_quality("tiny-apar", "tiny-base", ps, **kw, depth_cap="mask")


def test_quality_refuses_an_unknown_depth_cap_before_loading(tmp_path, monkeypatch):
    import apar_spec

    monkeypatch.setattr(apar_spec, "load", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="depth_cap must be one of end, mask"):
        run_quality(
            "tiny-apar", "tiny-base", select_prompts("default", limit=1), depth_cap="stop", out=tmp_path / "q.jsonl"
        )


def test_quality_refuses_an_unknown_repeated_title_policy_before_loading(tmp_path, monkeypatch):
    import apar_spec

    monkeypatch.setattr(apar_spec, "load", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="repeated_title must be one of end, keep"):
        run_quality(
            "tiny-apar",
            "tiny-base",
            select_prompts("default", limit=1),
            repeated_title="loop",
            out=tmp_path / "q.jsonl",
        )


def test_cli_quality_refuses_an_unknown_control_dtype(tmp_path):
    from test_cli import assert_user_error, run

    assert_user_error(
        run(
            "quality",
            "--target",
            "tiny-apar",
            "--base",
            "tiny-base",
            "--control-dtype",
            "float13",
            "--out",
            str(tmp_path / "q.jsonl"),
        ),
        "unknown dtype 'float13'",
    )
    assert not (tmp_path / "q.jsonl").exists()


def test_cli_quality_runs_several_fork_biases_side_by_side_on_one_set_of_base_answers(tmp_path):
    from test_cli import assert_user_error, run

    out = tmp_path / "q.jsonl"
    args = [
        "quality",
        "--target",
        "tiny-apar",
        "--base",
        "tiny-base",
        "--limit",
        "3",
        "--max-new-tokens",
        "24",
        "--out",
        str(out),
    ]
    res = run(*args, "--fork-bias=-50,0", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    by = doc["by_fork_bias"]
    assert set(by) == {"-50.0", "0.0"}
    assert by["-50.0"]["all"]["fork_rate"] == 0 < by["0.0"]["all"]["fork_rate"]  # the offset really reached the decoder
    assert sorted(r["fork_bias"] for r in doc["rows"]) == [-50.0] * 3 + [0.0] * 3
    assert len(out.with_suffix(".ar.jsonl").read_text().splitlines()) == 3  # the base answered once, for both
    again = run(
        *args, "--fork-bias", "0", "--json"
    )  # one value: the usual summary, rows read back from the shared file
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["by_category"] == by["0.0"]
    assert len(out.read_text().splitlines()) == 6  # nothing decoded again
    assert_user_error(run(*args, "--fork-bias", "1,x"), "--fork-bias takes numbers")
    assert_user_error(run(*args, "--fork-bias", "1,1"), "lists a value twice")
    assert_user_error(run(*args[:-2], "--fork-bias", "0,1"), "need --out")
    assert_user_error(run(*args, "--fork-bias", "0,1", "--sides", str(tmp_path / "s.md")), "take one --fork-bias")


def test_length_matched_control_scores_the_base_answer_cut_to_the_apar_length(tmp_path):
    """``nll_ar_matched`` is the base's own answer scored over its first n tokens, n = the APAR answer's
    length; a row saved before the figure existed gets it on resume, equal to a fresh pass's."""
    from apar_spec.experiments.models import Loaded, encode_prompt
    from apar_spec.experiments.quality_nll import answer_ids, mean_nll

    import apar_spec

    ps = select_prompts("default", limit=3)
    out = tmp_path / "q.jsonl"
    s = run_quality("tiny-apar", "tiny-base", ps, max_new_tokens=40, batch_size=3, dtype="float32", out=out)
    bm, bt = apar_spec.load("tiny-base", dtype="float32")
    by_id = {p.id: p for p in ps}
    for r in s.rows:
        n = len(answer_ids(bt, r["apar_text"]))
        ids = encode_prompt(Loaded("tiny-base", bm, bt), by_id[r["prompt_id"]].text)
        want = mean_nll(bm, bt, [ids], [r["ar_text"]], max_tokens=[n])[0]
        assert r["nll_ar_matched"] == pytest.approx(want, rel=1e-5)
        full = mean_nll(bm, bt, [ids], [r["ar_text"]])[0]
        if n >= len(answer_ids(bt, r["ar_text"])):
            assert r["nll_ar_matched"] == pytest.approx(full, rel=1e-5)
    assert any(
        len(answer_ids(bt, r["apar_text"])) < len(answer_ids(bt, r["ar_text"])) for r in s.rows
    )  # a cut happened
    ratio = s.by_category["all"]["nll_ratio_matched"]
    assert ratio == pytest.approx(sum(r["nll_apar"] for r in s.rows) / sum(r["nll_ar_matched"] for r in s.rows))
    # rows from before the figure: filled in on resume, same numbers
    old = [json.loads(line) for line in out.read_text().splitlines()]
    out.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "nll_ar_matched"}) + "\n" for r in old))
    again = run_quality("tiny-apar", "tiny-base", ps, max_new_tokens=40, batch_size=3, dtype="float32", out=out)
    assert [r["nll_ar_matched"] for r in again.rows] == pytest.approx([r["nll_ar_matched"] for r in s.rows], rel=1e-5)


def test_mean_nll_max_tokens_is_the_mean_over_the_first_tokens():
    from apar_spec.experiments.quality_nll import answer_ids, mean_nll

    import apar_spec

    m, t = apar_spec.load("tiny-base", dtype="float64")
    prompt = t("hello", add_special_tokens=False)["input_ids"]
    text = "one two three four five six"
    n = len(answer_ids(t, text))
    ids = torch.tensor([prompt + answer_ids(t, text)])  # [1, P + n]
    logp = torch.log_softmax(m(input_ids=ids).logits.double(), dim=-1)[0]  # [P + n, V]
    tok = [-float(logp[len(prompt) - 1 + i, ids[0, len(prompt) + i]]) for i in range(n)]  # each answer token's NLL
    assert len(set(round(x, 6) for x in tok)) > 1  # the tokens differ, so a prefix mean differs from the whole mean
    for k in range(1, n + 1):
        assert mean_nll(m, t, [prompt], [text], max_tokens=[k])[0] == pytest.approx(
            sum(tok[:k]) / k, rel=1e-6
        )  # mean_nll: float32 softmax
    assert mean_nll(m, t, [prompt], [text], max_tokens=[n + 5])[0] == pytest.approx(sum(tok) / n, rel=1e-6)
    assert math.isnan(mean_nll(m, t, [prompt], [text], max_tokens=[0])[0])


def test_label_agreement_scores_the_fork_decision_against_sot_labels():
    from apar_spec.experiments.quality_summary import groups, label_agreement

    def row(cat, forked):
        return {"category": cat, "forked": forked, "prompt": "q"}

    rows = [
        row("w/sot-list", True),
        row("w/sot-list", True),
        row("w/sot-list", False),
        row("v/sot-not-list", True),
        row("v/sot-not-list", False),
        row("v/sot-not-list", False),
        row("v/sot-not-list", False),
    ]
    a = label_agreement(rows)
    assert a == {
        "list_prompts": 3,
        "other_prompts": 4,
        "recall": 2 / 3,
        "false_fork_rate": 1 / 4,
        "precision": 2 / 3,
        "accuracy": 5 / 7,
    }
    g = groups(rows)
    assert len(g["SoT label: a list"]) == 3 and len(g["SoT label: not a list"]) == 4
    assert label_agreement(rows[:3]) is None  # one label only: nothing to score against
    assert math.isnan(label_agreement([row("sot-list", False), row("sot-not-list", False)])["precision"])


def test_summary_scores_numbered_lists_apart_and_counts_repeat_ends():
    """The well-formed rate over all forked answers counts paragraph forks too; the numbered
    figures keep to forked answers that hold a numbered list."""
    from apar_spec.experiments.quality_summary import summarize, well_formed

    def row(text, forked, repeat_ends=0):
        return {
            "category": "c",
            "forked": forked,
            "apar_text": text,
            "ar_text": "x",
            "well_formed": well_formed(text) if forked else None,
            "ar_tokens": 5,
            "apar_tokens": 5,
            "max_new_tokens": 9,
            "ar_steps": 5,
            "apar_steps": 3,
            "steps_ratio": 0.6,
            "nll_ar": 1.0,
            "nll_apar": 1.0,
            "branches": 2 if forked else 1,
            "repeat_ends": repeat_ends,
        }

    rows = [
        row("Para one.\n\nPara two.", True),
        row("1. A: x.\n2. B: y.", True, 1),
        row("1. A: x.\n2. A: y.", True),
        row("1. A: x.", False),
        {k: v for k, v in row("Old.\n\nRow.", True).items() if k != "repeat_ends"},
    ]
    s = summarize(rows)["all"]
    assert s["well_formed_rate"] == 3 / 4 and s["numbered"] == 2 and s["well_formed_numbered"] == 1 / 2
    assert s["repeat_ended"] == 1


def test_cli_quality_on_a_sot_label_file_prints_the_fork_decision(tmp_path):
    from apar_spec.experiments.prompts import load_prompts
    from test_cli import run

    lists = [p.text for p in load_prompts("default", category="list")][:2]
    shorts = [p.text for p in load_prompts("default", category="short")][:2]
    csv = tmp_path / "labels.csv"
    csv.write_text("label;request\n" + "".join(f"1;{t}\n" for t in lists) + "".join(f"0;{t}\n" for t in shorts))
    args = [
        "quality",
        "--target",
        "tiny-apar",
        "--base",
        "tiny-base",
        "--prompts",
        str(csv),
        "--max-new-tokens",
        "40",
        "--out",
        str(tmp_path / "q.jsonl"),
    ]
    res = run(*args, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    forked = {r["prompt_id"]: r["forked"] for r in doc["rows"]}
    assert doc["labels"]["recall"] == (forked["L2"] + forked["L3"]) / 2
    assert doc["labels"]["false_fork_rate"] == (forked["L4"] + forked["L5"]) / 2
    assert doc["labels"]["recall"] > doc["labels"]["false_fork_rate"]  # the embedded model forks lists, not sums
    assert doc["by_category"]["SoT label: a list"]["prompts"] == 2
    text = run(*args)  # the table, then one line on the labels (rows read back)
    assert text.exit_code == 0, text.output
    assert f"forked {doc['labels']['recall']:.0%} of 2 list prompts" in text.stdout


def test_quality_rows_record_the_fork_router(tmp_path):
    """A target whose config holds a router: its gate decides which prompts may fork, rows record
    the threshold, each prompt's score and decision, and resume keys on the threshold."""
    import shutil

    from apar_spec.models.loading import embedded_dir

    folder = tmp_path / "tiny-apar-routed"
    shutil.copytree(embedded_dir("tiny-apar"), folder)
    config = json.loads((folder / "config.json").read_text())
    hidden = config["hidden_size"]
    config["apar_fork_router"] = {"weight": [0.0] * hidden, "bias": 0.0, "threshold": 0.75}  # p(list) = 0.5 everywhere
    (folder / "config.json").write_text(json.dumps(config))
    ps = select_prompts("default", limit=3)
    out = tmp_path / "q.jsonl"
    kw = dict(max_new_tokens=40, batch_size=3, dtype="float32", out=out)
    gated = run_quality(str(folder), "tiny-base", ps, **kw)  # the router's own threshold: 0.5 < 0.75, all gated
    assert [(r["fork_gate"], r["p_list"], r["forks_gated"], r["forked"]) for r in gated.rows] == [
        (0.75, 0.5, True, False)
    ] * 3
    assert gated.by_category["all"]["gated"] == 3
    free = run_quality(str(folder), "tiny-base", ps, **kw, fork_gate=0.25)  # 0.5 >= 0.25: decoded again, none gated
    assert [(r["fork_gate"], r["forks_gated"]) for r in free.rows] == [(0.25, False)] * 3
    assert any(r["forked"] for r in free.rows)  # tiny-apar forks on these when allowed
    off = run_quality("tiny-apar", "tiny-base", ps, **{**kw, "out": tmp_path / "plain.jsonl"})  # no router: no gate
    assert [(r["fork_gate"], r["p_list"], r["forks_gated"]) for r in off.rows] == [(0.0, None, False)] * 3


# ------------------------------------------------------------- the sibling-blind floor
def _reference_child(model, tokenizer, context: list[int], max_tokens: int) -> str:
    """One context at a time, full recompute, argmax: the first token may not break the line or
    end the answer; the text ends at EOS or is cut at its first line break."""
    from apar_spec.experiments.quality_floor import line_break_ids

    from apar_spec.api import eos_ids_of

    eos, breaks = eos_ids_of(model, tokenizer), set(line_break_ids(tokenizer))
    seq, new = list(context), []
    with torch.inference_mode():
        for step in range(max_tokens):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()  # [V]
            if step == 0:
                logits[sorted(breaks | eos)] = -math.inf
            t = int(logits.argmax())
            if t in eos:
                break
            seq.append(t)
            new.append(t)
            if t in breaks:
                break
    return tokenizer.decode(new, skip_special_tokens=True).split("\n", 1)[0]


def test_blind_children_equal_a_plain_one_context_at_a_time_loop():
    """Batched, left-padded ``generate`` with the first-token ban and the line-break stop gives the
    reference loop's texts, for contexts of different lengths in one batch."""
    from apar_spec.experiments.models import Loaded, encode_prompt
    from apar_spec.experiments.quality_floor import blind_children, line_break_ids
    from apar_spec.experiments.quality_nll import answer_ids

    import apar_spec

    bm, bt = apar_spec.load("tiny-base", dtype="float32")
    breaks = set(line_break_ids(bt))
    ps = select_prompts("default", limit=3)
    gens = apar_spec.generate(
        bm, bt, [encode_prompt(Loaded("tiny-base", bm, bt), p.text) for p in ps], mode="ar", max_new_tokens=40
    )
    contexts = []
    for g in gens:  # cut each answer at a few points: contexts of many lengths, some ending mid-line
        ans = answer_ids(bt, g.text)
        contexts += [g.prompt_ids + ans[:n] for n in (0, 3, len(ans) // 2)]
        # ... and where the base's own next token breaks the line: there the first-token ban decides
        contexts += [g.prompt_ids + ans[:n] for n, t in enumerate(ans) if t in breaks][:2]
    got = blind_children(bm, bt, contexts, max_tokens=12, batch_size=4)
    want = [_reference_child(bm, bt, c, 12) for c in contexts]
    assert got == want
    assert all(t and "\n" not in t for t in got)  # never empty (the first token is details), never past a line
    assert len(contexts) > 9  # the line-break contexts are there


def test_sibling_blind_answers_rewrite_each_child_from_its_parents_text_alone(monkeypatch):
    """Titles stay, each child is what the base writes after the prompt and the parent's text up to
    its fork (no earlier item's details), and an answer without forks comes back as it was."""
    from apar_spec.experiments import quality_floor as q

    import apar_spec

    bm, bt = apar_spec.load("tiny-base", dtype="float32")
    seen = []

    def fake_children(model, tokenizer, contexts, **kw):
        seen.extend(tokenizer.decode(c) for c in contexts)
        return [f" details {i}." for i in range(len(contexts))]

    monkeypatch.setattr(q, "blind_children", fake_children)
    answer = "Some tips:\n\n1. **Sleep**: Go to bed early.\n\n2. **Eat**: Eat well, see 1.\n\n3. **Walk**: Walk daily."
    plain = "Paris."
    out = q.sibling_blind_answers(bm, bt, [[1, 2], [1, 2]], [answer, plain])
    assert out[1] == (plain, 0)
    text, forks = out[0]
    assert forks == 3
    assert text == ("Some tips:\n\n1. **Sleep**: details 0.\n\n2. **Eat**: details 1.\n\n3. **Walk**: details 2.")
    assert len(seen) == 3
    assert seen[1].endswith("1. **Sleep**:\n\n2. **Eat**:") and "bed early" not in seen[1]
    assert "Eat well" not in seen[2] and seen[2].endswith("3. **Walk**:")


def test_quality_floor_rows_summary_resume_and_cli(tmp_path, monkeypatch):
    """``floor=True`` gives every row ``nll_floor`` (the base's NLL of its sibling-blind rewrite;
    an unforked answer's own), the summary its ratio, and a rerun reads the floor back."""
    from apar_spec.experiments import quality as q
    from apar_spec.experiments.models import Loaded, encode_prompt
    from typer.testing import CliRunner

    import apar_spec
    from cli.app import app

    ps = select_prompts("default", limit=4)
    out = tmp_path / "q.jsonl"
    kw = dict(max_new_tokens=80, batch_size=2, dtype="float32", out=out)
    s = run_quality("tiny-apar", "tiny-base", ps, **kw, floor=True)
    bm, bt = apar_spec.load("tiny-base", dtype="float32")
    saved = {r["prompt_id"]: r for r in map(json.loads, out.with_suffix(".floor.jsonl").read_text().splitlines())}
    assert sorted(saved) == sorted(p.id for p in ps)
    by_id = {p.id: p for p in ps}
    for r in s.rows:
        ids = encode_prompt(Loaded("tiny-base", bm, bt), by_id[r["prompt_id"]].text)
        text, forks = q.sibling_blind_answers(bm, bt, [ids], [r["ar_text"]])[0]
        assert (saved[r["prompt_id"]]["floor_text"], r["floor_forks"]) == (text, forks)
        want = q.mean_nll(bm, bt, [ids], [text])[0] if forks else r["nll_ar"]
        assert r["nll_floor"] == pytest.approx(want, rel=1e-5)
    assert any(r["floor_forks"] for r in s.rows)  # the embedded base answers in lists
    ratio = s.by_category["all"]["nll_ratio_floor"]
    assert ratio == pytest.approx(sum(r["nll_floor"] for r in s.rows) / sum(r["nll_ar"] for r in s.rows))
    assert math.isnan(run_quality("tiny-apar", "tiny-base", ps, **kw).by_category["all"]["nll_ratio_floor"])
    monkeypatch.setattr(q, "sibling_blind_answers", lambda *a, **k: pytest.fail("rewritten again on resume"))
    again = run_quality("tiny-apar", "tiny-base", ps, **kw, floor=True)
    assert [r["nll_floor"] for r in again.rows] == [r["nll_floor"] for r in s.rows]
    res = CliRunner().invoke(
        app,
        [
            "quality",
            "--target",
            "tiny-apar",
            "--base",
            "tiny-base",
            "--prompts",
            "default",
            "--limit",
            "4",
            "--max-new-tokens",
            "80",
            "--batch-size",
            "2",
            "--dtype",
            "float32",
            "--out",
            str(out),
            "--floor",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["by_category"]["all"]["nll_ratio_floor"] == pytest.approx(ratio)
    # interrupted after the first batch: the rest is rewritten, the first batch read back
    lines = out.with_suffix(".floor.jsonl").read_text().splitlines()
    out.with_suffix(".floor.jsonl").write_text("\n".join(lines[:2]) + "\n")
    monkeypatch.undo()
    calls = []
    part = run_quality("tiny-apar", "tiny-base", ps, **kw, floor=True, progress=lambda *a: calls.append(a))
    assert [r["nll_floor"] for r in part.rows] == pytest.approx([r["nll_floor"] for r in s.rows], rel=1e-5)
    assert calls == [(4, 4, "floor")]
    assert len(out.with_suffix(".floor.jsonl").read_text().splitlines()) == 4
