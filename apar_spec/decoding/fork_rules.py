"""The fork rules: branch-local logit rules and the APAR text rules they read.

Every rule depends only on the branch's own history (DESIGN.md, 'Outputs must not depend
on scheduling'), so it can be applied along a draft path as if the path were accepted
and speculation stays lossless:

- ``[Child]`` is never sampled; ``[Fork]`` is offset by ``fork_bias`` where it would spawn;
- ``[Fork]`` is banned after a control token, at the depth cap (a capped child's
  ``[Fork]`` instead ends it under ``depth_cap="end"``), past ``max_forks_per_branch``,
  inside a code block, too close to the branch cap, and in requests the fork router gated;
- text rules: a branch that forks after a title it already forked after ends
  (``repeated_title="end"``), and what a stream may send before a rule can cut it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from apar_spec.decoding.tokens import AparTokens
from apar_spec.options import DecodeOptions

if TYPE_CHECKING:
    from apar_spec.decoding.state import Branch, Request

NEG_INF = float("-inf")
_LEADER = re.compile(r"^(?:\d{1,3}[.)]|[-*+•#>]+)\s*")  # a list item's number or bullet


def title_key(text: str) -> str | None:
    """What two list titles are compared by: the text without a leading item number or
    bullet, markdown emphasis, a closing colon, case and extra spaces; None if no letter or
    digit is left (nothing to compare). The decoder's ``repeated_title`` rule and
    :func:`cut_repeated_items` read titles the same way."""
    t = _LEADER.sub("", text.strip())
    t = " ".join(t.replace("*", " ").replace("_", " ").split()).rstrip(":").strip().lower()
    return t if any(ch.isalnum() for ch in t) else None


@dataclass(frozen=True)
class Fence:
    """Whether an answer's text is inside a ``` block, scanned token by token.

    ``ticks`` counts the backticks that end the text so far (a fence may be split over
    tokens: "``" then "`"); three in a row toggle ``inside``."""

    inside: bool = False
    ticks: int = 0

    def after(self, text: Optional[str]) -> Fence:
        """The state after a token with this text (``None``: a token without backticks)."""
        if text is None:
            return Fence(self.inside, 0) if self.ticks else self
        inside, ticks = self.inside, self.ticks
        for ch in text:
            ticks = ticks + 1 if ch == "`" else 0
            if ticks == 3:
                inside, ticks = not inside, 0
        return Fence(inside, ticks)


@dataclass
class RuleState:
    """What the fork rules need to know about a branch at one position."""

    prev: int  # the token whose logits are being processed
    forks: int
    generated: int  # sampled tokens so far
    fence: Fence  # code-fence state of the answer text up to and including ``prev``


class ForkRules:
    """The rules of one decode (its options and APAR tokens), applied per branch."""

    def __init__(self, opts: DecodeOptions, apar: Optional[AparTokens], fork_enabled: bool, branch_cap: int):
        self.opts = opts
        self.apar = apar
        self.fork_enabled = fork_enabled and apar is not None
        self.branch_cap = branch_cap
        # backtick texts the code-fence rule tracks; empty where the rule cannot ban a fork
        self.fence_texts = apar.backtick_texts if self.fork_enabled and not opts.fork_in_code else {}
        # token texts the repeated-title rule reads; empty where the rule is off
        self.title_texts = apar.token_texts if self.fork_enabled and opts.repeated_title == "end" else ()

    def apply(
        self,
        requests: dict[int, Request],
        views,
        branches: list[Branch],
        drafts: list[list[int]],
        parents: list[list[int]],
        raw: torch.Tensor,
    ) -> torch.Tensor:
        """Branch-local logit rules on ``raw`` ``[branches, 1 + N, V]`` (pending node, then
        drafts), each node's along its own path: the user's processor, never ``[Child]``,
        ``[Fork]`` offset by ``fork_bias`` where it would spawn a child, and only where
        ``may_fork`` allows and the request is not gated by the fork router."""
        logits = raw.clone()
        if self.opts.logits_processor is not None:
            for i, (v, b, d, par) in enumerate(zip(views, branches, drafts, parents)):
                ctxs = [requests[v.request].context(b)]
                for tok, p in zip(d, par):
                    ctxs.append(ctxs[p + 1] + [tok])
                for j, ctx in enumerate(ctxs):
                    logits[i, j] = self.opts.logits_processor(ctx, logits[i, j])
        if self.apar is None:
            return logits
        logits[..., self.apar.child_id] = NEG_INF
        if self.opts.fork_bias and self.fork_enabled:  # where a [Fork] would spawn a child, not end one at the cap
            spawns = torch.tensor([b.level < self.opts.max_depth for b in branches], dtype=logits.dtype)  # [branches]
            logits[..., self.apar.fork_id] += (spawns * self.opts.fork_bias).to(logits.device)[:, None]
        ban = torch.zeros(logits.shape[:2], dtype=torch.bool)  # [branches, 1 + N]
        for i, (v, b, d, par) in enumerate(zip(views, branches, drafts, parents)):
            r = requests[v.request]
            if r.forks_gated:
                ban[i] = True
                continue
            prev = b.tokens[-1] if b.tokens else r.prompt[-1]
            for j, state in enumerate(self.rule_states(b, d, par, prev)):
                ban[i, j] = not self.may_fork(b, state)
        logits[..., self.apar.fork_id].masked_fill_(ban.to(logits.device), NEG_INF)
        return logits

    def may_fork(self, b: Branch, s: RuleState) -> bool:
        """Whether [Fork] stays in the branch's distribution (a fork by a child at the depth
        cap under ``depth_cap="end"`` ends that child instead of spawning one)."""
        return (
            self.fork_enabled
            and s.prev not in (self.apar.fork_id, self.apar.child_id)
            and (b.level < self.opts.max_depth or self.ends_at_cap(b))
            and s.forks < self.opts.max_forks_per_branch
            and not s.fence.inside  # always outside where fence_texts is empty (rule off)
            # the [Fork] must be followed by at least one more parent step, so its KV exists for the child
            and self.branch_cap - s.generated > 1
        )

    def ends_at_cap(self, b: Branch) -> bool:
        return b.is_child and b.level >= self.opts.max_depth and self.opts.depth_cap == "end"

    def settled_length(self, b: Branch) -> int:
        """How many of ``b``'s tokens no later step can take back (what a stream may send):
        all of them, except in a running child at the depth cap under ``depth_cap="end"``
        the line since its last line break, which a [Fork] would cut; and in a branch that
        may still fork, inside a run of forked titles (``repeated_title="end"``), the open
        segment, which a [Fork] after a repeated title would cut."""
        if b.finish is not None:
            return len(b.tokens)
        start = 1 if b.is_child else 0
        if self.ends_at_cap(b):
            j = last_line_start(b.tokens, self.apar.line_break_ids, start, len(b.tokens))
            return len(b.tokens) if j is None else j
        if self.title_texts and b.forks and b.level < self.opts.max_depth:  # no fork yet: no title to repeat
            titles, _ = title_run(self.title_texts, self.apar.fork_id, b.tokens[start:])
            if titles:
                return open_segment_start(b.tokens, self.apar.line_break_ids, self.apar.fork_id, start, len(b.tokens))
        return len(b.tokens)

    def repeats_title(self, b: Branch) -> bool:
        """Whether ``b``'s newest token, a spawning [Fork], follows a title that the branch
        already forked after in the same run (``DecodeOptions.repeated_title``)."""
        if not self.title_texts:
            return False
        titles, segment = title_run(self.title_texts, self.apar.fork_id, b.tokens[(1 if b.is_child else 0) : -1])
        key = title_key(segment)
        return key is not None and key in titles

    def rule_states(self, b: Branch, drafts: list[int], parents: list[int], prev: int) -> list[RuleState]:
        """Rule state at the pending node (token ``prev``) and at each draft node, along the
        node's own path (as if its ancestors were accepted): fed-node order, [1 + N]."""
        fork_id = self.apar.fork_id if self.apar else -1
        texts = self.fence_texts
        states = [RuleState(prev=prev, forks=b.forks, generated=b.generated, fence=self.fence_of(b))]
        for tok, p in zip(drafts, parents):
            s = states[p + 1]
            states.append(
                RuleState(
                    prev=tok,
                    forks=s.forks + (tok == fork_id),
                    generated=s.generated + 1,
                    fence=s.fence.after(texts.get(tok)),
                )
            )
        return states

    def fence_of(self, b: Branch) -> Fence:
        """Code-fence state after ``b``'s committed tokens, over its answer text (the
        ancestors' tokens up to the fork, then its own; not the prompt). A child starts
        outside any block: while the rule holds its parent forked outside one, and the
        ``[Fork]`` ends any run of backticks. So only the branch's own tokens are scanned,
        incrementally."""
        if not self.fence_texts:
            return Fence()
        if b.fence_at > len(b.tokens):  # tokens were cut (a capped child ends): scan afresh
            b.fence, b.fence_at = Fence(), 0
        for tok in b.tokens[b.fence_at :]:
            b.fence = b.fence.after(self.fence_texts.get(tok))
        b.fence_at = len(b.tokens)
        return b.fence


