"""N-gram / prompt-lookup speculator: no model, drafts by copying from the branch's own context."""

from __future__ import annotations

from apar_spec.decoding.speculator import BranchView, Outcome, Proposal


class NGramSpeculator:
    """Find the latest earlier occurrence of the branch's last ``n`` tokens (n from
    ``max_ngram`` down to ``min_ngram``) in the branch's own context (prompt +
    ancestors + itself, never a sibling's) and propose the tokens that followed it.

    Proposals are deterministic, so under sampling the draft distribution is a
    one-hot (``Proposal.probs`` entries are None) and rejection sampling stays exact.
    """

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min <= max (got {min_ngram}, {max_ngram})")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    @property
    def forwards(self) -> int:
        return 0

    def reset(self, num_requests: int, vocab_size: int, generator=None) -> None:
        pass

    def admit(self, indices: list[int]) -> None:
        pass

    def release(self, indices: list[int]) -> None:
        pass

    def propose(self, views: list[BranchView], sampling=None) -> Proposal:
        return Proposal([self.lookup(v.context, v.k) for v in views], [None] * len(views))

    def lookup(self, context: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier match of the context's suffix."""
        n_ctx = len(context)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            suffix = context[n_ctx - n :]
            # scan right to left for the latest match that ends before the suffix itself
            for start in range(n_ctx - n - 1, -1, -1):
                if context[start : start + n] == suffix:
                    follow = context[start + n : start + n + k]
                    if follow:
                        return follow
        return []

    def observe(self, outcome: Outcome) -> None:
        pass
