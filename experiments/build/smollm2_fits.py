"""The two fits on a trained smollm2-apar adapter: the ``[Fork]`` LM-head row and the fork router.

Why apart from the LoRA run (``train_smollm2.py``): both are small convex fits on the frozen
adapted model's hidden states, each its own stage (``--only forkrow``, ``--only router``) that
reruns in minutes without retraining; each merges its figures into ``train.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from apar_spec.experiments.build.smollm2_facts import merge_facts

from apar_spec.models.router import DEFAULT_L2, DEFAULT_THRESHOLD


@torch.no_grad()
def _hidden_and_labels(model, tokenizer, rows: list[dict], apar) -> tuple[torch.Tensor, torch.Tensor]:
    """Final (normed) hidden states of every labelled node of ``rows``' packed trees, and the labels."""
    from apar_spec.decoding.answer_tree import AnswerTree
    from apar_spec.training.data import TrainExample, pack_example
    from apar_spec.training.packing import IGNORE, model_attention_mask

    hs, ls = [], []
    for r in rows:
        tree = AnswerTree.from_dict(r["tree"])
        ex = pack_example(TrainExample(r["prompt"], tree, r.get("open_end", False)), tokenizer, apar).truncate(448)
        out = model.model(
            input_ids=ex.input_ids[None],
            position_ids=ex.position_ids[None],
            attention_mask=model_attention_mask(ex.attention[None, None], model),
            use_cache=False,
        )
        keep = ex.labels != IGNORE
        hs.append(out.last_hidden_state[0][keep].float())  # [n, hidden]
        ls.append(ex.labels[keep])
    return torch.cat(hs), torch.cat(ls)


