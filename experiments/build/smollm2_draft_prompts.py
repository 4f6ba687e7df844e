"""More varied prompts for distilling SmolLM2's *drafts* (not the APAR adapter), written here.

Why a second set: the chained heads score 0.62 top-1 on held-out answers to the training
prompts but 0.31 on answers to public prompts. The training prompts are templates x
everyday topics (tips, steps, reasons ...), so the drafts learned that one register. Public
sets also ask for stories, letters, role-play, explanations of how things work, history,
what-ifs and plans: the categories that do not fork, where speculation is the only speed-up.
These prompts cover those registers with many subjects each. The adapter never trains on
them (its fork behaviour stays as measured); only the drafts are distilled on the target's
own answers to them.

Same rules as ``smollm2_prompts``: none may be close to a public eval prompt (a test checks
it), and the set is a pure function of ``smollm2_draft_prompts.json`` (the literal subjects
and phrasings, next to this file) and the seed (a seeded draw from fixed lists), so a
resumed distillation skips exactly what it already answered.
"""

from __future__ import annotations

import json
import random
from functools import cache
from pathlib import Path

from apar_spec.experiments.build.smollm2_prompts import TrainPrompt

DATA_FILE = Path(__file__).with_name("smollm2_draft_prompts.json")


@cache
def _data() -> dict:
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


def _draw(rng: random.Random, forms: list[str], subjects: list, per: int) -> list[str]:
    """``per`` distinct phrasings (forms) of every subject (a string fills ``{x}``, a dict its own fields)."""
    out = []
    for s in subjects:
        for form in rng.sample(forms, min(per, len(forms))):
            out.append(form.format(**(s if isinstance(s, dict) else {"x": s})))
    return out


def _pairs(rows: list[list[str]]) -> list[dict]:
    return [{"a": a, "b": b} for a, b in rows]


def draft_prompts(seed: int = 1) -> list[TrainPrompt]:
    """The draft-distillation prompts: open-ended registers first ("open"), then short ones ("short")."""
    d = _data()
    rng = random.Random(seed)
    opened: list[tuple[str, str]] = []

    def add(style: str, texts: list[str]) -> None:
        opened.extend((style, t) for t in texts)

    add("why", _draw(rng, d["why_forms"], d["why"], 3))
    add("how", _draw(rng, d["how_forms"], d["how"], 3))
    add(
        "story",
        [rng.choice(d["story_forms"]).format(w=w, e=e) for w in d["story_who"] for e in rng.sample(d["story_what"], 4)],
    )
    add("poem", _draw(rng, d["poem_forms"], d["poem_on"], 2))
    add("email", [rng.choice(d["email_forms"]).format(r=r, p=p) for r, p in d["email"] for _ in range(2)])
    add(
        "persona",
        [
            rng.choice(d["persona_forms"]).format(p=p, t=t)
            for p in d["persona"]
            for t in rng.sample(d["persona_task"], 4)
        ],
    )
    add("what-if", _draw(rng, d["what_if_forms"], d["what_if"], 3))
    add("history", _draw(rng, d["history_forms"], d["history"], 3))
    add("concept", _draw(rng, d["concept_forms"], d["concept"], 3))
    add("contrast", _draw(rng, d["contrast_forms"], _pairs(d["contrast"]), 3))
    add("plan", _draw(rng, d["plan_forms"], d["plan"], 3))
    add("debate", _draw(rng, d["debate_forms"], _pairs(d["debate"]), 3))
    add("product", _draw(rng, d["product_forms"], d["product"], 3))
    two, one = d["dialogue_forms"]  # between two named sides / one plural side ("two chefs")
    add("dialogue", [two.format(a=a, b=b, t=t) if b else one.format(a=a, t=t) for a, b, t in d["dialogue"]])

    short: list[tuple[str, str]] = []
    for book in d["books"]:
        short.append(("fact", rng.choice(d["book_forms"]).format(x=book)))
    for w in d["define"]:
        short.append(("define", rng.choice(d["define_forms"]).format(x=w)))
    for form in d["convert"]:
        for _ in range(3):
            short.append(("convert", d["convert_form"].format(x=form.format(n=rng.randint(2, 60)))))
    for lang, s in d["sentences"]:
        short.append(("translate", rng.choice(d["translate_forms"]).format(lang=lang, s=s)))
    for _ in range(30):
        a, b, c = rng.randint(2, 30), rng.randint(2, 12), rng.randint(10, 99)
        short.append(("arith", rng.choice(d["arith_forms"]).format(a=a, b=b, c=c, a_times_b=a * b)))

    out, seen = [], set()
    for kind, rows in (("open", opened), ("short", short)):
        for style, text in rows:
            if text.lower() not in seen:
                seen.add(text.lower())
                out.append(TrainPrompt(f"draft-{kind}-{len(out):04d}", kind, style, text))
    return out


if __name__ == "__main__":
    from collections import Counter

    ps = draft_prompts()
    print(len(ps), Counter(p.kind for p in ps), Counter(p.style for p in ps))
    for p in random.Random(0).sample(ps, 12):
        print(p.style, "|", p.text)
