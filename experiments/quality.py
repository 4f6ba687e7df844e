"""The batched quality pass: fork rate, steps APAR / AR, NLL under the base, well-formed lists.

Why a separate pass from ``bench``: these figures are per request and do not depend on
batching (a request's target steps, branches and tokens are the same whether it is
decoded alone or beside 15 others: greedy decoding, per-branch rules), so they are
measured over *every* prompt with batched generation, which is ~10x cheaper than the
batch-1 timed rows. Wall-time ratios need batch 1 and come from ``apar-spec bench``.

Per prompt (one JSONL row each, ``kind: "quality"``):

- ``forked``: the APAR answer has more than one branch;
- ``ar_steps`` / ``apar_steps``: target steps of the base's greedy AR answer and of the
  APAR model's answer (prefill included in both); ``steps_ratio`` = apar / ar;
- ``nll_ar`` / ``nll_apar``: mean per-token negative log-likelihood, under the *base*
  model, of the base's own greedy answer and of the reassembled APAR answer (both
  re-tokenised from text, EOS excluded); ``nll_ratio`` = apar / ar;
- ``nll_ar_matched``: the base's answer scored over only as many tokens as the APAR
  answer has (a length-matched control: per-token NLL falls along an answer, so an
  answer that stops early scores worse by its length alone);
- ``well_formed``: for an answer that forked, its numbered list (if any) counts 1..N
  with no repeated item and no empty item, and no paragraph is empty.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import StoppingCriteria

from apar_spec.options import DecodeOptions, fork_bias_of, fork_depth
from apar_spec.router import gate_threshold

from .prompts import SOT_CATEGORIES, Prompt

_ITEM = re.compile(r"^(\d{1,3})\.\s+(.*)$")


def well_formed(text: str) -> bool:
    """Numbered items count 1..N (a new list may restart at 1), none repeats, none is empty;
    no blank-only paragraph. Meant for answers that forked (lists and paragraphs)."""
    expected = None
    seen: set[str] = set()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _ITEM.match(line.strip())
        if not m or line[: len(line) - len(line.lstrip())]:  # top-level items only
            continue
        n, body = int(m.group(1)), m.group(2).strip()
        if n == 1:
            expected, seen = 1, set()
        if expected is None or n != expected:
            return False
        expected += 1
        title = body.split(":", 1)[0].strip("* ").lower()
        details = body.split(":", 1)[1].strip() if ":" in body else body
        nxt = next((ln.strip() for ln in lines[i + 1 :] if ln.strip()), "")
        if not details and (not nxt or _ITEM.match(nxt)):
            return False  # an item with a title and nothing after it
        if title in seen:
            return False
        seen.add(title)
    return bool(text.strip())


def has_numbered_list(text: str) -> bool:
    """Whether some top-level line of ``text`` is a numbered item ("3. ...")."""
    return any(_ITEM.match(line) for line in text.splitlines())


def answer_ids(tokenizer, text: str) -> list[int]:
    """An answer's tokens as the NLL judge reads them (re-tokenised from text)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []


@torch.inference_mode()
def mean_nll(model, tokenizer, prompt_ids: list[list[int]], texts: list[str], batch_size: int = 8,
             max_tokens: Optional[list[int]] = None) -> list[float]:
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


@dataclass
class QualitySummary:
    """Per category (and ``all``): the figures of the quality table."""

    rows: list[dict]
    by_category: dict[str, dict] = field(default_factory=dict)
    labels: Optional[dict] = None  # label_agreement: the fork decision against SoT's labels
    wall_s: float = 0.0
    dtype: str = ""


