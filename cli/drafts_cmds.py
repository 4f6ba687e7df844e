"""``apar-spec drafts list`` and ``drafts show``: the draft registry (``apar_spec.drafts.registry``)."""

from __future__ import annotations

from typing import Annotated

import typer

from .errors import handle_errors
from .options import AsJson
from .output import print_json, stdout_console

drafts_app = typer.Typer(
    help="The draft registry: which speculators exist and which targets they fit.", no_args_is_help=True
)


@drafts_app.command("list")
@handle_errors
def drafts_list(as_json: AsJson = False) -> None:
    """The drafts the registry knows (built-in and from your drafts.json).

    Any two or more combine as a union, 'smollm2-hydra+ngram:8': the first drafts the
    decoder's tree, each later one adds a chain of its own length, one verify pass checks all."""
    from apar_spec.drafts import registry

    entries = registry.entries()
    if as_json:
        print_json([e.to_dict() for e in entries])
        return
    console = stdout_console()

    def acceptance(e) -> str:
        return f"{e.acceptance_length:.2f}" if e.acceptance_length is not None else "-"

    def vocab(e) -> str:  # tokens the draft proposes from (NAME@N overrides; drafts/vocab.py)
        return "-" if e.kind == "ngram" else (str(e.draft_vocab) if e.draft_vocab else "full")

    if not console.is_terminal:  # one line per draft, the table's columns (tab-separated)
        for e in entries:
            fields = (e.name, e.kind, e.weights or "-", ", ".join(e.targets) or "-", vocab(e), acceptance(e), e.source)
            console.print("\t".join(fields), markup=False)
        return
    from rich.table import Table

    table = Table("name", "kind", "weights", "targets", "vocab", "acceptance", "source", header_style="bold")
    for e in entries:
        acc = acceptance(e)
        table.add_row(e.name, e.kind, e.weights or "-", ", ".join(e.targets) or "-", vocab(e), acc, e.source)
    console.print(table)


@drafts_app.command("show")
@handle_errors
def drafts_show(
    name: Annotated[str, typer.Argument(help="A registry name (or a union such as 'smollm2-hydra+ngram:8').")],
    as_json: AsJson = False,
) -> None:
    """Everything the registry records about one draft."""
    from apar_spec.drafts import registry

    entry = registry.lookup(name)
    if as_json:
        print_json(entry.to_dict())
        return
    console = stdout_console()
    for key, value in entry.to_dict().items():
        shown = ", ".join(value) if isinstance(value, list) else value
        console.print(f"{key}: {shown if shown not in (None, '') else '-'}", markup=False)
