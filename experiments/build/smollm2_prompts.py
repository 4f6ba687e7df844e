"""Training prompts for SmolLM2's self-distilled APAR data, written here (templates x topics).

Why our own prompts: the public prompt sets (Vicuna, MT-bench, Spec-Bench) are what we
measure on, so none of them may leak into training (tests/test_smollm2_prompts.py checks
that no prompt here is within a small edit distance of any prompt there). Two kinds:

- ``list``: prompts that invite a numbered list or several paragraphs (tips, steps,
  reasons, ways, comparisons, pros/cons, explanations): these become forking examples;
- ``short``: prompts that want one short answer (facts, arithmetic, one sentence, code):
  these must stay sequential, so the model learns *not* to fork on them.

The set is a pure function of this file (a seeded shuffle of fixed lists), so ids are
stable and a resumed generator skips exactly what it already answered.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainPrompt:
    id: str
    kind: str  # "list" | "short"
    style: str  # template family, e.g. "tips", "steps", "fact", "arith"
    text: str


# (topic as a noun phrase, a verb phrase "to ...") -- everyday subjects a small model knows.
_TOPICS: list[tuple[str, str]] = [
    ("houseplants", "keep houseplants alive"),
    ("a small vegetable garden", "start a small vegetable garden"),
    ("learning to swim", "learn to swim as an adult"),
    ("public speaking", "speak confidently in public"),
    ("saving money on groceries", "spend less on groceries"),
    ("a first marathon", "prepare for a first marathon"),
    ("learning a new language", "pick up a new language"),
    ("moving to a new city", "settle into a new city"),
    ("writing a cover letter", "write a strong cover letter"),
    ("taking care of a puppy", "raise a healthy puppy"),
    ("baking bread at home", "bake bread at home"),
    ("camping in the mountains", "camp safely in the mountains"),
    ("keeping a tidy kitchen", "keep a kitchen tidy"),
    ("studying for exams", "study for final exams"),
    ("reducing screen time", "cut down on screen time"),
    ("drinking more water", "drink more water every day"),
    ("running a team meeting", "run a useful team meeting"),
    ("photography with a phone", "take better photos with a phone"),
    ("starting a podcast", "launch a podcast"),
    ("recycling at home", "recycle more at home"),
    ("learning to play guitar", "learn the guitar"),
    ("cycling to work", "commute to work by bike"),
    ("making friends as an adult", "make new friends as an adult"),
    ("painting a room", "paint a bedroom"),
    ("choosing a laptop", "pick a good laptop"),
    ("planning a wedding", "plan a small wedding"),
    ("reading more books", "read more books each year"),
    ("cooking for one person", "cook healthy meals for one"),
    ("keeping bees", "start beekeeping"),
    ("caring for an elderly parent", "care for an aging parent"),
    ("learning to code", "start learning to program"),
    ("writing a short story", "write a short story"),
    ("hosting a dinner party", "host a dinner party"),
    ("staying warm in winter", "stay warm during a cold winter"),
    ("visiting a museum with children", "enjoy a museum visit with kids"),
    ("preparing for a job interview", "get ready for a job interview"),
    ("fixing a leaky faucet", "repair a dripping tap"),
    ("composting kitchen scraps", "compost food waste"),
    ("teaching a child to ride a bike", "teach a kid to ride a bicycle"),
    ("organizing a closet", "declutter a wardrobe"),
    ("buying a used car", "buy a second-hand car"),
    ("volunteering locally", "find volunteer work nearby"),
    ("protecting skin from the sun", "protect your skin in summer"),
    ("learning chess", "get better at chess"),
    ("birdwatching", "get started with birdwatching"),
    ("keeping a journal", "keep a daily journal"),
    ("negotiating a salary", "negotiate a higher salary"),
    ("meal prepping", "prepare a week of lunches"),
    ("building a budget", "make a monthly budget"),
    ("training for a 5k run", "train for a 5 km race"),
    ("caring for a cat", "look after a cat"),
    ("hiking with a dog", "take a dog on a long hike"),
    ("making a website", "build a personal website"),
    ("planting trees", "plant a fruit tree"),
    ("running a bake sale", "organize a school bake sale"),
    ("packing for a long flight", "pack for a long-haul flight"),
    ("writing emails at work", "write clear work emails"),
    ("brewing coffee", "brew better coffee at home"),
    ("decorating a small apartment", "decorate a tiny flat"),
    ("staying focused while studying", "concentrate while revising"),
    ("managing a remote team", "lead a team that works remotely"),
    ("saving energy at home", "lower the electricity bill"),
    ("learning to draw", "learn to sketch"),
    ("sleeping on a plane", "rest well on an overnight flight"),
    ("growing herbs indoors", "grow herbs on a windowsill"),
    ("preparing for a storm", "get a house ready for a storm"),
    ("choosing running shoes", "pick running shoes"),
    ("keeping fish in an aquarium", "set up a home aquarium"),
    ("cleaning a bathroom", "clean a bathroom quickly"),
    ("planning a road trip", "plan a road trip across the country"),
]

# {t} = topic noun phrase, {v} = verb phrase, {n} = a number of items.
_LIST_TEMPLATES: dict[str, list[str]] = {
    "tips": [
        "Give me {n} tips for {t}.",
        "What are some good tips for {t}?",
        "Share {n} practical tips on {t}.",
        "I'm new to {t}. Any tips?",
        "Could you list {n} pieces of advice about {t}?",
    ],
    "steps": [
        "What are the steps to {v}?",
        "Explain step by step how to {v}.",
        "Walk me through how to {v}, one step at a time.",
        "List the main steps needed to {v}.",
    ],
    "ways": [
        "Suggest {n} ways to {v}.",
        "In what ways can someone {v}?",
        "Name {n} different ways to {v}.",
    ],
    "reasons": [
        "Why is {t} worth the effort? Give {n} reasons.",
        "List {n} reasons people give for {t}.",
        "What are the benefits of {t}?",
    ],
    "proscons": [
        "What are the pros and cons of {t}?",
        "Weigh the advantages and disadvantages of {t}.",
    ],
    "mistakes": [
        "What common mistakes do beginners make with {t}?",
        "List {n} mistakes to avoid when you {v}.",
    ],
    "explain": [
        "Explain what someone should know before they {v}.",
        "Write a few paragraphs about {t} for a beginner.",
        "Describe the key ideas behind {t}.",
        "What should I keep in mind when I {v}?",
    ],
}

# Comparisons: pairs of things a small model can contrast.
_PAIRS = [
    ("tea", "coffee"), ("cats", "dogs"), ("trains", "planes"), ("renting", "buying a home"),
    ("e-books", "paper books"), ("city life", "country life"), ("running", "swimming"),
    ("working from an office", "working from home"), ("electric cars", "petrol cars"),
    ("summer holidays", "winter holidays"), ("Python", "Java"), ("laptops", "desktop computers"),
    ("baking", "frying"), ("yoga", "weight lifting"), ("buses", "bicycles"), ("the sea", "the mountains"),
    ("handwritten notes", "typed notes"), ("gas stoves", "induction hobs"), ("podcasts", "audiobooks"),
    ("saving", "investing"), ("group study", "studying alone"), ("board games", "video games"),
    ("wool", "cotton"), ("apples", "oranges"), ("hotels", "hostels"),
]
_COMPARE_TEMPLATES = [
    "Compare {a} and {b}.",
    "What are the main differences between {a} and {b}?",
    "{A} or {b}: which is better, and why? List the key points.",
    "How do {a} and {b} differ? Give several points.",
]

_CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Spain", "Madrid"),
    ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Peru", "Lima"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Germany", "Berlin"), ("Ireland", "Dublin"), ("Thailand", "Bangkok"), ("Mexico", "Mexico City"),
    ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Chile", "Santiago"), ("Austria", "Vienna"),
    ("Cuba", "Havana"), ("Finland", "Helsinki"), ("Russia", "Moscow"), ("China", "Beijing"),
    ("India", "New Delhi"), ("Argentina", "Buenos Aires"), ("Turkey", "Ankara"),
]
_FACT_QUESTIONS = [
    "How many legs does a spider have?", "What colour do you get by mixing blue and yellow?",
    "How many days are in a leap year?", "What is the chemical symbol for gold?",
    "Which planet is closest to the Sun?", "What is the largest ocean on Earth?",
    "How many minutes are in two hours?", "What is the freezing point of water in Celsius?",
    "Who wrote Romeo and Juliet?", "What gas do plants take in from the air?",
    "How many sides does a hexagon have?", "What is the tallest animal?",
    "In which continent is Brazil?", "What is the boiling point of water at sea level in Fahrenheit?",
    "What is the opposite of 'ancient'?", "How many hours are in a week?",
    "Which metal is liquid at room temperature?", "What is the plural of 'mouse'?",
    "What is the largest planet in the solar system?", "How many continents are there?",
    "What language is spoken in Brazil?", "What is the square root of 81?",
    "Which organ pumps blood around the body?", "How many strings does a standard violin have?",
    "What is the currency of Japan?", "What is H2O commonly called?",
    "How many players are on a football (soccer) team on the field?", "Which bird is known for saying 'hoot'?",
    "What is the past tense of 'run'?", "How many months have 31 days?",
]
_SENTENCE_TOPICS = [
    "a rainbow", "photosynthesis", "a volcano", "gravity", "a library", "the moon", "democracy", "a bicycle",
    "an umbrella", "friendship", "a compass", "the internet", "a lighthouse", "recycling", "a thunderstorm",
    "a bakery", "an orchestra", "a glacier", "a passport", "a vaccine", "a calendar", "a bridge",
    "electricity", "a desert", "honey",
]
_SENTENCE_TEMPLATES = [
    "Describe {x} in one sentence.",
    "In a single sentence, what is {x}?",
    "Write one sentence that explains {x} to a child.",
]
_CODE_TASKS = [
    "Write a Python function that returns the largest of three numbers.",
    "Write a one-line Python expression that reverses a list called items.",
    "How do I get the length of a string s in Python?",
    "Write a Python function is_even(n).",
    "Write a SQL query that selects all rows from a table named users.",
    "How do I print 'hello' in JavaScript?",
    "Write a Python function that squares every number in a list.",
    "How do I convert the string '42' to an integer in Python?",
    "Write a Python function that counts the vowels in a word.",
    "What does len([1, 2, 3]) return in Python?",
    "Write a bash command that lists the files in the current folder.",
    "How do I join the words in a Python list with spaces?",
    "Write a Python function that returns the sum of a list without using sum().",
    "Write a Python one-liner that makes the string s uppercase.",
    "How do I check whether a key is in a Python dictionary d?",
    "Write a Python function that returns the factorial of n.",
    "What is the output of print(2 ** 5) in Python?",
    "How do I read a whole text file into a string in Python?",
    "Write a JavaScript function that adds two numbers.",
    "How do I remove spaces from both ends of a string in Python?",
]


def _list_prompts(rng: random.Random) -> list[TrainPrompt]:
    out: list[TrainPrompt] = []
    for ti, (t, v) in enumerate(_TOPICS):
        styles = list(_LIST_TEMPLATES)
        rng.shuffle(styles)
        for style in styles + styles[:1]:  # every family per topic, one twice; a random phrasing each
            template = rng.choice(_LIST_TEMPLATES[style])
            text = template.format(t=t, v=v, n=rng.choice([3, 4, 5, 5, 6, 7]))
            out.append(TrainPrompt(f"list-{len(out):04d}", "list", style, text[0].upper() + text[1:]))
    for a, b in _PAIRS:
        for template in rng.sample(_COMPARE_TEMPLATES, 3):
            text = template.format(a=a, b=b, A=a[0].upper() + a[1:])
            out.append(TrainPrompt(f"list-{len(out):04d}", "list", "compare", text))
    return out


def _short_prompts(rng: random.Random) -> list[TrainPrompt]:
    out: list[TrainPrompt] = []

    def add(style: str, text: str) -> None:
        out.append(TrainPrompt(f"short-{len(out):04d}", "short", style, text))

    capital_forms = ["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital city of {c}."]
    for c, _ in _CAPITALS:
        add("fact", rng.choice(capital_forms).format(c=c))
    for q in _FACT_QUESTIONS:
        add("fact", q)
    arith_forms = ["What is {a} plus {b}?", "What is {a} times {b}?", "Compute {a} - {b}.", "What is {a} + {b}? Answer with the number."]
    for _ in range(90):
        a, b = rng.randint(2, 99), rng.randint(2, 40)
        add("arith", rng.choice(arith_forms).format(a=a, b=b))
    for x in _SENTENCE_TOPICS:
        add("sentence", rng.choice(_SENTENCE_TEMPLATES).format(x=x))
    for task in _CODE_TASKS:
        add("code", task)
    word_forms = ["Give a synonym for '{w}'.", "What is the opposite of '{w}'?", "Translate '{w}' into French."]
    for w in ["happy", "big", "fast", "cold", "bright", "quiet", "early", "strong", "easy", "old", "rich", "kind",
              "tired", "wet", "loud", "brave", "clean", "soft", "heavy", "empty"]:
        add("word", rng.choice(word_forms).format(w=w))
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
_NAMES = ["Maya", "Tom", "Priya", "Lucas", "Aiko", "Omar", "Elena", "Sam", "Nina", "Diego", "Hana", "Felix"]
_ITEMS = ["apples", "stickers", "marbles", "pencils", "cookies", "stamps", "books", "shells"]
_CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Perth", "Quebec", "Kraków", "Porto"]
_SHOPS = ["bakery", "bike repair shop", "bookshop", "flower stall", "tea room", "pottery studio"]


def _word_problem(rng: random.Random) -> str:
    n, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = rng.randint(3, 40), rng.randint(2, 9), rng.randint(2, 12)
    forms = [
        f"{n} has {a} {item}. {n} buys {b} bags with {c} {item} in each bag. How many {item} does {n} have now?",
        f"{n} had {a * b} {item} and shared them equally among {b} friends, then got {c} more. How many does {n} have?",
        f"A shop sells {item} at {b} dollars each. {n} buys {c} of them and pays with a {b * c + a}-dollar bill. "
        f"How much change does {n} get?",
        f"{n} reads {b} pages on Monday and {c} pages more each day after that than the day before. "
        f"How many pages does {n} read on Wednesday?",
        f"A train travels at {b * 10} km per hour for {c} hours, then {a} km more. How far does it go in total?",
        f"{n} saves {b} dollars every week. After {c} weeks {n} spends {a} dollars. How much is left if "
        f"{n} started with {a + b} dollars?",
    ]
    return rng.choice(forms)


def _context_question(rng: random.Random) -> str:
    n, city, shop = rng.choice(_NAMES), rng.choice(_CITIES), rng.choice(_SHOPS)
    year, staff = rng.randint(1990, 2022), rng.randint(2, 15)
    text = (f"{n} moved to {city} in {year} and opened a small {shop} near the harbour. "
            f"By the third year it employed {staff} people and stayed open every day except Monday.")
    question = rng.choice([
        f"In which year did {n} move to {city}?", f"How many people worked at the {shop}?",
        f"On which day is the {shop} closed?", f"Where did {n} open the {shop}?",
    ])
    return rng.choice([
        f"Read the text and answer the question.\nText: {text}\nQuestion: {question}",
        f"{text}\n\nBased only on the text above: {question}",
    ])


def _extraction(rng: random.Random) -> str:
    n, m, city = rng.sample(_NAMES, 2) + [rng.choice(_CITIES)]
    price, day = rng.randint(5, 90), rng.choice(["Tuesday", "Friday", "Sunday"])
    text = f"On {day}, {n} and {m} took the ferry to {city}, where tickets cost {price} euros each."
    return rng.choice([
        f"Extract the names of the people in this sentence: \"{text}\"",
        f"What price is mentioned in the following text? \"{text}\"",
        f"From this sentence, pull out the city and the day: \"{text}\"",
    ])


def _one_line_summary(rng: random.Random) -> str:
    n, city, shop = rng.choice(_NAMES), rng.choice(_CITIES), rng.choice(_SHOPS)
    text = (f"The {shop} in {city} had struggled for months. {n}, its new owner, changed the opening hours, "
            f"added a small menu of local dishes and invited schools to visit. Within a year the number of "
            f"visitors had doubled and the neighbours called it the heart of the street.")
    return rng.choice([f"Summarize in one sentence: {text}", f"Give a one-sentence summary of this text: {text}"])


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
