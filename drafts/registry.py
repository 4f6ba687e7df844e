"""The draft registry: named speculators, with the vocabulary they fit.

Built-in entries name the embedded draft and the n-gram speculator. Users add
their own in a JSON file (a list of entry objects), found at
``$APAR_SPEC_DRAFTS`` or ``$XDG_CONFIG_HOME/apar-spec/drafts.json``
(``~/.config/apar-spec/drafts.json``)::

    [{"name": "qwen-0.5b", "kind": "model", "weights": "/models/Qwen2.5-0.5B-Instruct",
      "targets": ["Qwen2.5-7B-Instruct"], "notes": "same tokenizer as the 7B"}]

A draft LM must share the target's tokenizer: ``resolve`` compares vocabulary
fingerprints and refuses a mismatch with both sizes and fingerprints named.
"""

from __future__ import annotations

import difflib
import json
import os
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from apar_spec.drafts.vocab import CONTROL_TOKENS, check_vocab, vocab_fingerprint, vocab_fits  # noqa: F401 (registry API)

from apar_spec.decoding.speculator import Speculator

KINDS = ("model", "ngram", "heads")  # what a registry file entry may be; unions are named "a+b:8"


@dataclass
class DraftEntry:
    name: str
    # "model" (a draft LM), "ngram" (prompt lookup, no model), "heads" (draft heads on the target) or "union" ("a+b:8")
    kind: str
    weights: Optional[str] = (
        None  # embedded name, local path or cached HF id (kind "model"); heads folder (kind "heads")
    )
    fingerprint: Optional[str] = None  # vocabulary fingerprint it fits (None = checked at load time)
    vocab_size: Optional[int] = None
    targets: list[str] = field(default_factory=list)  # models it is meant for
    notes: str = ""
    acceptance_length: Optional[float] = None  # measured mean acceptance length (incl. bonus), if known
    # the chain length acceptance_length was measured at: the cost model fits its acceptance
    # profile there (apar_spec.costs.default_profile); None = 4
    acceptance_k: Optional[int] = None
    draft_vocab: Optional[int] = None  # propose only the N most frequent tokens (drafts/vocab.py); None = all
    source: str = "built-in"

    def to_dict(self) -> dict:
        return asdict(self)


