"""Predicting a configuration's speed from measured costs and an acceptance profile,
and choosing the draft tree (or k) worth using."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from apar_spec.costs.cache import APAR_BRANCHES_GUESS, DEFAULT_ALPHA, DEFAULT_HEADS, KINDS, ModelCosts, Say
from apar_spec.costs.measuring import ensure_switch, get_costs
from apar_spec.decoding.draft_tree import MAX_TREE_NODES, TreeShape, chain, expected_accepted, full_tree, layout
from apar_spec.decoding.speculator import describe_draft

# ===================================================================== acceptance profiles


@dataclass
class Profile:
    """p(d, r): probability that the target's token at depth ``d`` equals the rank-``r``
    candidate, given the path above was accepted. ``table[d-1][r]``; depths past the
    table reuse its last depth (acceptance flattens with depth), missing ranks are 0."""

    table: list[list[float]]
    source: str = ""

    def __call__(self, d: int, r: int) -> float:
        if not self.table:
            return 0.0
        row = self.table[min(d, len(self.table)) - 1]
        return row[r] if r < len(row) else 0.0

    @classmethod
    def geometric(cls, alpha: float, depth: int = 16, width: int = 4, source: str = "") -> Profile:
        """Top guess right with probability ``alpha`` at every depth; rank r gets
        ``alpha * (1 - alpha) ** r`` (a guess ranked lower is right less often; ranks sum to < 1)."""
        alpha = min(max(alpha, 0.0), 0.999)
        row = [alpha * (1 - alpha) ** r for r in range(width)]
        return cls([list(row) for _ in range(depth)], source or f"geometric alpha={alpha:.2f}")

    @classmethod
    def from_acceptance_length(cls, length: float, k: int, source: str = "") -> Profile:
        """The geometric profile whose chain of ``k`` drafts has mean acceptance length ``length`` (bonus included)."""
        target = min(max(length - 1.0, 0.0), k - 1e-6)
        lo, hi = 0.0, 0.999
        for _ in range(60):  # sum_{j=1..k} alpha^j is increasing in alpha
            mid = (lo + hi) / 2
            if sum(mid**j for j in range(1, k + 1)) < target:
                lo = mid
            else:
                hi = mid
        return cls.geometric((lo + hi) / 2, source=source or f"fitted to acceptance length {length:.2f} at k={k}")

    @classmethod
    def from_rows(cls, rows: Sequence[dict]) -> Optional[Profile]:
        """The profile measured by benchmark rows: ``depth_rank_verified/accepted`` when the rows
        carry them (conditional by construction), else the chain's per-position acceptance rates
        (unconditional: p(j) = rate[j] / rate[j-1]). None when the rows drafted nothing."""
        ver: list[list[float]] = []
        acc: list[list[float]] = []
        for r in rows:
            v, a = r.get("depth_rank_verified"), r.get("depth_rank_accepted")
            if not v or not a:
                continue
            for d, (vd, ad) in enumerate(zip(v, a)):
                while len(ver) <= d:
                    ver.append([])
                    acc.append([])
                for i, (x, y) in enumerate(zip(vd, ad)):
                    while len(ver[d]) <= i:
                        ver[d].append(0.0)
                        acc[d].append(0.0)
                    ver[d][i] += x
                    acc[d][i] += y
        if ver:
            table = [[(y / x if x else 0.0) for x, y in zip(vd, ad)] for vd, ad in zip(ver, acc)]
            while table and not any(ver[len(table) - 1]):
                table.pop()
            return cls(table, "measured per depth and rank") if table else None
        drafted: Optional[list[float]] = None
        accepted: Optional[list[float]] = None
        for r in rows:  # pool positions over rows, weighting each row by its branch-steps
            rates = r.get("acceptance_rate_per_position") or []
            if not rates:
                continue
            length = r.get("mean_acceptance_length") or 1.0
            weight = (r.get("tokens") or r.get("tokens_generated") or 1) / max(length, 1e-9)
            drafted = drafted or []
            accepted = accepted or []
            for j, rate in enumerate(rates):
                while len(drafted) <= j:
                    drafted.append(0.0)
                    accepted.append(0.0)
                drafted[j] += weight
                accepted[j] += weight * rate
        if not drafted:
            return None
        uncond = [a / d for a, d in zip(accepted, drafted)]
        table, prev = [], 1.0
        for u in uncond:
            table.append([min(1.0, u / prev) if prev > 0 else 0.0])
            prev = u
        return cls(table, "measured per position (chain)")


def default_profile(kind: str, draft_name: Optional[str] = None) -> Profile:
    """The registry's measured acceptance length for ``draft_name`` (fitted geometric), else a
    conservative per-kind default."""
    if draft_name:
        try:
            entry = describe_draft(draft_name)
            if entry.acceptance_length:
                k = entry.acceptance_k or 4
                return Profile.from_acceptance_length(
                    entry.acceptance_length,
                    k,
                    f"registry: {draft_name} acceptance length {entry.acceptance_length:.2f}",
                )
        except ValueError:
            pass
    alpha = DEFAULT_ALPHA.get(kind, 0.5)
    return Profile.geometric(alpha, source=f"default for kind '{kind}' (alpha={alpha})")


# ===================================================================== prediction


@dataclass
class Prediction:
    tokens_per_step: float
    cost_per_step: float  # seconds
    base_cost_per_step: float  # seconds of the same mode's plain step (base_branches tokens)
    base_tokens_per_step: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.cost_per_step

    @property
    def speedup(self) -> float:
        """vs the same mode without speculation."""
        return self.tokens_per_s / (self.base_tokens_per_step / self.base_cost_per_step)


def draft_cost(
    kind: str,
    shape: Optional[TreeShape],
    branches: float,
    target: ModelCosts,
    draft: Optional[ModelCosts],
    p_all: float = 0.0,
    context: Optional[float] = None,
) -> float:
    """Seconds of drafting per step for ``branches`` live branches.

    ``model``: one draft forward per tree depth for all branches; the first feeds each
    branch's newly committed tokens (the bonus, plus the last draft when the whole path was
    accepted, probability ``p_all``), the others the nodes of the previous depth that have
    children; plus the measured cost of switching models twice per step (``ModelCosts.switch``).
    ``heads``: K blocks + LM head on one hidden state per branch. ``ngram``: free
    (its Python work is in the decoder's per-branch overhead)."""
    if shape is None or kind == "ngram":
        return 0.0
    if kind == "heads":
        return target.heads_cost(branches)
    if kind != "model":
        raise ValueError(f"unknown speculator kind '{kind}' (choose from {', '.join(KINDS)})")
    if draft is None:
        raise ValueError("a draft-LM prediction needs the draft model's costs")
    sw = target.switch.get(draft.key.fingerprint, {})
    # the verify pass after the draft ran, and the draft's first pass after the target ran
    # the speculator's Python (logits -> candidates) runs per branch at every depth
    total = sw.get("target", 0.0) + sw.get("draft", 0.0) + sw.get("per_pass", 0.0) * shape.depth * branches
    total += draft.forward_cost(branches * (1.0 + p_all), context)
    for d in range(2, shape.depth + 1):
        parents = {shape.parents[i] for i, dep in enumerate(shape.depths) if dep == d}
        total += draft.forward_cost(branches * len(parents), context)
    return total


def _p_all(shape: TreeShape, profile: Callable[[int, int], float]) -> float:
    """Probability that the deepest rank-0 path is accepted in full (the draft LM then also feeds its last draft)."""
    p = 1.0
    for d in range(1, shape.depth + 1):
        p *= profile(d, 0)
    return p


def step_cost(
    target: ModelCosts,
    kind: Optional[str],
    shape: Optional[TreeShape],
    branches: float = 1.0,
    draft: Optional[ModelCosts] = None,
    profile: Optional[Callable[[int, int], float]] = None,
    context: Optional[float] = None,
) -> float:
    """Seconds of one decoder step with ``branches`` live branches, each verifying ``shape``,
    over a cache of ``context`` slots (None = the shortest measured)."""
    size = shape.size if shape is not None else 0
    cost = target.forward_cost(branches * (1 + size), context) + target.overhead(branches, branches * size)
    if shape is not None and kind:
        cost += draft_cost(kind, shape, branches, target, draft, _p_all(shape, profile) if profile else 0.0, context)
    return cost


def predict(
    target: ModelCosts,
    kind: str,
    shape: TreeShape,
    profile: Callable[[int, int], float],
    branches: float = 1.0,
    draft: Optional[ModelCosts] = None,
    base_branches: Optional[float] = None,
    context: Optional[float] = None,
) -> Prediction:
    """Expected tokens and seconds per step, and the speed-up over the same mode without speculation."""
    b0 = branches if base_branches is None else base_branches
    tokens = branches * (expected_accepted(shape, profile) + 1.0)
    return Prediction(
        tokens_per_step=tokens,
        cost_per_step=step_cost(target, kind, shape, branches, draft, profile, context),
        base_cost_per_step=step_cost(target, None, None, b0, context=context),
        base_tokens_per_step=b0,
    )


# ===================================================================== choosing a tree


def grown_trees(
    profile: Callable[[int, int], float], max_nodes: int = 64, max_width: int = 8, max_depth: int = 16
) -> list[TreeShape]:
    """EAGLE-2's growth: start empty, add the candidate node with the highest path probability
    (product of p along its path), one at a time; return the tree at every size 1..max_nodes.

    The candidates are, for every node (and the pending token), its next-ranked child. With
    p non-increasing in rank and at most 1, a child never beats its parent nor a lower rank
    its elder sibling, so every prefix of this order is a valid tree and, for each size, the
    one with the largest expected acceptance."""
    reach: dict[tuple[int, ...], float] = {(): 1.0}
    nchildren: dict[tuple[int, ...], int] = {(): 0}
    paths: list[tuple[int, ...]] = []
    out = []
    for _ in range(min(max_nodes, MAX_TREE_NODES)):
        best, best_p = None, -1.0
        for node, k in nchildren.items():
            if k >= max_width or len(node) >= max_depth:
                continue
            cand = node + (k,)
            pc = reach[node] * profile(len(cand), k)
            if pc > best_p:
                best, best_p = cand, pc
        if best is None or best_p <= 0.0:
            break
        paths.append(best)
        reach[best] = best_p
        nchildren[best] = 0
        nchildren[best[:-1]] += 1
        out.append(layout(paths))
    return out


def candidate_shapes(
    profile: Callable[[int, int], float], kind: str = "model", max_nodes: int = 64, max_depth: Optional[int] = None
) -> list[TreeShape]:
    """Chains 1..16, full ``topk:WxD`` trees (W 2..4) up to ``max_nodes``, and grown trees,
    none deeper than ``max_depth`` (heads: one depth per head; default 16). The n-gram
    speculator proposes one continuation, so its candidates are the chains."""
    deepest = max_depth or (DEFAULT_HEADS if kind == "heads" else 16)
    shapes = [chain(k) for k in range(1, deepest + 1)]
    if kind == "ngram":  # prompt lookup proposes one continuation: a chain
        return shapes
    for w in (2, 3, 4):
        for d in range(1, min(5, deepest) + 1):
            if sum(w**i for i in range(1, d + 1)) <= max_nodes:
                shapes.append(full_tree(w, d))
    shapes.extend(grown_trees(profile, max_nodes=max_nodes, max_depth=deepest))
    unique = {s.paths: s for s in shapes}
    return list(unique.values())


def score(
    target: ModelCosts,
    kind: str,
    shape: TreeShape,
    profile: Callable[[int, int], float],
    branches: float = 1.0,
    draft: Optional[ModelCosts] = None,
) -> float:
    """Expected tokens per second of the configuration (what the optimiser maximises)."""
    return predict(target, kind, shape, profile, branches, draft).tokens_per_s


def choose_tree(
    target: ModelCosts,
    profile: Callable[[int, int], float],
    candidates: Optional[Iterable[TreeShape]] = None,
    *,
    kind: str = "model",
    draft: Optional[ModelCosts] = None,
    branches: float = 1.0,
) -> TreeShape:
    """The candidate shape with the most expected tokens per unit of cost (ties: the smaller tree)."""
    cands = (
        list(candidates)
        if candidates is not None
        else candidate_shapes(profile, kind, max_depth=target.num_heads if kind == "heads" else None)
    )
    if not cands:
        raise ValueError("choose_tree needs at least one candidate shape")
    return max(cands, key=lambda s: (score(target, kind, s, profile, branches, draft), -s.size))


def choose_k(
    target: ModelCosts,
    profile: Callable[[int, int], float],
    *,
    kind: str = "model",
    draft: Optional[ModelCosts] = None,
    branches: float = 1.0,
    max_k: int = 16,
) -> int:
    """The best chain length 1..max_k."""
    return choose_tree(
        target, profile, [chain(k) for k in range(1, max_k + 1)], kind=kind, draft=draft, branches=branches
    ).size


# ===================================================================== "auto"


def resolve_auto(
    model,
    dtype=None,
    device=None,
    speculator_kind: str = "model",
    profile: Optional[Profile] = None,
    *,
    draft_model=None,
    draft_name: Optional[str] = None,
    name: str = "",
    chains_only: bool = False,
    branches: float = 1.0,
    tokenizer=None,
    directory: Optional[Path] = None,
    say: Optional[Say] = None,
) -> TreeShape:
    """The tree (or chain, with ``chains_only``) the cost model picks for ``model`` as loaded.

    ``dtype``/``device``: checked against the loaded model (the costs are of the model as it
    runs). Costs come from the cache, or are measured first (with progress lines, and a line
    saying so). Without ``profile``, the registry's acceptance for ``draft_name`` or a
    per-kind default is used."""
    if speculator_kind not in KINDS:
        raise ValueError(f"unknown speculator kind '{speculator_kind}' (choose from {', '.join(KINDS)})")
    if dtype is not None:
        from apar_spec.models.loading import resolve_dtype

        want = resolve_dtype(dtype)
        if want is not None and want != model.dtype:
            raise ValueError(
                f"resolve_auto: the model is loaded in {model.dtype}, not {want}; load it in the dtype you will run"
            )
    if device is not None and torch.device(device).type != model.device.type:
        raise ValueError(f"resolve_auto: the model is on {model.device}, not {device}")
    target = get_costs(
        model, name, directory=directory, say=say, with_heads=speculator_kind == "heads", tokenizer=tokenizer
    )
    draft = None
    if speculator_kind == "model":
        if draft_model is None:
            raise ValueError("tree/num_draft_tokens 'auto' with a draft LM needs the draft model to cost it")
        draft = get_costs(draft_model, draft_name or "", directory=directory, say=say, with_heads=False)
        target = ensure_switch(target, model, draft, draft_model, directory=directory, say=say, tokenizer=tokenizer)
    prof = profile or default_profile(speculator_kind, draft_name)
    if chains_only:
        max_k = target.num_heads if speculator_kind == "heads" else 16
        return chain(choose_k(target, prof, kind=speculator_kind, draft=draft, branches=branches, max_k=max_k))
    return choose_tree(target, prof, kind=speculator_kind, draft=draft, branches=branches)


def resolve_auto_options(model, tokenizer, mode: str, draft: Any, options: dict, say: Optional[Say] = None) -> dict:
    """``generate()``'s hook: replace ``num_draft_tokens="auto"`` / ``tree="auto"`` in ``options``
    by the cost model's choice (one line on stderr says what was picked, and why)."""
    options = dict(options)
    want_k = options.get("num_draft_tokens") == "auto"
    want_tree = options.get("tree") == "auto"
    if not (want_k or want_tree):
        return options
    from apar_spec.options import DecodeOptions

    if mode not in ("spec", "apar+spec"):  # nothing is drafted: auto means the default
        if want_k:
            options["num_draft_tokens"] = DecodeOptions.num_draft_tokens
        if want_tree:
            options["tree"] = None
        return options
    kind, draft_model, draft_name = speculator_kind_of(draft, model)
    if kind not in KINDS:
        raise ValueError(
            f"'auto' draft length/tree: the cost model has no costs for a {kind} draft ('{draft_name}'); "
            "give --k or --tree"
        )
    branches = APAR_BRANCHES_GUESS if mode == "apar+spec" else 1.0
    shape = resolve_auto(
        model,
        speculator_kind=kind,
        draft_model=draft_model,
        draft_name=draft_name,
        chains_only=not want_tree,
        branches=branches,
        tokenizer=tokenizer,
        say=say,
    )
    if say:
        say(f"auto: picked {shape.describe()} for {kind} drafts ({default_profile(kind, draft_name).source})")
    if want_tree:
        options["tree"] = shape.to_json()
    k = shape.depth if want_tree else shape.size
    if want_k or "num_draft_tokens" not in options:
        options["num_draft_tokens"] = k
    return options


def speculator_kind_of(draft: Any, target=None) -> tuple[str, Any, Optional[str]]:
    """(kind, draft model or None, registry name or None) for whatever ``generate(draft=...)`` accepts."""
    if hasattr(draft, "config") and hasattr(draft, "forward"):
        return "model", draft, None
    if isinstance(draft, (str, os.PathLike)):
        name = str(draft)
        from apar_spec.models.loading import load

        entry = describe_draft(name)
        if entry.kind == "model":
            where = {"dtype": target.dtype, "device": target.device} if target is not None else {}
            return "model", load(entry.weights, **where)[0], name
        return entry.kind, None, name
    kind = getattr(draft, "kind", None)
    model = getattr(draft, "model", None)
    if kind in KINDS:
        return kind, model, getattr(draft, "name", None)
    if model is not None:
        return "model", model, getattr(draft, "name", None)
    return "ngram", None, getattr(draft, "name", None)
