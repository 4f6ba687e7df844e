"""The cost model: measured pass costs -> predicted speed-up -> the draft tree (or k) worth using.

Why (DESIGN.md, "Cost model"): speculation pays off only when the expected
tokens per step outgrow what a step costs relative to a plain one-token step.
On a CPU a verify pass over n new tokens costs far more than a one-token pass,
and on the embedded trio a draft forward costs about as much as a target
forward, so the best draft length depends on the machine. Sequoia and EAGLE-2
size their trees the same way: expected accepted tokens per unit of cost.

Three parts, each testable alone:

1. **Measure** (:func:`measure`), once per (model shape fingerprint, dtype,
   device, threads), cached as JSON under ``$XDG_CACHE_HOME/apar-spec/costs/``:

   - ``forward``: seconds of one ``TreeCache.forward`` (the decoder's real path:
     4D tree mask, ``position_ids``, the cache object) with n new nodes in one
     row, for n in :data:`SIZES`, over caches of :data:`DEFAULT_CONTEXTS` slots;
     :meth:`ModelCosts.forward_cost` interpolates in both;
   - ``overhead``: the decoder's per-step work outside that forward (phases,
     rules, commit, garbage), fitted as ``base + per_branch * b + per_draft * d``
     to short real decodes with a zero-cost probe speculator (:data:`OVERHEAD_PLANS`):
     each step's wall time minus the cost of that step's pass;
   - ``heads``: seconds for K residual d x d blocks plus the shared LM head on
     K x rows hidden states (a stand-in of the heads' size; the real module may
     not exist yet);
   - a draft LM is measured the same way (its own file), so its pass cost is its
     own ``forward`` curve at the frontier size; with a (target, draft) pair,
     :func:`measure_switch` adds to the target's file what alternating the two
     models costs and the draft speculator's own Python work per draft pass.

   Every timing runs ``warmup`` + ``repeats`` interleaved rounds (each round times
   every size and probe once) and keeps a robust low statistic (:func:`robust_time`:
   on a shared CPU, noise only adds time).

   The fingerprint is a hash of the config fields that set the cost (family,
   sizes, layers, heads, vocabulary): two checkpoints of one architecture share
   costs (``tiny-apar`` and ``tiny-base`` do), another dtype, device, thread
   count or shape is another file.

2. **Predict** (:func:`predict`): for a step plan (speculator kind, tree shape,
   live branches ``b``) and an acceptance profile ``p(d, r)``::

       tokens/step = b * (expected_accepted(shape, p) + 1)
       cost/step   = target.forward(b * (1 + shape.size))
                   + draft cost   (model: sum over depths of draft.forward(b * frontier)
                                   + switches + draft Python per pass; heads: heads(b); ngram: 0)
                   + target.overhead(b, b * shape.size)
       speed-up    = (tokens/step / cost/step) / (b0 / cost of the same mode's plain step with b0 branches)

   :func:`predict_prompt` does this for benchmark rows (the report's ``pred``
   column): tokens, the plain run's steps, live branches and cache lengths come
   from the rows themselves, the acceptance profile from the speculative rows,
   the costs from the cache; the speculative run's steps and every second are
   predicted.

3. **Choose** (:func:`choose_tree`, :func:`choose_k`, :func:`resolve_auto`):
   the candidate with the highest predicted tokens per second among chains
   1..16, full ``topk:WxD`` trees and greedily grown trees (add the node with
   the highest path probability, one at a time, scoring every size: EAGLE-2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from apar_spec.speculator import Proposal
from apar_spec.draft_tree import MAX_TREE_NODES, TreeShape, chain, expected_accepted, full_tree, layout

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # new nodes per pass that get measured
HEAD_ROWS = (1, 2, 4, 8, 16)  # hidden states the heads read per step (one per live branch)
DEFAULT_HEADS = 4
# cache lengths measured (interpolated between): a short prompt, and a prompt plus a few hundred tokens
DEFAULT_CONTEXTS = (64, 512)
CACHE_VERSION = 1
KINDS = ("model", "ngram", "heads")
# Live branches per step assumed by "auto" in apar+spec before anything is decoded (the
# embedded APAR answers measured 1.6-3.4; more branches make long drafts costlier).
APAR_BRANCHES_GUESS = 2.0  # speculator kinds the model knows how to cost
# Acceptance assumed when nothing better is known (per-depth probability that the top guess is right).
DEFAULT_ALPHA = {"model": 0.7, "heads": 0.6, "ngram": 0.4}
_SHAPE_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings",
)

Say = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ===================================================================== keys and files


@dataclass(frozen=True)
class CostKey:
    """What a cost file is valid for. ``threads`` is None on accelerators."""

    fingerprint: str
    dtype: str
    device: str
    threads: Optional[int]

    def filename(self) -> str:
        dev = self.device.replace(":", "-").replace(" ", "_").replace("/", "_")
        return f"{self.fingerprint}-{self.dtype}-{dev}-t{self.threads if self.threads is not None else 'any'}.json"


def config_fingerprint(config) -> str:
    """Short hash of the config fields that decide what a forward costs (not the weights)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    shape = {k: d.get(k) for k in _SHAPE_KEYS}
    return hashlib.sha1(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:12]


