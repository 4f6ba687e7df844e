"""Prompt sets for the benchmarks: a built-in set, plain text, JSONL, Spec-Bench / FastChat files.

Why a built-in set: ``apar-spec bench`` with no arguments must run offline on the
embedded models, so the prompts ship with the code. They are written out (not drawn
at import time) so the benchmark cannot drift when the corpus generator changes, and
each is in the corpus' *held-out* split (tested), so the embedded models never saw
them in training. The set mixes prompts APAR can parallelise (numbered lists,
multi-paragraph explanations) with short answers that must not fork.

File formats, told apart per file:

- ``*.jsonl`` / ``*.json`` or a first non-blank line starting with ``{``: one JSON
  object per line, either ``{"prompt": ...}`` (optional ``id``/``question_id`` and
  ``category``) or Spec-Bench / FastChat MT-Bench ``question.jsonl`` rows
  (``{"question_id", "category", "turns": [...]}``; ``turn`` picks one, first by default);
- a first non-blank line ``label;request``: Skeleton-of-Thought's router labels
  (``sot_router_labels/*.csv``; label 1 = a person judged the answer naturally a list of
  points), categories ``sot-list`` / ``sot-not-list``; the one public set of prompts labelled
  for whether their answer should be parallel, so it measures the fork decision;
- anything else: plain text, one prompt per non-blank line.

Every problem is a ``ValueError`` naming the file and line, so the CLI prints one line.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from apar_spec.jsonl import json_objects


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt. ``id`` is unique within a set (rows are keyed by it for ``--resume``)."""

    id: str
    text: str
    category: str

    def to_dict(self) -> dict:
        return asdict(self)


# category -> prompts. All held out from the training corpus (see tests/test_prompts.py).
_DEFAULT: dict[str, tuple[str, ...]] = {
    "list": (
        "List 3 ways to do well in job interviews.",
        "What are 4 ways to work well from home?",
        "List 5 ways to reduce stress.",
        "Name 6 steps to eat healthier.",
        "Suggest 7 ideas for gardening.",
        "Share 7 habits that help you travel on a budget.",
    ),
    "explain": (
        "Explain how to get more done.",
        "What should I know about better sleep?",
        "Tell me about teaching kids to read.",
    ),
    "short": (
        "What is 96 plus 94?",
        "What is the capital of Italy?",
        "How do I reverse the string s in Python?",
    ),
}


def _round_robin(sets: dict[str, tuple[str, ...]]) -> tuple[Prompt, ...]:
    """Categories interleaved, so ``--limit 3`` still benches one prompt of each."""
    out = []
    for i in range(max(len(t) for t in sets.values())):
        out += [Prompt(f"{c}-{i + 1:02d}", texts[i], c) for c, texts in sets.items() if i < len(texts)]
    return tuple(out)


BUILTIN_SETS: dict[str, tuple[Prompt, ...]] = {"default": _round_robin(_DEFAULT)}
DEFAULT_SET = "default"
PLAIN_CATEGORY = "general"  # category of prompts from files that do not name one
SOT_HEADER = "label;request"  # first line of a Skeleton-of-Thought router-label file
SOT_CATEGORIES = {"1": "sot-list", "0": "sot-not-list"}  # its label -> our category


def load_prompts(
    source: str | Path = DEFAULT_SET,
    *,
    category: str | Sequence[str] | None = None,
    limit: int | None = None,
    turn: int = 0,
) -> list[Prompt]:
    """The prompts of a built-in set name or a file, filtered by ``category`` then cut to ``limit``.

    ``category`` may be one name, a comma-separated string or a list; an unknown one is
    an error that lists the set's categories (a typo should not silently bench nothing).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1 (got {limit})")
    if turn < 0:
        raise ValueError(f"turn must be >= 0 (got {turn})")
    name = str(source)
    if name in BUILTIN_SETS:
        prompts = list(BUILTIN_SETS[name])
    else:
        path = Path(name).expanduser()
        if not path.exists():
            close = difflib.get_close_matches(name, list(BUILTIN_SETS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise FileNotFoundError(
                f"prompt file '{name}' not found, and it is not a built-in set ({', '.join(BUILTIN_SETS)}){hint}"
            )
        if not path.is_file():
            raise ValueError(f"prompt source '{name}' is a directory; pass a file (text, JSONL or question.jsonl)")
        prompts = read_prompt_file(path, turn=turn)
    if category:
        wanted = [c.strip() for c in category.split(",")] if isinstance(category, str) else list(category)
        known = sorted({p.category for p in prompts})
        for c in wanted:
            if c not in known:
                close = difflib.get_close_matches(c, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"unknown category '{c}' in {name} (categories: {', '.join(known)}){hint}")
        prompts = [p for p in prompts if p.category in wanted]
    return prompts[:limit] if limit is not None else prompts


def read_prompt_file(path: str | Path, *, turn: int = 0) -> list[Prompt]:
    """Parse one prompt file (format detected per file, see the module docstring)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read prompt file {path}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: not valid UTF-8") from None
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), None)
    if first is None:
        raise ValueError(f"prompt file {path} has no prompts (it is empty)")
    is_jsonl = path.suffix.lower() in (".jsonl", ".json") or first.lstrip().startswith("{")
    if first.strip().lower() == SOT_HEADER:
        prompts = _parse_sot_labels(path, text)
    else:
        prompts = _parse_jsonl(path, lines, turn) if is_jsonl else _parse_text(lines)
    seen: dict[str, int] = {}
    for p, line_no in prompts:
        if p.id in seen:
            raise ValueError(f"{path} line {line_no}: duplicate prompt id '{p.id}' (first on line {seen[p.id]})")
        seen[p.id] = line_no
    return [p for p, _ in prompts]


