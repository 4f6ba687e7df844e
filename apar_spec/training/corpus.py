"""A synthetic instruction corpus, deterministic by seed, for training the embedded tiny models.

The tiny base, APAR and draft models are trained on a 2-core CPU, so the corpus
keeps a modest vocabulary and short answers, yet composes every answer from many
fragments (per-topic title pools, detail sentence templates, slot fillers) so a
model has to learn the *form* rather than memorise a few answers. Three kinds:

- ``"list"``: "Give 4 tips for better sleep." -> an intro line, exactly N items
  ``N. Title: details`` (3..7 items; 1-3 word titles; two-sentence details of about
  15-30 words, so APAR's parent writes a few tokens per item while children write
  the bulk: that is where APAR halves the sequential steps), sometimes an outro.
- ``"explain"``: 3-4 paragraphs of 2-3 sentences, which fork once per paragraph.
- ``"noforks"``: arithmetic, short facts, one-line code, short definitions and
  one-sentence topic answers, which must never fork: the APAR model has to learn
  *when not* to fork as much as where to.

Held-out split: a prompt belongs to ``"heldout"`` iff a stable hash of its text
falls in the held-out bucket (10%), so held-out prompts never occur in ``"train"``
(answers to them still reuse the training fragments: the held-out set measures
generalisation to new prompt combinations, not new vocabulary).

The literal tables (topics, templates, fillers, no-fork pools) are package data in
``corpus_data.json`` next to this module; the code here only draws from them.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

KINDS = ("list", "explain", "noforks")
SPLITS = ("train", "heldout")
DEFAULT_MIX: Mapping[str, float] = {"list": 0.5, "explain": 0.25, "noforks": 0.25}
MIN_ITEMS, MAX_ITEMS = 3, 7
HELDOUT_PERCENT = 10
_MAX_DRAWS_PER_EXAMPLE = 10_000


@dataclass(frozen=True)
class Example:
    """One (prompt, answer) pair; ``topic`` is a topic key or a no-fork category."""

    prompt: str
    answer: str
    kind: str
    topic: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Topic:
    """A subject: ``name`` reads after "tips for", ``goal`` after "ways to"; ``titles`` are item titles."""

    key: str
    name: str
    goal: str
    titles: tuple[str, ...]


# The literal tables (topics and their item titles, sentence templates, slot fillers, the
# no-fork pools) live in corpus_data.json next to this module; the code below only draws.
DATA_FILE = Path(__file__).with_name("corpus_data.json")
_DATA = json.loads(DATA_FILE.read_text(encoding="utf-8"))


def _table(name: str) -> tuple:
    """A table of the data file as a tuple (rows as tuples), like the literals it replaced."""
    return tuple(tuple(row) if isinstance(row, list) else row for row in _DATA[name])


TOPICS: tuple[Topic, ...] = tuple(Topic(t["key"], t["name"], t["goal"], tuple(t["titles"])) for t in _DATA["topics"])

# ------------------------------------------------------------------ shared fragments

_BENEFITS = _table("benefits")
_FREQUENCIES = _table("frequencies")
_DURATIONS = _table("durations")
_PERIODS = _table("periods")

# Detail sentence 1 ties the item to the goal ({t}, {goal}, {benefit}); sentence 2 gives practical advice.
_WHY_SENTENCES = _table("why_sentences")
_HOW_SENTENCES = _table("how_sentences")

# (prompt template, noun used by the intro line)
_LIST_PROMPTS: tuple[tuple[str, str], ...] = _table("list_prompts")
_INTROS = _table("intros")
_OUTROS = _table("outros")

_EXPLAIN_PROMPTS = _table("explain_prompts")
_OPENING_SENTENCES = _table("opening_sentences")
_MIDDLE_SENTENCES = _table("middle_sentences")
_CLOSING_SENTENCES = _table("closing_sentences")

# ------------------------------------------------------------------ no-fork pools

_OPERATIONS: tuple[tuple[str, Callable[[int, int], int]], ...] = (
    ("plus", lambda a, b: a + b),
    ("minus", lambda a, b: a - b),
    ("times", lambda a, b: a * b),
)
_ARITHMETIC_PROMPTS = _table("arithmetic_prompts")
_ARITHMETIC_ANSWERS = _table("arithmetic_answers")
_CAPITALS: tuple[tuple[str, str], ...] = _table("capitals")  # (country, capital)
_FACTS: tuple[tuple[str, str], ...] = _table("facts")  # (question, answer)
_STRING_VARS = _table("string_vars")
_LIST_VARS = _table("list_vars")
_CODE: tuple[tuple[str, str], ...] = _table("code")  # (question, answer) with {s} / {xs}
_DEFINITIONS: tuple[tuple[str, str], ...] = _table("definitions")  # (word, meaning)
_DEFINITION_PROMPTS = _table("definition_prompts")
_KEY_PROMPTS = _table("key_prompts")


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _fill(template: str, rng: random.Random, topic: Topic | None = None, title: str | None = None, **extra) -> str:
    """Fill a template's slots; filler slots are drawn from ``rng`` only when the template uses them."""
    slots = dict(extra)
    if topic is not None:
        slots.update(name=topic.name, Name=_cap(topic.name), goal=topic.goal)
    if title is not None:
        slots.update(t=title.lower())
    for slot, pool in (("benefit", _BENEFITS), ("freq", _FREQUENCIES), ("dur", _DURATIONS), ("period", _PERIODS)):
        if "{" + slot + "}" in template:
            slots[slot] = rng.choice(pool)
    return template.format(**slots)


