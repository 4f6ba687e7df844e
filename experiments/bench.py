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

Row schema (one JSON object per line, written by :func:`make_row`):

- identity: ``schema`` (1), ``setup_id`` (hash of what makes rows comparable),
  ``variant`` (``config``, or ``"spec ngram k=4"`` in a sweep), ``config``, ``prompt_id``,
  ``category``, ``repeat``, ``model`` (the model THIS row ran), ``draft``, ``k``
  (None for configurations without a draft), ``tree`` (the draft tree's text form, None =
  a chain of k), ``max_step_tokens`` (the step cap, None = none), ``temperature``, ``max_new_tokens``,
  ``device``, ``threads`` (torch CPU threads; None = untouched), ``dtype``, ``time``;
- measures: ``prompt_tokens``, ``tokens`` (generated over all branches, [Fork]/EOS
  included), ``answer_tokens`` (``len(output_ids)``), ``wall_s`` (around the call),
  ``tokens_per_s`` (= tokens / wall_s), ``steps_per_token``;
- every ``GenerationStats`` field: ``target_steps``, ``draft_forwards``,
  ``tokens_generated``, ``peak_live_kv``, ``mean_live_kv``, ``attended_keys``,
  ``critical_path``, ``wall_time_s`` (the decoder's own clock), ``num_branches``,
  ``accepted``, ``drafted``, ``mean_acceptance_length``, ``acceptance_rate_per_position``,
  ``depth_rank_verified`` / ``depth_rank_accepted`` (draft-tree nodes per [depth-1][rank] whose
  parent path was accepted / that were accepted: p(d, r) for the cost model),
  ``steps_per_critical_path``. HF rows count forwards with hooks and give None for the
  tree-decoder-only counters (live KV, attended keys, acceptance);
- outputs: ``output_ids`` (answer tokens in reading order, for the lossless check),
  ``text`` (first 200 characters); HF rows add ``hf`` (the generate() settings used).
- data-parallel runs (``accelerate launch`` / ``torchrun``, see ``parallel.py``) add
  ``process`` (the rank that measured the row) and ``processes`` (how many ran).
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

from apar_spec.api import eos_ids_of, generate
from apar_spec.hf_baselines import hf_generate
from apar_spec.lossless import first_difference, logit_gap
from apar_spec.loading import resolve_device
from apar_spec.options import DecodeOptions, fork_bias_of, fork_depth
from apar_spec.router import gate_threshold
from apar_spec.tokens import find_apar_tokens

from .models import DEFAULT_TARGET, ModelSet, default_draft, encode_prompt, load_models
from .parallel import Processes, merge_shards, shard_files
from .prompts import DEFAULT_SET, Prompt, select_prompts
from .report import LOSSLESS_REFERENCE

_D = DecodeOptions
CONFIGS = ("hf-generate", "hf-assisted", "ar", "apar", "spec", "apar+spec")
DRAFT_CONFIGS = ("hf-assisted", "spec", "apar+spec")
APAR_CONFIGS = ("apar", "apar+spec")
SCHEMA = 1
TEXT_CHARS = 200  # rows keep the first characters of each answer, for eyeballing


@dataclass
class BenchSettings:
    """Everything a run depends on. Decoding defaults come from ``DecodeOptions``."""

    target: str = DEFAULT_TARGET
    base: Optional[str] = None  # None: the target's known base (tiny-apar -> tiny-base), else the target
    draft: Optional[str] = None  # None: tiny-draft for embedded targets, the n-gram draft otherwise
    modes: Optional[Sequence[str]] = None  # None: every configuration that applies
    prompts: str = DEFAULT_SET  # a built-in set, a file, or several files comma-separated (select_prompts)
    category: Optional[str] = None
    limit: Optional[int] = None
    turn: int = 0
    per_category: Optional[int] = None  # at most this many prompts of each category
    max_new_tokens: int = _D.max_new_tokens
    k: int | str = _D.num_draft_tokens  # "auto": the cost model picks k per configuration (apar_spec.cost_model)
    tree: Optional[str] = _D.tree  # draft tree per branch (parse_tree text); None = a chain of k
    max_step_tokens: Optional[int] = _D.max_step_tokens  # tokens one target forward takes (spec configs); None = no cap
    max_depth: Optional[int] = None  # fork nesting cap (apar modes); None = the model's trained depth, else DecodeOptions'
    depth_cap: Optional[str] = None  # what a capped child asking for [Fork] does (DecodeOptions.depth_cap); None = its default
    fork_bias: Optional[float] = None  # [Fork] logit offset (apar modes); None = the model's recorded one, else DecodeOptions'
    repeated_title: Optional[str] = None  # a fork after a repeated title (DecodeOptions.repeated_title); None = its default
    fork_gate: Optional[float] = None  # the fork router's threshold (DecodeOptions.fork_gate); None = the model's router's own
    # each branch's own cap (DecodeOptions.max_branch_tokens); None = max_new_tokens. HF and ar rows get it as their
    # budget. Why: under a shared budget, which branch is cut depends on how much each step accepted, so a
    # speculative row may hold other (e.g. more repetitive) text than the plain row it is compared with
    max_branch_tokens: Optional[int] = None
    temperature: float = _D.temperature
    top_p: float = _D.top_p
    top_k: int = _D.top_k
    seed: Optional[int] = _D.seed
    repeats: int = 3
    warmup: int = 1
    dtype: Optional[str] = None
    device: Optional[str] = "auto"
    device_map: Optional[str] = None  # "auto": accelerate spreads target and base over the devices (too large for one)
    threads: Optional[int] = None  # torch intra-op threads; None = 1 on CPU (see torch_threads), untouched on GPU
    chat_template: Optional[bool] = None  # None: use the tokenizer's template when it has one
    out: Path = Path("results.jsonl")
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1 (got {self.repeats})")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0 (got {self.warmup})")
        if self.k != "auto" and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"-k must be >= 1 (an integer) or 'auto' (got {self.k})")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1 (got {self.threads})")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; pick one")
        DecodeOptions.build(  # the decoder's own checks, before anything is loaded
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            num_draft_tokens=self.fixed_k, max_draft_tokens=max(self.fixed_k, _D.max_draft_tokens), tree=self.tree,
            max_step_tokens=self.max_step_tokens, **self.given_decode_options,
        )
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (got {self.temperature})")
        if self.modes is not None:
            self.modes = tuple(parse_modes(self.modes))
        if self.device_map is not None and self.device not in (None, "auto"):
            raise ValueError(f"--device-map {self.device_map} places the models itself; drop --device {self.device}")

    @property
    def fixed_k(self) -> int:
        return _D.num_draft_tokens if self.k == "auto" else self.k

    @property
    def given_decode_options(self) -> dict:
        """``max_depth`` / ``depth_cap`` / ``fork_bias`` / ``repeated_title`` / ``max_branch_tokens`` for ``generate`` only
        when given: otherwise the model's own default (max_depth, fork_bias) or DecodeOptions' applies."""
        given = {"max_depth": self.max_depth, "depth_cap": self.depth_cap, "fork_bias": self.fork_bias,
                 "repeated_title": self.repeated_title, "fork_gate": self.fork_gate,
                 "max_branch_tokens": self.max_branch_tokens}
        return {k: v for k, v in given.items() if v is not None}

    @property
    def hf_budget(self) -> int:
        """HF ``generate``'s budget: one sequence, so a branch cap caps it too (as it caps ``ar``'s root)."""
        return min(self.max_new_tokens, self.max_branch_tokens or self.max_new_tokens)

    @property
    def draft_name(self) -> str:
        return self.draft if self.draft is not None else default_draft(self.target)

    def setup(self) -> dict:
        """What makes two rows comparable; ``resume`` refuses a file whose rows differ here."""
        return {
            "target": self.target,
            "base": self.base,
            "prompts": self.prompts,
            "turn": self.turn,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "dtype": self.dtype,
            "device": self.device,
            "threads": self.threads,
            "chat_template": self.chat_template,
        }

    def setup_id(self) -> str:
        setup = self.setup()
        if self.device_map is not None:  # only then, so files written before the option keep their id
            setup["device_map"] = self.device_map
        setup.update(self.given_decode_options)  # likewise
        return hashlib.sha1(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Variant:
    """One measured configuration: a config name plus the draft and k it uses (if any)."""

    config: str
    draft: Optional[str] = None
    k: Optional[int] = None
    label: str = ""
    tree: Optional[str] = None  # draft tree text (parse_tree); None = a chain of k
    step_cap: Optional[int] = None  # DecodeOptions.max_step_tokens; None = no cap

    @property
    def name(self) -> str:
        return self.label or self.config


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


def parse_modes(modes: Iterable[str] | str) -> list[str]:
    """Configuration names from a list or a comma-separated string; unknown -> close-name hint."""
    items = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) for m in str(m).split(",")]
    items = [m for m in items if m]
    if not items:
        raise ValueError(f"--modes is empty (choose from {', '.join(CONFIGS)})")
    for m in items:
        if m not in CONFIGS:
            close = difflib.get_close_matches(m, CONFIGS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown mode '{m}' (choose from {', '.join(CONFIGS)}){hint}")
    return list(dict.fromkeys(items))


# ------------------------------------------------------------------ the two drivers


def compare(settings: BenchSettings, *, progress: Optional[Progress] = None) -> BenchResult:
    """Every configuration on every prompt (one draft, one k)."""
    return _run(settings, lambda ms: _compare_variants(settings, ms), progress)


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
    from apar_spec.draft_tree import parse_tree

    for t in trees:
        parse_tree(t)  # a malformed shape fails before any model is loaded
    return _run(settings, lambda ms: _sweep_variants(settings, ms, drafts, ks, trees, step_caps), progress, drafts)


def _compare_variants(settings: BenchSettings, ms: ModelSet) -> tuple[list[Variant], list[str]]:
    wanted = list(settings.modes or CONFIGS)
    explicit = settings.modes is not None
    variants, notes = [], []
    for config in wanted:
        reason = _not_applicable(config, ms)
        if reason:
            if explicit:
                raise ValueError(f"mode '{config}' cannot run: {reason}")
            notes.append(f"{config} skipped: {reason}")
            continue
        uses_draft = config in DRAFT_CONFIGS
        ours = uses_draft and config != "hf-assisted"
        tree = settings.tree if ours else None
        cap = settings.max_step_tokens if ours else None
        label = " ".join([config] + ([f"tree={tree}"] if tree else []) + ([f"cap={cap}"] if cap else [])) if tree or cap else ""
        k = (_auto_k(ms, config) if settings.k == "auto" else settings.k) if uses_draft else None
        variants.append(Variant(config, ms.draft.name if uses_draft else None, k, label, tree, cap))
    if not variants:
        raise ValueError("no configuration can run with these models; see --modes")
    return variants, notes


def _auto_k(ms: ModelSet, config: str) -> int:
    """``-k auto``: the chain length the cost model picks for this configuration's model and draft
    (cached costs, measured first when missing; a default acceptance profile for the draft)."""
    from apar_spec import cost_model as cm

    d = ms.draft
    if d.kind == "union":
        raise ValueError(f"-k auto: the cost model has no costs for a union of drafts ('{d.name}'); give -k or --tree")
    kind = d.kind if d.kind in cm.KINDS else "model"
    branches = cm.APAR_BRANCHES_GUESS if config in APAR_CONFIGS else 1.0
    shape = cm.resolve_auto(ms.for_config(config).model, speculator_kind=kind, draft_model=d.model, draft_name=d.name,
                            name=ms.for_config(config).name, chains_only=True, branches=branches,
                            tokenizer=ms.for_config(config).tokenizer)
    return shape.size


def _sweep_variants(settings: BenchSettings, ms: ModelSet, drafts: Sequence[str], ks: Sequence[int], trees: Sequence[str] = (),
                    step_caps: Sequence[Optional[int]] = (None,)):
    wanted = list(settings.modes or CONFIGS)
    base = [c for c in wanted if c not in DRAFT_CONFIGS and not _not_applicable(c, ms)]
    for needed in ("ar",):  # speed-ups need the AR baseline
        if needed not in base:
            base.insert(0, needed)
    variants = [Variant(c) for c in base]
    notes = []
    shapes = [(k, None, f"k={k}") for k in ks] + [(None, t, f"tree={t}") for t in trees]
    for name in drafts:
        for (k, tree, what), cap in itertools.product(shapes, step_caps):
            for config in (c for c in wanted if c in DRAFT_CONFIGS):
                if (tree is not None or cap is not None) and config == "hf-assisted":
                    continue  # HF assisted generation drafts chains only, uncapped
                reason = _not_applicable(config, ms, draft=name)
                if reason:
                    notes.append(f"{config} {name} skipped: {reason}")
                    continue
                label = f"{config} {name} {what}" + (f" cap={cap}" if cap is not None else "")
                variants.append(Variant(config, name, k if k is not None else settings.k, label, tree, cap))
    return variants, sorted(set(notes))


def _not_applicable(config: str, ms: ModelSet, draft: Optional[str] = None) -> Optional[str]:
    if config in APAR_CONFIGS and not ms.target.has_apar_tokens:
        return f"target '{ms.target.name}' has no [Fork]/[Child] tokens (not an APAR model)"
    if config in DRAFT_CONFIGS:
        d = ms.drafts.get(draft) if draft else ms.draft
        if d is None:
            return "no draft given (--draft)"
        if config == "hf-assisted" and d.kind == "heads":
            return "HF assisted generation has no Medusa heads"
        if config == "hf-assisted" and d.kind == "union":
            return "HF assisted generation drafts with one assistant, not a union"
        if config == "hf-assisted" and d.kind == "model":
            tv = ms.baseline.model.config.vocab_size
            dv = d.model.config.vocab_size
            if tv != dv:
                return f"HF assisted generation needs equal vocabulary sizes (draft {dv}, target {tv})"
    return None


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
            f"--device-map spreads one model over all devices, but {procs.count} processes were launched (one device each); "
            "use one process with --device-map auto, or data parallelism without it"
        )
    with torch_threads(settings.threads, settings.device) as threads:
        # rows and the setup id record the thread count actually used
        return _run_threads_set(replace(settings, threads=threads), plan, progress, sweep_drafts, procs)


