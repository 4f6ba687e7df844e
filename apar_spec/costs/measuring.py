"""Measuring pass costs on this machine: forward passes through the decoder's real path,
the decoder's own per-step work, heads, and switching between target and draft."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from apar_spec.costs.cache import (
    BATCH_CONTEXT,
    BATCH_NEW,
    BATCH_ROWS,
    DEFAULT_CONTEXTS,
    DEFAULT_HEADS,
    HEAD_ROWS,
    SIZES,
    CostCacheError,
    ModelCosts,
    Overhead,
    Say,
    _interp,
    key_for,
    load_costs,
    save,
)
from apar_spec.decoding.speculator import Proposal, resolve_draft


def get_costs(
    model,
    name: str = "",
    *,
    threads: Optional[int] = None,
    with_heads: bool = True,
    directory: Optional[Path] = None,
    say: Optional[Say] = None,
    **measure_kwargs: Any,
) -> ModelCosts:
    """Cached costs of ``model``, measuring (and saying so) when there are none or the file is bad."""
    key = key_for(model, threads)
    try:
        costs = load_costs(key, directory)
    except CostCacheError as err:
        if say:
            say(f"{err}; measuring again")
        costs = None
    if costs is not None:
        changed = False
        if with_heads and not costs.heads:  # measured earlier without the heads: add them only
            if say:
                say(f"measuring the heads stand-in for {name or costs.name} once")
            previous = torch.get_num_threads()
            if key.threads is not None:
                torch.set_num_threads(key.threads)
            try:
                costs.heads = measure_heads(model, progress=say, label=name or costs.name)
            finally:
                torch.set_num_threads(previous)
            changed = True
        if name and name not in costs.names:
            costs.names.append(name)
            changed = True
        if changed:
            save(costs, directory)
        return costs
    if say:
        say(
            f"no cached costs for {name or 'this model'} ({key.dtype}, {key.device}, threads={key.threads}); "
            f"measuring them once"
        )
    costs = measure(model, name, threads=threads, with_heads=with_heads, progress=say, **measure_kwargs)
    path = save(costs, directory)
    if say:
        say(f"costs saved to {path}")
    return costs


def ensure_switch(
    target: ModelCosts,
    model,
    draft: ModelCosts,
    draft_model,
    *,
    directory: Optional[Path] = None,
    say: Optional[Say] = None,
    tokenizer=None,
) -> ModelCosts:
    """``target`` with the switching cost to ``draft`` measured (once, then cached in its file)."""
    if draft.key.fingerprint in target.switch:
        return target
    if say:
        say(f"measuring the cost of switching between {target.name} and {draft.name} once")
    previous = torch.get_num_threads()
    if target.key.threads is not None:
        torch.set_num_threads(target.key.threads)
    try:
        target.switch[draft.key.fingerprint] = measure_switch(
            model,
            draft_model,
            progress=say,
            label=target.name,
            target_costs=target,
            draft_costs=draft,
            tokenizer=tokenizer,
        )
    finally:
        torch.set_num_threads(previous)
    save(target, directory)
    return target


# ===================================================================== measuring


class _ProbeSpeculator:
    """Proposes ``k`` copies of one token for every branch at no cost: what remains of a
    step's time once its forward is subtracted is the decoder's own per-step work."""

    name = "cost-probe"

    def __init__(self, token: int):
        self.token = token

    @property
    def forwards(self) -> int:
        return 0

    def reset(self, num_requests: int, vocab_size: int, generator=None) -> None:
        pass

    def propose(self, views, sampling) -> Proposal:
        return Proposal([[self.token] * v.k for v in views], [None] * len(views))

    def observe(self, outcome) -> None:
        pass


class _ForwardBench:
    """A ``TreeCache`` of ``rows`` rows holding ``context`` random prompt tokens each, on which
    a pass with ``n`` new chained nodes per row is timed, then dropped again (``compact``)."""

    def __init__(self, model, context: int, rows: int, gen: torch.Generator, target: bool = True, layout: str = "auto"):
        from apar_spec.decoding.paged_cache import new_cache

        self.model, self.rows, self.gen = model, rows, gen
        self.vocab = model.config.vocab_size
        # the layout and attention the decoder gives a target (a draft model keeps the padded one)
        self.tc = new_cache(model, rows, layout if target else "padded", gqa_attention=target)
        self.prefix = [self.tc.add_chain(r, self._ids(context), -1) for r in range(rows)]
        with torch.inference_mode():
            self.tc.forward()
        self.live = [set(p) for p in self.prefix]

    def _ids(self, n: int) -> list[int]:
        return torch.randint(min(5, self.vocab - 1), self.vocab, (n,), generator=self.gen).tolist()

    @torch.inference_mode()
    def time(self, n: int) -> float:
        for r in range(self.rows):
            self.tc.add_chain(r, self._ids(n), self.prefix[r][-1])
        _sync(self.model.device)
        t0 = time.perf_counter()
        self.tc.forward()
        _sync(self.model.device)
        elapsed = time.perf_counter() - t0
        self.tc.compact(self.live)  # back to the context only (not timed)
        return elapsed


def measure_batch(
    model,
    rows: Sequence[int],
    gen: torch.Generator,
    repeats: int,
    progress: Optional[Say] = None,
    label: str = "model",
) -> dict[int, dict[int, float]]:
    """Packed passes of ``rows`` requests x ``BATCH_NEW`` new nodes each over ``BATCH_CONTEXT``
    slots: the cost of a loaded step, by batch size (``ModelCosts.batch``). The largest pass
    feeds hundreds of nodes, so it takes fewer rounds than the one-row curve (at most 5)."""
    max_pos = getattr(model.config, "max_position_embeddings", None) or 4096
    context = max(8, min(BATCH_CONTEXT, max_pos - max(BATCH_NEW) - 8))
    benches = {r: _ForwardBench(model, context, r, gen, layout="paged") for r in rows}  # the engine's layout
    jobs: dict = {("batch", r, n): (lambda b=benches[r], n=n: b.time(n)) for r in rows for n in BATCH_NEW}
    t = _timed_rounds(jobs, min(repeats, 5), 1, progress, f"{label} passes by batch size")
    return {r: {n: t[("batch", r, n)] for n in BATCH_NEW} for r in rows}


def _sync(device) -> None:
    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


def _timed_rounds(jobs: dict, repeats: int, warmup: int, progress: Optional[Say], what: str) -> dict:
    """Robust seconds (:func:`robust_time`) of each job: a no-argument function returning one
    timing or a list of them. Jobs are interleaved, every round runs each job once (in
    alternating order), so a burst of machine noise hits every size and every probe alike."""
    times: dict = {key: [] for key in jobs}
    keys = list(jobs)
    for i in range(warmup + repeats):
        if progress and i >= warmup:
            progress(f"measuring {what}: round {i - warmup + 1}/{repeats} ({len(keys)} sizes)")
        order = keys if i % 2 == 0 else keys[::-1]
        for key in order:
            t = jobs[key]()
            if i >= warmup:
                times[key].extend(t if isinstance(t, list) else [t])
    return {key: robust_time(v) for key, v in times.items()}


def robust_time(samples: Sequence[float]) -> float:
    """The median of the fastest tenth of repeated timings (the minimum of up to 19).

    Why not the plain median: on a shared CPU other processes preempt ours in bursts
    of scheduler slices (~4 ms, longer than a tiny model's pass), and a burst can spoil
    more than half of one size's samples, so a median curve turns jagged (measured:
    a 6-token pass of tiny-apar at 1.84 ms uncontended, median 4.81 ms under load).
    The overhead, switch and draft-Python terms are differences between a long
    timing (a whole decoder step) and short ones (passes); under heavy load a long
    step is rarely uninterrupted, so only a low statistic keeps those differences
    from absorbing the noise (a fastest-fifth statistic once gave 1.0 ms of draft
    Python per pass where 0.05-0.13 ms is the rule)."""
    xs = sorted(samples)
    return statistics.median(xs[: max(1, len(xs) // 10)])


def measure_forward(
    model,
    sizes: Sequence[int] = SIZES,
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    repeats: int = 7,
    warmup: int = 2,
    progress: Optional[Say] = None,
    label: str = "",
) -> dict[int, dict[int, float]]:
    """context -> (new nodes -> median seconds of one ``TreeCache.forward``), one cache row."""
    gen = torch.Generator().manual_seed(0)
    benches = {c: _ForwardBench(model, c, 1, gen) for c in contexts}
    jobs = {(c, n): (lambda b=benches[c], n=n: b.time(n)) for c in contexts for n in sizes}
    med = _timed_rounds(jobs, repeats, warmup, progress, f"{label} forward")
    return {c: {int(n): med[(c, n)] for n in sizes} for c in contexts}


def _apar_of(tokenizer):
    if tokenizer is None:
        return None
    from apar_spec.decoding.tokens import find_apar_tokens

    return find_apar_tokens(tokenizer)


class _DecodeProbe:
    """Real decoder steps for ``branches`` requests (one branch each, one cache row each) with
    ``k`` probe drafts per branch: each run returns the wall time between consecutive steps."""

    def __init__(
        self, model, context: int, branches: int, k: int, steps: int, gen: torch.Generator, apar=None, speculator=None
    ):
        from apar_spec.decoding.decoder import Decoder
        from apar_spec.options import DecodeOptions

        vocab = model.config.vocab_size
        self.stamps: list[float] = []
        opts = DecodeOptions(max_new_tokens=steps + 2, num_draft_tokens=max(k, 1), batch_size=branches)
        if speculator is None and k:
            speculator = _ProbeSpeculator(min(5, vocab - 1))
        # apar: the model's [Fork]/[Child] ids, so the fork rules' per-step work is in the probe (forks stay off)
        self.decoder = Decoder(
            model,
            opts,
            apar,
            fork_enabled=False,
            eos_ids=set(),
            speculator=speculator,
            on_step=lambda live, tc: self.stamps.append(time.perf_counter()),
        )
        self.prompts = [
            torch.randint(min(5, vocab - 1), vocab, (context,), generator=gen).tolist() for _ in range(branches)
        ]

    def time(self) -> list[float]:
        self.stamps.clear()
        self.decoder.run(self.prompts)
        return [t1 - t0 for t0, t1 in zip(self.stamps, self.stamps[1:])]


# (branches, probe drafts per branch) of the decoder runs the overhead is fitted to
OVERHEAD_PLANS = ((1, 0), (1, 4), (1, 12), (4, 0), (4, 4))


def _fit_overhead(points: list[tuple[float, float, float]]) -> Overhead:
    """Least squares for ``y = base + per_branch*b + per_draft*d`` (coefficients kept >= 0)."""
    import numpy as np

    if not points:
        return Overhead()
    a = np.array([[1.0, b, d] for b, d, _ in points])
    y = np.array([o for _, _, o in points])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    coef = np.maximum(coef, 0.0)
    return Overhead(float(coef[0]), float(coef[1]), float(coef[2]))


@torch.inference_mode()
def measure_heads(
    model,
    num_heads: int = DEFAULT_HEADS,
    rows: Sequence[int] = HEAD_ROWS,
    repeats: int = 7,
    warmup: int = 2,
    progress: Optional[Say] = None,
    label: str = "",
) -> dict[int, float]:
    """Seconds for ``num_heads`` residual blocks (d x d linear + SiLU) and the model's own LM
    head on ``num_heads x rows`` hidden states: the heads speculator's work per step."""
    lm_head = model.get_output_embeddings()
    d = lm_head.weight.shape[1]
    blocks = [torch.nn.Linear(d, d, device=model.device, dtype=model.dtype) for _ in range(num_heads)]
    out = {}
    for i, n in enumerate(rows):
        if progress:
            progress(f"measuring {label} heads stand-in: {n} row(s) [{i + 1}/{len(rows)}]")
        h = torch.randn(n, d, device=model.device, dtype=model.dtype)
        times = []
        for j in range(warmup + repeats):
            _sync(model.device)
            t0 = time.perf_counter()
            hs = torch.stack([h + torch.nn.functional.silu(blk(h)) for blk in blocks])  # [heads, rows, d]
            lm_head(hs).topk(4, dim=-1)  # [heads, rows, V] -> candidates
            _sync(model.device)
            if j >= warmup:
                times.append(time.perf_counter() - t0)
        out[int(n)] = robust_time(times)
    return out


