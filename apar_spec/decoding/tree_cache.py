"""One model's KV cache over token trees: the shared machinery of target and draft.

Every request is one *row* of a transformers ``DynamicCache``. A row holds *nodes*
(tokens with a parent) in insertion order; node ``n`` sits in some physical *slot*
of the row. A node may attend to a slot iff that slot holds itself or one of its
ancestors, which gives the 4D boolean mask ``[rows, 1, new_nodes, slots]`` and
``position_ids = depth`` that transformers accepts as-is (a documented public hook).
Forking therefore copies no KV: a child node simply sees its parent's slots.

Bookkeeping per row:

- ``parent[n]``, ``pos[n]``: the tree, append-only (node ids never change);
- ``slot_of[n]``: the node's slot, or -1 while scheduled / after removal;
- ``vis``: ``[slots, slots]`` bool, ``vis[s, t]`` = the node in slot s sees slot t.
  A new node's row is its parent's row plus itself, so building the mask never
  walks the tree. It lives in a buffer with spare capacity (grown by doubling)
  so a step writes only the new rows; invariant: columns at or past the slot
  count are False in every row.

Slots that no live node can see are garbage: nothing ever attends to them, so
they only cost memory. ``compact`` drops them with one gather over the slot axis
of every layer; callers do it lazily (see ``DecodeOptions.compact_threshold``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# Families whose attention takes a custom boolean 4D mask + position_ids unchanged
# and whose cache layers are plain (no sliding window / linear attention). Checked
# on transformers 5.24 (DESIGN.md, "Ground facts"); others are refused, never run wrong.
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2")


class UnsupportedModelError(ValueError):
    """The tree decoder cannot run this model family correctly."""


def check_supported(model) -> None:
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"model family '{model_type}' is not supported by the tree decoder "
            f"(supported: {', '.join(SUPPORTED_FAMILIES)}); use HF generate for it"
        )


def full_attention_cache(model) -> DynamicCache:
    """The model's own ``DynamicCache``, refused unless every layer is plain full attention:
    a sliding-window layer crops keys, which would break slot indexing (both layouts)."""
    cache = DynamicCache(config=model.config)
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in cache.layers})
        raise UnsupportedModelError(
            f"cache layers {kinds} are not plain full-attention layers; the tree decoder "
            "needs them (for a sliding-window model set config.sliding_window=None if the context fits)"
        )
    return cache


# ----------------------------------------------------------------- attention
GQA_ATTENTION = "apar_sdpa_gqa"


def sdpa_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' ``sdpa`` attention, but grouped K/V heads are read in place under a mask.

    Why: given a mask (a tree always has one), transformers' ``sdpa`` copies K and V once
    per query head of each group (``repeat_kv``), because CUDA's fast kernels need that.
    On CPU, torch's SDPA takes the groups directly (``enable_gqa``). Measured on
    SmolLM2-135M (9 query / 3 KV heads, bf16, 2 cores): apar+spec 4-11% faster per
    answer, same tokens. A single query token goes to transformers' own function (it folds
    the groups into the query instead, no copy either), as does anything unusual (no mask,
    a position bias, softcapping, sinks).
    """
    unusual = attention_mask is None or any(
        kwargs.get(k) is not None for k in ("position_bias", "softcap", "s_aux", "sinks")
    )
    if unusual or query.shape[2] == 1 or getattr(module, "num_key_value_groups", 1) == 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    out = torch.nn.functional.scaled_dot_product_attention(  # [batch, heads, q, head_dim]
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None  # [batch, q, heads, head_dim], as transformers returns it


AttentionInterface.register(GQA_ATTENTION, sdpa_gqa_attention)  # the documented way to add an attention function


def uses_gqa_attention(model) -> bool:
    """On CPU, a grouped-query model running transformers' ``sdpa`` takes ``sdpa_gqa_attention``
    for our tree forwards (never on GPU: there a mask with ``enable_gqa`` falls back to the
    slow math kernel)."""
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None)
    return (
        model.device.type == "cpu"
        and getattr(cfg, "_attn_implementation", None) == "sdpa"
        and kv_heads is not None
        and kv_heads != getattr(cfg, "num_attention_heads", kv_heads)
    )


