"""The results file of a benchmark run: checked before the run, resumed, read back.

Why apart from the loop (``bench.py``): ``read_rows`` serves every reader of a results file
(``report``, the CLI, the tests) without the runner; ``prepare_output`` decides what a run
may do with an existing file (refuse, resume the same setup, overwrite) before any model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from .bench_plan import BenchSettings
from .parallel import merge_shards, shard_files


def prepare_output(settings: BenchSettings) -> set[tuple[str, str, int]]:
    """Check the output file can be written; return the keys of rows already finished (resume)."""
    out = settings.out
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name such as {out / 'results.jsonl'}")
    shards = shard_files(out)
    if shards:  # left by an interrupted data-parallel run
        if settings.overwrite:
            for shard in shards:
                shard.unlink()
        elif settings.resume:
            if out.is_file():
                _drop_partial_last_line(out)
            merge_shards(out, read_rows)  # their rows join the file first, so resume skips them
        else:
            raise ValueError(
                f"{shards[0]} and {len(shards) - 1} more shard(s) hold rows of an interrupted data-parallel run of "
                f"{out}; "
                "pass --resume to merge and continue them or --overwrite to start again"
            )
    existing = read_rows(out) if out.is_file() and out.stat().st_size > 0 else []
    if existing and not settings.resume and not settings.overwrite:
        raise ValueError(
            f"{out} already holds {len(existing)} rows; pass --resume to continue it or --overwrite to start again"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w" if settings.overwrite else "a", encoding="utf-8"):
            pass
    except OSError as err:
        raise ValueError(f"cannot write the output file {out}: {err.strerror or err}") from None
    if not settings.resume:
        return set()
    _drop_partial_last_line(out)
    sid = settings.setup_id()
    other = [r for r in existing if r.get("setup_id") != sid]
    if other:
        raise ValueError(
            f"{out} holds {len(other)} rows of a different setup (models, budget, sampling, dtype, device or prompts "
            f"differ); "
            "resume with the same options, or write to another --out"
        )
    return {(r["variant"], str(r["prompt_id"]), int(r["repeat"])) for r in existing}


def _drop_partial_last_line(path: Path) -> None:
    """A write cut short (crash, kill -9) leaves a line without its newline; appending to it
    would corrupt the next row, so it goes (``read_rows`` already ignores it)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a results file. A last line cut short by a crash is ignored; any other bad
    line is an error naming it (a results file is written by us, so it means corruption)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines):
                break  # an interrupted write
            raise ValueError(f"{path} line {n}: not a JSON row ({err.msg})") from None
        if not isinstance(row, dict) or "variant" not in row or "prompt_id" not in row:
            raise ValueError(f"{path} line {n}: not a benchmark row (needs 'variant' and 'prompt_id')")
        rows.append(row)
    return rows