@torch.inference_mode()
def measure_switch(
    target,
    draft,
    repeats: int = 15,
    warmup: int = 2,
    context: int = DEFAULT_CONTEXTS[0],
    progress: Optional[Say] = None,
    label: str = "",
    target_costs: Optional[ModelCosts] = None,
    draft_costs: Optional[ModelCosts] = None,
    tokenizer=None,
    steps: int = 8,
) -> dict[str, float]:
    """Extra seconds a pass costs when the *other* model ran just before it.

    A draft-LM step alternates the two models (k draft passes, then the target's verify
    pass), and on a CPU each switch reloads the other model's weights into the caches:
    measured on the embedded trio, that costs about as much as a whole one-token pass,
    so the plain per-model curves alone would flatter the draft LM. Each sample here
    times a 1- or 4-token pass right after a pass of the same model (warm) or of the
    other model (cold); the penalty is the mean cold - warm difference, kept >= 0.

    With both models' costs given, it also times real decoder steps drafting 4 tokens with
    the draft LM itself, and returns as ``per_pass`` the draft speculator's own Python work
    per draft pass and branch: step - (target pass + 4 draft passes + switches + decoder overhead), / 4
    (measured with one branch)."""
    gen = torch.Generator().manual_seed(2)
    tb, db = _ForwardBench(target, context, 1, gen), _ForwardBench(draft, context, 1, gen, target=False)

    def after(first, second, n):
        return lambda: (first.time(1), second.time(n))[1]

    jobs: dict[tuple, Any] = {}
    for n in (1, 4):
        jobs[("target", "warm", n)] = after(tb, tb, n)
        jobs[("target", "cold", n)] = after(db, tb, n)
        jobs[("draft", "warm", n)] = after(db, db, n)
        jobs[("draft", "cold", n)] = after(tb, db, n)
    k = 4
    if target_costs is not None and draft_costs is not None:
        spec = resolve_draft(draft, target, tokenizer)
        jobs[("lm-step",)] = _DecodeProbe(target, context, 1, k, steps, gen, _apar_of(tokenizer), spec).time
    t = _timed_rounds(jobs, repeats, warmup, progress, f"{label} switching between target and draft")
    out = {
        who: max(0.0, statistics.fmean(t[(who, "cold", n)] - t[(who, "warm", n)] for n in (1, 4)))
        for who in ("target", "draft")
    }
    if ("lm-step",) in t:
        known = (
            target_costs.forward_cost(1 + k, context)
            + target_costs.overhead(1, k)
            + out["target"]
            + out["draft"]
            + draft_costs.forward_cost(1, context) * k
        )
        out["per_pass"] = max(0.0, (t[("lm-step",)] - known) / k)
    return out


