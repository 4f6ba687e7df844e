"""``apar-spec export``: write an APAR model as a plain Hugging Face folder (``apar_spec.models.export``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from apar_spec.models.export import EXPORT_DTYPES, export

from .errors import handle_errors
from .options import AsJson
from .output import print_json, quiet_transformers, stdout_console
from .progress import ensure_packaged_base


@handle_errors
def export_command(
    model: Annotated[str, typer.Argument(help="The model: an embedded or packaged name, an adapter or model folder.")],
    out_dir: Annotated[Path, typer.Argument(help="The folder to write (vLLM and transformers load it as it is).")],
    dtype: Annotated[
        str, typer.Option("--dtype", help=f"Weights dtype: {' or '.join(EXPORT_DTYPES)}.")
    ] = EXPORT_DTYPES[0],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT_DIR when it already holds files.")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Export merged weights, tokenizer, generation config and the APAR settings as one folder."""
    quiet_transformers()
    ensure_packaged_base(stdout_console(stderr=True), model)
    rep = export(model, out_dir, dtype=dtype, overwrite=overwrite)
    if as_json:
        print_json(dataclasses.asdict(rep))
        return
    stdout_console().print(
        f"wrote {rep.out_dir} ({rep.dtype}; [Fork] {rep.fork_id}, [Child] {rep.child_id}): {', '.join(rep.files)}",
        markup=False,
    )
