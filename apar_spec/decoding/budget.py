"""The request's token budget on the APAR clock (``clock``): which tokens it keeps, and
which tokens a stream may send before the budget's cut is known."""

from __future__ import annotations

from typing import Optional

from apar_spec.decoding import clock
from apar_spec.decoding.fork_rules import ForkRules
from apar_spec.decoding.state import Branch, Request


def apply_budget(r: Request) -> None:
    """Keep exactly the tokens plain APAR keeps under the request's budget (``clock``).

    Once ``limit`` tokens were sampled, the cut is the ``limit``-th key in APAR order.
    It can only move earlier as lagging branches sample more, so what lies after it
    goes now: a branch is cut back to its tokens before it (restoring what a finish
    rule cut after that point, since plain APAR never sampled the token that
    triggered the rule), a running branch whose next token falls after it ends with
    "budget", and a child whose [Fork] was cut is dropped from the answer. Branches
    that sample before the cut go on, so plain APAR's tokens are all sampled."""
    live = [b for b in r.branches if not b.dropped]
    sampled = sum(b.sampled for b in live)
    r.budget = max(0, r.limit - sampled)
    if sampled < r.limit:  # the common case, every step until the budget binds: nothing to cut
        r.cutoff = None
        return
    r.cutoff = clock.cutoff(live, r.limit)
    for b in live:  # parents come before children
        if b.parent is not None:
            parent = r.branches[b.parent]
            if parent.dropped or b.fork_index >= len(parent.tokens):
                b.dropped = True
                stop_branch(r, b, b.finish)
                continue
        keep = clock.kept(b, r.cutoff)
        if keep < b.sampled:
            full = b.tokens + b.cut
            del full[len(full) - (b.sampled - keep) :]
            b.tokens[:] = full
            b.cut, b.sampled = [], keep
            del b.nodes[len(b.tokens) :]
            del b.logits[b.generated :]
            stop_branch(r, b, "budget")
        elif b.finish is None and clock.past(b, r.cutoff):
            stop_branch(r, b, "budget")


def stop_branch(r: Request, b: Branch, finish: Optional[str]) -> None:
    b.finish = finish
    b.active = False
    if b.id in r.queue:
        r.queue.remove(b.id)


def running(r: Request) -> list[Branch]:
    return [b for b in r.branches if (b.active or b.id in r.queue) and not b.dropped]


def settled(r: Request, rules: ForkRules) -> dict[int, tuple[int, bool]]:
    """Per branch id (dropped ones left out): how many of its tokens no later step can
    take back, and whether its finish is final - what a stream may send.

    A token is final once its APAR time is below the horizon (``clock``) and no rule
    of ``settled_length`` holds it back; a child shows only once its parent's [Fork]
    is final. Plain APAR runs every branch on the clock, so only speculation (a branch
    ahead of others) or a deferred child holds tokens back."""
    h = clock.horizon(running(r))
    out: dict[int, tuple[int, bool]] = {}
    for b in r.branches:
        if b.dropped:
            continue
        if b.parent is not None and out.get(b.parent, (0, False))[0] <= b.fork_index:
            out[b.id] = (0, False)
            continue
        n = clock.final_sampled(b, h)
        offset = 1 if b.is_child else 0
        out[b.id] = (min(rules.settled_length(b), offset + n, len(b.tokens)), b.finish is not None and n == b.sampled)
    return out
