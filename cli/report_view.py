"""Rendering the benchmark report (``apar-spec bench``/``sweep``/``report``): rich tables and
bar charts on a terminal, plain aligned text when piped. The numbers come from
``apar_spec.experiments.report.summarize``; this module only draws them (the library
never prints)."""

from __future__ import annotations

from typing import Optional

from apar_spec.experiments.report import ALL, Report, VariantSummary
from rich.console import Console
from rich.table import Table


def _f(x: Optional[float], fmt: str = "{:.2f}", suffix: str = "") -> str:
    return "-" if x is None else fmt.format(x) + suffix


def _table_rows(vs: list[VariantSummary]) -> tuple[list[str], list[list[str]]]:
    headers = [
        "config",
        "model",
        "prompts",
        "tokens",
        "tok/s",
        "xAR",
        "xHF",
        "steps",
        "steps/tok",
        "acc.len",
        "acc@pos",
        "KVxAR",
        "attnxAR",
        "steps/crit",
        "lossless",
    ]
    body = []
    for v in vs:
        acc_pos = " ".join(f"{a:.2f}" for a in v.acceptance_per_position[:4]) or "-"
        body.append(
            [
                v.variant,
                v.model,
                str(v.prompts),
                _f(v.tokens, "{:.0f}"),
                _f(v.tokens_per_s, "{:.1f}"),
                _f(v.speedup_vs_ar, suffix="x"),
                _f(v.speedup_vs_hf, suffix="x"),
                _f(v.target_steps, "{:.0f}"),
                _f(v.steps_per_token),
                _f(v.acceptance_length),
                acc_pos,
                _f(v.peak_kv_vs_ar),
                _f(v.attended_keys_vs_ar),
                _f(v.steps_per_critical_path),
                v.lossless.short() if v.lossless else "ref" if v.config in ("hf-generate", "apar") else "-",
            ]
        )
    return headers, body


def plain_table(title: str, headers: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(line.rstrip() for line in lines)


def _bars(items: list[tuple[str, float]], width: int = 40, char: str = "#") -> list[str]:
    """A horizontal bar per item, scaled to the largest; a '|' marks 1.0x where it fits."""
    if not items:
        return []
    top = max(max(v for _, v in items), 1.0)
    label_w = max(len(n) for n, _ in items)
    lines = []
    for name, value in items:
        n = max(1, round(value / top * width)) if value > 0 else 0
        bar = list(char * n + " " * (width - n))
        one = round(1.0 / top * width)
        if 0 < one <= width and one - 1 >= n:
            bar[one - 1] = "|"
        lines.append(f"{name.ljust(label_w)}  {''.join(bar)} {value:.2f}x")
    return lines


def render(report: Report, console: Optional[Console] = None) -> None:
    """Rich tables and a bar chart on a terminal; plain aligned text otherwise."""
    console = console or Console()
    plain = not console.is_terminal
    for note in report.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    for group, vs in report.groups.items():
        title = f"{'all prompts' if group == ALL else 'category ' + group} ({report.repeats} repeat(s); medians)"
        headers, body = _table_rows(vs)
        if plain:
            console.print(plain_table(title, headers, body) + "\n", markup=False, highlight=False, soft_wrap=True)
        else:
            table = Table(title=title, title_justify="left", header_style="bold")
            for h in headers:
                table.add_column(h, justify="left" if h in ("config", "model", "acc@pos", "lossless") else "right")
            for row in body:
                table.add_row(*[("[red]" + c + "[/]") if c.startswith("NO") else c for c in row])
            console.print(table)
    vs = report.groups[ALL]
    for label, attr in (("vs AR", "speedup_vs_ar"), ("vs hf-generate", "speedup_vs_hf")):
        items = [(v.variant, getattr(v, attr)) for v in vs if getattr(v, attr) is not None]
        if not items:
            continue
        console.print(f"speed-up {label} (tokens/s, ratio of medians)", markup=False, highlight=False)
        for line in _bars(items, char="#" if plain else "█"):
            console.print(line, markup=False, highlight=False, style=None if plain else "cyan", soft_wrap=True)
        console.print("")
    _render_predictions(report, console, plain)
    diffs = [v for v in report.groups[ALL] if v.lossless and v.lossless.differences]
    for v in diffs:
        console.print(
            f"{v.variant} differs from {v.lossless.reference} on {len(v.lossless.differences)} prompt(s):",
            markup=False,
            highlight=False,
        )
        for d in v.lossless.differences:
            console.print(f"  [{d['reason']}] prompt {d['prompt']}: {d['detail']}", markup=False, highlight=False)


def _render_predictions(report: Report, console: Console, plain: bool) -> None:
    """The cost model's table: predicted vs achieved speed-up over the same mode without speculation."""
    body = []
    for group, vs in report.groups.items():
        for v in vs:
            if v.plain is None:
                continue
            err = (
                (v.predicted_vs_plain / v.achieved_vs_plain - 1)
                if v.predicted_vs_plain and v.achieved_vs_plain
                else None
            )
            body.append(
                [
                    group,
                    v.variant,
                    v.plain,
                    _f(v.achieved_vs_plain, suffix="x"),
                    _f(v.predicted_vs_plain, suffix="x"),
                    _f(err * 100 if err is not None else None, "{:+.0f}", "%"),
                    v.prediction_note or "",
                ]
            )
    if not body:
        return
    title = "cost model: speed-up over the same mode without speculation, predicted vs achieved"
    headers = ["group", "config", "vs", "achv", "pred", "err", "note"]
    if plain:
        console.print(plain_table(title, headers, body) + "\n", markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(title=title, title_justify="left", header_style="bold")
    for h in headers:
        table.add_column(h, justify="right" if h in ("achv", "pred", "err") else "left")
    for row in body:
        table.add_row(*row)
    console.print(table)
