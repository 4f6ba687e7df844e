"""Lossless, whatever the schedule: a seeded property test on float64 micro models.

Each case draws the caps at random (token budget - mostly binding -, per-branch cap,
live-branch cap, fork depth and policy at the cap, forks per branch, repeated titles,
fork bias, the fork router) and a speculator (a perfect self-draft, a small random LM,
prompt lookup, random chains and trees, drafts that are always wrong), and asserts
that ``apar+spec`` equals ``apar`` and ``spec`` equals ``ar``: every branch's whole token
list, its finish, the tree and the branch numbering. A slice of the plain runs is also
held against the per-branch reference with the budget replayed step by step
(``reference_budget``), so the plain side is right too, not merely equal.
"""

from __future__ import annotations

import random

import pytest
from apar_spec.drafts.draft_lm import DraftModelSpeculator
from apar_spec.drafts.ngram import NGramSpeculator
from micro import CHILD, EOS, FORK, VOCAB, fork_processor, micro_model
from test_fork_router import routed_model
from test_tree_spec import RandomTree

from apar_spec.decoding.decoder import Decoder
from apar_spec.decoding.reference import reference_budget, reference_decode
from apar_spec.decoding.speculator import Proposal
from apar_spec.decoding.tokens import AparTokens
from apar_spec.options import DecodeOptions

CONFIGS = 110  # random cap settings; each is checked under several speculators
SPECULATORS_PER_CONFIG = 3  # so 330 (configuration, speculator) cases per run
REFERENCE_EVERY = 6  # every 6th configuration's plain run is also held against the reference

LINE_BREAKS = frozenset(range(5, VOCAB, 3))
# Few distinct texts, so forked titles repeat now and then (the repeated-title rule fires).
TEXTS = tuple("" if i < 5 else "\n" if i in LINE_BREAKS else (" a", " b", " 7.", "**")[i % 4] for i in range(VOCAB))
APAR = AparTokens(FORK, CHILD, LINE_BREAKS, {}, TEXTS)
PROMPTS = [[1, 10, 11, 12, 13, 14], [1, 20, 7], [1, 33, 34, 35, 36], [1, 40, 41], [1, 50, 51, 52], [1, 60, 8, 9]]
SHAPES = ["[[0],[1]]", "topk:2x2", "[[0],[1],[0,0],[1,0],[0,0,0]]", "topk:3x1", "chain:5"]


class AlwaysWrong:
    """A perfect draft's chains, every token moved to its neighbour: never the target's choice
    where the perfect draft was right, so acceptance is (almost) nil."""

    name = "always-wrong"

    def __init__(self, inner):
        self.inner = inner

    forwards = property(lambda self: self.inner.forwards)

    def reset(self, *a, **kw):
        self.inner.reset(*a, **kw)

    def propose(self, views, sampling):
        p = self.inner.propose(views, sampling)
        return Proposal([[(t + 1) % VOCAB for t in d] for d in p.tokens], p.probs, p.parents)

    def observe(self, outcome):
        self.inner.observe(outcome)


_MODELS: dict = {}


def model_of(family: str, seed: int, routed: bool):
    key = (family, seed, routed)
    if key not in _MODELS:
        _MODELS[key] = routed_model(family, seed) if routed else micro_model(family, seed=seed, layers=1)
    return _MODELS[key]


def draw_config(rng: random.Random) -> dict:
    """One random setting of every cap that could make output depend on the schedule."""
    opts = dict(
        max_new_tokens=rng.choice([1, 2, 5, 9, 17, 30, 45, 60, 90, 400]),
        max_branch_tokens=rng.choice([None, 6, 12, 20, 28]),
        max_live_branches=rng.choice([None, None, 1, 2, 3]),
        max_depth=rng.choice([0, 1, 1, 2, 3]),
        depth_cap=rng.choice(["end", "mask"]),
        max_forks_per_branch=rng.choice([1, 2, 4, 16]),
        repeated_title=rng.choice(["end", "keep"]),
        fork_bias=rng.choice([0.0, 0.0, -1.5, 0.7, 3.0]),
        fork_gate=None if rng.random() < 0.3 else 0.0,  # None: the routed model's own threshold
        batch_size=2,
    )
    if opts["max_branch_tokens"] is None:
        opts["max_branch_tokens"] = min(opts["max_new_tokens"], 40)
    return opts