def device_label(device) -> str:
    """``cpu`` or ``cuda-<gpu name>``: costs measured on one GPU model say nothing about another."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"cuda-{torch.cuda.get_device_name(dev)}"
    return dev.type


def key_for(model, threads: Optional[int] = None) -> CostKey:
    """The cache key of ``model`` as it is loaded now (dtype, device) under ``threads``
    (None = torch's current count on CPU)."""
    dev = model.device
    if dev.type == "cpu":
        threads = threads if threads is not None else torch.get_num_threads()
    else:
        threads = None
    return CostKey(config_fingerprint(model.config), str(model.dtype).removeprefix("torch."), device_label(dev), threads)


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "apar-spec" / "costs"


class CostCacheError(ValueError):
    """A cost file that cannot be read (corrupt, another version): one line, says what to do."""


# ===================================================================== the measured costs


@dataclass
class Overhead:
    """Decoder work per step outside the target forward, in seconds: ``base + per_branch*b + per_draft*d``."""

    base: float = 0.0
    per_branch: float = 0.0
    per_draft: float = 0.0

    def __call__(self, branches: float, drafted: float) -> float:
        return self.base + self.per_branch * branches + self.per_draft * drafted


@dataclass
class ModelCosts:
    """Measured costs of one model (see the module docstring). Times in seconds."""

    name: str
    key: CostKey
    forward: dict[int, dict[int, float]]  # cache length -> (new nodes in the pass -> seconds), one row
    overhead: Overhead = field(default_factory=Overhead)
    heads: dict[int, float] = field(default_factory=dict)  # rows read -> seconds for all heads (stand-in)
    num_heads: int = DEFAULT_HEADS
    repeats: int = 0
    measured_at: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # every model name these costs were asked for
    # draft fingerprint -> extra seconds of this model's first pass after that draft ran
    # ("target") and of the draft's first pass after this model ran ("draft"): see measure_switch
    switch: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def contexts(self) -> list[int]:
        return sorted(self.forward)

    def forward_cost(self, n: float, context: Optional[float] = None) -> float:
        """Seconds of a pass with ``n`` new nodes over ``context`` cached slots (None = the
        shortest measured): piecewise linear in ``n`` between measured sizes (linear past the
        largest), then linear in the cache length between (and beyond) the measured ones."""
        ctxs = self.contexts
        if context is None or len(ctxs) == 1:
            return _interp(self.forward[ctxs[0]], n)
        lo, hi = (ctxs[0], ctxs[1]) if context <= ctxs[1] else next(
            ((a, b) for a, b in zip(ctxs, ctxs[1:]) if context <= b), (ctxs[-2], ctxs[-1]))
        a, b = _interp(self.forward[lo], n), _interp(self.forward[hi], n)
        return max(min(a, b) * 0.5, a + (b - a) * (context - lo) / (hi - lo))

    def heads_cost(self, rows: float) -> float:
        if not self.heads:
            raise CostCacheError(
                f"costs of {self.name} hold no heads measurement; run `apar-spec costs measure --model {self.name}`"
            )
        return _interp(self.heads, rows)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["forward"] = {str(c): {str(k): v for k, v in t.items()} for c, t in self.forward.items()}
        d["heads"] = {str(k): v for k, v in self.heads.items()}
        d["version"] = CACHE_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelCosts":
        if not isinstance(d, dict) or d.get("version") != CACHE_VERSION:
            raise CostCacheError(f"cost file version {d.get('version') if isinstance(d, dict) else '?'} is not {CACHE_VERSION}")
        forward = {int(c): {int(k): float(v) for k, v in t.items()} for c, t in d["forward"].items()}
        if not forward or any(not t or any(v <= 0 or not math.isfinite(v) for v in t.values()) for t in forward.values()):
            raise CostCacheError("cost file holds no valid forward timings")
        return cls(
            name=str(d["name"]),
            key=CostKey(**d["key"]),
            forward=forward,
            overhead=Overhead(**d.get("overhead", {})),
            heads={int(k): float(v) for k, v in d.get("heads", {}).items()},
            num_heads=int(d.get("num_heads", DEFAULT_HEADS)),
            repeats=int(d.get("repeats", 0)),
            measured_at=str(d.get("measured_at", "")),
            versions=dict(d.get("versions", {})),
            names=list(d.get("names", [])),
            switch={str(k): {str(a): float(b) for a, b in v.items()} for k, v in d.get("switch", {}).items()},
        )


def _interp(table: dict[int, float], x: float) -> float:
    xs = sorted(table)
    if len(xs) == 1:
        return table[xs[0]] * max(x, 1) / xs[0]
    if x <= xs[0]:
        return table[xs[0]]
    for lo, hi in zip(xs, xs[1:]):
        if x <= hi:
            return table[lo] + (table[hi] - table[lo]) * (x - lo) / (hi - lo)
    lo, hi = xs[-2], xs[-1]
    slope = max(0.0, (table[hi] - table[lo]) / (hi - lo))
    return table[hi] + slope * (x - hi)


# ===================================================================== cache I/O


def save(costs: ModelCosts, directory: Optional[Path] = None) -> Path:
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / costs.key.filename()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(costs.to_dict(), indent=1))
    tmp.replace(path)  # a crash mid-write never leaves half a file under the real name
    return path