def _parse_text(lines: list[str]) -> list[tuple[Prompt, int]]:
    return [(Prompt(f"L{n}", ln.strip(), PLAIN_CATEGORY), n) for n, ln in enumerate(lines, start=1) if ln.strip()]


def _parse_sot_labels(path: Path, text: str) -> list[tuple[Prompt, int]]:
    """``label;request`` CSV rows after the header (``;``-separated, a quoted request may span lines)."""
    import csv
    import io

    out: list[tuple[Prompt, int]] = []
    reader = csv.reader(io.StringIO(text), delimiter=";")
    header_seen, start = False, 1
    for row in reader:
        line, start = start, reader.line_num + 1  # the row's first line (line_num is its last)
        if not any(c.strip() for c in row):
            continue
        if not header_seen:
            header_seen = True
            continue
        label, request = row[0].strip(), ";".join(row[1:]).strip()
        if label not in SOT_CATEGORIES:
            raise ValueError(f"{path} line {line}: the label must be 0 or 1 (got '{label[:20]}')")
        if not request:
            raise ValueError(f"{path} line {line}: the request is empty")
        out.append((Prompt(f"L{line}", request, SOT_CATEGORIES[label]), line))
    if not out:
        raise ValueError(f"prompt file {path} has a '{SOT_HEADER}' header but no rows")
    return out


def _parse_jsonl(path: Path, lines: list[str], turn: int) -> list[tuple[Prompt, int]]:
    out = []
    for n, where, row in json_objects(path, lines):
        if "turns" in row:
            turns = row["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                raise ValueError(f"{where}: 'turns' must be a non-empty list of strings")
            if turn >= len(turns):
                raise ValueError(f"{where}: has {len(turns)} turn(s), so turn {turn} does not exist")
            text = turns[turn]
        elif "prompt" in row:
            text = row["prompt"]
            if not isinstance(text, str):
                raise ValueError(f"{where}: 'prompt' must be a string, got {type(text).__name__}")
        else:
            raise ValueError(
                f"{where}: needs a 'prompt' string or a 'turns' list (Spec-Bench / FastChat question.jsonl)"
            )
        if not text.strip():
            raise ValueError(f"{where}: the prompt is empty")
        pid = row.get("question_id", row.get("id", f"L{n}"))
        category = row.get("category", PLAIN_CATEGORY)
        if not isinstance(category, str) or not category.strip():
            raise ValueError(f"{where}: 'category' must be a non-empty string")
        out.append((Prompt(str(pid), text, category), n))
    return out


def _set_tag(source: str) -> str:
    """The prefix of a set's ids and categories when several are mixed: the folder of a
    FastChat / Spec-Bench ``question.jsonl`` (the folder names the set), else the file's
    stem (``sot_router_labels/vicuna_router.csv`` -> ``vicuna_router``)."""
    path = Path(source)
    if path.name == "question.jsonl" and path.parent.name:
        return path.parent.name
    return path.stem or source


def select_prompts(
    source: str | Path = DEFAULT_SET,
    *,
    category: str | None = None,
    per_category: int | None = None,
    limit: int | None = None,
    turn: int = 0,
) -> list[Prompt]:
    """Prompts of one set, or of several given comma-separated (``a/question.jsonl,b/question.jsonl``).

    One set without ``per_category``: ``load_prompts`` (file order). Otherwise ids and
    categories of several sets get the set's folder name as a prefix
    (``vicuna_bench/generic``), ``per_category`` keeps the first N of each category, and
    categories are interleaved round-robin, so a run stopped early (or ``limit``) still
    covers every category.
    """
    from dataclasses import replace

    sources = [s.strip() for s in str(source).split(",") if s.strip()]
    if not sources:
        raise ValueError("no prompt source given")
    if per_category is not None and per_category < 1:
        raise ValueError(f"--per-category must be >= 1 (got {per_category})")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1 (got {limit})")
    if len(sources) == 1 and not per_category:
        return load_prompts(sources[0], category=category, limit=limit, turn=turn)
    several = len(sources) > 1
    by_cat: dict[str, list[Prompt]] = {}
    for src in sources:
        tag = _set_tag(src)
        for p in load_prompts(src, turn=turn):
            if several:
                p = replace(p, id=f"{tag}/{p.id}", category=f"{tag}/{p.category}")
            by_cat.setdefault(p.category, []).append(p)
    if category:
        wanted = [c.strip() for c in category.split(",")]
        for c in wanted:
            if c not in by_cat:
                close = difflib.get_close_matches(c, list(by_cat), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"unknown category '{c}' (categories: {', '.join(sorted(by_cat))}){hint}")
        by_cat = {c: by_cat[c] for c in wanted}
    if per_category:
        by_cat = {c: ps[:per_category] for c, ps in by_cat.items()}
    out: list[Prompt] = []
    for i in range(max((len(v) for v in by_cat.values()), default=0)):
        out += [ps[i] for ps in by_cat.values() if i < len(ps)]
    if not out:
        raise ValueError("no prompts selected")
    return out[:limit] if limit else out