BUILTIN = [
    DraftEntry(
        name="tiny-draft",
        kind="model",
        weights="tiny-draft",
        fingerprint="3b10c36d7acb",  # the embedded tokenizer's (tests/test_embedded.py keeps it true)
        vocab_size=2048,
        targets=["tiny-apar", "tiny-base"],
        notes="embedded 2-layer draft trained on the APAR corpus; shares the embedded tokenizer; "
        "acceptance measured with tiny-apar (apar+spec, k=4, built-in prompts)",
        acceptance_length=4.0,
        acceptance_k=4,
    ),
    DraftEntry(
        name="tiny-heads",
        kind="heads",
        weights="tiny-heads",  # apar_spec/models/tiny-heads/{tiny-apar,tiny-base}: picked by the target's LM head
        fingerprint="3b10c36d7acb",
        vocab_size=2048,
        targets=["tiny-apar", "tiny-base"],
        notes="Medusa-1 heads, self-distilled (apar-spec train-heads): 6 for tiny-apar, 4 for tiny-base; no draft "
        "forward; acceptance measured with tiny-apar (apar+spec, 7-node tree [[0],[1],[0,0],...,[0]*6], built-in "
        "prompts)",
        acceptance_length=3.6,
        acceptance_k=6,  # its 7-node tree is a chain of 6 plus one sibling
    ),
    DraftEntry(
        name="smollm2-draft",
        kind="model",
        weights="smollm2-draft",
        fingerprint="450fd25da1a6",  # SmolLM2's vocabulary without [Fork]/[Child] (tests/test_smollm2.py keeps it true)
        vocab_size=49152,
        targets=["smollm2-apar", "smollm2"],
        notes="2 Llama layers (width 576) on SmolLM2's own embedding/LM head, distilled (400 steps) on SmolLM2's "
        "self-distilled answers; drafts from the 8,192 most frequent tokens by default (smollm2-draft@full: all). "
        "Acceptance measured with smollm2-apar (apar+spec, k=3, greedy, bf16, 18 list-style Vicuna/MT-bench prompts, "
        "384 tokens; 1.32 for spec on smollm2); on a CPU the heads pay more (see the model cards)",
        acceptance_length=1.36,
        acceptance_k=3,
        draft_vocab=8192,
    ),
    DraftEntry(
        name="smollm2-heads",
        kind="heads",
        # apar_spec/models/smollm2-heads/{smollm2-apar,smollm2}: picked by LM head + vocabulary size
        weights="smollm2-heads",
        fingerprint="450fd25da1a6",
        vocab_size=49152,
        targets=["smollm2-apar", "smollm2"],
        notes="4 Medusa-1 heads per target, self-distilled (apar-spec train-heads): for smollm2-apar on its own APAR "
        "answers (600 steps, val top-1 per head 0.51 0.34 0.26 0.21), for the base on its answers (400 steps); no "
        "draft "
        "forward; drafts from the 8,192 most frequent tokens by default (smollm2-heads@full: all). Acceptance measured "
        "with smollm2-apar (apar+spec, k=3, greedy, bf16, 18 list-style Vicuna/MT-bench prompts, 384 tokens; 1.21 for "
        "spec on smollm2)",
        acceptance_length=1.25,
        acceptance_k=3,
        draft_vocab=8192,
    ),
    DraftEntry(
        name="smollm2-hydra",
        kind="heads",
        # apar_spec/models/smollm2-hydra/{smollm2-apar,smollm2}: picked by LM head + vocabulary size
        weights="smollm2-hydra",
        fingerprint="450fd25da1a6",
        vocab_size=49152,
        targets=["smollm2-apar", "smollm2"],
        notes="4 chained (Hydra) heads for smollm2-apar and for smollm2: each reads the target's hidden state and the "
        "token drafted before it; self-distilled (3,000 steps) on each target's own answers (APAR for smollm2-apar) "
        "to the 945 training prompts and 797 draft prompts in other registers; no draft forward; drafts from the "
        "8,192 most frequent tokens by default. "
        "Acceptance measured with smollm2-apar (apar+spec, k=3, greedy, bf16, 45 list-style Vicuna/MT-bench "
        "prompts, 384 tokens; 1.40 at k=1); with smollm2 (spec, k=3, 18 of those prompts): 1.53. Fastest shape "
        "measured "
        "for smollm2-apar: --tree '[[0],[1],[0,0],[0,0,0]]' (acceptance 1.68; 2.08x HF generate against 2.00x for "
        "k=3), and for spec on smollm2 (1.34x against 1.25x). "
        "Faster still in a union with prompt lookup, 'smollm2-hydra+ngram:8' with that tree: apar+spec 3.45x HF "
        "generate (acceptance 2.65)",
        acceptance_length=1.55,
        acceptance_k=3,
        draft_vocab=8192,
    ),
    DraftEntry(
        name="ngram",
        kind="ngram",
        targets=["any"],
        notes="prompt lookup: copies what followed the latest match of the branch's last 1-3 tokens in its own "
        "context; "
        "adds a chain to another draft's tree in a union ('smollm2-hydra+ngram:8')",
    ),
]


