"""APAR control tokens ``[Fork]`` and ``[Child]``.

``[Fork]`` is sampled by a branch to spawn a child; ``[Child]`` is never sampled,
only forced as a child's first node. Both are added as *special* tokens so a
tokenizer never splits them and ``decode(skip_special_tokens=True)`` hides them.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

FORK_TOKEN = "[Fork]"
CHILD_TOKEN = "[Child]"


@dataclass(frozen=True)
class AparTokens:
    fork_id: int
    child_id: int
    # Tokens whose text holds a line break. A child at the fork-depth cap that asks for
    # [Fork] is cut back to its last one (``DecodeOptions.depth_cap``); empty: no cut.
    line_break_ids: frozenset[int] = field(default=frozenset(), compare=False, repr=False)
    # The text of every token that holds a backtick (any other token holds none). Decoding
    # tracks code fences with it: no [Fork] inside a ``` block (``DecodeOptions.fork_in_code``).
    backtick_texts: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}), compare=False, repr=False)
    # Every token's text, by id: a branch's lines are compared with them at each fork
    # (``DecodeOptions.repeated_title``); empty: the rule cannot compare, so it never ends a branch.
    token_texts: tuple[str, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class _VocabFacts:
    size: int
    line_breaks: frozenset[int]
    backticks: Mapping[int, str]
    texts: tuple[str, ...]


_FACTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocab_facts(tokenizer) -> _VocabFacts:
    """Per-token facts the decoder needs, memoised per tokenizer (decoding a 49k vocabulary
    token by token takes ~0.3 s)."""
    key = len(tokenizer)
    try:
        cached = _FACTS.get(tokenizer)
    except TypeError:  # not weak-referenceable: compute every time
        cached = None
    if cached is not None and cached.size == key:
        return cached
    texts = tokenizer.batch_decode([[i] for i in range(key)])
    facts = _VocabFacts(
        size=key,
        line_breaks=frozenset(i for i, t in enumerate(texts) if "\n" in t),
        backticks=MappingProxyType({i: t for i, t in enumerate(texts) if "`" in t}),
        texts=tuple(texts),
    )
    try:
        _FACTS[tokenizer] = facts
    except TypeError:
        pass
    return facts


def line_break_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokens whose decoded text contains a newline (memoised per tokenizer)."""
    return _vocab_facts(tokenizer).line_breaks


def find_apar_tokens(tokenizer) -> AparTokens | None:
    """The ids of ``[Fork]``/``[Child]`` in ``tokenizer``, or None if it has not both."""
    vocab = tokenizer.get_vocab()
    if FORK_TOKEN in vocab and CHILD_TOKEN in vocab:
        facts = _vocab_facts(tokenizer)
        return AparTokens(vocab[FORK_TOKEN], vocab[CHILD_TOKEN], facts.line_breaks, facts.backticks, facts.texts)
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
