"""A union of speculators: every part drafts, and one tree (a trie) holds all their drafts.

Why: different drafts are right at different places. Measured on ``smollm2-apar``'s own
greedy answers to 40 public prompts (6,618 positions, teacher-forced): the hydra heads'
4-node tree kept 0.67 drafts a step, prompt lookup (``ngram``, a chain of 6) 2.09,
because a small model's answers repeat the prompt, their own titles and whole
sentences, and their trie union 2.43. Where the text is new, the heads are the only
draft with a guess; where it repeats, the lookup's long chain wins. One verify pass
checks both, and a token both propose is one node.

The first part drafts what the decoder asks (its tree shape, or a chain of ``k``);
each later part drafts a chain of its own length (``NAME:K`` in a registry name,
``smollm2-hydra+ngram:8``), so a lookup can run deeper than the heads' tree. The
merged tree is in depth order (every node at depth ``d`` before any at ``d + 1``; the
first part's nodes first within a depth), so the decoder's depth pruning and its
per-step token budget cut a prefix and node indices stay valid for ``observe``.

Only deterministic drafts can be merged: a sampled draft's token comes with its own
distribution, and a tree of sampled drafts is not exactly verifiable (the decoder
takes sampled drafts as chains). Under sampling a part that returns draft
probabilities is refused with a one-line error; n-gram lookup and heads never do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Optional

from apar_spec.decoding.speculator import BranchView, Outcome, Proposal, Speculator

# The chain length a later part drafts when its name gives none (``ngram`` in ``smollm2-hydra+ngram``).
DEFAULT_CHAIN = 8


@dataclass
class _Node:
    depth: int  # 1 = under the pending token
    parent: int  # index in the merged list before sorting (-1 = the pending token)
    token: int
    sources: dict  # part index -> that part's draft index


def merge(proposals: Sequence[tuple[list[int], list[int]]]) -> tuple[list[int], list[int], list[dict]]:
    """Merge per-part (tokens, parents) trees into one trie in depth order.

    Returns (tokens, parents, sources): ``sources[i]`` maps a part index to the index of
    node ``i`` in that part's own proposal (a node several parts drafted has several)."""
    nodes: list[_Node] = []
    child_of: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for part, (tokens, parents) in enumerate(proposals):
        where: dict[int, int] = {-1: -1}  # this part's index -> merged node
        for j, (tok, p) in enumerate(zip(tokens, parents)):
            if p not in where:  # a part's malformed parent (later or missing): say which part sent it
                raise ValueError(f"draft {j} of union part {part} hangs under {p}, which comes later or does not exist")
            up = where[p]
            key = (up, int(tok))
            if key in child_of:
                node = child_of[key]
                nodes[node].sources.setdefault(part, j)
            else:
                node = len(nodes)
                nodes.append(_Node(1 if up < 0 else nodes[up].depth + 1, up, int(tok), {part: j}))
                child_of[key] = node
            where[j] = node
    order = sorted(range(len(nodes)), key=lambda i: nodes[i].depth)  # stable: parts' own order within a depth
    new = {-1: -1} | {old: i for i, old in enumerate(order)}
    return ([nodes[i].token for i in order], [new[nodes[i].parent] for i in order], [nodes[i].sources for i in order])


