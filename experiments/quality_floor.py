"""The sibling-blind floor of the NLL ratio: the base's own answer, every child rewritten blind.

An APAR child never sees its siblings' details, so even the base itself, writing every child
in the context a child sees, does not reproduce its own answer. ``sibling_blind_answers``
measures what that costs: its NLL ratio is what a perfect imitation of the base scores.

Why apart from the pass (``quality.py``): it is a decoding job of its own (the base
restructured into one fork level, each child greedily rewritten, batched and cut at its
first line break) that needs only the base, so it is the same for every APAR model; the
pass only calls it (``floor=True``) and stores its scores.
"""

from __future__ import annotations

import torch
from transformers import StoppingCriteria

from .quality_nll import answer_ids

FLOOR_CHILD_TOKENS = 128  # cap on each child the base rewrites; most stop earlier, at their first line break


def line_break_ids(tokenizer) -> list[int]:
    """Ids of the tokens whose text holds a line break."""
    return [i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])]


class _StopAtLineBreak(StoppingCriteria):
    """A ``generate`` stopping criterion, per row: done once the row has generated a line break."""

    def __init__(self, breaks: torch.Tensor, start: int):
        self.breaks, self.start = breaks, start  # [n] token ids; prompt width (left-padded)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.isin(input_ids[:, self.start :], self.breaks).any(dim=1)  # [B] bool


@torch.inference_mode()
def blind_children(
    model, tokenizer, contexts: list[list[int]], *, max_tokens: int = FLOOR_CHILD_TOKENS, batch_size: int = 16
) -> list[str]:
    """The base's greedy continuation of each context, written as an APAR child writes: its first
    token neither breaks the line nor ends the answer (a child writes the item's details), and the
    text is cut at its first line break (where the parent's next item starts).

    Batched with left padding through the model's own ``generate``; ``tests/test_quality.py``
    checks it against a plain one-context-at-a-time argmax loop.
    """
    from transformers import StoppingCriteriaList

    from apar_spec.api import eos_ids_of
    from apar_spec.inputs import left_pad

    eos = sorted(eos_ids_of(model, tokenizer))
    breaks = line_break_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    out: list[str] = []
    for start in range(0, len(contexts), batch_size):
        ids, mask = left_pad(contexts[start : start + batch_size], pad)  # [B, width] each
        width = ids.shape[1]
        stop = _StopAtLineBreak(torch.tensor(breaks, device=model.device), width)
        gen = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            do_sample=False,
            max_new_tokens=max_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            begin_suppress_tokens=breaks + eos,
            stopping_criteria=StoppingCriteriaList([stop]),
        )
        for row in gen[:, width:].tolist():
            text = tokenizer.decode([t for t in row if t not in eos and t != pad], skip_special_tokens=True)
            out.append(text.split("\n", 1)[0])
    return out


def sibling_blind_answers(
    model, tokenizer, prompt_ids: list[list[int]], answers: list[str], *, batch_size: int = 16
) -> list[tuple[str, int]]:
    """Each answer restructured into an APAR tree (one fork level, ``restructure``), every child
    rewritten by the base (``blind_children``) from the context an APAR child sees: the prompt and
    the parent's text up to the fork, no sibling's details. Returns (reassembled text, forks); an
    answer that does not restructure into a fork comes back unchanged."""
    from apar_spec.decoding.answer_tree import AnswerTree, ForkPoint
    from apar_spec.training.restructure import restructure

    trees = [restructure(a, max_depth=1) for a in answers]
    contexts = [list(p) + answer_ids(tokenizer, t.text[: f.offset]) for p, t in zip(prompt_ids, trees) for f in t.forks]
    children = iter(blind_children(model, tokenizer, contexts, batch_size=batch_size))
    out = []
    for t in trees:
        rewritten = AnswerTree(t.text, [ForkPoint(f.offset, AnswerTree(next(children))) for f in t.forks])
        out.append((rewritten.reassemble(), len(t.forks)))
    return out
