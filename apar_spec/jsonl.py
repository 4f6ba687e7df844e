"""Reading JSONL files whose errors name the file and line, in one line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path


def json_objects(path: Path, lines: Iterable[str], where: str = "{path} line {n}") -> Iterator[tuple[int, str, dict]]:
    """``(line number, location, object)`` for every non-blank line; anything that is not a
    JSON object is a ``ValueError`` naming the location (``where`` formats it from path and n)."""
    fmt = where
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = fmt.format(path=path, n=n)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield n, where, row
