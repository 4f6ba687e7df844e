"""``apar-spec bench``, ``sweep`` and ``report``: timed comparisons and their summary.

``bench`` calls ``experiments.bench.compare``, ``sweep`` calls ``experiments.bench.sweep``;
both take the option groups ``ModelPair`` and ``BenchRun`` (``cli/options.py``), declared
once, plus their own few options. ``report`` calls ``experiments.report.summarize``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from apar_spec.experiments.bench import sweep as run_sweep
from apar_spec.experiments.bench_plan import BenchSettings

from .errors import EXIT_INTERRUPTED, fail, handle_errors
from .options import AsJson, BenchRun, ModelPair, Modes, Strict, default, with_groups
from .output import print_json, quiet_transformers, stdout_console
from .progress import ensure_packaged_base


@handle_errors
@with_groups
def bench(
    models: ModelPair,
    draft: Annotated[
        Optional[str],
        typer.Option(
            "--draft",
            help="Draft: registry name (see `apar-spec drafts list`), model path, or a union 'a+b:8' (b adds an "
            "8-token chain to a's tree). Default: tiny-draft for embedded targets, else ngram.",
        ),
    ] = None,
    modes: Modes = None,
    k: Annotated[
        str,
        typer.Option(
            "-k",
            help="Draft tokens per branch per step (spec, apar+spec, hf-assisted), or 'auto' (the cost model picks).",
        ),
    ] = str(default(BenchSettings, "k")),
    tree: Annotated[
        Optional[str],
        typer.Option(
            "--tree", help="Draft tree per branch for spec/apar+spec: K, chain:K, topk:WxD or a JSON path list."
        ),
    ] = default(BenchSettings, "tree"),
    max_step_tokens: Annotated[
        Optional[int],
        typer.Option(
            "--max-step-tokens",
            help="Cap on the tokens one target forward takes (pending + drafts over all live branches; "
            "spec/apar+spec). Default: no cap.",
        ),
    ] = default(BenchSettings, "max_step_tokens"),
    run: BenchRun = BenchRun(),
) -> None:
    """Compare configurations on a prompt set (defaults: the embedded models, offline)."""
    from apar_spec.experiments.bench import compare

    quiet_transformers()
    ensure_packaged_base(stdout_console(stderr=True), models.model, models.base, draft)
    settings = run.settings(
        models, draft=draft, modes=modes, k=_k_option(k), tree=tree, max_step_tokens=max_step_tokens
    )
    note = stdout_console(stderr=True)
    _run_with_progress(
        lambda progress: compare(settings, progress=progress, say=lambda m: note.print(m, markup=False)),
        settings,
        run.as_json,
        run.strict,
    )


@handle_errors
@with_groups
def sweep(
    models: ModelPair,
    drafts: Annotated[
        str,
        typer.Option(
            "--drafts", help="Comma-separated drafts (registry names, paths or unions such as 'smollm2-hydra+ngram:8')."
        ),
    ] = "ngram",
    ks: Annotated[str, typer.Option("--ks", help="Comma-separated draft lengths ('' = none).")] = "1,2,4,8",
    trees: Annotated[
        str, typer.Option("--trees", help="Semicolon-separated draft tree shapes, e.g. 'topk:2x3;[[0],[1],[0,0]]'.")
    ] = ";".join(default(run_sweep, "trees")),
    step_caps: Annotated[
        str,
        typer.Option(
            "--step-caps",
            help="Comma-separated caps on the tokens one target forward takes, 'none' = no cap, e.g. 'none,8,12'.",
        ),
    ] = ",".join("none" if c is None else str(c) for c in default(run_sweep, "step_caps")),
    modes: Annotated[
        Optional[str],
        typer.Option(
            "--modes", help="Configurations; draft ones (spec, apar+spec, hf-assisted) are swept. Default: all."
        ),
    ] = None,
    run: BenchRun = BenchRun(out=Path("sweep.jsonl")),
) -> None:
    """Sweep draft length k, draft tree shape and draft choice, next to the ar/apar/hf-generate baselines."""
    quiet_transformers()
    ensure_packaged_base(stdout_console(stderr=True), models.model, models.base, drafts)
    draft_list = _csv(drafts, "--drafts")
    k_list = _csv(ks, "--ks", int) if ks.strip() or not trees.strip() else []
    tree_list = [t.strip() for t in trees.split(";") if t.strip()]
    cap_list = _csv(step_caps, "--step-caps", lambda x: None if x.lower() == "none" else int(x))
    settings = run.settings(
        models, draft=draft_list[0], modes=modes, k=max(k_list, default=default(BenchSettings, "k"))
    )
    _run_with_progress(
        lambda progress: run_sweep(
            settings, drafts=draft_list, ks=k_list, trees=tree_list, step_caps=cap_list, progress=progress
        ),
        settings,
        run.as_json,
        run.strict,
    )


@handle_errors
def report(
    results: Annotated[Path, typer.Argument(help="A results file written by `apar-spec bench` or `sweep`.")],
    as_json: AsJson = False,
    strict: Strict = False,
) -> None:
    """Summarise a results file: speed-ups, steps, acceptance, KV, lossless checks."""
    summary = _print_report(results, as_json)
    if strict:
        _check_strict(summary)


def _k_option(k: str) -> int | str:
    """``-k``: an integer or 'auto'."""
    if k.strip() == "auto":
        return "auto"
    try:
        return int(k)
    except ValueError:
        fail(f"-k must be >= 1 (an integer) or 'auto' (got '{k}')")


def _csv(value: str, what: str, cast=str) -> list:
    try:
        items = [cast(x.strip()) for x in value.split(",") if x.strip()]
    except ValueError:
        fail(f"{what} must be a comma-separated list, got '{value}'")
    if not items:
        fail(f"{what} is empty")
    return items


def _run_with_progress(run, settings, as_json: bool, strict: bool = False) -> None:
    """Run a driver with a progress bar (stderr), then print the report of the whole file.
    Under a data-parallel launch only the main process shows progress and the report."""
    from apar_spec.experiments.parallel import Processes

    err = stdout_console(stderr=True)
    if not Processes.current(settings.device).is_main:
        run(None)  # its rows go to its shard; the main process merges them and reports
        return
    if err.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("[bold]bench"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=err,
            transient=True,
        )
        task = bar.add_task("loading models…", total=None)

        def progress(event) -> None:
            desc = (
                ""
                if event.row is None
                else f"{event.row['variant']} · {event.row['prompt_id']} · {event.row['tokens_per_s']:.1f} tok/s"
            )
            bar.update(task, completed=event.done, total=event.total, description=desc)

        with bar:
            result = run(progress)
    else:

        def progress(event) -> None:
            if event.row is not None:
                r = event.row
                err.print(
                    f"[{event.done}/{event.total}] {r['variant']} {r['prompt_id']} r{r['repeat']}: "
                    f"{r['tokens']} tokens, {r['tokens_per_s']:.1f} tok/s",
                    markup=False,
                )

        result = run(progress)
    for note in result.notes:
        err.print(f"note: {note}", markup=False)
    summary = _print_report(settings.out, as_json) if result.written or result.skipped else None
    msg = f"{result.written} new row(s) in {result.out}" + (
        f" ({result.skipped} kept from before)" if result.skipped else ""
    )
    if result.interrupted:
        err.print(f"Interrupted: {msg}; rerun with --resume to finish.", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    err.print(msg, markup=False)
    if strict and summary is not None:
        _check_strict(summary)


def _check_strict(summary) -> None:
    """``--strict``: a lossless 'bug' (see experiments/report.py) fails the command, the rows kept."""
    from apar_spec.experiments.report import ALL

    bugs = [(v.variant, v.lossless) for v in summary.groups[ALL] if v.lossless and v.lossless.bugs]
    if bugs:
        fail(
            "lossless check failed: "
            + "; ".join(
                f"{name} differs from {ll.reference} on {ll.bugs} prompt(s) by more than a near-tie"
                for name, ll in bugs
            )
            + " (see the report above)"
        )


def _print_report(results: Path, as_json: bool):
    from apar_spec.experiments.bench_files import read_rows
    from apar_spec.experiments.report import summarize

    from .report_view import render

    summary = summarize(read_rows(results))
    if as_json:
        print_json(summary.to_dict())
    else:
        render(summary, stdout_console())
    return summary
