"""The cost model (this package): measured pass costs -> predicted speed-up -> the draft tree (or k) worth using.

Why (DESIGN.md, "Cost model"): speculation pays off only when the expected
tokens per step outgrow what a step costs relative to a plain one-token step.
On a CPU a verify pass over n new tokens costs far more than a one-token pass,
and on the embedded trio a draft forward costs about as much as a target
forward, so the best draft length depends on the machine. Sequoia and EAGLE-2
size their trees the same way: expected accepted tokens per unit of cost.

Three parts, each testable alone (``cache``: keys, files and the measured costs;
``measuring``: the probes; ``choosing``: prediction and choice):

1. **Measure** (:func:`measure`), once per (model shape fingerprint, dtype,
   device, threads), cached as JSON under ``$XDG_CACHE_HOME/apar-spec/costs/``:

   - ``forward``: seconds of one ``TreeCache.forward`` (the decoder's real path:
     4D tree mask, ``position_ids``, the cache object) with n new nodes in one
     row, for n in :data:`SIZES`, over caches of :data:`DEFAULT_CONTEXTS` slots;
     :meth:`ModelCosts.forward_cost` interpolates in both;
   - ``overhead``: the decoder's per-step work outside that forward (phases,
     rules, commit, garbage), fitted as ``base + per_branch * b + per_draft * d``
     to short real decodes with a zero-cost probe speculator (:data:`OVERHEAD_PLANS`):
     each step's wall time minus the cost of that step's pass;
   - ``heads``: seconds for K residual d x d blocks plus the shared LM head on
     K x rows hidden states (a stand-in of the heads' size; the real module may
     not exist yet);
   - a draft LM is measured the same way (its own file), so its pass cost is its
     own ``forward`` curve at the frontier size; with a (target, draft) pair,
     :func:`measure_switch` adds to the target's file what alternating the two
     models costs and the draft speculator's own Python work per draft pass.

   Every timing runs ``warmup`` + ``repeats`` interleaved rounds (each round times
   every size and probe once) and keeps a robust low statistic (:func:`robust_time`:
   on a shared CPU, noise only adds time).

   The fingerprint is a hash of the config fields that set the cost (family,
   sizes, layers, heads, vocabulary): two checkpoints of one architecture share
   costs (``tiny-apar`` and ``tiny-base`` do), another dtype, device, thread
   count or shape is another file.

2. **Predict** (:func:`predict`): for a step plan (speculator kind, tree shape,
   live branches ``b``) and an acceptance profile ``p(d, r)``::

       tokens/step = b * (expected_accepted(shape, p) + 1)
       cost/step   = target.forward(b * (1 + shape.size))
                   + draft cost   (model: sum over depths of draft.forward(b * frontier)
                                   + switches + draft Python per pass; heads: heads(b); ngram: 0)
                   + target.overhead(b, b * shape.size)
       speed-up    = (tokens/step / cost/step) / (b0 / cost of the same mode's plain step with b0 branches)

   :func:`predict_prompt` does this for benchmark rows (the report's ``pred``
   column): tokens, the plain run's steps, live branches and cache lengths come
   from the rows themselves, the acceptance profile from the speculative rows,
   the costs from the cache; the speculative run's steps and every second are
   predicted.

   - ``batch``: seconds of one packed pass of R requests feeding n new nodes each
     (R in :data:`BATCH_ROWS`, n in :data:`BATCH_NEW`, :data:`BATCH_CONTEXT` slots each):
     what a loaded step costs, read by load-adaptive speculation.

3. **Choose** (:func:`choose_tree`, :func:`choose_k`, :func:`resolve_auto`):
   the candidate with the highest predicted tokens per second among chains
   1..16, full ``topk:WxD`` trees and greedily grown trees (add the node with
   the highest path probability, one at a time, scoring every size: EAGLE-2).

4. **Plan each step** (``planning``: :class:`StepPlanner`, :func:`planner_for`): under
   load, the draft nodes per branch that pay at the current batch (down to none),
   from the batch table and the acceptance the steps observe.
"""

from __future__ import annotations

# The package is the cost model's public face: callers use ``from apar_spec import costs``.
from apar_spec.costs.cache import (  # noqa: F401
    _SHAPE_KEYS,
    APAR_BRANCHES_GUESS,
    BATCH_CONTEXT,
    BATCH_NEW,
    BATCH_ROWS,
    CACHE_VERSION,
    DEFAULT_ALPHA,
    DEFAULT_CONTEXTS,
    DEFAULT_HEADS,
    HEAD_ROWS,
    KINDS,
    SIZES,
    CostCacheError,
    CostKey,
    ModelCosts,
    Overhead,
    Say,
    all_costs,
    cache_dir,
    config_fingerprint,
    device_label,
    find_costs,
    key_for,
    load_costs,
    save,
)
from apar_spec.costs.choosing import (  # noqa: F401
    Prediction,
    Profile,
    candidate_shapes,
    choose_k,
    choose_tree,
    default_profile,
    draft_cost,
    grown_trees,
    predict,
    resolve_auto,
    resolve_auto_options,
    score,
    speculator_kind_of,
    step_cost,
)
from apar_spec.costs.measuring import (  # noqa: F401
    OVERHEAD_PLANS,
    ensure_switch,
    get_costs,
    measure,
    measure_batch,
    measure_forward,
    measure_heads,
    measure_switch,
    robust_time,
)
from apar_spec.costs.planning import StepPlanner, cost_kind_of, planner_for  # noqa: F401
