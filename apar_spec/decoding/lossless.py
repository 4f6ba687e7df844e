"""Where two greedy answers first part, and how close the target's call was there.

A speculative answer must equal its plain one token for token. When it does not, one
number tells numerics from a bug: the logit gap, under the target, between the two
tokens the runs chose at their first difference. Greedy decoding picks the larger
logit, so two runs can only part where the two are (near-)tied once rounding is in
play; a gap well above float32's rounding on a whole forward (``NEAR_TIE``) means one
run did not take the argmax of the same distribution - a bug.

The first difference is found in APAR time (``apar_spec.decoding.clock``): answers are trees,
and the earliest token at which they part is the one that can explain the rest (a
different [Fork] there changes every branch after it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

NEAR_TIE = 1e-4  # float32 logit gaps below this are rounding (a whole forward in another batch shape)

Tree = Sequence[tuple[Optional[int], Optional[int], list[int]]]  # per branch id: (parent, fork index, tokens)


@dataclass
class Difference:
    branch: int  # branch id (plain APAR's numbering, as results give it)
    index: int  # index in that branch's tokens
    time: int  # its APAR time
    want: Optional[int]  # the reference's token there (None: the reference branch ended before it)
    got: Optional[int]  # the other run's token there (None: ended before it)
    context: list[int]  # prompt + the reference's tokens that lead to the token (ids the target reads)
    level: int = 0  # the branch's fork nesting (root 0): the [Fork] offset applies below max_depth

    def to_dict(self) -> dict:
        return {"branch": self.branch, "index": self.index, "time": self.time, "want": self.want, "got": self.got}


def first_difference(prompt: list[int], ref: Tree, other: Tree) -> Optional[Difference]:
    """The earliest token (in APAR time, then branch order) at which ``other`` parts from
    ``ref``; None if the trees are equal. Branches are compared where both have them
    with the same parent and fork index; one that only a side has parts at its [Fork]."""
    base: dict[int, int] = {}
    best: Optional[tuple[int, int, int]] = None  # (time, branch, index)
    for i, (parent, fork_index, tokens) in enumerate(ref):
        base[i] = 0 if parent is None else base[parent] + fork_index
        if i >= len(other) or (other[i][0], other[i][1]) != (parent, fork_index):
            continue
        theirs = other[i][2]
        j = next((n for n, (a, b) in enumerate(zip(tokens, theirs)) if a != b), None)
        if j is None:
            if len(tokens) == len(theirs):
                continue
            j = min(len(tokens), len(theirs))
        cand = (base[i] + j, i, j)
        best = cand if best is None or cand < best else best
    if best is None:
        if len(ref) != len(other):  # same shared branches, different count: should not happen
            return Difference(min(len(ref), len(other)), 0, -1, None, None, list(prompt))
        return None
    time, i, j = best
    tokens = ref[i][2]
    theirs = other[i][2]
    level, p = 0, ref[i][0]
    while p is not None:
        level, p = level + 1, ref[p][0]
    return Difference(
        i,
        j,
        time,
        tokens[j] if j < len(tokens) else None,
        theirs[j] if j < len(theirs) else None,
        context_of(prompt, ref, i, j),
        level,
    )


def context_of(prompt: list[int], tree: Tree, i: int, upto: int) -> list[int]:
    """prompt + ancestors' tokens up to each fork + branch ``i``'s tokens[:upto]."""
    parent, fork_index, tokens = tree[i]
    head = list(prompt) if parent is None else context_of(prompt, tree, parent, fork_index + 1)
    return head + list(tokens[:upto])


@torch.inference_mode()
def logit_gap(
    model, d: Difference, fork_id: Optional[int] = None, fork_bias: float = 0.0, max_depth: Optional[int] = None
) -> Optional[float]:
    """|logit(want) - logit(got)| of the target at the difference, the [Fork] offset included
    where it applies (None where one run had no token there: a different stop, not a
    different choice)."""
    if d.want is None or d.got is None:
        return None
    ids = torch.tensor([d.context], device=model.device)
    logits = model(ids).logits[0, -1].float()  # [V]
    if fork_id is not None and fork_bias and (max_depth is None or d.level < max_depth):
        logits[fork_id] += fork_bias
    return abs(float(logits[d.want] - logits[d.got]))


def explain(dtype: Optional[str], gap: Optional[float]) -> str:
    """Why two greedy answers differ: 'low precision', 'near-tie' or 'bug' (see the module docstring)."""
    if dtype in ("bfloat16", "float16"):
        return "low precision"
    if gap is not None and gap < NEAR_TIE:
        return "near-tie"
    return "bug"
