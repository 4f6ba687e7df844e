"""The serving engine (continuous batching) against offline ``generate`` (float64 micro models).

Requests arrive at random steps with random budgets under a tight KV budget, so
admissions, queueing, merges of new rows into the running cache and retirements all
happen mid-flight; every request's tokens (all branches) must equal its offline
decode, and the logical live KV must never pass the budget.
"""

from __future__ import annotations

import random
import threading

import pytest
from micro import CHILD, LINE_BREAK_IDS, fork_processor, micro_model, micro_tokenizer

from apar_spec import generate
from apar_spec.serving import Engine, RequestError

MODEL = micro_model("llama")
DRAFT = micro_model("llama", seed=1, layers=1)
TOK = micro_tokenizer()
PROC = fork_processor()


def random_workload(seed: int, n: int = 6):
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(5, 64) for _ in range(rng.randrange(2, 12))] for _ in range(n)]
    budgets = [rng.choice([6, 15, 32]) for _ in range(n)]
    arrivals = sorted(rng.randrange(0, 25) for _ in range(n))
    return prompts, budgets, arrivals


def serve(engine: Engine, prompts, budgets, arrivals):
    """Step the engine by hand, submitting each request at its arrival step."""
    handles, step, i = [], 0, 0
    while i < len(prompts) or not engine.idle:
        while i < len(prompts) and arrivals[i] <= step:
            handles.append(engine.submit(prompts[i], budgets[i]))
            i += 1
        engine.step()
        step += 1
        assert step < 2000, "engine did not drain"
    return handles


@pytest.mark.parametrize(
    "mode,draft,seed,tree",
    [
        ("ar", None, 0, None),
        ("apar", None, 1, None),
        ("apar+spec", DRAFT, 3, None),
        ("spec", "ngram", 4, None),
        ("apar+spec", DRAFT, 5, "topk:2x2"),
    ],
)
def test_served_equals_offline_under_random_arrivals(mode, draft, seed, tree):
    prompts, budgets, arrivals = random_workload(seed)
    budget = 120 if tree is None else 160  # a tree tip reserves its 6 draft nodes
    engine = Engine(
        MODEL, TOK, mode=mode, draft=draft, kv_budget=budget, max_new_tokens=32, logits_processor=PROC, tree=tree
    )
    handles = serve(engine, prompts, budgets, arrivals)
    for p, m, h in zip(prompts, budgets, handles):
        offline = generate(
            MODEL, TOK, [p], mode=mode, draft=draft, logits_processor=PROC, tree=tree, **engine.offline_options(m)
        )[0]
        got = h.result(0)
        assert [b.token_ids for b in got.branches] == [b.token_ids for b in offline.branches]
        assert got.token_ids == offline.token_ids and got.text == offline.text
    s = engine.stats
    assert s.finished == len(prompts) and s.budget_violations == 0
    assert 0 < s.peak_live_kv <= budget
    if mode.startswith("apar"):
        assert any(len(h.result(0).branches) > 1 for h in handles)  # trees really forked
    if budget < sum(len(p) + m for p, m in zip(prompts, budgets)):
        assert any(h.t_admit > h.t_submit for h in handles)


@pytest.mark.parametrize("mode,draft,bias", [("apar", None, 2.0), ("apar+spec", DRAFT, -1.5), ("apar", None, -50.0)])
def test_served_fork_bias_equals_offline(mode, draft, bias):
    """A [Fork] logit offset given to the engine decodes every request as offline generate does under it."""
    prompts, budgets, arrivals = random_workload(11)
    engine = Engine(
        MODEL, TOK, mode=mode, draft=draft, kv_budget=150, max_new_tokens=32, logits_processor=PROC, fork_bias=bias
    )
    assert engine.opts.fork_bias == bias
    handles = serve(engine, prompts, budgets, arrivals)
    for p, m, h in zip(prompts, budgets, handles):
        offline = generate(
            MODEL, TOK, [p], mode=mode, draft=draft, logits_processor=PROC, fork_bias=bias, **engine.offline_options(m)
        )[0]
        assert [b.token_ids for b in h.result(0).branches] == [b.token_ids for b in offline.branches]
    if bias < -20:
        assert all(len(h.result(0).branches) == 1 for h in handles)  # the offset reached the served decoder


