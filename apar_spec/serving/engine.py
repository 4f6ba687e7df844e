"""Continuous batching: one engine owns the running requests of many clients.

Between steps the engine *admits* queued requests (their prompts are prefilled in a
cache of their own, then merged into the running batch with ``TreeCache.add_rows``)
and *retires* finished or cancelled ones (their rows leave the cache). Each step is
still ONE target forward over every active branch of every running request, plus
the speculator's work: ``Decoder.step``, the same round ``generate`` runs.

Tokens never depend on load: a request's branches see only their own row, fork
rules are per branch, and the per-branch cap is an engine setting
(``max_branch_tokens``, default the engine's ``max_new_tokens``), so a request
served with ``max_tokens=m`` decodes exactly as offline ``generate(...,
max_new_tokens=m, max_branch_tokens=engine.branch_cap)`` (``offline_options``).

KV budget (``kv_budget``, in slots, as vLLM budgets blocks). Admission is FCFS and
never evicts. Every running request gets a *projection* of its peak live KV:

    live now + pending/queued branch tips + remaining token budget (+ k per tip with drafts)

Why it is sound: a branch's nodes never outnumber its sampled tokens (a child's
forced ``[Child]`` takes the slot its last, never-fed token does not), so future
nodes come from tokens not yet sampled (the remaining budget) or from tips already
sampled but not yet fed (pending tokens, queued children's ``[Child]``). A new
request needs ``prompt + max_tokens`` (+ k). A request is admitted if the sum of
projections plus its need fits; one whose need exceeds the budget alone is refused
at ``submit``. APAR's projections shrink as finished branches free their KV, which
is how it fits more requests in the same budget (the paper's mechanism); AR's stay
at ``prompt + max_tokens`` until the request ends.

Reported KV is *logical* live KV (slots some live branch can see), counted exactly
after every step, beside *physical* KV: the slots the cache tensors hold. The running
batch lives in a ``PagedTreeCache`` (``decoding/paged_cache.py``): one slot pool, dead
slots freed as soon as they pass 1/16 of the held ones, so physical stays near logical
(the padded reference layout, ``kv_layout='padded'``, holds rows x the longest row).
Projections start from the slots a request's row really holds (live plus dead slots
not yet freed), so admission budgets what memory holds. Transient draft nodes (fed and
rejected within one step) are covered by the ``k`` per tip of the projection for the
tips that exist; children spawned later draft too, which the projection does not
reserve: ``peak_step_kv`` reports the measured peak with them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from apar_spec.decoding.decoder import Decoder
from apar_spec.decoding.state import DecodeResult, Request, canonical_ids, output_branches
from apar_spec.options import DecodeOptions, check_mode, model_decode_defaults

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine refuses (too long for the context, cannot fit the KV budget...)."""


@dataclass
class BranchDelta:
    """Tokens of one branch that settled in one step (a child's first delta starts with ``[Child]``).

    Settled: no later step can take them back (``Decoder.settled``: a capped child's
    unfinished line waits, since a [Fork] would drop it, and under speculation a branch's
    tokens wait until the token budget's fate of their APAR time is known). A branch's last
    delta carries its finish, possibly with no tokens. ``branch``/``parent`` are plain APAR's
    numbering, as in the request's final ``Generation``."""

    branch: int
    parent: Optional[int]
    fork_index: Optional[int]
    tokens: list[int]
    finish: Optional[str]  # set on the step the branch ends


@dataclass
class StreamEvent:
    """What a request's client learns after a step: per-branch deltas, and at the end the result."""

    request: int
    deltas: list[BranchDelta]
    finished: bool = False
    generation: Any = None  # apar_spec.api.Generation, on the last event
    error: Optional[str] = None  # the engine failed this request (it keeps serving the others)
    error_status: int = 500  # the HTTP status of that failure (502/503: an upstream's)


