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


def _topic(key: str, name: str, goal: str, titles: str) -> Topic:
    return Topic(key, name, goal, tuple(t.strip() for t in titles.split(",")))


TOPICS: tuple[Topic, ...] = (
    _topic("sleep", "better sleep", "sleep better", "Fixed bedtime, Dark room, Fewer screens, Less caffeine, Cool bedroom, Daily exercise, Light dinner, Calm routine, Morning sunlight, Short naps"),
    _topic("cooking", "cooking at home", "cook more at home", "Weekly menu, Simple recipes, Sharp knives, Batch cooking, Fresh herbs, Clean workspace, Spice rack, Taste often, Prep ahead, Leftover plans"),
    _topic("money", "saving money", "save money", "Monthly budget, Automatic transfers, Cheaper groceries, Fewer subscriptions, Emergency fund, Price comparison, Home meals, Waiting period, Used items, Clear goals"),
    _topic("language", "learning a language", "learn a new language", "Daily practice, Flash cards, Native speakers, Simple books, Language apps, Short lessons, Speaking aloud, Song lyrics, Travel plans, Grammar basics"),
    _topic("gardening", "gardening", "start a garden", "Good soil, Sunny spot, Regular watering, Native plants, Compost pile, Mulch layer, Raised beds, Pest checks, Seasonal planting, Garden journal"),
    _topic("running", "running", "run farther", "Proper shoes, Slow start, Rest days, Steady pace, Warm up, Stretching, Interval training, Running partner, Hydration, Training log"),
    _topic("python", "learning Python", "learn Python", "Small projects, Official tutorial, Daily coding, Reading code, Clear names, Unit tests, Debugging skills, Online forums, Standard library, Code reviews"),
    _topic("exams", "studying for exams", "study for exams", "Study schedule, Active recall, Practice tests, Short breaks, Quiet place, Study group, Clear notes, Enough sleep, Past papers, Teaching others"),
    _topic("productivity", "staying productive", "get more done", "Task list, Single tasking, Time blocks, Fewer meetings, Clear priorities, Phone away, Early start, Regular breaks, Weekly review, Simple tools"),
    _topic("reading", "reading more books", "read more books", "Daily habit, Library card, Book club, Short books, Reading list, Audio books, Quiet corner, Phone limits, Reading goals, Varied genres"),
    _topic("eating", "healthy eating", "eat healthier", "More vegetables, Whole grains, Less sugar, Water first, Smaller plates, Home cooking, Healthy snacks, Meal planning, Slow eating, Food labels"),
    _topic("strength", "strength training", "get stronger", "Proper form, Progressive load, Compound lifts, Rest days, Enough protein, Training plan, Warm up, Good coach, Tracking progress, Full range"),
    _topic("stress", "managing stress", "reduce stress", "Deep breathing, Daily walks, Clear boundaries, Talking openly, Regular sleep, Less news, Simple hobbies, Time outdoors, Gratitude notes, Gentle exercise"),
    _topic("speaking", "public speaking", "speak well in public", "Clear structure, Practice aloud, Know your audience, Slow pace, Eye contact, Simple slides, Strong opening, Deep breaths, Short stories, Honest feedback"),
    _topic("travel", "traveling on a budget", "travel on a budget", "Off season, Flexible dates, Cheap flights, Public transport, Local food, Light packing, Shared rooms, Free tours, Travel cards, Price alerts"),
    _topic("essays", "writing better essays", "write better essays", "Clear thesis, Short outline, Simple words, Strong examples, Active voice, Careful editing, Reading aloud, Good sources, Topic sentences, Fresh eyes"),
    _topic("home", "organizing your home", "organize your home", "Daily tidy, Clear surfaces, Storage boxes, Fewer things, Labels, Donation bag, Closet sort, Cleaning schedule, Entry station, Family rules"),
    _topic("remote", "working from home", "work well from home", "Dedicated desk, Fixed hours, Good chair, Video calls, Clear updates, Lunch break, Natural light, Quiet space, Daily plan, End ritual"),
    _topic("guitar", "learning guitar", "learn the guitar", "Basic chords, Daily practice, Tuned strings, Slow songs, Metronome, Finger exercises, Good teacher, Recording yourself, Strumming patterns, Simple scales"),
    _topic("interviews", "job interviews", "do well in job interviews", "Company research, Practice answers, Clear examples, Smart questions, Early arrival, Neat clothes, Calm voice, Thank you note, Honest answers, Good posture"),
    _topic("water", "drinking more water", "drink more water", "Water bottle, Phone reminders, Glass at meals, Fruit slices, Morning glass, Tracking app, Herbal tea, Juicy foods, Fewer sodas, Drink before exercise"),
    _topic("photos", "taking better photos", "take better photos", "Good light, Rule of thirds, Steady hands, Clean lens, Simple background, Close subjects, Many shots, Eye level, Editing basics, Natural poses"),
    _topic("friends", "making new friends", "make new friends", "Shared hobbies, Local clubs, Regular meetups, Open questions, Good listening, Small favors, Follow up, Volunteer work, Kind words, Patience"),
    _topic("cycling", "cycling to work", "cycle to work", "Safe route, Good helmet, Bright lights, Bike lock, Rain gear, Basic repairs, Spare tube, Change of clothes, Steady pace, Bike check"),
    _topic("meditation", "meditation", "start meditating", "Short sessions, Quiet place, Same time, Breath focus, Guided audio, Comfortable posture, Gentle attention, Body scan, Meditation journal, Patience"),
    _topic("kids_reading", "teaching kids to read", "help kids learn to read", "Daily reading, Picture books, Letter sounds, Library visits, Reading aloud, Word games, Favorite stories, Praise effort, Quiet time, Bedtime books"),
    _topic("houseplants", "caring for houseplants", "care for houseplants", "Right light, Careful watering, Good drainage, Humidity, Occasional feeding, Dust leaves, Bigger pots, Pest checks, Rotate pots, Right plants"),
    _topic("mornings", "waking up early", "wake up early", "Earlier bedtime, Distant alarm, Morning plan, Bright light, Slow change, No snooze, Evening routine, Morning walk, Fixed schedule, Small rewards"),
    _topic("math", "learning math", "get better at math", "Basic facts, Daily problems, Worked examples, Show steps, Ask questions, Real examples, Check answers, Math games, Spaced practice, Patient review"),
    _topic("green", "living more sustainably", "live more sustainably", "Less plastic, Reusable bags, Public transport, Local food, Energy saving, Repair items, Less meat, Shorter showers, Second hand, Composting"),
    _topic("swimming", "learning to swim", "learn to swim", "Shallow water, Floating first, Breath control, Kick practice, Good teacher, Swim goggles, Short sessions, Arm strokes, Calm mind, Regular lessons"),
    _topic("dogs", "caring for a dog", "care for a dog", "Daily walks, Good food, Fresh water, Vet visits, Basic training, Play time, Regular grooming, Safe toys, Clear rules, Quiet bed"),
)

