"""The slow, obviously-correct reference for the tree decoder (greedy only).

Every branch is decoded as its own plain sequence - prompt + its ancestors'
tokens up to the fork + its own tokens - with an ordinary causal forward over
the whole sequence at every token (no cache, no tree mask). Branches are
decoded one after another, depth-first. The fork rules are written out here
again on purpose: this file must not share logic with the fast path it checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from apar_spec.decoding.tokens import AparTokens
from apar_spec.options import DecodeOptions


@dataclass
class RefBranch:
    path: tuple[int, ...]  # fork indices from the root: () for the root, (i,) for the child at root token i, ...
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # raw logits that predicted each sampled token
    # every sampled token in order, those a finish rule cut included ([Child] first for a child)
    uncut: list[int] = field(default_factory=list)
    uncut_logits: list[torch.Tensor] = field(default_factory=list)


@torch.inference_mode()
def reference_decode(
    model, prompt: list[int], opts: DecodeOptions, apar: Optional[AparTokens], fork_enabled: bool, eos_ids: set[int]
) -> dict[tuple[int, ...], RefBranch]:
    """All branches of one request, keyed by their fork path."""
    cap = opts.max_branch_tokens or opts.max_new_tokens
    out: dict[tuple[int, ...], RefBranch] = {}

    # The fork router, read from the config and applied here by hand: a prompt it scores
    # under the threshold gets no fork at all.
    raw = getattr(model.config, "apar_fork_router", None)
    threshold = opts.fork_gate if opts.fork_gate is not None else (raw or {}).get("threshold", 0.0)
    if fork_enabled and raw is not None and threshold > 0:
        h = model.get_decoder()(torch.tensor([prompt], device=model.device)).last_hidden_state[0, -1]  # [hidden]
        z = float(torch.dot(h.float().cpu(), torch.tensor(raw["weight"], dtype=torch.float32))) + raw["bias"]
        if 1.0 / (1.0 + math.exp(-z)) < threshold:
            fork_enabled = False

    def norm(title: str) -> Optional[str]:
        """A title without its item number/bullet, emphasis, closing colon, case, extra spaces."""
        t = title.strip()
        bullets = len(t) - len(t.lstrip("-*+•#>"))
        digits = len(t) - len(t.lstrip("0123456789"))
        if bullets:
            t = t[bullets:]
        elif 1 <= digits <= 3 and t[digits : digits + 1] in (".", ")"):
            t = t[digits + 1 :]
        words = t.replace("*", " ").replace("_", " ").split()
        t = " ".join(words).rstrip(":").strip().lower()
        return t if any(c.isalnum() for c in t) else None

    def repeated(own: list[int]) -> bool:
        """The branch's own tokens end in a spawning [Fork] whose title it forked after
        earlier in the same run of forked lines (walked line by line, newest first)."""
        if opts.repeated_title != "end" or not apar.token_texts:
            return False
        lines: list[list[str]] = [[""]]  # per line, its segments; a [Fork] closes a segment
        for t in own[:-1]:
            if t == apar.fork_id:
                lines[-1].append("")
                continue
            for ch in apar.token_texts[t]:
                if ch == "\n":
                    lines.append([""])
                else:
                    lines[-1][-1] += ch
        new = norm(lines[-1][-1])
        earlier = set(lines[-1][:-1])
        for segments in lines[-2::-1]:
            if len(segments) == 1 and segments[0].strip():
                break
            earlier.update(segments[:-1])
        return new is not None and new in {norm(e) for e in earlier}

    def in_code(answer: list[int]) -> bool:
        """An odd number of ``` in the answer text so far (tokens without a backtick read as "x")."""
        return "".join(apar.backtick_texts.get(t, "x") for t in answer).count("```") % 2 == 1

    def run(path: tuple[int, ...], context: list[int], first: list[int], level: int) -> None:
        b = RefBranch(path, tokens=list(first), uncut=list(first))
        out[path] = b
        forks = 0
        while True:
            seq = context + b.tokens
            logits = model(torch.tensor([seq], device=model.device)).logits[0, -1]  # [V]
            b.logits.append(logits)
            b.uncut_logits.append(logits)
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
            b.uncut.append(tok)
            if apar is not None and tok == apar.fork_id and level > 0 and level >= opts.max_depth:
                # a child at the depth cap asked to fork: it ends, minus the line it had begun
                breaks = [i for i, t in enumerate(b.tokens[:-1]) if t in apar.line_break_ids and i >= len(first)]
                while len(breaks) > 1 and breaks[-2] == breaks[-1] - 1:  # a run of line breaks goes whole
                    breaks.pop()
                b.tokens = b.tokens[: breaks[-1]] if breaks else b.tokens[:-1]
                b.logits = b.logits[: len(b.tokens) - len(first)]
                return
            if apar is not None and tok == apar.fork_id and repeated(b.tokens[len(first) :]):
                # a fork after a title this run already forked after: the branch ends, minus that segment
                cut = len(b.tokens) - 1
                while (
                    cut > len(first)
                    and b.tokens[cut - 1] != apar.fork_id
                    and b.tokens[cut - 1] not in apar.line_break_ids
                ):
                    cut -= 1  # back over the segment's text
                while cut > len(first) and b.tokens[cut - 1] in apar.line_break_ids:
                    cut -= 1  # and the line breaks before it
                b.tokens = b.tokens[:cut]
                b.logits = b.logits[: len(b.tokens) - len(first)]
                return
            if apar is not None and tok == apar.fork_id:
                forks += 1
                run(path + (len(b.tokens) - 1,), context + b.tokens, [apar.child_id], level + 1)
            if tok in eos_ids or len(b.tokens) - len(first) >= cap:
                return

    run((), list(prompt), [], 0)
    return out


def reference_budget(
    branches: dict[tuple[int, ...], RefBranch], budget: int, fork_id: Optional[int]
) -> dict[tuple[int, ...], RefBranch]:
    """The branches ``reference_decode`` wrote with no shared budget, cut as plain APAR's
    step loop cuts them under ``budget`` tokens over all branches.

    The loop is replayed literally: at step t every running branch, in creation order,
    commits its next sampled token (a token a finish rule later cut counts too) until the
    budget is spent; a [Fork] that spawned a child appends it to the creation order, and
    the child commits from the next step on. A branch cut short keeps its tokens as sampled
    (the finish rule never fired); children whose [Fork] was never committed do not exist.
    Written without the decoder's clock on purpose, to check it."""
    root: tuple[int, ...] = ()
    order = [root]
    first = {root: 0}  # step of each branch's first sampled token
    done = {root: 0}  # tokens committed per branch
    left, t = budget, 0
    offset = {p: (1 if p else 0) for p in branches}  # a child's [Child] is forced, not sampled
    while left > 0:
        running = [p for p in order if done[p] < len(branches[p].uncut) - offset[p]]
        if not running:
            break
        for p in running:
            if first[p] > t:
                continue
            if left == 0:
                break
            i = offset[p] + done[p]  # index of the token in the branch
            done[p] += 1
            left -= 1
            child = p + (i,)
            if branches[p].uncut[i] == fork_id and child in branches:
                order.append(child)
                first[child], done[child] = t + 1, 0
        t += 1
    out: dict[tuple[int, ...], RefBranch] = {}
    for p in order:
        b = branches[p]
        n = offset[p] + done[p]
        if done[p] == len(b.uncut) - offset[p]:
            out[p] = b
        else:
            out[p] = RefBranch(p, b.uncut[:n], b.uncut_logits[: done[p]], b.uncut[:n], b.uncut_logits[: done[p]])
    return out