@dataclass
class RequestHandle:
    """A submitted request, as its client sees it. Times are ``time.perf_counter()`` seconds."""

    id: int
    prompt_ids: list[int]
    max_new_tokens: int
    need: int  # projected peak live KV at admission (slots)
    on_event: Optional[Callable[[StreamEvent], None]] = None
    events: queue.Queue[StreamEvent] = field(default_factory=queue.Queue)
    t_submit: float = 0.0
    t_admit: Optional[float] = None
    t_first_token: Optional[float] = None
    t_finish: Optional[float] = None
    generation: Any = None
    error: Optional[str] = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    emitted: dict[int, int] = field(default_factory=dict)  # branch id -> tokens already streamed
    closed: set[int] = field(default_factory=set)  # branch ids whose finish was streamed
    draft_forwards0: int = 0
    final_deltas: list = field(default_factory=list)  # committed in the request's last step
    upstream: Optional[dict] = None  # over an upstream (``upstream.py``): replica, child start latencies

    def deliver(self, event: StreamEvent) -> bool:
        """Hand an event to the client; False if its callback failed (e.g. its event loop
        closed), which the engine treats as a disconnect - never as an engine error."""
        if self.on_event is None:
            self.events.put(event)
            return True
        try:
            self.on_event(event)
            return True
        except Exception:
            log.warning("request %d: event callback failed; cancelling it", self.id, exc_info=True)
            return False

    def result(self, timeout: Optional[float] = None):
        """Block until the request ends; its ``Generation`` (raises on an engine error)."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.error is not None:
            raise RuntimeError(self.error)
        return self.generation


@dataclass
class EngineStats:
    """Engine-wide counters (read by /metrics and load-bench; written by the worker only)."""

    steps: int = 0  # target forwards (prefills included)
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0
    output_tokens: int = 0
    branch_steps: int = 0
    accept_plus_bonus: int = 0
    live_kv: int = 0  # logical live KV of the running requests after the last step
    peak_live_kv: int = 0
    peak_step_kv: int = 0  # live before a step + every node fed in it (drafts included)
    # physical KV: slots the cache tensors hold (the paged pool's capacity; rows x the longest row
    # in the padded layout), after each step; what memory really holds, beside the logical live KV
    physical_kv: int = 0
    peak_physical_kv: int = 0
    running: int = 0
    queued: int = 0
    budget_violations: int = 0  # steps whose logical live KV exceeded the budget (must stay 0)
    # load-adaptive speculation: draft nodes per branch chosen for a step -> steps (empty without a planner)
    draft_allowance: Counter = field(default_factory=Counter)
    recent: deque = field(default_factory=lambda: deque(maxlen=256))  # (time, tokens) per step

    @property
    def mean_acceptance_length(self) -> float:
        return self.accept_plus_bonus / self.branch_steps if self.branch_steps else 1.0

    def tokens_per_s(self, window_s: float = 10.0) -> float:
        now = time.perf_counter()
        pts = [(t, n) for t, n in list(self.recent) if now - t <= window_s]
        if len(pts) < 2:
            return 0.0
        span = now - pts[0][0]
        return sum(n for _, n in pts[1:]) / span if span > 0 else 0.0


def settled_deltas(r: Request, h: RequestHandle, done: dict[int, tuple[int, bool]]) -> tuple[list[BranchDelta], int]:
    """What ``r``'s client has not been sent yet of its settled tokens (``done``:
    ``budget.settled``; a stream never takes tokens back), numbered as results number
    branches; marks it sent on ``h``. Returns the deltas and how many output tokens they
    hold (a child's forced ``[Child]`` is not one)."""
    ids = canonical_ids(r.branches)
    deltas, n_total = [], 0
    for b in r.branches:
        if b.id not in done:
            continue
        sent = h.emitted.get(b.id, 0)
        n, final = done[b.id]
        if n > sent or (final and b.id not in h.closed):
            parent = None if b.parent is None else ids[b.parent]
            deltas.append(BranchDelta(ids[b.id], parent, b.fork_index, b.tokens[sent:n], b.finish if final else None))
            n_total += n - sent - (1 if b.is_child and sent == 0 else 0)
            h.emitted[b.id] = n
            if final:
                h.closed.add(b.id)
    return deltas, n_total


def check_request(
    opts: DecodeOptions, prompt_ids: list[int], max_new_tokens: Optional[int], vocab: int, max_pos: Optional[int]
) -> int:
    """The checks every serving engine makes of a request before it runs (one home for
    their messages); returns its max_new_tokens. Raises ``RequestError``."""
    m = opts.max_new_tokens if max_new_tokens is None else max_new_tokens
    if not prompt_ids:
        raise RequestError("the prompt is empty")
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise RequestError(f"max_tokens must be a positive integer (got {m!r})")
    if m > opts.max_new_tokens:
        raise RequestError(f"max_tokens={m} is more than this server allows ({opts.max_new_tokens}); ask for fewer")
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    if max_pos is not None and len(prompt_ids) >= max_pos:
        raise RequestError(
            f"the prompt has {len(prompt_ids)} tokens, more than the model's context of {max_pos - 1}; shorten it"
        )
    return m


class Engine:
    """Continuous batching over ``Decoder.step`` (see the module docstring)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        mode: str = "apar",
        draft: Any = None,
        kv_budget: Optional[int] = None,
        load_adaptive: Any = False,
        **options: Any,
    ):
        """``options``: ``DecodeOptions`` fields; ``max_new_tokens`` is the largest per-request
        budget and, unless ``max_branch_tokens`` is given, the per-branch cap.

        ``load_adaptive`` (spec modes): before each step the cost model picks how many draft
        nodes per branch pay at the current batch, down to none (``costs/planning.py``).
        ``True`` builds the planner from the cached costs (measured once when missing: a
        minute or two for a real model); a ``StepPlanner`` is used as given; ``False`` drafts
        the shape asked at every step. Never changes greedy tokens."""
        from apar_spec.api import eos_ids_of
        from apar_spec.decoding.tokens import find_apar_tokens
        from apar_spec.decoding.tree_cache import check_supported

        check_mode(mode)
        if kv_budget is not None and kv_budget < 1:
            raise ValueError(f"kv_budget must be >= 1 slot or None (got {kv_budget})")
        check_supported(model)
        opts = DecodeOptions.build(**{**model_decode_defaults(model), **options})
        if opts.max_branch_tokens is None:
            opts.max_branch_tokens = opts.max_new_tokens
        if opts.kv_layout == "auto":  # rows join and leave the running batch: the paged layout
            opts.kv_layout = "paged"
        self.model, self.tokenizer, self.mode, self.opts = model, tokenizer, mode, opts
        self.kv_budget = kv_budget
        self.apar = find_apar_tokens(tokenizer) if tokenizer is not None else None
        uses_apar = mode in ("apar", "apar+spec")
        if uses_apar and self.apar is None:
            raise ValueError(
                f"the tokenizer has no [Fork]/[Child] tokens, so the model cannot run mode='{mode}'; use mode='ar'"
            )
        self.eos = eos_ids_of(model, tokenizer, opts.eos_token_id)
        spec: Optional[Any] = None  # a ServingSpeculator (admit/release hooks), checked below
        if mode in ("spec", "apar+spec"):
            if draft is None:
                raise ValueError(f"mode='{mode}' needs a draft")
            from apar_spec.decoding.speculator import ServingSpeculator, resolve_draft

            spec = resolve_draft(draft, model, tokenizer)
            if not isinstance(spec, ServingSpeculator):
                raise ValueError(
                    f"speculator '{getattr(spec, 'name', spec)}' cannot serve: it has no admit/release hooks"
                )
        self.spec = spec
        self.decoder = Decoder(model, opts, self.apar, fork_enabled=uses_apar, eos_ids=self.eos, speculator=spec)
        if spec is not None and load_adaptive is not False and load_adaptive is not None:
            planner = load_adaptive
            if load_adaptive is True:
                from apar_spec.costs.planning import planner_for

                planner = planner_for(
                    model,
                    spec,
                    self.decoder.widest_shape,
                    draft_name=draft if isinstance(draft, str) else None,
                    tokenizer=tokenizer,
                )
            self.decoder.planner = planner
        if spec is not None:
            spec.reset(0, vocab_size=self.decoder.vocab_size, generator=self.decoder.generator)
        self.max_pos = getattr(model.config, "max_position_embeddings", None)
        # transient draft nodes one branch tip can add in a step: the tree's size, or the (adaptive) chain length,
        # plus what a union's later parts may add
        chain_k = opts.max_draft_tokens if opts.adaptive_draft else opts.num_draft_tokens
        shape = self.decoder.shape
        self.draft_margin = (shape.size if shape is not None else chain_k) if spec else 0
        self.draft_margin += getattr(spec, "extra_draft_nodes", 0)
        self.stats = EngineStats()
        self._tc: Optional[Any] = None  # the running batch's TreeCache (None while idle)
        self._live: list[Request] = []
        self._handles: dict[int, RequestHandle] = {}  # running, by request index
        self._waiting: deque[RequestHandle] = deque()
        self._cancel: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._next_id = 0
        self._thread: Optional[threading.Thread] = None
        self._stop = False

    # ------------------------------------------------------------ clients
    @property
    def branch_cap(self) -> int:
        return self.opts.max_branch_tokens

    def offline_options(self, max_new_tokens: int) -> dict:
        """``generate`` kwargs that decode a request exactly as the engine does."""
        return {"max_new_tokens": max_new_tokens, "max_branch_tokens": self.branch_cap}

    def need_of(self, prompt_len: int, max_new_tokens: int) -> int:
        """A new request's projected peak live KV (slots)."""
        return prompt_len + max_new_tokens + self.draft_margin

    def check(self, prompt_ids: list[int], max_new_tokens: Optional[int] = None) -> int:
        """Validate a request without submitting it; returns its max_new_tokens. Raises ``RequestError``."""
        m = check_request(self.opts, prompt_ids, max_new_tokens, self.decoder.vocab_size, self.max_pos)
        need = self.need_of(len(prompt_ids), m)
        if self.kv_budget is not None and need > self.kv_budget:
            raise RequestError(
                f"the request needs up to {need} KV slots (prompt {len(prompt_ids)} + max_tokens {m}"
                + (f" + {self.draft_margin} draft" if self.draft_margin else "")
                + f"), more than the whole KV budget of {self.kv_budget}; lower max_tokens or shorten the prompt"
            )
        return m

    def submit(
        self,
        prompt_ids: list[int],
        max_new_tokens: Optional[int] = None,
        on_event: Optional[Callable[[StreamEvent], None]] = None,
    ) -> RequestHandle:
        """Queue a request (thread-safe). ``on_event`` is called from the engine's thread
        after every step that commits tokens for it; without it, events go to ``handle.events``."""
        try:
            m = self.check(prompt_ids, max_new_tokens)
        except RequestError:
            self.stats.rejected += 1
            raise
        with self._lock:
            h = RequestHandle(self._next_id, list(prompt_ids), m, self.need_of(len(prompt_ids), m), on_event)
            h.t_submit = time.perf_counter()
            self._next_id += 1
            self._waiting.append(h)
            self.stats.queued = len(self._waiting)
            self._wake.notify()
        return h

    def cancel(self, handle: RequestHandle) -> None:
        """Stop a request (thread-safe): its branches and KV are freed at the next step."""
        with self._lock:
            if not handle.done.is_set():
                handle.cancelled = True
                self._cancel.add(handle.id)
                self._wake.notify()

    # ------------------------------------------------------------ the loop
    @property
    def idle(self) -> bool:
        return not self._live and not self._waiting

    def step(self) -> bool:
        """One engine iteration: cancellations, admissions, one decoder step, retirements.
        Returns False when there was nothing to do. Call from one thread only."""
        with self._lock:
            cancels, self._cancel = self._cancel, set()
            for h in [h for h in self._waiting if h.id in cancels]:
                self._waiting.remove(h)
                self._end(h, cancelled=True)
            self.stats.queued = len(self._waiting)
        for r in self._live:
            if r.index in cancels:
                self.decoder.finish_request(r, "cancelled")
        self._admit()
        self._retire()
        if not self._live:
            self.stats.running = 0
            return bool(cancels)
        before = sum(r.counters.live_kv[-1] for r in self._live)
        fed0 = sum(r.counters.branch_steps + r.counters.drafted for r in self._live)
        self.decoder.step(self._tc, self._live)
        self.stats.steps += 1
        if self.decoder.last_allowance is not None:
            self.stats.draft_allowance[self.decoder.last_allowance] += 1
        fed = sum(r.counters.branch_steps + r.counters.drafted for r in self._live) - fed0  # tips + drafts fed
        self._account(before, fed)
        self._emit(self._live)
        self._retire()
        return True

    def run_until_idle(self) -> None:
        """Step until no request is running or queued (for tests and in-process use without a thread)."""
        while not self.idle:
            self.step()

    def start(self) -> Engine:
        """Run the loop in one worker thread (the HTTP side never blocks it)."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._worker, name="apar-spec-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _worker(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not self._live and not self._cancel:
                    self._wake.wait(timeout=1.0)
                if self._stop:
                    return
            try:
                self.step()
            except Exception as err:  # keep serving: fail the running requests, start a fresh batch
                log.exception("engine step failed")
                self._fail_all(f"internal error in the decode loop: {type(err).__name__}: {err}")

    # ------------------------------------------------------------ phases
    def _projection(self, r: Request) -> int:
        tips = sum(b.active for b in r.branches) + len(r.queue)
        live = r.counters.live_kv[-1] if r.counters.live_kv else len(r.prompt)
        if self._tc is not None:  # what its row really holds (dead slots not yet freed too)
            live = max(live, self._tc.held_by(r.row))
        return live + tips * (1 + self.draft_margin) + r.budget

    def _admit(self) -> None:
        """FCFS: admit queued requests while the projections fit; prefill them in one forward."""
        with self._lock:
            if not self._waiting:
                return
            used = sum(self._projection(r) for r in self._live)
            batch = []
            while self._waiting and (self.kv_budget is None or used + self._waiting[0].need <= self.kv_budget):
                h = self._waiting.popleft()
                used += h.need
                batch.append(h)
            self.stats.queued = len(self._waiting)
        if not batch:
            return
        now = time.perf_counter()
        forwards0 = self.spec.forwards if self.spec is not None else 0
        requests, tc = self.decoder.prefill(
            [h.prompt_ids for h in batch], indices=[h.id for h in batch], budgets=[h.max_new_tokens for h in batch]
        )
        self.stats.steps += 1
        if self._tc is None or not self._live:
            self._tc = tc
        else:
            offset = len(self._tc.rows)
            self._tc.add_rows(tc)
            for r in requests:
                r.row += offset
        self._live.extend(requests)
        for h in batch:
            h.t_admit = now
            h.draft_forwards0 = forwards0
            self._handles[h.id] = h
        if self.spec is not None:
            self.spec.admit([h.id for h in batch])
        self.stats.running = len(self._live)
        self._emit(requests)

    def _account(self, live_before: int, fed: int) -> None:
        s = self.stats
        s.live_kv = sum(r.counters.live_kv[-1] for r in self._live)
        s.peak_live_kv = max(s.peak_live_kv, s.live_kv)
        s.peak_step_kv = max(s.peak_step_kv, live_before + fed)
        s.physical_kv = self._tc.physical_slots if self._tc is not None else 0
        s.peak_physical_kv = max(s.peak_physical_kv, s.physical_kv)
        if self.kv_budget is not None and s.live_kv > self.kv_budget:
            s.budget_violations += 1
            log.error("live KV %d exceeds the budget %d", s.live_kv, self.kv_budget)

    def _emit(self, requests: list[Request]) -> None:
        """Send each request the tokens its branches committed since the last event
        (a running request now; a finished one with its final event, from ``_retire``)."""
        now = time.perf_counter()
        n_total = 0
        for r in requests:
            h = self._handles[r.index]
            deltas, n_new = settled_deltas(r, h, self.decoder.settled(r))
            n_total += n_new
            if deltas and h.t_first_token is None:
                h.t_first_token = now
            if r.done:
                h.final_deltas.extend(deltas)
            elif deltas and not h.deliver(StreamEvent(r.index, deltas)):
                h.cancelled = True
                self.decoder.finish_request(r, "cancelled")
        self.stats.output_tokens += n_total
        self.stats.recent.append((now, n_total))

    def _retire(self) -> None:
        """Finished and cancelled requests leave the batch (rows, speculator state)."""
        done = [r for r in self._live if r.done]
        if not done:
            return
        from apar_spec.api import _to_generation

        self._live = self.decoder.drop_finished(self._tc, self._live)
        ids = [r.index for r in done]
        if self.spec is not None:
            self.spec.release(ids)
        now = time.perf_counter()
        c = self.stats
        for r in done:
            self.decoder.requests_by_index.pop(r.index, None)
            h = self._handles.pop(r.index)
            c.branch_steps += r.counters.branch_steps
            c.accept_plus_bonus += r.counters.accept_plus_bonus
            forwards = (self.spec.forwards if self.spec is not None else 0) - h.draft_forwards0
            result = DecodeResult(
                r.prompt, output_branches(r.branches), r.counters, now - h.t_submit, forwards, r.p_list, r.forks_gated
            )
            h.generation = _to_generation(result, self.tokenizer, self.apar, self.eos)
            self._end(h, cancelled=h.cancelled, deltas=h.final_deltas)
        self.stats.running = len(self._live)
        if not self._live:
            self._tc = None
            self.stats.live_kv = 0
            self.stats.physical_kv = 0

    def _end(
        self, h: RequestHandle, cancelled: bool, deltas: Optional[list] = None, error: Optional[str] = None
    ) -> None:
        h.t_finish = time.perf_counter()
        h.error = error
        if error is not None:
            self.stats.failed += 1
        elif cancelled:
            self.stats.cancelled += 1
        else:
            self.stats.finished += 1
        h.done.set()
        h.deliver(StreamEvent(h.id, deltas or [], finished=True, generation=h.generation, error=error))

    def _fail_all(self, message: str) -> None:
        for r in self._live:
            h = self._handles.pop(r.index, None)
            self.decoder.requests_by_index.pop(r.index, None)
            if h is not None:
                self._end(h, cancelled=False, error=message)
        if self.spec is not None and self._live:
            try:
                self.spec.release([r.index for r in self._live])
            except Exception:  # the speculator may be what failed; start it afresh
                self.spec.reset(0, vocab_size=self.decoder.vocab_size, generator=self.decoder.generator)
        self._live, self._tc = [], None
        self.stats.running = 0
