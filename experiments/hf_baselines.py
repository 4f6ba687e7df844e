"""Hugging Face baselines run the honest way: the target's own ``model.generate``.

Why this module exists: a speed-up is only as good as its baseline. The baselines
here call ``generate`` exactly as a user would (``do_sample=False`` for greedy,
``assistant_model=`` or ``prompt_lookup_num_tokens=`` for assisted generation) and
change only what must match the tree decoder for a fair, lossless comparison:

- the same stop tokens (``eos_token_id``) and token budget (``max_new_tokens``);
- ``[Fork]``/``[Child]`` suppressed when the tokenizer has them, as the tree decoder
  does in plain AR mode (otherwise an APAR-trained model's ``generate`` could emit a
  ``[Fork]`` that ``mode="ar"`` never samples, and "ar equals hf-generate" would fail
  for a reason that has nothing to do with speed);
- assisted generation drafts a constant ``k`` tokens (no heuristic schedule, no
  confidence early-stop), the same ``k`` the speculative configurations use; HF keeps
  those schedules' state on the assistant *across calls*, which would make repeats
  measure different things.

Forward passes are counted with forward hooks (no patching), so the rows report target
steps and draft forwards for HF too.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from apar_spec.decoding.tokens import find_apar_tokens
from apar_spec.options import DecodeOptions

_D = DecodeOptions


@dataclass
class HFRun:
    """One ``model.generate`` call on one prompt."""

    token_ids: list[int]  # new tokens only (EOS included when generated), no padding
    wall_time_s: float
    target_forwards: int
    draft_forwards: int
    settings: dict  # the generate() arguments that matter, for the row


@dataclass
class _Counter:
    n: int = 0


@contextmanager
def count_forwards(model) -> Iterator[_Counter]:
    """Count top-level forward calls of ``model`` while the context is open."""
    counter = _Counter()
    if model is None:
        yield counter
        return

    def hook(module, args, kwargs):
        counter.n += 1

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


@contextmanager
def _assistant_drafts(assistant_model, k: int) -> Iterator[None]:
    """A constant ``k`` drafts per round for the duration of one call.

    HF reads ``num_assistant_tokens`` (default 20), its schedule and the confidence
    early-stop threshold (default 0.4) from the *assistant's* generation config, not
    from the arguments of ``generate``; so a copy with our settings is swapped in for
    the call and the original put back, leaving the model as it was."""
    if assistant_model is None:
        yield
        return
    original = assistant_model.generation_config
    patched = copy.deepcopy(original)
    patched.num_assistant_tokens = k
    patched.num_assistant_tokens_schedule = "constant"
    patched.assistant_confidence_threshold = 0.0  # 0 disables the early stop
    assistant_model.generation_config = patched
    try:
        yield
    finally:
        assistant_model.generation_config = original


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_generate(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = _D.max_new_tokens,
    temperature: float = _D.temperature,
    top_p: float = _D.top_p,
    top_k: int = _D.top_k,
    seed: Optional[int] = _D.seed,
    eos_ids: Optional[set[int]] = None,
    assistant_model=None,
    prompt_lookup_num_tokens: Optional[int] = None,
    num_assistant_tokens: int = _D.num_draft_tokens,
) -> HFRun:
    """``model.generate`` on one prompt (batch size 1, so no padding), timed around the call.

    Greedy when ``temperature == 0``; otherwise sampled with the same warpers as
    ``apar_spec.generate`` (``top_k=0`` is passed explicitly: HF's default would be 50).
    """
    if assistant_model is not None and prompt_lookup_num_tokens is not None:
        raise ValueError("give assistant_model or prompt_lookup_num_tokens, not both")
    device = model.device
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    attention_mask = torch.ones_like(input_ids)
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.min_new_tokens = None
    config.num_beams = 1
    if temperature > 0:
        config.do_sample, config.temperature, config.top_p, config.top_k = True, temperature, top_p, top_k
    else:
        config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
    if eos_ids:
        config.eos_token_id = sorted(eos_ids)
    if config.pad_token_id is None:
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        config.pad_token_id = pad if pad is not None else (sorted(eos_ids)[0] if eos_ids else 0)
    apar = find_apar_tokens(tokenizer) if tokenizer is not None else None
    if apar is not None:
        config.suppress_tokens = [apar.fork_id, apar.child_id]
    kwargs: dict = {}
    if assistant_model is not None:
        kwargs["assistant_model"] = assistant_model
    elif prompt_lookup_num_tokens is not None:
        config.prompt_lookup_num_tokens = prompt_lookup_num_tokens
    if temperature > 0 and seed is not None:
        torch.manual_seed(seed)
    with (
        _assistant_drafts(assistant_model, num_assistant_tokens),
        count_forwards(model) as target_calls,
        count_forwards(assistant_model) as draft_calls,
        torch.inference_mode(),
    ):
        _sync(device)
        start = time.perf_counter()
        out = model.generate(input_ids, attention_mask=attention_mask, generation_config=config, **kwargs)
        _sync(device)
        wall = time.perf_counter() - start
    new = out[0, input_ids.shape[1] :].tolist()
    settings = {
        "do_sample": bool(config.do_sample),
        "max_new_tokens": max_new_tokens,
        "suppress_tokens": config.suppress_tokens,
    }
    if assistant_model is not None:
        settings.update(
            num_assistant_tokens=num_assistant_tokens,
            num_assistant_tokens_schedule="constant",
            assistant_confidence_threshold=0.0,
        )
    if prompt_lookup_num_tokens is not None:
        settings["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
    return HFRun(new, wall, target_calls.n, draft_calls.n, settings)
