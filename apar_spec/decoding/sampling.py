"""The accept phase of one round of speculation: pure tensor functions, no model.

Glossary (the words of ``DESIGN.md``, as they appear in shapes below):

- ``n``: rows, one per active branch (of all requests in the batch).
- ``k``: the longest draft in this round; rows with shorter drafts are padded
  with ``-1`` in ``draft_tokens`` (and anything in ``draft_probs``) past their
  ``draft_lens[i]``. ``k`` may be 0: the round is then plain decoding.
- ``V``: vocabulary size, shared by draft and target (the draft registry refuses
  drafts whose vocabulary differs).
- **draft tokens**: what the speculator proposed for a row, in order.
- **draft probs** ``q``: the (warped) distribution each draft token was sampled
  from; ``None`` for deterministic proposals (n-gram / prompt lookup), which is
  the same as ``q`` being one-hot on the drafted token.
- **target probs** ``p``: the (warped) target distribution at each draft position
  plus one: ``target_probs[i, j]`` predicts the token after the row's pending
  token and its first ``j`` drafts, so position ``draft_lens[i]`` is the one after
  the last draft.
- **accepted**: the longest prefix of a row's drafts the rule confirms.
- **bonus**: the one token the target adds after the accepted ones (a correction
  at the first rejected position, or a fresh token after a fully accepted draft).
  A row therefore always emits ``num_accepted + 1`` tokens (its acceptance length).

Sampling pipeline: ``warp_logits`` (temperature, top-k, top-p) -> ``to_probs`` ->
``sample``. The same ``SamplingConfig`` must warp both draft and target logits:
rejection sampling preserves whatever ``p`` it is given, so ``p`` must be the
distribution plain decoding would sample from.

Acceptance is vectorised the vLLM way: a per-position accept mask, then
``cumprod`` along the draft axis counts the accepted prefix without a Python loop.
All randomness flows through an optional ``torch.Generator`` so a seeded run is
reproducible.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SamplingConfig",
    "warp_logits",
    "to_probs",
    "sample",
    "Acceptance",
    "greedy_accept",
    "rejection_accept",
]


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from logits. The defaults are greedy decoding.

    ``temperature == 0`` means greedy (the limit ``T -> 0`` keeps only the argmax);
    ``top_k == 0`` and ``top_p == 1`` switch those filters off.
    """

    temperature: float = 0.0  # 0 => greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0 => off

    def __post_init__(self) -> None:
        # Written as `not (x >= 0)` so NaN is rejected too.
        if not (self.temperature >= 0) or math.isinf(self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        is_int = isinstance(self.top_k, numbers.Integral) and not isinstance(self.top_k, bool)
        if not is_int or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax (temperature 0)."""
        return self.temperature == 0.0


def _float_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64 (the equality tests run in it); everything else -> float32.

    Half-precision softmax/cumsum is too coarse for top-p boundaries and for the
    ``p/q`` ratios of rejection sampling.
    """
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def warp_logits(
    logits: Tensor,  # [..., V]
    cfg: SamplingConfig,
) -> Tensor:  # [..., V], float32 (float64 if the input is float64)
    """Apply temperature, then top-k, then top-p; filtered entries become ``-inf``.

    The order matters and is the one of HF ``generate`` and vLLM: top-p is
    measured on the distribution left after temperature and top-k. Greedy
    (temperature 0) keeps only the argmax, so ``softmax(warp_logits(x))`` is
    always the distribution ``sample`` should draw from. The argmax always
    survives, so a row that had a finite entry never becomes all ``-inf``.
    Ties at the top-k threshold keep every tied entry (like HF), so a row may
    keep slightly more than ``top_k`` entries when values tie exactly.
    The input is never modified.
    """
    x = logits.to(_float_dtype(logits))  # a copy unless already float32/64
    if x.shape[-1] == 0:
        return x.clone()
    neg_inf = torch.tensor(-math.inf, dtype=x.dtype, device=x.device)

    if cfg.greedy:
        # T -> 0: all mass on the argmax (first index on ties, as torch.argmax).
        keep = torch.zeros_like(x, dtype=torch.bool)
        keep.scatter_(-1, x.argmax(dim=-1, keepdim=True), True)
        return torch.where(keep, x, neg_inf)

    if cfg.temperature != 1.0:
        x = x / cfg.temperature

    vocab = x.shape[-1]
    if 0 < cfg.top_k < vocab:
        kth_largest = x.topk(cfg.top_k, dim=-1).values[..., -1:]  # [..., 1]
        x = torch.where(x < kth_largest, neg_inf, x)

    if cfg.top_p < 1.0:
        sorted_logits, order = x.sort(dim=-1, descending=True)  # [..., V] each
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Mass strictly before each token in descending order; a token is kept iff
        # the set before it has not reached top_p yet. This is the smallest set
        # reaching top_p, and the first (argmax) is always kept since top_p > 0.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [..., V]
        drop_sorted = mass_before >= cfg.top_p
        drop_sorted[..., 0] = False  # guard against rounding in the line above
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocab order
        x = x.masked_fill(drop, -math.inf)
    return x


def to_probs(
    logits: Tensor,  # [..., V]
    cfg: SamplingConfig,
) -> Tensor:  # [..., V], float32 (float64 if the input is float64)
    """The distribution decoding samples from: softmax of ``warp_logits``.

    Greedy gives the exact one-hot of the argmax (not a softmax that could leak
    mass through rounding), so rejection sampling on greedy probabilities reduces
    exactly to greedy acceptance.
    """
    dtype = _float_dtype(logits)
    if cfg.greedy:
        probs = torch.zeros(logits.shape, dtype=dtype, device=logits.device)
        return probs.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return warp_logits(logits, cfg).softmax(dim=-1)


def sample(
    probs: Tensor,  # [n, V] (any leading shape [..., V] works); rows >= 0, not all zero
    generator: torch.Generator | None = None,
) -> Tensor:  # [n] (or [...]) int64 token ids
    """Draw one token per row. Rows need not be normalised (only proportions matter).

    A zero-probability token is never drawn, so one-hot rows give their argmax.
    """
    flat = probs.reshape(-1, probs.shape[-1])  # [N, V]
    if flat.shape[0] == 0:
        return torch.zeros(probs.shape[:-1], dtype=torch.long, device=probs.device)
    tokens = torch.multinomial(flat, num_samples=1, generator=generator)  # [N, 1]
    return tokens.reshape(probs.shape[:-1])


@dataclass
class Acceptance:
    """What the accept phase decided for each row.

    Row ``i`` emits ``draft_tokens[i, :num_accepted[i]]`` followed by ``bonus[i]``:
    ``num_accepted[i] + 1`` tokens, its acceptance length.
    """

    num_accepted: Tensor  # [n] int64, draft tokens accepted per row (0..draft_lens[i])
    bonus: Tensor  # [n] int64, the token the target adds after the accepted ones


def _check_shapes(
    draft_tokens: Tensor,  # [n, k]
    draft_lens: Tensor,  # [n]
    target: Tensor,  # [n, k+1, V]
    target_name: str,
) -> None:
    """Shape checks only: value checks (draft_lens <= k) would force a device sync."""
    if draft_tokens.dim() != 2:
        raise ValueError(f"draft_tokens must be [n, k], got shape {tuple(draft_tokens.shape)}")
    n, k = draft_tokens.shape
    if tuple(draft_lens.shape) != (n,):
        raise ValueError(f"draft_lens must be [n]={n}, got shape {tuple(draft_lens.shape)}")
    if target.dim() != 3 or tuple(target.shape[:2]) != (n, k + 1):
        raise ValueError(f"{target_name} must be [n, k+1, V] = [{n}, {k + 1}, V], got shape {tuple(target.shape)}")


def _accepted_prefix(
    accept: Tensor,  # [n, k] bool, per-position accept decision
    draft_lens: Tensor,  # [n]
) -> Tensor:  # [n] int64
    """Length of the leading run of accepted, real (non-padding) drafts per row."""
    k = accept.shape[1]
    is_draft = torch.arange(k, device=accept.device) < draft_lens[:, None]  # [n, k]
    # cumprod turns the first 0 into a wall: [1, 1, 0, 1] -> [1, 1, 0, 0], sum = 2.
    return (accept & is_draft).long().cumprod(dim=1).sum(dim=1)


def greedy_accept(
    draft_tokens: Tensor,  # [n, k] int64, padded with -1 past draft_lens
    draft_lens: Tensor,  # [n] int64, 0..k
    target_logits: Tensor,  # [n, k+1, V], already masked (e.g. [Child]) by the caller
) -> Acceptance:
    """Greedy rule: accept the longest prefix where draft == argmax(target).

    The bonus is the target's argmax at the first mismatch, or after the last
    draft when all were accepted, so the emitted tokens are exactly what greedy
    decoding of the target would produce.
    """
    _check_shapes(draft_tokens, draft_lens, target_logits, "target_logits")
    k = draft_tokens.shape[1]
    target_tokens = target_logits.argmax(dim=-1)  # [n, k+1]
    matches = draft_tokens == target_tokens[:, :k]  # [n, k]; padding -1 never matches
    num_accepted = _accepted_prefix(matches, draft_lens)  # [n]
    bonus = target_tokens.gather(1, num_accepted[:, None]).squeeze(1)  # [n]
    return Acceptance(num_accepted=num_accepted, bonus=bonus)


def rejection_accept(
    draft_tokens: Tensor,  # [n, k] int64, padded with -1 past draft_lens
    draft_lens: Tensor,  # [n] int64, 0..k
    draft_probs: Tensor | None,  # [n, k, V] q, or None: deterministic proposals (q one-hot)
    target_probs: Tensor,  # [n, k+1, V] p
    generator: torch.Generator | None = None,
) -> Acceptance:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    Emitted tokens are distributed exactly as sampling from ``target_probs`` one
    token at a time, whatever the draft distribution: draft ``d`` at position
    ``j`` is accepted with probability ``min(1, p(d) / q(d))``; at the first
    rejection the bonus is drawn from ``norm(max(p - q, 0))`` (falling back to
    ``p`` if that is all zero, which only rounding can cause); when all
    ``draft_lens[i]`` drafts are accepted it is drawn from
    ``target_probs[i, draft_lens[i]]``. With ``draft_probs=None`` the residual is
    ``p`` without the rejected token, so a rejected token is never re-emitted.

    Randomness: one uniform per draft position (``[n, k]``), then one
    multinomial draw per row, both from ``generator``.
    """
    _check_shapes(draft_tokens, draft_lens, target_probs, "target_probs")
    n, k = draft_tokens.shape
    vocab = target_probs.shape[-1]
    if draft_probs is not None and tuple(draft_probs.shape) != (n, k, vocab):
        raise ValueError(
            f"draft_probs must be [n, k, V] = [{n}, {k}, {vocab}] or None, got shape {tuple(draft_probs.shape)}"
        )
    rows = torch.arange(n, device=target_probs.device)  # [n]
    tokens = draft_tokens.clamp(min=0)  # [n, k]; -1 padding -> a valid index, masked later

    # --- accept/reject every draft position at once ---
    p_draft = target_probs[:, :k].gather(2, tokens[..., None]).squeeze(2)  # [n, k] p(d_j)
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)  # [n, k] q(d_j) = 1
    else:
        q_draft = draft_probs.to(p_draft.dtype).gather(2, tokens[..., None]).squeeze(2)  # [n, k]
    uniform = torch.rand((n, k), generator=generator, dtype=p_draft.dtype, device=p_draft.device)  # [n, k] in [0, 1)
    # u < p/q written without division: q == 0 cannot divide by zero, p == 0 always
    # rejects (u*q >= 0), and q == p > 0 always accepts (u < 1).
    accept = uniform * q_draft < p_draft  # [n, k]
    num_accepted = _accepted_prefix(accept, draft_lens)  # [n]

    # --- bonus: one distribution per row, at position num_accepted ---
    rejected = num_accepted < draft_lens  # [n] True where a draft was rejected
    p_next = target_probs[rows, num_accepted]  # [n, V]
    q_next = torch.zeros_like(p_next)  # [n, V]; rows that accepted everything subtract nothing
    if k > 0:
        at = num_accepted.clamp(max=k - 1)  # [n] a valid draft index even for fully accepted rows
        if draft_probs is None:
            q_next.scatter_(1, tokens[rows, at][:, None], 1.0)  # one-hot on the rejected token
        else:
            q_next = draft_probs[rows, at].to(p_next.dtype)  # [n, V]
        q_next = torch.where(rejected[:, None], q_next, torch.zeros_like(q_next))
    residual = (p_next - q_next).clamp(min=0)  # [n, V]; equals p_next where nothing was rejected
    usable = residual.sum(dim=1, keepdim=True) > 0  # [n, 1]
    bonus = sample(torch.where(usable, residual, p_next), generator=generator)  # [n]
    return Acceptance(num_accepted=num_accepted, bonus=bonus)


def tree_accept_path(
    parents: list[int],  # [N] draft -> parent draft (-1 = the pending token), parents before children
    tokens: list[int],  # [N] draft tokens
    choice: list[int],  # [N+1] the target's token at each fed node: 0 = pending, 1 + i = draft i
) -> list[int]:
    """The longest root-to-leaf path of drafts the target agrees with.

    Starting at the pending token, step to the child whose token equals the target's
    token at the current node, while there is one. ``choice`` is the target's argmax
    (greedy) or a token sampled from the target's distribution at every node; with
    deterministic drafts the latter is exactly sampling from the target, since each
    node's draw is independent of how the walk reached it. Returns the accepted drafts'
    indices, root first; the bonus is ``choice[1 + path[-1]]`` (``choice[0]`` if empty).
    On a chain this is ``greedy_accept``'s longest matching prefix.
    """
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        children.setdefault(p, []).append(i)
    path: list[int] = []
    node = -1
    while True:
        want = choice[node + 1]
        nxt = next((c for c in children.get(node, ()) if tokens[c] == want), None)
        if nxt is None:
            return path
        path.append(nxt)
        node = nxt
