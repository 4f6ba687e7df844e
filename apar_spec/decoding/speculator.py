"""The speculator contract (defined by the core, implemented in ``drafts/``).

A speculator sees each active branch as a ``BranchView`` and returns, per view,
draft tokens laid out as a small *tree* under the branch's pending token (a
chain is the tree whose parents are ``[-1, 0, 1, ...]``) and, when it sampled
them, the distribution each was drawn from. After verification the decoder
calls ``observe`` with the path of drafts the target kept, so a stateful
speculator (a draft LM with its own cache) can roll back. Stateless ones
(n-gram, heads) ignore it.

Tree layout of one view's proposal: draft ``i`` hangs under draft
``parents[i]`` (-1 = under the pending token); parents come before their
children (``parents[i] < i``); siblings are listed best guess first, so a
node's *rank* is its position among its siblings (the cost model's per-(depth,
rank) acceptance uses it). Sibling tokens must differ (equal siblings waste a
node; the decoder keeps the first).

Sampling: drafts given with ``probs`` (sampled drafts) must be chains, verified
with the Leviathan/Chen rejection rule. Deterministic drafts (``probs`` None:
greedy top-k, n-gram, heads) may form any tree: the target samples its own
token at every node and the walk follows the child holding that token, which is
exactly sampling from the target (DESIGN.md, "Trees inside branches").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

import torch

from apar_spec.decoding.draft_tree import TreeShape


@dataclass
class BranchView:
    """What a speculator may know about one active branch."""

    request: int  # index of the request in the decoder's batch (stable while the batch runs)
    branch: int  # branch id within the request
    parent: Optional[int]  # parent branch id (None for the root)
    fork_index: Optional[int]  # index in the parent's tokens of the [Fork] this branch hangs under
    tokens: list[int]  # the branch's committed tokens; the last one is pending (not yet verified)
    context: list[int]  # prompt + ancestors' tokens up to the fork + ``tokens``
    k: int  # how many drafts deep the decoder asks for (the shape's depth for trees)
    shape: Optional[TreeShape] = None  # the tree asked for (None = a chain of ``k``); a speculator may propose less
    # Target's final hidden state [hidden] at the node whose logits chose the pending
    # token (only for speculators with ``needs_hidden``; None for a child's first step).
    hidden: Optional[torch.Tensor] = None


@dataclass
class Proposal:
    """Drafts for each view, in the same order."""

    tokens: list[list[int]]
    # Per view, the draft distribution each token was sampled from, [len, vocab];
    # None = deterministic proposals (greedy drafting, n-gram, heads): q is one-hot.
    probs: list[Optional[torch.Tensor]] = field(default_factory=list)
    # Per view, each draft's parent draft (-1 = under the pending token); None or an
    # empty list = a chain.
    parents: list[Optional[list[int]]] = field(default_factory=list)

    def parents_of(self, i: int) -> list[int]:
        """View ``i``'s parent list (a chain when none was given)."""
        p = self.parents[i] if i < len(self.parents) else None
        return list(p) if p else list(range(-1, len(self.tokens[i]) - 1))


@dataclass
class Outcome:
    """What verification kept, per view of the last proposal."""

    views: list[BranchView]
    accepted: list[int]  # drafts accepted per view (the bonus is not a draft)
    # Per view, the indices (into that view's proposal) of the accepted drafts, root first.
    paths: list[list[int]] = field(default_factory=list)
    # Per view, the target's final hidden state [hidden] at the last kept node (the one whose
    # logits chose the bonus); only filled for speculators with ``needs_hidden``.
    hidden: list[Optional[torch.Tensor]] = field(default_factory=list)


@runtime_checkable
class Speculator(Protocol):
    """``needs_hidden`` (optional attribute, default False): ask the decoder for the
    target's final hidden states (``BranchView.hidden``, ``Outcome.hidden``)."""

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


class StepPlanner(Protocol):
    """Load-adaptive speculation (the cost model's ``costs.planning.StepPlanner``): before each
    step, how many draft nodes per branch to verify at the current batch; 0 = a plain step.

    On a step without drafts the decoder calls the speculator's optional ``catch_up(views)``
    instead of ``propose``: a speculator that mirrors the token tree (a draft LM) feeds the
    committed tokens there, so it can resume whenever drafting pays again."""

    def allowance(self, rows: int, branches: int) -> int: ...

    def observe(self, parents: list[list[int]], paths: list[list[int]]) -> None: ...


@runtime_checkable
class ServingSpeculator(Speculator, Protocol):
    """A speculator the serving engine can use: requests join and leave between steps.

    The engine calls ``reset(0, ...)`` once, then ``admit(indices)`` after the
    requests' prefill (before their first ``propose``) and ``release(indices)`` when
    they finish or are cancelled (no view of them follows). Indices are unique for
    the engine's lifetime. A separate protocol, so that a speculator written for
    ``generate`` alone stays a valid ``Speculator``."""

    def admit(self, indices: list[int]) -> None: ...

    def release(self, indices: list[int]) -> None: ...


# ------------------------------------------------------------------- the draft catalog
@dataclass(frozen=True)
class DraftInfo:
    """What the core may know of a named draft without importing ``drafts/``: its kind
    ("model", "ngram", "heads", "union"), its weights (a draft LM's), and its measured
    acceptance length at chain length ``acceptance_k`` (the cost model's prior)."""

    name: str
    kind: str
    weights: Optional[str] = None
    acceptance_length: Optional[float] = None
    acceptance_k: Optional[int] = None


@dataclass
class DraftCatalog:
    """Turns what a user passes as ``draft=`` into a speculator, and describes named drafts.

    The core defines this hook and never imports its plugins (DESIGN.md, 'Layout'):
    ``drafts/`` registers its registry here when it is imported, which the package
    facade (``apar_spec/__init__.py``) does. ``resolve(draft, target, tokenizer)`` takes a
    speculator object, a loaded model, a registry name or a path; ``describe(name)``
    returns a ``DraftInfo`` or raises ``ValueError`` for an unknown name."""

    resolve: Callable[[Any, Any, Any], Speculator]
    describe: Callable[[str], DraftInfo]


_CATALOG: list[DraftCatalog] = []


def register_catalog(catalog: DraftCatalog) -> None:
    """Install the draft catalog (the last registered wins; ``drafts/`` registers one)."""
    _CATALOG.append(catalog)


def catalog() -> DraftCatalog:
    if not _CATALOG:
        raise ValueError(
            "no draft catalog is registered: `import apar_spec` (it loads apar_spec.drafts), "
            "or pass a speculator object as draft"
        )
    return _CATALOG[-1]


def resolve_draft(draft: Any, target, tokenizer) -> Speculator:
    """A speculator for ``generate(draft=...)``: an object that already is one is used as it is."""
    if hasattr(draft, "propose") and hasattr(draft, "observe"):
        return draft
    return catalog().resolve(draft, target, tokenizer)


def describe_draft(name: str) -> DraftInfo:
    return catalog().describe(name)
