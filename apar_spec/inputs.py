"""Prompts in every form a Hugging Face user holds them -> plain lists of token ids.

Why a module of its own: ``generate()`` is called with what ``tokenizer(...)`` and
``tokenizer.apply_chat_template(..., tokenize=True)`` return (in transformers 5.x both
give a ``BatchEncoding``, single or batched, with lists or tensors), with tensors sliced
from them, or with plain strings and id lists. Each form is turned into ``list[int]``
here, once, and everything else is refused with a one-line ``ValueError`` that names
the prompt and says what to pass instead - never an ``IndexError`` from the embedding
or an ``int('input_ids')`` deep in the decoder.

Accepted (``prompts`` is one of these, or a list/tuple of them):

- ``str``: tokenised with ``add_special_tokens=True`` (no chat template here);
- a flat list/tuple of ints: one prompt's token ids (what ``apply_chat_template(...,
  return_dict=False)`` returns);
- a 1D integer tensor/array: one prompt; a 2D one: one prompt per row;
- a ``BatchEncoding`` or a dict with ``input_ids`` (single or batched, lists or
  tensors); with an ``attention_mask``, left or right padding is stripped per row.

A batch inside the list contributes one prompt per row, in order; ``generate`` returns
one ``Generation`` per prompt row.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any, Optional

_WHAT = "a prompt is a string, a list of token ids, a 1D/2D integer tensor, or a tokenizer output with 'input_ids'"


def _describe(x: Any) -> str:
    if x is None:
        return "None"
    if isinstance(x, bool):
        return f"a bool ({x})"
    if isinstance(x, float):
        return f"a float ({x})"
    name = type(x).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _is_array(x: Any) -> bool:
    """torch tensors and numpy arrays (duck-typed so numpy stays optional here)."""
    return hasattr(x, "ndim") and hasattr(x, "tolist") and hasattr(x, "dtype")


def _array_rows(x: Any, where: str) -> list[list[Any]]:
    """Rows of a 1D (one row) or 2D integer array, as Python lists; anything else refused."""
    import torch

    if isinstance(x, torch.Tensor):
        integer = not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)
    else:
        kind = getattr(x.dtype, "kind", "")
        integer = kind in ("i", "u")
    if not integer:
        raise ValueError(f"{where} is a tensor of {str(x.dtype).removeprefix('torch.')}; token ids must be integers")
    if x.ndim == 1:
        return [x.tolist()]
    if x.ndim == 2:
        return x.tolist()
    raise ValueError(f"{where} is a {x.ndim}D tensor; pass a 1D tensor (one prompt) or a 2D one (one prompt per row)")


def _to_ids(p: Any, where: str) -> list[int]:
    """One prompt's token ids from a flat sequence of integers."""
    ids = []
    for j, t in enumerate(p):
        if isinstance(t, bool) or t is None or isinstance(t, (str, bytes, float)):
            if isinstance(t, str) and t in ("input_ids", "attention_mask", "token_type_ids"):
                raise ValueError(
                    f"{where} holds the key '{t}' where a token id belongs: a tokenizer output was unpacked as a list; "
                    "pass the BatchEncoding itself (or its ['input_ids'])"
                )
            raise ValueError(f"{where}: token {j} is {_describe(t)}, not an integer token id")
        if isinstance(t, (list, tuple)) or (_is_array(t) and t.ndim > 0):
            raise ValueError(f"{where} is a nested list; a prompt's token ids must be a flat list of integers")
        try:
            ids.append(operator.index(t))
        except TypeError:
            raise ValueError(f"{where}: token {j} is {_describe(t)}, not an integer token id") from None
    return ids


def _strip_padding(ids: list[int], mask: Any, where: str) -> list[int]:
    """Keep the tokens the attention mask marks; only left or right padding may be masked."""
    mask = [int(m) for m in (mask.tolist() if _is_array(mask) else mask)]
    if len(mask) != len(ids):
        raise ValueError(f"{where}: attention_mask has {len(mask)} entries for {len(ids)} token ids")
    kept = [i for i, m in enumerate(mask) if m]
    if not kept:
        return []
    first, last = kept[0], kept[-1]
    if last - first + 1 != len(kept):
        raise ValueError(f"{where}: attention_mask has holes; only left or right padding can be stripped")
    return ids[first : last + 1]


def _labels(where: str, n: int, top: bool) -> list[str]:
    """Row labels: a top-level batch's rows are the prompts; a batch in the list is 'prompt i row r'."""
    if top:
        return [f"prompt {r}" for r in range(n)]
    return [where] if n == 1 else [f"{where} row {r}" for r in range(n)]