def _details(rng: random.Random, topic: Topic, title: str) -> str:
    """Two sentences (~15-30 words) about one item: why it helps, then how to do it.

    Sentences start with a gerund ("Focusing on dark room ...") rather than the bare
    title so the verb agrees whether the title is singular or plural.
    """
    why = _fill(rng.choice(_WHY_SENTENCES), rng, topic, title)
    how = _fill(rng.choice(_HOW_SENTENCES), rng, topic, title)
    return f"{why} {how}"


def _list_example(rng: random.Random) -> Example:
    topic = rng.choice(TOPICS)
    n = rng.randint(MIN_ITEMS, MAX_ITEMS)
    prompt_template, noun = rng.choice(_LIST_PROMPTS)
    prompt = _fill(prompt_template, rng, topic, n=n)
    titles = rng.sample(topic.titles, n)
    lines = [_fill(rng.choice(_INTROS), rng, topic, n=n, noun=noun)]
    lines += [f"{i}. {title}: {_details(rng, topic, title)}" for i, title in enumerate(titles, start=1)]
    answer = "\n".join(lines)
    if rng.random() < 0.5:
        answer += "\n\n" + rng.choice(_OUTROS)
    return Example(prompt, answer, "list", topic.key)


def _explain_example(rng: random.Random) -> Example:
    """3-4 paragraphs, each a topic-sentence plus 1-2 detail sentences (so each forks once)."""
    topic = rng.choice(TOPICS)
    prompt = _fill(rng.choice(_EXPLAIN_PROMPTS), rng, topic)
    n_paragraphs = rng.randint(3, 4)
    titles = rng.sample(topic.titles, n_paragraphs)
    middles = rng.sample(_MIDDLE_SENTENCES, n_paragraphs - 2)
    paragraphs = []
    for k, title in enumerate(titles):
        if k == 0:
            first = _fill(rng.choice(_OPENING_SENTENCES), rng, topic)
            body = [f"One of the most useful basics is {title.lower()}, because it {rng.choice(_BENEFITS)}."]
        elif k == n_paragraphs - 1:
            first = rng.choice(_CLOSING_SENTENCES)
            body = [_fill("Pick one idea, such as {t}, and practice it {freq} for {period}.", rng, topic, title)]
        else:
            first = _fill(middles[k - 1], rng, topic, title)
            body = [_fill("This {benefit}, which makes it easier to {goal}.", rng, topic, title)]
        if rng.random() < 0.5:
            body.append(_fill(rng.choice(_HOW_SENTENCES), rng, topic, title))
        paragraphs.append(" ".join([first, *body]))
    return Example(prompt, "\n\n".join(paragraphs), "explain", topic.key)


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    op, fn = rng.choice(_OPERATIONS)
    a, b = (rng.randint(2, 12), rng.randint(2, 20)) if op == "times" else (rng.randint(2, 99), rng.randint(2, 99))
    if op == "minus" and b > a:
        a, b = b, a
    slots = {"a": a, "b": b, "op": op, "c": fn(a, b)}
    return (
        rng.choice(_ARITHMETIC_PROMPTS).format(**slots),
        rng.choice(_ARITHMETIC_ANSWERS).format(**slots),
        "arithmetic",
    )