def measure(
    model,
    name: str = "",
    *,
    threads: Optional[int] = None,
    sizes: Sequence[int] = SIZES,
    contexts: Optional[Sequence[int]] = None,
    repeats: int = 15,
    warmup: int = 2,
    with_heads: bool = True,
    with_overhead: bool = True,
    overhead_steps: int = 8,
    with_batch: bool = True,
    batch_rows: Sequence[int] = BATCH_ROWS,
    tokenizer=None,
    progress: Optional[Say] = None,
) -> ModelCosts:
    """Measure ``model``'s costs under ``threads`` CPU threads (None = as set now). ``tokenizer``
    (optional) lets the overhead probes run the fork rules when the model has APAR tokens."""
    from apar_spec.decoding.tree_cache import check_supported

    check_supported(model)
    previous = torch.get_num_threads()
    if threads is not None and model.device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        key = key_for(model, threads)
        max_pos = getattr(model.config, "max_position_embeddings", None) or 4096
        room = max(8, max_pos - max(sizes) - 64)
        ctxs = sorted({min(c, room) for c in (contexts or DEFAULT_CONTEXTS)})
        label = name or "model"
        gen = torch.Generator().manual_seed(0)
        benches = {c: _ForwardBench(model, c, 1, gen) for c in ctxs}
        jobs: dict = {("fwd", c, n): (lambda b=benches[c], n=n: b.time(n)) for c in ctxs for n in sizes}
        if with_overhead:
            # The overhead is a step's wall time minus its pass: both are timed in the same rounds,
            # so they see the same machine. Batched probes run 4 rows: their pass is timed as such.
            rows4 = _ForwardBench(model, ctxs[0], 4, gen)
            for b, k in OVERHEAD_PLANS:
                jobs[("step", b, k)] = _DecodeProbe(model, ctxs[0], b, k, overhead_steps, gen, _apar_of(tokenizer)).time
                if b > 1:
                    jobs[("rows", b, k)] = lambda k=k: rows4.time(1 + k)
        t = _timed_rounds(jobs, repeats, warmup, progress, f"{label} passes and decoder steps")
        fwd = {c: {int(n): t[("fwd", c, n)] for n in sizes} for c in ctxs}
        over = Overhead()
        if with_overhead:
            points: list[tuple[float, float, float]] = []
            for b, k in OVERHEAD_PLANS:
                pass_cost = _interp(fwd[ctxs[0]], 1 + k) if b == 1 else t[("rows", b, k)]
                points.append((b, b * k, max(0.0, t[("step", b, k)] - pass_cost)))
            over = _fit_overhead(points)
        heads = (
            measure_heads(model, repeats=repeats, warmup=warmup, progress=progress, label=label) if with_heads else {}
        )
        batch = measure_batch(model, batch_rows, gen, repeats, progress, label) if with_batch else {}
    finally:
        torch.set_num_threads(previous)
    import transformers

    return ModelCosts(
        name=name or getattr(model.config, "_name_or_path", "") or "model",
        key=key,
        forward=fwd,
        batch=batch,
        overhead=over,
        heads=heads,
        repeats=repeats,
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
        names=[name] if name else [],
    )