def draw_speculator(rng: random.Random, model, proc, seed: int):
    """(speculator, decode options it needs): drafts of every kind, chains and trees."""
    kind = rng.choice(["perfect", "perfect-tree", "random-lm", "ngram", "random-chain", "random-tree", "always-wrong"])
    k = rng.choice([1, 2, 3, 5])
    extra = dict(num_draft_tokens=k, adaptive_draft=rng.random() < 0.3, max_step_tokens=rng.choice([None, None, 3, 8]))
    if kind in ("perfect", "perfect-tree"):
        spec = DraftModelSpeculator(model, mask_ids=(CHILD,), logits_processor=proc)
        if kind == "perfect-tree":
            extra["tree"] = rng.choice(SHAPES)
    elif kind == "random-lm":
        spec = DraftModelSpeculator(micro_model("llama", seed=100 + seed % 3, hidden=16, layers=1), mask_ids=(CHILD,))
    elif kind == "ngram":
        spec = NGramSpeculator()
    elif kind == "always-wrong":
        spec = AlwaysWrong(DraftModelSpeculator(model, mask_ids=(CHILD,), logits_processor=proc))
    else:
        spec = RandomTree(seed)  # junk chains (the decoder asks a chain of k) or trees
        if kind == "random-tree":
            extra["tree"] = rng.choice(SHAPES)
    return kind, spec, extra


def canonical(results) -> list[list[tuple]]:
    return [[(b.id, b.parent, b.fork_index, list(b.tokens), b.finish) for b in r.branches] for r in results]


def test_speculation_never_changes_the_answer_whatever_the_caps():
    rng = random.Random(20261206)
    cases = binding = forked = 0
    kinds: set[str] = set()
    for c in range(CONFIGS):
        family = rng.choice(["llama", "qwen2", "mistral"])
        seed = rng.randrange(6)
        routed = rng.random() < 0.35
        model = model_of(family, seed, routed)
        proc = fork_processor(rng.choice([3, 4, 6]), rng.choice([2, 4, 7]), salt=seed)
        opts = dict(draw_config(rng), logits_processor=proc)
        if not routed:
            opts["fork_gate"] = None
        apar_side = rng.random() < 0.75  # apar+spec vs apar; else spec vs ar
        prompts = rng.sample(PROMPTS, 2)
        plain = Decoder(model, DecodeOptions(**opts), APAR, apar_side, {EOS}).run(prompts)
        want = canonical(plain)
        binding += any(b.finish == "budget" for r in plain for b in r.branches)
        forked += any(len(r.branches) > 1 for r in plain)
        for r in plain:  # the budget holds: tokens sampled, cut ones included, never exceed it
            assert sum(len(b.tokens) - (b.parent is not None) for b in r.branches) <= opts["max_new_tokens"]
        for _ in range(SPECULATORS_PER_CONFIG):
            kind, spec, extra = draw_speculator(rng, model, proc, seed)
            kinds.add(kind)
            got = canonical(
                Decoder(model, DecodeOptions(**{**opts, **extra}), APAR, apar_side, {EOS}, speculator=spec).run(prompts)
            )
            assert got == want, f"case {c}: {kind} {extra} under {opts} changed the answer"
            cases += 1
        if c % REFERENCE_EVERY == 0:
            for prompt, result in zip(prompts, plain):
                ref = reference_decode(
                    model, prompt, DecodeOptions(**{**opts, "max_new_tokens": 10_000}), APAR, apar_side, {EOS}
                )
                ref = reference_budget(ref, opts["max_new_tokens"], FORK)
                mine = {fork_path(result.branches, b): b.tokens for b in result.branches}
                assert mine == {p: b.tokens for p, b in ref.items()}, (
                    f"case {c}: plain decoding differs from the reference"
                )
    assert cases >= 300
    # the draw really exercises what it claims: budgets that bind, trees that fork, every speculator
    assert binding >= CONFIGS // 3 and forked >= CONFIGS // 3
    assert len(kinds) == 7


