"""The speculator contract: propose drafts for every active branch, observe what was kept.

A speculator sees each active branch as a ``BranchView`` and returns, per view,
a chain of draft tokens (and, when sampling, the distribution each was drawn
from). After verification the decoder calls ``observe`` with how many drafts of
each branch were accepted, so a stateful speculator (a draft LM with its own
cache) can roll back. Stateless ones (n-gram) ignore it.

Serving (continuous batching) adds two hooks, in ``ServingSpeculator``: requests
join (``admit``) and leave (``release``) a running batch, so state keyed by request
index (a draft LM's cache rows) must grow and shrink. They are a separate protocol
so that a speculator written for ``generate`` alone stays a valid ``Speculator``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, runtime_checkable

import torch


@dataclass
class BranchView:
    """What a speculator may know about one active branch."""

    request: int  # index of the request in the decoder's batch (stable while the batch runs)
    branch: int  # branch id within the request
    parent: Optional[int]  # parent branch id (None for the root)
    fork_index: Optional[int]  # index in the parent's tokens of the [Fork] this branch hangs under
    tokens: list[int]  # the branch's committed tokens; the last one is pending (not yet verified)
    context: list[int]  # prompt + ancestors' tokens up to the fork + ``tokens``
    k: int  # how many drafts the decoder asks for


@dataclass
class Proposal:
    """Drafts for each view, in the same order."""

    tokens: list[list[int]]
    # Per view, the draft distribution each token was sampled from, [len, vocab];
    # None = deterministic proposals (greedy drafting, n-gram): q is one-hot.
    probs: list[Optional[torch.Tensor]] = field(default_factory=list)


@dataclass
class Outcome:
    """What verification kept, per view of the last proposal."""

    views: list[BranchView]
    accepted: list[int]  # drafts accepted per view (the bonus is not a draft)


@runtime_checkable
class Speculator(Protocol):
    name: str

    def reset(self, num_requests: int, vocab_size: int, generator: Optional[torch.Generator] = None) -> None:
        """A new batch starts: forget all state. ``vocab_size`` is the target's logits width;
        ``generator`` is the decoder's seeded RNG (for sampled drafts)."""
        ...

    def propose(self, views: list[BranchView], sampling) -> Proposal: ...

    def observe(self, outcome: Outcome) -> None: ...

    @property
    def forwards(self) -> int:
        """Draft-model forward passes so far (0 for model-free speculators)."""
        ...


@runtime_checkable
class ServingSpeculator(Speculator, Protocol):
    """A speculator the serving engine can use: requests join and leave between steps.

    The engine calls ``reset(0, ...)`` once, then ``admit(indices)`` after the
    requests' prefill (before their first ``propose``) and ``release(indices)`` when
    they finish or are cancelled (no view of them follows). Indices are unique for
    the engine's lifetime."""

    def admit(self, indices: list[int]) -> None: ...

    def release(self, indices: list[int]) -> None: ...
