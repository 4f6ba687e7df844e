"""Printing results: rich on a terminal, plain text when piped, JSON on request.

Why decide on ``Console().is_terminal``: a human at a terminal wants panels, colours
and progress bars; a pipe or a CI log wants stable plain lines (and ``--json`` wants
exactly one JSON document on stdout, nothing else).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

STAT_LABELS = {
    "tokens_generated": "tokens generated (all branches)",
    "target_steps": "target steps",
    "tokens_per_s": "tokens/s",
    "wall_time_s": "wall time (s)",
    "num_branches": "branches",
    "critical_path": "critical path",
    "steps_per_critical_path": "steps / critical path",
    "mean_acceptance_length": "acceptance length (incl. bonus)",
    "acceptance_rate_per_position": "acceptance rate per position",
    "accepted": "accepted drafts",
    "drafted": "drafted tokens",
    "draft_forwards": "draft forwards",
    "peak_live_kv": "peak live KV",
    "mean_live_kv": "mean live KV",
    "attended_keys": "attended keys",
}


def stdout_console(stderr: bool = False) -> Console:
    """stdout (or stderr); lines are never wrapped when piped (a pipe has no width)."""
    console = Console(highlight=False, stderr=stderr)
    if not console.is_terminal:
        console.soft_wrap = True
    return console


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:.1f}"
    if isinstance(value, list):
        return " ".join(_fmt(v) for v in value) or "-"
    return str(value)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def show_generation(gen, console: Console, *, model: str, mode: str, draft: Optional[str] = None) -> None:
    """The reassembled answer, then its stats."""
    stats = gen.stats.to_dict()
    title = f"{model} · {mode}" + (f" · draft {draft}" if draft else "")
    if not console.is_terminal:
        console.print(gen.text, markup=False, highlight=False, soft_wrap=True)
        console.print("")
        console.print(f"# {title}", markup=False, highlight=False)
        for key, label in STAT_LABELS.items():
            console.print(f"{label}: {_fmt(stats[key])}", markup=False, highlight=False)
        return
    console.print(Panel(gen.text or "[dim](empty answer)[/dim]", title=title, title_align="left"))
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, label in STAT_LABELS.items():
        table.add_row(label, _fmt(stats[key]))
    console.print(table)


def quiet_transformers() -> None:
    """HF's per-call warnings and weight-loading bars would drown the report."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - logging is cosmetic
        pass
