"""The slow, obviously-correct reference for the tree decoder (greedy only).

Every branch is decoded as its own plain sequence - prompt + its ancestors'
tokens up to the fork + its own tokens - with an ordinary causal forward over
the whole sequence at every token (no cache, no tree mask). Branches are
decoded one after another, depth-first. The fork rules are written out here
again on purpose: this file must not share logic with the fast path it checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from apar_spec.options import DecodeOptions
from apar_spec.tokens import AparTokens


@dataclass
class RefBranch:
    path: tuple[int, ...]  # fork indices from the root: () for the root, (i,) for the child at root token i, ...
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # raw logits that predicted each sampled token


@torch.inference_mode()
def reference_decode(
    model, prompt: list[int], opts: DecodeOptions, apar: Optional[AparTokens], fork_enabled: bool, eos_ids: set[int]
) -> dict[tuple[int, ...], RefBranch]:
    """All branches of one request, keyed by their fork path."""
    cap = opts.max_branch_tokens or opts.max_new_tokens
    out: dict[tuple[int, ...], RefBranch] = {}

    def in_code(answer: list[int]) -> bool:
        """An odd number of ``` in the answer text so far (tokens without a backtick read as "x")."""
        return "".join(apar.backtick_texts.get(t, "x") for t in answer).count("```") % 2 == 1

    def run(path: tuple[int, ...], context: list[int], first: list[int], level: int) -> None:
        b = RefBranch(path, tokens=list(first))
        out[path] = b
        forks = 0
        while True:
            seq = context + b.tokens
            logits = model(torch.tensor([seq], device=model.device)).logits[0, -1]  # [V]
            b.logits.append(logits)
            processed = logits.clone()
            if opts.logits_processor is not None:
                processed = opts.logits_processor(seq, processed)
            if apar is not None:
                processed[apar.child_id] = float("-inf")
                generated = len(b.tokens) - len(first)
                ends_child = level > 0 and level >= opts.max_depth and opts.depth_cap == "end"
                allowed = (
                    fork_enabled
                    and seq[-1] not in (apar.fork_id, apar.child_id)
                    and (level < opts.max_depth or ends_child)
                    and forks < opts.max_forks_per_branch
                    and cap - generated > 1
                    and (opts.fork_in_code or not in_code(seq[len(prompt) :]))
                )
                if not allowed:
                    processed[apar.fork_id] = float("-inf")
                elif level < opts.max_depth:  # the offset applies where a fork spawns a child, not where it ends one
                    processed[apar.fork_id] += opts.fork_bias
            tok = int(processed.argmax())
            b.tokens.append(tok)
            if apar is not None and tok == apar.fork_id and level > 0 and level >= opts.max_depth:
                # a child at the depth cap asked to fork: it ends, minus the line it had begun
                breaks = [i for i, t in enumerate(b.tokens[:-1]) if t in apar.line_break_ids and i >= len(first)]
                while len(breaks) > 1 and breaks[-2] == breaks[-1] - 1:  # a run of line breaks goes whole
                    breaks.pop()
                b.tokens = b.tokens[: breaks[-1]] if breaks else b.tokens[:-1]
                b.logits = b.logits[: len(b.tokens) - len(first)]
                return
            if apar is not None and tok == apar.fork_id:
                forks += 1
                run(path + (len(b.tokens) - 1,), context + b.tokens, [apar.child_id], level + 1)
            if tok in eos_ids or len(b.tokens) - len(first) >= cap:
                return

    run((), list(prompt), [], 0)
    return out
