"""Load-adaptive speculation (``costs/planning.py``): the per-step choice and its guarantees.

Whatever a planner chooses step by step (drafting the full shape, a prefix of it, or
nothing at all, when a draft LM only catches up), served greedy tokens equal offline
plain APAR's. The cost-model planner itself is checked on synthetic costs: it drafts
where a pass costs little more for more tokens, stops where cost grows with every token,
and follows the acceptance it observes.
"""

from __future__ import annotations

import random

import pytest
from micro import CHILD, fork_processor, micro_model, micro_tokenizer

from apar_spec import generate
from apar_spec.costs.cache import CostKey, ModelCosts, Overhead
from apar_spec.costs.choosing import Profile
from apar_spec.costs.planning import StepPlanner, cost_kind_of
from apar_spec.decoding.draft_tree import chain, parse_tree
from apar_spec.serving import Engine

MODEL = micro_model("llama")
DRAFT = micro_model("llama", seed=1, layers=1)
TOK = micro_tokenizer()


class RandomPlanner:
    """Any allowance at any step, 0 included: tokens must not care."""

    def __init__(self, size: int, seed: int):
        self.size, self.rng, self.seen = size, random.Random(seed), []
        self.observed = 0

    def allowance(self, rows: int, branches: int) -> int:
        a = self.rng.choice([0, 0, 1, self.size // 2, self.size])
        self.seen.append(a)
        return a

    def observe(self, parents, paths) -> None:
        self.observed += 1


def _spec(kind: str):
    from apar_spec.drafts.draft_lm import DraftModelSpeculator
    from apar_spec.drafts.ngram import NGramSpeculator
    from apar_spec.drafts.union import UnionSpeculator

    if kind == "draft":
        return DraftModelSpeculator(DRAFT, mask_ids=(CHILD,))
    if kind == "ngram":
        return NGramSpeculator()
    return UnionSpeculator([DraftModelSpeculator(DRAFT, mask_ids=(CHILD,)), NGramSpeculator()], [None, 3])


@pytest.mark.parametrize(
    "kind,tree,seed", [("draft", None, 0), ("draft", "topk:2x2", 1), ("ngram", None, 2), ("union", "topk:2x2", 3)]
)
def test_any_allowance_schedule_keeps_served_tokens_equal_to_plain_apar(kind, tree, seed):
    proc = fork_processor()
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(5, 64) for _ in range(rng.randrange(2, 12))] for _ in range(5)]
    budgets = [rng.choice([10, 24, 40]) for _ in prompts]
    size = parse_tree(tree).size if tree else 4
    planner = RandomPlanner(size, seed)
    engine = Engine(
        MODEL,
        TOK,
        mode="apar+spec",
        draft=_spec(kind),
        max_new_tokens=40,
        tree=tree,
        logits_processor=proc,
        load_adaptive=planner,
    )
    handles = []
    for i, (p, m) in enumerate(zip(prompts, budgets)):
        handles.append(engine.submit(p, m))
        for _ in range(i):  # staggered arrivals: requests join a running batch
            engine.step()
    engine.run_until_idle()
    for p, m, h in zip(prompts, budgets, handles):
        offline = generate(MODEL, TOK, [p], mode="apar", logits_processor=proc, **engine.offline_options(m))[0]
        assert [b.token_ids for b in h.result(0).branches] == [b.token_ids for b in offline.branches]
    assert 0 in planner.seen and size in planner.seen  # both plain and full steps happened
    assert sum(engine.stats.draft_allowance.values()) == len(planner.seen)
    assert planner.observed == sum(1 for a in planner.seen if a)


def _costs(batch: dict[int, dict[int, float]]) -> ModelCosts:
    key = CostKey("fp", "float32", "cpu", 2)
    return ModelCosts("synthetic", key, forward={64: {1: 0.05, 64: 0.3}}, batch=batch, overhead=Overhead())


ROWS = (1, 2, 4, 8, 16, 32)
NEW = (1, 2, 3, 5, 9)
# a weight-bound machine: a pass costs the same whatever it feeds (speculation is free)
FLAT = _costs({r: {n: 0.05 for n in NEW} for r in ROWS})
# a compute-bound machine past one request: a pass costs 0.05 s per 8 tokens fed
BUSY = _costs({r: {n: 0.05 * max(1.0, r * n / 8) for n in NEW} for r in ROWS})


