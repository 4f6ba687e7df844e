"""The APAR clock: the step at which *plain* APAR samples each token, and the token
budget cut by it, so that no output depends on scheduling.

Why. A request's ``max_new_tokens`` is counted over all of its branches. Counted
in real steps, it cuts a branching answer wherever the branches happen to be when
the budget runs out, and that depends on how many tokens each step accepted: a
speculator that races one branch ahead leaves the others shorter, so ``apar+spec``
would not equal ``apar``. Here every sampled token gets its *APAR time*, the step
at which plain APAR, with no cap on live branches, samples it:

- the root's token ``i`` has time ``i`` (token 0 is sampled by the prefill);
- a child forked by a ``[Fork]`` of time ``T`` samples its ``j``-th token (``j >= 1``;
  token 0 is the forced ``[Child]``) at time ``T + j``.

So a branch's token at index ``i`` has time ``base + i``, with ``base`` 0 for the root
and its ``[Fork]``'s time for a child. Within one step plain APAR commits branches in
creation order, which is ``order``: a child's key is ``(T, parent's key)`` - its
``[Fork]``'s own (time, branch) key - and the root's is ``(-1,)``. Every token's key
is ``(time, branch order)``, and the budget keeps exactly the ``B`` smallest keys
(``cutoff``): the tokens plain APAR keeps, whatever the schedule. Tokens a finish rule
cut later (a repeated title, a capped child's last line) still count, as in plain APAR
they were sampled before the cut.

The clock ignores ``max_live_branches`` on purpose: deferring a child is a memory
bound, and it must not change the answer either (DESIGN.md, 'Outputs must not depend
on scheduling').

A token is *final* (a stream may send it) once its time is below the *horizon*, the
earliest time any running branch can still sample: every token at an earlier time is
then known, so its rank under the budget is too.

Glossary: ``sampled`` counts a branch's sampled tokens, those a finish rule cut
included; ``first_time`` is the time of its first sampled token.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Optional, Protocol

ROOT_ORDER: tuple = (-1,)

Key = tuple  # (time, branch order): a token's place in plain APAR's commit order


class Clocked(Protocol):
    """What the clock reads of a branch (``state.Branch`` has these fields)."""

    base: int
    order: tuple
    sampled: int
    is_child: bool
    dropped: bool


def first_time(b: Clocked) -> int:
    """Time of the branch's first sampled token (a child's [Child] is forced, not sampled)."""
    return b.base + (1 if b.is_child else 0)


def next_time(b: Clocked) -> int:
    """Time of the branch's next sampled token."""
    return first_time(b) + b.sampled


def child_clock(parent: Clocked, fork_index: int) -> tuple[int, tuple]:
    """``(base, order)`` of a child forked at ``parent.tokens[fork_index]``."""
    t = parent.base + fork_index
    return t, (t, parent.order)


def cutoff(branches: Iterable[Clocked], budget: int) -> Optional[Key]:
    """The key of the ``budget``-th sampled token in APAR order, or None if fewer were sampled.

    Per branch the sampled tokens occupy the times ``[first, first + sampled)``, so the
    count per time is piecewise constant between those ends: one pass over the sorted
    ends finds the step, then the branches sampling at that step are ranked by order."""
    spans = [(first_time(b), first_time(b) + b.sampled, b) for b in branches if b.sampled and not b.dropped]
    if sum(e - s for s, e, _ in spans) < budget:
        return None
    edges: dict[int, int] = {}
    for s, e, _ in spans:
        edges[s] = edges.get(s, 0) + 1
        edges[e] = edges.get(e, 0) - 1
    times = sorted(edges)
    acc = width = 0
    for t0, t1 in zip(times, times[1:]):
        width += edges[t0]  # branches sampling at every time of [t0, t1)
        if width and acc + width * (t1 - t0) >= budget:
            t = t0 + (budget - acc - 1) // width
            nth = budget - acc - width * (t - t0)  # 1..width: the nth branch at time t in order
            at_t = sorted(b.order for s, e, b in spans if s <= t < e)
            return (t, at_t[nth - 1])
        acc += width * (t1 - t0)
    raise AssertionError("unreachable: the spans hold at least `budget` tokens")


def kept(b: Clocked, cut: Optional[Key]) -> int:
    """How many of the branch's sampled tokens have a key at or before ``cut``."""
    if cut is None:
        return b.sampled
    t, order = cut
    first = first_time(b)
    n = min(max(t - first, 0), b.sampled)  # times before t
    if first <= t < first + b.sampled and b.order <= order:
        n += 1
    return n


def past(b: Clocked, cut: Optional[Key]) -> bool:
    """Whether the branch's next sampled token would fall after ``cut`` (so it cannot sample)."""
    return cut is not None and (next_time(b), b.order) > cut


def horizon(running: Iterable[Clocked]) -> float:
    """The earliest time a running branch can still sample (inf when none runs): every
    token of an earlier time is known, and so is its fate under the budget."""
    return min((next_time(b) for b in running), default=math.inf)


def final_sampled(b: Clocked, h: float) -> int:
    """How many of the branch's sampled tokens have a time below the horizon ``h``."""
    return int(min(b.sampled, max(0, h - first_time(b))))