def _run_threads_set(settings: BenchSettings, plan, progress: Optional[Progress], sweep_drafts: Sequence[str],
                     procs: Processes = Processes()) -> BenchResult:
    """One process alone: rows go straight to ``--out``. Data parallel: this process runs
    its share of the prompts into its shard, and the main process merges (``parallel.py``)."""
    prompts = select_prompts(settings.prompts, category=settings.category, per_category=settings.per_category,
                             limit=settings.limit, turn=settings.turn)
    created = not settings.out.exists()
    finished = procs.from_main(lambda: _prepare_output(settings))
    try:
        drafts = list(sweep_drafts) or ([settings.draft_name] if settings.draft_name else [])
        ms = load_models(settings.target, settings.base, drafts, dtype=settings.dtype, device=settings.device,
                         device_map=settings.device_map)
        variants, notes = plan(ms)
        runner = _Runner(settings, ms, prompts, read_rows(settings.out) if settings.out.is_file() else [])
    except BaseException:
        if procs.is_main and created and settings.out.is_file() and settings.out.stat().st_size == 0:
            settings.out.unlink()  # a run that failed before its first row leaves no empty file behind
        raise
    mine = procs.share(prompts)
    todo = [
        (p, r, v)
        for p in mine
        for r in range(settings.repeats)
        for v in variants
        if (v.name, p.id, r) not in finished
    ]
    planned = len(mine) * settings.repeats * len(variants)
    result = BenchResult(settings.out, 0, planned - len(todo), planned, False, notes,
                         {v.name: ms.for_config(v.config).name for v in variants}, procs)
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
            result.written = merge_shards(settings.out, read_rows, lambda row: (
                prompt_at.get(str(row["prompt_id"]), len(prompt_at)), row["repeat"], variant_at.get(row["variant"], len(variant_at))))
            result.planned = len(prompts) * settings.repeats * len(variants)
            result.skipped = result.planned - result.written
        procs.wait()  # no process reports before the merged file is complete
    return result