def _fact(rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.5:
        country, capital = rng.choice(_CAPITALS)
        return f"What is the capital of {country}?", f"The capital of {country} is {capital}.", "facts"
    question, answer = rng.choice(_FACTS)
    return question, answer, "facts"


def _code(rng: random.Random) -> tuple[str, str, str]:
    prompt, answer = rng.choice(_CODE)
    slots = {"s": rng.choice(_STRING_VARS), "xs": rng.choice(_LIST_VARS)}
    return prompt.format(**slots), answer.format(**slots), "code"


def _definition(rng: random.Random) -> tuple[str, str, str]:
    word, meaning = rng.choice(_DEFINITIONS)
    return rng.choice(_DEFINITION_PROMPTS).format(w=word), _cap(meaning) + ".", "definitions"


def _key_idea(rng: random.Random) -> tuple[str, str, str]:
    """A list-able topic asked for one sentence: teaches that the topic alone does not mean "fork"."""
    topic = rng.choice(TOPICS)
    answer = _fill("The key to {name} is {t}, done {freq}.", rng, topic, rng.choice(topic.titles))
    return _fill(rng.choice(_KEY_PROMPTS), rng, topic), answer, topic.key


_NOFORK_MAKERS = (_arithmetic, _fact, _code, _definition, _key_idea)


def _noforks_example(rng: random.Random) -> Example:
    prompt, answer, topic = rng.choice(_NOFORK_MAKERS)(rng)
    return Example(prompt, answer, "noforks", topic)


_MAKERS: Mapping[str, Callable[[random.Random], Example]] = {
    "list": _list_example,
    "explain": _explain_example,
    "noforks": _noforks_example,
}


def split_of(prompt: str) -> str:
    """``"heldout"`` or ``"train"``: a stable hash of the prompt (not ``hash()``, which varies per process)."""
    return "heldout" if zlib.crc32(prompt.encode("utf-8")) % 100 < HELDOUT_PERCENT else "train"


def _kind_counts(n: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Exact per-kind counts summing to ``n`` (largest remainder), so small corpora keep the mix."""
    total = sum(weights.values())
    quotas = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(q) for k, q in quotas.items()}
    for k in sorted(quotas, key=lambda k: quotas[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def make_corpus(
    n: int,
    *,
    seed: int = 0,
    split: str = "train",
    kinds: Iterable[str] = KINDS,
    mix: Mapping[str, float] | None = None,
) -> list[Example]:
    """``n`` examples of ``split``, the same for the same arguments.

    ``mix`` weights the kinds (default :data:`DEFAULT_MIX`); only ``kinds`` are drawn.
    Counts per kind are exact (largest remainder) and the order is shuffled.
    """
    kinds = tuple(kinds)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    unknown = sorted((set(kinds) | set(mix or {})) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    weights = {k: float((mix or DEFAULT_MIX).get(k, 0.0)) for k in kinds}
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"mix must give a positive total weight to the chosen kinds {kinds}, got {weights}")

    rng = random.Random(seed)
    plan = [kind for kind, count in _kind_counts(n, weights).items() for _ in range(count)]
    rng.shuffle(plan)
    examples = []
    for kind in plan:
        for _ in range(_MAX_DRAWS_PER_EXAMPLE):
            example = _MAKERS[kind](rng)
            if split_of(example.prompt) == split:
                examples.append(example)
                break
        else:
            raise RuntimeError(f"no {split} prompt of kind {kind!r} found in {_MAX_DRAWS_PER_EXAMPLE} draws")
    return examples


def write_jsonl(examples: Iterable[Example], path: str | Path) -> int:
    """Write one ``Example.to_dict()`` per line (readable by ``restructure.convert_file``); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example.to_dict(), ensure_ascii=False) + "\n")
            count += 1
    return count