def user_file() -> Path:
    if os.environ.get("APAR_SPEC_DRAFTS"):
        return Path(os.environ["APAR_SPEC_DRAFTS"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "apar-spec" / "drafts.json"


def load_user_entries(path: Optional[Path] = None) -> list[DraftEntry]:
    path = path or user_file()
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"draft registry file {path} is not valid JSON ({err}); fix or remove it") from None
    if not isinstance(data, list):
        raise ValueError(f"draft registry file {path} must hold a JSON list of entries")
    entries = []
    allowed = set(DraftEntry.__dataclass_fields__) - {"source"}
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "name" not in item or "kind" not in item:
            raise ValueError(f"draft registry file {path}: entry {i} needs at least 'name' and 'kind'")
        unknown = set(item) - allowed
        if unknown:
            raise ValueError(f"draft registry file {path}: entry {i} has unknown field(s) {sorted(unknown)}")
        if item["kind"] not in KINDS:
            raise ValueError(
                f"draft registry file {path}: entry {i} has kind '{item['kind']}' (choose from {', '.join(KINDS)})"
            )
        dv = item.get("draft_vocab")
        if dv is not None and (not isinstance(dv, int) or isinstance(dv, bool) or dv < 1):
            raise ValueError(
                f"draft registry file {path}: entry {i} has draft_vocab {dv!r} (a token count >= 1, or null)"
            )
        if item["kind"] in ("model", "heads") and not item.get("weights"):
            raise ValueError(
                f"draft registry file {path}: entry {i} ('{item['name']}') of kind '{item['kind']}' needs 'weights'"
            )
        entries.append(DraftEntry(**item, source=str(path)))
    return entries


def entries() -> list[DraftEntry]:
    """Built-in entries, then the user's (a user entry with a built-in name replaces it)."""
    by_name = {e.name: e for e in BUILTIN}
    for e in load_user_entries():
        by_name[e.name] = e
    return list(by_name.values())


def get(name: str) -> DraftEntry:
    found = {e.name: e for e in entries()}
    if name in found:
        return found[name]
    close = difflib.get_close_matches(name, list(found), n=2)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown draft '{name}' (see `apar-spec drafts list`){hint}")


def lookup(name: str) -> DraftEntry:
    """The registry entry called ``name``, or an ad-hoc draft-LM entry for an existing
    model path; anything else is ``get``'s one-line error (with a did-you-mean hint).

    ``NAME@N`` / ``NAME@full`` (``drafts/vocab.py``): the entry of ``NAME`` with its
    ``draft_vocab`` set to ``N`` tokens / the whole vocabulary.
    """
    from dataclasses import replace

    from .union import parse_union
    from .vocab import parse_size, split_name

    parts = None if Path(name).expanduser().exists() else parse_union(name)
    if parts is not None:  # every part must exist; the union itself is described by its parts
        entries_ = [lookup(part) for part, _ in parts]  # parts hold no '+', so none is a union itself
        return DraftEntry(
            name=name,
            kind="union",
            targets=sorted({t for e in entries_ for t in e.targets}),
            notes="union: "
            + ", ".join(f"{p}" + (f" (chain of {k})" if k else " (the decoder's tree)") for p, k in parts),
            source="union",
        )
    base, suffix = (name, None) if Path(name).expanduser().exists() else split_name(name)
    if suffix is not None:
        entry = lookup(base)
        if entry.kind == "ngram":
            raise ValueError(
                f"draft '{name}': the n-gram speculator has no LM head to reduce; drop the '@{suffix}' suffix"
            )
        return replace(entry, name=name, draft_vocab=parse_size(suffix, name))
    try:
        return get(name)
    except ValueError:
        path = Path(name).expanduser()
        if not path.exists():
            raise
        # a train-heads output folder, or a folder of them, one per target (as the built-in heads ship)
        holds_heads = (path / "heads.json").is_file() or (
            path.is_dir() and any((p / "heads.json").is_file() for p in path.iterdir())
        )
        kind = "heads" if holds_heads else "model"
        return DraftEntry(name=name, kind=kind, weights=name, source="path")


def resolve(draft: Any, target, tokenizer) -> Speculator:
    """A speculator object from: a speculator, a loaded model, a registry name, or a model path/id."""
    from apar_spec.drafts.draft_lm import DraftModelSpeculator
    from apar_spec.drafts.ngram import NGramSpeculator

    from apar_spec.decoding.tokens import find_apar_tokens

    apar = find_apar_tokens(tokenizer) if tokenizer is not None else None
    mask = (apar.child_id,) if apar else ()
    if isinstance(draft, Speculator) and hasattr(draft, "propose"):
        return draft
    if hasattr(draft, "config") and hasattr(draft, "forward"):  # a loaded model
        return DraftModelSpeculator(draft, mask_ids=mask)
    if not isinstance(draft, (str, os.PathLike)):
        raise ValueError(
            f"draft must be a registry name, a model path, a model or a speculator (got {type(draft).__name__})"
        )
    entry = lookup(str(draft))
    if entry.kind == "union":
        from apar_spec.drafts.union import UnionSpeculator, parse_union

        parts = parse_union(entry.name)
        return UnionSpeculator([resolve(part, target, tokenizer) for part, _ in parts], [k for _, k in parts])
    if entry.kind == "ngram":
        return NGramSpeculator()
    vocab_size = target.get_output_embeddings().weight.shape[0]
    if entry.fingerprint and tokenizer is not None:
        tn, tfp = vocab_fingerprint(tokenizer)
        if not vocab_fits(entry.fingerprint, tokenizer):  # refuse before loading any weights
            raise ValueError(
                f"draft '{entry.name}' does not fit the target's vocabulary: draft has {entry.vocab_size or '?'} "
                f"tokens "
                f"(fingerprint {entry.fingerprint}), target has {tn} (fingerprint {tfp}); use a draft with the "
                f"target's tokenizer"
            )
    if entry.kind == "heads":
        from apar_spec.drafts.heads import HeadsSpeculator, load_heads, pick_folder

        heads = _cached(entry, target, lambda: load_heads(_weights_path(entry.weights), target, tokenizer, entry.name))
        folder = pick_folder(_weights_path(entry.weights), target)
        vocab = _vocab(entry, [folder, folder.parent], vocab_size)
        return HeadsSpeculator(
            heads,
            target.get_output_embeddings(),
            name=entry.name,
            mask_ids=mask,
            vocab=vocab,
            embed=target.get_input_embeddings(),
        )
    model, draft_tok = _cached(entry, target, lambda: _load_model(entry, target))
    if tokenizer is not None:
        check_vocab(draft_tok, tokenizer, entry.name)
    vocab = _vocab(entry, [_weights_path(entry.weights)], vocab_size) if entry.draft_vocab is not None else None
    return DraftModelSpeculator(model, name=entry.name, mask_ids=mask, vocab=vocab)


def _vocab(entry: DraftEntry, folders: list[Path], vocab_size: int):
    """The entry's reduced draft vocabulary (``draft_vocab`` tokens of the first folder holding a
    ranking), or None for the full one."""
    from .vocab import VOCAB_FILE, load_vocab

    if entry.draft_vocab is None:
        return None
    folder = next((f for f in folders if (f / VOCAB_FILE).is_file()), folders[0])
    return load_vocab(folder, entry.draft_vocab, vocab_size, entry.name)


# Loaded draft weights, per target model (weakly held: a dropped target frees its drafts),
# keyed by (entry name, weights, target dtype, target device). Speculator objects are cheap
# and stateful, so each ``resolve`` builds a new one around the cached weights.
_CACHE: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


def _cached(entry: DraftEntry, target, load_fn):
    """``load_fn()`` once per process for this (entry, target identity, dtype, device)."""
    key = (
        entry.name,
        entry.kind,
        entry.weights,
        _stamp(entry.weights),
        str(getattr(target, "dtype", None)),
        str(getattr(target, "device", None)),
    )
    try:
        per_target = _CACHE.setdefault(target, {})
    except TypeError:  # a target that cannot be weakly referenced: no cache
        return load_fn()
    if key not in per_target:
        per_target[key] = load_fn()
    return per_target[key]


def _stamp(weights: Optional[str]) -> Optional[int]:
    """Newest modification time of a local weights folder's files (so edited files reload)."""
    if not weights:
        return None
    path = Path(weights).expanduser()
    if not path.exists():
        return None
    files = [f for f in path.iterdir() if f.is_file()] if path.is_dir() else [path]
    return max((f.stat().st_mtime_ns for f in files), default=0)


def clear_cache() -> None:
    """Forget every cached draft (tests; or after replacing weights on disk)."""
    _CACHE.clear()


def _weights_path(weights: str) -> Path:
    """An embedded weights folder name (apar_spec/models/NAME: heads, a draft's vocab.json) or a local path."""
    from apar_spec.models.loading import embedded_dir

    embedded = embedded_dir(weights)
    return embedded if (embedded.is_dir() and not Path(weights).exists()) else Path(weights).expanduser()


def _load_model(entry: DraftEntry, target):
    from apar_spec.models.loading import load

    return load(entry.weights, dtype=target.dtype, device=target.device)
