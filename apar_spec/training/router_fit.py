"""Fitting a model's fork router from its training data (``apar-spec fit-router``, and
``apar-spec train --router`` right after training).

The router itself (``apar_spec.models.router``) only scores prompts; fitting it reads
training data and loads the model, which is this training-room job.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from apar_spec.models.loading import load
from apar_spec.models.router import (
    DEFAULT_L2,
    DEFAULT_THRESHOLD,
    ROUTER_FILE,
    ROUTER_KEY,
    RouterFit,
    fit_router,
    gated_counts,
    prompt_states,
)
from apar_spec.training.data import read_examples
from apar_spec.training.tokenizer import prompt_token_ids


def _labelled_states(model, tokenizer, data) -> tuple[torch.Tensor, list[bool]]:
    """[n, hidden] prompt states and "answer forks" labels of a training file (``train.read_examples``)."""
    examples = read_examples(data)
    ids = [prompt_token_ids(ex.prompt, tokenizer) for ex in examples]
    return prompt_states(model, ids, pad_id=tokenizer.pad_token_id or 0), [ex.structured for ex in examples]


def fit_router_into(
    folder, data, *, threshold: float = DEFAULT_THRESHOLD, l2: float = DEFAULT_L2, check=None
) -> RouterFit:
    """Fit a fork router for the APAR model in ``folder`` and write it there.

    Labels come from the training data itself: a prompt whose answer tree forks wants a
    forked answer (``apar-spec convert`` output or raw prompt/answer rows, as ``apar-spec
    train`` reads them). ``folder`` is a saved model (the router goes into its
    ``config.json``) or an APAR adapter (``router.json``). ``check``: held-out data in the same
    format, reported, not fitted on. Nothing is written unless the fit succeeds.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: give the local model or adapter folder the router is written into")
    is_adapter = (folder / "adapter.json").exists()
    if not is_adapter and not (folder / "config.json").exists():
        raise ValueError(f"{folder} holds neither config.json (a saved model) nor adapter.json (an APAR adapter)")
    if not 0.0 < threshold < 1.0 or not l2 > 0:
        raise ValueError(f"threshold must be in (0, 1) and l2 > 0 (got {threshold}, {l2})")
    model, tokenizer = load(folder, dtype=torch.float32)
    model.eval()
    states, labels = _labelled_states(model, tokenizer, data)
    if all(labels) or not any(labels):
        raise ValueError(
            f"the data needs answers with forks and answers without ({sum(labels)} of {len(labels)} fork); "
            "a router learns which prompts get which"
        )
    router = fit_router(states, labels, threshold=threshold, l2=l2)
    held = gated_counts(router, *_labelled_states(model, tokenizer, check)) if check is not None else None
    mine = gated_counts(router, states, labels)
    if is_adapter:
        target, text = folder / ROUTER_FILE, json.dumps(router.to_dict())
    else:
        target = folder / "config.json"
        config = json.loads(target.read_text())
        config[ROUTER_KEY] = router.to_dict()
        text = json.dumps(config, indent=2)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)  # a reader never sees half a file
    return RouterFit(
        str(target), mine["prompts"], mine["forked"], threshold, l2, mine["gated_forked"], mine["gated_plain"], held
    )