def load_costs(key: CostKey, directory: Optional[Path] = None) -> Optional[ModelCosts]:
    """Cached costs for ``key``; None if never measured; :class:`CostCacheError` if the file is bad."""
    path = (directory or cache_dir()) / key.filename()
    if not path.exists():
        return None
    try:
        costs = ModelCosts.from_dict(json.loads(path.read_text()))
    except CostCacheError as err:
        raise CostCacheError(f"cost cache file {path} is unusable ({err}); delete it or run `apar-spec costs measure` again") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        what = type(err).__name__ if not str(err) else str(err).splitlines()[0]
        raise CostCacheError(f"cost cache file {path} is corrupt ({what}); delete it or run `apar-spec costs measure` again") from None
    if costs.key != key:
        raise CostCacheError(f"cost cache file {path} holds costs for another setup; delete it or measure again")
    return costs


def all_costs(directory: Optional[Path] = None) -> list[tuple[Path, Optional[ModelCosts], Optional[str]]]:
    """Every cost file: (path, costs or None, error or None)."""
    directory = directory or cache_dir()
    out = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            out.append((path, ModelCosts.from_dict(json.loads(path.read_text())), None))
        except Exception as err:  # noqa: BLE001 - listing must show every file, good or bad
            out.append((path, None, f"unreadable ({type(err).__name__})"))
    return out


def get_costs(
    model,
    name: str = "",
    *,
    threads: Optional[int] = None,
    with_heads: bool = True,
    directory: Optional[Path] = None,
    say: Optional[Say] = _stderr,
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
        say(f"no cached costs for {name or 'this model'} ({key.dtype}, {key.device}, threads={key.threads}); measuring them once")
    costs = measure(model, name, threads=threads, with_heads=with_heads, progress=say, **measure_kwargs)
    path = save(costs, directory)
    if say:
        say(f"costs saved to {path}")
    return costs


def ensure_switch(target: ModelCosts, model, draft: ModelCosts, draft_model, *, directory: Optional[Path] = None,
                  say: Optional[Say] = _stderr, tokenizer=None) -> ModelCosts:
    """``target`` with the switching cost to ``draft`` measured (once, then cached in its file)."""
    if draft.key.fingerprint in target.switch:
        return target
    if say:
        say(f"measuring the cost of switching between {target.name} and {draft.name} once")
    previous = torch.get_num_threads()
    if target.key.threads is not None:
        torch.set_num_threads(target.key.threads)
    try:
        target.switch[draft.key.fingerprint] = measure_switch(model, draft_model, progress=say, label=target.name,
                                                              target_costs=target, draft_costs=draft, tokenizer=tokenizer)
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

    def __init__(self, model, context: int, rows: int, gen: torch.Generator, target: bool = True):
        from apar_spec.tree_cache import TreeCache

        self.model, self.rows, self.gen = model, rows, gen
        self.vocab = model.config.vocab_size
        self.tc = TreeCache(model, rows, gqa_attention=target)  # the attention the decoder gives it
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


def measure_forward(model, sizes: Sequence[int] = SIZES, contexts: Sequence[int] = DEFAULT_CONTEXTS, repeats: int = 7,
                    warmup: int = 2, progress: Optional[Say] = None, label: str = "") -> dict[int, dict[int, float]]:
    """context -> (new nodes -> median seconds of one ``TreeCache.forward``), one cache row."""
    gen = torch.Generator().manual_seed(0)
    benches = {c: _ForwardBench(model, c, 1, gen) for c in contexts}
    jobs = {(c, n): (lambda b=benches[c], n=n: b.time(n)) for c in contexts for n in sizes}
    med = _timed_rounds(jobs, repeats, warmup, progress, f"{label} forward")
    return {c: {int(n): med[(c, n)] for n in sizes} for c in contexts}


def _apar_of(tokenizer):
    if tokenizer is None:
        return None
    from apar_spec.tokens import find_apar_tokens

    return find_apar_tokens(tokenizer)


class _DecodeProbe:
    """Real decoder steps for ``branches`` requests (one branch each, one cache row each) with
    ``k`` probe drafts per branch: each run returns the wall time between consecutive steps."""

    def __init__(self, model, context: int, branches: int, k: int, steps: int, gen: torch.Generator,
                 apar=None, speculator=None):
        from apar_spec.decoder import Decoder
        from apar_spec.options import DecodeOptions

        vocab = model.config.vocab_size
        self.stamps: list[float] = []
        opts = DecodeOptions(max_new_tokens=steps + 2, num_draft_tokens=max(k, 1), max_draft_tokens=max(k, 16),
                             batch_size=branches)
        if speculator is None and k:
            speculator = _ProbeSpeculator(min(5, vocab - 1))
        # apar: the model's [Fork]/[Child] ids, so the fork rules' per-step work is in the probe (forks stay off)
        self.decoder = Decoder(model, opts, apar, fork_enabled=False, eos_ids=set(), speculator=speculator,
                               on_step=lambda live, tc: self.stamps.append(time.perf_counter()))
        self.prompts = [torch.randint(min(5, vocab - 1), vocab, (context,), generator=gen).tolist() for _ in range(branches)]

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
def measure_heads(model, num_heads: int = DEFAULT_HEADS, rows: Sequence[int] = HEAD_ROWS, repeats: int = 7,
                  warmup: int = 2, progress: Optional[Say] = None, label: str = "") -> dict[int, float]:
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
def measure_switch(target, draft, repeats: int = 15, warmup: int = 2, context: int = DEFAULT_CONTEXTS[0],
                   progress: Optional[Say] = None, label: str = "", target_costs: Optional[ModelCosts] = None,
                   draft_costs: Optional[ModelCosts] = None, tokenizer=None, steps: int = 8) -> dict[str, float]:
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

    jobs = {}
    for n in (1, 4):
        jobs[("target", "warm", n)] = after(tb, tb, n)
        jobs[("target", "cold", n)] = after(db, tb, n)
        jobs[("draft", "warm", n)] = after(db, db, n)
        jobs[("draft", "cold", n)] = after(tb, db, n)
    k = 4
    if target_costs is not None and draft_costs is not None:
        from apar_spec.drafts import resolve_speculator  # function-level: the core does not depend on drafts/

        spec = resolve_speculator(draft, target, tokenizer)
        jobs[("lm-step",)] = _DecodeProbe(target, context, 1, k, steps, gen, _apar_of(tokenizer), spec).time
    t = _timed_rounds(jobs, repeats, warmup, progress, f"{label} switching between target and draft")
    out = {who: max(0.0, statistics.fmean(t[(who, "cold", n)] - t[(who, "warm", n)] for n in (1, 4)))
           for who in ("target", "draft")}
    if ("lm-step",) in t:
        known = (target_costs.forward_cost(1 + k, context) + target_costs.overhead(1, k) + out["target"] + out["draft"]
                 + draft_costs.forward_cost(1, context) * k)
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
    tokenizer=None,
    progress: Optional[Say] = None,
) -> ModelCosts:
    """Measure ``model``'s costs under ``threads`` CPU threads (None = as set now). ``tokenizer``
    (optional) lets the overhead probes run the fork rules when the model has APAR tokens."""
    from apar_spec.tree_cache import check_supported

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
            points = []
            for b, k in OVERHEAD_PLANS:
                pass_cost = _interp(fwd[ctxs[0]], 1 + k) if b == 1 else t[("rows", b, k)]
                points.append((b, b * k, max(0.0, t[("step", b, k)] - pass_cost)))
            over = _fit_overhead(points)
        heads = measure_heads(model, repeats=repeats, warmup=warmup, progress=progress, label=label) if with_heads else {}
    finally:
        torch.set_num_threads(previous)
    import transformers

    return ModelCosts(
        name=name or getattr(model.config, "_name_or_path", "") or "model",
        key=key,
        forward=fwd,
        overhead=over,
        heads=heads,
        repeats=repeats,
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
        names=[name] if name else [],
    )


