"""Training data: rows read into examples, examples packed, and which examples form each step's batch.

Why here and not in the loop: bad data should fail in one line naming its file and line
*before* a model is loaded (:func:`read_examples`), and the batch of a step must be a
pure function of (seed, step) so a resumed run sees exactly the data an uninterrupted
one would (:class:`BatchSchedule`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apar_spec.decoding.answer_tree import AnswerTree
from apar_spec.decoding.tokens import AparTokens
from apar_spec.jsonl import json_objects
from apar_spec.training.packing import PackedExample, pack_tree
from apar_spec.training.tokenizer import prompt_token_ids


@dataclass
class TrainExample:
    """A prompt and its answer tree (a tree without forks is an unstructured answer)."""

    prompt: str
    tree: AnswerTree
    open_end: bool = False  # the answer was cut by a token limit: its main branch trains no EOS

    @property
    def structured(self) -> bool:
        return bool(self.tree.forks)


def _row_to_example(row: Any, mode: str, max_depth: int, where: str) -> TrainExample:
    get = row.get if isinstance(row, dict) else (lambda k, d=None: getattr(row, k, d))
    prompt = get("prompt")
    tree = get("tree")
    answer = get("answer")
    if not isinstance(prompt, str) or (tree is None and not isinstance(answer, str)):
        raise ValueError(f"{where}: a row needs a string 'prompt' and an 'answer' string or a 'tree'")
    if isinstance(tree, dict):
        try:
            tree = AnswerTree.from_dict(tree)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: invalid 'tree' ({e!r})") from None
    open_end = get("open_end", False)
    if not isinstance(open_end, bool):
        raise ValueError(f"{where}: 'open_end' must be true or false, not {open_end!r}")
    if mode == "plain":
        return TrainExample(prompt, AnswerTree(answer if isinstance(answer, str) else tree.reassemble()), open_end)
    if tree is None:
        from apar_spec.training.restructure import restructure  # raw prompt/answer row: restructure it here

        tree = restructure(answer, max_depth=max_depth)
    return TrainExample(prompt, tree, open_end)


def read_examples(data: str | Path | Iterable[Any], mode: str = "apar", max_depth: int = 1) -> list[TrainExample]:
    """Training examples from a JSONL path or a list of rows (dicts or objects with ``prompt``/``answer``/``tree``).

    ``mode="apar"``: rows with a ``tree`` use it, raw rows are restructured; ``mode="plain"``:
    every answer becomes sequential text (reassembled from the tree if only a tree is given).
    Errors name the file and line, in one line.
    """
    if mode not in ("apar", "plain"):
        raise ValueError(f"mode must be 'apar' or 'plain', not {mode!r}")
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"training data file not found: {path}")
        examples = []
        with path.open(encoding="utf-8") as f:
            for _, where, row in json_objects(path, f, where="{path}:{n}"):
                examples.append(_row_to_example(row, mode, max_depth, where))
        if not examples:
            raise ValueError(f"{path}: no training rows")
        return examples
    examples = [_row_to_example(r, mode, max_depth, f"example {i}") for i, r in enumerate(data)]
    if not examples:
        raise ValueError("no training examples")
    return examples


def pack_example(ex: TrainExample, tokenizer, apar: AparTokens | None) -> PackedExample:
    """``ex`` as the model trains on it: its prompt as the model sees it at inference, then its tree."""
    return pack_tree(prompt_token_ids(ex.prompt, tokenizer), ex.tree, tokenizer, apar, open_end=ex.open_end)


def mixed_pools(
    packed: Sequence[PackedExample], structured: Sequence[bool], batch_size: int, mix_ratio: float
) -> tuple[list[list[PackedExample]], list[int]]:
    """The non-empty pools (structured, then unstructured) and how many examples of each a batch takes.

    ``round(batch_size * mix_ratio)`` structured and the rest unstructured, as in the
    paper's 0.5/0.5 mix; if one pool is empty the other fills the batch.
    """
    pools = [[p for p, s in zip(packed, structured) if s], [p for p, s in zip(packed, structured) if not s]]
    n_struct = round(batch_size * mix_ratio)
    per_batch = [n_struct, batch_size - n_struct]
    if not pools[0]:
        per_batch = [0, batch_size]
    if not pools[1]:
        per_batch = [batch_size, 0]
    keep = [i for i in range(2) if per_batch[i] > 0]
    return [pools[i] for i in keep], [per_batch[i] for i in keep]


class BatchSchedule:
    """Which examples form the batch of step ``s``: a pure function of (seed, step).

    Each pool (structured / unstructured) is walked in epochs of seeded permutations,
    so a resumed run sees exactly the batches the uninterrupted run would have.
    """

    def __init__(
        self, pool_sizes: Sequence[int], per_batch: Sequence[int], seed: int, stride: int = 1, offset: int = 0
    ):
        self.pool_sizes, self.per_batch, self.seed = list(pool_sizes), list(per_batch), seed
        self.stride, self.offset = stride, offset  # processes: stride = world size, offset = rank
        self._perms: dict[tuple[int, int], list[int]] = {}

    def _perm(self, pool: int, epoch: int) -> list[int]:
        key = (pool, epoch)
        if key not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + pool * 7919 + epoch)
            self._perms[key] = torch.randperm(self.pool_sizes[pool], generator=g).tolist()
        return self._perms[key]

    def indices(self, step: int) -> list[tuple[int, int]]:
        """``(pool, index in pool)`` of every example in this process's batch of ``step``."""
        out = []
        for pool, (n, k) in enumerate(zip(self.pool_sizes, self.per_batch)):
            start = (step * self.stride + self.offset) * k
            for pos in range(start, start + k):
                out.append((pool, self._perm(pool, pos // n)[pos % n]))
        return out