# The list-style categories (Vicuna bench / MT-bench categories whose questions
# invite a list or several paragraphs), and two prompt groups for the fork-rate goals.
LIST_STYLE = (
    "vicuna_bench/generic", "vicuna_bench/knowledge", "vicuna_bench/common-sense", "vicuna_bench/roleplay",
    "vicuna_bench/counterfactual", "mt_bench/writing", "mt_bench/roleplay", "mt_bench/stem", "mt_bench/humanities",
)
SHORT_ANSWER = ("math", "coding", "extraction", "qa", "math_reasoning", "translation")  # category names (any set)
ASKS_FOR_LIST = re.compile(r"\b(tips|steps|ways|reasons|strategies)\b", re.IGNORECASE)
SOT_LIST, SOT_OTHER = SOT_CATEGORIES["1"], SOT_CATEGORIES["0"]  # categories of SoT's router labels
SOT_GROUPS = {SOT_LIST: "SoT label: a list", SOT_OTHER: "SoT label: not a list"}  # category -> group name


def groups(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows of the summary's named groups (an empty group is left out)."""
    found = {
        "LIST-STYLE": [r for r in rows if r["category"] in LIST_STYLE],
        "asks for tips/steps/ways/reasons": [r for r in rows if ASKS_FOR_LIST.search(r.get("prompt", ""))],
        "short-answer categories": [r for r in rows if r["category"].rsplit("/", 1)[-1] in SHORT_ANSWER],
        # Skeleton-of-Thought's manual router labels (prompts.SOT_CATEGORIES): a person's call on
        # whether the answer is naturally a list of points, so the fork decision has a public key
        **{name: [r for r in rows if r["category"].rsplit("/", 1)[-1] == c] for c, name in SOT_GROUPS.items()},
    }
    return {name: rs for name, rs in found.items() if rs}


def label_agreement(rows: list[dict]) -> Optional[dict]:
    """The fork decision scored against the SoT router labels (None without labelled rows).

    ``recall``: share of list-labelled prompts that forked; ``false_fork_rate``: share of the
    others that forked; ``precision``: share of forked prompts that are list-labelled. A
    not-list prompt answered in several paragraphs may fork by APAR's own rule (a paragraph's
    first sentence), so ``false_fork_rate`` is an upper bound on wrong forks, not a count of them.
    """
    pos = [r for r in rows if r["category"].rsplit("/", 1)[-1] == SOT_LIST]
    neg = [r for r in rows if r["category"].rsplit("/", 1)[-1] == SOT_OTHER]
    if not pos or not neg:
        return None
    tp, fp = sum(r["forked"] for r in pos), sum(r["forked"] for r in neg)
    return {"list_prompts": len(pos), "other_prompts": len(neg), "recall": tp / len(pos),
            "false_fork_rate": fp / len(neg), "precision": tp / (tp + fp) if tp + fp else math.nan,
            "accuracy": (tp + len(neg) - fp) / (len(pos) + len(neg))}


# ---------------------------------------------------------------- the sibling-blind floor
# An APAR child never sees its siblings' details, so even the base itself, writing every child
# in the context a child sees, does not reproduce its own answer. ``sibling_blind_answers``
# measures what that costs: its NLL ratio is what a perfect imitation of the base scores.

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
def blind_children(model, tokenizer, contexts: list[list[int]], *, max_tokens: int = FLOOR_CHILD_TOKENS,
                   batch_size: int = 16) -> list[str]:
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
        gen = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), do_sample=False,
                             max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=pad,
                             begin_suppress_tokens=breaks + eos, stopping_criteria=StoppingCriteriaList([stop]))
        for row in gen[:, width:].tolist():
            text = tokenizer.decode([t for t in row if t not in eos and t != pad], skip_special_tokens=True)
            out.append(text.split("\n", 1)[0])
    return out


def sibling_blind_answers(model, tokenizer, prompt_ids: list[list[int]], answers: list[str], *,
                          batch_size: int = 16) -> list[tuple[str, int]]:
    """Each answer restructured into an APAR tree (one fork level, ``restructure``), every child
    rewritten by the base (``blind_children``) from the context an APAR child sees: the prompt and
    the parent's text up to the fork, no sibling's details. Returns (reassembled text, forks); an
    answer that does not restructure into a fork comes back unchanged."""
    from apar_spec.answer_tree import AnswerTree, ForkPoint
    from apar_spec.restructure import restructure

    trees = [restructure(a, max_depth=1) for a in answers]
    contexts = [list(p) + answer_ids(tokenizer, t.text[: f.offset]) for p, t in zip(prompt_ids, trees) for f in t.forks]
    children = iter(blind_children(model, tokenizer, contexts, batch_size=batch_size))
    out = []
    for t in trees:
        rewritten = AnswerTree(t.text, [ForkPoint(f.offset, AnswerTree(next(children))) for f in t.forks])
        out.append((rewritten.reassemble(), len(t.forks)))
    return out


