"""Packing: an answer tree as one token sequence with a tree mask and depth position ids; collation.

Why pack a whole tree into ONE sequence: an APAR answer with ``k`` forks is ``1 + k``
branches that share prefixes. The official APAR code writes ``1 + k`` separate causal
examples (each branch after its full context). Packing writes each token once, gives
node ``i`` a *tree mask* (it sees itself and its ancestors only) and ``position_id =
depth``, which is exactly what the tree decoder does at inference time. The loss is the
same token-for-token: :func:`separate_sequences` is the reference formulation and the
tests check the two agree in float64.

Glossary (see DESIGN.md): *node* = one token with a parent; *branch* = a chain of
nodes decoded as one sequence; a branch's ``[Fork]`` spawns a child branch whose
first node is a forced ``[Child]`` hanging under the ``[Fork]`` node.

Labels are stored per *predicting* node (``labels[i]`` = the token that follows node
``i`` in its own branch), because in a packed tree the successor of a node is not
always the next position: a ``[Fork]`` node's successor in its branch comes after the
whole rest of the branch's tokens, and its ``[Child]`` node sits further still. So the
loss is a plain ``cross_entropy(logits, labels)`` with no shift.

Collation right-pads packed examples into a batch with a 4D boolean tree mask and lets
short examples share a row (block-diagonal masks, positions restarting at each prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from apar_spec.decoding.answer_tree import AnswerTree
from apar_spec.decoding.tokens import AparTokens, find_apar_tokens

IGNORE = -100  # label of a node that trains nothing (prompt, [Child], padding): cross_entropy's ignore_index


def segment_token_ids(tree: AnswerTree, tokenizer) -> list[list[int]]:
    """Token ids of each segment of ``tree``'s own text, tokenised separately.

    Separate tokenisation makes every fork offset a token boundary, so the decoder's
    output tokens of a branch are exactly the concatenation of these lists.
    """
    segments = tree.segments()
    nonempty = [s for s in segments if s]
    ids = iter(tokenizer(nonempty, add_special_tokens=False)["input_ids"] if nonempty else [])
    return [next(ids) if s else [] for s in segments]


def branch_token_ids(
    tree: AnswerTree, tokenizer, apar: AparTokens | None, eos: bool = True
) -> tuple[list[int], list[int]]:
    """One branch's own tokens ``seg0 [Fork] seg1 [Fork] ... segK EOS`` and the positions of its ``[Fork]``s.

    ``eos=False`` leaves the EOS off: the branch's text was cut by a token limit, so
    nothing may teach the model to stop there (an open end).
    """
    if tree.forks and apar is None:
        raise ValueError("the answer tree forks but the tokenizer has no [Fork]/[Child] tokens (use add_apar_tokens)")
    tokens: list[int] = []
    fork_positions: list[int] = []
    for k, ids in enumerate(segment_token_ids(tree, tokenizer)):
        tokens.extend(ids)
        if k < len(tree.forks):
            fork_positions.append(len(tokens))
            tokens.append(apar.fork_id)
    if eos:
        tokens.append(tokenizer.eos_token_id)
    return tokens, fork_positions


# --------------------------------------------------------------------------- one example


@dataclass
class PackedExample:
    """One answer tree (or plain answer) laid out as a token tree of ``L`` nodes."""

    input_ids: torch.Tensor  # [L] long
    position_ids: torch.Tensor  # [L] long: depth of each node (prompt starts at 0)
    attention: torch.Tensor  # [L, L] bool: attention[i, j] iff j is i or an ancestor of i
    labels: torch.Tensor  # [L] long: token of node i's successor in its branch, or IGNORE

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def truncate(self, max_len: int) -> PackedExample:
        """The first ``max_len`` nodes. Parents precede children, so a prefix is still a tree."""
        if len(self) <= max_len:
            return self
        n = max_len
        return PackedExample(self.input_ids[:n], self.position_ids[:n], self.attention[:n, :n], self.labels[:n])

    def num_trained(self) -> int:
        return int((self.labels != IGNORE).sum())


class _TreeBuilder:
    """Appends nodes (token, parent) and records per-node labels."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.labels: list[int] = []

    def add(self, token: int, parent: int) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.labels.append(IGNORE)
        return len(self.tokens) - 1

    def add_branch(
        self, tree: AnswerTree, start: int, tokenizer, apar: AparTokens | None, open_end: bool = False
    ) -> None:
        """Append ``tree``'s own tokens under node ``start``, then each child as ``[Child]`` + its branch.

        ``start`` (the last prompt node, or a ``[Child]`` node) is trained to predict the
        branch's first token; every branch node predicts the next one of its own branch.
        ``open_end``: this branch ends without EOS (children, complete blocks, keep theirs).
        """
        tokens, fork_positions = branch_token_ids(tree, tokenizer, apar, eos=not open_end)
        prev = start
        nodes: list[int] = []
        for tok in tokens:
            node = self.add(tok, prev)
            self.labels[prev] = tok
            nodes.append(node)
            prev = node
        for pos, fork in zip(fork_positions, tree.forks):
            child_node = self.add(apar.child_id, nodes[pos])  # [Child] hangs under its [Fork]; no loss on it
            self.add_branch(fork.child, child_node, tokenizer, apar)

    def finish(self) -> PackedExample:
        n = len(self.tokens)
        depth = [0] * n
        attention = np.zeros((n, n), dtype=bool)  # [L, L]; numpy rows copy ~10x faster than torch's
        for i, p in enumerate(self.parents):
            if p >= 0:  # parents always precede: copy the parent's ancestor row, add self
                depth[i] = depth[p] + 1
                attention[i] = attention[p]
            attention[i, i] = True
        return PackedExample(
            input_ids=torch.tensor(self.tokens, dtype=torch.long),
            position_ids=torch.tensor(depth, dtype=torch.long),
            attention=torch.from_numpy(attention),
            labels=torch.tensor(self.labels, dtype=torch.long),
        )