@contextmanager
def tree_attention(model, enabled: bool) -> Iterator[None]:
    """Run the model with ``sdpa_gqa_attention`` inside the block, and give it back its own
    attention afterwards (public ``set_attn_implementation``; ~0.2 ms each way)."""
    if not enabled:
        yield
        return
    model.set_attn_implementation(GQA_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


@dataclass
class _Row:
    parent: list[int] = field(default_factory=list)  # node -> parent node (-1 for a root)
    pos: list[int] = field(default_factory=list)  # node -> position id (depth)
    slot_of: list[int] = field(default_factory=list)  # node -> slot, -1 if not cached
    slot_node: list[int] = field(default_factory=list)  # slot -> node, -1 for padding/garbage
    scheduled: list[tuple[int, int]] = field(default_factory=list)  # (node, token) for the next forward


class NodeScheduler:
    """Scheduling nodes on rows of ``_Row`` bookkeeping: what both cache layouts share
    (``TreeCache`` here, ``PagedTreeCache`` in ``paged_cache.py``); node ids never depend on
    the layout."""

    rows: list[Any]

    def add(self, row: int, token: int, parent: int) -> int:
        """Schedule a node (token under ``parent``; -1 = first prompt token) for the next forward."""
        r = self.rows[row]
        node = len(r.parent)
        r.parent.append(parent)
        r.pos.append(0 if parent < 0 else r.pos[parent] + 1)
        r.slot_of.append(-1)
        r.scheduled.append((node, token))
        return node

    def add_chain(self, row: int, tokens: list[int], parent: int) -> list[int]:
        """Schedule a chain of nodes, each under the previous one."""
        nodes = []
        for t in tokens:
            parent = self.add(row, t, parent)
            nodes.append(parent)
        return nodes


@dataclass
class ForwardResult:
    """Logits of the nodes computed by one forward, addressed by (row, node)."""

    logits: torch.Tensor  # [rows, new_nodes_max, vocab]
    column: list[dict[int, int]]  # per row: node -> column in ``logits``
    attended_keys: list[int]  # per row: sum over its real new nodes of the slots each one attends to
    hidden: Optional[torch.Tensor] = None  # [rows, new_nodes_max, hidden] final hidden states (only if asked)
    # True for a packed forward (``PagedTreeCache``): ``logits`` is ``[1, N, vocab]`` and ``column``
    # holds packed positions, so every row's nodes live in batch entry 0
    packed: bool = False

    def entry(self, row: int) -> int:
        """The batch entry of ``logits``/``hidden`` that holds ``row``'s nodes."""
        return 0 if self.packed else row

    def at(self, row: int, node: int) -> tuple[int, int]:
        """Where ``node`` of ``row`` sits in ``logits``/``hidden``: (batch entry, position)."""
        return self.entry(row), self.column[row][node]

    def of(self, row: int, nodes: list[int]) -> torch.Tensor:
        """Logits of ``nodes`` of ``row``: ``[len(nodes), vocab]``."""
        cols = [self.column[row][n] for n in nodes]
        return self.logits[self.entry(row), cols]


class TreeCache(NodeScheduler):
    """KV cache of one model for ``num_rows`` token trees (one per request), padded: the plain
    reference layout (``PagedTreeCache`` in ``paged_cache.py`` is the one without padding)."""

    packed = False

    def __init__(self, model, num_rows: int, gqa_attention: bool = False):
        """``gqa_attention``: run multi-token forwards through ``sdpa_gqa_attention`` where it
        applies (``uses_gqa_attention``). The decoder asks for it for the target; a small draft
        model gains less than the switch costs (~0.4 ms a forward), so it does not."""
        check_supported(model)
        self.model = model
        self.device = model.device
        self.rows = [_Row() for _ in range(num_rows)]
        self.cache = full_attention_cache(model)
        self._vis = torch.zeros(num_rows, 64, 64, dtype=torch.bool, device=self.device)  # [rows, capacity, capacity]
        self._n = 0  # slots in use (the same for every row; short rows hold padding)
        self.forwards = 0
        self.gqa = gqa_attention and uses_gqa_attention(model)

    # ----------------------------------------------------------------- nodes
    @property
    def num_slots(self) -> int:
        return self._n

    @property
    def physical_slots(self) -> int:
        """What the cache tensors hold: every row as wide as the longest (padding, dead slots)."""
        return len(self.rows) * self._n

    def held_by(self, row: int) -> int:
        """Slots of ``row`` that hold a node (its share of the padding is not counted)."""
        return sum(n >= 0 for n in self.rows[row].slot_node)

    def compaction_due(self, live_counts: list[int], threshold: float) -> bool:
        """Compact when the slots no row needs reach ``threshold`` of the slot axis (a
        compaction gathers the whole cache, so it waits for enough garbage)."""
        garbage = self._n - max(live_counts, default=0)
        return garbage > 0 and garbage >= threshold * self._n

    @property
    def vis(self) -> torch.Tensor:
        return self._vis[:, : self._n, : self._n]  # [rows, slots, slots]

    @property
    def kv_layers(self) -> list[Any]:
        """The cache's layers (``DynamicLayer``s, checked at construction: ``keys``/``values`` are
        ``[rows, kv_heads, slots, head_dim]``)."""
        return list(self.cache.layers)

    def _ensure_capacity(self, total: int) -> None:
        cap = self._vis.shape[1]
        if total <= cap:
            return
        new_cap = max(total, 2 * cap)
        grown = torch.zeros(len(self.rows), new_cap, new_cap, dtype=torch.bool, device=self.device)
        grown[:, : self._n, : self._n] = self.vis
        self._vis = grown

    # --------------------------------------------------------------- forward
    @torch.inference_mode()
    def forward(self, hidden: bool = False, head: Optional[torch.nn.Module] = None) -> ForwardResult:
        """Run ONE model forward over every scheduled node of every row.

        ``hidden=True`` also returns the final hidden states (for draft heads): the
        forward is then split into the public base model (``get_decoder()``) and the
        LM head (``get_output_embeddings()``), exactly what ``model()`` computes.
        ``head``: an LM head used instead of the model's own (a draft's reduced
        vocabulary, ``drafts/vocab.py``); the logits then have its width.
        """
        n_new = max(len(r.scheduled) for r in self.rows)
        if n_new == 0:
            raise RuntimeError("forward() with no scheduled nodes")
        n_rows, old = len(self.rows), self.num_slots
        total = old + n_new
        input_ids = torch.zeros(n_rows, n_new, dtype=torch.long)  # [rows, new]
        position_ids = torch.zeros(n_rows, n_new, dtype=torch.long)  # [rows, new]
        self._ensure_capacity(total)
        vis = self._vis  # [rows, capacity, capacity]
        vis[:, old:total].zero_()  # rows left over from before a compaction
        column: list[dict[int, int]] = []
        for i, r in enumerate(self.rows):
            cols: dict[int, int] = {}
            for j, (node, token) in enumerate(r.scheduled):
                slot = old + j
                parent = r.parent[node]
                if parent >= 0:
                    parent_slot = r.slot_of[parent]
                    if parent_slot < 0:
                        raise RuntimeError(f"node {node}'s parent {parent} is neither cached nor scheduled before it")
                    vis[i, slot] = vis[i, parent_slot]
                vis[i, slot, slot] = True
                r.slot_of[node] = slot
                cols[node] = j
                input_ids[i, j] = token
                position_ids[i, j] = r.pos[node]
            for j in range(len(r.scheduled), n_new):  # padding nodes see only themselves
                vis[i, old + j, old + j] = True
            r.slot_node.extend([n for n, _ in r.scheduled] + [-1] * (n_new - len(r.scheduled)))
            column.append(cols)
        mask = vis[:, None, old:total, :total]  # [rows, 1, new, slots'] the new nodes' rows of the visibility matrix
        # padding nodes see one slot (themselves): subtract them; one device sync for all rows
        sums = vis[:, old:total, :total].sum(dim=(1, 2)).tolist()
        attended = [int(t) - (n_new - len(r.scheduled)) for t, r in zip(sums, self.rows)]
        inputs = dict(
            input_ids=input_ids.to(self.device),
            attention_mask=mask,
            position_ids=position_ids.to(self.device),
            cache=self.cache,
            use_cache=True,
        )
        states = None
        with tree_attention(self.model, self.gqa and n_new > 1):  # one query token: nothing to gain
            if hidden or head is not None:
                states = self.model.get_decoder()(**inputs).last_hidden_state  # [rows, new, hidden]
                logits = (head or self.model.get_output_embeddings())(states)  # [rows, new, vocab or head width]
                if not hidden:
                    states = None
            else:
                logits = self.model(**inputs).logits  # [rows, new, vocab]
        self._n = total
        for r in self.rows:
            r.scheduled = []
        self.forwards += 1
        return ForwardResult(logits, column, attended, states)

    # --------------------------------------------------------------- garbage
    def garbage(self, live: list[set[int]]) -> int:
        """Slots that hold no live node, in the row that keeps most (what a compaction frees)."""
        return self.num_slots - max((len(nodes) for nodes in live), default=0)

    @torch.inference_mode()
    def compact(self, live: list[set[int]]) -> None:
        """Keep only the slots of ``live[row]`` nodes (one gather over the slot axis).

        Slots keep their relative order, so ancestors stay before descendants.
        Rows with fewer live slots are padded with slot 0, marked as garbage and
        made invisible to everything.
        """
        keep = [sorted(self.rows[i].slot_of[n] for n in nodes) for i, nodes in enumerate(live)]
        width = max((len(k) for k in keep), default=0)
        index = torch.zeros(len(self.rows), width, dtype=torch.long)  # [rows, kept]
        valid = torch.zeros(len(self.rows), width, dtype=torch.bool)  # [rows, kept]
        for i, k in enumerate(keep):
            index[i, : len(k)] = torch.tensor(k, dtype=torch.long)
            valid[i, : len(k)] = True
        index, valid = index.to(self.device), valid.to(self.device)
        for layer in self.kv_layers:
            if layer.keys is None or layer.keys.numel() == 0:
                continue
            b, h, _, d = layer.keys.shape  # [rows, kv_heads, slots, head_dim]
            gather = index[:, None, :, None].expand(b, h, width, d).to(layer.keys.device)  # device_map may split layers
            layer.keys = layer.keys.gather(2, gather)
            layer.values = layer.values.gather(2, gather)
        vis = self.vis.gather(1, index[:, :, None].expand(-1, -1, self.num_slots))  # [rows, kept, slots]
        vis = vis.gather(2, index[:, None, :].expand(-1, width, -1))  # [rows, kept, kept]
        self._vis[:, :width, :width] = vis & valid[:, :, None] & valid[:, None, :]
        self._vis[:, :width, width:] = False  # keep the invariant: no row sees past the slot count
        self._n = width
        for r, k in zip(self.rows, keep):
            kept_nodes = [r.slot_node[s] for s in k]
            r.slot_of = [-1] * len(r.slot_of)
            r.slot_node = kept_nodes + [-1] * (width - len(k))
            for new_slot, node in enumerate(kept_nodes):
                r.slot_of[node] = new_slot

    # ----------------------------------------------------------------- rows
    def _pad_slots(self, n: int) -> None:
        """Grow the slot axis to ``n`` with padding slots: zero KV, no node, seen by nobody."""
        extra = n - self._n
        if extra <= 0:
            return
        for layer in self.kv_layers:
            if layer.keys is not None and layer.keys.dim() == 4:
                pad = layer.keys.new_zeros(layer.keys.shape[0], layer.keys.shape[1], extra, layer.keys.shape[3])
                layer.keys = torch.cat([layer.keys, pad], dim=2)
                layer.values = torch.cat([layer.values, pad.to(layer.values.dtype)], dim=2)
        self._ensure_capacity(n)
        self._vis[:, self._n : n] = False  # rows left over from before a compaction
        for r in self.rows:
            r.slot_node.extend([-1] * extra)
        self._n = n

    @torch.inference_mode()
    def add_rows(self, other: TreeCache) -> None:
        """Append ``other``'s rows (requests prefilled in a cache of their own) to this batch.

        Why a merge and not a prefill in place: prefilling new prompts inside the running
        batch would pad every running row to the prompts' length in that forward. Both
        caches are padded along the slot axis to the longer one; a row only ever sees its
        own slots (the mask is per row), so the padding is invisible to everyone.
        """
        if other.model is not self.model:
            raise ValueError("add_rows: both caches must belong to the same model")
        n = max(self._n, other._n)
        self._pad_slots(n)
        other._pad_slots(n)
        n_self, n_other = len(self.rows), len(other.rows)
        for mine, theirs in zip(self.kv_layers, other.kv_layers):
            a = mine.keys if mine.keys is not None and mine.keys.dim() == 4 else None
            b = theirs.keys if theirs.keys is not None and theirs.keys.dim() == 4 else None
            if a is None and b is None:
                continue  # no slots on either side yet
            like = a if a is not None else b  # [rows, kv_heads, slots, head_dim]
            keys, values = [], []
            for layer, kv, rows in ((mine, a, n_self), (theirs, b, n_other)):
                if kv is None:  # this side has no KV yet: zeros (its rows have no slots)
                    zeros = like.new_zeros(rows, like.shape[1], n, like.shape[3])
                    keys.append(zeros)
                    values.append(zeros)
                else:
                    keys.append(layer.keys)
                    values.append(layer.values)
            mine.keys = torch.cat(keys, dim=0)  # [rows + new rows, kv_heads, slots, head_dim]
            mine.values = torch.cat(values, dim=0)
            if not mine.is_initialized:
                mine.is_initialized, mine.device = True, like.device
        cap = max(self._vis.shape[1], other._vis.shape[1], 64)
        vis = torch.zeros(
            n_self + n_other, cap, cap, dtype=torch.bool, device=self.device
        )  # [rows, capacity, capacity]
        vis[:n_self, :n, :n] = self._vis[:, :n, :n]
        vis[n_self:, :n, :n] = other._vis[:, :n, :n]
        self._vis = vis
        self.rows.extend(other.rows)
        self.forwards += other.forwards

    @torch.inference_mode()
    def drop_rows(self, keep_rows: list[int]) -> None:
        """Forget finished requests: their rows leave the batch (and the cache)."""
        index = torch.tensor(keep_rows, dtype=torch.long, device=self.device)
        for layer in self.kv_layers:
            if layer.keys is not None and layer.keys.numel() > 0:
                at = index.to(layer.keys.device)  # device_map may split layers over devices
                layer.keys = layer.keys.index_select(0, at)
                layer.values = layer.values.index_select(0, at)
        self._vis = self._vis.index_select(0, index)
        self.rows = [self.rows[i] for i in keep_rows]
