"""The ``apar-spec`` command line: thin typer commands over library functions.

Every command parses options, calls one library function (``apar_spec.generate``,
``experiments.bench.compare`` / ``sweep``, ``experiments.report.summarize``,
``restructure.convert_file``, ``train.train``, ``drafts.registry``) and prints the
result: rich on a terminal, plain text when piped, JSON with ``--json``. Defaults are
read from where they live (``DecodeOptions``, ``BenchSettings``, the library
functions' signatures; ``cli/options.py``), never written here a second time. Input
errors become one ``Error: ...`` line and exit code 2 (``cli/errors.py``).

This module only builds the app: the commands live in their own modules, which never
import this one (the arrow goes app -> commands).
"""

from __future__ import annotations

import sys

import typer

from .bench_cmds import bench, report, sweep
from .costs import costs_app
from .drafts_cmds import drafts_app
from .export_cmd import export_command
from .generate_cmd import generate
from .heads import train_heads
from .quality import quality
from .serve import load_bench_command, serve_command
from .train_cmds import convert, fit_router_command, train

app = typer.Typer(
    name="apar-spec",
    help="APAR + speculative decoding: generate, benchmark against honest baselines, report.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
app.add_typer(drafts_app, name="drafts")
app.command("train-heads")(train_heads)
app.add_typer(costs_app, name="costs")
app.command("generate")(generate)
app.command("bench")(bench)
app.command("sweep")(sweep)
app.command("report")(report)
app.command("convert")(convert)
app.command("train")(train)
app.command("fit-router")(fit_router_command)
app.command("serve")(serve_command)
app.command("load-bench")(load_bench_command)
app.command("quality")(quality)
app.command("export")(export_command)


def main() -> None:
    """Console-script entry point (``apar-spec``)."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