def test_default_branch_cap_equals_plain_generate():
    """With max_tokens = the engine's max_new_tokens, the offline twin is plain generate()."""
    prompts, _, arrivals = random_workload(7, n=4)
    engine = Engine(MODEL, TOK, mode="apar", max_new_tokens=24, logits_processor=PROC)
    handles = serve(engine, prompts, [24] * 4, arrivals)
    for p, h in zip(prompts, handles):
        assert (
            h.result(0).token_ids
            == generate(MODEL, TOK, [p], mode="apar", max_new_tokens=24, logits_processor=PROC)[0].token_ids
        )


def test_stream_deltas_rebuild_every_branch():
    prompts, budgets, arrivals = random_workload(8, n=4)
    engine = Engine(MODEL, TOK, mode="apar", kv_budget=100, max_new_tokens=32, logits_processor=PROC)
    handles = serve(engine, prompts, budgets, arrivals)
    for h in handles:
        rebuilt: dict[int, list[int]] = {}
        events = []
        while not h.events.empty():
            events.append(h.events.get_nowait())
        assert events[-1].finished and sum(e.finished for e in events) == 1
        for e in events:
            for d in e.deltas:
                rebuilt.setdefault(d.branch, []).extend(d.tokens)
        assert rebuilt == {b.id: b.token_ids for b in h.result(0).branches}
        assert all(toks[0] == CHILD for b, toks in rebuilt.items() if b > 0)


def assert_stream_rebuilds(h, got) -> None:
    """The request's streamed deltas only append, and rebuild every branch with its finish."""
    rebuilt: dict[int, list[int]] = {}
    finishes: dict[int, str] = {}
    while not h.events.empty():
        for d in h.events.get_nowait().deltas:
            assert d.branch not in finishes, "a delta after the branch's finish"
            rebuilt.setdefault(d.branch, []).extend(d.tokens)
            if d.finish is not None:
                finishes[d.branch] = d.finish
    assert rebuilt == {b.id: b.token_ids for b in got.branches}
    assert finishes == {b.id: b.finish for b in got.branches}


def test_stream_never_sends_a_line_a_capped_child_may_still_drop():
    """max_depth=1, depth_cap="end": a capped child's line since its last line break is held
    back until it is settled, so deltas only ever append, and a child that ends by cutting
    its last line still streams its finish."""
    tok = micro_tokenizer(line_breaks=True)
    assert tok.decode([5]).endswith("\n") and 5 in LINE_BREAK_IDS
    prompts, budgets, arrivals = random_workload(10, n=4)
    proc = fork_processor(4, 9, salt=1)
    engine = Engine(MODEL, tok, mode="apar", max_new_tokens=40, logits_processor=proc, max_depth=1)
    handles = serve(engine, prompts, [40] * 4, arrivals)
    cut = 0
    for p, h in zip(prompts, handles):
        got = h.result(0)
        offline = generate(
            MODEL, tok, [p], mode="apar", logits_processor=proc, max_depth=1, **engine.offline_options(40)
        )[0]
        assert [b.token_ids for b in got.branches] == [b.token_ids for b in offline.branches]
        assert_stream_rebuilds(h, got)
        cut += sum(b.finish == "depth" for b in got.branches)
    assert cut >= 2, "the workload should end capped children by a [Fork]"


