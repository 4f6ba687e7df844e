"""The decoder's state: a request's branches (each a path in the token tree), its
counters, and what a finished request returns.

Branch ids are creation order while a request runs; a result numbers them in plain
APAR's order (``output_branches``), so it does not depend on the schedule."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from apar_spec.decoding import clock
from apar_spec.decoding.draft_tree import tree_depths_ranks
from apar_spec.decoding.fork_rules import Fence


@dataclass
class Branch:
    id: int
    parent: Optional[int]
    fork_index: Optional[int]  # index in the parent's tokens of its [Fork]
    level: int  # fork nesting level (root 0)
    tokens: list[int] = field(default_factory=list)  # committed; children start with the forced [Child]
    nodes: list[int] = field(default_factory=list)  # target-cache nodes of tokens[:len(nodes)]
    forks: int = 0
    # "eos" | "length" (per-branch cap) | "budget" (request cap) | "context" | "depth" (asked to fork at the cap)
    # | "repeat" (asked to fork after a title it had forked after: DecodeOptions.repeated_title)
    finish: Optional[str] = None
    active: bool = False  # False while queued or finished
    k: int = 0  # draft length asked for next step
    is_child: bool = False
    logits: list = field(default_factory=list)  # raw logits per sampled token (only with record_logits)
    hidden: Optional[torch.Tensor] = None  # [hidden] target state at the node that chose the pending token (heads)
    # code-fence state after the branch's first fence_at tokens (Decoder.fence_of)
    fence: Fence = field(default_factory=Fence)
    fence_at: int = 0
    # The APAR clock (apar_spec.decoding.clock): token i has time base + i; order is plain APAR's
    # commit order; sampled counts sampled tokens, those a finish rule cut included.
    base: int = 0
    order: tuple = clock.ROOT_ORDER
    sampled: int = 0
    cut: list[int] = field(default_factory=list)  # what a finish rule cut (restored if the budget ends earlier)
    dropped: bool = False  # its [Fork] fell after the budget's cut: not part of the answer

    @property
    def generated(self) -> int:
        """Sampled tokens (the forced [Child] is not one)."""
        return len(self.tokens) - (1 if self.is_child else 0)


@dataclass
class StepCounters:
    """Per-request measurements (DESIGN.md, 'Metrics every run reports')."""

    target_steps: int = 0
    live_kv: list[int] = field(default_factory=list)  # after each step
    attended_keys: int = 0
    branch_steps: int = 0  # branch-steps that were verified (for acceptance length)
    accepted: int = 0  # accepted draft tokens
    drafted: int = 0
    accept_plus_bonus: int = 0
    drafted_at: list[int] = field(default_factory=list)  # per draft position: how many were drafted
    accepted_at: list[int] = field(default_factory=list)  # per draft position: how many were accepted
    # Per (depth - 1, rank) of draft-tree nodes: verified = the node's parent path was accepted
    # (so the node had its chance); accepted = the target's token there was the node's token.
    # accepted / verified is the conditional acceptance p(d, r) the cost model uses.
    depth_rank_verified: list[list[int]] = field(default_factory=list)
    depth_rank_accepted: list[list[int]] = field(default_factory=list)

    def count_acceptance(self, drafts: list[int], parents: list[int], path: list[int]) -> None:
        """Per branch-step: acceptance length, per-depth rates (a depth counts as drafted
        once per branch-step), and per-(depth, rank) verified/accepted node counts."""
        depth, rank = tree_depths_ranks(parents)
        n_depth = max(depth, default=0)
        accepted = len(path)
        self.branch_steps += 1
        self.drafted += len(drafts)
        self.accepted += accepted
        self.accept_plus_bonus += accepted + 1
        while len(self.drafted_at) < n_depth:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        for j in range(n_depth):
            self.drafted_at[j] += 1
            self.accepted_at[j] += j < accepted
        on_path = {-1, *path}
        for i, p in enumerate(parents):
            if p not in on_path:
                continue
            d, r = depth[i] - 1, rank[i]
            while len(self.depth_rank_verified) <= d:
                self.depth_rank_verified.append([])
                self.depth_rank_accepted.append([])
            for table in (self.depth_rank_verified[d], self.depth_rank_accepted[d]):
                table.extend([0] * (r + 1 - len(table)))
            self.depth_rank_verified[d][r] += 1
            self.depth_rank_accepted[d][r] += i in path


@dataclass
class Request:
    index: int  # position in the batch, stable (speculators key their state on it)
    row: int  # current cache row (changes when finished requests leave the batch)
    prompt: list[int]
    prompt_nodes: list[int]
    branches: list[Branch]
    limit: int  # the request's token budget over all branches (max_new_tokens)
    budget: int = 0  # tokens left under it (a bound for KV projections: limit - sampled, >= 0)
    cutoff: Optional[tuple] = None  # key of the limit-th token in APAR order, once that many were sampled
    # the fork router's p(list) for this prompt (None: no router in use) and whether it
    # gated the request: no [Fork] anywhere in it (DecodeOptions.fork_gate)
    p_list: Optional[float] = None
    forks_gated: bool = False
    queue: deque = field(default_factory=deque)  # branch ids waiting for a live slot
    counters: StepCounters = field(default_factory=StepCounters)

    @property
    def done(self) -> bool:
        return not self.queue and not any(b.active for b in self.branches)

    def context(self, b: Branch, upto: Optional[int] = None) -> list[int]:
        """prompt + ancestors' tokens up to the fork + b.tokens[:upto]."""
        own = b.tokens if upto is None else b.tokens[:upto]
        if b.parent is None:
            return self.prompt + own
        return self.context(self.branches[b.parent], b.fork_index + 1) + own


@dataclass
class DecodeResult:
    """Raw outcome of one request: its branches and counters (the API turns it into a Generation)."""

    prompt: list[int]
    branches: list[Branch]
    counters: StepCounters
    wall_time_s: float
    draft_forwards: int
    p_list: Optional[float] = None  # the fork router's score (None: no router in use)
    forks_gated: bool = False


def canonical_ids(branches: list[Branch]) -> dict[int, int]:
    """Branch id -> its number in plain APAR's order (``clock``), dropped branches left out.
    A branch's number is final once its [Fork] is (nothing can be created before it)."""
    kept = sorted((b for b in branches if not b.dropped), key=lambda b: b.order)
    return {b.id: i for i, b in enumerate(kept)}


def output_branches(branches: list[Branch]) -> list[Branch]:
    """A finished request's branches as plain APAR numbers them: dropped ones left out,
    ids and parents renumbered in APAR order, so results do not depend on the schedule."""
    ids = canonical_ids(branches)
    out = [
        replace(b, id=ids[b.id], parent=None if b.parent is None else ids[b.parent]) for b in branches if b.id in ids
    ]
    return sorted(out, key=lambda b: b.id)
