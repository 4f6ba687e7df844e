"""A paged KV cache for token trees: one slot pool, packed forwards, no padding tax.

``TreeCache`` (``tree_cache.py``) keeps one request per row of a transformers
``DynamicCache``: every row is as wide as the longest one, and every forward feeds
each row as many new nodes as the busiest row has. Under load that padding is the
dominant cost (issue 34, measured on SmolLM2-135M, 24 APAR requests at once): the
verify forward fed 1.99x the real new tokens (the MLP and projections, 58% of the
step, ran on padding) and the cache held 2.30x the slots any branch could see.

This cache removes both taxes; ``TreeCache`` stays as the plain, obviously correct
reference (``DecodeOptions.kv_layout='padded'``), and tests hold the two equal. The
serving engine and any batch of requests use this one; a request decoded alone keeps
the padded layout (``kv_layout='auto'``): one row has nothing to pad, and the pool's
gathers cost ~0.5 ms a forward, which on the embedded models is 15-20% (measured:
tiny-apar, one row of 70 slots, 2.46 ms padded vs 2.96 ms paged for one new node).

- **Packed forward.** The model sees ONE sequence: every row's scheduled nodes
  back to back (``input_ids [1, N]``, ``N`` = the real new nodes), so the linear
  layers, by far the bulk of a step, do no padded work.
- **A slot pool.** Each layer's keys and values live in one tensor
  ``[capacity, kv_heads, head_dim]`` (a page of one slot: the trees grow a node at a
  time, so any larger block would hold dead tails). A row owns a list of pool slots
  (its *local* slots, in insertion order, so ancestors come first). Freeing a dead
  node returns its slot to a free list, and a freed slot takes the next new node, so
  the pool holds the live KV plus what the next compaction frees. Compaction moves
  no KV at all: it rewrites a row's slot list and its visibility matrix.
- **Attention per row.** The cache's ``update`` writes the packed new keys into the
  pool and returns every row's slots gathered as ``[rows, kv_heads, width, head_dim]``;
  ``paged_tree_attention`` (registered through ``AttentionInterface``, the public
  hook) gathers the packed queries into ``[rows, heads, n_max, head_dim]``, runs one
  SDPA with each row's tree mask, and packs the output back.

Why not transformers' own ``PagedAttentionCache`` (``generation.continuous_batching``):
it is bound to its scheduler's ``RequestState`` and its allocators, and its SDPA path
attends the packed queries to *every* request's keys under one block-diagonal
``[1, 1, N, sum of rows' slots]`` mask. We take its design (a slot pool written and
read by index inside ``update``, packed queries) but keep attention per row. Measured
here (``experiments/paged_attention_probe.py``, SmolLM2-135M, float32, 2 threads, 24
rows of 220-588 cached slots feeding 1-8 new nodes each, 110 in all), one forward took
padded 551 ms, paged per-row 435 ms (0.79x), paged block-diagonal 1042 ms (1.89x): the
block-diagonal mask makes every query score every request's keys. With one new node per
row (plain AR) the padded layout feeds no padding and paging pays its gathers (1.16x in
that probe), yet whole AR runs of the engine at 24 requests came out within noise of
each other (139-170 tok/s either way). Per-row attention pads queries to the busiest
row and keys to the longest row, but only inside the attention kernel.

Node/row bookkeeping (``parent``, ``pos``, ``slot_of``, ``slot_node``, ``scheduled``)
is ``TreeCache``'s ``_Row``; ``vis`` is per row, in local slots.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from transformers import AttentionInterface

from apar_spec.decoding.tree_cache import ForwardResult, NodeScheduler, _Row, check_supported, full_attention_cache

PAGED_ATTENTION = "apar_paged_tree"

# A compaction moves no KV here (it rewrites slot lists and small masks), so dead slots are
# freed as soon as they pass this share of the held slots: what memory holds stays near the
# live KV (the padded cache waits for DecodeOptions.compact_threshold, since its compaction
# gathers the whole cache).
PAGED_COMPACT_SHARE = 1 / 16

# The pool grows by at least this share of its size (at least ``_MIN_GROWTH`` slots): growing
# copies the pool once, so it must be rare, and the slack it leaves is what physical KV holds
# beyond the live KV.
_GROWTH_SHARE = 1 / 8
_MIN_GROWTH = 128


def paged_tree_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    is_causal=None,
    apar_query_index=None,
    apar_query_back=None,
    **kwargs,
):
    """Attention of packed queries over each row's gathered keys (see the module docstring).

    ``query``: ``[1, heads, N, head_dim]`` (packed); ``key``/``value``: ``[rows, kv_heads,
    width, head_dim]`` (``_PagedKV.update``); ``attention_mask``: ``[rows, 1, n_max, width]``
    bool; ``apar_query_index``: ``[rows * n_max]`` packed position of each (row, query)
    (padding repeats a real one); ``apar_query_back``: ``[N]`` where each packed query sits
    in ``rows * n_max``. Grouped K/V heads are never copied: a group's query heads fold into
    the query axis (transformers does the same for one query token), so one plain SDPA with
    no ``repeat_kv`` serves every device."""
    rows, kv_heads, width, head_dim = key.shape
    heads = query.shape[1]
    groups = heads // kv_heads
    n_max = attention_mask.shape[2]
    q = query[0].index_select(1, apar_query_index)  # [heads, rows * n_max, head_dim]
    q = q.view(kv_heads, groups, rows, n_max, head_dim).permute(2, 0, 1, 3, 4)  # [rows, kv_heads, groups, n, d]
    q = q.reshape(rows, kv_heads, groups * n_max, head_dim)
    mask = attention_mask if groups == 1 else attention_mask.repeat(1, 1, groups, 1)  # [rows, 1, groups * n, width]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )  # [rows, kv_heads, groups * n, head_dim]
    out = out.view(rows, heads, n_max, head_dim).transpose(1, 2).reshape(rows * n_max, heads, head_dim)
    return out.index_select(0, apar_query_back).unsqueeze(0), None  # [1, N, heads, head_dim]


AttentionInterface.register(PAGED_ATTENTION, paged_tree_attention)  # the documented way to add an attention function


@contextmanager
def _paged_attention(model) -> Iterator[None]:
    """The model runs ``paged_tree_attention`` inside the block and gets its own back after."""
    own = model.config._attn_implementation
    model.set_attn_implementation(PAGED_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(own)


class _PagedKV:
    """What the attention layers call during one forward (``cache.update``, the same call
    transformers makes on its own caches): write the packed new keys/values into the pool
    at ``write``; return every row's slots gathered by ``read``."""

    def __init__(self, num_layers: int):
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers  # each [capacity, kv_heads, head_dim]
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers
        self.capacity = 0  # slots every pool tensor has (or will have at its next update)
        self.write: Optional[torch.Tensor] = None  # [N] pool slot of each packed new node
        self.read: Optional[torch.Tensor] = None  # [rows * width] pool slot of each (row, local slot)
        self.rows = 0
        self.width = 0

    def _pool(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys[layer], self.values[layer]
        if k is None or v is None or k.shape[0] < self.capacity:
            shape = (self.capacity, like.shape[1], like.shape[2])
            grown_k, grown_v = like.new_zeros(shape), like.new_zeros(shape)
            if k is not None and v is not None:  # growing copies the pool once (rare: _GROWTH_SHARE)
                grown_k[: k.shape[0]] = k
                grown_v[: v.shape[0]] = v
            self.keys[layer], self.values[layer] = grown_k, grown_v
            k, v = grown_k, grown_v
        return k, v

    def update(self, key_states, value_states, layer_idx, kwargs=None, cache_kwargs=None):
        new_k = key_states[0].transpose(0, 1)  # [N, kv_heads, head_dim]
        new_v = value_states[0].transpose(0, 1)
        k, v = self._pool(layer_idx, new_k)
        assert self.write is not None and self.read is not None
        write, read = self.write.to(k.device), self.read.to(k.device)  # device_map may split layers
        k.index_copy_(0, write, new_k)
        v.index_copy_(0, write, new_v.to(v.dtype))
        shape = (self.rows, self.width, k.shape[1], k.shape[2])
        keys = k.index_select(0, read).view(shape).transpose(1, 2)  # [rows, kv_heads, width, head_dim]
        values = v.index_select(0, read).view(shape).transpose(1, 2)
        return keys, values

    @property
    def layers(self) -> list[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
        return list(zip(self.keys, self.values))


@dataclass
class _PagedRow(_Row):
    pool: list[int] = field(default_factory=list)  # local slot -> pool slot
    vis: Optional[torch.Tensor] = None  # [capacity, capacity] bool, local slots; vis[s, t]: s sees t


class PagedTreeCache(NodeScheduler):
    """KV cache of one model for ``num_rows`` token trees (one per request), paged (module docstring).

    The same interface as ``TreeCache`` (``add``, ``add_chain``, ``forward``, ``compact``,
    ``add_rows``, ``drop_rows``), so the decoder, the draft and the engine use either."""

    packed = True

    def __init__(self, model, num_rows: int, gqa_attention: bool = False, block_diagonal: bool = False):
        """``gqa_attention`` is accepted for ``TreeCache``'s signature: grouped heads are never
        copied here (``paged_tree_attention``). ``block_diagonal``: attend like transformers'
        paged SDPA path (every packed query over every row's keys, one block-diagonal mask);
        only for the measurement that chose per-row attention (module docstring)."""
        self.block_diagonal = block_diagonal
        check_supported(model)
        full_attention_cache(model)  # the same refusals as the padded layout
        self.model = model
        self.device = model.device
        self.rows: list[_PagedRow] = [_PagedRow() for _ in range(num_rows)]
        self.kv = _PagedKV(model.config.num_hidden_layers)
        self.free: list[int] = []  # pool slots no row holds (reused before the pool grows)
        self.used = 0  # pool slots ever handed out (the rest of the capacity has never been written)
        self.forwards = 0

    # ----------------------------------------------------------------- sizes
    @property
    def num_slots(self) -> int:
        """The longest row (what the padded cache would make every row)."""
        return max((len(r.pool) for r in self.rows), default=0)

    @property
    def held_slots(self) -> int:
        """Pool slots some row holds (live nodes and dead ones not yet compacted)."""
        return sum(len(r.pool) for r in self.rows)

    @property
    def physical_slots(self) -> int:
        """What the cache tensors hold: the pool's capacity (held, free and never-used slots)."""
        return self.kv.capacity

    def held_by(self, row: int) -> int:
        """Pool slots ``row`` holds (live nodes and dead ones not yet freed)."""
        return len(self.rows[row].pool)

    def compaction_due(self, live_counts: list[int], threshold: float) -> bool:
        """Compact when dead slots reach ``min(threshold, PAGED_COMPACT_SHARE)`` of the held ones."""
        held = self.held_slots
        garbage = held - sum(live_counts)
        return garbage > 0 and garbage >= min(threshold, PAGED_COMPACT_SHARE) * held

    # ----------------------------------------------------------------- slots
    def _alloc(self, n: int) -> list[int]:
        """``n`` pool slots: freed ones first, then never-used ones (growing the pool if needed)."""
        take = min(n, len(self.free))
        slots = self.free[len(self.free) - take :]
        del self.free[len(self.free) - take :]
        fresh = n - take
        if fresh:
            slots.extend(range(self.used, self.used + fresh))
            self.used += fresh
            if self.used > self.kv.capacity:
                cap = self.kv.capacity
                self.kv.capacity = max(self.used, cap + max(_MIN_GROWTH, int(cap * _GROWTH_SHARE)))
        return slots

    def _place(self, r: _PagedRow) -> list[int]:
        """Give ``r``'s scheduled nodes local slots and visibility rows; returns their pool slots."""
        base, s = len(r.pool), len(r.scheduled)
        total = base + s
        if r.vis is None or r.vis.shape[0] < total:
            cap = max(64, total, 2 * (r.vis.shape[0] if r.vis is not None else 0))
            grown = torch.zeros(cap, cap, dtype=torch.bool, device=self.device)
            if r.vis is not None and base:
                grown[:base, :base] = r.vis[:base, :base]
            r.vis = grown
        vis = r.vis
        vis[base:total].zero_()  # rows left over from before a compaction
        # each new node sees what its nearest cached ancestor sees (one gather) plus its new
        # ancestors and itself (a small [s, s] block: a chain's is triangular)
        anchor: list[int] = []  # per new node: local slot of its nearest cached ancestor, -1 for none
        new_parent: list[int] = []  # per new node: index of its parent among the new nodes, -1 if cached
        for j, (node, _) in enumerate(r.scheduled):
            parent = r.parent[node]
            local = r.slot_of[parent] if parent >= 0 else -1
            if parent >= 0 and local < 0:
                raise RuntimeError(f"node {node}'s parent {parent} is neither cached nor scheduled before it")
            if local >= base:  # the parent is new in this very forward
                new_parent.append(local - base)
                anchor.append(anchor[local - base])
            else:
                new_parent.append(-1)
                anchor.append(local)
            r.slot_of[node] = base + j
        if base:
            has = [a >= 0 for a in anchor]
            if any(has):
                idx = torch.tensor([max(a, 0) for a in anchor], dtype=torch.long, device=self.device)
                old = vis.index_select(0, idx)[:, :base]  # [s, base]
                if not all(has):
                    old &= torch.tensor(has, dtype=torch.bool, device=self.device)[:, None]
                vis[base:total, :base] = old
        if all(p == j - 1 for j, p in enumerate(new_parent) if j):  # a chain (a prompt, a pending token + drafts)
            block = torch.ones(s, s, dtype=torch.bool, device=self.device).tril_()
        else:
            sees: list[int] = []  # bitmask of new nodes each new node sees
            for j, p in enumerate(new_parent):
                sees.append((sees[p] if p >= 0 else 0) | (1 << j))
            block = torch.tensor([[bool(m >> t & 1) for t in range(s)] for m in sees], dtype=torch.bool)
        vis[base:total, base:total] = block.to(self.device)
        slots = self._alloc(s)
        r.pool.extend(slots)
        r.slot_node.extend(node for node, _ in r.scheduled)
        return slots

    # --------------------------------------------------------------- forward
    @torch.inference_mode()
    def forward(self, hidden: bool = False, head: Optional[torch.nn.Module] = None) -> ForwardResult:
        """Run ONE model forward over every scheduled node of every row, packed (module docstring).

        ``logits`` is ``[1, N, vocab]``; ``column[row][node]`` is the node's packed position
        (``ForwardResult.at``). ``hidden``/``head`` as in ``TreeCache.forward``."""
        busy = [i for i, r in enumerate(self.rows) if r.scheduled]
        if not busy:
            raise RuntimeError("forward() with no scheduled nodes")
        if self.block_diagonal:
            return self._forward_block_diagonal(busy, hidden, head)
        n_max = max(len(self.rows[i].scheduled) for i in busy)
        width = max(len(self.rows[i].pool) + len(self.rows[i].scheduled) for i in busy)
        ids: list[int] = []
        pos: list[int] = []
        write: list[int] = []
        read: list[int] = []
        query_index: list[int] = []
        column: list[dict[int, int]] = [{} for _ in self.rows]
        mask = torch.zeros(len(busy), n_max, width, dtype=torch.bool, device=self.device)  # [rows, n_max, width]
        mask[:, :, 0] = True  # padding queries see one key (no all-masked row); their output is dropped
        for b, i in enumerate(busy):
            r = self.rows[i]
            base, s = len(r.pool), len(r.scheduled)
            start = len(ids)
            write.extend(self._place(r))
            for j, (node, token) in enumerate(r.scheduled):
                ids.append(token)
                pos.append(r.pos[node])
                column[i][node] = start + j
            assert r.vis is not None
            mask[b, :s, : base + s] = r.vis[base : base + s, : base + s]
            read.extend(r.pool)
            read.extend([r.pool[0]] * (width - base - s))  # padding keys: any held slot, never seen
            query_index.extend(range(start, start + s))
            query_index.extend([start] * (n_max - s))
            r.scheduled = []
        query_back: list[int] = []  # packed order is row by row, so each row's real queries in turn
        for b, i in enumerate(busy):
            query_back.extend(range(b * n_max, b * n_max + len(column[i])))
        attended = [0] * len(self.rows)
        sums = mask.sum(dim=(1, 2)).tolist()  # per busy row; its padding queries saw one key each
        for b, i in enumerate(busy):
            attended[i] = int(sums[b]) - (n_max - len(column[i]))
        kv = self.kv
        as_long = dict(dtype=torch.long, device=self.device)
        kv.write, kv.read = torch.tensor(write, **as_long), torch.tensor(read, **as_long)
        kv.rows, kv.width = len(busy), width
        inputs = dict(
            input_ids=torch.tensor([ids], **as_long),  # [1, N]
            position_ids=torch.tensor([pos], **as_long),  # [1, N]
            attention_mask=mask[:, None],  # [rows, 1, n_max, width]
            cache=kv,
            use_cache=True,
            apar_query_index=torch.tensor(query_index, **as_long),  # [rows * n_max]
            apar_query_back=torch.tensor(query_back, **as_long),  # [N]
        )
        logits, states = self._run(inputs, hidden, head)
        return ForwardResult(logits, column, attended, states, packed=True)

    def _run(self, inputs: dict, hidden: bool, head: Optional[torch.nn.Module]):
        states = None
        with _paged_attention(self.model):
            if hidden or head is not None:
                states = self.model.get_decoder()(**inputs).last_hidden_state  # [1, N, hidden]
                logits = (head or self.model.get_output_embeddings())(states)  # [1, N, vocab or head width]
                if not hidden:
                    states = None
            else:
                logits = self.model(**inputs).logits  # [1, N, vocab]
        self.kv.write = self.kv.read = None
        self.forwards += 1
        return logits, states

    def _forward_block_diagonal(self, busy: list[int], hidden: bool, head: Optional[torch.nn.Module]):
        """The measured alternative: one batch entry, every row's keys side by side."""
        starts: list[tuple[int, int, int, int]] = []  # per busy row: first query, first key, base, new
        ids: list[int] = []
        pos: list[int] = []
        write: list[int] = []
        read: list[int] = []
        column: list[dict[int, int]] = [{} for _ in self.rows]
        blocks = []
        for i in busy:
            r = self.rows[i]
            base, s = len(r.pool), len(r.scheduled)
            starts.append((len(ids), len(read), base, s))
            write.extend(self._place(r))
            for node, token in r.scheduled:
                ids.append(token)
                pos.append(r.pos[node])
                column[i][node] = len(ids) - 1
            assert r.vis is not None
            blocks.append(r.vis[base : base + s, : base + s])
            read.extend(r.pool)
            r.scheduled = []
        n, width = len(ids), len(read)
        mask = torch.zeros(1, n, width, dtype=torch.bool, device=self.device)  # [1, N, all rows' slots]
        for (q0, k0, base, s), block in zip(starts, blocks):
            mask[0, q0 : q0 + s, k0 : k0 + base + s] = block
        attended = [0] * len(self.rows)
        for i, (q0, _, _, s) in zip(busy, starts):
            attended[i] = int(mask[0, q0 : q0 + s].sum())
        as_long = dict(dtype=torch.long, device=self.device)
        self.kv.write, self.kv.read = torch.tensor(write, **as_long), torch.tensor(read, **as_long)
        self.kv.rows, self.kv.width = 1, width
        everyone = torch.arange(n, **as_long)
        inputs = dict(
            input_ids=torch.tensor([ids], **as_long),
            position_ids=torch.tensor([pos], **as_long),
            attention_mask=mask[:, None],
            cache=self.kv,
            use_cache=True,
            apar_query_index=everyone,
            apar_query_back=everyone,
        )
        logits, states = self._run(inputs, hidden, head)
        return ForwardResult(logits, column, attended, states, packed=True)

    # --------------------------------------------------------------- garbage
    @torch.inference_mode()
    def compact(self, live: list[set[int]]) -> None:
        """Keep only the slots of ``live[row]`` nodes; the others go back to the pool.

        No KV moves: a row's slot list and visibility matrix are rewritten (relative order
        kept, so ancestors stay before descendants)."""
        for r, nodes in zip(self.rows, live):
            keep = sorted(r.slot_of[n] for n in nodes)
            if len(keep) == len(r.pool):
                continue
            kept = set(keep)
            self.free.extend(p for local, p in enumerate(r.pool) if local not in kept)
            kept_nodes = [r.slot_node[s] for s in keep]
            if r.vis is not None:
                idx = torch.tensor(keep, dtype=torch.long, device=self.device)
                sub = r.vis.index_select(0, idx).index_select(1, idx)  # [kept, kept]
                r.vis.zero_()
                r.vis[: len(keep), : len(keep)] = sub
            r.pool = [r.pool[s] for s in keep]
            r.slot_of = [-1] * len(r.slot_of)
            r.slot_node = kept_nodes
            for local, node in enumerate(kept_nodes):
                r.slot_of[node] = local

    # ----------------------------------------------------------------- rows
    @torch.inference_mode()
    def add_rows(self, other: PagedTreeCache) -> None:
        """Append ``other``'s rows (requests prefilled in a cache of their own) to this batch:
        their KV is copied into this pool once (a prompt's worth), their slot lists renumbered."""
        if other.model is not self.model:
            raise ValueError("add_rows: both caches must belong to the same model")
        held = [p for r in other.rows for p in r.pool]
        if held:
            mine = self._alloc(len(held))
            where = dict(zip(held, mine))
            src = torch.tensor(held, dtype=torch.long, device=self.device)
            dst = torch.tensor(mine, dtype=torch.long, device=self.device)
            for layer, (k, v) in enumerate(other.kv.layers):
                if k is None or v is None:
                    continue
                pk, pv = self.kv._pool(layer, k)
                pk.index_copy_(0, dst.to(pk.device), k.index_select(0, src.to(k.device)))
                pv.index_copy_(0, dst.to(pv.device), v.index_select(0, src.to(v.device)))
            for r in other.rows:
                r.pool = [where[p] for p in r.pool]
        self.rows.extend(other.rows)
        other.rows = []
        self.forwards += other.forwards

    def drop_rows(self, keep_rows: list[int]) -> None:
        """Forget finished requests: their rows leave the batch, their slots go back to the pool."""
        kept = set(keep_rows)
        for i, r in enumerate(self.rows):
            if i not in kept:
                self.free.extend(r.pool)
        self.rows = [self.rows[i] for i in keep_rows]


def resolve_layout(layout: str, num_rows: int) -> str:
    """``DecodeOptions.kv_layout`` made concrete: ``auto`` is paged for several rows, padded for one
    (the serving engine asks for ``paged`` itself: its rows come and go)."""
    if layout == "auto":
        return "paged" if num_rows > 1 else "padded"
    return layout


def new_cache(model, num_rows: int, layout: str = "paged", gqa_attention: bool = False) -> Any:
    """A tree cache in ``layout`` (``DecodeOptions.kv_layout``: ``auto``, ``paged`` or ``padded``)."""
    if resolve_layout(layout, num_rows) == "paged":
        return PagedTreeCache(model, num_rows)
    from apar_spec.decoding.tree_cache import TreeCache

    return TreeCache(model, num_rows, gqa_attention=gqa_attention)
