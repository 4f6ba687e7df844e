"""Reading-order text from per-branch token deltas, as they are committed.

Branches grow in parallel, but a reader wants the answer in reading order (a
branch up to its ``[Fork]``, the child's whole text, then the continuation). The
*stable prefix* of that order is what can no longer change: a depth-first walk that
stops at the end of the first unfinished branch it meets. ``TextStream`` rebuilds
that prefix after each event and yields the new text; the final text of the
request (``Generation.text``) completes it. The last ``HOLD`` characters wait one
more event: reassembly conventions (a newline before a continuation that starts a
numbered item, a space before a child's text) and token boundaries can still change
the tail, and a stream cannot take text back. Runs on the client side (the HTTP
handler), never in the decode loop.
"""

from __future__ import annotations

from typing import Optional

from apar_spec.decoding.reassemble import BranchInfo, to_answer_tree
from apar_spec.serving.engine import BranchDelta

HOLD = 8


class TextStream:
    def __init__(self, tokenizer, fork_id: Optional[int], child_id: Optional[int]):
        self.tokenizer = tokenizer
        self.fork_id, self.child_id = fork_id, child_id
        self.branches: dict[int, BranchInfo] = {}
        self.sent = ""

    def feed(self, deltas: list[BranchDelta]) -> str:
        """Take one event's deltas; return the reading-order text that became stable."""
        for d in deltas:
            b = self.branches.setdefault(d.branch, BranchInfo(d.branch, d.parent, d.fork_index, [], None))
            b.token_ids.extend(d.tokens)
            b.finish = d.finish
        text = self.stable_text()
        text = text[: max(0, len(text) - HOLD)]
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of the answer, given the request's final text."""
        delta = final_text[len(self.sent) :] if final_text.startswith(self.sent) else ""
        self.sent = final_text if delta or final_text == self.sent else self.sent
        return delta

    def stable_text(self) -> str:
        if 0 not in self.branches:
            return ""
        children = {(b.parent, b.fork_index): b for b in self.branches.values() if b.parent is not None}
        cut: dict[int, list[int]] = {}

        def walk(b: BranchInfo) -> bool:
            """Copy b's tokens up to where the reading order stops being final; False if it stopped."""
            for i, tok in enumerate(b.token_ids):
                if tok == self.fork_id and (b.id, i) in children:
                    if not walk(children[(b.id, i)]):
                        cut[b.id] = b.token_ids[: i + 1]
                        return False
            cut[b.id] = list(b.token_ids)
            return b.finish is not None

        walk(self.branches[0])
        infos = [
            BranchInfo(i, b.parent, b.fork_index, cut[i], b.finish)
            for i, b in sorted(self.branches.items())
            if i in cut
        ]
        return to_answer_tree(infos, self._decode, self.fork_id, self.child_id).reassemble()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""