@pytest.mark.parametrize("mode,draft", [("apar", None), ("apar+spec", DRAFT)])
def test_stream_never_sends_a_repeated_title_the_rule_cuts(mode, draft):
    """repeated_title="end" (the default): a root that forks after a title it already forked
    after ends there, minus that title. Served == offline, under both policies; the streamed
    deltas only ever append and rebuild every branch with its finish."""
    prompts, budgets, arrivals = random_workload(1)
    proc = fork_processor(3, 4)
    ended = {"end": 0, "keep": 0}
    for policy in ("end", "keep"):
        engine = Engine(
            MODEL,
            TOK,
            mode=mode,
            draft=draft,
            kv_budget=150,
            max_new_tokens=32,
            logits_processor=proc,
            repeated_title=policy,
        )
        handles = serve(engine, prompts, budgets, arrivals)
        for p, m, h in zip(prompts, budgets, handles):
            got = h.result(0)
            offline = generate(
                MODEL,
                TOK,
                [p],
                mode=mode,
                draft=draft,
                logits_processor=proc,
                repeated_title=policy,
                **engine.offline_options(m),
            )[0]
            assert [b.token_ids for b in got.branches] == [b.token_ids for b in offline.branches]
            assert_stream_rebuilds(h, got)
            ended[policy] += sum(b.finish == "repeat" for b in got.branches)
    assert ended["end"] >= 1 and ended["keep"] == 0, "the workload should end a branch on a repeated title"


def test_cancel_frees_the_request_at_the_next_step_and_others_are_unchanged():
    prompts, _, _ = random_workload(9, n=3)
    engine = Engine(MODEL, TOK, mode="apar", max_new_tokens=32, logits_processor=PROC)
    handles = [engine.submit(p, 32) for p in prompts]
    for _ in range(4):
        engine.step()
    engine.cancel(handles[1])
    engine.step()
    assert handles[1].done.is_set() and handles[1].cancelled
    assert all(r.index != handles[1].id for r in engine._live)
    assert len(engine._tc.rows) == len(engine._live) == 2
    engine.run_until_idle()
    assert engine.stats.cancelled == 1 and engine.stats.finished == 2
    for i in (0, 2):
        assert (
            handles[i].result(0).token_ids
            == generate(MODEL, TOK, [prompts[i]], mode="apar", max_new_tokens=32, logits_processor=PROC)[0].token_ids
        )


def test_cancel_while_queued():
    engine = Engine(MODEL, TOK, mode="ar", kv_budget=40, max_new_tokens=30)
    a = engine.submit([1, 5, 6], 30)
    b = engine.submit([1, 7, 8], 30)  # 33 + 33 > 40: waits
    engine.step()
    assert engine.stats.queued == 1
    engine.cancel(b)
    engine.step()
    assert engine.stats.queued == 0 and b.cancelled and b.done.is_set()
    engine.run_until_idle()
    assert a.result(0).token_ids and engine.stats.live_kv == 0 and engine.stats.running == 0


def test_refusals_are_clear():
    engine = Engine(MODEL, TOK, mode="ar", kv_budget=50, max_new_tokens=40)
    with pytest.raises(RequestError, match="KV budget"):
        engine.submit(list(range(1, 20)), 40)
    with pytest.raises(RequestError, match="more than this server allows"):
        engine.submit([1, 5], 41)
    with pytest.raises(RequestError, match="positive"):
        engine.submit([1, 5], 0)
    with pytest.raises(RequestError, match="empty"):
        engine.submit([], 5)
    with pytest.raises(RequestError, match="vocabulary"):
        engine.submit([1, 999], 5)
    with pytest.raises(RequestError, match="context"):
        Engine(MODEL, TOK, mode="ar", max_new_tokens=4).submit([1] * 600, 4)
    assert engine.idle and engine.stats.rejected == 5


def test_worker_thread_serves_concurrent_clients():
    prompts, budgets, _ = random_workload(10, n=5)
    engine = Engine(MODEL, TOK, mode="apar", kv_budget=90, max_new_tokens=32, logits_processor=PROC).start()
    try:
        results: dict[int, list[int]] = {}

        def client(i):
            results[i] = engine.submit(prompts[i], budgets[i]).result(timeout=60).token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        engine.stop()
    for i, p in enumerate(prompts):
        assert (
            results[i]
            == generate(MODEL, TOK, [p], mode="apar", logits_processor=PROC, **engine.offline_options(budgets[i]))[
                0
            ].token_ids
        )


