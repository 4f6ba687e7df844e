"""Train Medusa-1 draft heads on a frozen target, self-distilled from its own answers.

Pipeline (each stage resumable from files in ``out``):

1. **distill** - the target answers every prompt greedily through our own decoder
   (``mode="apar"`` when it has ``[Fork]``/``[Child]``, else ``"ar"``), so the heads
   learn what the target itself writes, forks included (Medusa-1's self-distillation).
   Each branch becomes one plain sequence: its context (prompt + ancestors up to the
   fork + its own tokens), the same tokens the decoder conditions on. Appended to
   ``distill.jsonl`` batch by batch (a restart skips prompts already answered). A data
   row may instead carry its own ``answer`` text; it is then used as given.
2. **features** - one causal forward of the frozen target over every sequence gives
   the final hidden state ``h_t`` at each position; head ``i`` learns ``x_{t+2+i}``
   from ``h_t`` (``h_t``'s LM head already gives ``x_{t+1}``). Positions from the
   node that chose the first answer token on, so prompts are read but never learned.
   Chained (``kind="hydra"``) heads also read the tokens: head ``i`` gets the state
   before it and the embedding of ``x_{t+1+i}``, teacher-forced with the answer's own
   tokens (a deeper draft is only ever kept when the ones above it were right).
3. **train** - AdamW on the heads only (the target, its LM head included, frozen),
   cross-entropy per head weighted ``0.8^i`` (Medusa), through ``accelerate``. With a
   reduced draft vocabulary (``vocab=``, ``drafts/vocab.py``) the softmax runs over
   those N tokens only, as the heads will propose at ``NAME@N`` (EAGLE-3 trains its
   draft on a reduced vocabulary too): on a 49k vocabulary the LM head is nearly all
   of a step, so 8,192 of 49,154 rows cut that work 6x and more steps fit the budget.
   Positions whose token lies outside are not learned (it could never be drafted)
   but still count as misses in the reported accuracy.
   ``train_state.pt`` is written every ``save_every`` steps; a restart resumes there.
   The result is ``heads.safetensors`` + ``heads.json`` (``drafts/heads.py``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

ProgressFn = Callable[[str], None]


@dataclass
class HeadsTrainConfig:
    num_heads: int = 4
    steps: int = 1500
    batch_size: int = 256  # positions per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    decay: float = 0.8  # loss weight of head i is decay**i
    max_new_tokens: int = 256  # per distilled answer
    gen_batch_size: int = 16
    save_every: int = 250
    seed: int = 0
    mode: str = "auto"  # how answers are distilled: "apar", "ar", or "auto" (apar iff the tokenizer has [Fork]/[Child])
    kind: str = "medusa"  # "medusa" (DraftHeads) or "hydra" (ChainedHeads: each head also reads the token before)
    width: int = 0  # hydra: hidden width of each head's MLP (0 = the target's hidden size)

    def __post_init__(self) -> None:
        if self.kind not in ("medusa", "hydra"):
            raise ValueError(f"kind must be medusa or hydra (got '{self.kind}')")
        if self.width < 0:
            raise ValueError(f"width must be >= 0 (got {self.width})")
        if self.num_heads < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("num_heads, steps and batch_size must be >= 1")
        if self.mode not in ("auto", "ar", "apar"):
            raise ValueError(f"mode must be auto, ar or apar (got '{self.mode}')")


def encode(tokenizer, prompt: str) -> list[int]:
    """The prompt as the target was trained to see it (chat template when it has one)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def branch_sequences(gen) -> list[tuple[list[int], int]]:
    """Per branch of a Generation: (its full context, index of its first own token)."""
    out, ctx = [], {}
    for b in gen.branches:  # parents come first
        prefix = (
            gen.prompt_ids
            if b.parent is None
            else ctx[b.parent][: len(ctx[b.parent]) - len(gen.branches[b.parent].token_ids) + b.fork_index + 1]
        )
        ctx[b.id] = list(prefix) + list(b.token_ids)
        out.append((ctx[b.id], len(prefix)))
    return out


