"""Checkpoints: a training run's weights, optimizer, scheduler and step on disk, and back.

Why a file of its own: resuming must put a run back exactly where it stopped (the
batches are a pure function of seed and step, see ``data.BatchSchedule``), and a
checkpoint that does not fit the model being resumed (another version, another set of
trainable parameters) must fail in one line that says what to do, not deep in torch.
A peft model saves and loads its adapter only, never the frozen base.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"  # optimizer, scheduler and step, next to the checkpoint's weights


def save_model(model, tokenizer, out_dir: Path, dtype: torch.dtype | None) -> None:
    """safetensors weights (optionally cast, e.g. bf16 for the embedded models) + tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    to_save = model if dtype is None else copy.deepcopy(model).to(dtype)
    if getattr(to_save, "peft_config", None):  # adapter only: never the (resized, frozen) embedding
        to_save.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
    else:
        to_save.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def save_checkpoint(model, tokenizer, optimizer, scheduler, ckpt_dir: Path, step: int) -> None:
    """The (unwrapped) model's weights and tokenizer, then optimizer, scheduler and step, into ``ckpt_dir``."""
    save_model(model, tokenizer, ckpt_dir, None)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step}
    torch.save(state, ckpt_dir / STATE_FILE)


def load_weights(model, ckpt_dir: Path) -> None:
    """The checkpoint's weights into ``model`` (an adapter's only, for a peft model); a mismatch is one line."""
    from safetensors.torch import load_file

    weights = {}
    for f in sorted(ckpt_dir.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    if getattr(model, "peft_config", None):  # a peft model checkpoints its adapter only
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, weights)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected or not weights:
            raise ValueError(f"checkpoint {ckpt_dir} does not fit the adapter (unexpected {unexpected})")
        return
    missing, unexpected = model.load_state_dict(weights, strict=False)  # a tied lm_head is stored once
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
        raise ValueError(f"checkpoint {ckpt_dir} does not fit the model (missing {missing}, unexpected {unexpected})")


def load_checkpoint(model, optimizer, scheduler, ckpt_dir: Path) -> int:
    """Load weights, optimizer and scheduler from ``ckpt_dir``; the step it was written at."""
    load_weights(model, ckpt_dir)
    state = torch.load(ckpt_dir / STATE_FILE, weights_only=True)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError:  # torch names a parameter-group size mismatch; say what to do about it
        raise ValueError(
            f"checkpoint {ckpt_dir} was written for another set of trainable parameters (another "
            "version or setting); delete that folder to start afresh, or resume with the settings that wrote it"
        ) from None
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])
