"""Draft-tree shapes: a declarative list of paths, and the ONE pure function that lays them out.

A speculator may propose a small *tree* of candidates under a branch's pending
token instead of a chain (DESIGN.md, "Trees inside branches"). A shape is written
as Medusa writes its "choices": a list of paths, each a tuple of candidate *ranks*
(0 = the speculator's best guess at that depth, 1 = its second best, ...)::

    [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]

means: two candidates for the first draft token; under the best one two
candidates for the second; under the second-best one its best follow-up; and a
third token under the best-best path. A chain of ``k`` drafts is
``[(0,), (0, 0), ..., (0,) * k]``.

``layout`` derives everything a decoder or a cost model needs from the paths, in
one place: node order (parents before children, by depth then path), each node's
parent (-1 = the pending token), depth (1 = the first draft) and rank. Nothing
here touches tensors or models, so it is tested alone.

Text forms accepted by :func:`parse_tree` (CLI ``--tree``):

- ``"4"`` or ``"chain:4"``: a chain of 4 drafts;
- ``"topk:2x3"``: a full tree, 2 candidates per node, 3 deep (2 + 4 + 8 nodes);
- a JSON list of paths, ``"[[0],[1],[0,0]]"``;
- ``"auto"`` is *not* a shape: callers resolve it with the cost model first.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

MAX_TREE_NODES = 256  # a verify pass with more drafted nodes per branch is never worth it on any device we know
MAX_TREE_DEPTH = 16

Path_ = tuple[int, ...]


@dataclass(frozen=True)
class TreeShape:
    """A laid-out draft tree. Node ``i`` is ``paths[i]``; lists are aligned by node index."""

    paths: tuple[Path_, ...]  # parents before children: sorted by (depth, path)
    parents: tuple[int, ...]  # node -> parent node, -1 = hangs under the branch's pending token
    depths: tuple[int, ...]  # node -> depth below the pending token (first draft = 1)
    ranks: tuple[int, ...]  # node -> candidate rank among its siblings (0 = best guess)

    @property
    def size(self) -> int:
        """Drafted nodes per branch (the pending token not counted)."""
        return len(self.paths)

    @property
    def depth(self) -> int:
        return max(self.depths, default=0)

    @property
    def is_chain(self) -> bool:
        return all(r == 0 for r in self.ranks)

    def children(self, node: int) -> list[int]:
        """Children of ``node`` (-1 = of the pending token), best rank first."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def width(self, depth: int) -> int:
        """Largest rank + 1 used at ``depth``: how many candidates the speculator must rank there."""
        return max((r + 1 for r, d in zip(self.ranks, self.depths) if d == depth), default=0)

    def prefix(self, n: int) -> TreeShape | None:
        """The first ``n`` nodes in layout order (still a tree: parents come first; the
        shallowest, likeliest nodes); None for ``n <= 0``."""
        if n <= 0:
            return None
        if n >= self.size:
            return self
        return layout([list(p) for p in self.paths[:n]])

    def describe(self) -> str:
        """Short text form: ``chain:K`` for chains, else ``tree:N nodes/D deep``."""
        if self.is_chain:
            return f"chain:{self.size}"
        return f"tree:{self.size}n/{self.depth}d"

    def to_json(self) -> str:
        return json.dumps([list(p) for p in self.paths], separators=(",", ":"))


def layout(paths: Sequence[Sequence[int]]) -> TreeShape:
    """Validate ``paths`` and lay the tree out. Every error is a one-line ``ValueError``."""
    if isinstance(paths, (str, bytes)):
        raise ValueError("a tree shape is a list of paths such as [[0], [1], [0, 0]]; use parse_tree for text")
    clean: set[Path_] = set()
    for p in paths:
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) == 0:
            raise ValueError(f"tree path {p!r} must be a non-empty list of candidate ranks, e.g. [0, 1]")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in p):
            raise ValueError(f"tree path {list(p)} holds something other than ranks >= 0")
        t = tuple(int(r) for r in p)
        if t in clean:
            raise ValueError(f"tree path {list(t)} appears twice")
        clean.add(t)
    if not clean:
        raise ValueError("a tree shape needs at least one path, e.g. [[0]]")
    for t in clean:
        if len(t) > 1 and t[:-1] not in clean:
            raise ValueError(f"tree path {list(t)} has no parent path {list(t[:-1])}; every prefix must be listed")
        if t[-1] > 0 and t[:-1] + (t[-1] - 1,) not in clean:
            raise ValueError(
                f"tree path {list(t)} skips rank {t[-1] - 1}; ranks at a node must be 0, 1, 2, ... without gaps"
            )
    if len(clean) > MAX_TREE_NODES:
        raise ValueError(f"tree has {len(clean)} nodes; at most {MAX_TREE_NODES} per branch are allowed")
    if max(len(t) for t in clean) > MAX_TREE_DEPTH:
        raise ValueError(f"tree is deeper than {MAX_TREE_DEPTH}")
    ordered = sorted(clean, key=lambda t: (len(t), t))
    index = {t: i for i, t in enumerate(ordered)}
    return TreeShape(
        paths=tuple(ordered),
        parents=tuple(index[t[:-1]] if len(t) > 1 else -1 for t in ordered),
        depths=tuple(len(t) for t in ordered),
        ranks=tuple(t[-1] for t in ordered),
    )


