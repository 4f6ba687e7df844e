"""A fork router: whether a prompt wants a forked answer at all, read off the prompt's own state.

Why: an APAR model decides where to fork token by token, from the text it is writing. On
short-answer prompts (arithmetic, a fact, a translation, code) that text sometimes looks
like a list or a paragraph opening, and the model forks where the answer wants none
(measured on smollm2-apar: 7 of 70 short-answer public prompts, e.g. "Solve for x in
3x + 10 = 5(x - 2)"). Skeleton-of-Thought routes each question before it decodes (its
"SoT-R" router); here the router is a logistic regression on the target's final hidden
state at the last prompt token - the state the first answer token is chosen from, which
the prefill computes anyway - so routing costs one dot product per request.

A request the router scores under its threshold decodes with ``[Fork]`` disabled: exactly
the model's plain (``ar``) answer. The decision depends only on the prompt and the target,
so it is part of the target's distribution and speculation stays lossless under it.

The router lives in the model's config (``apar_fork_router``: weight, bias, threshold), so
a merged model saved with ``save_pretrained`` keeps it; an APAR adapter carries it as
``router.json`` (``apar_spec.models.adapter``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from apar_spec.inputs import left_pad
from apar_spec.options import is_finite_number

ROUTER_KEY = "apar_fork_router"  # model.config attribute
ROUTER_FILE = "router.json"  # in an adapter folder
# Fit defaults (``fit_router_into``, ``apar-spec fit-router``, smollm2-apar's router). Chosen on
# prompts smollm2-apar's goals are not scored on: at threshold 0.1, a router fitted on its
# training prompts gated 78 of the 81 short draft-distillation prompts (held out: never in the
# adapter's or router's training), 32 of their 716 open ones (stories, poems, letters ...), and
# 2 of the 58 WizardLM questions people labelled as lists (Skeleton-of-Thought's router labels)
# against 70 of the other 160.
DEFAULT_THRESHOLD = 0.1
DEFAULT_L2 = 0.1


@dataclass(frozen=True)
class ForkRouter:
    """``p(list) = sigmoid(weight . h + bias)``, ``h`` the target's final hidden state at the
    last prompt token; a prompt with ``p(list) < threshold`` does not fork."""

    weight: tuple[float, ...]  # [hidden]
    bias: float
    threshold: float

    def p_list(self, hidden: torch.Tensor) -> float:
        """``hidden``: [hidden] (any dtype/device); computed in float32 on the CPU whatever the
        model's dtype and device."""
        h = hidden.detach().to("cpu", torch.float32).reshape(-1)  # [hidden]
        w = torch.tensor(self.weight, dtype=torch.float32)  # [hidden]
        if h.shape != w.shape:
            raise ValueError(f"the fork router expects hidden states of size {w.numel()}, got {h.numel()}; it belongs to another model")
        return float(torch.sigmoid((h * w).sum() + self.bias))

    def to_dict(self) -> dict:
        return {"weight": list(self.weight), "bias": self.bias, "threshold": self.threshold}

    @classmethod
    def from_dict(cls, d, where: str = "fork router") -> "ForkRouter":
        """One-line ``ValueError`` for anything malformed (it comes from a file or a config)."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object with weight, bias and threshold (got {type(d).__name__})")
        w, b, t = d.get("weight"), d.get("bias"), d.get("threshold")
        if not isinstance(w, (list, tuple)) or not w or not all(is_finite_number(x) for x in w):
            raise ValueError(f"{where}: weight must be a non-empty list of finite numbers")
        if not is_finite_number(b):
            raise ValueError(f"{where}: bias must be a finite number (got {b!r})")
        if not is_finite_number(t) or not 0.0 <= t <= 1.0:
            raise ValueError(f"{where}: threshold must be a number in [0, 1] (got {t!r})")
        return cls(tuple(float(x) for x in w), float(b), float(t))


def router_of(model) -> Optional[ForkRouter]:
    """The router a model records in its config, if any (malformed: a one-line ValueError)."""
    raw = getattr(getattr(model, "config", None), ROUTER_KEY, None)
    return None if raw is None else ForkRouter.from_dict(raw, f"model config {ROUTER_KEY}")


def set_router(model, router: Optional[ForkRouter]) -> None:
    setattr(model.config, ROUTER_KEY, None if router is None else router.to_dict())


@torch.inference_mode()
def prompt_states(model, prompts: Sequence[list[int]], batch_size: int = 16, pad_id: int = 0) -> torch.Tensor:
    """The final hidden state at each prompt's last token, [n, hidden] float32 (left-padded batches,
    so the last column is every prompt's last token)."""
    decoder = model.get_decoder()
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start : start + batch_size], pad_id)  # [b, n] each
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [b, n] pads do not shift the prompt's positions
        h = decoder(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                    position_ids=positions.to(model.device)).last_hidden_state  # [b, n, hidden]
        out.append(h[:, -1].float().cpu())
    return torch.cat(out)


def fit_router(states: torch.Tensor, wants_list: Sequence[bool], *, threshold: float, l2: float = DEFAULT_L2) -> ForkRouter:
    """L2-regularised logistic regression of "wants a list / several paragraphs" on ``states``
    [n, hidden]. Features are standardised for the fit (so ``l2`` means the same on any model),
    then folded back into one weight vector and bias."""
    y = torch.tensor([1.0 if v else 0.0 for v in wants_list])  # [n]
    if y.numel() != states.shape[0] or y.min() == y.max():
        raise ValueError("fit_router needs one label per state and both labels present")
    mu, sd = states.mean(0), states.std(0) + 1e-4  # [hidden]
    z = (states - mu) / sd  # [n, hidden]
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = (w.detach() / sd).double()  # [hidden]
    b_raw = float(b.detach().double() - (mu.double() * w_raw).sum())
    return ForkRouter(tuple(w_raw.tolist()), b_raw, float(threshold))


def gate_of(model, fork_gate: Optional[float]) -> Optional[tuple[ForkRouter, float]]:
    """The router and threshold a decode of ``model`` runs under (``DecodeOptions.fork_gate``),
    or None where no request is gated: ``fork_gate`` 0, or None on a model without a router.
    A threshold > 0 on a model without a router is a one-line ValueError."""
    router = router_of(model)
    if fork_gate is None:
        return None if router is None or router.threshold <= 0 else (router, router.threshold)
    if fork_gate <= 0:
        return None
    if router is None:
        raise ValueError(
            f"fork_gate={fork_gate} needs a model with a fork router ({ROUTER_KEY} in its config) and this one has none; "
            "leave fork_gate unset or 0"
        )
    return router, float(fork_gate)


def gate_threshold(model, fork_gate: Optional[float]) -> float:
    """The threshold a decode of ``model`` gates under (0.0: no gate), for reports and rows."""
    routed = gate_of(model, fork_gate)
    return routed[1] if routed is not None else 0.0


@dataclass(frozen=True)
class RouterFit:
    """What ``fit_router_into`` wrote and how it splits the labelled prompts (gated counts)."""

    path: str  # the file the router went into
    prompts: int
    forked: int  # prompts whose training answer forks (the "list" label)
    threshold: float
    l2: float
    gated_forked: int  # of the ``forked`` prompts, how many the router gates (should be few)
    gated_plain: int  # of the others, how many it gates
    check: Optional[dict] = None  # the same counts on held-out data (``check``)


def gated_counts(router: ForkRouter, states: torch.Tensor, wants_list: Sequence[bool]) -> dict:
    """How the router splits labelled prompts: ``gated_forked`` of the ``forked`` ones that want a
    forked answer (should be few) and ``gated_plain`` of the others (should be most)."""
    gated = [router.p_list(h) < router.threshold for h in states]
    return {"prompts": len(gated), "forked": sum(wants_list),
            "gated_forked": sum(g and y for g, y in zip(gated, wants_list)),
            "gated_plain": sum(g and not y for g, y in zip(gated, wants_list))}