def last_line_start(tokens: list[int], line_breaks: frozenset[int], start: int, end: int) -> Optional[int]:
    """Index of the first token of the last run of line-break tokens in ``tokens[start:end]``
    (a blank line is often two tokens), or None if there is none."""
    j = next((i for i in range(end - 1, start - 1, -1) if tokens[i] in line_breaks), None)
    while j is not None and j > start and tokens[j - 1] in line_breaks:
        j -= 1
    return j


def cut_to_last_line(tokens: list[int], line_breaks: frozenset[int], start: int) -> list[int]:
    """Drop, in place, a branch's trailing [Fork] and the unfinished line before it, from
    its last line break on (tokens before ``start`` are kept). No line break: only the
    [Fork] goes. Returns what was dropped."""
    j = last_line_start(tokens, line_breaks, start, len(tokens) - 1)
    at = len(tokens) - 1 if j is None else j
    dropped = tokens[at:]
    del tokens[at:]
    return dropped


FORK_MARK = "\x00"  # stands for [Fork] in a branch's text (no token's text holds it)


def title_run(texts: tuple[str, ...], fork_id: int, tokens: list[int]) -> tuple[set[str], str]:
    """The keys of the titles a branch forked after in its current run, and its open segment.

    ``tokens`` are the branch's own (a child's without its ``[Child]``). In their text, a
    *forked segment* is the text before a [Fork], back to the previous line break or
    [Fork]; the *open segment* is the text after the last of either. The run is the forked
    segments from the open one back to the last non-blank line without a [Fork]."""
    text = "".join(FORK_MARK if t == fork_id else (texts[t] if t < len(texts) else "") for t in tokens)
    lines = text.split("\n")
    *forked, segment = lines[-1].split(FORK_MARK)
    for line in reversed(lines[:-1]):
        if FORK_MARK in line:
            forked.extend(line.split(FORK_MARK)[:-1])
        elif line.strip():
            break
    keys = {title_key(f) for f in forked}
    keys.discard(None)
    return keys, segment


def open_segment_start(tokens: list[int], line_breaks: frozenset[int], fork_id: int, start: int, end: int) -> int:
    """Where the open segment of ``tokens[start:end]`` begins, as a cut point: its last run
    of line-break tokens, or just after its last [Fork] if that comes later; ``start`` if
    neither exists."""
    j = last_line_start(tokens, line_breaks, start, end)
    f = next((i for i in range(end - 1, start - 1, -1) if tokens[i] == fork_id), None)
    cut = start if j is None else j
    return max(cut, f + 1) if f is not None else cut
