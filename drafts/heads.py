"""Draft heads: drafting from the target's own hidden state, no extra forward.

Two kinds, both sharing the target's frozen LM head (``heads.json`` ``kind``):

- ``medusa`` (Medusa-1, ``DraftHeads``): head ``i`` guesses the token ``i + 1``
  positions past the pending one from the hidden state alone; described below.
- ``hydra`` (``ChainedHeads``, after Hydra, arXiv 2402.05109): head ``i`` maps (a
  state, the embedding of the token that state chose) to the next state, so every
  draft is conditioned on the tokens drafted before it: the pending token for the
  first draft, a node's own token for its children. Stateless like Medusa (no draft
  KV cache: the chain restarts from the target's hidden state every step), and it
  generalises better (measured on SmolLM2, public prompts: depth-1 top-1 0.29 vs
  0.20 for Medusa heads trained on the same answers).

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
by sampling the target at every node: exactly lossless (``apar_spec.decoding.speculator``).

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

from apar_spec.decoding.draft_tree import chain
from apar_spec.decoding.speculator import BranchView, Outcome, Proposal

from .vocab import DraftVocab

CONFIG = "heads.json"
WEIGHTS = "heads.safetensors"


class DraftHeads(nn.Module):
    """``K`` residual blocks on a ``[..., d]`` hidden state; outputs ``[K, ..., d]`` (apply the LM head after)."""

    kind = "medusa"

    def __init__(self, hidden_size: int, num_heads: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_heads))
        for block in self.blocks:  # Medusa's init: each head starts as the identity (the LM head's own guess)
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    def forward(self, h: torch.Tensor, upto: Optional[int] = None) -> torch.Tensor:  # [..., d] -> [K or upto, ..., d]
        """``upto``: run only the first heads (a shallow draft needs no deeper guesses)."""
        return torch.stack([h + nn.functional.silu(block(h)) for block in self.blocks[:upto]])


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Unit-RMS rows: the hidden state and a token embedding enter a chained head on one scale."""
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)


class ChainedHeads(nn.Module):
    """Hydra-style heads: ``state' = state + W_out SiLU(W_in [rms(state); rms(emb(token))])``.

    ``step(i, state, emb)`` is head ``i``: from the state whose LM-head logits chose a
    token and that token's embedding, the state whose logits guess the next token.
    ``W_out`` starts at zero (the head starts as the identity, like Medusa's).
    """

    kind = "hydra"

    def __init__(self, hidden_size: int, num_heads: int = 3, width: Optional[int] = None):
        super().__init__()
        width = width or hidden_size
        self.inp = nn.ModuleList(nn.Linear(2 * hidden_size, width) for _ in range(num_heads))
        self.out = nn.ModuleList(nn.Linear(width, hidden_size) for _ in range(num_heads))
        for layer in self.out:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def num_heads(self) -> int:
        return len(self.inp)

    @property
    def width(self) -> int:
        return self.inp[0].out_features

    def step(self, i: int, state: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # [..., d], [..., d] -> [..., d]
        return state + self.out[i](nn.functional.silu(self.inp[i](torch.cat([_rms(state), _rms(emb)], dim=-1))))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Teacher-forced chain: ``h`` [B, d] chose token 1, ``emb`` [B, K, d] embeds tokens 1..K;
        returns [K, B, d], state ``i`` guessing token ``i + 2``."""
        states, state = [], h
        for i in range(self.num_heads):
            state = self.step(i, state, emb[:, i])
            states.append(state)
        return torch.stack(states)


def save_heads(heads: DraftHeads | ChainedHeads, out: str | Path, meta: dict) -> None:
    """Write ``heads.safetensors`` + ``heads.json`` (``meta``: target, hidden_size, vocab_size, fingerprint...)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().to(torch.bfloat16).contiguous() for k, v in heads.state_dict().items()}, str(out / WEIGHTS)
    )
    shape = {"kind": heads.kind, "num_heads": heads.num_heads}
    if isinstance(heads, ChainedHeads):
        shape["width"] = heads.width
    (out / CONFIG).write_text(json.dumps({**shape, **meta}, indent=2) + "\n")


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ValueError(
            f"'{path}' holds no draft heads ({CONFIG} + {WEIGHTS}); train some with `apar-spec train-heads`"
        )
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
    raise ValueError(
        f"no draft heads in '{path}' were trained for this target (they fit: {names}); train some with `apar-spec "
        f"train-heads`"
    )


