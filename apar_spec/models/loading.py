"""Offline model loading: embedded names, local folders, GGUF files, HF ids from the local cache."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional, Union

import torch

EMBEDDED = ("tiny-base", "tiny-apar", "tiny-draft")
# Real models built on a base from a pip package (cached on first use; see apar_spec/models/smollm2.py).
PACKAGED = ("smollm2", "smollm2-apar", "smollm2-draft")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def embedded_dir(name: str) -> Path:
    return Path(__file__).parent / name  # this module lives in the folder that holds the weights


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}' (choose from auto, {', '.join(sorted(set(DTYPES)))})")
    return DTYPES[key]


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """'auto' picks the accelerator accelerate sees; 'cuda' without CUDA is a clear error."""
    if device is None or str(device) == "auto":
        from accelerate import PartialState

        return PartialState().device
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available here; use --device cpu or auto")
    return dev


def _load_adapter_folder(path: Path, dtype, device):
    """An adapter folder (``adapter.json``, as ``train_smollm2.py --out`` writes one) on its packaged base."""
    import json

    from apar_spec.models import smollm2

    try:
        base = json.loads((path / "adapter.json").read_text(encoding="utf-8")).get("base")
    except (OSError, ValueError) as err:
        raise ValueError(f"'{path}/adapter.json' is not readable JSON ({err}); rebuild the adapter") from None
    if base != "smollm2":
        raise ValueError(f"'{path}' is an adapter for base '{base}'; only 'smollm2' adapters load from a folder")
    model, tokenizer = smollm2.load_apar(dtype=resolve_dtype(dtype) or torch.float32, folder=path)
    model.to(resolve_device(device))
    model.eval()
    return model, tokenizer


def load(
    name_or_path: Union[str, Path],
    *,
    dtype: Union[str, torch.dtype, None] = None,
    device: Union[str, torch.device, None] = None,
    device_map: Union[str, dict, None] = None,
    trust_remote_code: bool = False,
):
    """``(model, tokenizer)`` for an embedded name, a local folder / ``.gguf`` file, or a cached HF id.

    A folder holding ``adapter.json`` (an APAR adapter, e.g. a rebuilt ``smollm2-apar``)
    loads on its packaged base, its fingerprint checked.

    Never downloads (``local_files_only``), prefers safetensors, and never runs
    repository code unless the caller explicitly sets ``trust_remote_code``.
    Embedded models load in float32 unless ``dtype`` says otherwise (they are
    stored in half precision to keep the package small).

    ``device_map`` (e.g. ``"auto"``) is passed to ``from_pretrained``: accelerate then
    spreads a target larger than one device over all visible GPUs (and CPU), and the
    model stays where it put it (``device`` must then be None). The decoder feeds
    inputs to ``model.device`` (the first layer's); accelerate's hooks move them on.
    """
    if device_map is not None and device is not None and str(device) != "auto":
        raise ValueError(f"pass either device ({device}) or device_map ({device_map}), not both")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    if name in PACKAGED:
        from apar_spec.models import smollm2

        model, tokenizer = smollm2.load_named(name, dtype=resolve_dtype(dtype) or torch.float32)
        model.to(resolve_device(device))
        model.eval()
        return model, tokenizer
    kwargs: dict = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    if device_map is not None:
        kwargs["device_map"] = device_map
    torch_dtype = resolve_dtype(dtype)
    path = Path(name).expanduser()
    if name in EMBEDDED:
        path = embedded_dir(name)
        if not (path / "config.json").exists():
            raise ValueError(f"embedded model '{name}' is missing from this install; rebuild it with experiments/build/train_embedded.py")
        torch_dtype = torch_dtype or torch.float32
        source, tok_source = str(path), str(path)
    elif path.is_file() and path.suffix == ".gguf":
        kwargs["gguf_file"] = path.name
        source, tok_source = str(path.parent), str(path.parent)
    elif path.is_dir() and (path / "adapter.json").exists():
        return _load_adapter_folder(path, dtype, device)
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"'{name}' is a folder without config.json: not a transformers model folder")
        source, tok_source = str(path), str(path)
    elif path.exists():
        raise ValueError(f"'{name}' is a file but not a .gguf model; pass a model folder, a .gguf file or an embedded name")
    else:
        source, tok_source = name, name
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as err:
        if source == name and not path.exists():
            close = difflib.get_close_matches(name, EMBEDDED + PACKAGED, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(
                f"model '{name}' is not an embedded name ({', '.join(EMBEDDED + PACKAGED)}), a local path, "
                f"or a model in the local Hugging Face cache (no downloads here).{hint}"
            ) from None
        raise ValueError(f"could not load model from '{name}': {str(err).splitlines()[0]}") from None
    quantizer: Any = getattr(model, "hf_quantizer", None)
    if "gguf_file" in kwargs and quantizer is not None:
        quantizer.remove_quantization_config(model)
    if device_map is None:
        model.to(resolve_device(device))  # type: ignore[arg-type]  # transformers' stub types .to() for the model class
    model.eval()
    return model, tokenizer
