"""The NLL judge of the quality pass: how likely the base finds an answer, per token.

Why apart from the pass (``quality.py``): every figure of the NLL ratio (the base's answers,
the APAR answers, the length-matched control, the sibling-blind floor) is scored by this one
function, so they stay comparable; it needs only a model and a tokenizer.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def answer_ids(tokenizer, text: str) -> list[int]:
    """An answer's tokens as the NLL judge reads them (re-tokenised from text)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []


@torch.inference_mode()
def mean_nll(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    texts: list[str],
    batch_size: int = 8,
    max_tokens: Optional[list[int]] = None,
) -> list[float]:
    """Mean per-token NLL of each ``text`` after its prompt, under ``model`` (float32 softmax).

    ``max_tokens[i]``: score only the first that many tokens of ``texts[i]`` (the
    length-matched control: an answer's opening tokens cost more than a long answer's
    later, often repeated, ones, so a short answer has a higher mean NLL by its length alone).
    """
    out: list[float] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(texts), batch_size):
        seqs, spans = [], []
        for i, (p, t) in enumerate(zip(prompt_ids[start : start + batch_size], texts[start : start + batch_size])):
            a = answer_ids(tokenizer, t)
            if max_tokens is not None:
                a = a[: max(0, max_tokens[start + i])]
            seqs.append(list(p) + a)
            spans.append((len(p), len(a)))
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), pad, dtype=torch.long)
        mask = torch.zeros(len(seqs), L, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()  # [B, L, V]
        logp = F.log_softmax(logits, dim=-1)
        for i, (p_len, a_len) in enumerate(spans):
            if a_len == 0:
                out.append(math.nan)
                continue
            target = ids[i, p_len : p_len + a_len].to(logp.device)  # [a]
            lp = logp[i, p_len - 1 : p_len - 1 + a_len].gather(-1, target[:, None])[:, 0]
            out.append(float(-lp.mean()))
    return out
