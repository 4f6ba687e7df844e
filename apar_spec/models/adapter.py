"""A small shipped artifact on top of a big base: LoRA deltas + the new token rows, merged at load.

Why our own file format (and no peft at load time): training uses peft (LoRA, plus
``trainable_token_indices`` for the ``[Fork]``/``[Child]`` rows), but loading the
result must work after ``pip install apar-spec`` alone. Merging LoRA is one line per
matrix (``W += scale * B @ A``), so the loader does it here and peft stays an optional
extra (``lora``) needed only to train.

Files in an adapter folder:

- ``adapter.safetensors``: ``<module>.lora_A`` ``[r, in]`` and ``<module>.lora_B``
  ``[out, r]`` for every adapted linear layer (module names as in the base model),
  and ``token_rows`` ``[n_new, hidden]``: the embedding rows of the added tokens (the
  LM head is tied to the embedding in SmolLM2, so the same rows serve both; an untied
  model also gets ``lm_head_rows``);
- ``adapter.json``: the scale, the added tokens and their ids, ``max_depth`` (the fork
  nesting of the training trees; decoding is capped there), optionally ``fork_bias`` (the
  ``[Fork]`` logit offset it was calibrated with, a decode default), and the *fingerprint*
  of the base the adapter was trained on. Applying it to any other base is refused
  with a one-line error: a LoRA delta on the wrong weights gives plausible garbage;
- ``router.json`` (optional): the fork router fitted on the adapted model's prompt states
  (``apar_spec.models.router``), a decode default like ``fork_bias``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

from apar_spec.options import FORK_BIAS_KEY, TRAINED_DEPTH_KEY, is_finite_number
from apar_spec.models.router import ROUTER_FILE, ForkRouter, set_router

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"


class AdapterError(ValueError):
    """A one-line problem applying an adapter (wrong base, missing files)."""


def base_fingerprint(model, vocab_size: Optional[int] = None) -> str:
    """A short hash of a model's weights (shapes + a strided sample of every tensor, in float32).

    Rows past ``vocab_size`` (tokens added later) are left out, so the fingerprint of
    the base is the same before and after ``[Fork]``/``[Child]`` are added.
    """
    h = hashlib.sha256()
    vocab = vocab_size or model.config.vocab_size
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name or "token_adapter" in name:
            continue
        t = t.detach()
        if t.ndim == 2 and t.shape[0] > vocab and ("embed" in name or "lm_head" in name):
            t = t[:vocab]
        flat = t.reshape(-1).to(torch.float32)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096]
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(sample.numpy().round(5).tobytes())
    return h.hexdigest()[:16]


def export_peft(peft_model, tokenizer, out_dir: str | Path, *, base_fp: str, base_name: str,
                new_tokens: list[str], dtype: torch.dtype = torch.bfloat16, extra: Optional[dict] = None) -> Path:
    """Write a trained peft model (LoRA + trainable token rows) in the format above."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    scale = None
    rank = None
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            key = _base_name(name)
            a = module.lora_A["default"].weight.detach()
            b = module.lora_B["default"].weight.detach()
            tensors[f"{key}.lora_A"] = a.to(dtype).contiguous()
            tensors[f"{key}.lora_B"] = b.to(dtype).contiguous()
            s = float(module.scaling["default"])
            if scale is not None and abs(s - scale) > 1e-9:
                raise AdapterError("layers with different LoRA scales are not supported")
            scale, rank = s, a.shape[0]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in new_tokens]
    idx = torch.tensor(ids)
    with torch.no_grad():
        rows = peft_model.get_input_embeddings()(idx[None])[0]  # [n_new, hidden]: the trained rows
    row_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # rows are few: keep them precise
    tensors["token_rows"] = rows.detach().to(row_dtype).contiguous()
    tied = bool(getattr(peft_model.config, "tie_word_embeddings", False))
    if not tied:
        head = peft_model.get_output_embeddings()
        w = getattr(head, "weight", None)
        if w is None:
            raise AdapterError("cannot read the LM head rows of an untied model")
        tensors["lm_head_rows"] = w.detach()[idx].to(row_dtype).contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS))
    config = {
        "base": base_name,
        "base_fingerprint": base_fp,
        "scale": scale,
        "rank": rank,
        "new_tokens": new_tokens,
        "new_token_ids": ids,
        "tied_embeddings": tied,
        **({"max_depth": depth} if isinstance(depth := getattr(peft_model.config, TRAINED_DEPTH_KEY, None), int) else {}),
        **(extra or {}),
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))
    return out