# ------------------------------------------------------------------ shared fragments

_BENEFITS = (
    "builds a steady routine", "saves time and energy", "keeps you focused on what matters",
    "lowers stress", "gives you quick feedback", "makes progress easy to see",
    "helps you stay consistent", "removes a common obstacle", "turns a big goal into small steps",
    "keeps your motivation high",
)
_FREQUENCIES = ("every day", "three times a week", "each morning", "every evening", "on weekends", "twice a week")
_DURATIONS = ("ten minutes", "twenty minutes", "half an hour", "one hour", "fifteen minutes")
_PERIODS = ("a week", "two weeks", "a month", "a few days", "three weeks")

# Detail sentence 1 ties the item to the goal; sentence 2 gives practical advice.
_WHY_SENTENCES = (
    "Focusing on {t} makes it easier to {goal}.",
    "Working on {t} is worth it because it {benefit}.",
    "Caring about {t} helps because it {benefit}.",
    "People who care about {t} often find it easier to {goal}.",
    "If you want to {goal}, start with {t}.",
    "Paying attention to {t} {benefit}.",
)
_HOW_SENTENCES = (
    "Try it {freq} for {dur} at first.",
    "Start with about {dur} {freq} and add more once it feels easy.",
    "Most people notice a difference within {period} if they stay consistent.",
    "Write down what you did so you can see your progress after {period}.",
    "Ask a friend to join you, since that makes it easier to keep going.",
    "Doing it {freq} matters more than doing it perfectly.",
    "Set a reminder so you remember to do it {freq}.",
    "Keep it simple and give yourself {period} to build the habit.",
)

# (prompt template, noun used by the intro line)
_LIST_PROMPTS = (
    ("Give {n} tips for {name}.", "tips"),
    ("List {n} ways to {goal}.", "ways"),
    ("What are {n} ways to {goal}?", "ways"),
    ("Name {n} steps to {goal}.", "steps"),
    ("Suggest {n} ideas for {name}.", "ideas"),
    ("List {n} reasons to {goal}.", "reasons"),
    ("Share {n} habits that help you {goal}.", "habits"),
    ("What are {n} simple tips to {goal}?", "tips"),
)
_INTROS = (
    "Here are {n} {noun} for {name}:",
    "Here are {n} {noun} to help you {goal}:",
    "Sure! Here are {n} {noun} that can help you {goal}:",
    "Try these {n} {noun} to {goal}:",
)
_OUTROS = (
    "Start with one or two of these and build from there.",
    "Small changes add up over time, so be patient.",
    "Pick the ones that fit your life and stay consistent.",
    "You do not need to do everything at once.",
    "Try them for a few weeks and see what works for you.",
)

