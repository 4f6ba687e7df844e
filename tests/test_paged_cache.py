"""The paged tree cache against the padded reference (float64 micro models).

Random tree workloads (chains, sibling drafts, compactions, rows joining and leaving)
run on both layouts: every forward's logits must agree, and the pool must hold what
the trees hold (freed slots are reused, no row pads another).
"""

from __future__ import annotations

import random

import pytest
import torch
from micro import fork_processor, micro_model, micro_tokenizer

from apar_spec import generate
from apar_spec.decoding.paged_cache import PAGED_COMPACT_SHARE, PagedTreeCache
from apar_spec.decoding.tree_cache import TreeCache
from apar_spec.serving import Engine


def _random_round(rng: random.Random, caches, rows: int, live) -> list[tuple[int, list[int]]]:
    """Schedule the same random nodes on every cache: per row a chain or two siblings under a
    live node; returns (row, nodes) to read back."""
    asked = []
    for row in range(rows):
        if rng.random() < 0.2:
            continue  # an idle row: nothing scheduled for it this forward
        under = rng.choice(sorted(live[row]))
        if rng.random() < 0.5:
            toks = [rng.randrange(5, 64) for _ in range(rng.randrange(1, 5))]
            nodes = [tc.add_chain(row, toks, under) for tc in caches]
        else:
            a, b = rng.randrange(5, 64), rng.randrange(5, 64)
            nodes = [[tc.add(row, a, under), tc.add(row, b, under)] for tc in caches]
        assert all(n == nodes[0] for n in nodes)  # node ids are layout-independent
        asked.append((row, nodes[0]))
    if not asked:  # at least one row works
        row = 0
        under = max(live[row])
        asked.append((row, [tc.add(row, 7, under) for tc in caches][:1]))
    return asked


@pytest.mark.parametrize("family,seed", [("llama", 0), ("qwen2", 1), ("mistral", 2)])
def test_paged_forwards_equal_the_padded_reference(family, seed):
    rng = random.Random(seed)
    model = micro_model(family, seed=seed)
    rows = 4
    padded, paged = TreeCache(model, rows, gqa_attention=True), PagedTreeCache(model, rows)
    block = PagedTreeCache(model, rows, block_diagonal=True)  # the alternative the probe measured
    caches = (padded, paged, block)
    prompts = [[1] + [rng.randrange(5, 64) for _ in range(rng.randrange(2, 15))] for _ in range(rows)]
    live = []
    for row, p in enumerate(prompts):
        nodes = [tc.add_chain(row, p, -1) for tc in caches]
        live.append(set(nodes[0]))
    results = [tc.forward() for tc in caches]
    for row in range(rows):
        last = [max(live[row])]
        ref = results[0].of(row, last)
        for r in results[1:]:
            torch.testing.assert_close(r.of(row, last), ref, rtol=1e-10, atol=1e-10)
    for step in range(12):
        asked = _random_round(rng, caches, rows, live)
        results = [tc.forward() for tc in caches]
        for row, nodes in asked:
            ref = results[0].of(row, nodes)
            for r in results[1:]:
                torch.testing.assert_close(r.of(row, nodes), ref, rtol=1e-10, atol=1e-10)
            assert results[1].attended_keys[row] == results[0].attended_keys[row]
            # every new node stays live with some chance; the rest becomes garbage
            live[row].update(n for n in nodes if rng.random() < 0.6)
        if step % 3 == 2:
            for tc in caches:
                tc.compact(live)
            assert paged.held_slots == sum(len(s) for s in live)  # a compaction frees every dead slot
        if step == 6:  # a row leaves, a freshly prefilled one joins (the engine's retire + admit)
            keep = [0, 2, 3]
            for tc in caches:
                tc.drop_rows(keep)
            live = [live[i] for i in keep]
            newcomer = [1] + [rng.randrange(5, 64) for _ in range(9)]
            others = [type(tc)(model, 1, **({"block_diagonal": True} if tc is block else {})) for tc in caches]
            for other in others:
                other.add_chain(0, newcomer, -1)
                other.forward()
            for tc, other in zip(caches, others):
                tc.add_rows(other)
            live.append(set(range(len(newcomer))))


def test_the_pool_reuses_freed_slots_and_holds_no_padding():
    model = micro_model("llama", seed=3)
    tc = PagedTreeCache(model, 3)
    lengths = [40, 5, 12]  # uneven rows: the padded layout would hold 3 x 40
    tips = [tc.add_chain(r, [7] * n, -1) for r, n in enumerate(lengths)]
    tc.forward()
    assert tc.held_slots == sum(lengths)
    capacity = tc.physical_slots
    tc.drop_rows([1, 2])  # 40 slots go back to the pool
    tc.add_chain(0, [9] * 30, tips[1][-1])
    tc.forward()
    assert tc.physical_slots == capacity  # the freed slots took the new nodes
    assert tc.held_slots == 5 + 12 + 30


def test_compaction_is_due_at_a_small_share_of_held_slots():
    model = micro_model("llama", seed=3)
    tc = PagedTreeCache(model, 1)
    tc.add_chain(0, [7] * 64, -1)
    tc.forward()
    dead = int(64 * PAGED_COMPACT_SHARE)
    assert tc.compaction_due([64 - dead], threshold=0.25)
    assert not tc.compaction_due([64 - dead + 1], threshold=0.25)
    assert not tc.compaction_due([64], threshold=0.0)


@pytest.mark.parametrize("mode,draft,tree", [("apar", None, None), ("apar+spec", "draft", "topk:2x2")])
def test_decoding_is_the_same_on_both_layouts(mode, draft, tree):
    model, tok = micro_model("llama", seed=4), micro_tokenizer()
    spec = micro_model("llama", seed=5, layers=1) if draft else None
    prompts = [[1, 9, 10, 11], [1, 20, 21], [1, 30, 31, 32, 33, 34]]
    out = {}
    for layout in ("padded", "paged"):
        gens = generate(
            model,
            tok,
            prompts,
            mode=mode,
            draft=spec,
            tree=tree,
            max_new_tokens=40,
            batch_size=3,
            kv_layout=layout,
            logits_processor=fork_processor(),
        )
        out[layout] = [g.token_ids for g in gens]
    assert out["paged"] == out["padded"]


def test_engine_physical_kv_stays_near_logical_on_the_paged_layout():
    model, tok = micro_model("llama", seed=6), micro_tokenizer()
    stats = {}
    for layout in ("padded", "paged"):
        engine = Engine(model, tok, mode="apar", max_new_tokens=40, kv_layout=layout, logits_processor=fork_processor())
        rng = random.Random(0)
        for _ in range(8):
            engine.submit([1] + [rng.randrange(5, 64) for _ in range(rng.randrange(2, 20))], 40)
        engine.run_until_idle()
        stats[layout] = engine.stats
    paged, padded = stats["paged"], stats["padded"]
    assert paged.peak_live_kv == padded.peak_live_kv  # the same trees
    assert padded.peak_physical_kv > 1.5 * padded.peak_live_kv  # rows x the longest row
    assert paged.peak_physical_kv <= padded.peak_physical_kv
    # the pool: live + dead slots below the compaction share + one growth step of slack
    assert paged.peak_physical_kv <= paged.peak_live_kv * (1 + PAGED_COMPACT_SHARE) + 128 + 16


def test_kv_layout_is_checked():
    with pytest.raises(ValueError, match="kv_layout"):
        generate(micro_model("llama"), micro_tokenizer(), [[1, 5]], mode="ar", kv_layout="ragged")