def test_the_planner_drafts_when_tokens_are_free_and_stops_when_each_costs():
    shape = chain(4)
    good = Profile.geometric(0.6)
    flat = StepPlanner(FLAT, "ngram", shape, good)
    assert flat.allowance(rows=24, branches=60) == 4  # more tokens for the same pass
    busy = StepPlanner(BUSY, "ngram", shape, good)
    assert busy.allowance(rows=1, branches=1) == 4  # one branch: the pass is still cheap
    assert busy.allowance(rows=24, branches=60) == 0  # every drafted node costs its share
    assert busy.histogram == {4: 1, 0: 1}


def test_the_planner_follows_observed_acceptance():
    planner = StepPlanner(BUSY, "ngram", chain(4), Profile.geometric(0.95))
    rows, branches = 2, 6  # a pass of 6 x 5 nodes costs 3.75 plain ones at this load
    assert planner.allowance(rows, branches) > 0  # the prior promises almost every draft
    for _ in range(40):  # then nothing is ever accepted
        planner.observe([[-1, 0, 1, 2]] * branches, [[]] * branches)
    assert planner.profile()(1, 0) < 0.1
    assert planner.allowance(rows, branches) == 0


def test_a_draft_lm_plan_costs_its_catch_up_pass_when_it_drafts_nothing():
    draft = _costs({})
    planner = StepPlanner(FLAT, "model", chain(2), Profile.geometric(0.5), draft)
    profile = planner.profile()
    assert planner.cost(4, 8, 0, profile) == pytest.approx(FLAT.batch_cost(4, 2) + draft.forward_cost(8))


def test_cost_kinds_of_speculators():
    assert cost_kind_of(_spec("draft")) == ("model", DRAFT)
    assert cost_kind_of(_spec("ngram")) == ("ngram", None)
    assert cost_kind_of(_spec("union"))[0] == "model"  # the n-gram part costs nothing beside the draft LM


def test_engine_builds_its_planner_from_measured_costs():
    engine = Engine(
        MODEL,
        TOK,
        mode="apar+spec",
        draft=DRAFT,
        max_new_tokens=20,
        load_adaptive=True,
        logits_processor=fork_processor(),
    )
    planner = engine.decoder.planner
    assert planner is not None and planner.kind == "model" and planner.target.batch  # the batch table was measured
    h = engine.submit([1, 9, 10, 11], 20)
    engine.run_until_idle()
    assert h.result(0).token_ids and sum(engine.stats.draft_allowance.values()) > 0
    plain = Engine(MODEL, TOK, mode="apar", max_new_tokens=20, load_adaptive=True)
    assert plain.decoder.planner is None  # nothing to plan without a speculator


def test_batch_costs_interpolate_and_survive_the_cost_file():
    c = _costs({4: {1: 0.04, 9: 0.12}, 8: {1: 0.06, 9: 0.2}})
    assert c.batch_cost(4, 5) == pytest.approx(0.08)  # halfway between 1 and 9 new nodes
    assert c.batch_cost(6, 1) == pytest.approx(0.05)  # halfway between 4 and 8 requests
    assert c.batch_cost(16, 1) == pytest.approx(0.10)  # linear past the largest batch measured
    assert c.batch_cost(2, 1) == pytest.approx(0.02)  # below the smallest: in proportion
    assert ModelCosts.from_dict(c.to_dict()).batch == c.batch
    no_table = _costs({})
    assert no_table.batch_cost(4, 2) == pytest.approx(no_table.forward_cost(8))  # the one-row curve at 8 nodes


class FullPlanner(RandomPlanner):
    def allowance(self, rows: int, branches: int) -> int:
        self.seen.append(self.size)
        return self.size


def test_the_full_allowance_drafts_exactly_what_no_planner_drafts():
    """A union drafts past the shape (its n-gram chain): when drafting pays in full, nothing is cut."""
    proc, prompts = fork_processor(), [[1, 9, 10, 11, 9, 10], [1, 20, 21, 20, 21]]
    drafted = {}
    for planned in (False, True):
        engine = Engine(
            MODEL,
            TOK,
            mode="apar+spec",
            draft=_spec("union"),
            max_new_tokens=30,
            tree="topk:2x2",
            logits_processor=proc,
            load_adaptive=FullPlanner(parse_tree("topk:2x2").size, 0) if planned else False,
        )
        handles = [engine.submit(p, 30) for p in prompts]
        engine.run_until_idle()
        drafted[planned] = [(h.result(0).token_ids, h.result(0).stats.drafted) for h in handles]
    assert drafted[True] == drafted[False]