def distill(
    model, tokenizer, rows: list[dict], out: Path, cfg: HeadsTrainConfig, progress: ProgressFn
) -> list[tuple[list[int], int]]:
    """Sequences (context, first own index) for every row; cached in ``out/distill.jsonl``."""
    from apar_spec import generate
    from apar_spec.decoding.tokens import find_apar_tokens

    path = out / "distill.jsonl"

    def key(row: dict) -> str:  # answers are cached by what was asked, so a changed data file never mixes them up
        return json.dumps([row["prompt"], row.get("answer")])

    cached: dict[str, list] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a partial last line from an interrupted run: redo that batch
                cached[rec["key"]] = rec["sequences"]
    done: dict[int, list] = {i: cached[key(r)] for i, r in enumerate(rows) if key(r) in cached}
    mode = cfg.mode
    if mode == "auto":
        mode = "apar" if find_apar_tokens(tokenizer) is not None else "ar"
    todo = [i for i in range(len(rows)) if i not in done]
    given_count = sum(1 for i in todo if rows[i].get("answer"))
    if given_count and mode == "apar":
        # easy to miss: the heads then learn plain text, never a branch context ([Child] starts, text after a fork)
        progress(
            f"note: {given_count} rows carry an answer, used as given (one plain sequence each); "
            "give prompts only to distil the target's own APAR branches"
        )
    with path.open("a") as f:
        for start in range(0, len(todo), cfg.gen_batch_size):
            batch = todo[start : start + cfg.gen_batch_size]
            given = [i for i in batch if rows[i].get("answer")]
            asked = [i for i in batch if not rows[i].get("answer")]
            for i in given:
                p = encode(tokenizer, rows[i]["prompt"])
                a = tokenizer(rows[i]["answer"], add_special_tokens=False)["input_ids"]
                done[i] = [[p + a, len(p)]]
                f.write(json.dumps({"key": key(rows[i]), "sequences": done[i]}) + "\n")
            if asked:
                gens = generate(
                    model,
                    tokenizer,
                    [encode(tokenizer, rows[i]["prompt"]) for i in asked],
                    mode=mode,
                    max_new_tokens=cfg.max_new_tokens,
                    batch_size=len(asked),
                )
                for i, g in zip(asked, gens):
                    done[i] = [[s, k] for s, k in branch_sequences(g)]
                    f.write(json.dumps({"key": key(rows[i]), "sequences": done[i]}) + "\n")
            f.flush()
            progress(f"distill {len(done)}/{len(rows)} answers ({mode})")
    return [(s, k) for i in range(len(rows)) for s, k in done[i]]


@dataclass
class Features:
    """One row per learned position ``t`` of the distilled sequences."""

    H: torch.Tensor  # [N, d] the target's final hidden state h_t
    Y: torch.Tensor  # [N, K] the tokens heads must predict, x_{t+2+i} (-100 = past the end)
    X: torch.Tensor  # [N] x_{t+1}, the token h_t itself chose (what a chained head 0 reads)
    seq: torch.Tensor  # [N] index of the sequence the position comes from (for a held-out split)


@torch.inference_mode()
def features(model, sequences: list[tuple[list[int], int]], num_heads: int, chunk: int = 16) -> Features:
    """Hidden states and labels of every position from the node that chose the first answer token on."""
    base = model.get_decoder()
    hs, ys, xs, ss = [], [], [], []
    for start in range(0, len(sequences), chunk):
        part = sequences[start : start + chunk]
        width = max(len(s) for s, _ in part)
        ids = torch.zeros(len(part), width, dtype=torch.long)  # [b, L] right-padded
        mask = torch.zeros(len(part), width, dtype=torch.long)  # [b, L]
        for j, (s, _) in enumerate(part):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        h = (
            base(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).last_hidden_state.float().cpu()
        )  # [b, L, d]
        for j, (s, first) in enumerate(part):
            t = torch.arange(max(first - 1, 0), len(s) - 2)  # positions whose head-0 target exists
            if len(t) == 0:
                continue
            seq = torch.tensor(s + [-100] * (num_heads + 2))
            y = torch.stack([seq[t + 2 + i] for i in range(num_heads)], dim=1)  # [n, K]
            hs.append(h[j, t])
            ys.append(y)
            xs.append(seq[t + 1])
            ss.append(torch.full((len(t),), start + j))
    return Features(torch.cat(hs), torch.cat(ys), torch.cat(xs), torch.cat(ss))