def _mapping_rows(enc: Mapping, where: str, top: bool = False) -> list[tuple[str, Any, Any]]:
    """(label, ids, mask) per row of a tokenizer output (single or batched)."""
    if "input_ids" not in enc:
        keys = ", ".join(map(str, list(enc.keys())[:5])) or "none"
        raise ValueError(f"{where} is a {type(enc).__name__} without 'input_ids' (keys: {keys}); {_WHAT}")
    ids, mask = enc["input_ids"], enc.get("attention_mask")
    if _is_array(ids):
        rows = _array_rows(ids, where)
        masks = _array_rows(mask, f"{where} attention_mask") if mask is not None else [None] * len(rows)
    elif (
        isinstance(ids, Sequence)
        and not isinstance(ids, (str, bytes))
        and ids
        and all(isinstance(r, (list, tuple)) or _is_array(r) for r in ids)
    ):
        rows = [r.tolist() if _is_array(r) else list(r) for r in ids]  # batched: a list of rows
        masks = list(mask) if mask is not None else [None] * len(rows)
    elif isinstance(ids, Sequence) and not isinstance(ids, (str, bytes)):
        rows, masks = [list(ids)], [mask]
    else:
        raise ValueError(f"{where}: 'input_ids' is {_describe(ids)}; {_WHAT}")
    if len(masks) != len(rows):
        raise ValueError(f"{where}: attention_mask has {len(masks)} rows for {len(rows)} rows of input_ids")
    return list(zip(_labels(where, len(rows), top), rows, masks))


def _rows_of(p: Any, where: str, top: bool = False) -> list[tuple[str, Any, Any]]:
    """(label, ids or text, mask) for each prompt row that ``p`` holds."""
    if p is None:
        raise ValueError(f"{where} is None; {_WHAT}")
    if isinstance(p, str):
        return [(where, p, None)]
    if isinstance(p, Mapping):
        return _mapping_rows(p, where, top)
    if _is_array(p):
        rows = _array_rows(p, where)
        return [(label, row, None) for label, row in zip(_labels(where, len(rows), top), rows)]
    if isinstance(p, (list, tuple)):
        return [(where, p, None)]
    raise ValueError(f"{where} is {_describe(p)}; {_WHAT}")


def _is_flat_ids(prompts: Sequence) -> bool:
    return bool(prompts) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts)


def normalize_prompts(tokenizer, prompts: Any, *, vocab_size: Optional[int] = None) -> list[list[int]]:
    """Token ids of each prompt row (see the module docstring for the accepted forms).

    ``vocab_size``: the model's embedding rows; an id outside ``[0, vocab_size)`` is an
    error naming the prompt, the id and the size.
    """
    if isinstance(prompts, (str, bytes)):
        raise ValueError("prompts must be a list of prompts; wrap a single string in a list: [prompt]")
    if isinstance(prompts, Mapping) or _is_array(prompts):
        rows = _rows_of(prompts, "prompts", top=True)
    elif isinstance(prompts, Sequence):
        if len(prompts) == 0:
            raise ValueError("prompts is empty: pass at least one prompt")
        if _is_flat_ids(prompts):  # one prompt's ids, e.g. apply_chat_template(..., return_dict=False)
            rows = [("prompt 0", list(prompts), None)]
        else:
            rows = [row for i, p in enumerate(prompts) for row in _rows_of(p, f"prompt {i}")]
    else:
        raise ValueError(f"prompts is {_describe(prompts)}; pass a list of prompts ({_WHAT})")
    if not rows:
        raise ValueError("prompts is empty: pass at least one prompt")
    out = []
    for where, x, mask in rows:
        if isinstance(x, str):
            if not x.strip():
                raise ValueError(f"{where} is empty")
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer; pass one or give token ids")
            ids = list(tokenizer(x, add_special_tokens=True)["input_ids"])
        else:
            ids = _to_ids(x, where)
            if mask is not None:
                ids = _strip_padding(ids, mask, where)
        if not ids:
            raise ValueError(f"{where} is empty")
        if vocab_size is not None:
            bad = next((t for t in ids if t < 0 or t >= vocab_size), None)
            if bad is not None:
                raise ValueError(
                    f"{where} has token id {bad}, outside the model's vocabulary of {vocab_size} "
                    f"(ids 0..{vocab_size - 1}); "
                    "was it encoded with another tokenizer?"
                )
        out.append(ids)
    return out


def left_pad(rows: Sequence[Sequence[int]], pad_id: int):
    """The inverse of the stripping above, for batched forwards of prompts of different lengths:
    ``(ids, mask)``, both ``[len(rows), longest]`` long tensors, each row right-aligned so
    every row's last token sits in the last column."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [b, width]
    mask = torch.zeros(len(rows), width, dtype=torch.long)  # [b, width]
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask
