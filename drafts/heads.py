"""Medusa-1 style draft heads: drafting from the target's own hidden state, no extra forward.

``K`` heads, each a residual block ``h + SiLU(W h + b)`` (``d x d``) on the target's
final hidden state ``h``, all sharing the target's frozen LM head, so a head costs
``d^2`` parameters and one ``[d] x [d, V]`` product per branch.

Offsets: the decoder hands each branch the hidden state of the node whose logits
chose its *pending* token (``BranchView.hidden``, from the verify pass that just
ran). The LM head on that state is the target's own next token (the pending one);
head ``i`` predicts the token ``i + 1`` positions further, i.e. the draft at depth
``i + 1`` below the pending token. A tree node at depth ``d`` and rank ``r`` takes
head ``d - 1``'s rank-``r`` candidate (Medusa's cartesian trees): candidates at one
depth do not depend on which sibling path led there. Nodes deeper than ``K`` are
dropped. A new child's first step (its pending token is the forced ``[Child]``, no
hidden state yet) gets no drafts.

Drafts are deterministic (top-k), so under sampling the decoder verifies the tree
by sampling the target at every node: exactly lossless (``apar_spec.speculator``).

Files: ``heads.safetensors`` (``blocks.{i}.weight/bias``) and ``heads.json`` (number
of heads, the target's hidden size, vocabulary size and fingerprint, the target's
name and the measured acceptance). Loading refuses heads made for another hidden
size or vocabulary with a one-line error, before they are used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from apar_spec.speculator import BranchView, Outcome, Proposal

from .vocab import DraftVocab

CONFIG = "heads.json"
WEIGHTS = "heads.safetensors"


class DraftHeads(nn.Module):
    """``K`` residual blocks on a ``[..., d]`` hidden state; outputs ``[K, ..., d]`` (apply the LM head after)."""

    def __init__(self, hidden_size: int, num_heads: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_heads))
        for block in self.blocks:  # Medusa's init: each head starts as the identity (the LM head's own guess)
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [..., d] -> [K, ..., d]
        return torch.stack([h + nn.functional.silu(block(h)) for block in self.blocks])


def save_heads(heads: DraftHeads, out: str | Path, meta: dict) -> None:
    """Write ``heads.safetensors`` + ``heads.json`` (``meta``: target, hidden_size, vocab_size, fingerprint...)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in heads.state_dict().items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps({"num_heads": heads.num_heads, **meta}, indent=2) + "\n")


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ValueError(f"'{path}' holds no draft heads ({CONFIG} + {WEIGHTS}); train some with `apar-spec train-heads`")
    return json.loads((path / CONFIG).read_text())


def target_fingerprint(target) -> str:
    """Short hash of the target's LM head (its first rows, rounded to bfloat16 so fp32/bf16 loads agree)."""
    import hashlib

    w = target.get_output_embeddings().weight[:64].detach().to("cpu", torch.bfloat16).float()
    return hashlib.sha256(w.numpy().tobytes()).hexdigest()[:12]


def pick_folder(path: str | Path, target) -> Path:
    """``path`` itself when it holds heads; else, of its sub-folders holding heads, the one
    trained for this very target (by LM-head fingerprint). One registry name can so serve
    several targets (``tiny-heads``: tiny-apar and tiny-base)."""
    path = Path(path)
    if (path / CONFIG).is_file():
        return path
    subs = sorted(p for p in path.iterdir() if (p / CONFIG).is_file()) if path.is_dir() else []
    if not subs:
        read_config(path)  # raises the one-line "no heads here"
    fp = target_fingerprint(target)
    rows = target.get_output_embeddings().weight.shape[0]
    fits = [s for s in subs if json.loads((s / CONFIG).read_text()).get("target_fingerprint") == fp]
    # an APAR model made from a base shares the base's LM-head rows (smollm2-apar = smollm2
    # + [Fork]/[Child] rows): the vocabulary size tells their heads apart
    same_size = [s for s in fits if json.loads((s / CONFIG).read_text()).get("vocab_size") == rows]
    if same_size or fits:
        return (same_size or fits)[0]
    names = ", ".join(str(json.loads((s / CONFIG).read_text()).get("target", s.name)) for s in subs)
    raise ValueError(f"no draft heads in '{path}' were trained for this target (they fit: {names}); train some with `apar-spec train-heads`")


def load_heads(path: str | Path, target, tokenizer=None, name: Optional[str] = None) -> DraftHeads:
    """Heads from ``path`` for ``target``, in its dtype and device; refuses a mismatch in one line."""
    from safetensors.torch import load_file

    path = pick_folder(path, target)
    cfg = read_config(path)
    label = name or str(path)
    hidden = target.config.hidden_size
    if cfg.get("hidden_size") != hidden:
        raise ValueError(
            f"draft heads '{label}' were trained for hidden size {cfg.get('hidden_size')} "
            f"(target '{cfg.get('target', '?')}'), this target has {hidden}; train heads for it with `apar-spec train-heads`"
        )
    if tokenizer is not None and cfg.get("fingerprint"):
        from apar_spec.drafts.registry import vocab_fingerprint

        n, fp = vocab_fingerprint(tokenizer)
        if fp != cfg["fingerprint"]:
            raise ValueError(
                f"draft heads '{label}' fit vocabulary {cfg['fingerprint']} ({cfg.get('vocab_size', '?')} tokens), "
                f"the target's is {fp} ({n} tokens); train heads for it with `apar-spec train-heads`"
            )
    heads = DraftHeads(hidden, int(cfg["num_heads"]))
    heads.load_state_dict({k: v.float() for k, v in load_file(str(Path(path) / WEIGHTS)).items()})
    return heads.to(dtype=target.dtype, device=target.device).eval().requires_grad_(False)


class HeadsSpeculator:
    """Per-branch top-k trees from the heads (see the module docstring)."""

    name = "heads"
    needs_hidden = True  # the decoder returns the target's final hidden states with each verify pass

    def __init__(self, heads: DraftHeads, lm_head: nn.Module, name: Optional[str] = None, mask_ids: tuple[int, ...] = (),
                 vocab: Optional[DraftVocab] = None):
        """``vocab``: the heads propose only these token ids, through the target's LM head
        cut to their rows (``drafts/vocab.py``): K heads then cost K x N x d, not K x V x d."""
        self.heads = heads
        self.vocab = vocab
        self.lm_head = vocab.head(lm_head) if vocab is not None else lm_head
        if name:
            self.name = name
        self.mask_ids = mask_ids
        self.head_calls = 0  # batched head evaluations (one per step with any drafting branch)

    @property
    def forwards(self) -> int:
        return 0  # no draft-model forward: the heads ride on the verify pass

    def reset(self, num_requests: int, vocab_size: int, generator: Optional[torch.Generator] = None) -> None:
        self.vocab_size = vocab_size
        if self.vocab is None:
            self._masked = list(self.mask_ids)
        else:  # column j is token vocab.ids[j]; ids past the target's vocabulary are never proposed
            self._masked = self.vocab.columns(self.mask_ids) + [
                j for j, t in enumerate(self.vocab.ids.tolist()) if t >= vocab_size
            ]

    @torch.inference_mode()
    def propose(self, views: list[BranchView], sampling=None) -> Proposal:
        tokens: list[list[int]] = [[] for _ in views]
        parents: list[list[int]] = [[] for _ in views]
        live = [i for i, v in enumerate(views) if v.hidden is not None and v.k > 0]
        if not live:
            return Proposal(tokens, [None] * len(views), parents)
        K = self.heads.num_heads
        shapes = [views[i].shape for i in live]
        width = max(max((s.width(d) for d in range(1, min(s.depth, K) + 1)), default=1) if s is not None else 1 for s in shapes)
        h = torch.stack([views[i].hidden for i in live])  # [m, d]
        logits = self.lm_head(self.heads(h)).float()  # [K, m, V or N]
        if self.vocab is None:
            logits = logits[..., : self.vocab_size]
        if self._masked:
            logits[..., self._masked] = float("-inf")
        top = logits.topk(min(width, logits.shape[-1]), dim=-1).indices  # [K, m, width]
        if self.vocab is not None:
            top = self.vocab.ids.to(top.device)[top]  # columns -> token ids
        top = top.tolist()
        self.head_calls += 1
        for row, i in enumerate(live):
            shape, v = shapes[row], views[i]
            if shape is None:  # a plain chain of k
                depth = min(v.k, K)
                tokens[i] = [top[d][row][0] for d in range(depth)]
                parents[i] = list(range(-1, depth - 1))
                continue
            for node, (p, d, r) in enumerate(zip(shape.parents, shape.depths, shape.ranks)):
                if d > K:
                    break  # layout order is by depth: every later node is deeper
                tokens[i].append(top[d - 1][row][r])
                parents[i].append(p)
        return Proposal(tokens, [None] * len(views), parents)

    def observe(self, outcome: Outcome) -> None:
        pass

    # Serving: the heads keep no per-request state (the hidden state comes with each view).
    def admit(self, indices: list[int]) -> None:
        pass

    def release(self, indices: list[int]) -> None:
        pass