def load_heads(path: str | Path, target, tokenizer=None, name: Optional[str] = None) -> DraftHeads | ChainedHeads:
    """Heads from ``path`` for ``target``, in its dtype and device; refuses a mismatch in one line."""
    from safetensors.torch import load_file

    path = pick_folder(path, target)
    cfg = read_config(path)
    label = name or str(path)
    hidden = target.config.hidden_size
    if cfg.get("hidden_size") != hidden:
        raise ValueError(
            f"draft heads '{label}' were trained for hidden size {cfg.get('hidden_size')} "
            f"(target '{cfg.get('target', '?')}'), this target has {hidden}; train heads for it with `apar-spec "
            f"train-heads`"
        )
    if tokenizer is not None and cfg.get("fingerprint"):
        from apar_spec.drafts.vocab import vocab_fingerprint

        n, fp = vocab_fingerprint(tokenizer)
        if fp != cfg["fingerprint"]:
            raise ValueError(
                f"draft heads '{label}' fit vocabulary {cfg['fingerprint']} ({cfg.get('vocab_size', '?')} tokens), "
                f"the target's is {fp} ({n} tokens); train heads for it with `apar-spec train-heads`"
            )
    kind = cfg.get("kind", "medusa")  # heads written before kinds existed are Medusa heads
    if kind == "medusa":
        heads = DraftHeads(hidden, int(cfg["num_heads"]))
    elif kind == "hydra":
        heads = ChainedHeads(hidden, int(cfg["num_heads"]), int(cfg.get("width") or hidden))
    else:
        raise ValueError(
            f"draft heads '{label}' are of unknown kind '{kind}' (known: medusa, hydra); "
            "upgrade apar-spec or retrain them with `apar-spec train-heads`"
        )
    heads.load_state_dict({k: v.float() for k, v in load_file(str(Path(path) / WEIGHTS)).items()})
    return heads.to(dtype=target.dtype, device=target.device).eval().requires_grad_(False)