def _base_name(peft_name: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj`` -> ``model.layers.0.self_attn.q_proj``."""
    prefix = "base_model.model."
    return peft_name[len(prefix):] if peft_name.startswith(prefix) else peft_name


def untie_head(model) -> None:
    """Give the LM head its own copy of the (tied) embedding matrix."""
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def read_config(folder: str | Path) -> dict:
    folder = Path(folder)
    try:
        return json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise AdapterError(f"adapter folder {folder} has no readable {ADAPTER_CONFIG} ({err.__class__.__name__}); reinstall apar-spec") from None


def apply_adapter(model, tokenizer, folder: str | Path, *, check_fingerprint: bool = True):
    """Add the adapter's tokens to ``tokenizer``/``model`` and merge its LoRA deltas into ``model``.

    Refuses a base whose fingerprint differs from the one recorded at training time.
    Merging is done in at least float32 whatever the model's dtype, then cast back.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_config(folder)
    bias = config.get("fork_bias")
    if bias is not None and not is_finite_number(bias):
        raise AdapterError(f"adapter '{folder.name}': {ADAPTER_CONFIG} fork_bias must be a finite number (got {bias!r}); fix or remove it")
    router = read_router(folder) if (folder / ROUTER_FILE).exists() else None  # checked before anything changes
    if check_fingerprint:
        got = base_fingerprint(model)
        if got != config["base_fingerprint"]:
            raise AdapterError(
                f"adapter '{folder.name}' was trained on base '{config['base']}' (fingerprint {config['base_fingerprint']}), "
                f"but the given base has fingerprint {got}; load it on its own base"
            )
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except OSError as err:
        raise AdapterError(f"adapter folder {folder} has no readable {ADAPTER_WEIGHTS} ({err}); reinstall apar-spec") from None
    tokenizer.add_special_tokens({"additional_special_tokens": list(config["new_tokens"])})
    ids = [tokenizer.convert_tokens_to_ids(t) for t in config["new_tokens"]]
    if ids != list(config["new_token_ids"]):
        raise AdapterError(f"the base tokenizer gives the new tokens ids {ids}, the adapter expects {config['new_token_ids']}")
    need = max(ids) + 1
    if model.get_input_embeddings().weight.shape[0] < need:
        model.resize_token_embeddings(need, mean_resizing=False)
    modules = dict(model.named_modules())
    scale = float(config["scale"])
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[ids] = tensors["token_rows"].to(emb.dtype)
        if "lm_head_rows" in tensors:
            if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
                untie_head(model)  # the adapter gives the head its own rows for the new tokens
            head = model.get_output_embeddings().weight
            head[ids] = tensors["lm_head_rows"].to(head.dtype)
        for key in sorted(k[: -len(".lora_A")] for k in tensors if k.endswith(".lora_A")):
            if key not in modules:
                raise AdapterError(f"adapter layer '{key}' does not exist in the base model")
            w = modules[key].weight
            acc = torch.promote_types(w.dtype, torch.float32)  # at least float32 (float64 models stay exact)
            a = tensors[f"{key}.lora_A"].to(acc)  # [r, in]
            b = tensors[f"{key}.lora_B"].to(acc)  # [out, r]
            w.copy_((w.to(acc) + scale * (b @ a)).to(w.dtype))
    if isinstance(config.get("max_depth"), int):  # the fork nesting it was trained on caps decoding
        setattr(model.config, TRAINED_DEPTH_KEY, config["max_depth"])
    if bias is not None:  # the [Fork] logit offset it was calibrated with (a decode default)
        setattr(model.config, FORK_BIAS_KEY, float(bias))
    if router is not None:  # the fork router fitted on this adapted model (a decode default)
        set_router(model, router)
    return model, tokenizer


def read_router(folder: str | Path) -> ForkRouter:
    """The adapter's ``router.json``; unreadable or malformed is a one-line AdapterError."""
    path = Path(folder) / ROUTER_FILE
    where = f"adapter '{Path(folder).name}' {ROUTER_FILE}"
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise AdapterError(f"{where} is unreadable ({err.__class__.__name__}); reinstall apar-spec") from None
    except ValueError:
        raise AdapterError(f"{where} is not valid JSON; fix or remove it") from None
    try:
        return ForkRouter.from_dict(data, where)
    except ValueError as err:
        raise AdapterError(f"{err}; fix or remove it") from None