_EXPLAIN_PROMPTS = (
    "Explain how to {goal}.",
    "Why does {name} matter?",
    "Tell me about {name}.",
    "How can I {goal}?",
    "Describe a good approach to {name}.",
    "What should I know about {name}?",
)
_OPENING_SENTENCES = (
    "{Name} is easier than it looks when you focus on a few basics.",
    "Many people want to {goal}, but they are not sure where to begin.",
    "{Name} is a skill that anyone can build with time.",
)
_MIDDLE_SENTENCES = (
    "Another important part is {t}.",
    "Next, pay attention to {t}.",
    "It also helps to think about {t}.",
    "Do not overlook {t}.",
    "A second key idea is {t}.",
)
_CLOSING_SENTENCES = (
    "Finally, be patient with yourself.",
    "In the end, small steps add up.",
    "Finally, remember that progress takes time.",
)

# ------------------------------------------------------------------ no-fork pools

_OPERATIONS: tuple[tuple[str, Callable[[int, int], int]], ...] = (
    ("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b),
)
_ARITHMETIC_PROMPTS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?", "Calculate {a} {op} {b}.")
_ARITHMETIC_ANSWERS = ("{a} {op} {b} is {c}.", "{a} {op} {b} equals {c}.")
_CAPITALS = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Chile", "Santiago"), ("Thailand", "Bangkok"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Argentina", "Buenos Aires"),
)
_FACTS = (
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("How many minutes are in an hour?", "There are sixty minutes in an hour."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("At what temperature does water boil at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("At what temperature does water freeze?", "Water freezes at 0 degrees Celsius."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("What planet do we live on?", "We live on Earth."),
    ("How many continents are there?", "There are seven continents."),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("How many hours are in a day?", "There are twenty four hours in a day."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle."),
    ("What do bees make?", "Bees make honey."),
)
_STRING_VARS = ("s", "text", "word", "name", "line")
_LIST_VARS = ("xs", "nums", "items", "values")
_CODE = (
    ("How do I reverse the string {s} in Python?", "Use `{s}[::-1]`."),
    ("How do I make the string {s} upper case in Python?", "Use `{s}.upper()`."),
    ("How do I remove spaces around the string {s} in Python?", "Use `{s}.strip()`."),
    ("How do I split the string {s} into words in Python?", "Use `{s}.split()`."),
    ("How do I turn the string {s} into an integer in Python?", "Use `int({s})`."),
    ("How do I get the length of the list {xs} in Python?", "Use `len({xs})`."),
    ("How do I sort the list {xs} in Python?", "Use `sorted({xs})`."),
    ("How do I sum the list {xs} in Python?", "Use `sum({xs})`."),
    ("How do I get the last item of the list {xs} in Python?", "Use `{xs}[-1]`."),
    ("How do I find the largest number in the list {xs} in Python?", "Use `max({xs})`."),
)
_DEFINITIONS = (
    ("habit", "a habit is something you do regularly, often without thinking about it"),
    ("budget", "a budget is a plan for how you will spend and save your money"),
    ("recipe", "a recipe is a list of ingredients and steps for making a dish"),
    ("compost", "compost is decayed plant and food waste that feeds the soil"),
    ("vocabulary", "vocabulary is the set of words a person knows and uses"),
    ("posture", "posture is the way you hold your body when you sit or stand"),
    ("metronome", "a metronome is a device that clicks at a steady beat to help musicians keep time"),
    ("thesis", "a thesis is the main claim that an essay argues for"),
    ("mulch", "mulch is a layer of material spread over soil to keep in moisture"),
    ("protein", "protein is a nutrient the body uses to build and repair muscle"),
    ("deadline", "a deadline is the latest time by which a task must be done"),
    ("variable", "a variable is a name that refers to a value in a program"),
    ("function", "a function is a named block of code that performs a task"),
    ("fraction", "a fraction is a number that represents part of a whole"),
    ("password", "a password is a secret word or phrase used to prove who you are"),
    ("calendar", "a calendar is a chart that shows the days, weeks and months of a year"),
    ("interval", "an interval is a period of time between two events"),
    ("grammar", "grammar is the set of rules for how words are put together in a language"),
)
_DEFINITION_PROMPTS = ("What does the word {w} mean?", "Define {w} in one sentence.", "What is meant by {w}?")
_KEY_PROMPTS = ("In one sentence, what is the key to {name}?", "What is the single most important thing for {name}?")


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
    return rng.choice(_ARITHMETIC_PROMPTS).format(**slots), rng.choice(_ARITHMETIC_ANSWERS).format(**slots), "arithmetic"


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
