"""Load-adaptive speculation: before each step, the draft nodes per branch that pay at the
current batch, down to none.

Why: a lone branch on a CPU is bound by reading the weights, so verifying k drafts costs
little more than one token and speculation pays. Under load the batch is compute-bound:
verifying k drafts per branch costs nearly k more tokens of work per branch, and the
acceptance no longer pays for it (issue 34 measured APAR+spec at 0.61x of APAR with 24
requests). vLLM and SGLang turn speculation down as batches grow; here the cost model is
asked every step, for the decoder's own shape (its chain or tree) and every prefix of it
in layout order (shallowest, likeliest nodes first), including no drafting at all::

    tokens/step(a) = branches * (E[accepted | prefix of a nodes] + 1)
    cost/step(a)   = target.batch_cost(rows, branches * (1 + a) / rows)       (the packed verify pass)
                   + target.overhead(branches, branches * a)                  (the decoder's own work)
                   + draft cost of the prefix for ``branches`` branches       (0 for n-gram drafts; with
                     no drafting a draft LM still runs one pass to catch up on committed tokens)

and the ``a`` with the most tokens per second wins. The acceptance profile starts from
the draft's known profile (``default_profile``) and follows what the steps accept, per
depth, so a draft that stops matching stops being paid for.

Greedy tokens never depend on the choice (verification is exact whatever is drafted),
and the token budget is counted in APAR time (``decoding/clock.py``), so it does not
depend on the schedule either; sampled outputs keep their distribution.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from apar_spec.costs.cache import ModelCosts, Say
from apar_spec.costs.choosing import Profile, default_profile, draft_cost
from apar_spec.costs.measuring import ensure_switch, get_costs
from apar_spec.decoding.draft_tree import TreeShape, expected_accepted, tree_depths_ranks

# pseudo-observations per depth given to the prior profile: a handful of real steps move it
PRIOR_WEIGHT = 16.0
# the profile is rebuilt after this many new drafted nodes (the choice is cheap; the profile is not free)
REFRESH_EVERY = 64


@dataclass
class StepPlanner:
    """Chooses, per step, how many draft nodes each branch may verify (see the module docstring).

    ``shape`` is the most a branch drafts (the decoder's chain or tree); ``kind`` the
    speculator's cost kind (``model``, ``heads``, ``ngram``); ``draft`` a draft LM's costs."""

    target: ModelCosts
    kind: str
    shape: TreeShape
    prior: Profile
    draft: Optional[ModelCosts] = None
    drafted: list[int] = field(default_factory=list)  # per depth: top-guess nodes verified
    accepted: list[int] = field(default_factory=list)  # per depth: of those, accepted
    histogram: Counter = field(default_factory=Counter)  # allowance -> steps that used it
    _profile: Optional[Profile] = None
    _since_refresh: int = 0

    def fresh(self) -> StepPlanner:
        """The same costs and prior, nothing observed yet (one per engine run)."""
        return StepPlanner(self.target, self.kind, self.shape, self.prior, self.draft)

    # ------------------------------------------------------------ choosing
    def profile(self) -> Profile:
        """The prior, moved per depth by the steps observed (top guesses; lower ranks keep the
        prior's ratio to the top guess)."""
        if self._profile is not None:
            return self._profile
        depth = max(self.shape.depth, 1)
        width = max(self.shape.width(d) for d in range(1, depth + 1))
        table, reach_prior, reach = [], 1.0, 1.0
        for d in range(1, depth + 1):
            top = self.prior(d, 0)
            reach_prior *= top
            n = self.drafted[d - 1] if d - 1 < len(self.drafted) else 0
            a = self.accepted[d - 1] if d - 1 < len(self.accepted) else 0
            u = (a + PRIOR_WEIGHT * reach_prior) / (n + PRIOR_WEIGHT)  # P(path through depth d accepted)
            p = min(1.0, u / reach) if reach > 0 else 0.0
            reach = max(u, 1e-9)
            scale = p / top if top > 0 else 0.0
            table.append([p] + [min(1.0, self.prior(d, r) * scale) for r in range(1, width)])
        self._profile = Profile(table, "observed acceptance over the prior")
        return self._profile

    def cost(self, rows: int, branches: int, n: int, profile: Profile) -> float:
        """Seconds of a step where each of ``branches`` branches (in ``rows`` requests) verifies ``n`` drafts."""
        shape = self.shape.prefix(n)
        per_row = branches * (1 + n) / max(rows, 1)
        total = self.target.batch_cost(rows, per_row) + self.target.overhead(branches, branches * n)
        if shape is not None:
            p_all = 1.0
            for d in range(1, shape.depth + 1):
                p_all *= profile(d, 0)
            total += draft_cost(self.kind, shape, branches, self.target, self.draft, p_all)
        elif self.kind == "model" and self.draft is not None:  # no drafts: the draft still catches up
            total += self.draft.forward_cost(branches)
        return total

    def allowance(self, rows: int, branches: int) -> int:
        """Draft nodes per branch for this step (0 = no drafting); counted in ``histogram``."""
        if branches <= 0:
            return 0
        profile = self.profile()
        best, best_rate = 0, 0.0
        for n in range(self.shape.size + 1):
            shape = self.shape.prefix(n)
            tokens = branches * ((expected_accepted(shape, profile) if shape is not None else 0.0) + 1.0)
            rate = tokens / self.cost(rows, branches, n, profile)
            if rate > best_rate * (1 + 1e-9):  # ties: the smaller allowance
                best, best_rate = n, rate
        self.histogram[best] += 1
        return best

    # ------------------------------------------------------------ learning
    def observe(self, parents: list[list[int]], paths: list[list[int]]) -> None:
        """One step's drafts (per branch, parent lists) and accepted paths: counts per depth of
        the top guesses verified and accepted."""
        for par, path in zip(parents, paths):
            if not par:
                continue
            depths, ranks = tree_depths_ranks(par)
            kept = set(path)
            for j, (d, r) in enumerate(zip(depths, ranks)):
                if r != 0:
                    continue
                while len(self.drafted) < d:
                    self.drafted.append(0)
                    self.accepted.append(0)
                self.drafted[d - 1] += 1
                self.accepted[d - 1] += j in kept
                self._since_refresh += 1
        if self._since_refresh >= REFRESH_EVERY:
            self._profile, self._since_refresh = None, 0


def cost_kind_of(spec: Any) -> tuple[str, Any]:
    """(cost kind, draft model or None) of a resolved speculator: ``heads`` for one that reads the
    target's hidden states, ``model`` for a draft LM (or a union holding one: its other parts
    cost nothing beside it), else ``ngram`` (model-free)."""
    parts = getattr(spec, "parts", None)
    if parts:
        kinds = [cost_kind_of(p) for p in parts]
        for want in ("model", "heads"):
            for kind, model in kinds:
                if kind == want:
                    return kind, model
        return "ngram", None
    if getattr(spec, "needs_hidden", False):
        return "heads", None
    model = getattr(spec, "model", None)
    if model is not None and hasattr(model, "config"):
        return "model", model
    return "ngram", None


def planner_for(
    model,
    spec: Any,
    shape: TreeShape,
    *,
    draft_name: Optional[str] = None,
    tokenizer=None,
    directory: Optional[Path] = None,
    say: Optional[Say] = None,
) -> StepPlanner:
    """A planner for ``model`` verifying ``spec``'s drafts of at most ``shape``: costs from the
    cache, measured first (once per model shape, dtype, device and thread count) when missing."""
    kind, draft_model = cost_kind_of(spec)
    target = get_costs(model, "", directory=directory, say=say, with_heads=kind == "heads", tokenizer=tokenizer)
    draft = None
    if kind == "model":
        draft = get_costs(
            draft_model, draft_name or "", directory=directory, say=say, with_heads=False, with_batch=False
        )
        target = ensure_switch(target, model, draft, draft_model, directory=directory, say=say, tokenizer=tokenizer)
    return StepPlanner(target, kind, shape, default_profile(kind, draft_name), draft)
