"""The training loss: cross-entropy on packed trees, plus the optional distillation terms.

Why a file of its own: the plain loss is one line, but the two extra terms (a KL towards
a teacher, :class:`Distill`, and an unlikelihood term against early EOS at root nodes,
:class:`RootEos`) each need to know which nodes of a packed row are structural, which
belong to a root branch, and which teacher to ask. That reasoning, and the measurements
behind each switch, is kept next to the code that uses it; the loop in ``train.py``
only calls :func:`summed_loss`.

Every function here takes a collated :class:`~apar_spec.training.packing.Batch`
(``[B, L]`` rows, ``[B, 1, L, L]`` tree mask); ``N`` below is the number of labelled nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from apar_spec.training.packing import IGNORE, Batch, model_attention_mask


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
        children = torch.zeros(
            batch.input_ids.shape[0], batch.input_ids.shape[1] + 1, dtype=torch.long, device=example.device
        )  # [B, L + 1] [Child] inputs per example index
        children.scatter_add_(1, example, (batch.input_ids == child_id).long())
        roots &= children.gather(1, example) > 0
    return roots


def summed_loss(
    model, batch: Batch, distill: Distill | None = None, root_eos: RootEos | None = None
) -> tuple[torch.Tensor, int]:
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
