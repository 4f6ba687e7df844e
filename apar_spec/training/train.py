"""Training: tokenizer, packing of answer trees, and one training loop for all three models.

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
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from apar_spec.answer_tree import AnswerTree
from apar_spec.jsonl import json_objects
from apar_spec.options import TRAINED_DEPTH_KEY
from apar_spec.tokens import CHILD_TOKEN, FORK_TOKEN, AparTokens, add_apar_tokens, find_apar_tokens

IGNORE = -100
PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"

# The prompt format the embedded models are trained with. The chat template below
# renders exactly this string, so `apply_chat_template` and `format_prompt` agree.
PROMPT_FORMAT = "Question: {prompt}\nAnswer:"
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ 'Question: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'Answer:' + message['content'] + eos_token + '\\n' }}"
    "{%- else -%}"
    "{{ message['content'] + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Answer:' }}{%- endif -%}"
)


def format_prompt(prompt: str) -> str:
    """The prompt string the embedded models were trained on: ``Question: p\\nAnswer:``."""
    return PROMPT_FORMAT.format(prompt=prompt)


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer on ``texts``; returns a ``PreTrainedTokenizerFast``.

    Byte-level so any text round-trips; no prefix space, so a child's leading ``" details"``
    tokenises the same whether or not it follows its parent's text. ``<pad>``, ``<eos>``,
    ``[Fork]`` and ``[Child]`` are special (never split, hidden by
    ``skip_special_tokens``). Nothing is added automatically: EOS is appended by the packer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN, FORK_TOKEN, CHILD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[FORK_TOKEN, CHILD_TOKEN],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


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


# --------------------------------------------------------------------------- packing


@dataclass
class PackedExample:
    """One answer tree (or plain answer) laid out as a token tree of ``L`` nodes."""

    input_ids: torch.Tensor  # [L] long
    position_ids: torch.Tensor  # [L] long: depth of each node (prompt starts at 0)
    attention: torch.Tensor  # [L, L] bool: attention[i, j] iff j is i or an ancestor of i
    labels: torch.Tensor  # [L] long: token of node i's successor in its branch, or IGNORE

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def truncate(self, max_len: int) -> "PackedExample":
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


# --------------------------------------------------------------------------- batches and loss


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] long, right-padded with pad_id
    position_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, 1, L, L] bool
    labels: torch.Tensor  # [B, L] long, IGNORE on padding

    def to(self, device) -> "Batch":
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
    """Boolean masks go to SDPA as-is; eager attention *adds* its mask, so it needs 0/-inf."""
    inner = getattr(model, "module", model)  # DDP-wrapped under `accelerate launch`
    impl = getattr(getattr(inner, "config", None), "_attn_implementation", "sdpa")
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def _batch_logits(model, batch: Batch) -> torch.Tensor:
    """Logits of every node of ``batch`` under its tree mask, at least float32. [B, L, V]"""
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=model_attention_mask(batch.attention_mask, model),
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits  # [B, L, V]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the softmax over the vocabulary wants full precision
    return logits


HARD_ROOTS = (None, "forked", "all")  # train(distill_hard_roots=...): see Distill.hard_roots


@dataclass
class Distill:
    """Knowledge distillation from a teacher, mixed into the loss (``train(distill=...)``).

    Why: training on a model's own *greedy* answers with hard labels sharpens it and
    drifts it away from its own distribution on other prompts (measured on SmolLM2: the
    fine-tune's answers to public prompts cost 1.4-1.6x the base's per-token NLL under
    the base; Medusa-2 reports the same for self-distilled data and trains on the
    teacher's distribution instead). At every ordinary node the loss is
    ``(1 - weight) * CE(label) + weight * KL(teacher || student)``. Structural nodes keep
    plain CE, because there the teacher (which never saw ``[Fork]``) has nothing to
    teach: nodes whose label is ``[Fork]``/``[Child]``/EOS or whose input is
    ``[Fork]``/``[Child]`` (a child's first token, a parent's next title after a fork).
    The teacher never proposes the APAR tokens (their columns are masked), so ordinary
    nodes also learn not to fork. ``hard_after`` extends the CE-only zone to the next
    nodes of the same branch (a parent's ``"\n2."`` after a fork, which the teacher,
    seeing a title with no details after it, would rather fill with details). In a
    packed row a branch's nodes are contiguous, so "the next nodes" are the next columns.
    ``hard_roots`` makes whole root branches CE-only (``child_id`` marks where children
    start): ``"forked"`` the roots of examples with forks, where the teacher reads titles
    with no details after them, so it would rather write details and never end, while the
    labels hold the structure (which items, where to fork, where the list ends);
    ``"all"`` every root, answers without a fork too, so only children learn from the
    teacher (the labels keep every fork decision, the teacher a child's wording).
    Measured on SmolLM2 (smollm2-apar card): neither scope kept CE's fork decisions
    (short-answer prompts forked 21-23% against 9% for CE on the same answers), so the
    shipped adapter uses neither.
    """

    weight: float
    teacher: Any  # callable: Batch -> logits [B, L, V_teacher] (V_teacher <= V)
    hard_labels: tuple[int, ...]  # labels that train with CE only
    hard_inputs: tuple[int, ...]  # input tokens whose node trains with CE only
    never: tuple[int, ...]  # token ids the teacher gives no probability
    hard_after: int  # nodes after a hard input that train with CE only too (train's default: 3)
    hard_roots: str | None = None  # None | "forked" | "all": root branches that train with CE only
    child_id: int | None = None  # [Child]: needed by hard_roots


@dataclass
class RootEos:
    """An unlikelihood term against EOS at root nodes whose label goes on (``train(root_eos=...)``).

    Why: every child branch ends with EOS after a paragraph or an item's details, and a
    structured answer has several children but one root, so "EOS after a paragraph" is
    learned many times per example. Roots at the same kind of point pick it up: measured
    on SmolLM2, where pure-KL adapters stopped early on 24-27 of 210 public prompts, at
    the stop point the base gave EOS a median 0.02 and the adapter 0.34. At every root
    node (not under a ``[Child]``) whose label is not EOS, the loss adds
    ``weight * -log(1 - p(EOS))``: about ``weight * p(EOS)`` where EOS is unlikely, so it
    only bites where EOS has become a contender, and it never touches a node whose label
    is EOS. ``child_id`` marks where child branches start in a packed row. With
    ``fork_id`` set, only the root's lead counts: its nodes before its first ``[Fork]``.
    Measured on SmolLM2 (smollm2-apar card): early stops fell from 24 to 15 of 210, but
    forked roots went on past their last item (critical path 211 tokens against 196
    without the term; 210 with the lead only), so the shipped adapter does not use it.
    """

    weight: float
    eos_id: int
    child_id: int
    fork_id: int | None = None


def root_nodes(batch: Batch, child_id: int, fork_id: int | None = None, structured_only: bool = False) -> torch.Tensor:
    """[B, L] bool: labelled nodes of each example's root branch (before its first ``[Child]`` node).

    In a packed row an example is its prompt (labels IGNORE but for its last node), its
    root branch, then its child branches, each opened by a ``[Child]`` input. So a node is
    in a child when a ``[Child]`` input lies between it and the last unlabelled node.
    With ``fork_id``: only the root's nodes before its first ``[Fork]`` input. With
    ``structured_only``: only roots of examples that hold a ``[Child]`` (not the roots of
    answers without a fork); an example starts where its position ids restart at 0.
    """
    at_prompt = batch.labels == IGNORE  # [B, L] prompt nodes and padding start a new count

    def none_since_prompt(token_id: int) -> torch.Tensor:  # [B, L]: no such input since the last unlabelled node
        seen = torch.cumsum((batch.input_ids == token_id).long(), dim=1)  # [B, L]
        return seen == torch.cummax(torch.where(at_prompt, seen, 0), dim=1).values

    roots = none_since_prompt(child_id) & ~at_prompt
    if fork_id is not None:
        roots &= none_since_prompt(fork_id)
    if structured_only:
        example = torch.cumsum((batch.position_ids == 0).long(), dim=1)  # [B, L] example index in its row
        children = torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1] + 1, dtype=torch.long,
                               device=example.device)  # [B, L + 1] [Child] inputs per example index
        children.scatter_add_(1, example, (batch.input_ids == child_id).long())
        roots &= children.gather(1, example) > 0
    return roots


def summed_loss(model, batch: Batch, distill: Distill | None = None, root_eos: RootEos | None = None) -> tuple[torch.Tensor, int]:
    """Token-summed loss over labelled nodes (no shift: labels are per predicting node).

    Plain cross-entropy, or with ``distill`` the CE/KL mix described in :class:`Distill`;
    ``root_eos`` adds the term described in :class:`RootEos`.
    """
    logits = _batch_logits(model, batch)  # [B, L, V]
    plain = distill is None or distill.weight == 0.0
    if plain and (root_eos is None or root_eos.weight == 0.0):
        loss = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss, int((batch.labels != IGNORE).sum())
    keep = batch.labels != IGNORE  # [B, L]
    student = logits[keep]  # [N, V]
    labels = batch.labels[keep]  # [N]
    log_ps = F.log_softmax(student, dim=-1)  # [N, V]
    ce = F.nll_loss(log_ps, labels, reduction="none")  # [N]
    if plain:
        per_node = ce
    else:
        mixed = (1.0 - distill.weight) * ce + distill.weight * _kl(batch, keep, log_ps, distill)  # [N]
        per_node = torch.where(_hard_nodes(batch, keep, labels, distill), ce, mixed)
    if root_eos is not None and root_eos.weight > 0.0:
        goes_on = root_nodes(batch, root_eos.child_id, root_eos.fork_id)[keep] & (labels != root_eos.eos_id)  # [N]
        p_eos = log_ps[:, root_eos.eos_id].exp().clamp(max=1.0 - 1e-6)  # [N]
        per_node = per_node + torch.where(goes_on, -root_eos.weight * torch.log1p(-p_eos), 0.0)
    return per_node.sum(), int(keep.sum())


def _kl(batch: Batch, keep: torch.Tensor, log_ps: torch.Tensor, distill: Distill) -> torch.Tensor:
    """[N] KL(teacher || student) per labelled node; the teacher gives its never-tokens no probability."""
    with torch.no_grad():
        teacher = distill.teacher(batch).to(log_ps.dtype)[keep]  # [N, Vt]
        if teacher.shape[-1] < log_ps.shape[-1]:  # tokens added to the student: the teacher has no row for them
            teacher = F.pad(teacher, (0, log_ps.shape[-1] - teacher.shape[-1]), value=float("-inf"))
        if distill.never:
            teacher[:, list(distill.never)] = float("-inf")
        log_pt = F.log_softmax(teacher, dim=-1)  # [N, V]
    gives = torch.isfinite(log_pt)  # [N, V]; where the teacher gives 0, the term is 0 (not 0 * -inf)
    return torch.where(gives, log_pt.exp() * (log_pt - log_ps), 0.0).sum(-1)  # [N]


def _hard_nodes(batch: Batch, keep: torch.Tensor, labels: torch.Tensor, distill: Distill) -> torch.Tensor:
    """[N] bool: labelled nodes that train with CE only under ``distill`` (see :class:`Distill`)."""
    hard_in = torch.isin(batch.input_ids, torch.tensor(distill.hard_inputs, device=labels.device))  # [B, L]
    zone = hard_in.clone()
    for j in range(1, distill.hard_after + 1):  # the next j columns of the same row
        zone[:, j:] |= hard_in[:, :-j]
    if distill.hard_roots is not None:
        zone |= root_nodes(batch, distill.child_id, structured_only=distill.hard_roots == "forked")
    return torch.isin(labels, torch.tensor(distill.hard_labels, device=labels.device)) | zone[keep]


def adapter_off_teacher(model):
    """The model itself with its (peft) adapter switched off: the base as teacher, no second copy."""
    inner = getattr(model, "module", model)
    if not hasattr(inner, "disable_adapter"):
        raise ValueError("adapter_off_teacher needs a peft model (one whose adapter can be switched off)")

    def run(batch: Batch) -> torch.Tensor:
        with inner.disable_adapter():
            return _batch_logits(inner, batch)

    return run


def model_teacher(teacher):
    """A separate teacher model (its vocabulary may lack the tokens added to the student)."""
    teacher.eval()

    def run(batch: Batch) -> torch.Tensor:
        return _batch_logits(teacher, batch.to(next(teacher.parameters()).device))

    return run


# --------------------------------------------------------------------------- data


@dataclass
class TrainExample:
    """A prompt and its answer tree (a tree without forks is an unstructured answer)."""

    prompt: str
    tree: AnswerTree
    open_end: bool = False  # the answer was cut by a token limit: its main branch trains no EOS

    @property
    def structured(self) -> bool:
        return bool(self.tree.forks)


def _row_to_example(row: Any, mode: str, max_depth: int, where: str) -> TrainExample:
    get = row.get if isinstance(row, dict) else (lambda k, d=None: getattr(row, k, d))
    prompt = get("prompt")
    tree = get("tree")
    answer = get("answer")
    if not isinstance(prompt, str) or (tree is None and not isinstance(answer, str)):
        raise ValueError(f"{where}: a row needs a string 'prompt' and an 'answer' string or a 'tree'")
    if isinstance(tree, dict):
        try:
            tree = AnswerTree.from_dict(tree)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: invalid 'tree' ({e!r})") from None
    open_end = get("open_end", False)
    if not isinstance(open_end, bool):
        raise ValueError(f"{where}: 'open_end' must be true or false, not {open_end!r}")
    if mode == "plain":
        return TrainExample(prompt, AnswerTree(answer if isinstance(answer, str) else tree.reassemble()), open_end)
    if tree is None:
        from apar_spec.restructure import restructure  # raw prompt/answer row: restructure it here

        tree = restructure(answer, max_depth=max_depth)
    return TrainExample(prompt, tree, open_end)


def read_examples(data: str | Path | Iterable[Any], mode: str = "apar", max_depth: int = 1) -> list[TrainExample]:
    """Training examples from a JSONL path or a list of rows (dicts or objects with ``prompt``/``answer``/``tree``).

    ``mode="apar"``: rows with a ``tree`` use it, raw rows are restructured; ``mode="plain"``:
    every answer becomes sequential text (reassembled from the tree if only a tree is given).
    Errors name the file and line, in one line.
    """
    if mode not in ("apar", "plain"):
        raise ValueError(f"mode must be 'apar' or 'plain', not {mode!r}")
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"training data file not found: {path}")
        examples = []
        with path.open(encoding="utf-8") as f:
            for _, where, row in json_objects(path, f, where="{path}:{n}"):
                examples.append(_row_to_example(row, mode, max_depth, where))
        if not examples:
            raise ValueError(f"{path}: no training rows")
        return examples
    examples = [_row_to_example(r, mode, max_depth, f"example {i}") for i, r in enumerate(data)]
    if not examples:
        raise ValueError("no training examples")
    return examples


def prompt_token_ids(prompt: str, tokenizer) -> list[int]:
    """The prompt as the model sees it at inference: its chat template when it has one.

    The embedded models' template renders exactly :func:`format_prompt`; a real instruct
    model (SmolLM2) is trained in its own chat format, as ``apar-spec bench`` prompts it.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    else:
        text = format_prompt(prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pack_example(ex: TrainExample, tokenizer, apar: AparTokens | None) -> PackedExample:
    return pack_tree(prompt_token_ids(ex.prompt, tokenizer), ex.tree, tokenizer, apar, open_end=ex.open_end)


class BatchSchedule:
    """Which examples form the batch of step ``s``: a pure function of (seed, step).

    Each pool (structured / unstructured) is walked in epochs of seeded permutations,
    so a resumed run sees exactly the batches the uninterrupted run would have.
    """

    def __init__(self, pool_sizes: Sequence[int], per_batch: Sequence[int], seed: int, stride: int = 1, offset: int = 0):
        self.pool_sizes, self.per_batch, self.seed = list(pool_sizes), list(per_batch), seed
        self.stride, self.offset = stride, offset  # processes: stride = world size, offset = rank
        self._perms: dict[tuple[int, int], list[int]] = {}

    def _perm(self, pool: int, epoch: int) -> list[int]:
        key = (pool, epoch)
        if key not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + pool * 7919 + epoch)
            self._perms[key] = torch.randperm(self.pool_sizes[pool], generator=g).tolist()
        return self._perms[key]

    def indices(self, step: int) -> list[tuple[int, int]]:
        out = []
        for pool, (n, k) in enumerate(zip(self.pool_sizes, self.per_batch)):
            start = (step * self.stride + self.offset) * k
            for pos in range(start, start + k):
                out.append((pool, self._perm(pool, pos // n)[pos % n]))
        return out


# --------------------------------------------------------------------------- training loop


@dataclass
class TrainReport:
    out_dir: str
    steps: int  # optimizer steps done in total (including those before a resume)
    start_step: int  # 0, or the step a resumed run started from
    final_loss: float  # mean of the per-step losses (per trained token) over the last ~10% of steps
    losses: list[float] = field(default_factory=list)  # per step of this run
    wall_time_s: float = 0.0
    trained_tokens: int = 0
    num_examples: int = 0
    num_structured: int = 0
    num_truncated: int = 0
    num_parameters: int = 0
    fork_depth: int = 0  # deepest fork nesting in the training trees (saved as config.apar_max_depth)


def _resolve_model(model, tokenizer):
    """A loaded model, an HF id / local path, or a config (fresh random init)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        if tokenizer is None:
            raise ValueError("training from a config needs tokenizer=")
        return AutoModelForCausalLM.from_config(model), tokenizer
    if isinstance(model, (str, Path)):
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(str(model))
        return AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32), tokenizer
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    return model, tokenizer


def _save_model(model, tokenizer, out_dir: Path, dtype: torch.dtype | None) -> None:
    """safetensors weights (optionally cast, e.g. bf16 for the embedded models) + tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    to_save = model if dtype is None else copy.deepcopy(model).to(dtype)
    if getattr(to_save, "peft_config", None):  # adapter only: never the (resized, frozen) embedding
        to_save.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
    else:
        to_save.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def train(
    model,
    data,
    out_dir: str | Path,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    mix_ratio: float = 0.5,
    max_len: int = 512,
    resume: bool = False,
    progress: bool = True,
    tokenizer=None,
    mode: str = "apar",
    max_depth: int = 1,
    warmup_steps: int | None = None,
    schedule: str = "cosine",
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    save_every: int = 0,
    checkpoint_dir: str | Path | None = None,
    keep_checkpoint: bool = True,
    save_dtype: torch.dtype | None = None,
    log_every: int = 0,
    mixed_precision: str = "no",
    stop_after: int | None = None,
    share_rows: bool = True,
    distill: float = 0.0,
    teacher=None,
    distill_hard_after: int = 3,
    distill_hard_labels: tuple[int, ...] = (),
    distill_hard_roots: str | None = None,
    root_eos: float = 0.0,
    root_eos_lead_only: bool = False,
) -> TrainReport:
    """Train ``model`` on answer trees (``mode="apar"``) or sequential answers (``mode="plain"``).

    Built on ``accelerate`` so the same code runs on CPU, one GPU, or ``accelerate launch``
    (``batch_size`` is per process). In apar mode each batch holds
    ``round(batch_size * mix_ratio)`` structured examples (trees with forks) and the rest
    unstructured ones, as in the paper's 0.5/0.5 mix; if one pool is empty the other fills
    the batch. Examples longer than ``max_len`` nodes are truncated (a prefix of a
    packed tree is still a tree).

    Resuming: every ``save_every`` steps (and at the end) model weights, optimizer,
    scheduler and step go to ``checkpoint_dir`` (default ``out_dir/checkpoint``);
    ``resume=True`` continues from there. Batches depend only on (seed, step), so a
    resumed run sees the same data as an uninterrupted one. The final model is saved to
    ``out_dir`` with ``save_pretrained`` (safetensors, cast to ``save_dtype`` if given).
    ``stop_after=n`` stops after step ``n`` with a checkpoint and no final model (for
    time-limited jobs, and to test resuming); the schedule still spans ``steps``.
    ``share_rows`` lets short examples share a padded row (same loss, less compute).
    ``distill`` (0..1) mixes a KL term towards ``teacher`` into the loss at ordinary nodes
    (see :class:`Distill`; ``distill_hard_after`` is its ``hard_after``; ``distill_hard_labels``
    are more labels that train with CE only, e.g. the tokens holding a line break, where a
    branch goes on instead of ending; on SmolLM2 that made every forked list well-formed but
    did not cut early stops, see the smollm2-apar card); ``distill_hard_roots`` ("forked" or
    "all") trains those root branches with CE only (:class:`Distill`'s ``hard_roots``). The teacher
    defaults to the model as training starts: for a peft model the same model with its
    adapter off (no copy), otherwise a frozen copy taken before the first step (after the
    ``[Fork]``/``[Child]`` rows are added, before any checkpoint is resumed).
    ``root_eos`` (>= 0) weighs an unlikelihood term against EOS at root nodes that go on
    (see :class:`RootEos`; apar mode only); ``root_eos_lead_only`` keeps it to the root's
    nodes before its first ``[Fork]``.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    if schedule not in ("cosine", "linear"):
        raise ValueError(f"schedule must be 'cosine' or 'linear', not {schedule!r}")
    if not 0.0 <= mix_ratio <= 1.0:
        raise ValueError(f"mix_ratio must be in [0, 1], got {mix_ratio}")
    if not 0.0 <= distill <= 1.0:
        raise ValueError(f"distill must be in [0, 1], got {distill}")
    if root_eos < 0.0:
        raise ValueError(f"root_eos must be >= 0, got {root_eos}")
    if distill_hard_roots not in HARD_ROOTS:
        raise ValueError(f"distill_hard_roots must be one of {', '.join(map(str, HARD_ROOTS))}, got {distill_hard_roots!r}")
    examples = read_examples(data, mode=mode, max_depth=max_depth)  # fail on bad data before loading a model
    out_dir = Path(out_dir)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir / "checkpoint"
    t0 = time.perf_counter()

    set_seed(seed)
    accelerator = Accelerator(mixed_precision=mixed_precision)
    model, tokenizer = _resolve_model(model, tokenizer)
    apar = add_apar_tokens(model, tokenizer) if mode == "apar" else find_apar_tokens(tokenizer)
    fork_depth = max((e.tree.depth() for e in examples), default=0)
    if mode == "apar" and fork_depth >= 1:  # decoding caps fork nesting here (options.model_decode_defaults)
        setattr(model.config, TRAINED_DEPTH_KEY, fork_depth)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    frozen_start = None
    if distill > 0.0 and teacher is None and not hasattr(model, "disable_adapter"):
        frozen_start = copy.deepcopy(model).requires_grad_(False)  # the teacher: the model as it starts

    packed = [pack_example(e, tokenizer, apar) for e in examples]
    num_truncated = sum(len(p) > max_len for p in packed)
    packed = [p.truncate(max_len) for p in packed]
    pools = [[p for p, e in zip(packed, examples) if e.structured], [p for p, e in zip(packed, examples) if not e.structured]]
    n_struct = round(batch_size * mix_ratio)
    per_batch = [n_struct, batch_size - n_struct]
    if not pools[0]:
        per_batch = [0, batch_size]
    if not pools[1]:
        per_batch = [batch_size, 0]
    keep = [i for i in range(2) if per_batch[i] > 0]
    pools, per_batch = [pools[i] for i in keep], [per_batch[i] for i in keep]
    batches = BatchSchedule([len(p) for p in pools], per_batch, seed, accelerator.num_processes, accelerator.process_index)

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]  # all of them, or an adapter's
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
    )
    warmup = warmup_steps if warmup_steps is not None else min(100, max(1, steps // 10))
    make_sched = get_cosine_schedule_with_warmup if schedule == "cosine" else get_linear_schedule_with_warmup
    scheduler = make_sched(optimizer, warmup, steps)

    start_step = 0
    state_file = ckpt_dir / "trainer_state.pt"
    if resume and state_file.is_file():
        from safetensors.torch import load_file

        weights = {}
        for f in sorted(ckpt_dir.glob("*.safetensors")):
            weights.update(load_file(str(f)))
        if getattr(model, "peft_config", None):  # a peft model checkpoints its adapter only
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, weights)
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            if unexpected or not weights:
                raise ValueError(f"checkpoint {ckpt_dir} does not fit the adapter (unexpected {unexpected})")
        else:
            missing, unexpected = model.load_state_dict(weights, strict=False)  # a tied lm_head is stored once
            tied = set(getattr(model, "_tied_weights_keys", None) or [])
            if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
                raise ValueError(f"checkpoint {ckpt_dir} does not fit the model (missing {missing}, unexpected {unexpected})")
        state = torch.load(state_file, weights_only=True)
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError:  # torch names a parameter-group size mismatch; say what to do about it
            raise ValueError(
                f"checkpoint {ckpt_dir} was written for another set of trainable parameters (another "
                "version or setting); delete that folder to start afresh, or resume with the settings that wrote it"
            ) from None
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        accelerator.print(f"resuming from {ckpt_dir} at step {start_step}")

    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    distiller = None
    if distill > 0.0:
        special = (apar.fork_id, apar.child_id) if apar is not None else ()
        if teacher is not None:
            teach = model_teacher(teacher)
        elif frozen_start is not None:
            teach = model_teacher(frozen_start)
        else:
            teach = adapter_off_teacher(model)
        distiller = Distill(
            weight=distill,
            teacher=teach,
            hard_labels=special + (tokenizer.eos_token_id,) + tuple(distill_hard_labels),
            hard_inputs=special,
            never=special,
            hard_after=distill_hard_after,
            hard_roots=distill_hard_roots if mode == "apar" else None,
            child_id=apar.child_id if apar is not None else None,
        )

    ender = None
    if root_eos > 0.0 and mode == "apar":
        ender = RootEos(root_eos, tokenizer.eos_token_id, apar.child_id, apar.fork_id if root_eos_lead_only else None)

    def save_checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _save_model(accelerator.unwrap_model(model), tokenizer, ckpt_dir, None)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step}, state_file)

    losses: list[float] = []
    trained_tokens = 0
    bar = None
    if progress and accelerator.is_main_process:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]train[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
        bar.start()
        task = bar.add_task(str(out_dir.name), total=steps, completed=start_step, loss="-")
    end = steps if stop_after is None else min(steps, stop_after)
    try:
        for step in range(start_step, end):
            chosen = [pools[pool][i] for pool, i in batches.indices(step)]
            batch = collate(chosen, tokenizer.pad_token_id, share_rows=share_rows).to(accelerator.device)
            with accelerator.autocast():
                loss_sum, n_tok = summed_loss(model, batch, distiller, ender)
            loss = loss_sum / max(n_tok, 1)
            accelerator.backward(loss)
            if grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            trained_tokens += n_tok
            if bar is not None:
                bar.update(task, advance=1, loss=f"{losses[-1]:.3f}")
            if log_every and (step + 1) % log_every == 0:
                recent = losses[-log_every:]
                accelerator.print(
                    f"step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                    f"lr {scheduler.get_last_lr()[0]:.2e} {time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
            if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
                save_checkpoint(step + 1)
    finally:
        if bar is not None:
            bar.stop()

    if keep_checkpoint or end < steps:
        save_checkpoint(end)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process and end == steps:
        _save_model(unwrapped, tokenizer, out_dir, save_dtype)
        if not keep_checkpoint and ckpt_dir.is_dir() and ckpt_dir.resolve() != out_dir.resolve():
            shutil.rmtree(ckpt_dir)
    tail = losses[-max(1, len(losses) // 10):] if losses else [math.nan]
    return TrainReport(
        out_dir=str(out_dir),
        steps=end,
        start_step=start_step,
        final_loss=sum(tail) / len(tail),
        losses=losses,
        wall_time_s=time.perf_counter() - t0,
        trained_tokens=trained_tokens,
        num_examples=len(examples),
        num_structured=sum(e.structured for e in examples),
        fork_depth=fork_depth,
        num_truncated=num_truncated,
        num_parameters=sum(p.numel() for p in unwrapped.parameters()),
    )
