"""Training prompts for SmolLM2's self-distilled APAR data, written here (templates x topics).

Why our own prompts: the public prompt sets (Vicuna, MT-bench, Spec-Bench) are what we
measure on, so none of them may leak into training (tests/test_smollm2.py checks that no
prompt here is within a small edit distance of any prompt there). Two kinds:

- ``list``: prompts that invite a numbered list or several paragraphs (tips, steps,
  reasons, ways, comparisons, pros/cons, explanations): these become forking examples;
- ``short``: prompts that want one short answer (facts, arithmetic, one sentence, code):
  these must stay sequential, so the model learns *not* to fork on them.

The literal lists (topics, templates, pools) live in ``smollm2_prompts.json`` next to this
file; this module only draws from them. The set is a pure function of that file and the
seed (a seeded shuffle of fixed lists), so ids are stable and a resumed generator skips
exactly what it already answered.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DATA_FILE = Path(__file__).with_name("smollm2_prompts.json")


@dataclass(frozen=True)
class TrainPrompt:
    id: str
    kind: str  # "list" | "short"
    style: str  # template family, e.g. "tips", "steps", "fact", "arith"
    text: str


@cache
def _data() -> dict:
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


def _list_prompts(rng: random.Random) -> list[TrainPrompt]:
    d = _data()
    templates: dict[str, list[str]] = d["list_templates"]
    out: list[TrainPrompt] = []
    for t, v in d["topics"]:
        styles = list(templates)
        rng.shuffle(styles)
        for style in styles + styles[:1]:  # every family per topic, one twice; a random phrasing each
            template = rng.choice(templates[style])
            text = template.format(t=t, v=v, n=rng.choice([3, 4, 5, 5, 6, 7]))
            out.append(TrainPrompt(f"list-{len(out):04d}", "list", style, text[0].upper() + text[1:]))
    for a, b in d["pairs"]:
        for template in rng.sample(d["compare_templates"], 3):
            text = template.format(a=a, b=b, A=a[0].upper() + a[1:])
            out.append(TrainPrompt(f"list-{len(out):04d}", "list", "compare", text))
    return out


def _short_prompts(rng: random.Random) -> list[TrainPrompt]:
    d = _data()
    out: list[TrainPrompt] = []

    def add(style: str, text: str) -> None:
        out.append(TrainPrompt(f"short-{len(out):04d}", "short", style, text))

    for c, _ in d["capitals"]:
        add("fact", rng.choice(d["capital_forms"]).format(c=c))
    for q in d["fact_questions"]:
        add("fact", q)
    for _ in range(90):
        a, b = rng.randint(2, 99), rng.randint(2, 40)
        add("arith", rng.choice(d["arith_forms"]).format(a=a, b=b))
    for x in d["sentence_topics"]:
        add("sentence", rng.choice(d["sentence_templates"]).format(x=x))
    for task in d["code_tasks"]:
        add("code", task)
    for w in d["words"]:
        add("word", rng.choice(d["word_forms"]).format(w=w))
    # appended families: earlier ids (and the rng draws behind them) stay as they were
    for _ in range(50):
        add("word-problem", _word_problem(rng))
    for _ in range(24):
        add("context-qa", _context_question(rng))
    for _ in range(24):
        add("extract", _extraction(rng))
    for _ in range(20):
        add("one-line-summary", _one_line_summary(rng))
    return out


# Multi-step questions whose steps depend on each other (so an answer must not fork),
# and questions about a given text (answered from it in a line or two).


def _word_problem(rng: random.Random) -> str:
    d = _data()
    n, item = rng.choice(d["names"]), rng.choice(d["items"])
    a, b, c = rng.randint(3, 40), rng.randint(2, 9), rng.randint(2, 12)
    slots = dict(
        n=n, item=item, a=a, b=b, c=c, a_times_b=a * b, b_times_c_plus_a=b * c + a, b_times_10=b * 10, a_plus_b=a + b
    )
    return rng.choice(d["word_problem_forms"]).format(**slots)


def _context_question(rng: random.Random) -> str:
    d = _data()
    n, city, shop = rng.choice(d["names"]), rng.choice(d["cities"]), rng.choice(d["shops"])
    year, staff = rng.randint(1990, 2022), rng.randint(2, 15)
    text = d["context_text"].format(n=n, city=city, year=year, shop=shop, staff=staff)
    question = rng.choice([q.format(n=n, city=city, shop=shop) for q in d["context_questions"]])
    return rng.choice(d["context_forms"]).format(text=text, question=question)


def _extraction(rng: random.Random) -> str:
    d = _data()
    n, m, city = rng.sample(d["names"], 2) + [rng.choice(d["cities"])]
    price, day = rng.randint(5, 90), rng.choice(d["extraction_days"])
    text = d["extraction_text"].format(day=day, n=n, m=m, city=city, price=price)
    return rng.choice(d["extraction_forms"]).format(text=text)


def _one_line_summary(rng: random.Random) -> str:
    d = _data()
    n, city, shop = rng.choice(d["names"]), rng.choice(d["cities"]), rng.choice(d["shops"])
    text = d["summary_text"].format(shop=shop, city=city, n=n)
    return rng.choice(d["summary_forms"]).format(text=text)


def training_prompts(seed: int = 0) -> list[TrainPrompt]:
    """All training prompts (list-inviting ones first, then short-answer ones), no text twice."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    for p in _list_prompts(rng) + _short_prompts(rng):
        if p.text.lower() not in seen:
            seen.add(p.text.lower())
            out.append(p)
    return out


def edit_distance(a: str, b: str, limit: int) -> int:
    """Levenshtein distance of ``a`` and ``b``, or ``limit + 1`` once it must exceed ``limit``."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
        if min(cur) > limit:
            return limit + 1
        prev = cur
    return prev[-1]


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def near_duplicates(ours: list[str], theirs: list[str], max_fraction: float = 0.25) -> list[tuple[str, str, int]]:
    """Pairs (ours, theirs, distance) whose edit distance is <= ``max_fraction`` of the longer one.

    Character trigrams prune the pairs first: one edit changes at most 3 trigrams of a
    string, so strings that share too few trigrams cannot be within the limit.
    """

    def grams(s: str) -> set[str]:
        return {s[i : i + 3] for i in range(max(1, len(s) - 2))}

    norm_theirs = [(_norm(t), t) for t in theirs]
    gram_theirs = [grams(n) for n, _ in norm_theirs]
    hits = []
    for o in ours:
        a = _norm(o)
        ga = grams(a)
        for (b, raw), gb in zip(norm_theirs, gram_theirs):
            limit = int(max_fraction * max(len(a), len(b)))
            if abs(len(a) - len(b)) > limit or len(ga & gb) < max(len(ga), len(gb)) - 3 * limit:
                continue
            d = edit_distance(a, b, limit)
            if d <= limit:
                hits.append((o, raw, d))
    return hits


if __name__ == "__main__":
    ps = training_prompts()
    from collections import Counter

    print(len(ps), Counter(p.kind for p in ps), Counter(p.style for p in ps))
    for p in ps[:5] + ps[-5:]:
        print(p)