# ===================================================================== acceptance profiles


@dataclass
class Profile:
    """p(d, r): probability that the target's token at depth ``d`` equals the rank-``r``
    candidate, given the path above was accepted. ``table[d-1][r]``; depths past the
    table reuse its last depth (acceptance flattens with depth), missing ranks are 0."""

    table: list[list[float]]
    source: str = ""

    def __call__(self, d: int, r: int) -> float:
        if not self.table:
            return 0.0
        row = self.table[min(d, len(self.table)) - 1]
        return row[r] if r < len(row) else 0.0

    @classmethod
    def geometric(cls, alpha: float, depth: int = 16, width: int = 4, source: str = "") -> "Profile":
        """Top guess right with probability ``alpha`` at every depth; rank r gets
        ``alpha * (1 - alpha) ** r`` (a guess ranked lower is right less often; ranks sum to < 1)."""
        alpha = min(max(alpha, 0.0), 0.999)
        row = [alpha * (1 - alpha) ** r for r in range(width)]
        return cls([list(row) for _ in range(depth)], source or f"geometric alpha={alpha:.2f}")

    @classmethod
    def from_acceptance_length(cls, length: float, k: int, source: str = "") -> "Profile":
        """The geometric profile whose chain of ``k`` drafts has mean acceptance length ``length`` (bonus included)."""
        target = min(max(length - 1.0, 0.0), k - 1e-6)
        lo, hi = 0.0, 0.999
        for _ in range(60):  # sum_{j=1..k} alpha^j is increasing in alpha
            mid = (lo + hi) / 2
            if sum(mid**j for j in range(1, k + 1)) < target:
                lo = mid
            else:
                hi = mid
        return cls.geometric((lo + hi) / 2, source=source or f"fitted to acceptance length {length:.2f} at k={k}")

    @classmethod
    def from_rows(cls, rows: Sequence[dict]) -> Optional["Profile"]:
        """The profile measured by benchmark rows: ``depth_rank_verified/accepted`` when the rows
        carry them (conditional by construction), else the chain's per-position acceptance rates
        (unconditional: p(j) = rate[j] / rate[j-1]). None when the rows drafted nothing."""
        ver: list[list[float]] = []
        acc: list[list[float]] = []
        for r in rows:
            v, a = r.get("depth_rank_verified"), r.get("depth_rank_accepted")
            if not v or not a:
                continue
            for d, (vd, ad) in enumerate(zip(v, a)):
                while len(ver) <= d:
                    ver.append([])
                    acc.append([])
                for i, (x, y) in enumerate(zip(vd, ad)):
                    while len(ver[d]) <= i:
                        ver[d].append(0.0)
                        acc[d].append(0.0)
                    ver[d][i] += x
                    acc[d][i] += y
        if ver:
            table = [[(y / x if x else 0.0) for x, y in zip(vd, ad)] for vd, ad in zip(ver, acc)]
            while table and not any(ver[len(table) - 1]):
                table.pop()
            return cls(table, "measured per depth and rank") if table else None
        drafted = accepted = None
        for r in rows:  # pool positions over rows, weighting each row by its branch-steps
            rates = r.get("acceptance_rate_per_position") or []
            if not rates:
                continue
            length = r.get("mean_acceptance_length") or 1.0
            weight = (r.get("tokens") or r.get("tokens_generated") or 1) / max(length, 1e-9)
            drafted = drafted or []
            accepted = accepted or []
            for j, rate in enumerate(rates):
                while len(drafted) <= j:
                    drafted.append(0.0)
                    accepted.append(0.0)
                drafted[j] += weight
                accepted[j] += weight * rate
        if not drafted:
            return None
        uncond = [a / d for a, d in zip(accepted, drafted)]
        table, prev = [], 1.0
        for u in uncond:
            table.append([min(1.0, u / prev) if prev > 0 else 0.0])
            prev = u
        return cls(table, "measured per position (chain)")


def default_profile(kind: str, draft_name: Optional[str] = None) -> Profile:
    """The registry's measured acceptance length for ``draft_name`` (fitted geometric), else a
    conservative per-kind default."""
    if draft_name:
        try:
            from apar_spec.drafts import registry  # function-level: the core does not depend on drafts/

            entry = registry.lookup(draft_name)
            if entry.acceptance_length:
                k = entry.acceptance_k or 4
                return Profile.from_acceptance_length(entry.acceptance_length, k, f"registry: {draft_name} acceptance length {entry.acceptance_length:.2f}")
        except (ValueError, ImportError):
            pass
    alpha = DEFAULT_ALPHA.get(kind, 0.5)
    return Profile.geometric(alpha, source=f"default for kind '{kind}' (alpha={alpha})")


# ===================================================================== prediction


@dataclass
class Prediction:
    tokens_per_step: float
    cost_per_step: float  # seconds
    base_cost_per_step: float  # seconds of the same mode's plain step (base_branches tokens)
    base_tokens_per_step: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.cost_per_step

    @property
    def speedup(self) -> float:
        """vs the same mode without speculation."""
        return self.tokens_per_s / (self.base_tokens_per_step / self.base_cost_per_step)


def draft_cost(kind: str, shape: Optional[TreeShape], branches: float, target: ModelCosts,
               draft: Optional[ModelCosts], p_all: float = 0.0, context: Optional[float] = None) -> float:
    """Seconds of drafting per step for ``branches`` live branches.

    ``model``: one draft forward per tree depth for all branches; the first feeds each
    branch's newly committed tokens (the bonus, plus the last draft when the whole path was
    accepted, probability ``p_all``), the others the nodes of the previous depth that have
    children; plus the measured cost of switching models twice per step (``ModelCosts.switch``). ``heads``: K blocks + LM head on one hidden state per branch. ``ngram``: free
    (its Python work is in the decoder's per-branch overhead)."""
    if shape is None or kind == "ngram":
        return 0.0
    if kind == "heads":
        return target.heads_cost(branches)
    if kind != "model":
        raise ValueError(f"unknown speculator kind '{kind}' (choose from {', '.join(KINDS)})")
    if draft is None:
        raise ValueError("a draft-LM prediction needs the draft model's costs")
    sw = target.switch.get(draft.key.fingerprint, {})
    # the verify pass after the draft ran, and the draft's first pass after the target ran
    # the speculator's Python (logits -> candidates) runs per branch at every depth
    total = sw.get("target", 0.0) + sw.get("draft", 0.0) + sw.get("per_pass", 0.0) * shape.depth * branches
    total += draft.forward_cost(branches * (1.0 + p_all), context)
    for d in range(2, shape.depth + 1):
        parents = {shape.parents[i] for i, dep in enumerate(shape.depths) if dep == d}
        total += draft.forward_cost(branches * len(parents), context)
    return total


def _p_all(shape: TreeShape, profile: Callable[[int, int], float]) -> float:
    """Probability that the deepest rank-0 path is accepted in full (the draft LM then also feeds its last draft)."""
    p = 1.0
    for d in range(1, shape.depth + 1):
        p *= profile(d, 0)
    return p


