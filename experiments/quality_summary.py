"""The quality pass's figures: answer checks, the named prompt groups, the per-group summary.

Why apart from the pass (``quality.py``): these read finished rows only, never a model, so a
rows file can be summarized without loading anything; and the groups (list-style,
short-answer, SoT's labels) are the issue's goals, kept in one place.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .prompts import SOT_CATEGORIES

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
    "vicuna_bench/generic",
    "vicuna_bench/knowledge",
    "vicuna_bench/common-sense",
    "vicuna_bench/roleplay",
    "vicuna_bench/counterfactual",
    "mt_bench/writing",
    "mt_bench/roleplay",
    "mt_bench/stem",
    "mt_bench/humanities",
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
    return {
        "list_prompts": len(pos),
        "other_prompts": len(neg),
        "recall": tp / len(pos),
        "false_fork_rate": fp / len(neg),
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "accuracy": (tp + len(neg) - fp) / (len(pos) + len(neg)),
    }


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
            "repeat_ended": sum(
                bool(r.get("repeat_ends")) for r in rs
            ),  # answers with a branch ended on a repeated title
            "gated": sum(bool(r.get("forks_gated")) for r in rs),  # prompts the fork router kept from forking
        }
    return out


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
            f"## {r['category']} / {r['prompt_id']}: {r['prompt'][:200]}",
            "",
            f"forked: {r['forked']} ({r['branches']} branches); steps AR {r['ar_steps']} / APAR {r['apar_steps']}; "
            f"NLL under base AR {r['nll_ar']:.3f} / APAR {r['nll_apar']:.3f}",
            "",
            f"| {r['base']} (AR) | {r['target']} (APAR) |",
            "|---|---|",
            f"| {cell(r['ar_text'])} | {cell(r['apar_text'])} |",
            "",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