def _prepare_output(settings: BenchSettings) -> set[tuple[str, str, int]]:
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
                f"{shards[0]} and {len(shards) - 1} more shard(s) hold rows of an interrupted data-parallel run of {out}; "
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
            f"{out} holds {len(other)} rows of a different setup (models, budget, sampling, dtype, device or prompts differ); "
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


class _Runner:
    """Runs one (variant, prompt) and turns it into a row."""

    def __init__(self, settings: BenchSettings, ms: ModelSet, prompts: list[Prompt], finished: Sequence[dict] = ()):
        """``finished``: rows already in the output (a resumed run); their trees are the
        references a speculative row's first difference is found against."""
        self.s = settings
        self.ms = ms
        self.setup_id = settings.setup_id()
        self._ids: dict[tuple[int, str], list[int]] = {}
        # (config, model, prompt id, repeat) -> the answer tree: per branch (parent, fork index, tokens)
        self.trees: dict[tuple, list] = {
            (r["config"], r.get("model"), str(r["prompt_id"]), r["repeat"]): [tuple(b[:3]) for b in r["branches"]]
            for r in finished if r.get("branches") and r.get("setup_id") == self.setup_id
        }
        for p in prompts:  # encode up front: a template problem fails before the first row
            for loaded in (ms.target, ms.baseline):
                self.ids(loaded, p)

    def ids(self, loaded, prompt: Prompt) -> list[int]:
        key = (id(loaded), prompt.id)
        if key not in self._ids:
            self._ids[key] = encode_prompt(loaded, prompt.text, self.s.chat_template)
        return self._ids[key]

    def measure(self, v: Variant, prompt: Prompt, repeat: int) -> dict:
        s, ms = self.s, self.ms
        loaded = ms.for_config(v.config)
        ids = self.ids(loaded, prompt)
        k = v.k or s.fixed_k
        draft = ms.drafts.get(v.draft) if v.draft else None
        sampling = dict(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed)
        eos = eos_ids_of(loaded.model, loaded.tokenizer)
        if v.config.startswith("hf-"):
            assist = {}
            if v.config == "hf-assisted":
                assist = {"assistant_model": draft.model, "num_assistant_tokens": k} if draft.kind == "model" else {"prompt_lookup_num_tokens": k}
            run = hf_generate(loaded.model, loaded.tokenizer, ids, max_new_tokens=s.hf_budget, eos_ids=eos, **sampling, **assist)
            out_ids, wall, text = run.token_ids, run.wall_time_s, loaded.tokenizer.decode(run.token_ids, skip_special_tokens=True)
            stats = _hf_stats(run, len(out_ids))
            extra = {"hf": run.settings}
        else:
            device = loaded.model.device
            _sync(device)
            start = time.perf_counter()
            gen = generate(
                loaded.model, loaded.tokenizer, [ids], mode=v.config, draft=draft.arg if draft else None,
                max_new_tokens=s.max_new_tokens, num_draft_tokens=k, max_draft_tokens=max(k, _D.max_draft_tokens),
                tree=v.tree if draft else None, max_step_tokens=v.step_cap if draft else None, **sampling, **s.given_decode_options,
            )[0]
            _sync(device)
            wall = time.perf_counter() - start
            out_ids, text, stats, extra = gen.token_ids, gen.text, gen.stats.to_dict(), {}
        branches = ([[b.parent, b.fork_index, b.token_ids, b.finish] for b in gen.branches] if not v.config.startswith("hf-")
                    else [[None, None, list(out_ids), None]])
        row = make_row(self, v, prompt, repeat, loaded.name, len(ids), out_ids, text, wall, stats, extra)
        row["branches"] = branches
        self.check_lossless(row, loaded, ids)
        return row

    def check_lossless(self, row: dict, loaded, ids: list[int]) -> None:
        """Keep the row's tree; for a greedy row with a reference (``report.LOSSLESS_REFERENCE``)
        already run on this prompt and model, record where it parts from it and the target's
        logit gap there (``apar_spec.lossless``): the report tells a near-tie from a bug by it."""
        tree = [tuple(b[:3]) for b in row["branches"]]
        key = (row["config"], row["model"], str(row["prompt_id"]), row["repeat"])
        if row["repeat"] < 0:
            return
        self.trees[key] = tree
        ref = self.trees.get((LOSSLESS_REFERENCE.get(row["config"]), *key[1:]))
        if ref is None or (row.get("temperature") or 0) > 0:
            return
        d = first_difference(ids, ref, tree)
        if d is None:
            return
        apar = find_apar_tokens(loaded.tokenizer) if row.get("fork_bias") else None
        gap = logit_gap(loaded.model, d, apar.fork_id if apar else None, row.get("fork_bias") or 0.0, row.get("max_depth"))
        row["first_difference"] = {"reference": LOSSLESS_REFERENCE[row["config"]], **d.to_dict(), "logit_gap": gap}


