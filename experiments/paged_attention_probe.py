"""Which KV layout a loaded step should use: the measurement behind ``paged_cache.py``.

One verify-like forward over ``--rows`` requests of uneven length (context drawn from
``[context/2, 3*context/2]``) whose rows feed uneven numbers of new nodes (1 to
``--new``, as APAR branches and drafts do), timed on three layouts of the same KV:

- ``padded``: ``TreeCache`` (one row per request, every row as wide as the longest,
  every row fed as many nodes as the busiest);
- ``paged-rows``: ``PagedTreeCache`` (packed forward, per-row attention: the default);
- ``paged-block``: ``PagedTreeCache(block_diagonal=True)`` (packed forward, every query
  over every row's keys under one block-diagonal mask: transformers' paged SDPA path).

Prints median milliseconds per forward (warmed up, interleaved rounds) and each layout's
ratio to ``padded`` from the same run, plus the tokens each feeds and the slots it holds.

    python experiments/paged_attention_probe.py [--model smollm2-apar] [--rows 24]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def build(kind: str, model, lengths: list[int], vocab: int, seed: int):
    from apar_spec.decoding.paged_cache import PagedTreeCache
    from apar_spec.decoding.tree_cache import TreeCache

    rng = random.Random(seed)
    if kind == "padded":
        tc = TreeCache(model, len(lengths), gqa_attention=True)
    else:
        tc = PagedTreeCache(model, len(lengths), block_diagonal=kind == "paged-block")
    tips = []
    for row, n in enumerate(lengths):
        tips.append(tc.add_chain(row, [rng.randrange(vocab) for _ in range(n)], -1))
    tc.forward()
    live = [set(nodes) for nodes in tips]
    return tc, [nodes[-1] for nodes in tips], live


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-apar")
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--context", type=int, default=400)
    ap.add_argument("--new", type=int, default=8, help="most new nodes a row feeds (each row 1..new)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import apar_spec

    model, _ = apar_spec.load(a.model)
    vocab = model.get_output_embeddings().weight.shape[0]
    rng = random.Random(a.seed)
    lengths = [rng.randint(a.context // 2, 3 * a.context // 2) for _ in range(a.rows)]
    news = [rng.randint(1, a.new) for _ in range(a.rows)]
    kinds = ("padded", "paged-rows", "paged-block")
    caches = {k: build(k, model, lengths, vocab, a.seed) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    fed: dict[str, int] = {}
    held: dict[str, int] = {}
    for round_ in range(a.repeats + 2):  # two warm-up rounds
        for k in kinds:
            tc, tips, live = caches[k]
            for row, (tip, n) in enumerate(zip(tips, news)):
                tc.add_chain(row, [rng.randrange(vocab) for _ in range(n)], tip)
            t0 = time.perf_counter()
            result = tc.forward()
            dt = time.perf_counter() - t0
            fed[k] = result.logits.shape[0] * result.logits.shape[1]
            held[k] = tc.physical_slots
            tc.compact(live)  # back to the contexts (not timed)
            if round_ >= 2:
                times[k].append(dt)
    base = statistics.median(times["padded"])
    print(f"{a.model}: {a.rows} rows, contexts {min(lengths)}..{max(lengths)}, new nodes 1..{a.new} (real {sum(news)})")
    print(f"{'layout':<12} {'ms/forward':>10} {'vs padded':>9} {'fed tokens':>10} {'slots held':>10}")
    for k in kinds:
        m = statistics.median(times[k])
        print(f"{k:<12} {m * 1e3:10.1f} {m / base:9.2f} {fed[k]:10d} {held[k]:10d}")


if __name__ == "__main__":
    main()
