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
it), and the set is a pure function of this file (a seeded draw from fixed lists), so a
resumed distillation skips exactly what it already answered.
"""

from __future__ import annotations

import random

from apar_spec.experiments.smollm2_prompts import TrainPrompt

_WHY = [
    "leaves change colour in autumn", "bread goes stale", "ice floats on water", "cats purr",
    "the moon has phases", "we yawn", "metal feels colder than wood", "onions make people cry",
    "the ocean is salty", "birds fly south in winter", "rubber bands snap back", "coffee keeps people awake",
    "soap removes grease", "popcorn pops", "the sky turns red at sunset", "thunder follows lightning",
    "bicycles stay upright when moving", "people get hiccups", "paper turns yellow with age", "rivers bend",
    "deserts are cold at night", "dogs pant", "glass is transparent", "salt melts ice on roads",
    "some people are left-handed", "tides rise and fall", "muscles get sore after exercise", "apples turn brown when cut",
    "planes leave white trails", "stars twinkle", "snowflakes have six sides", "hair turns grey",
]
_WHY_FORMS = ["Why is it that {x}?", "Can you explain why {x}?", "What is the reason {x}?", "Explain to a curious child why {x}."]

_HOW = [
    "a refrigerator", "a microwave oven", "a vaccine", "a solar panel", "a compass", "an electric guitar",
    "a credit card payment", "a search engine", "a hot air balloon", "a submarine", "the human heart",
    "a rainbow", "a wind turbine", "a thermostat", "GPS navigation", "a noise-cancelling headphone",
    "a lock and key", "an elevator", "a camera lens", "a printer", "a dishwasher", "the immune system",
    "a volcano", "a touch screen", "a water filter", "a battery", "a bicycle gear system", "a library catalogue",
    "an auction", "a recycling plant", "a weather forecast", "a suspension bridge",
]
_HOW_FORMS = ["How does {x} work?", "Explain how {x} works in simple terms.", "Describe, step by step, what happens inside {x}.",
              "I have always wondered how {x} works. Can you explain it?"]

_STORY_WHO = [
    "a lighthouse keeper", "a retired astronaut", "a shy baker", "a talking fox", "a young inventor", "an old fisherman",
    "a lost robot", "a school librarian", "a street musician", "a night-shift nurse", "a clumsy wizard", "a mail carrier",
    "a girl who collects maps", "a farmer on Mars", "a detective cat", "twin sisters",
]
_STORY_WHAT = [
    "finds a mysterious key", "wakes up in a different century", "has to cross a frozen lake", "receives a letter with no sender",
    "loses their voice before a big day", "discovers a hidden garden", "befriends a stray dog", "misses the last train home",
    "must fix a broken clock tower", "wins a prize they did not enter for", "gets stuck in an elevator with a stranger",
    "opens a shop that sells memories",
]
_STORY_FORMS = ["Write a short story about {w} who {e}.", "Tell a story in which {w} {e}.",
                "Write a bedtime story where {w} {e}.", "Write the opening scene of a novel: {w} {e}."]

_POEM_ON = ["the first snow", "a busy train station", "an old oak tree", "the smell of rain", "a grandmother's kitchen",
            "the night sky over a city", "a forgotten toy", "the sea at dawn", "a long road trip", "a cup of tea",
            "starting over", "a summer thunderstorm", "the last day of school", "a lighthouse", "friendship", "autumn leaves"]
_POEM_FORMS = ["Write a poem about {x}.", "Write a short rhyming poem about {x}.", "Compose a haiku sequence about {x}.",
               "Write a free-verse poem about {x}."]

_EMAIL = [
    ("my landlord", "asking to fix a leaking tap"), ("a former teacher", "thanking them for their help"),
    ("a hotel", "asking whether pets are allowed"), ("my team", "announcing a new project"),
    ("a neighbour", "apologising for a noisy party"), ("a customer", "explaining a delayed delivery"),
    ("my manager", "asking for a day off next week"), ("a bookshop", "asking if they can order a rare book"),
    ("a friend abroad", "inviting them to visit in the summer"), ("the city council", "asking for a new bench in the park"),
    ("a gym", "cancelling a membership"), ("a colleague", "asking for feedback on a presentation"),
    ("a school", "asking about enrolment dates"), ("an old friend", "reconnecting after many years"),
]
_EMAIL_FORMS = ["Write an email to {r}, {p}.", "Draft a polite message to {r} {p}.", "Write a short letter to {r} {p}."]

_PERSONA = [
    "a medieval blacksmith", "a tour guide in ancient Rome", "a ship's captain in a storm", "a chef in a busy restaurant",
    "a park ranger", "a museum curator", "a time traveller from the year 2300", "a beekeeper", "a train conductor",
    "a veteran mountain guide", "a toy maker", "a radio host", "a dragon guarding a castle", "a friendly alien visiting Earth",
]
_PERSONA_TASK = [
    "Describe a typical day.", "Give advice to a newcomer.", "Tell us about the hardest moment of your career.",
    "Explain what you love about your work.", "Welcome a group of visitors.", "Describe the place where you work.",
]
_PERSONA_FORMS = ["Pretend you are {p}. {t}", "You are {p}. {t}", "Imagine you are {p}. {t}", "Speak as {p}: {t}"]

_WHAT_IF = [
    "humans could breathe underwater", "the internet disappeared for a month", "everyone spoke the same language",
    "cars had never been invented", "it never rained again", "people lived to 200", "animals could talk",
    "the moon were twice as close", "paper had never been invented", "there were no clocks",
    "every city banned private cars", "school lasted only three days a week", "electricity were free",
    "the Roman Empire had never fallen", "the printing press had come a thousand years earlier", "we had no sense of smell",
]
_WHAT_IF_FORMS = ["What would happen if {x}?", "Imagine a world where {x}. How would daily life change?",
                  "How would society be different if {x}?", "Describe life if {x}."]

_HISTORY = [
    "the printing press", "the Silk Road", "the first Olympic Games", "the invention of the telephone",
    "the building of the pyramids", "the Industrial Revolution", "the first moon landing", "the Renaissance",
    "the invention of paper money", "the history of chess", "the Great Wall of China", "the origins of jazz",
    "the history of coffee", "the first computers", "the Vikings", "the invention of the bicycle",
    "the history of the postal service", "the discovery of penicillin", "ancient Egyptian writing", "the history of maps",
]
_HISTORY_FORMS = ["Tell me about {x}.", "Give a short history of {x}.", "What should everyone know about {x}?",
                  "Write a few paragraphs on {x} for a school report."]

_CONCEPT = [
    "photosynthesis", "inflation", "gravity", "evolution", "supply and demand", "the water cycle", "compound interest",
    "democracy", "machine learning", "plate tectonics", "the greenhouse effect", "probability", "DNA", "opportunity cost",
    "entropy", "the placebo effect", "a black hole", "natural selection", "an ecosystem", "recursion in programming",
    "the scientific method", "renewable energy", "a food chain", "algorithms",
]
_CONCEPT_FORMS = ["What is {x}?", "Explain {x} to a beginner.", "Can you describe {x} and give an example?",
                  "What is {x}, and why does it matter?", "Explain {x} as if I were twelve."]

_CONTRAST = [
    ("weather", "climate"), ("a virus", "a bacterium"), ("speed", "velocity"), ("a loan", "a grant"),
    ("a lake", "a sea"), ("a democracy", "a monarchy"), ("RAM", "storage"), ("a simile", "a metaphor"),
    ("a comet", "an asteroid"), ("an alligator", "a crocodile"), ("baking soda", "baking powder"), ("a fruit", "a vegetable"),
    ("a novel", "a short story"), ("a hurricane", "a tornado"), ("interest", "dividends"), ("a mountain", "a hill"),
]
_CONTRAST_FORMS = ["What is the difference between {a} and {b}?", "How do {a} and {b} differ?",
                   "Explain how {a} is different from {b}."]

_PLAN = [
    "a three-day visit to Kyoto", "a weekend in Edinburgh", "a family trip to the seaside", "a week of healthy lunches",
    "a birthday party for a ten-year-old", "a month of learning to draw", "a charity bake sale", "a garden makeover",
    "a study schedule for a history exam", "a two-day hike", "a small office party", "a reading challenge for a class",
    "a road trip along the coast", "a morning routine for better sleep", "a neighbourhood clean-up day",
]
_PLAN_FORMS = ["Plan {x}.", "Help me plan {x}.", "Make a schedule for {x}.", "Write an itinerary for {x}."]

_DEBATE = [
    ("work from home", "work in an office"), ("rent a home", "buy one"), ("learn by reading", "learn by doing"),
    ("live in the city", "live in the countryside"), ("travel alone", "travel with friends"), ("cook at home", "eat out"),
    ("take a gap year", "start university straight away"), ("read e-books", "read paper books"),
    ("have one big goal", "have many small goals"), ("shop locally", "shop online"),
]
_DEBATE_FORMS = ["Is it better to {a} or {b}? Argue both sides.", "Give arguments for and against: {a} versus {b}.",
                 "Should people {a} or {b}? Discuss."]

_PRODUCT = ["a reusable water bottle", "a solar-powered lamp", "a foldable bicycle", "a smart plant pot", "a wooden puzzle",
            "a travel pillow", "noise-cancelling earbuds", "a handmade notebook", "an electric kettle", "a rain jacket",
            "a board game about space", "a herbal tea blend"]
_PRODUCT_FORMS = ["Write a product description for {x}.", "Write an advertisement for {x}.",
                  "Write a short review of {x} as a happy customer."]

_DIALOGUE = [
    ("a teacher", "a student", "homework"), ("two astronauts", None, "the view from orbit"),
    ("a customer", "a shop owner", "a broken umbrella"), ("a grandparent", "a grandchild", "phones"),
    ("a doctor", "a patient", "sleep"), ("two chefs", None, "a new recipe"), ("a coach", "a player", "losing a match"),
    ("a robot", "a child", "feelings"), ("two travellers", None, "a missed flight"), ("a writer", "an editor", "a deadline"),
]

# ---- short answers in new forms (so the drafts also see terse replies)
_BOOKS = ["Pride and Prejudice", "Hamlet", "1984", "Don Quixote", "The Odyssey", "War and Peace", "Moby-Dick",
          "Frankenstein", "Oliver Twist", "The Little Prince"]
_DEFINE = ["serendipity", "photosynthesis", "a peninsula", "an adjective", "a prime number", "a mammal", "a budget",
           "a sonnet", "erosion", "a molecule", "a verb", "humidity", "a hypothesis", "a continent", "a fraction"]
_CONVERT = ["{n} kilometres in metres", "{n} hours in minutes", "{n} kilograms in grams", "{n} minutes in seconds",
            "{n} metres in centimetres", "{n} days in hours"]
_SENTENCES = [("French", "Le chat dort sur le canapé."), ("Spanish", "Me gusta leer por la mañana."),
              ("French", "Nous allons au marché demain."), ("Spanish", "¿Dónde está la estación de tren?"),
              ("Italian", "Il pane è ancora caldo."), ("French", "Il fait très froid ce matin."),
              ("Spanish", "Mi hermano toca la guitarra."), ("Italian", "Dove posso comprare i biglietti?")]


def _draw(rng: random.Random, forms: list[str], subjects: list, per: int) -> list[str]:
    """``per`` distinct phrasings (forms) of every subject (a string fills ``{x}``, a dict its own fields)."""
    out = []
    for s in subjects:
        for form in rng.sample(forms, min(per, len(forms))):
            out.append(form.format(**(s if isinstance(s, dict) else {"x": s})))
    return out


def draft_prompts(seed: int = 1) -> list[TrainPrompt]:
    """The draft-distillation prompts: open-ended registers first ("open"), then short ones ("short")."""
    rng = random.Random(seed)
    opened: list[tuple[str, str]] = []

    def add(style: str, texts: list[str]) -> None:
        opened.extend((style, t) for t in texts)

    add("why", _draw(rng, _WHY_FORMS, _WHY, 3))
    add("how", _draw(rng, _HOW_FORMS, _HOW, 3))
    add("story", [rng.choice(_STORY_FORMS).format(w=w, e=e) for w in _STORY_WHO for e in rng.sample(_STORY_WHAT, 4)])
    add("poem", _draw(rng, _POEM_FORMS, _POEM_ON, 2))
    add("email", [rng.choice(_EMAIL_FORMS).format(r=r, p=p) for r, p in _EMAIL for _ in range(2)])
    add("persona", [rng.choice(_PERSONA_FORMS).format(p=p, t=t) for p in _PERSONA for t in rng.sample(_PERSONA_TASK, 4)])
    add("what-if", _draw(rng, _WHAT_IF_FORMS, _WHAT_IF, 3))
    add("history", _draw(rng, _HISTORY_FORMS, _HISTORY, 3))
    add("concept", _draw(rng, _CONCEPT_FORMS, _CONCEPT, 3))
    add("contrast", _draw(rng, _CONTRAST_FORMS, [{"a": a, "b": b} for a, b in _CONTRAST], 3))
    add("plan", _draw(rng, _PLAN_FORMS, _PLAN, 3))
    add("debate", _draw(rng, _DEBATE_FORMS, [{"a": a, "b": b} for a, b in _DEBATE], 3))
    add("product", _draw(rng, _PRODUCT_FORMS, _PRODUCT, 3))
    add("dialogue", [f"Write a dialogue between {a} and {b} about {t}." if b else f"Write a conversation between {a} about {t}."
                     for a, b, t in _DIALOGUE])

    short: list[tuple[str, str]] = []
    for book in _BOOKS:
        short.append(("fact", rng.choice([f"Who wrote {book}?", f"Name the author of {book}."])))
    for w in _DEFINE:
        short.append(("define", rng.choice([f"Define {w} in one sentence.", f"What is {w}? Answer briefly."])))
    for form in _CONVERT:
        for _ in range(3):
            short.append(("convert", f"How much is {form.format(n=rng.randint(2, 60))}?"))
    for lang, s in _SENTENCES:
        short.append(("translate", rng.choice([f"What does this {lang} sentence mean in English? {s}",
                                               f"Give the English version of: \"{s}\""])))
    for _ in range(30):
        a, b, c = rng.randint(2, 30), rng.randint(2, 12), rng.randint(10, 99)
        short.append(("arith", rng.choice([f"Calculate {a} * {b} + {c}.", f"What is ({c} - {a}) divided by 1?",
                                           f"If x = {a} and y = {b}, what is x * y?", f"Solve: {a}x = {a * b}. What is x?"])))

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
