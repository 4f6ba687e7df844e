"""``apar-spec quality``: fork rate, steps APAR / AR, NLL guard and well-formed lists, per category.

Thin: parses options, calls ``experiments.quality.run_quality`` and prints a table
(rich on a terminal, plain when piped, one JSON document with ``--json``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from apar_spec.experiments.prompts import select_prompts
from apar_spec.experiments.quality import run_quality

from apar_spec.options import DecodeOptions

from .errors import fail, handle_errors
from .options import ForkGate, RepeatedTitle, default, model_option, with_groups
from .output import print_json, stdout_console
from .progress import ensure_packaged_base


@handle_errors
@with_groups
def quality(
    model: Annotated[str, model_option("Target model: the APAR model (e.g. smollm2-apar).")] = "smollm2-apar",
    base: Annotated[str, typer.Option("--base", help="Its base model: the AR baseline and the NLL judge.")] = "smollm2",
    prompts: Annotated[
        str,
        typer.Option(
            "--prompts", help="Prompt file(s), comma-separated (question.jsonl, JSONL or text), or a built-in set."
        ),
    ] = default(select_prompts, "source"),
    category: Annotated[
        Optional[str], typer.Option("--category", help="Only these categories (comma-separated).")
    ] = None,
    limit: Annotated[
        Optional[int], typer.Option("--limit", help="At most this many prompts (after --category).")
    ] = None,
    per_category: Annotated[
        Optional[int], typer.Option("--per-category", help="At most this many prompts of each category.")
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Token budget per request, over all branches.")
    ] = default(run_quality, "max_new_tokens"),
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Requests decoded together (figures do not depend on it).")
    ] = default(run_quality, "batch_size"),
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or bfloat16.")] = default(run_quality, "dtype"),
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads.")] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="JSONL rows, one per prompt (resumed when present).")
    ] = None,
    sides: Annotated[
        Optional[Path], typer.Option("--sides", help="Write a markdown file with 10 side-by-side answers here.")
    ] = None,
    ar_only: Annotated[
        bool,
        typer.Option("--ar-only", help="Only the base's AR answers (cached next to --out; the APAR pass reuses them)."),
    ] = default(run_quality, "ar_only"),
    max_depth: Annotated[
        Optional[int],
        typer.Option(
            "--max-depth",
            help="Fork nesting cap of the APAR answers. Default: the nesting the target was trained on, else 2.",
        ),
    ] = None,
    depth_cap: Annotated[
        Optional[str],
        typer.Option(
            "--depth-cap", help="What a child at the cap does when it asks for [Fork]: end or mask. Default: end."
        ),
    ] = None,
    fork_bias: Annotated[
        Optional[str],
        typer.Option(
            "--fork-bias",
            help="Added to the [Fork] logit where a fork is allowed and would spawn a child (more forks > 0 > fewer); "
            "several, comma-separated (e.g. -1,0,1), run side by side on the same base answers (needs --out). "
            "Default: the target's recorded one, else 0.",
        ),
    ] = None,
    repeated_title: RepeatedTitle = None,
    fork_gate: ForkGate = None,
    control_dtype: Annotated[
        Optional[str],
        typer.Option(
            "--control-dtype",
            help="Also decode the base in this precision (e.g. float32): the NLL ratio of an answer of unchanged "
            "quality.",
        ),
    ] = None,
    floor: Annotated[
        bool,
        typer.Option(
            "--floor",
            help="Also score the sibling-blind floor: the base's own answer restructured, each child rewritten by the "
            "base from what an APAR child sees (no sibling's details). Its NLL ratio is what a perfect imitation "
            "of the base scores.",
        ),
    ] = default(run_quality, "floor"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Batched quality pass of an APAR model against its base (greedy)."""
    import torch

    from apar_spec.models.loading import resolve_dtype

    if control_dtype is not None:
        resolve_dtype(control_dtype)  # a bad name fails before any decoding

    if threads:
        torch.set_num_threads(threads)
    ps = select_prompts(prompts, category=category, per_category=per_category, limit=limit)
    console = stdout_console(stderr=as_json)

    def progress(done: int, total: int, phase: str = "") -> None:
        console.print(f"quality{' ' + phase if phase else ''}: {done}/{total} prompts", markup=False)

    biases = _fork_biases(fork_bias)
    if len(biases) > 1:
        if out is None:
            fail("several --fork-bias values need --out (the base's answers are decoded once there and reused)")
        if sides is not None or ar_only:
            fail("--sides and --ar-only take one --fork-bias value")
    kw = dict(
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        dtype=dtype,
        out=out,
        sides=sides,
        ar_only=ar_only,
        control_dtype=control_dtype,
        max_depth=max_depth,
        depth_cap=depth_cap,
        repeated_title=repeated_title,
        fork_gate=fork_gate,
        floor=floor,
    )
    ensure_packaged_base(stdout_console(stderr=True), model, base)  # a first SmolLM2 load says why it waits
    if len(biases) > 1:
        runs = {}
        for b in biases:
            console.print(f"quality: --fork-bias {b:g}", markup=False)
            runs[b] = run_quality(model, base, ps, **kw, fork_bias=b, progress=progress)
        if as_json:
            print_json(
                {
                    "dtype": runs[biases[0]].dtype,
                    "by_fork_bias": {str(b): r.by_category for b, r in runs.items()},
                    "labels_by_fork_bias": {str(b): r.labels for b, r in runs.items()},
                    "rows": [
                        {k: v for k, v in row.items() if not k.endswith("_text")}
                        for r in runs.values()
                        for row in r.rows
                    ],
                }
            )
        else:
            console.print(bias_table(runs, f"{model} vs {base}, greedy, {runs[biases[0]].dtype}: by --fork-bias"))
            for b, r in runs.items():
                if r.labels:
                    console.print(f"--fork-bias {b:g}: {labels_line(r.labels)}", markup=False)
        return
    summary = run_quality(model, base, ps, **kw, fork_bias=biases[0] if biases else None, progress=progress)
    if as_json:
        print_json(
            {
                "dtype": summary.dtype,
                "wall_s": summary.wall_s,
                "by_category": summary.by_category,
                "labels": summary.labels,
                "rows": [{k: v for k, v in r.items() if not k.endswith("_text")} for r in summary.rows],
            }
        )
        return
    from rich.table import Table

    def fmt(x, spec=".2f"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    table = Table(
        "category",
        "prompts",
        "fork rate",
        "steps APAR/AR",
        "NLL AR",
        "NLL APAR",
        "NLL ratio",
        "well-formed",
        "well-formed numbered lists",
        "ended on a repeated title",
        "gated by the router",
        "both complete",
        "ratio (complete)",
        "ratio (unforked)",
        "ratio (length-matched)",
        "control ratio",
        "floor ratio (sibling-blind base)",
        "repeated 4-grams AR/APAR",
        title=f"{model} vs {base}, greedy, {summary.dtype}",
        header_style="bold",
    )
    for c, s in summary.by_category.items():
        table.add_row(
            c,
            str(s["prompts"]),
            fmt(s["fork_rate"], ".0%"),
            fmt(s["steps_ratio"]),
            fmt(s["nll_ar"], ".3f"),
            fmt(s["nll_apar"], ".3f"),
            fmt(s["nll_ratio"], ".3f"),
            fmt(s["well_formed_rate"], ".0%"),
            f"{fmt(s['well_formed_numbered'], '.0%')} of {s['numbered']}",
            str(s["repeat_ended"]),
            str(s["gated"]),
            str(s["complete"]),
            fmt(s["nll_ratio_complete"], ".3f"),
            fmt(s["nll_ratio_unforked"], ".3f"),
            fmt(s["nll_ratio_matched"], ".3f"),
            fmt(s["nll_ratio_control"], ".3f"),
            fmt(s["nll_ratio_floor"], ".3f"),
            f"{fmt(s['repeat4_ar'], '.0%')} / {fmt(s['repeat4_apar'], '.0%')}",
        )
    console.print(table)
    if summary.labels:
        console.print(labels_line(summary.labels), markup=False)


def labels_line(a: dict) -> str:
    """One line: the fork decision against Skeleton-of-Thought's list labels."""
    return (
        f"fork decision vs SoT labels: forked {a['recall']:.0%} of {a['list_prompts']} list prompts, "
        f"{a['false_fork_rate']:.0%} of {a['other_prompts']} others; precision "
        f"{'-' if math.isnan(a['precision']) else format(a['precision'], '.0%')}, "
        f"accuracy {a['accuracy']:.0%}"
    )


def _fork_biases(text: Optional[str]) -> list[float]:
    """``--fork-bias``: none (the target's own), one value, or several comma-separated."""
    if text is None:
        return []
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"--fork-bias takes numbers, comma-separated (got '{text}')")
    if not values:
        fail(f"--fork-bias takes numbers, comma-separated (got '{text}')")
    for v in values:  # the decoder's own check, for every value before the first run starts
        DecodeOptions(fork_bias=v)
    if len(set(values)) != len(values):
        fail(f"--fork-bias lists a value twice (got '{text}')")
    return values


