"""Data-parallel benchmarking: ``accelerate launch`` / ``torchrun`` split the prompts over processes.

Why this shape: a benchmark row is one request on one model copy, so N processes (one
per GPU, or N CPU processes) can each take every N-th prompt (process i takes prompts
``i::N``, which spreads categories evenly) and time it on its own device. Each process
appends its rows to its own shard (``results.jsonl.part<i>``), flushed row by row as in
a single-process run, so a crash keeps every finished row. When all are done
(``wait_for_everyone``) the main process merges the shards into the results file in
the single-process order (prompt, repeat, configuration), deletes them, and alone
prints the report. ``--resume`` first folds shards left by an interrupted run into the
results file, so nothing measured is lost or measured twice.

Without a distributed launch (no ``WORLD_SIZE`` > 1 in the environment) nothing here
touches accelerate: one process runs exactly as before, writing straight to ``--out``.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

T = TypeVar("T")
SHARD = ".part"  # results.jsonl -> results.jsonl.part0, .part1, ...
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch, mpirun) started."""
    for var in _WORLD_VARS:
        try:
            n = int(os.environ.get(var, "1"))
        except ValueError:
            continue
        if n > 1:
            return n
    return 1


@dataclass(frozen=True)
class Processes:
    """This process's place among the launched ones (rank 0 of 1 without a launcher)."""

    rank: int = 0
    count: int = 1

    @classmethod
    def current(cls, device: Optional[str] = None) -> Processes:
        """Join the launched process group (gloo on CPU, NCCL on GPUs), or rank 0 of 1.

        ``device``: the benchmark's ``--device``; ``cpu`` (or no CUDA here) makes
        accelerate use CPU processes with gloo, else one GPU per process."""
        if launched_processes() == 1:
            return cls()
        import torch
        from accelerate import PartialState

        cpu = str(device) == "cpu" or not torch.cuda.is_available()
        state = PartialState(cpu=cpu)
        return cls(state.process_index, state.num_processes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.count > 1

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's items: every ``count``-th, from ``rank``."""
        return list(items)[self.rank :: self.count]

    def output(self, out: Path) -> Path:
        """Where this process appends its rows: ``out`` itself when alone, else its shard."""
        return shard_path(out, self.rank) if self.parallel else out

    def wait(self) -> None:
        if self.parallel:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the main process only and hand its result to all. An error there
        is raised on every process (the same one-line message), so none waits forever."""
        if not self.parallel:
            return fn()
        from accelerate.utils import broadcast_object_list

        payload: list[Any] = [None]
        error: Optional[BaseException] = None
        if self.is_main:
            try:
                payload = [("ok", fn())]
            except (ValueError, FileNotFoundError) as err:
                error, payload = err, [("user", str(err))]
            except Exception as err:  # a bug: the others stop too, the main keeps its traceback
                error, payload = err, [("bug", f"{type(err).__name__}: {err}")]
        broadcast_object_list(payload, from_process=0)
        kind, value = payload[0]
        if error is not None:
            raise error
        if kind == "user":
            raise ValueError(value)
        if kind == "bug":
            raise RuntimeError(f"the main process failed: {value}")
        return value


def shard_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}{SHARD}{rank}")


def shard_files(out: Path) -> list[Path]:
    """Shards of ``out`` left on disk, by rank."""
    found = [Path(p) for p in glob.glob(glob.escape(str(out)) + SHARD + "*")]
    ranked = [(int(p.name.rsplit(SHARD, 1)[1]), p) for p in found if p.name.rsplit(SHARD, 1)[1].isdigit()]
    return [p for _, p in sorted(ranked)]


def merge_shards(
    out: Path, read_rows: Callable[[Path], list[dict]], order: Optional[Callable[[dict], Any]] = None
) -> int:
    """Append every shard's rows to ``out`` (sorted by ``order`` if given), then delete the
    shards; returns the number of rows moved. A shard's half-written last line (a crash)
    is dropped by ``read_rows``; the rows are written before any shard is deleted."""
    shards = shard_files(out)
    rows = [row for shard in shards for row in read_rows(shard)]
    if order is not None:
        rows.sort(key=order)
    with out.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    for shard in shards:
        shard.unlink()
    return len(rows)
