"""Benchmark drivers: ``compare`` (configurations x prompts) and ``sweep`` (draft x k).

Method (why each choice):

- Every row is ONE request (batch size 1): we measure latency, which is what APAR
  and speculation shorten. Wall time is taken around the whole call (tokenising aside)
  with a CUDA sync on both ends, for our decoder and for ``model.generate`` alike.
- Configurations are *interleaved per prompt and repeat* (prompt 1: every config, repeat
  0, then repeat 1, ...), so machine noise (other jobs on a shared CPU, clock changes)
  hits every configuration alike; speed-ups are ratios of medians from the same run.
- Warm-up calls (not recorded) run every configuration first: the first forward of a
  model pays for allocation and kernel selection.
- Each row is written and flushed as soon as it is measured, so Ctrl-C (or a crash)
  keeps every finished row, and ``resume`` skips rows already in the file. A file of
  another setup (other models, budget, temperature...) is refused on resume instead of
  silently mixing numbers.

The modules, by job: ``bench_plan`` (the settings and the configurations planned from
them), ``bench_runner`` (one row: the timed call and the row schema), ``bench_files`` (the
results file: refuse, resume, read back), and this one: the two drivers and the loop that
orders rows, spreads them over data-parallel processes and writes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from apar_spec.models.loading import resolve_device

from .bench_files import prepare_output, read_rows
from .bench_plan import BenchSettings, compare_variants, sweep_variants
from .bench_runner import _Runner
from .models import load_models
from .parallel import Processes, merge_shards
from .prompts import select_prompts


@dataclass
class BenchResult:
    out: Path
    written: int  # rows written by this call
    skipped: int  # rows found finished (resume)
    planned: int  # rows this call meant to have in the file
    interrupted: bool
    notes: list[str] = field(default_factory=list)
    models: dict = field(default_factory=dict)  # config -> model name
    processes: Processes = field(default_factory=Processes)  # data-parallel launch: this process's rank and the count


@dataclass
class RowEvent:
    """Passed to the progress callback after each row (and once with ``row=None`` at start)."""

    done: int
    total: int
    row: Optional[dict]


Progress = Callable[[RowEvent], None]


# ------------------------------------------------------------------ the two drivers


def compare(
    settings: BenchSettings, *, progress: Optional[Progress] = None, say: Optional[Callable[[str], None]] = None
) -> BenchResult:
    """Every configuration on every prompt (one draft, one k)."""
    return _run(settings, lambda ms: compare_variants(settings, ms, say), progress)


def sweep(
    settings: BenchSettings,
    *,
    drafts: Sequence[str],
    ks: Sequence[int],
    trees: Sequence[str] = (),
    step_caps: Sequence[Optional[int]] = (None,),
    progress: Optional[Progress] = None,
) -> BenchResult:
    """Speculative configurations for every (draft, k) and (draft, tree shape), next to their baselines.

    Baselines (``hf-generate``, ``ar``, ``apar`` where they apply) run once per prompt
    and repeat; ``spec``/``apar+spec`` (or ``settings.modes``' draft configurations)
    run for each draft and k, then each draft and tree, once per step cap
    (``max_step_tokens``; None = no cap). Rows are labelled ``spec ngram k=4``,
    ``apar+spec tiny-heads tree=topk:2x3`` and ``apar+spec tiny-heads k=3 cap=12``.
    """
    if not step_caps or any(c is not None and c < 1 for c in step_caps):
        raise ValueError(f"sweep needs step caps >= 1 or none (got {list(step_caps)})")
    if not drafts:
        raise ValueError("sweep needs at least one draft")
    if not ks and not trees:
        raise ValueError("sweep needs draft lengths (--ks) or tree shapes (--trees)")
    if any(k < 1 for k in ks):
        raise ValueError(f"sweep needs draft lengths >= 1 (got {list(ks)})")
    from apar_spec.decoding.draft_tree import parse_tree

    for t in trees:
        parse_tree(t)  # a malformed shape fails before any model is loaded
    return _run(settings, lambda ms: sweep_variants(settings, ms, drafts, ks, trees, step_caps), progress, drafts)


# ------------------------------------------------------------------ the loop


@contextmanager
def torch_threads(threads: Optional[int], device: Optional[str]) -> Iterator[Optional[int]]:
    """Intra-op threads for a run, restored afterwards; yields the count set (None = untouched).

    On CPU the default is ONE thread: batch-1 decoding of small models is latency-bound,
    and with two threads on a shared 2-core machine OpenMP's spin-waits made each step
    10-20x slower (2.6 ms -> 30-50 ms per step for the embedded models) and the timings
    noisy. ``--threads`` overrides; on a GPU the count is left alone unless given."""
    previous = torch.get_num_threads()
    wanted = threads
    if wanted is None and resolve_device(device).type == "cpu":
        wanted = 1
    if wanted is not None:
        torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(previous)


def _run(settings: BenchSettings, plan, progress: Optional[Progress], sweep_drafts: Sequence[str] = ()) -> BenchResult:
    procs = Processes.current(settings.device)  # first: joins a data-parallel launch before anything picks a device
    if procs.parallel and settings.device_map is not None:
        raise ValueError(
            f"--device-map spreads one model over all devices, but {procs.count} processes were launched (one device "
            f"each); "
            "use one process with --device-map auto, or data parallelism without it"
        )
    with torch_threads(settings.threads, settings.device) as threads:
        # rows and the setup id record the thread count actually used
        return _run_threads_set(replace(settings, threads=threads), plan, progress, sweep_drafts, procs)


def _run_threads_set(
    settings: BenchSettings,
    plan,
    progress: Optional[Progress],
    sweep_drafts: Sequence[str],
    procs: Optional[Processes] = None,
) -> BenchResult:
    """One process alone: rows go straight to ``--out``. Data parallel: this process runs
    its share of the prompts into its shard, and the main process merges (``parallel.py``)."""
    procs = procs or Processes()
    prompts = select_prompts(
        settings.prompts,
        category=settings.category,
        per_category=settings.per_category,
        limit=settings.limit,
        turn=settings.turn,
    )
    created = not settings.out.exists()
    finished = procs.from_main(lambda: prepare_output(settings))
    try:
        drafts = list(sweep_drafts) or ([settings.draft_name] if settings.draft_name else [])
        ms = load_models(
            settings.target,
            settings.base,
            drafts,
            dtype=settings.dtype,
            device=settings.device,
            device_map=settings.device_map,
        )
        variants, notes = plan(ms)
        runner = _Runner(settings, ms, prompts, read_rows(settings.out) if settings.out.is_file() else [])
    except BaseException:
        if procs.is_main and created and settings.out.is_file() and settings.out.stat().st_size == 0:
            settings.out.unlink()  # a run that failed before its first row leaves no empty file behind
        raise
    mine = procs.share(prompts)
    todo = [
        (p, r, v) for p in mine for r in range(settings.repeats) for v in variants if (v.name, p.id, r) not in finished
    ]
    planned = len(mine) * settings.repeats * len(variants)
    result = BenchResult(
        settings.out,
        0,
        planned - len(todo),
        planned,
        False,
        notes,
        {v.name: ms.for_config(v.config).name for v in variants},
        procs,
    )
    try:
        if progress:
            progress(RowEvent(result.skipped, planned, None))
        if todo:
            for _ in range(settings.warmup):
                for v in variants:
                    runner.measure(v, todo[0][0], repeat=-1)
        with procs.output(settings.out).open("a", encoding="utf-8") as f:
            for p, r, v in todo:
                row = runner.measure(v, p, r)
                if procs.parallel:
                    row["process"], row["processes"] = procs.rank, procs.count
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                result.written += 1
                if progress:
                    progress(RowEvent(result.skipped + result.written, planned, row))
    except KeyboardInterrupt:
        result.interrupted = True
    if procs.parallel and not result.interrupted:
        procs.wait()
        if procs.is_main:  # the merged file, in single-process order; counts now cover every process
            prompt_at = {p.id: i for i, p in enumerate(prompts)}
            variant_at = {v.name: i for i, v in enumerate(variants)}
            result.written = merge_shards(
                settings.out,
                read_rows,
                lambda row: (
                    prompt_at.get(str(row["prompt_id"]), len(prompt_at)),
                    row["repeat"],
                    variant_at.get(row["variant"], len(variant_at)),
                ),
            )
            result.planned = len(prompts) * settings.repeats * len(variants)
            result.skipped = result.planned - result.written
        procs.wait()  # no process reports before the merged file is complete
    return result