# the summary's named groups (experiments.quality_summary.groups) and their short labels
_BIAS_GROUPS = {
    "LIST-STYLE": "list-style",
    "asks for tips/steps/ways/reasons": "tips/steps/ways/reasons",
    "short-answer categories": "short-answer",
    "SoT label: a list": "SoT: a list",
    "SoT label: not a list": "SoT: not a list",
    "all": "all",
}
# (label, summary key, format) of the side-by-side table's measures
_BIAS_MEASURES = (
    ("fork rate", "fork_rate", ".0%"),
    ("steps APAR/AR", "steps_ratio", ".3f"),
    ("NLL ratio", "nll_ratio", ".2f"),
    ("NLL ratio, length-matched", "nll_ratio_matched", ".2f"),
    ("well-formed", "well_formed_rate", ".0%"),
    ("well-formed numbered lists", "well_formed_numbered", ".0%"),
)


def bias_table(runs: dict, title: str):
    """One row per (group, measure), one column per --fork-bias value: the trade-off at a glance."""
    from rich.table import Table

    table = Table("group", "measure", *(f"{b:+g}" if b else "0" for b in runs), title=title, header_style="bold")
    first = next(iter(runs.values())).by_category
    groups = [g for g in _BIAS_GROUPS if g in first] or list(first)
    for g in groups:
        for i, (label, key, spec) in enumerate(_BIAS_MEASURES):
            cells = []
            for r in runs.values():
                x = r.by_category.get(g, {}).get(key)
                cells.append("-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec))
            table.add_row(
                f"{_BIAS_GROUPS.get(g, g)} ({first[g]['prompts']})" if i == 0 else "",
                label,
                *cells,
                end_section=i == len(_BIAS_MEASURES) - 1,
            )
    return table
