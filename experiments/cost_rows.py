"""The cost model on benchmark rows: the report's predicted-vs-achieved column."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from apar_spec.costs.cache import KINDS, ModelCosts
from apar_spec.costs.choosing import Profile, step_cost
from apar_spec.decoding.draft_tree import TreeShape, chain, expected_accepted


def draft_kind_of_row(row: dict) -> Optional[str]:
    """The speculator kind a row used: its ``draft_kind`` field, else the registry's kind of its draft."""
    if row.get("draft_kind") in KINDS:
        return row["draft_kind"]
    name = row.get("draft")
    if not name:
        return None
    try:
        from apar_spec.drafts import registry

        kind = registry.lookup(str(name)).kind
        return kind if kind in KINDS else None  # a union of drafts: no costed kind, no prediction
    except (ValueError, ImportError):
        return "model" if Path(str(name)).expanduser().exists() else None


def shape_of_row(row: dict) -> TreeShape:
    """The tree a row verified: its ``tree`` field (JSON paths, or any form ``parse_tree``
    reads), else a chain of ``k``."""
    from apar_spec.decoding.draft_tree import parse_tree

    spec = row.get("tree")
    if spec:
        try:
            return parse_tree(spec)
        except ValueError:
            pass
    return chain(int(row.get("k") or 1))


@dataclass
class RowPrediction:
    """Predicted seconds for one prompt of a speculative configuration and of its plain counterpart."""

    prompt_id: str
    spec_s: float
    base_s: float
    spec_tokens: float
    base_tokens: float
    tokens_per_step: float  # predicted, all branches
    branches: float  # live branches per step in the speculative run (measured)


def predict_prompt(
    spec_rows: Sequence[dict], base_rows: Sequence[dict], target: ModelCosts, draft: Optional[ModelCosts]
) -> Optional[RowPrediction]:
    """Predicted wall seconds of one prompt's speculative rows and plain rows (medians over repeats).

    Measured inputs (from the rows): tokens, prompt length, mean live KV (the cache length
    the costs are read at), the plain run's steps (its live branches per step = tokens per
    step), the speculative run's live branches per step, and its acceptance profile. Predicted:
    the speculative run's steps (tokens / (branches x (expected accepted + 1))) and every
    second."""
    if not spec_rows or not base_rows:
        return None
    med = lambda rows, key: statistics.median([float(r.get(key) or 0.0) for r in rows])  # noqa: E731
    first = spec_rows[0]
    kind = draft_kind_of_row(first)
    if kind is None or (kind == "model" and draft is None):
        return None
    shape = shape_of_row(first)
    profile = Profile.from_rows(spec_rows) or Profile([[0.0]], "nothing drafted")
    prompt = med(spec_rows, "prompt_tokens")
    # plain run: every decode step yields one token per live branch
    base_tokens, base_steps = med(base_rows, "tokens"), med(base_rows, "target_steps")
    base_branches = max(1.0, (base_tokens - 1) / max(base_steps - 1, 1))
    base_ctx = med(base_rows, "mean_live_kv") or prompt + base_tokens / 2
    base_s = target.forward_cost(prompt, 0) + (base_steps - 1) * step_cost(
        target, None, None, base_branches, context=base_ctx
    )
    # speculative run: live branches per step = branch-steps / decode steps
    tokens, steps = med(spec_rows, "tokens"), med(spec_rows, "target_steps")
    accepted, length = med(spec_rows, "accepted"), med(spec_rows, "mean_acceptance_length") or 1.0
    branch_steps = accepted / (length - 1.0) if length > 1.0 and accepted else tokens
    branches = max(1.0, branch_steps / max(steps - 1, 1))
    ctx = med(spec_rows, "mean_live_kv") or prompt + tokens / 2
    per_branch = expected_accepted(shape, profile) + 1.0
    pred_steps = max(tokens - 1, 0) / (branches * per_branch)
    spec_s = target.forward_cost(prompt, 0) + pred_steps * step_cost(target, kind, shape, branches, draft, profile, ctx)
    if kind == "model":
        spec_s += draft.forward_cost(prompt, 0)  # the draft's first propose reads the whole prompt
    return RowPrediction(str(first["prompt_id"]), spec_s, base_s, tokens, base_tokens, branches * per_branch, branches)
