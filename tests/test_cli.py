"""CliRunner tests for every command; heavy calls run on micro models saved to a temp dir."""

from __future__ import annotations

import json

import pytest
import torch
from apar_spec.cli.app import app
from apar_spec.experiments import bench_runner as bench_module
from apar_spec.experiments.bench_files import read_rows
from test_bench import make_micro_setup
from typer.testing import CliRunner

runner = CliRunner()
FAST = ["--max-new-tokens", "8", "--repeats", "1", "--warmup", "0", "--limit", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> dict:
    return make_micro_setup(tmp_path_factory.mktemp("cli_micro"))


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> None:
    """One 'Error: ...' line on stderr, exit code 2, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def bench_args(micro, out, *extra: str) -> list[str]:
    return [
        "bench",
        "--model",
        micro["target"],
        "--draft",
        "ngram",
        "--prompts",
        micro["prompts"],
        "--out",
        out,
        *FAST,
        *extra,
    ]


def test_help_lists_every_command():
    result = run("--help")
    assert result.exit_code == 0
    for cmd in ("generate", "bench", "sweep", "report", "convert", "train", "drafts"):
        assert cmd in result.stdout
    bench_help = run("bench", "--help").stdout
    for opt in (
        "--model",
        "--base",
        "--draft",
        "--modes",
        "--prompts",
        "--category",
        "--limit",
        "--max-new-tokens",
        "-k",
        "--temperature",
        "--seed",
        "--repeats",
        "--warmup",
        "--dtype",
        "--device",
        "--chat-template",
        "--out",
        "--resume",
        "--json",
    ):
        assert opt in bench_help, opt
    assert "--live" in run("generate", "--help").stdout
    for cmd in ("generate", "bench", "sweep", "serve", "load-bench", "quality", "train-heads"):
        shown = run(cmd, "--help").stdout
        assert "--model" in shown and "Target model" in shown and "--target" not in shown, cmd  # the old name: hidden


def test_bench_model_and_its_old_name_target(micro, tmp_path):
    """``--model`` names the target in bench; ``--target``, its old name, still works (hidden)."""
    rows = {}
    for name in ("--model", "--target"):
        out = tmp_path / f"{name.strip('-')}.jsonl"
        args = bench_args(micro, out, "--modes", "ar", "--limit", "1", "--json")
        args[args.index("--model")] = name
        result = run(*args)
        assert result.exit_code == 0, result.output
        rows[name] = [(r["setup_id"], r["variant"], r["output_ids"]) for r in read_rows(out)]
    assert rows["--model"] == rows["--target"]
    assert_user_error(run(*bench_args(micro, tmp_path / "x.jsonl", "--target", micro["alien"])), "--model and --target")
    assert_user_error(run("train-heads", "--data", "corpus:4", "--out", tmp_path / "h"), "Missing option '--model'")


def test_generate_prints_answer_and_stats(micro):
    result = run("generate", "w5 w6 w7", "--model", micro["target"], "--mode", "ar", "--max-new-tokens", "6")
    assert result.exit_code == 0, result.output
    assert "target steps: 6" in result.stdout and "tokens generated (all branches): 6" in result.stdout
    assert "\x1b[" not in result.stdout  # plain text when piped


def test_generate_json_and_spec_modes(micro):
    result = run(
        "generate",
        "w5 w6 w7 w5 w6",
        "--model",
        micro["target"],
        "--mode",
        "apar+spec",
        "--draft",
        "ngram",
        "-k",
        "3",
        "--max-new-tokens",
        "8",
        "--json",
        "--live",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["mode"] == "apar+spec" and data["draft"] == "ngram"
    assert data["stats"]["tokens_generated"] == 8 and data["stats"]["drafted"] >= 0
    ar = json.loads(
        run(
            "generate",
            "w5 w6 w7 w5 w6",
            "--model",
            micro["target"],
            "--mode",
            "apar",
            "--max-new-tokens",
            "8",
            "--json",
        ).stdout
    )
    assert ar["token_ids"] == data["token_ids"]  # apar+spec is lossless against apar
    assert ar["stats"]["mean_acceptance_length"] == 1.0


def test_generate_bad_input(micro):
    assert_user_error(
        run("generate", "hi", "--model", micro["target"], "--mode", "sepc"),
        "unknown mode 'sepc'",
        "did you mean 'spec'",
    )
    assert_user_error(
        run("generate", "hi", "--model", micro["target"], "--mode", "ar", "--draft", "ngram"), "--draft is only used"
    )
    assert_user_error(run("generate", "hi", "--model", "tiny-aparr"), "Did you mean 'tiny-apar'")
    assert_user_error(
        run("generate", "hi", "--model", micro["target"], "--mode", "spec", "--draft", micro["alien"]),
        "does not fit the target's vocabulary",
    )
    assert_user_error(run("generate", "hi", "--model", micro["target"], "--chat-template"), "has no chat template")
    assert_user_error(
        run("generate", "hi", "--model", micro["target"], "--mode", "apar", "--max-depth", "-1"), "max_depth"
    )
    assert_user_error(
        run("generate", "hi", "--model", micro["target"], "--mode", "apar", "--depth-cap", "stop"),
        "depth_cap must be one of end, mask",
    )
    assert_user_error(
        run("generate", "hi", "--model", micro["target"], "--mode", "apar", "--fork-bias", "inf"),
        "fork_bias must be a finite number",
    )
    assert_user_error(
        run("generate", "hi", "--model", micro["target"], "--mode", "apar", "--repeated-title", "stop"),
        "repeated_title must be one of end, keep",
    )
    assert_user_error(
        run("generate", "hi", "--model", micro["target"], "--mode", "apar", "--fork-gate", "2"),
        "fork_gate must be a number in [0, 1]",
    )
    assert_user_error(
        run("generate", "hi", "--model", micro["target"], "--mode", "apar", "--fork-gate", "0.5"),
        "needs a model with a fork router",
    )


def test_bench_resume_and_report(micro, tmp_path):
    out = tmp_path / "r.jsonl"
    first = run(*bench_args(micro, out, "--modes", "hf-generate,ar,spec"))
    assert first.exit_code == 0, first.output
    assert len(read_rows(out)) == 6
    assert "lossless" in first.stdout and "yes 2/2" in first.stdout and "speed-up vs AR" in first.stdout
    assert "6 new row(s)" in first.stderr
    again = run(*bench_args(micro, out, "--modes", "hf-generate,ar,spec", "--repeats", "2", "--resume"))
    assert again.exit_code == 0, again.output
    assert "6 new row(s)" in again.stderr and "6 kept from before" in again.stderr
    assert len(read_rows(out)) == 12
    plain = run("report", out)
    assert plain.exit_code == 0 and "category copy" in plain.stdout and "category plain" in plain.stdout
    data = json.loads(run("report", out, "--json").stdout)
    ar = next(v for v in data["groups"]["all"] if v["variant"] == "ar")
    assert ar["speedup_vs_ar"] == pytest.approx(1.0)
    assert ar["lossless"]["reference"] == "hf-generate" and ar["lossless"]["equal"] == ar["lossless"]["compared"] == 2
    assert data["repeats"] == 2


def test_bench_json_report(micro, tmp_path):
    result = run(*bench_args(micro, tmp_path / "r.jsonl", "--modes", "ar,apar", "--limit", "1", "--json"))
    assert result.exit_code == 0, result.output
    assert {v["variant"] for v in json.loads(result.stdout)["groups"]["all"]} == {"ar", "apar"}


def test_bench_ctrl_c_exits_130_and_keeps_rows(micro, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = bench_module._Runner.measure

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(bench_module._Runner, "measure", flaky)
    out = tmp_path / "r.jsonl"
    result = run(*bench_args(micro, out, "--modes", "ar,apar"))
    assert result.exit_code == 130
    assert "Interrupted" in result.stderr and "--resume" in result.stderr
    assert len(read_rows(out)) == 2


def _prompt_file(tmp_path, text: str, name: str = "p.jsonl") -> str:
    f = tmp_path / name
    f.write_text(text)
    return str(f)


@pytest.mark.parametrize(
    "make_args, fragments",
    [
        (lambda m, t: ["--prompts", str(t / "missing.txt")], ["prompt file", "not found"]),
        (lambda m, t: ["--prompts", _prompt_file(t, '{"prompt": "w5"}\n{"prompt": \n')], ["line 2: invalid JSON"]),
        (lambda m, t: ["--modes", "ar,aparspec"], ["unknown mode 'aparspec'", "did you mean 'apar+spec'"]),
        (lambda m, t: ["--draft", "ngarm", "--modes", "spec"], ["unknown draft 'ngarm'", "ngram"]),
        (lambda m, t: ["--category", "plian"], ["unknown category 'plian'", "did you mean 'plain'"]),
        (lambda m, t: ["--repeats", "0"], ["--repeats must be >= 1"]),
        (lambda m, t: ["--draft", m["alien"], "--modes", "ar,spec"], ["does not fit the target's vocabulary"]),
        (lambda m, t: ["--out", str(_blocker(t) / "r.jsonl")], ["cannot write the output file"]),
        (lambda m, t: ["--prompts", _prompt_file(t, '{"question": "w5"}\n')], ["line 1: needs a 'prompt'"]),
    ],
)
def test_bench_bad_input_is_one_line_and_keeps_rows(micro, tmp_path, make_args, fragments):
    out = tmp_path / "kept.jsonl"
    ok = run(*bench_args(micro, out, "--modes", "ar", "--limit", "1"))
    assert ok.exit_code == 0, ok.output
    before = out.read_text()
    extra = make_args(micro, tmp_path)
    result = run(*bench_args(micro, out, "--modes", "ar", "--resume"), *extra)
    assert_user_error(result, *fragments)
    assert out.read_text() == before  # finished rows kept, nothing appended


def _blocker(tmp_path):
    f = tmp_path / "not_a_dir"
    f.write_text("")
    return f


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_bench_cuda_without_cuda(micro, tmp_path):
    args = bench_args(micro, tmp_path / "r.jsonl")
    args[args.index("--device") + 1] = "cuda"
    assert_user_error(run(*args), "CUDA is not available")


def test_bench_existing_results_need_resume_or_overwrite(micro, tmp_path):
    out = tmp_path / "r.jsonl"
    assert run(*bench_args(micro, out, "--modes", "ar", "--limit", "1")).exit_code == 0
    assert_user_error(run(*bench_args(micro, out, "--modes", "ar", "--limit", "1")), "pass --resume")
    assert run(*bench_args(micro, out, "--modes", "ar", "--limit", "1", "--overwrite")).exit_code == 0


def test_sweep_command(micro, tmp_path):
    out = tmp_path / "s.jsonl"
    result = run(
        "sweep",
        "--target",
        micro["target"],
        "--prompts",
        micro["prompts"],
        "--drafts",
        "ngram",
        "--ks",
        "1,2",
        "--modes",
        "ar,spec",
        "--out",
        out,
        *FAST,
        "--limit",
        "1",
    )
    assert result.exit_code == 0, result.output
    assert [r["variant"] for r in read_rows(out)] == ["ar", "spec ngram k=1", "spec ngram k=2"]
    assert_user_error(run("sweep", "--ks", "1,x", "--out", tmp_path / "x.jsonl"), "--ks must be a comma-separated list")


def test_report_bad_input(tmp_path):
    assert_user_error(run("report", tmp_path / "nope.jsonl"), "results file not found")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_user_error(run("report", empty), "no rows")


def test_convert_reports_bad_rows_and_missing_input(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"prompt": "Give 2 tips.", "answer": "Tips:\n1. Sleep: go to bed early.\n2. Water: drink more."})
        + "\n"
        + "{not json}\n"
    )
    result = run("convert", src, tmp_path / "out.jsonl")
    assert result.exit_code == 0, result.output
    assert (
        "read 2 rows, wrote 1" in result.stdout and "1 bad" in result.stdout and "line 2: invalid JSON" in result.stdout
    )
    assert (tmp_path / "out.jsonl").is_file()
    data = json.loads(run("convert", src, tmp_path / "out2.jsonl", "--json").stdout)
    assert data["rows_written"] == 1 and data["bad_rows"][0][0] == 2
    assert_user_error(run("convert", tmp_path / "missing.jsonl", tmp_path / "o.jsonl"), "input file not found")
    assert_user_error(run("convert", src, tmp_path / "o.jsonl", "--whole-lead", "-1"), "--whole-lead must be >= 0")


def test_convert_whole_lead(tmp_path):
    src = tmp_path / "in.jsonl"
    answer = "Rest well. Sleep more.\n\nMove daily. Walk often.\n\nEat well. Cook often."
    src.write_text(json.dumps({"prompt": "Health tips?", "answer": answer}) + "\n")
    forks = {}
    for n in ("0", "1"):
        assert run("convert", src, tmp_path / f"out{n}.jsonl", "--whole-lead", n).exit_code == 0
        tree = json.loads((tmp_path / f"out{n}.jsonl").read_text())["tree"]
        forks[n] = len(tree["forks"])
    assert forks == {"0": 3, "1": 2}


def test_train_command(micro, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": "w5 w6", "answer": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(8, 12))
    )
    out = tmp_path / "trained"
    result = run(
        "train",
        "--model",
        micro["target"],
        "--data",
        data,
        "--out",
        out,
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--mode",
        "plain",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == 1 and (out / "config.json").is_file()
    assert_user_error(
        run("train", "--model", micro["target"], "--data", tmp_path / "none.jsonl", "--out", out, "--steps", "1")
    )
    assert_user_error(
        run(
            "train",
            "--model",
            micro["target"],
            "--data",
            data,
            "--out",
            tmp_path / "neg",
            "--steps",
            "1",
            "--root-eos",
            "-1",
            "--root-eos-lead-only",
        )
    )
    assert_user_error(
        run(
            "train",
            "--model",
            micro["target"],
            "--data",
            data,
            "--out",
            tmp_path / "scope",
            "--steps",
            "1",
            "--distill",
            "0.5",
            "--distill-hard-roots",
            "some",
        )
    )


def test_drafts_list_and_show():
    listed = run("drafts", "list")
    assert listed.exit_code == 0 and "ngram" in listed.stdout
    from apar_spec.drafts import registry

    heads_line = next(line for line in listed.stdout.splitlines() if line.startswith("tiny-heads "))
    assert f" {registry.get('tiny-heads').acceptance_length:.2f} " in heads_line  # the measured acceptance is listed
    names = {e["name"] for e in json.loads(run("drafts", "list", "--json").stdout)}
    assert {"ngram", "tiny-draft"} <= names
    shown = run("drafts", "show", "ngram")
    assert shown.exit_code == 0 and "kind: ngram" in shown.stdout
    assert json.loads(run("drafts", "show", "tiny-draft", "--json").stdout)["kind"] == "model"
    assert_user_error(run("drafts", "show", "ngrm"), "unknown draft 'ngrm'", "ngram")


def test_live_view_shows_branches_and_returns_the_same_answer():
    import io

    from apar_spec.cli.live import generate_live
    from micro import fork_processor, micro_model, micro_tokenizer
    from rich.console import Console

    from apar_spec.api import generate

    model, tok = micro_model(), micro_tokenizer()
    ids = tok("w5 w6 w7")["input_ids"]
    kw = dict(mode="apar", max_new_tokens=30, logits_processor=fork_processor())
    buf = io.StringIO()
    live = generate_live(model, tok, ids, console=Console(file=buf, force_terminal=True, width=120), **kw)
    plain = generate(model, tok, [ids], **kw)[0]
    assert live.token_ids == plain.token_ids and live.stats.num_branches == plain.stats.num_branches > 1
    shown = buf.getvalue()
    assert "b1" in shown and "decoding" in shown and "step " in shown
