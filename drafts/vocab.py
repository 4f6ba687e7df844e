"""A draft's reduced vocabulary: propose only the N most frequent tokens (FR-Spec).

Why: a small draft on a large-vocabulary target spends most of its time in the LM
head. SmolLM2's head is 49,152 x 576, about 80% of a 2-layer draft's multiply-adds,
and each Medusa head pays it once more. Restricting the *draft's* head to the rows of
the tokens that make up nearly all generated text (FR-Spec, Zhao et al. 2025; EAGLE-3's
draft vocabulary) cuts that cost by V / N. Nothing is lost: the target still verifies
with its full head, so greedy output is unchanged. Sampled drafts put zero probability
outside the N tokens, and the rejection rule stays exact for any draft distribution.
A token outside the N can still be emitted, as the target's bonus token; it just can't
be drafted.

The ranking is a file next to the draft's weights, ``vocab.json``::

    {"ranked_ids": [...], "source": "...", "counted_tokens": 123456,
     "coverage": {"4096": 0.93, ...}}

``ranked_ids`` holds token ids, most frequent first, counted over the self-distilled
answers the draft was trained on. A draft name takes a size suffix: ``NAME@8192``
proposes from the top 8,192, ``NAME@full`` from all of them. The registry entry's
``draft_vocab`` is the size used when no suffix is given.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

VOCAB_FILE = "vocab.json"


@dataclass
class DraftVocab:
    """The target token ids a draft may propose, and the LM head restricted to them."""

    ids: torch.Tensor  # [N] long: column j of the reduced logits is token ids[j]

    @property
    def size(self) -> int:
        return int(self.ids.numel())

    def head(self, lm_head: nn.Module) -> nn.Linear:
        """A ``[d] -> [N]`` linear layer holding rows ``ids`` of ``lm_head`` (a copy, frozen)."""
        weight = lm_head.weight  # [V, d]
        bias = getattr(lm_head, "bias", None)
        ids = self.ids.to(weight.device)
        out = nn.Linear(weight.shape[1], self.size, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            out.weight.copy_(weight.index_select(0, ids))
            if bias is not None:
                out.bias.copy_(bias.index_select(0, ids))
        return out.requires_grad_(False).eval()

    def columns(self, token_ids: Iterable[int]) -> list[int]:
        """Columns of the reduced logits that hold ``token_ids`` (tokens outside the vocabulary are skipped)."""
        where = {int(t): j for j, t in enumerate(self.ids.tolist())}
        return [where[t] for t in token_ids if t in where]


def rank_tokens(sequences: Iterable[Iterable[int]], keep: Iterable[int] = ()) -> tuple[list[int], int]:
    """Token ids by frequency over ``sequences`` (ties: lower id first), ``keep`` ids first.

    Returns ``(ranked_ids, counted)``. ``keep``: ids that must be draftable however rare
    (EOS, ``[Fork]``): a draft that can never propose EOS or a fork would stall exactly
    where the branch structure is decided.
    """
    counts: Counter[int] = Counter()
    for seq in sequences:
        counts.update(int(t) for t in seq)
    first = list(dict.fromkeys(int(t) for t in keep))
    rest = sorted((t for t in counts if t not in set(first)), key=lambda t: (-counts[t], t))
    return first + rest, sum(counts.values())


def coverage(ranked: list[int], sequences: Iterable[Iterable[int]], sizes: Iterable[int]) -> dict[str, float]:
    """Fraction of the tokens of ``sequences`` that the top-``n`` of ``ranked`` hold, per size."""
    rank = {t: i for i, t in enumerate(ranked)}
    positions = [rank.get(int(t)) for seq in sequences for t in seq]  # None: not ranked at all
    total = max(1, len(positions))
    return {str(n): sum(p is not None and p < n for p in positions) / total for n in sizes}


def save_ranking(folder: str | Path, ranked: list[int], meta: dict) -> Path:
    path = Path(folder) / VOCAB_FILE
    path.write_text(json.dumps({**meta, "ranked_ids": ranked}) + "\n")
    return path


def load_vocab(folder: str | Path, size: Optional[int], vocab_size: int, label: str) -> Optional[DraftVocab]:
    """The top-``size`` ids of ``folder/vocab.json`` (below ``vocab_size``), or None for the full vocabulary.

    ``size`` None or >= the vocabulary: the full head (no ranking needed). A size asked
    of a draft without a ranking is a one-line error naming the draft.
    """
    if size is None or size >= vocab_size:
        return None
    if size < 1:
        raise ValueError(f"draft vocabulary size must be >= 1 (got {size} for '{label}')")
    path = Path(folder) / VOCAB_FILE
    if not path.is_file():
        raise ValueError(
            f"draft '{label}' has no token ranking ({VOCAB_FILE}), so it cannot use a reduced vocabulary; "
            f"drop the '@{size}' suffix"
        )
    try:
        ranked = [int(t) for t in json.loads(path.read_text())["ranked_ids"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not a valid token ranking ({err}); rebuild it or drop the vocabulary suffix"
        ) from None
    ids = [t for t in ranked if 0 <= t < vocab_size][:size]
    if not ids:
        raise ValueError(f"{path} ranks no token of this target's vocabulary ({vocab_size} ids)")
    return DraftVocab(torch.tensor(ids, dtype=torch.long))


def split_name(name: str) -> tuple[str, Optional[str]]:
    """``'smollm2-draft@8192'`` -> ``('smollm2-draft', '8192')``; no suffix -> ``(name, None)``."""
    base, sep, suffix = name.rpartition("@")
    if not sep or not base or "/" in suffix:
        return name, None
    return base, suffix


def parse_size(suffix: str, label: str) -> Optional[int]:
    """``'full'`` -> None (every token); ``'8192'`` -> 8192; anything else a one-line error."""
    if suffix.strip().lower() == "full":
        return None
    try:
        n = int(suffix)
    except ValueError:
        raise ValueError(f"draft '{label}': vocabulary suffix '@{suffix}' must be a token count or 'full'") from None
    if n < 1:
        raise ValueError(f"draft '{label}': vocabulary suffix '@{suffix}' must be >= 1")
    return n


# ------------------------------------------------------------------- vocabulary fingerprints
CONTROL_TOKENS = ("[Fork]", "[Child]")


def vocab_fingerprint(tokenizer, words_only: bool = False) -> tuple[int, str]:
    """(vocabulary size, short hash of the token -> id map): equal iff the tokenizers agree on ids.

    ``words_only`` leaves out ``[Fork]``/``[Child]``: an APAR model made from a pretrained
    base (smollm2-apar from smollm2) shares every other id with its base, so one draft
    serves both (the decoder pads or cuts draft logits to the target's width).
    """
    key = (len(tokenizer), words_only)
    try:
        memo = _FINGERPRINTS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: compute every time
        memo = {}
    if key not in memo:
        vocab = tokenizer.get_vocab()
        if words_only:
            vocab = {k: v for k, v in vocab.items() if k not in CONTROL_TOKENS}
        memo[key] = (len(vocab), hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:12])
    return memo[key]


# tokenizer -> {(its length, words_only): fingerprint}. Why: hashing a 49k-token vocabulary
# takes ~50 ms, and every ``generate`` call with a named draft checks it (3 times), which a
# benchmark would time as part of the decode. Keyed by the tokenizer's length, so adding
# tokens (an adapter's [Fork]/[Child]) gives a new fingerprint; dies with the tokenizer.
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vocab_fits(draft_fp: str, target_tokenizer) -> bool:
    """A draft fingerprint fits a target whose vocabulary equals it, with or without the APAR control tokens."""
    return draft_fp in (vocab_fingerprint(target_tokenizer)[1], vocab_fingerprint(target_tokenizer, words_only=True)[1])


def check_vocab(draft_tokenizer, target_tokenizer, draft_name: str) -> None:
    dn, dfp = vocab_fingerprint(draft_tokenizer)
    tn, tfp = vocab_fingerprint(target_tokenizer)
    dv, tv = draft_tokenizer.get_vocab(), target_tokenizer.get_vocab()
    same_words = vocab_fingerprint(draft_tokenizer, True)[1] == vocab_fingerprint(target_tokenizer, True)[1] and all(
        dv[t] == tv[t] for t in CONTROL_TOKENS if t in dv and t in tv
    )
    if dfp != tfp and not same_words:
        raise ValueError(
            f"draft '{draft_name}' does not fit the target's vocabulary: draft has {dn} tokens "
            f"(fingerprint {dfp}), target has {tn} (fingerprint {tfp}); use a draft with the target's tokenizer"
        )