class UnionSpeculator:
    """Several speculators' drafts as one tree per branch (see the module docstring)."""

    def __init__(self, parts: Sequence[Speculator], chains: Sequence[Optional[int]]):
        """``chains[i]``: the chain length part ``i`` drafts; None = what the decoder asks (first part only)."""
        if len(parts) < 2:
            raise ValueError("a union of drafts needs at least two parts, e.g. 'smollm2-hydra+ngram'")
        if len(chains) != len(parts):
            raise ValueError(f"{len(parts)} union parts but {len(chains)} chain lengths")
        if any(c is None for c in chains[1:]) or any(c is not None and c < 1 for c in chains):
            raise ValueError("every union part after the first needs a chain length of at least 1")
        self.parts = list(parts)
        self.chains = list(chains)
        self.name = "+".join(getattr(p, "name", type(p).__name__) for p in parts)
        self.needs_hidden = any(getattr(p, "needs_hidden", False) for p in parts)
        # drafts may run deeper than the decoder's shape asks (Decoder.propose reads this)
        self.max_draft_depth = max((c for c in chains if c is not None), default=0)
        # the most nodes the later parts add to one branch's tree in a step (the serving engine reserves KV for them)
        self.extra_draft_nodes = sum(c for c in chains[1:] if c is not None)
        self._sources: list[list[dict]] = []

    @property
    def forwards(self) -> int:
        return sum(p.forwards for p in self.parts)

    def reset(self, num_requests: int, vocab_size: int, generator=None) -> None:
        for p in self.parts:
            p.reset(num_requests, vocab_size, generator)

    def admit(self, indices: list[int]) -> None:
        for p in self.parts:
            if hasattr(p, "admit"):
                p.admit(indices)

    def release(self, indices: list[int]) -> None:
        for p in self.parts:
            if hasattr(p, "release"):
                p.release(indices)

    def _views(self, part: int, views: list[BranchView]) -> list[BranchView]:
        k = self.chains[part]
        return views if k is None else [replace(v, k=k, shape=None) for v in views]

    def propose(self, views: list[BranchView], sampling=None) -> Proposal:
        per_part = []
        for i, part in enumerate(self.parts):
            prop = part.propose(self._views(i, views), sampling)
            for v, probs in enumerate(prop.probs or []):
                if probs is not None and prop.tokens[v]:
                    raise ValueError(
                        f"draft '{self.name}': part '{getattr(part, 'name', i)}' sampled its drafts; "
                        "a union merges deterministic drafts only (greedy, or n-gram/heads parts)"
                    )
            per_part.append(prop)
        out = Proposal([], [None] * len(views), [])
        self._sources = []
        for v in range(len(views)):
            tokens, parents, sources = merge([(p.tokens[v], p.parents_of(v)) for p in per_part])
            out.tokens.append(tokens)
            out.parents.append(parents)
            self._sources.append(sources)
        return out

    def catch_up(self, views: list[BranchView]) -> None:
        """A step without drafts (load-adaptive speculation): parts that mirror the tree catch up."""
        self._sources = []
        for i, part in enumerate(self.parts):
            catch_up = getattr(part, "catch_up", None)
            if catch_up is not None:
                catch_up(self._views(i, views))

    def observe(self, outcome: Outcome) -> None:
        """Each part sees the accepted path as far as it drafted it, in its own indices."""
        paths = outcome.paths or [list(range(a)) for a in outcome.accepted]
        for i, part in enumerate(self.parts):
            mine = []
            for v, path in enumerate(paths):
                own = []
                for node in path:
                    j = self._sources[v][node].get(i) if v < len(self._sources) else None
                    if j is None:
                        break
                    own.append(j)
                mine.append(own)
            part.observe(Outcome(outcome.views, [len(p) for p in mine], mine, outcome.hidden))


def parse_union(name: str) -> Optional[list[tuple[str, Optional[int]]]]:
    """``'a+b:8'`` -> [('a', None), ('b', 8)]; None when ``name`` is not a union.

    A later part without ``:K`` drafts :data:`DEFAULT_CHAIN` tokens; the first part takes
    the decoder's shape, so ``:K`` on it is refused."""
    if "+" not in name:
        return None
    out: list[tuple[str, Optional[int]]] = []
    for i, raw in enumerate(name.split("+")):
        part, _, k = raw.strip().partition(":")
        if not part:
            raise ValueError(f"draft '{name}': empty part in the union; write it as 'heads+ngram' or 'heads+ngram:8'")
        if i == 0 and k:
            raise ValueError(
                f"draft '{name}': the first part drafts the decoder's tree (--tree/--k); drop ':{k}' from '{raw}'"
            )
        if k:
            try:
                n = int(k)
            except ValueError:
                n = 0
            if n < 1:
                raise ValueError(
                    f"draft '{name}': ':{k}' in '{raw}' must be a chain length of at least 1, e.g. '{part}:8'"
                )
            out.append((part, n))
        else:
            out.append((part, None if i == 0 else DEFAULT_CHAIN))
    return out
