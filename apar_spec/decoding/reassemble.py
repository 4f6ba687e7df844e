"""Turn a decoded branch tree back into one answer, depth-first.

Reading order: a branch's tokens up to its ``[Fork]``, then that child's whole
answer (recursively), then the branch's continuation, and so on. The control
tokens ``[Fork]``/``[Child]`` and the children's EOS are dropped; the root's EOS
stays (so plain AR output equals ``model.generate``'s new tokens exactly).

Text conventions (as in the APAR training format of ``apar_spec.training.restructure``,
where the parent keeps ``"1. Title:"`` and ``"\\n2. Title:"`` and the child keeps
``" details"``): when a model leaves them out, a child's text is separated from
the title by one space, and a parent continuation that starts a new numbered
item starts on a new line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from apar_spec.decoding.answer_tree import AnswerTree, ForkPoint

_NEW_ITEM = re.compile(r"^\s*\d+[.)]")


@dataclass
class BranchInfo:
    """One decoded branch, as the API reports it."""

    id: int
    parent: Optional[int]
    fork_index: Optional[int]  # index in the parent's ``token_ids`` of the [Fork] it hangs under
    token_ids: list[int]  # the branch's own tokens, control tokens included ([Child] first for a child)
    # "eos", "length", "budget", "context", "depth" (a capped child that asked to fork),
    # "repeat" (asked to fork after a title it had forked after: DecodeOptions.repeated_title)
    finish: Optional[str]

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "parent": self.parent,
            "fork_index": self.fork_index,
            "token_ids": self.token_ids,
            "finish": self.finish,
        }


def _children(branches: list[BranchInfo]) -> dict[tuple[int, int], BranchInfo]:
    return {(b.parent, b.fork_index): b for b in branches if b.parent is not None}


def reading_order(
    branches: list[BranchInfo], fork_id: Optional[int], child_id: Optional[int], eos_ids: set[int]
) -> list[int]:
    """Answer token ids in depth-first reading order (see module docstring)."""
    children = _children(branches)

    def walk(b: BranchInfo) -> list[int]:
        out: list[int] = []
        for i, tok in enumerate(b.token_ids):
            if tok == fork_id:
                child = children.get((b.id, i))
                if child is not None:
                    out.extend(walk(child))
            elif tok == child_id and b.parent is not None and i == 0:
                continue
            elif tok in eos_ids and b.parent is not None:
                continue
            else:
                out.append(tok)
        return out

    return walk(branches[0])


def to_answer_tree(
    branches: list[BranchInfo], decode: Callable[[list[int]], str], fork_id: Optional[int], child_id: Optional[int]
) -> AnswerTree:
    """The decoded tree as an ``AnswerTree`` (texts decoded per segment, conventions applied)."""
    children = _children(branches)

    def build(b: BranchInfo) -> AnswerTree:
        ids = b.token_ids[1:] if (b.parent is not None and b.token_ids[:1] == [child_id]) else b.token_ids
        offset0 = len(b.token_ids) - len(ids)
        text = ""
        forks: list[ForkPoint] = []
        segment: list[int] = []
        for i, tok in enumerate(ids):
            if tok == fork_id:
                text += _continuation(decode(segment), after_fork=bool(forks))
                segment = []
                child = children.get((b.id, i + offset0))
                child_tree = _space_child(build(child)) if child is not None else AnswerTree("")
                forks.append(ForkPoint(len(text), child_tree))
            else:
                segment.append(tok)
        text += _continuation(decode(segment), after_fork=bool(forks))
        return AnswerTree(text, forks)

    return build(branches[0])


def _space_child(tree: AnswerTree) -> AnswerTree:
    """Separate a child's text from its parent's title by one space if the model did not."""
    if not tree.text or tree.text[0].isspace():
        return tree
    return AnswerTree(" " + tree.text, [ForkPoint(f.offset + 1, f.child) for f in tree.forks])


def _continuation(text: str, after_fork: bool) -> str:
    if after_fork and _NEW_ITEM.match(text) and not text.startswith("\n"):
        return "\n" + text.lstrip(" ")
    return text