def split_held_out(
    seq: torch.Tensor, g: torch.Generator, every: int = 10, cap: int = 2000
) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation, training) position indices: every ``every``-th *sequence* is held out whole (at
    most ``cap`` of its positions are scored), so the reported accuracy is on answers the heads
    never saw. Positions split at random score answers seen in training (a position's neighbours):
    SmolLM2's Medusa heads read 0.56 top-1 that way, and 0.20 on public prompts."""
    held = (seq % every) == 0
    if held.all() or not held.any():  # too few sequences to hold any out: fall back to a random 10%
        order = torch.randperm(len(seq), generator=g)
        n_val = min(cap, max(1, len(seq) // every))
        return order[:n_val], order[n_val:]
    val = torch.nonzero(held).squeeze(1)
    val = val[torch.randperm(len(val), generator=g)[:cap]]
    return val, torch.nonzero(~held).squeeze(1)


def chain_inputs(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """The tokens chained heads read, teacher-forced: [N, K] = ``x_{t+1}`` then ``Y``'s first K - 1
    columns (full-vocabulary ids; -100 past an answer's end, where the label is -100 too)."""
    return torch.cat([X[:, None], Y[:, :-1]], dim=1)


def head_states(heads, h: torch.Tensor, inputs: Optional[torch.Tensor] = None, embed=None) -> torch.Tensor:
    """[K, B, d] states for the LM head: Medusa heads from ``h`` alone, chained heads from ``h`` and
    the embeddings of ``inputs`` [B, K]."""
    from apar_spec.drafts.heads import ChainedHeads

    if not isinstance(heads, ChainedHeads):
        return heads(h)
    return heads(h, embed(inputs.clamp(min=0)).to(h.dtype))


def heads_loss(
    heads, lm_head, h: torch.Tensor, y: torch.Tensor, decay: float, inputs: Optional[torch.Tensor] = None, embed=None
) -> tuple[torch.Tensor, list[float]]:
    """Weighted cross-entropy over heads: h [B, d], y [B, K] -> (loss, per-head losses)."""
    logits = lm_head(head_states(heads, h, inputs, embed))  # [K, B, V]
    losses = [
        torch.nn.functional.cross_entropy(logits[i].float(), y[:, i], ignore_index=-100) for i in range(logits.shape[0])
    ]
    total = sum((decay**i) * loss for i, loss in enumerate(losses))
    return total, [float(loss.detach()) for loss in losses]


def remap_labels(Y: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Labels ``Y`` (token ids, -100 = none) as columns of a reduced head over ``ids``; outside -> -100."""
    column = torch.full((vocab_size,), -100, dtype=torch.long)
    column[ids] = torch.arange(len(ids))
    return torch.where(Y >= 0, column[Y.clamp(min=0)], torch.full_like(Y, -100))


@torch.no_grad()
def head_accuracy(
    heads,
    lm_head,
    H: torch.Tensor,
    Y: torch.Tensor,
    ids: Optional[torch.Tensor] = None,
    inputs: Optional[torch.Tensor] = None,
    embed=None,
) -> list[float]:
    """Per head: share of positions where its top-1 is the target's token (``Y`` in full-vocabulary
    ids; ``ids``: the reduced head's token of each column, so a token outside it is a miss).
    Chained heads are teacher-forced (``inputs``): head ``i``'s accuracy given heads before it were right."""
    pred = lm_head(head_states(heads, H, inputs, embed)).argmax(-1)  # [K, N]
    if ids is not None:
        pred = ids.to(pred.device)[pred]
    out = []
    for i in range(pred.shape[0]):
        ok = Y[:, i] != -100
        out.append(float((pred[i][ok] == Y[ok, i]).float().mean()) if ok.any() else 0.0)
    return out


def train_heads(
    model,
    tokenizer,
    rows: list[dict],
    out: str | Path,
    cfg: Optional[HeadsTrainConfig] = None,
    target_name: str = "?",
    progress: Optional[ProgressFn] = None,
    vocab=None,
) -> dict:
    """Distill, extract features, train; write heads to ``out``. Returns a small report.

    ``vocab``: a ``drafts.vocab.DraftVocab`` to train against (None = the full head).
    """
    from accelerate import Accelerator
    from apar_spec.drafts.heads import ChainedHeads, DraftHeads, save_heads, target_fingerprint
    from apar_spec.drafts.vocab import vocab_fingerprint

    cfg = cfg or HeadsTrainConfig()
    progress = progress or (lambda msg: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise ValueError("no training prompts: the data file holds no rows")
    t0 = time.perf_counter()
    model.eval().requires_grad_(False)
    sequences = distill(model, tokenizer, rows, out, cfg, progress)
    feats = features(model, sequences, cfg.num_heads)
    H, Y = feats.H, feats.Y
    inputs = chain_inputs(feats.X, Y)  # [N, K] full-vocabulary ids (chained heads read them; Medusa heads ignore them)
    progress(f"features: {H.shape[0]} positions from {len(sequences)} sequences")
    g = torch.Generator().manual_seed(cfg.seed)
    val, tr = split_held_out(feats.seq, g)
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator(cpu=model.device.type == "cpu")
    lm_head = model.get_output_embeddings()
    if cfg.kind == "hydra":
        heads = ChainedHeads(H.shape[1], cfg.num_heads, cfg.width or None).to(device=model.device, dtype=torch.float32)
    else:
        heads = DraftHeads(H.shape[1], cfg.num_heads).to(device=model.device, dtype=torch.float32)
    embed = _float_head(model.get_input_embeddings())  # frozen; only chained heads use it
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    heads, opt = accelerator.prepare(heads, opt)
    head_fp32 = _float_head(lm_head)
    Y_full = Y
    ids = None
    if vocab is not None:
        ids = vocab.ids
        head_fp32 = vocab.head(head_fp32)  # [d] -> [N], float32, frozen
        Y = remap_labels(Y, ids, lm_head.weight.shape[0])
        progress(
            f"reduced vocabulary: {len(ids)} tokens hold "
            f"{float((Y >= 0).sum() / (Y_full >= 0).sum().clamp(min=1)):.1%} "
            "of the heads' targets"
        )
    train_vocab = None if ids is None else int(len(ids))
    state_path = out / "train_state.pt"
    step = 0
    first_val = None
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        if state.get("kind", "medusa") != cfg.kind:
            raise ValueError(
                f"{state_path} holds {state.get('kind', 'medusa')} heads, not {cfg.kind}; "
                "use another output folder or delete it to start over"
            )
        if state.get("train_vocab") != train_vocab:
            raise ValueError(
                f"{state_path} was trained with vocabulary {state.get('train_vocab') or 'full'}, not "
                f"{train_vocab or 'full'}; use another output folder or delete it to start over"
            )
        accelerator.unwrap_model(heads).load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        first_val = state.get("val_loss_start")
        progress(f"resumed at step {step}/{cfg.steps}")
    dev = accelerator.device
    Hv, Yv, Iv = H[val].to(dev), Y[val].to(dev), inputs[val].to(dev)
    if step == 0:
        with torch.no_grad():
            first_val = heads_loss(heads, head_fp32, Hv, Yv, cfg.decay, Iv, embed)[0].item()
    while step < cfg.steps:
        idx = tr[torch.randint(0, len(tr), (cfg.batch_size,), generator=g)]
        loss, per_head = heads_loss(
            heads, head_fp32, H[idx].to(dev), Y[idx].to(dev), cfg.decay, inputs[idx].to(dev), embed
        )
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
        step += 1
        if step % cfg.save_every == 0 or step == cfg.steps:
            torch.save(
                {
                    "heads": accelerator.unwrap_model(heads).state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "val_loss_start": first_val,
                    "train_vocab": train_vocab,
                    "kind": cfg.kind,
                },
                state_path,
            )
            progress(
                f"step {step}/{cfg.steps} loss {loss.item():.3f} per head {', '.join(f'{x:.2f}' for x in per_head)}"
            )
    final = accelerator.unwrap_model(heads)
    with torch.no_grad():
        val_loss = heads_loss(final, head_fp32, Hv, Yv, cfg.decay, Iv, embed)[0].item()
        acc = head_accuracy(final, head_fp32, Hv, Y_full[val].to(dev), ids, Iv, embed)
    n, fp = vocab_fingerprint(tokenizer)
    report = {
        "target": target_name,
        "hidden_size": H.shape[1],
        "vocab_size": n,
        "fingerprint": fp,
        "target_fingerprint": target_fingerprint(model),
        "val_loss_start": first_val,
        "val_loss": val_loss,
        "val_top1_accuracy": acc,
        "positions": int(H.shape[0]),
        "answers": len(rows),
        "steps": cfg.steps,
        "train_vocab": train_vocab,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    save_heads(final, out, report)
    progress(
        f"wrote {out / 'heads.safetensors'}: val loss {val_loss:.3f}, "
        f"top-1 per head {', '.join(f'{a:.2f}' for a in acc)}"
    )
    return report


def _float_head(lm_head):
    """The frozen LM head (or input embedding) in float32 for training (a copy when the target is lower precision)."""
    if lm_head.weight.dtype == torch.float32:
        return lm_head
    import copy

    return copy.deepcopy(lm_head).float().requires_grad_(False)