class HeadsSpeculator:
    """Per-branch top-k trees from the heads (see the module docstring).

    Medusa heads: every head runs once per branch and a node at depth ``d``, rank ``r``
    takes head ``d - 1``'s rank-``r`` guess. Chained (hydra) heads: the tree grows
    depth by depth; each node with children in the shape is *expanded* once (its state
    and its token through the next head) and its rank-``r`` child is that expansion's
    ``r``-th guess. One batched head call per depth, over every branch."""

    name = "heads"
    needs_hidden = True  # the decoder returns the target's final hidden states with each verify pass

    def __init__(
        self,
        heads: DraftHeads | ChainedHeads,
        lm_head: nn.Module,
        name: Optional[str] = None,
        mask_ids: tuple[int, ...] = (),
        vocab: Optional[DraftVocab] = None,
        embed: Optional[nn.Module] = None,
    ):
        """``vocab``: the heads propose only these token ids, through the target's LM head
        cut to their rows (``drafts/vocab.py``): K heads then cost K x N x d, not K x V x d.
        ``embed``: the target's input embeddings (chained heads read the tokens through them)."""
        if isinstance(heads, ChainedHeads) and embed is None:
            raise ValueError("chained (hydra) draft heads need the target's input embeddings (embed=)")
        self.heads = heads
        self.embed = embed
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
        if isinstance(self.heads, ChainedHeads):
            return self._propose_chained(views, live, tokens, parents)
        K = self.heads.num_heads
        shapes = [views[i].shape for i in live]
        width = max(
            max((s.width(d) for d in range(1, min(s.depth, K) + 1)), default=1) if s is not None else 1 for s in shapes
        )
        need = max(min(s.depth if s is not None else views[i].k, K) for s, i in zip(shapes, live))
        h = torch.stack([views[i].hidden for i in live])  # [m, d]
        top = self._guesses(self.heads(h, upto=need), width)  # [need][m][width]
        self.head_calls += 1
        for row, i in enumerate(live):
            shape, v = shapes[row], views[i]
            if shape is None:  # a plain chain of k
                depth = min(v.k, need)
                tokens[i] = [top[d][row][0] for d in range(depth)]
                parents[i] = list(range(-1, depth - 1))
                continue
            for p, d, r in zip(shape.parents, shape.depths, shape.ranks):
                if d > need:
                    break  # layout order is by depth: every later node is deeper
                tokens[i].append(top[d - 1][row][r])
                parents[i].append(p)
        return Proposal(tokens, [None] * len(views), parents)

    def _guesses(self, states: torch.Tensor, width: int) -> list:
        """Top-``width`` token ids of the LM head on ``states`` [..., d] (masked, vocabulary-mapped),
        as nested lists [...][width]."""
        logits = self.lm_head(states).float()  # [..., V or N]
        if self.vocab is None:
            logits = logits[..., : self.vocab_size]
        if self._masked:
            logits[..., self._masked] = float("-inf")
        top = logits.topk(min(width, logits.shape[-1]), dim=-1).indices  # [..., width]
        if self.vocab is not None:
            top = self.vocab.ids.to(top.device)[top]  # columns -> token ids
        return top.tolist()

    def _propose_chained(
        self, views: list[BranchView], live: list[int], tokens: list[list[int]], parents: list[list[int]]
    ) -> Proposal:
        """Grow each live branch's tree depth by depth (see the class docstring)."""
        K = self.heads.num_heads
        shapes = [views[i].shape if views[i].shape is not None else chain(max(1, views[i].k)) for i in live]
        # the nodes to expand at the next depth: (live row, node index; -1 = the pending token)
        frontier = [(row, -1) for row in range(len(live))]
        state = torch.stack([views[i].hidden for i in live])  # [m, d]: the pending tokens' states
        token = [views[i].tokens[-1] for i in live]
        for depth in range(1, K + 1):
            # expand only the frontier nodes that have children at this depth in their shape
            keep = [
                j
                for j, (row, node) in enumerate(frontier)
                if any(p == node and d == depth for p, d in zip(shapes[row].parents, shapes[row].depths))
            ]
            if not keep:
                break
            s_in = state[keep]  # [E, d]
            t_in = torch.tensor([token[j] for j in keep], device=s_in.device)  # [E]
            new = self.heads.step(depth - 1, s_in, self.embed(t_in).to(s_in.dtype))  # [E, d]
            top = self._guesses(new, max(shapes[frontier[j][0]].width(depth) for j in keep))  # [E][width]
            self.head_calls += 1
            slot = {frontier[j]: e for e, j in enumerate(keep)}  # (row, node) -> its expansion
            frontier, rows_state, token = [], [], []
            for row, i in enumerate(live):
                shape = shapes[row]
                # layout order is by depth, so every node at this depth lands at its own index
                for node, (p, d, r) in enumerate(zip(shape.parents, shape.depths, shape.ranks)):
                    if d == depth:
                        e = slot[(row, p)]
                        tokens[i].append(top[e][r])
                        parents[i].append(p)
                        frontier.append((row, node))
                        rows_state.append(e)
                        token.append(top[e][r])
            state = new[torch.tensor(rows_state, device=new.device)]
        return Proposal(tokens, [None] * len(views), parents)

    def observe(self, outcome: Outcome) -> None:
        pass

    # Serving: the heads keep no per-request state (the hidden state comes with each view).
    def admit(self, indices: list[int]) -> None:
        pass

    def release(self, indices: list[int]) -> None:
        pass