def test_served_union_of_drafts_equals_offline():
    """A union (draft LM tree + n-gram chain) under continuous batching: admit/release reach every part."""
    from apar_spec.drafts.draft_lm import DraftModelSpeculator
    from apar_spec.drafts.ngram import NGramSpeculator
    from apar_spec.drafts.union import UnionSpeculator

    def union():
        return UnionSpeculator([DraftModelSpeculator(DRAFT, mask_ids=(CHILD,)), NGramSpeculator()], [None, 5])

    prompts, budgets, arrivals = random_workload(6)
    engine = Engine(
        MODEL,
        TOK,
        mode="apar+spec",
        draft=union(),
        kv_budget=200,
        max_new_tokens=32,
        logits_processor=PROC,
        tree="topk:2x2",
    )
    assert engine.draft_margin == 6 + 5  # KV a tip may add in a step: the 6-node tree and the n-gram's chain of 5
    handles = serve(engine, prompts, budgets, arrivals)
    for p, m, h in zip(prompts, budgets, handles):
        offline = generate(
            MODEL,
            TOK,
            [p],
            mode="apar+spec",
            draft=union(),
            logits_processor=PROC,
            tree="topk:2x2",
            **engine.offline_options(m),
        )[0]
        got = h.result(0)
        assert [b.token_ids for b in got.branches] == [b.token_ids for b in offline.branches]
    assert engine.stats.finished == len(prompts) and engine.stats.budget_violations == 0


@pytest.mark.parametrize(
    "seed,kind,live_cap", [(21, "self", None), (22, "self", 2), (23, "random", None), (24, "ngram", 1)]
)
def test_served_apar_spec_equals_offline_apar_with_budgets_that_bind(seed, kind, live_cap):
    """Under load, with budgets that cut branching answers and a speculator that lets some
    branches run ahead (a perfect self-draft accepts almost everything), every served answer
    equals offline plain ``apar`` - tree, tokens, finishes, numbering - and its stream sends
    only tokens the budget keeps, numbered as the result numbers them."""
    from apar_spec.drafts.draft_lm import DraftModelSpeculator

    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(5, 64) for _ in range(rng.randrange(2, 10))] for _ in range(6)]
    budgets = [rng.choice([3, 9, 17, 26, 40]) for _ in range(6)]
    arrivals = sorted(rng.randrange(0, 12) for _ in range(6))
    proc = fork_processor(3, 6, salt=seed)
    draft = {
        "self": lambda: DraftModelSpeculator(MODEL, mask_ids=(CHILD,), logits_processor=proc),
        "random": lambda: DRAFT,
        "ngram": lambda: "ngram",
    }[kind]()
    engine = Engine(
        MODEL,
        TOK,
        mode="apar+spec",
        draft=draft,
        kv_budget=400,
        max_new_tokens=40,
        max_branch_tokens=14,
        logits_processor=proc,
        num_draft_tokens=4,
        max_live_branches=live_cap,
    )
    handles = serve(engine, prompts, budgets, arrivals)
    cut = 0
    for p, m, h in zip(prompts, budgets, handles):
        offline = generate(MODEL, TOK, [p], mode="apar", logits_processor=proc, **engine.offline_options(m))[0]
        got = h.result(0)
        assert [(b.id, b.parent, b.fork_index, b.token_ids, b.finish) for b in got.branches] == [
            (b.id, b.parent, b.fork_index, b.token_ids, b.finish) for b in offline.branches
        ]
        assert got.token_ids == offline.token_ids
        assert_stream_rebuilds(h, got)
        cut += any(b.finish == "budget" for b in got.branches) and len(got.branches) > 1
    assert cut >= 2  # budgets really cut branching answers
