"""APAR control tokens ``[Fork]`` and ``[Child]``.

``[Fork]`` is sampled by a branch to spawn a child; ``[Child]`` is never sampled,
only forced as a child's first node. Both are added as *special* tokens so a
tokenizer never splits them and ``decode(skip_special_tokens=True)`` hides them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

FORK_TOKEN = "[Fork]"
CHILD_TOKEN = "[Child]"


@dataclass(frozen=True)
class AparTokens:
    fork_id: int
    child_id: int
    # Tokens whose text holds a line break. A child at the fork-depth cap that asks for
    # [Fork] is cut back to its last one (``DecodeOptions.depth_cap``); empty: no cut.
    line_break_ids: frozenset[int] = field(default=frozenset(), compare=False, repr=False)


_LINE_BREAKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def line_break_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokens whose decoded text contains a newline (memoised per tokenizer:
    decoding a 49k vocabulary token by token takes ~0.3 s)."""
    key = len(tokenizer)
    try:
        cached = _LINE_BREAKS.get(tokenizer)
    except TypeError:  # not weak-referenceable: compute every time
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    texts = tokenizer.batch_decode([[i] for i in range(key)])
    found = frozenset(i for i, t in enumerate(texts) if "\n" in t)
    try:
        _LINE_BREAKS[tokenizer] = (key, found)
    except TypeError:
        pass
    return found


def find_apar_tokens(tokenizer) -> AparTokens | None:
    """The ids of ``[Fork]``/``[Child]`` in ``tokenizer``, or None if it has not both."""
    vocab = tokenizer.get_vocab()
    if FORK_TOKEN in vocab and CHILD_TOKEN in vocab:
        return AparTokens(vocab[FORK_TOKEN], vocab[CHILD_TOKEN], line_break_ids(tokenizer))
    return None


def add_apar_tokens(model, tokenizer) -> AparTokens:
    """Add the control tokens to ``tokenizer`` and grow ``model``'s embeddings to match.

    Idempotent. New embedding rows are initialised by transformers' resize (mean of
    the old rows), which keeps a pretrained model's outputs sane before fine-tuning.
    """
    found = find_apar_tokens(tokenizer)
    if found is None:
        tokenizer.add_special_tokens({"additional_special_tokens": [FORK_TOKEN, CHILD_TOKEN]})
        found = find_apar_tokens(tokenizer)
    if model is not None:
        need = max(len(tokenizer), found.fork_id + 1, found.child_id + 1)
        if model.get_input_embeddings().weight.shape[0] < need:
            model.resize_token_embeddings(need)
    return found