def _prompt_builder(prompt_ids: Sequence[int]) -> _TreeBuilder:
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: the first answer token is predicted from the last prompt token")
    b = _TreeBuilder()
    for i, tok in enumerate(prompt_ids):
        b.add(int(tok), i - 1)
    return b


def pack_tree(
    prompt_ids: Sequence[int], tree: AnswerTree, tokenizer, apar: AparTokens | None, open_end: bool = False
) -> PackedExample:
    """Pack prompt + answer tree into one token tree (each token once).

    Layout: prompt; main branch ``seg0 [Fork] seg1 ... EOS``; then for each fork in
    order ``[Child]`` (parent: that ``[Fork]`` node) + the child's layout, recursively.
    Loss on every branch token incl. ``[Fork]`` and EOS; never on the prompt nor on
    ``[Child]`` (both are inputs only). ``open_end=True`` (the answer was cut by a token
    limit) drops the main branch's EOS: a cut answer must not teach the model to stop
    where its writer would have gone on, the cause of too-short answers after fine-tuning.
    """
    b = _prompt_builder(prompt_ids)
    b.add_branch(tree, len(prompt_ids) - 1, tokenizer, apar, open_end=open_end)
    return b.finish()


def pack_plain(prompt_ids: Sequence[int], answer_text: str, tokenizer) -> PackedExample:
    """An ordinary causal example: prompt + answer + EOS (the AR/base-model format)."""
    return pack_tree(prompt_ids, AnswerTree(answer_text), tokenizer, find_apar_tokens(tokenizer))


def separate_sequences(
    prompt_ids: Sequence[int], tree: AnswerTree, tokenizer, apar: AparTokens | None, open_end: bool = False
) -> list[PackedExample]:
    """Reference formulation: one plain causal sequence per branch (1 + k of them).

    Branch sequence = prompt + every ancestor's tokens up to and including the ``[Fork]``
    that spawned it (with the ancestors' ``[Child]`` nodes) + ``[Child]`` + its own tokens
    + EOS; loss only on its own tokens. The main branch's context is just the prompt.
    """
    out: list[PackedExample] = []

    def visit(context: list[int], branch: AnswerTree) -> None:
        tokens, fork_positions = branch_token_ids(branch, tokenizer, apar, eos=not (open_end and branch is tree))
        b = _TreeBuilder()
        for i, tok in enumerate(context + tokens):
            b.add(tok, i - 1)
        for j, tok in enumerate(tokens):
            b.labels[len(context) - 1 + j] = tok
        out.append(b.finish())
        for pos, fork in zip(fork_positions, branch.forks):
            visit(context + tokens[: pos + 1] + [apar.child_id], fork.child)

    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty")
    visit([int(t) for t in prompt_ids], tree)
    return out


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """Packed examples right-padded into rows, with the tree mask as SDPA takes it."""

    input_ids: torch.Tensor  # [B, L] long, right-padded with pad_id
    position_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, 1, L, L] bool
    labels: torch.Tensor  # [B, L] long, IGNORE on padding

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.position_ids, self.attention_mask, self.labels)))


def first_fit_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into rows of at most ``capacity`` nodes (first-fit decreasing).

    Why: a batch mixes long trees (~300 nodes) with short unstructured answers (~30);
    padding every example to the longest wastes ~40% of the compute. Several examples
    can share a row because the tree mask is block-diagonal between them and position
    ids restart at each prompt, so the loss is unchanged (tested in float64).
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate(examples: Sequence[PackedExample], pad_id: int, multiple_of: int = 8, share_rows: bool = False) -> Batch:
    """Right-pad packed examples into one batch with a 4D boolean tree mask.

    ``share_rows=True`` puts several examples in one row where they fit in the longest
    one's length (see :func:`first_fit_rows`); otherwise one example per row.
    Padding nodes attend only to themselves: a fully masked row would make SDPA
    return NaN, which would leak into the gradients even though its label is ignored.
    """
    lengths = [len(e) for e in examples]
    L = -(-max(lengths) // multiple_of) * multiple_of
    rows = first_fit_rows(lengths, L) if share_rows else [[i] for i in range(len(examples))]
    B = len(rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    mask = torch.eye(L, dtype=torch.bool).repeat(B, 1, 1)  # [B, L, L]
    for b, row in enumerate(rows):
        start = 0
        for i in row:
            e, end = examples[i], start + lengths[i]
            input_ids[b, start:end] = e.input_ids
            position_ids[b, start:end] = e.position_ids
            labels[b, start:end] = e.labels
            mask[b, start:end, start:end] = e.attention  # block-diagonal: examples never see each other
            start = end
    return Batch(input_ids, position_ids, mask[:, None], labels)


def model_attention_mask(mask: torch.Tensor, model) -> torch.Tensor:
    """``mask`` [B, 1, L, L] bool as the model's attention takes it (same shape).

    Boolean masks go to SDPA as-is; eager attention *adds* its mask, so it needs 0/-inf.
    """
    inner = getattr(model, "module", model)  # DDP-wrapped under `accelerate launch`
    impl = getattr(getattr(inner, "config", None), "_attn_implementation", "sdpa")
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask
