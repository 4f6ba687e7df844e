"""APAR over an unmodified OpenAI-compatible engine (vLLM): one upstream request per branch.

Why this shape. In APAR a child's context is its parent's context, ``[Fork]`` and
``[Child]``. So each branch can be an ordinary upstream completion whose prompt is that
context as token ids (vLLM's ``/v1/completions`` takes id prompts and streams the ids it
samples with ``return_token_ids``). When a branch's stream brings a spawning ``[Fork]``,
the orchestrator starts the child at once as a new request on the same replica; vLLM's
automatic prefix caching shares the full KV blocks of the common prefix, and its
scheduler batches every live branch of every request (and, with ``--speculative-config``,
their drafts) in one engine step. Nothing in vLLM is patched.

The rules stay exactly those of offline decoding, because they are the same code:
``commit.Committer`` (finish rules, spawning), ``fork_rules.ForkRules`` (where ``[Fork]``
may be sampled), ``budget.apply_budget`` (the request's token budget on the APAR clock,
which is exact whatever order the streams' tokens arrive in, as under speculation) and
``budget.settled`` (what a client stream may send). How the logit rules reach vLLM:

- static per branch, as the request's ``logit_bias``: ``[Child]`` -100 always; ``[Fork]``
  +``fork_bias`` where it would spawn, -100 where it can never be sampled in the branch
  (the router gated the request, the depth cap, ``max_forks_per_branch`` reached);
- position-dependent rules (no ``[Fork]`` right after ``[Fork]``/``[Child]``, inside a code
  block, at the branch cap) by *check and resubmit* instead of a logits-processor plugin:
  the orchestrator checks every streamed ``[Fork]`` against ``ForkRules.may_fork``; one
  that the rules ban is dropped, the stream cancelled, and the branch resubmitted from
  that position for one token with ``[Fork]`` banned (then ``allowed_token_ids`` if -100
  did not suffice), then streamed on. Why: it is exact for greedy decoding (banning a
  token that was not the argmax does not move the argmax) and for temperature sampling
  (a draw that is redrawn only when it hit the banned token is a draw from the banned
  distribution), it needs nothing installed inside vLLM (a plugin would have to import
  this package in vLLM's environment, whose transformers pin differs), and the rule
  rarely fires: a model trained on APAR seldom asks to fork where it may not.
- An upstream that refuses ``logit_bias`` (vLLM does while its own speculative decoding is
  on) gets no static bans: every banned token is caught by the check and resubmitted for
  one token with ``allowed_token_ids``; a ``fork_bias`` other than 0 cannot be honoured
  there and is refused at startup.
- A rule that cannot be honoured upstream is refused at construction: a user
  ``logits_processor``, ``top_p``/``top_k`` truncation (truncating after the ban is not
  truncating before it), speculation modes (turn on vLLM's own speculators instead).
- The fork router needs the prompt's last hidden state, which an OpenAI server does not
  return: the orchestrator runs the model's decoder over the prompt itself (one prefill
  on its own CPU, in a worker thread), only where the router gates requests. The root
  streams meanwhile; its first ``[Fork]`` waits for the verdict, and a gated request's
  ``[Fork]`` is a banned one (resubmitted), so the answer is exactly offline's.

Costs are measured, not assumed: every request reports each child's start latency
(``[Fork]`` arrival to the child's first token) and the root's median token interval.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from apar_spec.decoding import clock
from apar_spec.decoding.budget import apply_budget, settled
from apar_spec.decoding.commit import Committer
from apar_spec.decoding.fork_rules import ForkRules
from apar_spec.decoding.state import Branch, DecodeResult, Request, output_branches
from apar_spec.decoding.tokens import find_apar_tokens
from apar_spec.models.router import gate_of
from apar_spec.options import DecodeOptions, model_decode_defaults
from apar_spec.serving.engine import (
    EngineStats,
    RequestError,
    RequestHandle,
    StreamEvent,
    check_request,
    settled_deltas,
)
from apar_spec.serving.replicas import BAN, Replica, UpstreamError, connect

log = logging.getLogger(__name__)

UPSTREAM_MODES = ("ar", "apar")
CHILD_STARTS_KEPT = 4096  # a long-running server keeps a window, not every start since launch
MAX_RESTARTS = 64  # per branch: resubmits after a banned [Fork] or an early end (a bound, never reached in practice)


@dataclass
class BranchRun:
    """The upstream side of one branch: its current stream and what it measured."""

    task: Optional[asyncio.Task] = None
    generation: int = 0  # bumped at every (re)submit; tokens of older streams are stale
    ban_next: int = 0  # 1: next token with [Fork] at -100; 2: with [Fork] outside allowed_token_ids
    restarts: int = 0
    t_start: float = 0.0  # the [Fork] arrived (children) or the request started (root)
    t_first: Optional[float] = None
    token_times: list[float] = field(default_factory=list)  # arrival of each token (the root only)


@dataclass
class UpstreamRequest:
    handle: RequestHandle
    r: Request
    replica: Replica
    runs: dict[int, BranchRun] = field(default_factory=dict)
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # (branch id, generation, kind, payload)
    router: Optional[asyncio.Future] = None  # the fork router's p(list), while it is being computed


class UpstreamEngine:
    """The ``Engine`` interface (``submit``/``cancel``/``stats``) over OpenAI-compatible upstreams.

    ``model``/``tokenizer``: the same model the upstream serves (an ``apar-spec export`` of
    it), for the APAR settings, the vocabulary and the router. ``urls``: one or more
    replicas; each request goes to the least loaded, all its branches with it."""

    def __init__(
        self,
        model,
        tokenizer,
        urls: list[str],
        *,
        mode: str = "apar",
        api_key: Optional[str] = None,
        **options: Any,
    ):
        from apar_spec.api import eos_ids_of

        if mode not in UPSTREAM_MODES:
            raise ValueError(
                f"mode '{mode}' cannot run over an upstream (only {', '.join(UPSTREAM_MODES)}): "
                "speculation there is the upstream's own (vLLM --speculative-config)"
            )
        if not urls:
            raise ValueError("give at least one upstream URL")
        opts = DecodeOptions.build(**{**model_decode_defaults(model), **options})
        if opts.max_branch_tokens is None:
            opts.max_branch_tokens = opts.max_new_tokens
        if opts.logits_processor is not None:
            raise ValueError("a logits_processor cannot run inside the upstream; serve without it")
        if opts.temperature > 0 and (opts.top_p < 1.0 or opts.top_k):
            raise ValueError(
                "top_p/top_k cannot be honoured over an upstream: it would truncate before the fork rules ban "
                "[Fork]; use plain temperature sampling or greedy"
            )
        self.model, self.tokenizer, self.mode, self.opts = model, tokenizer, mode, opts
        self.kv_budget = None  # the upstream budgets its own KV
        self.reports_kv = False  # and reports it (vLLM's /metrics: vllm:kv_cache_usage_perc)
        self.apar = find_apar_tokens(tokenizer) if tokenizer is not None else None
        fork_enabled = mode == "apar"
        if fork_enabled and self.apar is None:
            raise ValueError("the tokenizer has no [Fork]/[Child] tokens, so the model cannot run mode='apar'")
        self.eos = eos_ids_of(model, tokenizer, opts.eos_token_id)
        self.rules = ForkRules(opts, self.apar, fork_enabled, opts.max_branch_tokens)
        self.max_pos = getattr(model.config, "max_position_embeddings", None)
        self.committer = Committer(self.rules, self.eos, self.max_pos)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.gate = gate_of(model, opts.fork_gate) if fork_enabled else None
        self.replicas = [Replica(u.rstrip("/")) for u in urls]
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.stats = EngineStats()
        # seconds from a [Fork] to its child's first token, the latest CHILD_STARTS_KEPT of all requests
        self.child_starts: deque[float] = deque(maxlen=CHILD_STARTS_KEPT)
        self.banned_resubmits = 0  # streams cut at a [Fork] the rules ban, all requests
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._requests: dict[int, UpstreamRequest] = {}
        self._next_id = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------ life
    @property
    def branch_cap(self) -> int:
        return self.opts.max_branch_tokens

    def offline_options(self, max_new_tokens: int) -> dict:
        """``generate`` kwargs that decode a request exactly as served here."""
        return {"max_new_tokens": max_new_tokens, "max_branch_tokens": self.branch_cap}

    def start(self) -> UpstreamEngine:
        """Start the event loop thread and check every replica (one line on what to fix)."""
        if self._thread is not None:
            return self
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="apar-spec-upstream", daemon=True)
        self._thread.start()
        ready.wait()
        try:
            asyncio.run_coroutine_threadsafe(self._connect(), self._loop).result(timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is None:
            return
        loop = self._loop

        async def close() -> None:
            for u in list(self._requests.values()):
                self._cancel_all(u)
            for rep in self.replicas:
                if rep.client is not None:
                    await rep.client.aclose()

        try:
            asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=timeout)
        except Exception:
            log.warning("upstream close failed", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread, self._loop = None, None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def _connect(self) -> None:
        for rep in self.replicas:
            await connect(rep, self.headers, self.apar, self.opts.fork_bias)

    # ------------------------------------------------------------ clients
    def check(self, prompt_ids: list[int], max_new_tokens: Optional[int] = None) -> int:
        return check_request(self.opts, prompt_ids, max_new_tokens, self.vocab_size, self.max_pos)

    def submit(
        self,
        prompt_ids: list[int],
        max_new_tokens: Optional[int] = None,
        on_event: Optional[Callable[[StreamEvent], None]] = None,
    ) -> RequestHandle:
        """Start a request (thread-safe); events go to ``on_event`` or ``handle.events``."""
        try:
            m = self.check(prompt_ids, max_new_tokens)
        except RequestError:
            self.stats.rejected += 1
            raise
        if self._loop is None:
            raise RuntimeError("the upstream engine is not started (call start())")
        with self._lock:
            h = RequestHandle(self._next_id, list(prompt_ids), m, 0, on_event)
            self._next_id += 1
        h.t_submit = time.perf_counter()
        asyncio.run_coroutine_threadsafe(self._serve(h), self._loop)
        return h

    def cancel(self, handle: RequestHandle) -> None:
        """Stop a request (thread-safe): every upstream stream of it is closed, which aborts
        it upstream (vLLM aborts a request whose client went away)."""
        if self._loop is None or handle.done.is_set():
            return
        handle.cancelled = True

        def go() -> None:
            u = self._requests.get(handle.id)
            if u is not None:
                u.inbox.put_nowait((-1, 0, "cancel", None))

        self._loop.call_soon_threadsafe(go)

    def generate(self, prompts: list[list[int]], max_new_tokens: Optional[int] = None, timeout: float = 600.0):
        """Decode prompts (token ids) through the upstream; their ``Generation`` in order."""
        handles = [self.submit(p, max_new_tokens) for p in prompts]
        return [h.result(timeout) for h in handles]

    # ------------------------------------------------------------ one request
    async def _serve(self, h: RequestHandle) -> None:
        rep = min(self.replicas, key=lambda x: x.inflight)
        rep.inflight += 1
        self.stats.running += 1
        root = Branch(id=0, parent=None, fork_index=None, level=0, active=True)
        r = Request(h.id, 0, list(h.prompt_ids), [], [root], limit=h.max_new_tokens, budget=h.max_new_tokens)
        u = UpstreamRequest(h, r, rep)
        self._requests[h.id] = u
        if h.cancelled:  # cancelled before this coroutine ran
            u.inbox.put_nowait((-1, 0, "cancel", None))
        error: Optional[UpstreamError] = None
        try:
            if self.gate is not None:  # off the critical path: the root streams while the router runs
                router, _ = self.gate
                u.router = asyncio.get_running_loop().run_in_executor(None, self._p_list, router, r.prompt)
            h.t_admit = time.perf_counter()
            self._start_branch(u, root, time.perf_counter())
            await self._coordinate(u)
        except UpstreamError as err:
            error = err
        except Exception as err:  # a bug here must not take the server down
            log.exception("request %d failed", h.id)
            error = UpstreamError(f"internal error: {type(err).__name__}: {err}", 500)
        finally:
            self._cancel_all(u)
            rep.inflight -= 1
            self.stats.running -= 1
            self._requests.pop(h.id, None)
        self._finish(u, error)

    @torch.inference_mode()
    def _p_list(self, router, prompt: list[int]) -> float:
        hidden = self.model.get_decoder()(torch.tensor([prompt], device=self.model.device)).last_hidden_state
        return router.p_list(hidden[0, -1])  # of [hidden]

    async def _coordinate(self, u: UpstreamRequest) -> None:
        """Apply every arriving token in one place, in arrival order (one request, one task).

        What arrived while the last batch was applied is taken as one batch, and the token
        budget and the stream's settling run once per batch: exact, because
        ``apply_budget`` keeps plain APAR's tokens however far each branch got (as under
        speculation), and cheaper when the streams outpace this loop."""
        r = u.r
        while not r.done:
            batch = [await u.inbox.get()]
            while not u.inbox.empty():
                batch.append(u.inbox.get_nowait())
            for msg in batch:
                if not await self._take(u, *msg):
                    return await self._route(u)
            apply_budget(r)
            for other in r.branches:
                if other.finish is not None:
                    self._stop_stream(u, other.id)
            self._emit(u)
        await self._route(u)

    async def _route(self, u: UpstreamRequest) -> None:
        """Wait for the fork router's verdict (once per request); the first ``[Fork]``
        waits for it, so a gated request never forks, exactly as offline."""
        if u.router is not None:
            u.r.p_list = await u.router
            u.r.forks_gated = u.r.p_list < self.gate[1]
            u.router = None

    async def _take(self, u: UpstreamRequest, bid: int, gen: int, kind: str, payload) -> bool:
        """Apply one stream message; False on a cancel."""
        r = u.r
        if kind == "cancel":
            for b in r.branches:
                if b.finish is None:
                    b.finish, b.active = "cancelled", False
            r.queue.clear()
            return False
        b = r.branches[bid]
        run = u.runs[bid]
        if gen != run.generation or b.finish is not None:
            return True  # a stale stream (resubmitted, or the branch already ended)
        if kind == "error":
            raise payload
        if kind == "end":  # the stream ended but no rule ended the branch: go on from here
            run.restarts += 1
            if run.restarts > MAX_RESTARTS:
                raise UpstreamError(f"upstream ended branch {bid} early {MAX_RESTARTS} times; giving up")
            self._resubmit(u, b, run)
            return True
        now = time.perf_counter()
        for tok in payload:
            if u.router is not None and self.apar is not None and tok == self.apar.fork_id:
                await self._route(u)
            if self._banned(r, b, tok):
                self.banned_resubmits += 1
                run.ban_next = min(2, run.ban_next + 1)
                run.restarts += 1
                if run.restarts > MAX_RESTARTS:
                    raise UpstreamError(f"upstream kept sampling a banned token in branch {bid}")
                self._resubmit(u, b, run)
                break
            run.ban_next = 0
            if run.t_first is None:
                run.t_first = now
                if b.is_child:
                    self.child_starts.append(now - run.t_start)
            if bid == 0:  # the root's token interval is the request's step time
                run.token_times.append(now)
            self.committer.commit(r, b, [tok])
            while r.queue:  # children start at once, on the same replica (prefix cache)
                child = r.branches[r.queue.popleft()]
                child.active = True
                self._start_branch(u, child, now)
            if b.finish is not None:
                break
        return True

    def _banned(self, r: Request, b: Branch, tok: int) -> bool:
        """Whether the fork rules ban ``tok`` at ``b``'s next position (``ForkRules.apply``'s rule)."""
        if self.apar is None or tok not in (self.apar.fork_id, self.apar.child_id):
            return False
        if tok == self.apar.child_id or r.forks_gated:
            return True
        prev = b.tokens[-1] if b.tokens else r.prompt[-1]
        return not self.rules.may_fork(b, self.rules.rule_states(b, [], [], prev)[0])

    # ------------------------------------------------------------ streams
    def _start_branch(self, u: UpstreamRequest, b: Branch, t_start: float) -> None:
        u.runs[b.id] = BranchRun(t_start=t_start)
        self._resubmit(u, b, u.runs[b.id])

    def _resubmit(self, u: UpstreamRequest, b: Branch, run: BranchRun) -> None:
        if run.task is not None:
            run.task.cancel()
        run.generation += 1
        body = self._body(u, b, run.ban_next)
        run.task = asyncio.ensure_future(self._stream(u, b.id, run.generation, body))

    def _stop_stream(self, u: UpstreamRequest, bid: int) -> None:
        run = u.runs.get(bid)
        if run is not None and run.task is not None and not run.task.done():
            run.task.cancel()

    def _cancel_all(self, u: UpstreamRequest) -> None:
        for run in u.runs.values():
            if run.task is not None and not run.task.done():
                run.task.cancel()

    def _body(self, u: UpstreamRequest, b: Branch, ban_next: int) -> dict:
        r, apar = u.r, self.apar
        context = r.context(b)
        room = self.branch_cap - b.generated
        if u.replica.max_model_len:
            room = min(room, u.replica.max_model_len - len(context))
        body: dict[str, Any] = {
            "model": u.replica.model_id,
            "prompt": context,
            "max_tokens": max(1, min(room, r.limit)),
            "temperature": self.opts.temperature,
            "stream": True,
            "return_token_ids": True,
            "ignore_eos": True,  # our EOS set decides, exactly as offline (eos_ids_of)
            "stop_token_ids": sorted(self.eos),
            "skip_special_tokens": False,
        }
        if self.opts.temperature > 0 and self.opts.seed is not None:
            body["seed"] = self.opts.seed + 1000 * r.index + b.id
        if apar is None:
            return body
        if ban_next:  # the one token after a banned [Fork]: banned, then streamed on from there
            body["max_tokens"] = 1
        # -100 was not enough, or the upstream takes no logit_bias: an exact ban
        if ban_next >= 2 or (ban_next and not u.replica.logit_bias):
            banned = (apar.fork_id, apar.child_id)
            body["allowed_token_ids"] = [t for t in range(self.vocab_size) if t not in banned]
        if u.replica.logit_bias:  # without it: no static bans, every ban by check
            bias = {str(apar.child_id): BAN}
            spawns = b.level < self.opts.max_depth
            never = not self.rules.fork_enabled or r.forks_gated or b.forks >= self.opts.max_forks_per_branch
            never = never or (not spawns and not self.rules.ends_at_cap(b))
            if never or ban_next:
                bias[str(apar.fork_id)] = BAN
            elif spawns and self.opts.fork_bias:
                bias[str(apar.fork_id)] = float(self.opts.fork_bias)
            body["logit_bias"] = bias
        return body

    async def _stream(self, u: UpstreamRequest, bid: int, gen: int, body: dict) -> None:
        """POST one completion and pass its token ids to the coordinator as they arrive."""
        import json

        import httpx

        rep = u.replica
        try:
            async with rep.client.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")[:200]
                    status = 503 if resp.status_code in (429, 503) else 502
                    raise UpstreamError(f"upstream {rep.url} answered {resp.status_code}: {text}", status)
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise UpstreamError(f"upstream {rep.url} failed mid-request: {chunk['error']}")
                    for choice in chunk.get("choices") or []:
                        ids = choice.get("token_ids") or []
                        if ids:
                            u.inbox.put_nowait((bid, gen, "tokens", ids))
            u.inbox.put_nowait((bid, gen, "end", None))
        except asyncio.CancelledError:
            raise
        except UpstreamError as err:
            u.inbox.put_nowait((bid, gen, "error", err))
        except httpx.ConnectError:
            u.inbox.put_nowait((bid, gen, "error", UpstreamError(f"upstream {rep.url} is down (connect refused)", 503)))
        except (httpx.HTTPError, ValueError) as err:
            msg = f"upstream {rep.url} failed mid-request ({type(err).__name__}: {err})"
            u.inbox.put_nowait((bid, gen, "error", UpstreamError(msg)))

    # ------------------------------------------------------------ events
    def _emit(self, u: UpstreamRequest) -> None:
        """Send the tokens no later arrival can take back (``budget.settled``), as the engine does."""
        r, h = u.r, u.handle
        deltas, n_new = settled_deltas(r, h, settled(r, self.rules))
        self.stats.output_tokens += n_new
        if deltas and h.t_first_token is None:
            h.t_first_token = time.perf_counter()
        if r.done:
            h.final_deltas.extend(deltas)
        elif deltas and not h.deliver(StreamEvent(r.index, deltas)):
            self.cancel(h)

    def _finish(self, u: UpstreamRequest, error: Optional[UpstreamError]) -> None:
        from apar_spec.api import _to_generation

        r, h = u.r, u.handle
        h.t_finish = time.perf_counter()
        if error is None:
            self._emit(u)
            r.counters.target_steps = max((clock.next_time(b) for b in r.branches if not b.dropped), default=0)
            result = DecodeResult(
                r.prompt, output_branches(r.branches), r.counters, h.t_finish - h.t_submit, 0, r.p_list, r.forks_gated
            )
            h.generation = _to_generation(result, self.tokenizer, self.apar, self.eos)
            root = u.runs.get(0)
            gaps = [b - a for a, b in zip(root.token_times, root.token_times[1:])] if root else []
            h.upstream = {
                "replica": u.replica.url,
                "child_start_s": [
                    round(run.t_first - run.t_start, 4) for bid, run in u.runs.items() if bid and run.t_first
                ],
                "root_token_interval_s": round(statistics.median(gaps), 4) if gaps else None,
                "resubmits": sum(run.restarts for run in u.runs.values()),
            }
        h.error = str(error) if error is not None else None
        if error is not None:
            self.stats.failed += 1
        elif h.cancelled:
            self.stats.cancelled += 1
        else:
            self.stats.finished += 1
        h.done.set()
        status = error.status if error is not None else 500
        h.deliver(StreamEvent(h.id, h.final_deltas, True, h.generation, h.error, status))
