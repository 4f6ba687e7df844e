"""The benchmark drivers on micro models saved to disk: rows, baselines, resume, interrupts, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from apar_spec.experiments.bench import compare, sweep
from apar_spec.experiments.bench_files import read_rows
from apar_spec.experiments.bench_plan import CONFIGS, BenchSettings, parse_modes
from micro import WORDS, micro_model, micro_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from apar_spec.options import DecodeOptions

FAST = dict(max_new_tokens=8, repeats=1, warmup=0, limit=2)


def save_micro(root: Path, name: str, seed: int, tokenizer=None) -> str:
    path = root / name
    micro_model(seed=seed).save_pretrained(path)  # float64: greedy equality without near-ties
    (tokenizer or micro_tokenizer()).save_pretrained(path)
    return str(path)


def alien_tokenizer() -> PreTrainedTokenizerFast:
    """Same size as the micro vocabulary, other words and no [Fork]/[Child]: a draft that must be refused."""
    words = WORDS[:3] + [f"x{i}" for i in range(len(WORDS) - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="x0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def make_micro_setup(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"prompt": "w5 w6 w7 w5 w6", "id": "p1", "category": "copy"},
                {"prompt": "w9 w10 w11", "id": "p2", "category": "plain"},
                {"prompt": "w12 w13", "id": "p3", "category": "plain"},
            ]
        )
    )
    return {
        "target": save_micro(root, "target", 0),
        "base": save_micro(root, "base", 2),
        "draft": save_micro(root, "draft", 1),
        "alien": save_micro(root, "alien", 3, alien_tokenizer()),
        "prompts": str(prompts),
    }


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> dict:
    return make_micro_setup(tmp_path_factory.mktemp("micro"))


def settings(micro, tmp_path, **kw) -> BenchSettings:
    base = dict(
        target=micro["target"], draft="ngram", prompts=micro["prompts"], out=tmp_path / "r.jsonl", device="cpu", **FAST
    )
    base.update(kw)
    return BenchSettings(**base)


ROW_KEYS = {
    "schema",
    "setup_id",
    "variant",
    "config",
    "prompt_id",
    "category",
    "repeat",
    "model",
    "draft",
    "k",
    "temperature",
    "max_new_tokens",
    "device",
    "dtype",
    "prompt_tokens",
    "tokens",
    "answer_tokens",
    "wall_s",
    "tokens_per_s",
    "target_steps",
    "draft_forwards",
    "tokens_generated",
    "peak_live_kv",
    "mean_live_kv",
    "attended_keys",
    "critical_path",
    "wall_time_s",
    "num_branches",
    "accepted",
    "drafted",
    "mean_acceptance_length",
    "acceptance_rate_per_position",
    "steps_per_critical_path",
    "steps_per_token",
    "output_ids",
    "text",
    "time",
}


def test_compare_writes_one_row_per_config_prompt_repeat(micro, tmp_path):
    s = settings(micro, tmp_path, modes="hf-generate,ar,apar,spec", repeats=2)
    events = []
    result = compare(s, progress=events.append)
    rows = read_rows(s.out)
    assert result.written == len(rows) == 4 * 2 * 2 and not result.interrupted
    assert events[0].row is None and events[-1].done == events[-1].total == len(rows)
    # interleaved: each prompt/repeat runs every configuration before the next repeat
    assert [r["variant"] for r in rows[:4]] == ["hf-generate", "ar", "apar", "spec"]
    assert [(r["prompt_id"], r["repeat"]) for r in rows[::4]] == [("p1", 0), ("p1", 1), ("p2", 0), ("p2", 1)]
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["tokens"] == r["tokens_generated"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["wall_s"])
        assert r["model"] == Path(micro["target"]).name  # rows show a short name, not the path
    by = {(r["variant"], r["prompt_id"], r["repeat"]): r for r in rows}
    for p in ("p1", "p2"):  # greedy float64: the lossless pairs agree token for token
        assert by[("ar", p, 0)]["output_ids"] == by[("hf-generate", p, 0)]["output_ids"]
        assert by[("spec", p, 0)]["output_ids"] == by[("ar", p, 0)]["output_ids"]
    spec, ar = by[("spec", "p1", 0)], by[("ar", "p1", 0)]
    assert spec["draft"] == "ngram" and spec["k"] == s.k and ar["draft"] is None and ar["k"] is None
    assert ar["mean_acceptance_length"] == 1.0 and ar["drafted"] == 0
    hf = by[("hf-generate", "p1", 0)]
    assert hf["target_steps"] == hf["tokens"] and hf["peak_live_kv"] is None and hf["hf"]["do_sample"] is False
    assert (
        by[("apar", "p1", 0)]["max_depth"] == DecodeOptions.max_depth and ar["max_depth"] is None
    )  # the cap apar ran under
    capped = settings(micro, tmp_path / "capped", modes="apar", max_depth=1)
    assert capped.setup_id() != settings(micro, tmp_path / "capped", modes="apar").setup_id()
    compare(capped)
    assert {r["max_depth"] for r in read_rows(capped.out)} == {1}
    assert by[("apar", "p1", 0)]["depth_cap"] == DecodeOptions.depth_cap and ar["depth_cap"] is None
    masked = settings(micro, tmp_path / "masked", modes="apar", depth_cap="mask")
    assert masked.setup_id() != settings(micro, tmp_path / "masked", modes="apar").setup_id()
    compare(masked)
    assert {r["depth_cap"] for r in read_rows(masked.out)} == {"mask"}
    assert by[("apar", "p1", 0)]["repeated_title"] == DecodeOptions.repeated_title and ar["repeated_title"] is None
    kept = settings(micro, tmp_path / "kept", modes="apar", repeated_title="keep")
    assert kept.setup_id() != settings(micro, tmp_path / "kept", modes="apar").setup_id()
    compare(kept)
    assert {r["repeated_title"] for r in read_rows(kept.out)} == {"keep"}
    assert by[("apar", "p1", 0)]["fork_bias"] == DecodeOptions.fork_bias and ar["fork_bias"] is None
    biased = settings(micro, tmp_path / "biased", modes="apar", fork_bias=-50.0)
    assert biased.setup_id() != settings(micro, tmp_path / "biased", modes="apar").setup_id()
    compare(biased)
    assert max(r["num_branches"] for r in rows if r["variant"] == "apar") > 1
    assert {(r["fork_bias"], r["num_branches"]) for r in read_rows(biased.out)} == {(-50.0, 1)}  # no fork survives it


def test_base_model_runs_the_sequential_configs(micro, tmp_path):
    s = settings(micro, tmp_path, base=micro["base"], modes="hf-generate,ar,apar", limit=1)
    result = compare(s)
    rows = {r["variant"]: r for r in read_rows(s.out)}
    assert rows["ar"]["model"] == rows["hf-generate"]["model"] == Path(micro["base"]).name
    assert rows["apar"]["model"] == Path(micro["target"]).name
    base, target = Path(micro["base"]).name, Path(micro["target"]).name
    assert result.models == {"hf-generate": base, "ar": base, "apar": target}


def test_draft_model_and_hf_assisted(micro, tmp_path):
    s = settings(micro, tmp_path, draft=micro["draft"], modes="hf-generate,hf-assisted,spec", limit=1, k=2)
    compare(s)
    rows = {r["variant"]: r for r in read_rows(s.out)}
    assert rows["hf-assisted"]["draft_forwards"] > 0 and rows["spec"]["draft_forwards"] > 0
    assert rows["hf-assisted"]["hf"]["num_assistant_tokens"] == 2
    # HF takes k from the assistant's own generation config: check it really drafted k=2 per round
    assert rows["hf-assisted"]["draft_forwards"] <= 2 * rows["hf-assisted"]["target_steps"]
    assert rows["hf-assisted"]["tokens"] <= 3 * rows["hf-assisted"]["target_steps"]
    assert rows["hf-assisted"]["output_ids"] == rows["hf-generate"]["output_ids"]


def test_resume_skips_finished_rows_and_refuses_other_setups(micro, tmp_path):
    s = settings(micro, tmp_path, modes="ar,apar")
    assert compare(s).written == 4
    before = read_rows(s.out)
    again = compare(settings(micro, tmp_path, modes="ar,apar", repeats=2, resume=True))
    assert (again.skipped, again.written) == (4, 4)
    after = read_rows(s.out)
    assert after[:4] == before and len(after) == 8
    assert {(r["variant"], r["prompt_id"], r["repeat"]) for r in after[4:]} == {
        (v, p, 1) for v in ("ar", "apar") for p in ("p1", "p2")
    }
    nothing = compare(settings(micro, tmp_path, modes="ar,apar", repeats=2, resume=True))
    assert nothing.written == 0 and nothing.skipped == 8
    with pytest.raises(ValueError, match="different setup"):
        compare(settings(micro, tmp_path, modes="ar", max_new_tokens=4, resume=True))
    with pytest.raises(ValueError, match="already holds 8 rows; pass --resume"):
        compare(settings(micro, tmp_path, modes="ar"))
    assert compare(settings(micro, tmp_path, modes="ar", limit=1, overwrite=True)).written == 1
    assert len(read_rows(s.out)) == 1


def test_ctrl_c_keeps_finished_rows(micro, tmp_path):
    s = settings(micro, tmp_path, modes="ar,apar")

    def interrupt_after_three(event):
        if event.done == 3:
            raise KeyboardInterrupt

    def interrupt_at_start(event):
        if event.row is None:
            raise KeyboardInterrupt

    assert compare(s, progress=interrupt_at_start).interrupted  # even before the first row: clean stop
    result = compare(settings(micro, tmp_path, modes="ar,apar", resume=True), progress=interrupt_after_three)
    assert result.interrupted and result.written == 3
    assert len(read_rows(s.out)) == 3
    with s.out.open("a") as f:  # a row cut short by a hard kill
        f.write('{"variant": "ar", "prom')
    finished = compare(settings(micro, tmp_path, modes="ar,apar", resume=True))
    assert (finished.skipped, finished.written) == (3, 1)
    assert len(read_rows(s.out)) == 4 and s.out.read_text().count("\n") == 4


def test_sweep_labels_every_draft_and_k(micro, tmp_path):
    s = settings(micro, tmp_path, modes="ar,spec", limit=1)
    sweep(s, drafts=["ngram", micro["draft"]], ks=[1, 3])
    variants = [r["variant"] for r in read_rows(s.out)]
    assert variants[0] == "ar"
    assert set(variants[1:]) == {f"spec {d} k={k}" for d in ("ngram", micro["draft"]) for k in (1, 3)}
    ks = {r["variant"]: r["k"] for r in read_rows(s.out)}
    assert ks["spec ngram k=3"] == 3


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"modes": "ar,sepc"}, "unknown mode 'sepc'.*did you mean 'spec'"),
        ({"repeats": 0}, "--repeats must be >= 1"),
        ({"warmup": -1}, "--warmup must be >= 0"),
        ({"k": 0}, "-k must be >= 1"),
        ({"max_new_tokens": 0}, "max_new_tokens must be > 0"),
        ({"resume": True, "overwrite": True}, "contradict"),
    ],
)
def test_bad_settings_fail_before_anything_runs(micro, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        compare(settings(micro, tmp_path, **kw))
    assert not (tmp_path / "r.jsonl").exists()


def test_bad_inputs_found_before_the_first_row(micro, tmp_path):
    with pytest.raises(ValueError, match="does not fit the target's vocabulary"):
        compare(settings(micro, tmp_path, draft=micro["alien"], modes="ar,spec"))
    with pytest.raises(ValueError, match="unknown draft 'ngarm'.*ngram"):
        compare(settings(micro, tmp_path, draft="ngarm", modes="spec"))
    with pytest.raises(ValueError, match="unknown category 'plian'.*did you mean 'plain'"):
        compare(settings(micro, tmp_path, category="plian"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot write the output file"):
        compare(settings(micro, tmp_path, out=blocker / "r.jsonl"))
    with pytest.raises(ValueError, match="is a directory"):
        compare(settings(micro, tmp_path, out=tmp_path))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            compare(settings(micro, tmp_path, device="cuda"))
    assert not (tmp_path / "r.jsonl").exists()


def test_apar_modes_need_an_apar_target(micro, tmp_path, tmp_path_factory):
    plain_tok = alien_tokenizer()  # no [Fork]/[Child]
    plain = save_micro(tmp_path_factory.mktemp("plain"), "plain", 0, plain_tok)
    with pytest.raises(ValueError, match="mode 'apar' cannot run: target .* no \\[Fork\\]/\\[Child\\]"):
        compare(settings(micro, tmp_path, target=plain, prompts="default", modes="ar,apar", limit=1))
    # by default (no --modes) the APAR configurations are skipped with a note instead
    prompts = tmp_path / "x.txt"
    prompts.write_text("x5 x6 x7\n")
    result = compare(settings(micro, tmp_path, target=plain, prompts=str(prompts), draft="ngram", limit=1))
    assert any(n.startswith("apar skipped") for n in result.notes)
    assert {r["config"] for r in read_rows(result.out)} == {"hf-generate", "hf-assisted", "ar", "spec"}


def test_parse_modes():
    assert parse_modes("ar, apar,ar") == ["ar", "apar"]
    assert parse_modes(["spec,apar+spec"]) == ["spec", "apar+spec"]
    assert set(CONFIGS) == {"hf-generate", "hf-assisted", "ar", "apar", "spec", "apar+spec"}
    with pytest.raises(ValueError, match="empty"):
        parse_modes(" , ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_gpu_check_refuses_without_cuda(tmp_path, capsys):
    from apar_spec.experiments import gpu_check

    assert gpu_check.main([str(tmp_path / "out")]) == 2
    assert "needs CUDA" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cpu_runs_use_one_thread_by_default_and_restore_it(micro, tmp_path):
    before = torch.get_num_threads()
    seen = []
    compare(settings(micro, tmp_path, modes="ar", limit=1), progress=lambda e: seen.append(torch.get_num_threads()))
    assert set(seen) == {1} and torch.get_num_threads() == before
    assert read_rows(tmp_path / "r.jsonl")[0]["threads"] == 1
    compare(settings(micro, tmp_path, modes="ar", limit=1, threads=2, overwrite=True))
    assert read_rows(tmp_path / "r.jsonl")[0]["threads"] == 2 and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        settings(micro, tmp_path, threads=0)


def test_hf_assisted_drafts_exactly_k_and_leaves_the_assistant_as_it_was():
    from apar_spec.experiments.hf_baselines import hf_generate

    target, twin, tok = micro_model(seed=0), micro_model(seed=0), micro_tokenizer()  # twin: every draft accepted
    ids = tok("w5 w6 w7")["input_ids"]
    before = twin.generation_config.to_dict()
    plain = hf_generate(target, tok, ids, max_new_tokens=12, eos_ids={2})
    run = hf_generate(target, tok, ids, max_new_tokens=12, eos_ids={2}, assistant_model=twin, num_assistant_tokens=2)
    assert run.token_ids == plain.token_ids
    # every draft is accepted, so exactly k + 1 = 3 tokens a target forward; HF's defaults (20 drafts
    # a round, confidence early-stop at 0.4) give another count
    assert len(run.token_ids) == 12 and run.target_forwards == 12 // 3
    assert twin.generation_config.to_dict() == before