def chain(k: int) -> TreeShape:
    """A chain of ``k`` drafts (what the decoder always did)."""
    if k < 1:
        raise ValueError(f"a chain needs k >= 1 (got {k})")
    return layout([(0,) * d for d in range(1, k + 1)])


def full_tree(width: int, depth: int) -> TreeShape:
    """``width`` candidates under every node, ``depth`` levels deep."""
    if width < 1 or depth < 1:
        raise ValueError(f"a full tree needs width >= 1 and depth >= 1 (got {width}x{depth})")
    paths = [p for d in range(1, depth + 1) for p in itertools.product(range(width), repeat=d)]
    return layout(paths)


def parse_tree(spec: Union[str, Sequence[Sequence[int]], TreeShape]) -> TreeShape:
    """A shape from its text form (see the module docstring), a list of paths, or a shape."""
    if isinstance(spec, TreeShape):
        return spec
    if not isinstance(spec, str):
        return layout(spec)
    text = spec.strip()
    if text == "auto":
        raise ValueError("tree 'auto' must be resolved by the cost model before it is laid out")
    if text.isdigit():
        return chain(int(text))
    if text.startswith("chain:") and text[6:].isdigit():
        return chain(int(text[6:]))
    if text.startswith("topk:"):
        w, sep, d = text[5:].partition("x")
        if sep and w.isdigit() and d.isdigit():
            return full_tree(int(w), int(d))
    if text.startswith("["):
        try:
            paths = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"tree spec is not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(paths, list):
            raise ValueError("a JSON tree spec must be a list of paths, e.g. [[0],[1],[0,0]]")
        return layout(paths)
    raise ValueError(f"unknown tree spec '{spec}': use K, chain:K, topk:WxD, a JSON list of paths, or auto")


def expected_accepted(shape: TreeShape, p: Callable[[int, int], float]) -> float:
    """Expected accepted drafts per step (bonus excluded) when the target's token at depth
    ``d`` equals the rank-``r`` candidate with probability ``p(d, r)``, independently per depth.

    A node is kept iff every node on its path is kept, so the expectation is the sum
    over nodes of the product of ``p`` along the path (Medusa's and Sequoia's estimate).
    Ranks at one node are disjoint events, so the sum over siblings may not exceed 1.
    """
    reach = [0.0] * shape.size
    for i, (parent, d, r) in enumerate(zip(shape.parents, shape.depths, shape.ranks)):
        reach[i] = (1.0 if parent < 0 else reach[parent]) * p(d, r)
    return sum(reach)


def tree_depths_ranks(parents: list[int]) -> tuple[list[int], list[int]]:
    """Per draft node: depth below the pending token (1 = first draft) and rank among its siblings."""
    depth: list[int] = []
    rank: list[int] = []
    seen: dict[int, int] = {}
    for p in parents:
        depth.append(1 if p < 0 else depth[p] + 1)
        rank.append(seen.get(p, 0))
        seen[p] = rank[-1] + 1
    return depth, rank


def prune_tree(tokens: list[int], parents: list[int], max_depth: int, who: str) -> tuple[list[int], list[int]]:
    """Keep the drafts no deeper than ``max_depth``, drop a sibling repeating an earlier
    sibling's token (with its subtree), and renumber parents. Bad layouts are refused."""
    if len(parents) != len(tokens):
        raise ValueError(f"speculator '{who}' sent {len(tokens)} draft tokens but {len(parents)} parents")
    new_index: dict[int, int] = {-1: -1}
    depth: dict[int, int] = {-1: 0}
    sibling_tokens: dict[int, set[int]] = {}
    out_tokens: list[int] = []
    out_parents: list[int] = []
    for i, (tok, p) in enumerate(zip(tokens, parents)):
        if not -1 <= p < i:
            raise ValueError(
                f"speculator '{who}' sent draft {i} with parent {p}; parents must come first (-1 = pending)"
            )
        if p not in new_index or depth[p] + 1 > max_depth:
            continue
        seen = sibling_tokens.setdefault(p, set())
        if tok in seen:
            continue
        seen.add(tok)
        depth[i] = depth[p] + 1
        new_index[i] = len(out_tokens)
        out_tokens.append(int(tok))
        out_parents.append(new_index[p])
    return out_tokens, out_parents
