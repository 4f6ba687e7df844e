"""Which model runs which configuration, loaded once per run, and how prompts become ids.

Why a separate step: the benchmark must fail *before* the first timed row on every
input problem it can see (an unknown draft, a draft whose vocabulary does not fit,
``--device cuda`` without CUDA), and it must load each model once, not per row. The
configurations then only look things up here.

The AR baseline of an APAR target is its *base* model when one is known (``--base``;
``tiny-base`` for the embedded ``tiny-apar``), as the paper compares APAR-7B with
Vicuna. Sequential configurations (``hf-generate``, ``hf-assisted``, ``ar``, ``spec``)
run on that model; ``apar`` and ``apar+spec`` on the target. So the lossless pairs
(``spec``/``ar``, ``ar``/``hf-generate``, ``apar+spec``/``apar``) always share a model,
and every row records the model it used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from apar_spec.decoding.tokens import find_apar_tokens
from apar_spec.models.loading import EMBEDDED, load, resolve_device

DEFAULT_TARGET = "tiny-apar"
SAME_AS_TARGET = "same"  # --base same: the AR baseline runs the target itself (forks disabled)
_EMBEDDED_BASE = {"tiny-apar": "tiny-base"}  # APAR target -> the base it was fine-tuned from
_EMBEDDED_DRAFT = "tiny-draft"
_MODEL_FREE_DRAFT = "ngram"


def default_base(target: str) -> Optional[str]:
    """The base model of an embedded APAR target; None (= the target) otherwise."""
    return _EMBEDDED_BASE.get(target)


def default_draft(target: str) -> str:
    """The embedded draft for embedded targets (same tokenizer); the model-free n-gram draft otherwise."""
    return _EMBEDDED_DRAFT if target in EMBEDDED else _MODEL_FREE_DRAFT


@dataclass
class Loaded:
    """A model with its tokenizer, and the name rows report for it."""

    name: str
    model: Any
    tokenizer: Any

    @property
    def has_apar_tokens(self) -> bool:
        return find_apar_tokens(self.tokenizer) is not None


@dataclass
class Draft:
    """A resolved draft. ``arg`` is what ``apar_spec.generate(draft=...)`` gets: the loaded
    draft LM (so it is loaded once per run) or the registry name of a model-free draft."""

    name: str
    kind: str  # "model" | "ngram" | "heads"
    arg: Any
    model: Any = None  # the draft LM, for HF assisted generation


@dataclass
class ModelSet:
    target: Loaded
    baseline: Loaded  # the AR baseline (the base model, or the target itself)
    drafts: dict[str, Draft]  # by name, in the order given; the first is the default
    device: str

    @property
    def draft(self) -> Optional[Draft]:
        return next(iter(self.drafts.values()), None)

    def for_config(self, config: str) -> Loaded:
        return self.target if config in ("apar", "apar+spec") else self.baseline


def load_models(
    target: str,
    base: Optional[str],
    drafts: Sequence[str] = (),
    *,
    dtype: Optional[str] = None,
    device: Optional[str] = None,
    device_map: Optional[str] = None,
) -> ModelSet:
    """Load the target, its AR baseline and the draft once, and check they fit together.

    ``device_map`` (e.g. ``"auto"``): target and base are spread by accelerate over the
    visible devices (for targets larger than one); drafts go where the target's first
    layer is, since they run next to the target's inputs."""
    place = (
        {"device_map": device_map} if device_map else {"device": resolve_device(device)}
    )  # '--device cuda' without CUDA fails here
    tgt = Loaded(short_name(target), *load(target, dtype=dtype, **place))
    dev = tgt.model.device if device_map else place["device"]
    base_name = default_base(target) if base is None else base
    if base_name in (None, SAME_AS_TARGET, target):
        baseline = tgt
    else:
        baseline = Loaded(short_name(base_name), *load(base_name, dtype=dtype, **place))
        if baseline.tokenizer.get_vocab() != tgt.tokenizer.get_vocab() and not _same_words(
            baseline.tokenizer, tgt.tokenizer
        ):
            raise ValueError(
                f"base '{base_name}' and target '{target}' do not share a tokenizer, so their token counts "
                "are not comparable; pass a base with the target's tokenizer (or --base same)"
            )
    resolved = {name: resolve_draft(name, tgt, baseline, dtype=dtype, device=dev) for name in dict.fromkeys(drafts)}
    return ModelSet(tgt, baseline, resolved, str(dev))


def _same_words(a, b) -> bool:
    """A base trained before [Fork]/[Child] were added shares every other token id with its APAR model."""
    va = {k: v for k, v in a.get_vocab().items() if k not in ("[Fork]", "[Child]")}
    vb = {k: v for k, v in b.get_vocab().items() if k not in ("[Fork]", "[Child]")}
    return va == vb


def resolve_draft(name: str, target: Loaded, baseline: Loaded, *, dtype=None, device=None) -> Draft:
    """A registry name or a model path -> a Draft; refuses a draft LM whose vocabulary does not fit."""
    from apar_spec.drafts import registry

    entry = registry.lookup(name)  # a registry name (NAME@N too), or a path; else the registry's one-line error
    if entry.kind != "model":  # n-gram, heads: generate() resolves the name (the registry caches heads)
        return Draft(name, entry.kind, name)
    model, tokenizer = load(entry.weights, dtype=dtype or target.model.dtype, device=device)
    for loaded in {id(target): target, id(baseline): baseline}.values():
        registry.check_vocab(tokenizer, loaded.tokenizer, name)
    # a reduced draft vocabulary is built by the registry from the name (HF assisted gets the plain draft LM)
    arg = name if entry.draft_vocab is not None else model
    return Draft(name, "model", arg, hf_assistant(model, baseline.model))


def hf_assistant(draft, baseline):
    """The draft as HF assisted generation needs it: the baseline's vocabulary width.

    A draft for an APAR model made from a pretrained base (smollm2-draft) carries the
    two APAR token rows the base lacks; HF refuses unequal sizes, so it gets a copy with
    those last rows cut (the same logits over every token the base can write).
    """
    import copy

    dv, bv = draft.config.vocab_size, baseline.config.vocab_size
    if dv <= bv or draft.get_input_embeddings().weight.shape[0] <= bv:
        return draft
    trimmed = copy.deepcopy(draft)
    trimmed.resize_token_embeddings(bv, mean_resizing=False)
    return trimmed


def short_name(name: str) -> str:
    """What rows and tables show for a model: the name as given, or a path's last part."""
    from pathlib import Path

    p = Path(name)
    return p.name if (len(p.parts) > 1 or p.suffix == ".gguf") and p.name else name


def encode_prompt(loaded: Loaded, text: str, chat_template: Optional[bool] = None) -> list[int]:
    """Token ids of one prompt. ``chat_template``: None = use the tokenizer's template when
    it has one (the embedded models are trained on ``Question: p\\nAnswer:``), True = must."""
    tok = loaded.tokenizer
    has_template = bool(getattr(tok, "chat_template", None))
    use = has_template if chat_template is None else chat_template
    if use and not has_template:
        raise ValueError(f"the tokenizer of '{loaded.name}' has no chat template; pass --no-chat-template")
    if use:
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return tok(rendered, add_special_tokens=False)["input_ids"]
    return tok(text, add_special_tokens=True)["input_ids"]