def repeated_4grams(text: str) -> float:
    """Share of word 4-grams that already occurred earlier in the text (0 = no repetition).
    Greedy decoding of a small model loops, and a loop is cheap under the model's own NLL."""
    words = text.split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def _scored(rs: list[dict]) -> list[dict]:
    """Rows with both NLLs (an empty answer has none)."""
    return [r for r in rs if not math.isnan(r["nll_ar"]) and not math.isnan(r["nll_apar"])]


def _ratio(rs: list[dict], top: str = "nll_apar", bottom: str = "nll_ar") -> float:
    """Mean ``top`` over mean ``bottom``, over scored rows that hold both figures (NaN if none).

    ``nll_apar``/``nll_ar``: the issue's ratio; ``nll_apar``/``nll_ar_matched``: length-matched;
    ``nll_control``/``nll_ar``: the base's answers in another precision (an unchanged answer's score);
    ``nll_floor``/``nll_ar``: the sibling-blind floor (``sibling_blind_answers``).
    """
    ok = [r for r in _scored(rs) if all(r.get(k) is not None and not math.isnan(r[k]) for k in (top, bottom))]
    return statistics.mean(r[top] for r in ok) / statistics.mean(r[bottom] for r in ok) if ok else math.nan


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per category, per named group (``groups``) and ``all``.

    Besides the issue's figures (fork rate, steps ratio, NLL ratio, well-formedness), the
    NLL ratio is split so a reader can see where it comes from: over prompts where both
    answers ended before the token budget (``nll_ratio_complete``: a budget-cut APAR answer
    has several branches cut mid-sentence, the AR answer only its end), over answers that
    did not fork (``nll_ratio_unforked``: what fine-tuning alone moved), and the repetition
    of each side (``repeat4_*``); ``nll_ratio_control`` is the ratio of the base's own
    answers in another precision (``run_quality(control_dtype=...)``; NaN without them).
    """
    cats: dict[str, list[dict]] = {}
    for r in rows:
        cats.setdefault(r["category"], []).append(r)
    cats.update(groups(rows))
    cats["all"] = list(rows)
    out = {}
    for c, rs in cats.items():
        forked = [r for r in rs if r["forked"]]
        numbered = [r for r in forked if has_numbered_list(r.get("apar_text", ""))]
        complete = [r for r in rs if max(r["ar_tokens"], r["apar_tokens"]) < r.get("max_new_tokens", math.inf)]
        scored = _scored(rs)
        out[c] = {
            "prompts": len(rs),
            "fork_rate": len(forked) / len(rs),
            "steps_ratio": sum(r["apar_steps"] for r in rs) / max(1, sum(r["ar_steps"] for r in rs)),
            "steps_ratio_median": statistics.median(r["steps_ratio"] for r in rs),
            "nll_ar": statistics.mean(r["nll_ar"] for r in scored) if scored else math.nan,
            "nll_apar": statistics.mean(r["nll_apar"] for r in scored) if scored else math.nan,
            "nll_ratio": _ratio(rs),
            "well_formed_rate": (sum(r["well_formed"] for r in forked) / len(forked)) if forked else math.nan,
            "ar_tokens": statistics.mean(r["ar_tokens"] for r in rs),
            "apar_tokens": statistics.mean(r["apar_tokens"] for r in rs),
            "branches": statistics.mean(r["branches"] for r in rs),
            "complete": len(complete),
            "nll_ratio_complete": _ratio(complete),
            "nll_ratio_unforked": _ratio([r for r in rs if not r["forked"]]),
            "nll_ratio_control": _ratio(rs, "nll_control", "nll_ar"),
            "nll_ratio_matched": _ratio(rs, "nll_apar", "nll_ar_matched"),
            "nll_ratio_floor": _ratio(rs, "nll_floor", "nll_ar"),
            "repeat4_ar": statistics.mean(repeated_4grams(r.get("ar_text", "")) for r in rs),
            "repeat4_apar": statistics.mean(repeated_4grams(r.get("apar_text", "")) for r in rs),
            # forked answers holding a numbered list, and how many of those are well-formed (the
            # rate above also counts paragraph forks, which are well-formed unless a paragraph is empty)
            "numbered": len(numbered),
            "well_formed_numbered": (sum(r["well_formed"] for r in numbered) / len(numbered)) if numbered else math.nan,
            "repeat_ended": sum(bool(r.get("repeat_ends")) for r in rs),  # answers with a branch ended on a repeated title
            "gated": sum(bool(r.get("forks_gated")) for r in rs),  # prompts the fork router kept from forking
        }
    return out


def _read_jsonl(path: Optional[Path]) -> list[dict]:
    if path is None or not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line: that prompt is redone
    return rows


def run_quality(
    target: str,
    base: str,
    prompts: list[Prompt],
    *,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    dtype: str = "bfloat16",
    out: Optional[Path] = None,
    sides: Optional[Path] = None,
    sides_count: int = 10,
    ar_only: bool = False,
    control_dtype: Optional[str] = None,
    max_depth: Optional[int] = None,
    depth_cap: Optional[str] = None,
    fork_bias: Optional[float] = None,
    repeated_title: Optional[str] = None,
    fork_gate: Optional[float] = None,
    floor: bool = False,
    progress=None,
) -> QualitySummary:
    """Greedy base AR and target APAR answers for every prompt (batched), then NLL under the base.

    Two resumable phases: the base's AR answers (+ their NLL) go to ``<out>.ar.jsonl``,
    which does not depend on the APAR model, so it can run before training ends
    (``ar_only``); the APAR answers and the per-prompt rows go to ``out``.

    ``control_dtype`` (e.g. ``"float32"``) adds a control for the NLL ratio: the base's own
    greedy answers decoded again in that precision (``<out>.control.jsonl``, resumable),
    judged like the others. They are the same model's answers, differing only where
    rounding flips a near-tie, so their ratio (``nll_ratio_control``) is what the metric
    gives an answer of unchanged quality.

    ``max_depth``: the fork nesting cap of the APAR answers (None: the target's trained
    nesting, else the decoder's default); ``depth_cap``: what a child at that cap does when
    it asks for [Fork] (None: ``DecodeOptions.depth_cap``); ``fork_bias``: the [Fork] logit
    offset (None: the target's recorded one, else 0); ``repeated_title``: what a branch does
    when it forks after a title it already forked after (None: ``DecodeOptions.repeated_title``);
    ``fork_gate``: the fork router's threshold (None: the target router's own; 0: off). Rows
    record all five (a gate that is off as 0, with each prompt's router score ``p_list`` and
    ``forks_gated`` where one ran), and resume only reuses rows decoded under the same ones.

    ``floor`` adds the sibling-blind floor of the NLL ratio (``sibling_blind_answers``): the
    base's own answer restructured, every child rewritten by the base in the context an APAR
    child sees, scored like the APAR answer (``nll_floor``, ``floor_forks``; resumable in
    ``<out>.floor.jsonl``). It needs only the base, so it is the same for every APAR model.
    ``progress(done, total)`` after each batch of prompts; the floor phase calls it with a
    third argument, ``"floor"``.
    """
    import apar_spec

    from .models import Loaded, encode_prompt, short_name

    t0 = time.perf_counter()
    ar_path = out.with_suffix(".ar.jsonl") if out is not None else None
    ar_done = {str(r["prompt_id"]): r for r in _read_jsonl(ar_path)
               if r.get("base") == short_name(base) and r.get("max_new_tokens") == max_new_tokens}
    tm = tt = None
    depth = max_depth
    cap = depth_cap or DecodeOptions.depth_cap
    bias = fork_bias
    repeat = repeated_title or DecodeOptions.repeated_title
    # bad values: a one-line error before anything loads
    DecodeOptions(depth_cap=cap, fork_bias=fork_bias or 0.0, repeated_title=repeat, fork_gate=fork_gate)
    gate = 0.0  # the threshold in effect (0: no gate)
    if not ar_only:  # loaded first: its trained fork nesting decides which saved rows still count
        tm, tt = apar_spec.load(target, dtype=dtype)
        depth = fork_depth(tm, max_depth)
        bias = fork_bias_of(tm, fork_bias)
        gate = gate_threshold(tm, fork_gate)
    done = {str(r["prompt_id"]): r for r in _read_jsonl(out)
            if r.get("kind") == "quality" and r.get("target") == short_name(target) and r.get("max_new_tokens") == max_new_tokens
            and (depth is None or r.get("max_depth", DecodeOptions.max_depth) == depth)  # rows before the cap: the default
            and r.get("depth_cap", "mask") == cap  # rows before the option were decoded as "mask"
            and r.get("fork_bias", 0.0) == (bias or 0.0)
            and r.get("repeated_title", "keep") == repeat  # rows before the option forked on repeats
            and r.get("fork_gate", 0.0) == gate}  # rows before the router had none
    bm = bt = None
    ar_todo = [p for p in prompts if p.id not in ar_done and p.id not in done]
    if ar_todo:
        bm, bt = apar_spec.load(base, dtype=dtype)
        _base_answers(bm, bt, bm, ar_todo, ar_path, ar_done, "ar", short_name(base), max_new_tokens, batch_size,
                      lambda n: progress(n, len(prompts)) if progress else None)
    control: dict[str, dict] = {}
    if control_dtype is not None:
        ctl_path = out.with_suffix(".control.jsonl") if out is not None else None
        control = {str(r["prompt_id"]): r for r in _read_jsonl(ctl_path) if r.get("base") == short_name(base)
                   and r.get("max_new_tokens") == max_new_tokens and r.get("dtype") == control_dtype}
        ctl_todo = [p for p in prompts if p.id not in control]
        if ctl_todo:
            if bm is None:
                bm, bt = apar_spec.load(base, dtype=dtype)
            cm, ct = apar_spec.load(base, dtype=control_dtype)
            _base_answers(cm, ct, bm, ctl_todo, ctl_path, control, "control", short_name(base), max_new_tokens, batch_size,
                          None, extra={"dtype": control_dtype})
            del cm
    rows = [done[p.id] for p in prompts if p.id in done]
    todo = [] if ar_only else [p for p in prompts if p.id not in done]
    if todo:
        if bm is None:
            bm, bt = apar_spec.load(base, dtype=dtype)
        b_loaded, t_loaded = Loaded(short_name(base), bm, bt), Loaded(short_name(target), tm, tt)
        f = out.open("a", encoding="utf-8") if out is not None else None
        try:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                b_ids = [encode_prompt(b_loaded, p.text) for p in chunk]
                t_ids = [encode_prompt(t_loaded, p.text) for p in chunk]
                ap = apar_spec.generate(tm, tt, t_ids, mode="apar", max_new_tokens=max_new_tokens, batch_size=len(chunk),
                                       max_depth=depth, depth_cap=cap, fork_bias=bias, repeated_title=repeat, fork_gate=gate)
                nll_ap = mean_nll(bm, bt, b_ids, [g.text for g in ap])
                matched = mean_nll(bm, bt, b_ids, [ar_done[p.id]["ar_text"] for p in chunk],
                                   max_tokens=[len(answer_ids(bt, g.text)) for g in ap])
                for p, g, ng, nm in zip(chunk, ap, nll_ap, matched):
                    a = ar_done[p.id]
                    na = a["nll_ar"]
                    row = {
                        "kind": "quality", "prompt_id": p.id, "category": p.category, "target": t_loaded.name,
                        "base": b_loaded.name, "dtype": str(tm.dtype).removeprefix("torch."),
                        "max_new_tokens": max_new_tokens, "max_depth": depth, "depth_cap": cap, "fork_bias": bias,
                        "repeated_title": repeat, "fork_gate": gate, "p_list": g.stats.p_list,
                        "forks_gated": g.stats.forks_gated, "forked": g.forked, "branches": len(g.branches),
                        "repeat_ends": sum(b.finish == "repeat" for b in g.branches),
                        "ar_steps": a["ar_steps"], "apar_steps": g.stats.target_steps,
                        "steps_ratio": g.stats.target_steps / max(1, a["ar_steps"]),
                        "ar_tokens": a["ar_tokens"], "apar_tokens": g.stats.tokens_generated,
                        "apar_critical_path": g.stats.critical_path,
                        "nll_ar": na, "nll_apar": ng, "nll_ratio": ng / na if na and not math.isnan(na) else math.nan,
                        "nll_ar_matched": nm,
                        "well_formed": well_formed(g.text) if g.forked else None,
                        "prompt": p.text, "ar_text": a["ar_text"], "apar_text": g.text,
                    }
                    rows.append(row)
                    if f is not None:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                        f.flush()
                if progress:
                    progress(len(rows), len(prompts))
        finally:
            if f is not None:
                f.close()
    _backfill_matched(rows, prompts, base, dtype, (bm, bt))
    order = {p.id: i for i, p in enumerate(prompts)}
    rows.sort(key=lambda r: order.get(str(r["prompt_id"]), 0))
    for r in rows:
        if str(r["prompt_id"]) in control:
            r["nll_control"] = control[str(r["prompt_id"])]["nll_control"]
    if floor and rows:
        _add_floor(rows, prompts, base, dtype, max_new_tokens, batch_size, out, (bm, bt), progress)
    if sides is not None and rows:
        write_sides(rows, sides, sides_count)
    dtype_name = rows[0]["dtype"] if rows else dtype
    return QualitySummary(rows, summarize(rows) if rows else {}, labels=label_agreement(rows),
                          wall_s=time.perf_counter() - t0, dtype=dtype_name)


def _add_floor(rows: list[dict], prompts: list[Prompt], base: str, dtype: str, max_new_tokens: int, batch_size: int,
               out: Optional[Path], loaded: tuple, progress=None) -> None:
    """``nll_floor`` / ``floor_forks`` on every row: read back from ``<out>.floor.jsonl``, else
    computed from the row's base answer (``sibling_blind_answers``) and appended there, a batch
    of prompts at a time (so an interrupted pass resumes where it stopped)."""
    import apar_spec

    from .models import Loaded, encode_prompt, short_name

    path = out.with_suffix(".floor.jsonl") if out is not None else None
    done = {str(r["prompt_id"]): r for r in _read_jsonl(path)
            if r.get("base") == short_name(base) and r.get("max_new_tokens") == max_new_tokens}
    todo = [r for r in rows if str(r["prompt_id"]) not in done]
    if todo:
        bm, bt = loaded if loaded[0] is not None else apar_spec.load(base, dtype=dtype)
        text = {p.id: p.text for p in prompts}
        f = path.open("a", encoding="utf-8") if path is not None else None
        try:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                b_ids = [encode_prompt(Loaded(short_name(base), bm, bt), text.get(str(r["prompt_id"]), r.get("prompt", "")))
                         for r in chunk]
                blind = sibling_blind_answers(bm, bt, b_ids, [r["ar_text"] for r in chunk], batch_size=batch_size)
                nll = mean_nll(bm, bt, b_ids, [t for t, _ in blind])
                for r, (t, forks), n in zip(chunk, blind, nll):
                    # an answer with no fork is its own floor (the same text, the same NLL)
                    row = {"prompt_id": r["prompt_id"], "base": short_name(base), "max_new_tokens": max_new_tokens,
                           "nll_floor": n if forks else r["nll_ar"], "floor_forks": forks, "floor_text": t}
                    done[str(r["prompt_id"])] = row
                    if f is not None:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                        f.flush()
                if progress:
                    progress(len(rows) - len(todo) + start + len(chunk), len(rows), "floor")
        finally:
            if f is not None:
                f.close()
    for r in rows:
        fl = done[str(r["prompt_id"])]
        r["nll_floor"], r["floor_forks"] = fl["nll_floor"], fl["floor_forks"]


def _backfill_matched(rows: list[dict], prompts: list[Prompt], base: str, dtype: str, loaded: tuple) -> None:
    """Score the length-matched control for rows saved before it existed (in memory, not in the file)."""
    import apar_spec

    from .models import Loaded, encode_prompt, short_name

    missing = [r for r in rows if "nll_ar_matched" not in r and "ar_text" in r and "apar_text" in r]
    if not missing:
        return
    bm, bt = loaded if loaded[0] is not None else apar_spec.load(base, dtype=dtype)
    text = {p.id: p.text for p in prompts}
    b_ids = [encode_prompt(Loaded(short_name(base), bm, bt), text.get(str(r["prompt_id"]), r.get("prompt", ""))) for r in missing]
    nll = mean_nll(bm, bt, b_ids, [r["ar_text"] for r in missing],
                   max_tokens=[len(answer_ids(bt, r["apar_text"])) for r in missing])
    for r, n in zip(missing, nll):
        r["nll_ar_matched"] = n


def _base_answers(model, tokenizer, judge, prompts: list[Prompt], path: Optional[Path], done: dict, prefix: str,
                  base_name: str, max_new_tokens: int, batch_size: int, progress=None, extra: Optional[dict] = None) -> None:
    """Greedy AR answers of ``model`` (the base, in some precision), their NLL under ``judge``;
    rows (``<prefix>_steps``, ``<prefix>_tokens``, ``nll_<prefix>``, ``<prefix>_text``) are
    appended to ``path`` batch by batch and put in ``done``."""
    import apar_spec

    from .models import Loaded, encode_prompt

    loaded = Loaded(base_name, model, tokenizer)
    f = path.open("a", encoding="utf-8") if path is not None else None
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids = [encode_prompt(loaded, p.text) for p in chunk]
            gens = apar_spec.generate(model, tokenizer, ids, mode="ar", max_new_tokens=max_new_tokens, batch_size=len(chunk))
            nll = mean_nll(judge, tokenizer, ids, [g.text for g in gens])
            for p, g, n in zip(chunk, gens, nll):
                r = {"prompt_id": p.id, "base": base_name, "max_new_tokens": max_new_tokens, **(extra or {}),
                     f"{prefix}_steps": g.stats.target_steps, f"{prefix}_tokens": g.stats.tokens_generated,
                     f"nll_{prefix}": n, f"{prefix}_text": g.text}
                done[p.id] = r
                if f is not None:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
                    f.flush()
            if progress:
                progress(len(done))
    finally:
        if f is not None:
            f.close()


def write_sides(rows: list[dict], path: Path, count: int = 10) -> Path:
    """A markdown file with ``count`` answers side by side (base AR | APAR), forked ones first,
    spread over categories, for a person to read."""
    picked: list[dict] = []
    cats: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: not r["forked"]):
        cats.setdefault(r["category"], []).append(r)
    while len(picked) < count and any(cats.values()):
        for c in list(cats):
            if cats[c] and len(picked) < count:
                picked.append(cats[c].pop(0))

    def cell(t: str) -> str:
        return t.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")

    lines = ["# Side by side: base greedy AR | APAR (reassembled)", ""]
    for r in picked:
        lines += [
            f"## {r['category']} / {r['prompt_id']}: {r['prompt'][:200]}", "",
            f"forked: {r['forked']} ({r['branches']} branches); steps AR {r['ar_steps']} / APAR {r['apar_steps']}; "
            f"NLL under base AR {r['nll_ar']:.3f} / APAR {r['nll_apar']:.3f}", "",
            f"| {r['base']} (AR) | {r['target']} (APAR) |", "|---|---|",
            f"| {cell(r['ar_text'])} | {cell(r['apar_text'])} |", "",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
