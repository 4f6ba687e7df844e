"""Committing sampled tokens to a branch: the finish rules and spawning children.

Model-free on purpose. Whoever samples a branch's next token - the decoder's verify pass
(``decoder.py``) or an upstream engine streaming one request per branch
(``serving/upstream.py``) - commits it here, so both apply the same rules in the same
order: a ``[Fork]`` by a child at the depth cap ends it (``depth_cap="end"``), a
``[Fork]`` after a title the run already forked after ends the branch
(``repeated_title="end"``), any other ``[Fork]`` spawns a child on the APAR clock, and
EOS, the per-branch cap or the model's context end the branch. The request's token
budget is applied afterwards, over all branches (``budget.apply_budget``)."""

from __future__ import annotations

from typing import Optional

from apar_spec.decoding import clock
from apar_spec.decoding.fork_rules import ForkRules, cut_to_last_line, open_segment_start
from apar_spec.decoding.state import Branch, Request


class Committer:
    """The commit rules of one decode: its fork rules, EOS ids, per-branch cap and context."""

    def __init__(self, rules: ForkRules, eos_ids: set[int], max_pos: Optional[int], draft_k: int = 0):
        """``max_pos``: the model's context (None: unbounded); ``draft_k``: the draft length a
        new child starts with (the decoder's ``num_draft_tokens``; 0 without speculation)."""
        self.rules = rules
        self.apar = rules.apar
        self.eos_ids = eos_ids
        self.branch_cap = rules.branch_cap
        self.max_pos = max_pos
        self.draft_k = draft_k

    def commit(self, r: Request, b: Branch, new_tokens: list[int]) -> None:
        """Append tokens to ``b`` until one ends it (tokens after that are not the branch's).
        A ``[Fork]`` that spawns queues the child on ``r.queue``."""
        fork_id = self.apar.fork_id if self.apar is not None else None
        for tok in new_tokens:
            b.tokens.append(tok)
            b.sampled += 1
            is_fork = tok == fork_id
            if is_fork and self.rules.ends_at_cap(b):
                b.finish = "depth"
                b.cut = cut_to_last_line(b.tokens, self.apar.line_break_ids, start=1)
            elif is_fork and self.rules.repeats_title(b):
                b.finish = "repeat"
                start = open_segment_start(
                    b.tokens, self.apar.line_break_ids, self.apar.fork_id, 1 if b.is_child else 0, len(b.tokens) - 1
                )
                b.cut = b.tokens[start:]
                del b.tokens[start:]
            elif is_fork:
                self.spawn_child(r, b)
            b.finish = b.finish or self.end_reason(r, b, tok)
            if b.finish is not None:
                b.active = False
                break

    def end_reason(self, r: Request, b: Branch, tok: int) -> Optional[str]:
        """Why the branch ends at its newest token ``tok``, or None."""
        if tok in self.eos_ids:
            return "eos"
        if b.generated >= self.branch_cap:
            return "length"
        if self.max_pos is not None and len(r.prompt) + depth(r, b, len(b.tokens)) >= self.max_pos:
            return "context"
        return None

    def spawn_child(self, r: Request, parent: Branch) -> None:
        parent.forks += 1
        base, order = clock.child_clock(parent, len(parent.tokens) - 1)
        child = Branch(
            base=base,
            order=order,
            id=len(r.branches),
            parent=parent.id,
            fork_index=len(parent.tokens) - 1,
            level=parent.level + 1,
            tokens=[self.apar.child_id],
            k=self.draft_k,
            is_child=True,
        )
        r.branches.append(child)
        r.queue.append(child.id)


def depth(r: Request, b: Branch, upto: int) -> int:
    """Nodes between the prompt and ``b.tokens[upto - 1]`` (itself included): its position - prompt length + 1."""
    if b.parent is None:
        return upto
    return depth(r, r.branches[b.parent], b.fork_index + 1) + upto
