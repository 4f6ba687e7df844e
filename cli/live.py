"""``apar-spec generate --live``: watch the branches of one answer grow in parallel.

The decoder calls an ``on_step`` hook after every step (one target forward); this
module renders the request's branches at that moment: each branch's text so far,
where it forked from, and whether it is decoding, queued or finished (and why).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from apar_spec.api import Generation, generate

TAIL_CHARS = 90  # a branch line shows the end of its text, where it grows


def branch_table(request: Any, tokenizer, step: int) -> Group:
    """A table of the request's branches (``request`` is the decoder's ``Request``)."""
    table = Table(show_header=True, header_style="bold", expand=False, box=None, pad_edge=False)
    for col, kw in (
        ("branch", {"justify": "right"}),
        ("from", {}),
        ("state", {}),
        ("tokens", {"justify": "right"}),
        ("text", {}),
    ):
        table.add_column(col, **kw)
    queued = set(getattr(request, "queue", ()))
    for b in request.branches:
        state = "decoding" if b.active else "queued" if b.id in queued else (b.finish or "done")
        style = {"decoding": "green", "queued": "yellow"}.get(state, "dim")
        origin = "root" if b.parent is None else f"b{b.parent} @{b.fork_index}"
        text = tokenizer.decode(b.tokens, skip_special_tokens=True).replace("\n", " ⏎ ")
        if len(text) > TAIL_CHARS:
            text = "…" + text[-TAIL_CHARS:]
        indent = "  " * b.level
        table.add_row(f"{indent}b{b.id}", origin, Text(state, style=style), str(b.generated), text)
    c = request.counters
    live_kv = c.live_kv[-1] if c.live_kv else 0
    active = sum(b.active for b in request.branches)
    header = Text(
        f"step {step}  ·  {active} branch(es) decoding  ·  {sum(b.generated for b in request.branches)} tokens  ·  "
        f"live KV {live_kv}",
        style="bold",
    )
    return Group(header, table)


def generate_live(model, tokenizer, prompt_ids: list[int], *, console: Console, **kwargs: Any) -> Generation:
    """``apar_spec.generate`` on one prompt with a live view of its branches."""
    steps = [0]
    with Live(Text("prefill…"), console=console, refresh_per_second=12, transient=False) as live:

        def on_step(requests, tree_cache) -> None:
            steps[0] += 1
            if requests:
                live.update(branch_table(requests[0], tokenizer, steps[0]))

        return generate(model, tokenizer, [prompt_ids], on_step=on_step, **kwargs)[0]
