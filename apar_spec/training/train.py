"""Fine-tuning: one training loop for the embedded models and the SmolLM2 adapter.

Why one loop: the AR base, the APAR model and the draft differ only in their data
(plain answers or packed answer trees, see ``packing.py``) and loss switches (see
``losses.py``), so they share resuming, checkpoints and the structured/unstructured mix.
The loop is built on ``accelerate`` so the same code runs on CPU, one GPU, or under
``accelerate launch``.

:func:`train` reads as its named steps, in the order they must run (the seed is set
before the model is built, the frozen teacher is copied before a checkpoint is
resumed, the optimizer is built before ``accelerator.prepare``): prepare the model
and tokenizer, build the data, make the optimizer, resume, the step loop, save.

The library never prints: progress goes to ``on_progress`` as :class:`TrainProgress`
events, and the CLI (or a script) decides how to show them.
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from apar_spec.decoding.tokens import AparTokens, add_apar_tokens, find_apar_tokens
from apar_spec.options import TRAINED_DEPTH_KEY
from apar_spec.training.checkpoint import STATE_FILE, load_checkpoint, save_checkpoint, save_model
from apar_spec.training.data import BatchSchedule, TrainExample, mixed_pools, pack_example, read_examples
from apar_spec.training.losses import HARD_ROOTS, Distill, RootEos, adapter_off_teacher, model_teacher, summed_loss
from apar_spec.training.packing import PackedExample, collate


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of :func:`train` but what to train, on what, and where: the one place its defaults live.

    Checked on construction, so a bad setting fails before data is read or a model loaded.
    See :func:`train` for what each does.
    """

    steps: int
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    mix_ratio: float = 0.5
    max_len: int = 512
    resume: bool = False
    mode: str = "apar"
    max_depth: int = 1
    warmup_steps: int | None = None
    schedule: str = "cosine"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    save_every: int = 0
    checkpoint_dir: str | Path | None = None
    keep_checkpoint: bool = True
    save_dtype: torch.dtype | None = None
    log_every: int = 0
    mixed_precision: str = "no"
    stop_after: int | None = None
    share_rows: bool = True
    distill: float = 0.0
    distill_hard_after: int = 3
    distill_hard_labels: tuple[int, ...] = ()
    distill_hard_roots: str | None = None
    root_eos: float = 0.0
    root_eos_lead_only: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be 'cosine' or 'linear', not {self.schedule!r}")
        if not 0.0 <= self.mix_ratio <= 1.0:
            raise ValueError(f"mix_ratio must be in [0, 1], got {self.mix_ratio}")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill must be in [0, 1], got {self.distill}")
        if self.root_eos < 0.0:
            raise ValueError(f"root_eos must be >= 0, got {self.root_eos}")
        if self.distill_hard_roots not in HARD_ROOTS:
            raise ValueError(
                f"distill_hard_roots must be one of {', '.join(map(str, HARD_ROOTS))}, got {self.distill_hard_roots!r}"
            )

    @property
    def warmup(self) -> int:
        """``warmup_steps``, or 10% of the steps capped to 1..100."""
        return self.warmup_steps if self.warmup_steps is not None else min(100, max(1, self.steps // 10))

    @property
    def end(self) -> int:
        """The step this run stops after: ``steps``, or ``stop_after`` when that is sooner."""
        return self.steps if self.stop_after is None else min(self.steps, self.stop_after)


@dataclass(frozen=True)
class TrainProgress:
    """One progress event of :func:`train`: once as the loop starts, then once after every step.

    Why events and not a bar: the library never prints; the CLI draws a bar on a
    terminal and plain lines in a log, a script may print ``message`` only.
    """

    step: int  # optimizer steps done, counting those before a resume
    total: int  # the steps the schedule spans (``train(steps=...)``)
    loss: float | None = None  # this step's loss per trained token; None on the start event
    lr: float | None = None  # the learning rate after this step
    elapsed_s: float = 0.0  # since train() was called
    message: str | None = None  # a line to show as is: the resume note, the ``log_every`` summary


ProgressFn = Callable[[TrainProgress], None]


@dataclass
class TrainReport:
    out_dir: str
    steps: int  # optimizer steps done in total (including those before a resume)
    start_step: int  # 0, or the step a resumed run started from
    final_loss: float  # mean of the per-step losses (per trained token) over the last ~10% of steps
    losses: list[float] = field(default_factory=list)  # per step of this run
    wall_time_s: float = 0.0
    trained_tokens: int = 0
    num_examples: int = 0
    num_structured: int = 0
    num_truncated: int = 0
    num_parameters: int = 0
    fork_depth: int = 0  # deepest fork nesting in the training trees (saved as config.apar_max_depth)


# --------------------------------------------------------------------------- the steps of a run


@dataclass
class _Model:
    """The model ready to train, with what preparing it decided."""

    model: Any
    tokenizer: Any
    apar: AparTokens | None
    fork_depth: int  # deepest fork nesting in the data (0: none)
    frozen_start: Any = None  # a frozen copy of the model as it starts: the default teacher of a non-peft model


@dataclass
class _Data:
    """The packed examples, in pools, and which of them form each step's batch."""

    pools: list[list[PackedExample]]
    schedule: BatchSchedule
    num_truncated: int  # examples longer than max_len, cut to a prefix


@dataclass
class _Run:
    """What the step loop and the checkpoints touch, after ``accelerator.prepare``."""

    accelerator: Any
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    ckpt_dir: Path

    def save_checkpoint(self, step: int) -> None:
        """Weights, optimizer, scheduler and step into ``ckpt_dir`` (main process; all wait for it)."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_checkpoint(
                self.accelerator.unwrap_model(self.model),
                self.tokenizer,
                self.optimizer,
                self.scheduler,
                self.ckpt_dir,
                step,
            )


def _resolve_model(model, tokenizer):
    """A loaded model, an HF id / local path, or a config (fresh random init)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        if tokenizer is None:
            raise ValueError("training from a config needs tokenizer=")
        return AutoModelForCausalLM.from_config(model), tokenizer
    if isinstance(model, (str, Path)):
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(str(model))
        return AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32), tokenizer
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    return model, tokenizer


def _prepare_model(model, tokenizer, examples: list[TrainExample], cfg: TrainConfig, teacher) -> _Model:
    """Load the model, add ``[Fork]``/``[Child]`` (apar mode), record the fork depth, copy the default teacher.

    The teacher copy is taken here, after the APAR rows are added and before any
    checkpoint is resumed: it is the model as training starts.
    """
    model, tokenizer = _resolve_model(model, tokenizer)
    apar = add_apar_tokens(model, tokenizer) if cfg.mode == "apar" else find_apar_tokens(tokenizer)
    fork_depth = max((e.tree.depth() for e in examples), default=0)
    if cfg.mode == "apar" and fork_depth >= 1:  # decoding caps fork nesting here (options.model_decode_defaults)
        setattr(model.config, TRAINED_DEPTH_KEY, fork_depth)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    frozen_start = None
    if cfg.distill > 0.0 and teacher is None and not hasattr(model, "disable_adapter"):
        frozen_start = copy.deepcopy(model).requires_grad_(False)  # the teacher: the model as it starts
    return _Model(model, tokenizer, apar, fork_depth, frozen_start)


def _build_data(examples: list[TrainExample], prepared: _Model, cfg: TrainConfig, accelerator) -> _Data:
    """Pack every example (cut to ``max_len`` nodes), split the pools, and lay out this process's batches."""
    packed = [pack_example(e, prepared.tokenizer, prepared.apar) for e in examples]
    num_truncated = sum(len(p) > cfg.max_len for p in packed)
    packed = [p.truncate(cfg.max_len) for p in packed]
    pools, per_batch = mixed_pools(packed, [e.structured for e in examples], cfg.batch_size, cfg.mix_ratio)
    schedule = BatchSchedule(
        [len(p) for p in pools], per_batch, cfg.seed, accelerator.num_processes, accelerator.process_index
    )
    return _Data(pools, schedule, num_truncated)


def _make_optimizer(model, cfg: TrainConfig):
    """AdamW over the trainable parameters (no weight decay on vectors) and its warm-up schedule."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    trainable = [p for p in model.parameters() if p.requires_grad]  # all of them, or an adapter's
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    make_sched = get_cosine_schedule_with_warmup if cfg.schedule == "cosine" else get_linear_schedule_with_warmup
    return optimizer, make_sched(optimizer, cfg.warmup, cfg.steps)


def _loss_terms(run: _Run, prepared: _Model, cfg: TrainConfig, teacher) -> tuple[Distill | None, RootEos | None]:
    """The optional distillation and root-EOS terms of :func:`~apar_spec.training.losses.summed_loss`."""
    apar, eos_id = prepared.apar, run.tokenizer.eos_token_id
    distiller = None
    if cfg.distill > 0.0:
        special = (apar.fork_id, apar.child_id) if apar is not None else ()
        if teacher is not None:
            teach = model_teacher(teacher)
        elif prepared.frozen_start is not None:
            teach = model_teacher(prepared.frozen_start)
        else:
            teach = adapter_off_teacher(run.model)
        distiller = Distill(
            weight=cfg.distill,
            teacher=teach,
            hard_labels=special + (eos_id,) + tuple(cfg.distill_hard_labels),
            hard_inputs=special,
            never=special,
            hard_after=cfg.distill_hard_after,
            hard_roots=cfg.distill_hard_roots if cfg.mode == "apar" else None,
            child_id=apar.child_id if apar is not None else None,
        )
    ender = None
    if cfg.root_eos > 0.0 and cfg.mode == "apar":
        ender = RootEos(cfg.root_eos, eos_id, apar.child_id, apar.fork_id if cfg.root_eos_lead_only else None)
    return distiller, ender


def _optimizer_step(run: _Run, chosen: list[PackedExample], cfg: TrainConfig, terms) -> tuple[float, int]:
    """One forward/backward/update on the examples ``chosen``; (loss per trained token, trained tokens)."""
    accelerator = run.accelerator
    batch = collate(chosen, run.tokenizer.pad_token_id, share_rows=cfg.share_rows).to(accelerator.device)
    with accelerator.autocast():
        loss_sum, n_tok = summed_loss(run.model, batch, *terms)
    loss = loss_sum / max(n_tok, 1)
    accelerator.backward(loss)
    if cfg.grad_clip:
        accelerator.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()), n_tok


def _run_steps(run: _Run, data: _Data, cfg: TrainConfig, terms, start_step: int, emit: ProgressFn, t0: float):
    """Steps ``start_step .. cfg.end - 1``, with periodic checkpoints; (per-step losses, trained tokens)."""
    losses: list[float] = []
    trained_tokens = 0
    for step in range(start_step, cfg.end):
        chosen = [data.pools[pool][i] for pool, i in data.schedule.indices(step)]
        loss, n_tok = _optimizer_step(run, chosen, cfg, terms)
        losses.append(loss)
        trained_tokens += n_tok
        lr, elapsed = run.scheduler.get_last_lr()[0], time.perf_counter() - t0
        note = None
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            recent = losses[-cfg.log_every :]
            note = f"step {step + 1}/{cfg.steps} loss {sum(recent) / len(recent):.4f} lr {lr:.2e} {elapsed:.0f}s"
        emit(TrainProgress(step + 1, cfg.steps, loss=loss, lr=lr, elapsed_s=elapsed, message=note))
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            run.save_checkpoint(step + 1)
    return losses, trained_tokens


def _finish(run: _Run, cfg: TrainConfig, out_dir: Path):
    """The last checkpoint, and (a run that reached ``steps``) the final model; the unwrapped model."""
    if cfg.keep_checkpoint or cfg.end < cfg.steps:
        run.save_checkpoint(cfg.end)
    run.accelerator.wait_for_everyone()
    unwrapped = run.accelerator.unwrap_model(run.model)
    if run.accelerator.is_main_process and cfg.end == cfg.steps:
        save_model(unwrapped, run.tokenizer, out_dir, cfg.save_dtype)
        if not cfg.keep_checkpoint and run.ckpt_dir.is_dir() and run.ckpt_dir.resolve() != out_dir.resolve():
            shutil.rmtree(run.ckpt_dir)
    return unwrapped


# --------------------------------------------------------------------------- the loop


def train(
    model,
    data,
    out_dir: str | Path,
    *,
    steps: int,
    batch_size: int = TrainConfig.batch_size,
    lr: float = TrainConfig.lr,
    seed: int = TrainConfig.seed,
    mix_ratio: float = TrainConfig.mix_ratio,
    max_len: int = TrainConfig.max_len,
    resume: bool = TrainConfig.resume,
    tokenizer=None,
    mode: str = TrainConfig.mode,
    max_depth: int = TrainConfig.max_depth,
    warmup_steps: int | None = TrainConfig.warmup_steps,
    schedule: str = TrainConfig.schedule,
    weight_decay: float = TrainConfig.weight_decay,
    grad_clip: float = TrainConfig.grad_clip,
    save_every: int = TrainConfig.save_every,
    checkpoint_dir: str | Path | None = TrainConfig.checkpoint_dir,
    keep_checkpoint: bool = TrainConfig.keep_checkpoint,
    save_dtype: torch.dtype | None = TrainConfig.save_dtype,
    log_every: int = TrainConfig.log_every,
    mixed_precision: str = TrainConfig.mixed_precision,
    stop_after: int | None = TrainConfig.stop_after,
    share_rows: bool = TrainConfig.share_rows,
    distill: float = TrainConfig.distill,
    teacher=None,
    distill_hard_after: int = TrainConfig.distill_hard_after,
    distill_hard_labels: tuple[int, ...] = TrainConfig.distill_hard_labels,
    distill_hard_roots: str | None = TrainConfig.distill_hard_roots,
    root_eos: float = TrainConfig.root_eos,
    root_eos_lead_only: bool = TrainConfig.root_eos_lead_only,
    on_progress: ProgressFn | None = None,
) -> TrainReport:
    """Train ``model`` on answer trees (``mode="apar"``) or sequential answers (``mode="plain"``).

    Built on ``accelerate`` so the same code runs on CPU, one GPU, or ``accelerate launch``
    (``batch_size`` is per process). In apar mode each batch holds
    ``round(batch_size * mix_ratio)`` structured examples (trees with forks) and the rest
    unstructured ones, as in the paper's 0.5/0.5 mix; if one pool is empty the other fills
    the batch. Examples longer than ``max_len`` nodes are truncated (a prefix of a
    packed tree is still a tree).

    Resuming: every ``save_every`` steps (and at the end) model weights, optimizer,
    scheduler and step go to ``checkpoint_dir`` (default ``out_dir/checkpoint``);
    ``resume=True`` continues from there. Batches depend only on (seed, step), so a
    resumed run sees the same data as an uninterrupted one. The final model is saved to
    ``out_dir`` with ``save_pretrained`` (safetensors, cast to ``save_dtype`` if given).
    ``stop_after=n`` stops after step ``n`` with a checkpoint and no final model (for
    time-limited jobs, and to test resuming); the schedule still spans ``steps``.
    ``share_rows`` lets short examples share a padded row (same loss, less compute).
    ``distill`` (0..1) mixes a KL term towards ``teacher`` into the loss at ordinary nodes
    (see :class:`~apar_spec.training.losses.Distill`; ``distill_hard_after`` is its ``hard_after``;
    ``distill_hard_labels``
    are more labels that train with CE only, e.g. the tokens holding a line break, where a
    branch goes on instead of ending; on SmolLM2 that made every forked list well-formed but
    did not cut early stops, see the smollm2-apar card); ``distill_hard_roots`` ("forked" or
    "all") trains those root branches with CE only (:class:`Distill`'s ``hard_roots``). The teacher
    defaults to the model as training starts: for a peft model the same model with its
    adapter off (no copy), otherwise a frozen copy taken before the first step (after the
    ``[Fork]``/``[Child]`` rows are added, before any checkpoint is resumed).
    ``root_eos`` (>= 0) weighs an unlikelihood term against EOS at root nodes that go on
    (see :class:`~apar_spec.training.losses.RootEos`; apar mode only); ``root_eos_lead_only`` keeps it to the root's
    nodes before its first ``[Fork]``.

    ``on_progress`` (main process only) gets a :class:`TrainProgress` as the loop starts
    (with the resume note, if any) and after every step (with the ``log_every`` summary
    every ``log_every`` steps); nothing is printed here.
    """
    given = locals()  # the arguments, before anything else is bound: the settings are a TrainConfig
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg = TrainConfig(**{f.name: given[f.name] for f in fields(TrainConfig)})
    examples = read_examples(data, mode=mode, max_depth=max_depth)  # fail on bad data before loading a model
    out_dir = Path(out_dir)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir / "checkpoint"
    t0 = time.perf_counter()

    set_seed(seed)
    accelerator = Accelerator(mixed_precision=mixed_precision)
    emit = on_progress if on_progress is not None and accelerator.is_main_process else (lambda event: None)
    prepared = _prepare_model(model, tokenizer, examples, cfg, teacher)
    dataset = _build_data(examples, prepared, cfg, accelerator)
    prepared.model.train()
    optimizer, scheduler = _make_optimizer(prepared.model, cfg)
    start_step, note = 0, None
    if resume and (ckpt_dir / STATE_FILE).is_file():
        start_step = load_checkpoint(prepared.model, optimizer, scheduler, ckpt_dir)
        note = f"resuming from {ckpt_dir} at step {start_step}"
    wrapped, optimizer, scheduler = accelerator.prepare(prepared.model, optimizer, scheduler)
    run = _Run(accelerator, wrapped, prepared.tokenizer, optimizer, scheduler, ckpt_dir)
    terms = _loss_terms(run, prepared, cfg, teacher)

    emit(TrainProgress(start_step, steps, elapsed_s=time.perf_counter() - t0, message=note))
    losses, trained_tokens = _run_steps(run, dataset, cfg, terms, start_step, emit, t0)
    unwrapped = _finish(run, cfg, out_dir)
    tail = losses[-max(1, len(losses) // 10) :] if losses else [math.nan]
    return TrainReport(
        out_dir=str(out_dir),
        steps=cfg.end,
        start_step=start_step,
        final_loss=sum(tail) / len(tail),
        losses=losses,
        wall_time_s=time.perf_counter() - t0,
        trained_tokens=trained_tokens,
        num_examples=len(examples),
        num_structured=sum(e.structured for e in examples),
        fork_depth=prepared.fork_depth,
        num_truncated=dataset.num_truncated,
        num_parameters=sum(p.numel() for p in unwrapped.parameters()),
    )