def step_cost(target: ModelCosts, kind: Optional[str], shape: Optional[TreeShape], branches: float = 1.0,
              draft: Optional[ModelCosts] = None, profile: Optional[Callable[[int, int], float]] = None,
              context: Optional[float] = None) -> float:
    """Seconds of one decoder step with ``branches`` live branches, each verifying ``shape``,
    over a cache of ``context`` slots (None = the shortest measured)."""
    size = shape.size if shape is not None else 0
    cost = target.forward_cost(branches * (1 + size), context) + target.overhead(branches, branches * size)
    if shape is not None and kind:
        cost += draft_cost(kind, shape, branches, target, draft, _p_all(shape, profile) if profile else 0.0, context)
    return cost


def predict(target: ModelCosts, kind: str, shape: TreeShape, profile: Callable[[int, int], float],
            branches: float = 1.0, draft: Optional[ModelCosts] = None, base_branches: Optional[float] = None,
            context: Optional[float] = None) -> Prediction:
    """Expected tokens and seconds per step, and the speed-up over the same mode without speculation."""
    b0 = branches if base_branches is None else base_branches
    tokens = branches * (expected_accepted(shape, profile) + 1.0)
    return Prediction(
        tokens_per_step=tokens,
        cost_per_step=step_cost(target, kind, shape, branches, draft, profile, context),
        base_cost_per_step=step_cost(target, None, None, b0, context=context),
        base_tokens_per_step=b0,
    )


# ===================================================================== choosing a tree


def grown_trees(profile: Callable[[int, int], float], max_nodes: int = 64, max_width: int = 8,
                max_depth: int = 16) -> list[TreeShape]:
    """EAGLE-2's growth: start empty, add the candidate node with the highest path probability
    (product of p along its path), one at a time; return the tree at every size 1..max_nodes.

    The candidates are, for every node (and the pending token), its next-ranked child. With
    p non-increasing in rank and at most 1, a child never beats its parent nor a lower rank
    its elder sibling, so every prefix of this order is a valid tree and, for each size, the
    one with the largest expected acceptance."""
    reach: dict[tuple[int, ...], float] = {(): 1.0}
    nchildren: dict[tuple[int, ...], int] = {(): 0}
    paths: list[tuple[int, ...]] = []
    out = []
    for _ in range(min(max_nodes, MAX_TREE_NODES)):
        best, best_p = None, -1.0
        for node, k in nchildren.items():
            if k >= max_width or len(node) >= max_depth:
                continue
            cand = node + (k,)
            pc = reach[node] * profile(len(cand), k)
            if pc > best_p:
                best, best_p = cand, pc
        if best is None or best_p <= 0.0:
            break
        paths.append(best)
        reach[best] = best_p
        nchildren[best] = 0
        nchildren[best[:-1]] += 1
        out.append(layout(paths))
    return out


def candidate_shapes(profile: Callable[[int, int], float], kind: str = "model", max_nodes: int = 64,
                     max_depth: Optional[int] = None) -> list[TreeShape]:
    """Chains 1..16, full ``topk:WxD`` trees (W 2..4) up to ``max_nodes``, and grown trees,
    none deeper than ``max_depth`` (heads: one depth per head; default 16). The n-gram
    speculator proposes one continuation, so its candidates are the chains."""
    deepest = max_depth or (DEFAULT_HEADS if kind == "heads" else 16)
    shapes = [chain(k) for k in range(1, deepest + 1)]
    if kind == "ngram":  # prompt lookup proposes one continuation: a chain
        return shapes
    for w in (2, 3, 4):
        for d in range(1, min(5, deepest) + 1):
            if sum(w**i for i in range(1, d + 1)) <= max_nodes:
                shapes.append(full_tree(w, d))
    shapes.extend(grown_trees(profile, max_nodes=max_nodes, max_depth=deepest))
    unique = {s.paths: s for s in shapes}
    return list(unique.values())


def score(target: ModelCosts, kind: str, shape: TreeShape, profile: Callable[[int, int], float],
          branches: float = 1.0, draft: Optional[ModelCosts] = None) -> float:
    """Expected tokens per second of the configuration (what the optimiser maximises)."""
    return predict(target, kind, shape, profile, branches, draft).tokens_per_s


def choose_tree(target: ModelCosts, profile: Callable[[int, int], float], candidates: Optional[Iterable[TreeShape]] = None,
                *, kind: str = "model", draft: Optional[ModelCosts] = None, branches: float = 1.0) -> TreeShape:
    """The candidate shape with the most expected tokens per unit of cost (ties: the smaller tree)."""
    cands = list(candidates) if candidates is not None else candidate_shapes(
        profile, kind, max_depth=target.num_heads if kind == "heads" else None)
    if not cands:
        raise ValueError("choose_tree needs at least one candidate shape")
    return max(cands, key=lambda s: (score(target, kind, s, profile, branches, draft), -s.size))


def choose_k(target: ModelCosts, profile: Callable[[int, int], float], *, kind: str = "model",
             draft: Optional[ModelCosts] = None, branches: float = 1.0, max_k: int = 16) -> int:
    """The best chain length 1..max_k."""
    return choose_tree(target, profile, [chain(k) for k in range(1, max_k + 1)], kind=kind, draft=draft, branches=branches).size


# ===================================================================== "auto"


def resolve_auto(model, dtype=None, device=None, speculator_kind: str = "model", profile: Optional[Profile] = None, *,
                 draft_model=None, draft_name: Optional[str] = None, name: str = "", chains_only: bool = False,
                 branches: float = 1.0, tokenizer=None, directory: Optional[Path] = None,
                 say: Optional[Say] = _stderr) -> TreeShape:
    """The tree (or chain, with ``chains_only``) the cost model picks for ``model`` as loaded.

    ``dtype``/``device``: checked against the loaded model (the costs are of the model as it
    runs). Costs come from the cache, or are measured first (with progress lines, and a line
    saying so). Without ``profile``, the registry's acceptance for ``draft_name`` or a
    per-kind default is used."""
    if speculator_kind not in KINDS:
        raise ValueError(f"unknown speculator kind '{speculator_kind}' (choose from {', '.join(KINDS)})")
    if dtype is not None:
        from apar_spec.loading import resolve_dtype

        want = resolve_dtype(dtype)
        if want is not None and want != model.dtype:
            raise ValueError(f"resolve_auto: the model is loaded in {model.dtype}, not {want}; load it in the dtype you will run")
    if device is not None and torch.device(device).type != model.device.type:
        raise ValueError(f"resolve_auto: the model is on {model.device}, not {device}")
    target = get_costs(model, name, directory=directory, say=say, with_heads=speculator_kind == "heads", tokenizer=tokenizer)
    draft = None
    if speculator_kind == "model":
        if draft_model is None:
            raise ValueError("tree/num_draft_tokens 'auto' with a draft LM needs the draft model to cost it")
        draft = get_costs(draft_model, draft_name or "", directory=directory, say=say, with_heads=False)
        target = ensure_switch(target, model, draft, draft_model, directory=directory, say=say, tokenizer=tokenizer)
    prof = profile or default_profile(speculator_kind, draft_name)
    if chains_only:
        max_k = target.num_heads if speculator_kind == "heads" else 16
        return chain(choose_k(target, prof, kind=speculator_kind, draft=draft, branches=branches, max_k=max_k))
    return choose_tree(target, prof, kind=speculator_kind, draft=draft, branches=branches)


def resolve_auto_options(model, tokenizer, mode: str, draft: Any, options: dict, say: Optional[Say] = _stderr) -> dict:
    """``generate()``'s hook: replace ``num_draft_tokens="auto"`` / ``tree="auto"`` in ``options``
    by the cost model's choice (one line on stderr says what was picked, and why)."""
    options = dict(options)
    want_k = options.get("num_draft_tokens") == "auto"
    want_tree = options.get("tree") == "auto"
    if not (want_k or want_tree):
        return options
    from apar_spec.options import DecodeOptions

    if mode not in ("spec", "apar+spec"):  # nothing is drafted: auto means the default
        if want_k:
            options["num_draft_tokens"] = DecodeOptions.num_draft_tokens
        if want_tree:
            options["tree"] = None
        return options
    kind, draft_model, draft_name = speculator_kind_of(draft, model)
    if kind not in KINDS:
        raise ValueError(f"'auto' draft length/tree: the cost model has no costs for a {kind} draft ('{draft_name}'); "
                         "give --k or --tree")
    branches = APAR_BRANCHES_GUESS if mode == "apar+spec" else 1.0
    shape = resolve_auto(model, speculator_kind=kind, draft_model=draft_model, draft_name=draft_name,
                         chains_only=not want_tree, branches=branches, tokenizer=tokenizer, say=say)
    if say:
        say(f"auto: picked {shape.describe()} for {kind} drafts ({default_profile(kind, draft_name).source})")
    if want_tree:
        options["tree"] = shape.to_json()
    k = shape.depth if want_tree else shape.size
    if want_k or "num_draft_tokens" not in options:
        options["num_draft_tokens"] = k
    options["max_draft_tokens"] = max(int(options.get("max_draft_tokens") or DecodeOptions.max_draft_tokens), k)
    return options


def speculator_kind_of(draft: Any, target=None) -> tuple[str, Any, Optional[str]]:
    """(kind, draft model or None, registry name or None) for whatever ``generate(draft=...)`` accepts."""
    if hasattr(draft, "config") and hasattr(draft, "forward"):
        return "model", draft, None
    if isinstance(draft, (str, os.PathLike)):
        name = str(draft)
        from apar_spec.drafts import registry
        from apar_spec.loading import load

        entry = registry.lookup(name)
        if entry.kind == "model":
            where = {"dtype": target.dtype, "device": target.device} if target is not None else {}
            return "model", load(entry.weights, **where)[0], name
        return entry.kind, None, name
    kind = getattr(draft, "kind", None)
    model = getattr(draft, "model", None)
    if kind in KINDS:
        return kind, model, getattr(draft, "name", None)
    if model is not None:
        return "model", model, getattr(draft, "name", None)
    return "ngram", None, getattr(draft, "name", None)


# ===================================================================== benchmark rows