def _spread(rows: list, n: int) -> list:
    """``n`` rows evenly spaced over ``rows`` (the answer file interleaves prompt kinds by batch)."""
    if n >= len(rows):
        return rows
    return [rows[i * len(rows) // n] for i in range(n)]


def fit_fork_head_row(apar_dir: Path, data: Path, *, examples: int = 96, steps: int = 300, lr: float = 0.05) -> dict:
    """Fit the LM-head row of ``[Fork]`` on frozen hidden states (a one-row logistic regression).

    Why: after a short LoRA run on 2 cores the fine-tuned model ranks ``[Fork]`` high at
    item titles but rarely first (measured: NLL ~5 per ``[Fork]``), because one tied row
    learns slowly at an LR that suits the adapter. With every other weight frozen, the
    best output row for ``[Fork]`` is a convex problem over cached hidden states: full
    cross-entropy over the vocabulary, other logits fixed (their log-sum-exp precomputed).
    The head is untied for that one row, so the input embedding the adapter was trained
    with stays as it was.
    """
    from safetensors.torch import load_file, save_file

    from apar_spec.decoding.tokens import find_apar_tokens
    from apar_spec.models import smollm2

    model, tokenizer = smollm2.load_apar(dtype=torch.float32, folder=apar_dir)
    model.eval()
    apar = find_apar_tokens(tokenizer)
    rows = [json.loads(line) for line in data.open(encoding="utf-8") if line.strip()]
    # spread over the file, so the unforked third holds short answers (where a fork is wrong) too
    structured = _spread([r for r in rows if r["structured"]], examples * 2 // 3)
    plain = _spread([r for r in rows if not r["structured"]], examples // 3)
    h, y = _hidden_and_labels(model, tokenizer, structured + plain, apar)  # [N, H], [N]
    W = model.get_output_embeddings().weight.detach()  # [V, H]
    lse_other = torch.empty(len(h))
    target_logit = torch.empty(len(h))
    for i in range(0, len(h), 512):
        lg = h[i : i + 512] @ W.T  # [n, V]
        lg[:, apar.fork_id] = float("-inf")
        lg[:, apar.child_id] = float("-inf")  # never sampled (the decoder masks it)
        lse_other[i : i + 512] = torch.logsumexp(lg, dim=-1)
        target_logit[i : i + 512] = lg.gather(1, y[i : i + 512, None])[:, 0]
    is_fork = y == apar.fork_id
    tensors = load_file(str(apar_dir / "adapter.safetensors"))
    # start from the tied row the adapter was trained with (not an earlier fit): a rerun repeats the fit
    row = tensors["token_rows"][0].to(W.dtype).clone().requires_grad_(True)
    opt = torch.optim.Adam([row], lr=lr)

    def loss_fn() -> torch.Tensor:
        f = h @ row  # [N]
        lse = torch.logaddexp(lse_other, f)
        return (lse - torch.where(is_fork, f, target_logit)).mean()

    with torch.no_grad():
        before = float(loss_fn())
        fork_nll_before = float((torch.logaddexp(lse_other, h @ row) - h @ row)[is_fork].mean())
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    with torch.no_grad():
        f = h @ row
        lse = torch.logaddexp(lse_other, f)
        after = float((lse - torch.where(is_fork, f, target_logit)).mean())
        fork_nll = float((lse - f)[is_fork].mean())
        fork_top1 = float(
            (
                f[is_fork]
                > (h[is_fork] @ W.T)
                .index_fill(1, torch.tensor([apar.fork_id, apar.child_id]), float("-inf"))
                .max(-1)
                .values
            )
            .float()
            .mean()
        )
        false_fork = float((f[~is_fork] > target_logit[~is_fork]).float().mean())
    head_rows = tensors["token_rows"].clone()
    head_rows[0] = row.detach().to(head_rows.dtype)  # [Fork]; [Child] keeps its tied row
    tensors["lm_head_rows"] = head_rows.contiguous()
    save_file(tensors, str(apar_dir / "adapter.safetensors"))
    facts = {
        "fork_row_fit": {
            "positions": int(len(h)),
            "fork_positions": int(is_fork.sum()),
            "examples": len(structured) + len(plain),
            "loss_before": before,
            "loss_after": after,
            "fork_nll_before": fork_nll_before,
            "fork_nll_after": fork_nll,
            "fork_top1_at_fork_positions": fork_top1,
            "fork_beats_label_elsewhere": false_fork,
            "steps": steps,
            "lr": lr,
        }
    }
    merge_facts(apar_dir / "train.json", facts)
    return facts


# The fork router's threshold and L2 weight: apar_spec.models.router's defaults (chosen there, on
# prompts the goals are not scored on).
ROUTER_THRESHOLD = DEFAULT_THRESHOLD
ROUTER_L2 = DEFAULT_L2


def fit_fork_router(apar_dir: Path, *, threshold: float = ROUTER_THRESHOLD, l2: float = ROUTER_L2) -> dict:
    """Fit the adapter's fork router (``router.json``) on the training prompts' labels.

    The labels are the prompts' own kinds (list-inviting / short-answer,
    ``smollm2_prompts``); the features are the adapted model's final hidden state at each
    prompt's last token in float32 (``apar_spec.models.router``). The held-out figures use the
    draft-distillation prompts, which the adapter never trained on.
    """
    from apar_spec.experiments.build.smollm2_draft_prompts import draft_prompts
    from apar_spec.experiments.build.smollm2_prompts import training_prompts
    from apar_spec.experiments.models import Loaded, encode_prompt

    from apar_spec.models import smollm2
    from apar_spec.models.router import ROUTER_FILE, fit_router, gated_counts, prompt_states

    model, tokenizer = smollm2.load_apar(dtype=torch.float32, folder=apar_dir)
    model.eval()
    loaded = Loaded("smollm2-apar", model, tokenizer)
    pad = tokenizer.pad_token_id or 0

    def states(prompts) -> torch.Tensor:
        return prompt_states(model, [encode_prompt(loaded, p.text) for p in prompts], pad_id=pad)  # [n, hidden]

    train = training_prompts()
    router = fit_router(states(train), [p.kind == "list" for p in train], threshold=threshold, l2=l2)
    held = draft_prompts()
    split = gated_counts(router, states(held), [q.kind == "open" for q in held])  # "open" ones may fork
    short = split["prompts"] - split["forked"]
    (apar_dir / ROUTER_FILE).write_text(json.dumps(router.to_dict()))
    facts = {
        "fork_router": {
            "train_prompts": len(train),
            "list_prompts": sum(p.kind == "list" for p in train),
            "threshold": threshold,
            "l2": l2,
            "held_out_short_gated": f"{split['gated_plain']}/{short}",
            "held_out_open_gated": f"{split['gated_forked']}/{split['forked']}",
        }
    }
    merge_facts(apar_dir / "train.json", facts)
    return facts