def fork_path(branches, b) -> tuple:
    return () if b.parent is None else fork_path(branches, branches[b.parent]) + (b.fork_index,)


@pytest.mark.parametrize("budget", [1, 7, 23, 61])
def test_a_binding_budget_keeps_what_plain_apar_keeps_under_a_live_branch_cap(budget):
    """Deferring children (max_live_branches) is a memory bound: the budget still cuts the
    tokens the uncapped plain loop keeps, checked against the step-by-step replay."""
    model = micro_model("llama", seed=2)
    proc = fork_processor(3, 5, salt=2)
    base = dict(max_new_tokens=budget, max_branch_tokens=24, max_depth=2, logits_processor=proc)
    free = canonical(Decoder(model, DecodeOptions(**base), APAR, True, {EOS}).run(PROMPTS[:3]))
    for cap in (1, 2):
        assert (
            canonical(Decoder(model, DecodeOptions(**base, max_live_branches=cap), APAR, True, {EOS}).run(PROMPTS[:3]))
            == free
        )
    for prompt, tree in zip(PROMPTS[:3], free):
        ref = reference_budget(
            reference_decode(model, prompt, DecodeOptions(**{**base, "max_new_tokens": 10_000}), APAR, True, {EOS}),
            budget,
            FORK,
        )
        by_id = {b[0]: b for b in tree}
        mine = {}
        for bid, parent, fork_index, tokens, _ in tree:
            path, p, f = [], parent, fork_index
            while p is not None:
                path.append(f)
                p, f = by_id[p][1], by_id[p][2]
            mine[tuple(reversed(path))] = tokens
        assert mine == {p: b.tokens for p, b in ref.items()}


def test_the_reference_replay_cuts_by_hand():
    """reference_budget on a hand-made tree: root r0 [Fork] r2 r3 ..., child c1 c2 ...:
    step 0 r0, 1 [Fork], 2 r2 + c1, 3 r3 + c2 - a budget of 5 keeps r0 F r2 c1 r3."""
    from apar_spec.decoding.reference import RefBranch

    root = RefBranch((), tokens=[10, FORK, 12, 13, 14], uncut=[10, FORK, 12, 13, 14])
    child = RefBranch((1,), tokens=[CHILD, 20, 21, 22], uncut=[CHILD, 20, 21, 22])
    out = reference_budget({(): root, (1,): child}, 5, FORK)
    assert out[()].tokens == [10, FORK, 12, 13] and out[(1,)].tokens == [CHILD, 20]
    out = reference_budget({(): root, (1,): child}, 2, FORK)  # the [Fork] is the last token: an empty child
    assert out[()].tokens == [10, FORK] and out[(1,)].tokens == [CHILD]
    assert set(reference_budget({(): root, (1,): child}, 1, FORK)) == {()}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_clock_cutoff_equals_sorting_every_token(n):
    """clock.cutoff (one pass over span ends) equals sorting every token's key."""
    from dataclasses import dataclass

    from apar_spec.decoding import clock

    @dataclass
    class B:
        base: int
        order: tuple
        sampled: int
        is_child: bool
        dropped: bool = False

    rng = random.Random(n)
    for _ in range(200):
        bs = [B(0, clock.ROOT_ORDER, rng.randrange(0, 30), False)]
        forks = set()  # (parent, index): one child per [Fork]
        for _ in range(rng.randrange(0, 6)):
            p = rng.randrange(len(bs))
            parent = bs[p]
            if parent.sampled < 2:
                continue
            i = rng.randrange(1 if parent.is_child else 0, parent.sampled)
            if (p, i) in forks:
                continue
            forks.add((p, i))
            base, order = clock.child_clock(parent, i)
            bs.append(B(base, order, rng.randrange(0, 20), True))
        keys = sorted((t, b.order) for b in bs for t in range(clock.first_time(b), clock.next_time(b)))
        for budget in range(1, len(keys) + 3):
            want = keys[budget - 1] if budget <= len(keys) else None
            assert clock.cutoff(bs, budget) == want
            if want is not None:
                assert sum(clock.kept(b, want) for b in bs) == budget
