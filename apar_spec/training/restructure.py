"""Turn a plain (prompt, answer) pair into an APAR :class:`AnswerTree` (the paper's data restructuring).

APAR (arXiv 2401.06761) teaches a model to emit ``[Fork]`` where the rest of a
passage does not depend on what follows it, so a child branch can write it while
the parent moves on. The paper finds such places with two rules, tried in order:

1. **Ordered list** — a run of at least 3 top-level items ``N. Title: details``
   numbered 1..N. The parent keeps ``"1. Title:"``, forks right after the colon,
   and its text continues with the separator and the next head (``"\\n2. Title:"``);
   the child writes ``" details"`` (leading space kept). Intro and outro text stay
   in the parent. Several such lists in one answer all fork.
2. **Paragraphs** — otherwise, if the answer has more than 2 blank-line separated
   blocks, each prose paragraph keeps its first sentence in the parent, forks after
   it, and the child writes the rest (leading space kept); ``"\\n\\n"`` stays in the
   parent. One-sentence paragraphs, code, tables and list-like blocks do not fork.
   ``whole_lead=N`` (not in the paper; default 0) keeps the first N paragraphs that
   could fork whole in the parent. Why: with the paper's rule a paragraph-style root
   never writes a whole paragraph, while every child does and then stops; a model
   trained on that ends the answer after its first whole paragraph. A lead paragraph
   teaches the root to go on after one.

Anything else stays unstructured (a tree with no forks). Both rules cut the
original text without rewriting it, so ``restructure(a).reassemble() == a``
exactly, whatever the newlines (``\\r\\n`` included): the ``\\r`` of a line break
belongs to the separator, so it stays in the parent.

With ``max_depth > 1`` a list item's details are searched for an indented sub-list
(``a.``, ``1.``, ``1)``, ``-``, ``*`` markers, same rules: ``Title:`` on every item,
at least 3 items, consecutive numbers or letters) that becomes nested forks.
Paragraph children are never split further: the paper nests lists only.

An item belongs to a list only if its details continue on *indented* lines; a
non-indented line that is not the next item ends the list, which is how an outro
written without a blank line before it stays in the parent.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from apar_spec.decoding.answer_tree import AnswerTree, ForkPoint
from apar_spec.decoding.fork_rules import title_key

MIN_LIST_ITEMS = 3
MIN_PARAGRAPHS = 3

# "1. ", "a) ", "- " ... at a line start; top-level lists accept only "N. ".
_MARKER = re.compile(r"(?P<indent>[ \t]*)(?:(?P<ordinal>\d{1,3}|[a-z])(?P<punct>[.)])|(?P<bullet>[-*+]))[ \t]+")
# "Title:" or "**Title:**" / "**Title**:" right after the marker; must be followed by
# whitespace or the line end, so "3:1" or "http://" never reads as a title.
_TITLE = re.compile(r"\*\*[^*\r\n:]{1,60}(?::\*\*|\*\*:)|[^\s*:][^:\r\n]{0,59}:")
_TITLE_IS_SENTENCE = re.compile(r"[.!?]\s")
_FENCE = re.compile(r"[ \t]*(```|~~~)")
# A sentence ends at . ! ? (plus closing quotes/brackets) followed by whitespace.
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)")
_ABBREVIATIONS = frozenset(
    {"e.g", "i.e", "vs", "mr", "mrs", "ms", "dr", "prof", "st", "fig", "approx", "cf", "jr", "sr"}
)


@dataclass(frozen=True)
class _Line:
    """One line of a text: ``start``..``end`` is its content, without its line break."""

    start: int
    end: int


@dataclass(frozen=True)
class _Item:
    """A list item head: its marker style, its ordinal (None for bullets), where its fork would go."""

    style: tuple[str, str]
    ordinal: int | None
    indent: int
    fork_at: int | None  # just after "Title:"; None when the item has no title


@dataclass
class _Span:
    """Text ``start..end`` of the answer moves into a child branch forked at ``start``."""

    start: int
    end: int
    child: AnswerTree


def _lines(text: str) -> list[_Line]:
    """Split on ``\\n`` only (not ``str.splitlines``, which also splits on form feeds etc.)."""
    lines, pos = [], 0
    while pos < len(text):
        nl = text.find("\n", pos)
        end = len(text) if nl < 0 else nl
        nxt = len(text) if nl < 0 else nl + 1
        if end > pos and text[end - 1] == "\r":
            end -= 1
        lines.append(_Line(pos, end))
        pos = nxt
    return lines


def _fenced(text: str, lines: list[_Line]) -> list[bool]:
    """Which lines are inside (or are the fences of) a ``` code block: never list items, never prose."""
    flags, inside = [], False
    for line in lines:
        is_fence = _FENCE.match(text, line.start, line.end) is not None
        flags.append(inside or is_fence)
        if is_fence:
            inside = not inside
    return flags


def _indent(text: str, line: _Line) -> int:
    content = text[line.start : line.end]
    return len(content) - len(content.lstrip(" \t"))


def _is_blank(text: str, line: _Line) -> bool:
    return not text[line.start : line.end].strip()


def _item_at(text: str, lines: list[_Line], i: int) -> _Item | None:
    """The list item head on line ``i``, or None if the line does not start with a marker."""
    line = lines[i]
    m = _MARKER.match(text, line.start, line.end)
    if m is None:
        return None
    if m.group("bullet"):
        style, ordinal = ("bullet", m.group("bullet")), None
    elif m.group("ordinal").isdigit():
        style, ordinal = ("number", m.group("punct")), int(m.group("ordinal"))
    else:
        style, ordinal = ("letter", m.group("punct")), ord(m.group("ordinal")) - ord("a") + 1
    fork_at = None
    t = _TITLE.match(text, m.end(), line.end)
    if t is not None and (t.end() == line.end or text[t.end()] in " \t") and not _TITLE_IS_SENTENCE.search(t.group()):
        fork_at = t.end()
    return _Item(style, ordinal, len(m.group("indent")), fork_at)


def _list_spans(text: str, *, top_level: bool, depth_left: int) -> list[_Span]:
    """Forks for every qualifying list in ``text`` (see the module docstring).

    ``top_level``: ``text`` is a whole answer, whose lists are ``N.`` items at column 0.
    Otherwise ``text`` is an item's details: its first line continues the item's head
    line (so it is never an item) and a sub-list sits at the shallowest indented marker.
    """
    lines = _lines(text)
    fenced = _fenced(text, lines)
    candidates: dict[int, _Item] = {}
    for i in range(0 if top_level else 1, len(lines)):
        if not fenced[i] and (item := _item_at(text, lines, i)) is not None:
            candidates[i] = item
    if top_level:
        level = 0
        candidates = {i: it for i, it in candidates.items() if it.style == ("number", ".")}
    else:
        level = min((it.indent for it in candidates.values()), default=0)
        if level == 0:
            return []
    heads = {i: it for i, it in candidates.items() if it.indent == level}

    spans: list[_Span] = []
    i = 0
    while i < len(lines):
        if i not in heads:
            i += 1
            continue
        run: list[tuple[_Item, int]] = []  # (head, end offset of its details)
        while i in heads and (not run or heads[i].style == run[0][0].style):
            last, j = i, i + 1
            # An item's body: its head line plus indented lines, blank lines only between them.
            while j < len(lines) and (_is_blank(text, lines[j]) or _indent(text, lines[j]) > level):
                if not _is_blank(text, lines[j]):
                    last = j
                j += 1
            run.append((heads[i], lines[last].end))
            i = last + 1
            while i < len(lines) and _is_blank(text, lines[i]):
                i += 1
        spans.extend(_run_spans(text, run, depth_left))
    return spans


def _run_spans(text: str, run: list[tuple[_Item, int]], depth_left: int) -> list[_Span]:
    """The forks of one run of items, or none if the run is not an APAR list."""
    items = [item for item, _ in run]
    if len(items) < MIN_LIST_ITEMS or any(item.fork_at is None for item in items):
        return []
    if items[0].ordinal is not None and [item.ordinal for item in items] != list(range(1, len(items) + 1)):
        return []
    spans = []
    for item, end in run:
        details = text[item.fork_at : end]
        if details.strip():  # an item with no details has nothing to write in parallel
            spans.append(_Span(item.fork_at, end, _details_tree(details, depth_left - 1)))
    return spans


def _details_tree(details: str, depth_left: int) -> AnswerTree:
    """A list item's child branch, with its own sub-list forked while depth allows."""
    if depth_left <= 0:
        return AnswerTree(details)
    return _tree_from_spans(details, _list_spans(details, top_level=False, depth_left=depth_left))


def _is_prose(content: str) -> bool:
    """A line that can belong to a forkable paragraph: not a list item, heading, table row or code."""
    return not (_MARKER.match(content) or content.lstrip().startswith(("#", "|")) or content.startswith(("    ", "\t")))


def _first_sentence_end(text: str, start: int, end: int) -> int | None:
    """Offset just after the first sentence of ``text[start:end]``; None if it is the only one.

    A candidate end is skipped when the next word is lower-case or the word before it
    is a known abbreviation or a single letter (an initial), so "e.g. this" or
    "J. Smith" do not cut a sentence; a decimal like "3.5" never matches at all.
    """
    for m in _SENTENCE_END.finditer(text, start, end):
        rest = text[m.end() : end].lstrip()
        if not rest:
            return None
        word = (text[start : m.start()].rsplit(None, 1) or [""])[-1].lstrip("([\"'").lower()
        if rest[0].islower() or word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
            continue
        return m.end()
    return None


def _paragraph_spans(text: str, whole_lead: int) -> list[_Span]:
    """Forks after the first sentence of every multi-sentence prose paragraph (> 2 blocks),
    except the first ``whole_lead`` of them, which stay whole in the parent."""
    lines = _lines(text)
    fenced = _fenced(text, lines)
    blocks: list[list[int]] = []
    current: list[int] = []
    for i, line in enumerate(lines):
        if not fenced[i] and _is_blank(text, line):
            if current:
                blocks.append(current)
            current = []
        else:
            current.append(i)
    if current:
        blocks.append(current)
    if len(blocks) < MIN_PARAGRAPHS:
        return []
    spans = []
    for block in blocks:
        if any(fenced[i] or not _is_prose(text[lines[i].start : lines[i].end]) for i in block):
            continue
        start, end = lines[block[0]].start, lines[block[-1]].end
        cut = _first_sentence_end(text, start, end)
        if cut is None:
            continue
        if whole_lead > 0:
            whole_lead -= 1
            continue
        spans.append(_Span(cut, end, AnswerTree(text[cut:end])))
    return spans


def _tree_from_spans(text: str, spans: list[_Span]) -> AnswerTree:
    """Cut the (sorted, disjoint) spans out of ``text`` into children; the rest is the parent's text."""
    parts: list[str] = []
    forks: list[ForkPoint] = []
    pos = removed = 0
    for span in spans:
        parts.append(text[pos : span.start])
        forks.append(ForkPoint(span.start - removed, span.child))
        removed += span.end - span.start
        pos = span.end
    parts.append(text[pos:])
    return AnswerTree("".join(parts), forks)


def cut_repeated_items(answer: str) -> str:
    """``answer`` up to its first top-level numbered item whose title repeats an earlier
    item's title in the same list (a list restarts at item 1), or unchanged.

    Why: a small model's greedy lists loop ("4. **Take care of your health**" again and
    again); trained on such answers, an APAR model learns to fork after titles it already
    forked after. The title is the text up to the item's fork point ("Title:"), else the line.
    """
    lines = _lines(answer)
    fenced = _fenced(answer, lines)
    seen: set[str] = set()
    for i, line in enumerate(lines):
        if fenced[i]:
            continue
        item = _item_at(answer, lines, i)
        if item is None or item.indent or item.style[0] != "number":
            continue
        if item.ordinal == 1:
            seen = set()
        key = title_key(answer[line.start : item.fork_at if item.fork_at is not None else line.end])
        if key is None:
            continue
        if key in seen:
            return answer[: line.start].rstrip()
        seen.add(key)
    return answer


def restructure(answer: str, *, max_depth: int = 1, whole_lead: int = 0) -> AnswerTree:
    """The APAR tree of ``answer``: list forks, else paragraph forks, else no forks.

    ``max_depth`` caps fork nesting (1: only top-level forks; 0: never fork).
    ``whole_lead`` keeps that many leading forkable paragraphs unforked (paragraph rule only).
    ``restructure(answer).reassemble() == answer`` always holds.
    """
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}")
    if whole_lead < 0:
        raise ValueError(f"whole_lead must be >= 0, got {whole_lead}")
    if max_depth == 0:
        return AnswerTree(answer)
    spans = _list_spans(answer, top_level=True, depth_left=max_depth) or _paragraph_spans(answer, whole_lead)
    return _tree_from_spans(answer, spans)


# ---------------------------------------------------------------- JSONL conversion

_HUMAN_ROLES = frozenset({"human", "user"})
_ASSISTANT_ROLES = frozenset({"gpt", "assistant"})


@dataclass
class ConvertReport:
    """What :func:`convert_file` did. ``rows_read`` counts non-empty input lines."""

    rows_read: int = 0
    rows_written: int = 0
    structured: int = 0
    unstructured: int = 0
    bad_rows: list[tuple[int, str]] = field(default_factory=list)


class _BadRow(ValueError):
    """A row that cannot be converted; the message is the reason reported to the user."""


def _prompt_answer(row: object) -> tuple[str, str]:
    """(prompt, answer) of a ``{"prompt", "answer"}`` row or a ShareGPT ``conversations`` row."""
    if not isinstance(row, dict):
        raise _BadRow(f"expected a JSON object, got {type(row).__name__}")
    if "conversations" in row:
        turns = row["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise _BadRow("'conversations' must be a list of {from, value} objects")
        first_human = next((k for k, t in enumerate(turns) if t.get("from") in _HUMAN_ROLES), None)
        if first_human is None:
            raise _BadRow("no human/user turn in 'conversations'")
        if first_human + 1 >= len(turns) or turns[first_human + 1].get("from") not in _ASSISTANT_ROLES:
            raise _BadRow("the first human/user turn is not followed by a gpt/assistant reply")
        prompt, answer = turns[first_human].get("value"), turns[first_human + 1].get("value")
    elif "prompt" in row and "answer" in row:
        prompt, answer = row["prompt"], row["answer"]
    else:
        raise _BadRow("row needs 'prompt' and 'answer' fields, or a ShareGPT 'conversations' list")
    if not isinstance(prompt, str) or not isinstance(answer, str):
        raise _BadRow("prompt and answer must be strings")
    if not answer.strip():
        raise _BadRow("empty answer")
    return prompt, answer


def _row_flags(row: dict) -> dict[str, bool]:
    """The optional per-row switches ``restructure`` and ``open_end`` (booleans when present)."""
    flags = {k: row[k] for k in ("restructure", "open_end") if k in row}
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise _BadRow(f"'{k}' must be true or false, not {v!r}")
    return flags


def convert_file(
    in_path: str | Path, out_path: str | Path, *, max_depth: int = 1, whole_lead: int = 0
) -> ConvertReport:
    """Restructure every row of a JSONL file; bad rows are reported, never fatal.

    Output rows: ``{"prompt", "answer", "structured": bool, "tree": AnswerTree.to_dict()}``.
    Two optional input fields: ``"restructure": false`` keeps the answer as one branch
    (an answer whose steps depend on each other, e.g. a worked calculation, must not
    fork); ``"open_end": true`` (the answer was cut by a token limit) is passed on, so
    training gives its end no EOS.
    ``max_depth`` and ``whole_lead`` are :func:`restructure`'s.
    Lines are decoded one at a time so one bad byte costs one row, not the run.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    # restructure checks these too, but only at the first row: here a bad value fails
    # before the output file is opened, so no half-written output is left behind
    if max_depth < 0 or whole_lead < 0:
        raise ValueError(f"--max-depth and --whole-lead must be >= 0, got {max_depth} and {whole_lead}")
    if not in_path.is_file():
        raise FileNotFoundError(f"input file not found: {in_path} (expected JSONL with prompt/answer or ShareGPT rows)")
    if out_path.exists() and out_path.resolve() == in_path.resolve():
        raise ValueError(f"output path {out_path} is the input file; choose another output path")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = ConvertReport()
    with in_path.open("rb") as src, out_path.open("w", encoding="utf-8") as dst:
        for line_number, raw in enumerate(src, start=1):
            if not raw.strip():
                continue
            report.rows_read += 1
            try:
                src_row = json.loads(raw.decode("utf-8"))
                prompt, answer = _prompt_answer(src_row)
                flags = _row_flags(src_row)
            except UnicodeDecodeError:
                report.bad_rows.append((line_number, "not valid UTF-8"))
                continue
            except json.JSONDecodeError as e:
                report.bad_rows.append((line_number, f"invalid JSON: {e.msg} at column {e.colno}"))
                continue
            except _BadRow as e:
                report.bad_rows.append((line_number, str(e)))
                continue
            tree = (
                restructure(answer, max_depth=max_depth, whole_lead=whole_lead)
                if flags.get("restructure", True)
                else AnswerTree(answer)
            )
            structured = bool(tree.forks)
            row = {"prompt": prompt, "answer": answer, "structured": structured, "tree": tree.to_dict()}
            if flags.get("open_end"):
                row["open_end"] = True
            dst.write(json.dumps(row, ensure_ascii=False) + "\n")
            report.rows_written += 1
            report.structured += structured
            report.unstructured += not structured
    return report