def _sync(device) -> None:
    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


def _hf_stats(run, tokens: int) -> dict:
    """The GenerationStats fields HF can honestly report: forwards are counted, the
    tree-decoder-only measures (live KV, attended keys) are None, not invented."""
    return {
        "target_steps": run.target_forwards,
        "draft_forwards": run.draft_forwards,
        "tokens_generated": tokens,
        "peak_live_kv": None,
        "mean_live_kv": None,
        "attended_keys": None,
        "critical_path": tokens,  # one sequence: every token depends on the previous one
        "wall_time_s": run.wall_time_s,
        "num_branches": 1,
        "accepted": None,
        "drafted": None,
        "mean_acceptance_length": None,
        "acceptance_rate_per_position": [],
        "depth_rank_verified": [],
        "depth_rank_accepted": [],
        "steps_per_critical_path": run.target_forwards / tokens if tokens else 0.0,
    }


def make_row(runner: _Runner, v: Variant, prompt: Prompt, repeat: int, model: str, prompt_tokens: int,
             out_ids: list[int], text: str, wall: float, stats: dict, extra: dict) -> dict:
    """One JSONL row. ``tokens`` = tokens generated over all branches ([Fork] and EOS count,
    as in GenerationStats); ``tokens_per_s`` = tokens / ``wall_s`` (measured around the call);
    ``wall_time_s`` is the decoder's own timing, kept for reference."""
    s = runner.s
    tokens = int(stats["tokens_generated"])
    stats = dict(stats)
    stats.pop("tokens_per_s", None)  # the decoder's own rate; ours is measured around the call
    row = {
        "schema": SCHEMA,
        "setup_id": runner.setup_id,
        "variant": v.name,
        "config": v.config,
        "prompt_id": prompt.id,
        "category": prompt.category,
        "repeat": repeat,
        "model": model,
        "draft": v.draft,
        "k": v.k,
        "tree": v.tree,
        "max_step_tokens": v.step_cap,
        "max_depth": fork_depth(runner.ms.for_config(v.config).model, s.max_depth) if v.config in ("apar", "apar+spec") else None,
        "depth_cap": (s.depth_cap or _D.depth_cap) if v.config in ("apar", "apar+spec") else None,
        "fork_bias": fork_bias_of(runner.ms.for_config(v.config).model, s.fork_bias) if v.config in ("apar", "apar+spec") else None,
        "repeated_title": (s.repeated_title or _D.repeated_title) if v.config in ("apar", "apar+spec") else None,
        "fork_gate": gate_threshold(runner.ms.for_config(v.config).model, s.fork_gate) if v.config in ("apar", "apar+spec") else None,
        "max_branch_tokens": s.max_branch_tokens,
        "temperature": s.temperature,
        "max_new_tokens": s.max_new_tokens,
        "device": runner.ms.device,
        "threads": s.threads,
        "dtype": str(runner.ms.for_config(v.config).model.dtype).removeprefix("torch."),
        "prompt_tokens": prompt_tokens,
        "tokens": tokens,
        "answer_tokens": len(out_ids),
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        **stats,
        "steps_per_token": stats["target_steps"] / tokens if tokens else None,
        "output_ids": list(out_ids),
        "text": text[:TEXT_CHARS],
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    return row