def find_costs(name: str, dtype: str, device: str, threads: Optional[int], directory: Optional[Path] = None) -> Optional[ModelCosts]:
    """Cached costs of the model a benchmark row names, or None. The model's config (read
    offline: embedded name, folder or cached id) gives the fingerprint; failing that, a cost
    file that lists ``name`` for the same dtype, device kind and threads is used."""
    dev = torch.device(device) if device else torch.device("cpu")
    label = device_label(dev) if dev.type != "cuda" or torch.cuda.is_available() else None
    key_threads = threads if dev.type == "cpu" else None
    fp = _fingerprint_of_name(name)
    if fp and label:
        costs = load_costs(CostKey(fp, dtype, label, key_threads), directory)
        if costs is not None:
            return costs
    for _, costs, err in all_costs(directory):
        if costs is None or name not in costs.names:
            continue
        k = costs.key
        if k.dtype == dtype and k.device.split("-")[0] == dev.type and k.threads == key_threads:
            return costs
    return None


def _fingerprint_of_name(name: str) -> Optional[str]:
    try:
        from transformers import AutoConfig

        from apar_spec.loading import EMBEDDED, embedded_dir

        path = Path(name).expanduser()
        source = str(embedded_dir(name)) if name in EMBEDDED else str(path.parent if path.suffix == ".gguf" else name)
        return config_fingerprint(AutoConfig.from_pretrained(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - no config here: fall back to the names the cost files list
        return None


def draft_kind_of_row(row: dict) -> Optional[str]:
    """The speculator kind a row used: its ``draft_kind`` field, else the registry's kind of its draft."""
    if row.get("draft_kind") in KINDS:
        return row["draft_kind"]
    name = row.get("draft")
    if not name:
        return None
    try:
        from apar_spec.drafts import registry

        kind = registry.lookup(str(name)).kind
        return kind if kind in KINDS else None  # a union of drafts: no costed kind, no prediction
    except (ValueError, ImportError):
        return "model" if Path(str(name)).expanduser().exists() else None


def shape_of_row(row: dict) -> TreeShape:
    """The tree a row verified: its ``tree`` field (JSON paths, or any form ``parse_tree`` reads), else a chain of ``k``."""
    from apar_spec.draft_tree import parse_tree

    spec = row.get("tree")
    if spec:
        try:
            return parse_tree(spec)
        except ValueError:
            pass
    return chain(int(row.get("k") or 1))


@dataclass
class RowPrediction:
    """Predicted seconds for one prompt of a speculative configuration and of its plain counterpart."""

    prompt_id: str
    spec_s: float
    base_s: float
    spec_tokens: float
    base_tokens: float
    tokens_per_step: float  # predicted, all branches
    branches: float  # live branches per step in the speculative run (measured)


def predict_prompt(spec_rows: Sequence[dict], base_rows: Sequence[dict], target: ModelCosts,
                   draft: Optional[ModelCosts]) -> Optional[RowPrediction]:
    """Predicted wall seconds of one prompt's speculative rows and plain rows (medians over repeats).

    Measured inputs (from the rows): tokens, prompt length, mean live KV (the cache length
    the costs are read at), the plain run's steps (its live branches per step = tokens per
    step), the speculative run's live branches per step, and its acceptance profile. Predicted:
    the speculative run's steps (tokens / (branches x (expected accepted + 1))) and every
    second."""
    if not spec_rows or not base_rows:
        return None
    med = lambda rows, key: statistics.median([float(r.get(key) or 0.0) for r in rows])  # noqa: E731
    first = spec_rows[0]
    kind = draft_kind_of_row(first)
    if kind is None or (kind == "model" and draft is None):
        return None
    shape = shape_of_row(first)
    profile = Profile.from_rows(spec_rows) or Profile([[0.0]], "nothing drafted")
    prompt = med(spec_rows, "prompt_tokens")
    # plain run: every decode step yields one token per live branch
    base_tokens, base_steps = med(base_rows, "tokens"), med(base_rows, "target_steps")
    base_branches = max(1.0, (base_tokens - 1) / max(base_steps - 1, 1))
    base_ctx = med(base_rows, "mean_live_kv") or prompt + base_tokens / 2
    base_s = target.forward_cost(prompt, 0) + (base_steps - 1) * step_cost(target, None, None, base_branches, context=base_ctx)
    # speculative run: live branches per step = branch-steps / decode steps
    tokens, steps = med(spec_rows, "tokens"), med(spec_rows, "target_steps")
    accepted, length = med(spec_rows, "accepted"), med(spec_rows, "mean_acceptance_length") or 1.0
    branch_steps = accepted / (length - 1.0) if length > 1.0 and accepted else tokens
    branches = max(1.0, branch_steps / max(steps - 1, 1))
    ctx = med(spec_rows, "mean_live_kv") or prompt + tokens / 2
    per_branch = expected_accepted(shape, profile) + 1.0
    pred_steps = max(tokens - 1, 0) / (branches * per_branch)
    spec_s = target.forward_cost(prompt, 0) + pred_steps * step_cost(target, kind, shape, branches, draft, profile, ctx)
    if kind == "model":
        spec_s += draft.forward_cost(prompt, 0)  # the draft's first propose reads the whole prompt
    return RowPrediction(str(first["prompt_id"]), spec_s, base_s, tokens, base_tokens, branches * per_branch, branches)
