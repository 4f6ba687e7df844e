"""OpenAI-compatible HTTP face of the engine (FastAPI + uvicorn, the ``serve`` extra).

A thin layer, as in vLLM/SGLang/TGI: it validates a request, submits its token ids
to the ``Engine`` (whose decode loop runs in its own worker thread) and relays the
engine's per-step events to the client, as Server-Sent Events when ``stream`` is set.
The event loop never waits on the decode loop: events cross over with
``loop.call_soon_threadsafe``, and text is reassembled here (``TextStream``).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming and
not), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).
Responses carry ``usage`` and, under ``apar``, our stats (steps, branches,
acceptance length, live KV, queue wait) and, when streaming, the branch of every
committed token.

Bad input gets an OpenAI-style error body ``{"error": {"message", "type", "param",
"code"}}`` with a 4xx status, and the server keeps serving: the body is parsed and
checked by hand (one clear message per mistake) before anything reaches the engine.
A client that disconnects cancels its request; the engine frees it at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from apar_spec.serving.engine import Engine, RequestError, StreamEvent
from apar_spec.serving.stream import TextStream

if TYPE_CHECKING:
    from apar_spec.serving.upstream import UpstreamEngine

    AnyEngine = Union[Engine, UpstreamEngine]

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any prompt the context can hold
# Sampling knobs whose value is fixed for the whole server (one decode loop, one rule):
# a request may repeat the server's value or leave it out.
_FIXED = ("temperature", "top_p")
# Options we do not implement: a request that sets them to anything but a neutral value is refused.
_UNSUPPORTED: dict[str, list] = {
    "n": [1],
    "best_of": [1],
    "logprobs": [None, False],
    "top_logprobs": [None, 0],
    "echo": [False],
    "suffix": [None, ""],
    "stop": [None, "", []],
    "presence_penalty": [0],
    "frequency_penalty": [0],
    "logit_bias": [None, {}],
    "tools": [None, []],
    "tool_choice": [None, "none"],
    "functions": [None, []],
    "response_format": [None, {"type": "text"}],
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


@dataclass
class ServerCounters:
    http_requests: int = 0
    http_errors: int = 0


def create_app(
    engine: AnyEngine,
    model_name: str,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    default_max_tokens: Optional[int] = None,
) -> FastAPI:
    """The FastAPI app over a running (``engine.start()``) engine: our own, or APAR over
    OpenAI-compatible upstreams (``UpstreamEngine``); both take the same requests."""
    app = FastAPI(title="apar-spec", docs_url=None, redoc_url=None, openapi_url=None)
    counters = ServerCounters()
    created = int(time.time())
    default_max = default_max_tokens or engine.opts.max_new_tokens
    apar = engine.apar
    fork_id, child_id = (apar.fork_id, apar.child_id) if apar else (None, None)
    tokenizer = engine.tokenizer

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        counters.http_errors += 1
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        counters.http_errors += 1
        return ApiError(
            err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None
        ).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        counters.http_errors += 1
        return ApiError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error").response()

    # ------------------------------------------------------------ plain endpoints
    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "apar-spec"}],
        }

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine, counters), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------ completions
    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request, max_body_bytes)
        common = check_common(body, engine, model_name, default_max)
        ids = prompt_ids(body.get("prompt", _MISSING), tokenizer)
        return await run(request, body, ids, common, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request, max_body_bytes)
        common = check_common(body, engine, model_name, default_max)
        ids = chat_ids(body.get("messages", _MISSING), tokenizer)
        return await run(request, body, ids, common, chat=True)

    async def run(request: Request, body: dict, ids: list[int], common: dict, chat: bool):
        counters.http_requests += 1
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        try:

            def deliver(e: StreamEvent) -> None:
                loop.call_soon_threadsafe(events.put_nowait, e)

            handle = engine.submit(ids, common["max_tokens"], on_event=deliver)
        except RequestError as err:
            code = "context_length_exceeded" if "context" in str(err) else None
            raise ApiError(400, str(err), param="max_tokens" if "max_tokens" in str(err) else None, code=code) from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{handle.id}"
        if common["stream"]:
            gen = sse(handle, events, rid, chat, common["include_usage"])
            return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(handle)
                        return JSONResponse({}, status_code=499)
                    continue
                if event.finished:
                    break
        except asyncio.CancelledError:
            engine.cancel(handle)
            raise
        if event.error is not None:
            raise ApiError(event.error_status, event.error, kind="server_error")
        g = event.generation
        choice = {"index": 0, "finish_reason": finish_reason(g)}
        if chat:
            choice["message"] = {"role": "assistant", "content": g.text}
        else:
            choice.update(text=g.text, logprobs=None)
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [choice],
            "usage": usage(g),
            "apar": apar_stats(handle, g, branches=True),
        }

    async def sse(handle, events: asyncio.Queue, rid: str, chat: bool, include_usage: bool):
        text = TextStream(tokenizer, fork_id, child_id)
        obj = "chat.completion.chunk" if chat else "text_completion"
        finished = False

        def chunk(
            delta: Optional[str], finish: Optional[str] = None, extra: Optional[dict] = None, choices: bool = True
        ) -> str:
            c: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                c["delta"] = {} if delta is None else {"content": delta}
            else:
                c.update(text=delta or "", logprobs=None)
            out = {
                "id": rid,
                "object": obj,
                "created": int(time.time()),
                "model": model_name,
                "choices": [c] if choices else [],
            }
            if extra:
                out.update(extra)
            return f"data: {json.dumps(out)}\n\n"

        try:
            if chat:
                first = {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
                head = {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": [first]}
                yield f"data: {json.dumps(head)}\n\n"
            while True:
                event = await events.get()
                delta = text.feed(event.deltas)
                branches = [
                    {"branch": d.branch, "parent": d.parent, "token_ids": d.tokens, "finish": d.finish}
                    for d in event.deltas
                ]
                if event.finished:
                    finished = True
                    if event.error is not None:
                        err = {"error": {"message": event.error, "type": "server_error", "param": None, "code": None}}
                        yield f"data: {json.dumps(err)}\n\n"
                        break
                    g = event.generation
                    delta += text.finish(g.text)
                    stats = apar_stats(handle, g)
                    yield chunk(delta, finish_reason(g), {"apar": {"tokens": branches, **stats}})
                    if include_usage:
                        yield chunk(None, extra={"usage": usage(g)}, choices=False)
                    break
                if delta or branches:
                    yield chunk(delta, extra={"apar": {"tokens": branches}})
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (or the server stops): free the request
                engine.cancel(handle)

    return app


# ------------------------------------------------------------------ request checks
_MISSING = object()


async def read_json(request: Request, limit: int) -> dict:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {length} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(part)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _is_neutral(value, allowed: list) -> bool:
    """``value`` is None or one of ``allowed`` (booleans never pass for numbers, nor the reverse)."""
    if value is None:
        return True
    for v in allowed:
        if isinstance(v, bool) or isinstance(value, bool):
            if isinstance(v, bool) and isinstance(value, bool) and v == value:
                return True
        elif isinstance(v, (int, float)) and isinstance(value, (int, float)):
            if float(v) == float(value):
                return True
        elif v == value:
            return True
    return False


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_common(body: dict, engine: AnyEngine, model_name: str, default_max: int) -> dict:
    model = body.get("model", _MISSING)
    if model is _MISSING:
        raise ApiError(400, "missing required field 'model'", param="model")
    if not isinstance(model, str):
        raise ApiError(400, f"'model' must be a string, got {type(model).__name__}", param="model")
    if model != model_name:
        raise ApiError(
            404,
            f"the model '{model}' does not exist; this server serves '{model_name}' (see /v1/models)",
            param="model",
            code="model_not_found",
        )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = default_max
    elif not _is_int(max_tokens):
        raise ApiError(400, f"'max_tokens' must be an integer, got {type(max_tokens).__name__}", param="max_tokens")
    elif max_tokens < 1:
        raise ApiError(400, f"'max_tokens' must be >= 1 (got {max_tokens})", param="max_tokens")
    elif max_tokens > engine.opts.max_new_tokens:
        raise ApiError(
            400,
            f"'max_tokens' is {max_tokens}, more than this server allows ({engine.opts.max_new_tokens})",
            param="max_tokens",
        )
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be a boolean, got {type(stream).__name__}", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    for name, neutral in _UNSUPPORTED.items():
        value = body.get(name, neutral[0])
        if not _is_neutral(value, neutral):
            raise ApiError(
                400,
                f"'{name}'={json.dumps(value)[:40]} is not supported by this server (only {json.dumps(neutral[0])})",
                param=name,
                code="unsupported",
            )
    server = {"temperature": engine.opts.temperature, "top_p": engine.opts.top_p}
    for name in _FIXED:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ApiError(400, f"'{name}' must be a number, got {type(value).__name__}", param=name)
        if float(value) != float(server[name]):
            raise ApiError(
                400,
                f"'{name}'={value} is not supported: this server decodes every request with {name}={server[name]} "
                "(set at launch); leave it out or send that value",
                param=name,
                code="unsupported",
            )
    return {"max_tokens": max_tokens, "stream": stream, "include_usage": bool(opts.get("include_usage", False))}


def prompt_ids(prompt, tokenizer) -> list[int]:
    if prompt is _MISSING or prompt is None:
        raise ApiError(400, "missing required field 'prompt'", param="prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ApiError(400, "'prompt' is empty", param="prompt")
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if isinstance(prompt, list):
        if not prompt:
            raise ApiError(400, "'prompt' is empty", param="prompt")
        if all(_is_int(t) for t in prompt):
            return list(prompt)
        if all(isinstance(t, (str, list)) for t in prompt):
            raise ApiError(
                400,
                f"a batch of {len(prompt)} prompts is not supported; send one request per prompt",
                param="prompt",
                code="unsupported",
            )
    raise ApiError(400, "'prompt' must be a string or a list of token ids", param="prompt")


def chat_ids(messages, tokenizer) -> list[int]:
    if messages is _MISSING or messages is None:
        raise ApiError(400, "missing required field 'messages'", param="messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ApiError(
                400, f"messages[{i}] must be an object with string 'role' and 'content'", param=f"messages[{i}]"
            )
        if m["role"] not in ("system", "user", "assistant"):
            raise ApiError(
                400,
                f"messages[{i}].role '{m['role']}' is not supported (system, user, assistant)",
                param=f"messages[{i}].role",
            )
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" and m["content"].strip() for m in clean):
        raise ApiError(400, "the prompt is empty: send at least one user message with content", param="messages")
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    if len(clean) != 1:
        raise ApiError(
            400,
            "this model has no chat template, so only one user message is supported",
            param="messages",
            code="unsupported",
        )
    return tokenizer(clean[0]["content"], add_special_tokens=True)["input_ids"]


# ------------------------------------------------------------------ responses
def finish_reason(g) -> str:
    return "stop" if g.branches[0].finish == "eos" else "length"


def usage(g) -> dict:
    n = g.stats.tokens_generated
    return {"prompt_tokens": len(g.prompt_ids), "completion_tokens": n, "total_tokens": len(g.prompt_ids) + n}


def apar_stats(handle, g, branches: bool = False) -> dict:
    s = g.stats
    out = {
        "steps": s.target_steps,
        "num_branches": s.num_branches,
        "mean_acceptance_length": s.mean_acceptance_length,
        "accepted": s.accepted,
        "drafted": s.drafted,
        "draft_forwards": s.draft_forwards,
        "peak_live_kv": s.peak_live_kv,
        "critical_path": s.critical_path,
        "answer_tokens": len(g.token_ids),
        "queue_wait_s": (handle.t_admit - handle.t_submit) if handle.t_admit else None,
        "ttft_s": (handle.t_first_token - handle.t_submit) if handle.t_first_token else None,
        "e2e_s": (handle.t_finish - handle.t_submit) if handle.t_finish else None,
    }
    if getattr(handle, "upstream", None) is not None:
        out["upstream"] = handle.upstream
    if branches:
        out["branches"] = [b.to_dict() for b in g.branches]
    return out


def prometheus_text(engine: AnyEngine, counters: ServerCounters) -> str:
    s = engine.stats
    rows = [
        ("requests_running", "gauge", "requests in the running batch", s.running),
        ("requests_waiting", "gauge", "requests queued for KV budget", s.queued),
        ("kv_live_slots", "gauge", "logical live KV slots of the running requests (after the last step)", s.live_kv),
        ("kv_live_slots_peak", "gauge", "peak logical live KV slots since start", s.peak_live_kv),
        (
            "kv_physical_slots",
            "gauge",
            "KV slots the cache tensors hold (padding included), after the last step",
            s.physical_kv,
        ),
        ("kv_physical_slots_peak", "gauge", "peak physical KV slots since start", s.peak_physical_kv),
        ("kv_budget_slots", "gauge", "KV budget in slots (0 = unlimited)", engine.kv_budget or 0),
        (
            "acceptance_length_mean",
            "gauge",
            "mean accepted drafts + bonus per branch-step (finished requests)",
            s.mean_acceptance_length,
        ),
        ("output_tokens_per_second", "gauge", "committed tokens per second over the last 10 s", s.tokens_per_s()),
        ("output_tokens_total", "counter", "committed tokens", s.output_tokens),
        ("steps_total", "counter", "target forwards (prefills included)", s.steps),
        ("requests_finished_total", "counter", "requests finished", s.finished),
        ("requests_cancelled_total", "counter", "requests cancelled (client gone)", s.cancelled),
        ("requests_failed_total", "counter", "requests failed by an engine error", s.failed),
        ("requests_rejected_total", "counter", "requests refused at submit", s.rejected),
        ("http_requests_total", "counter", "completion requests accepted", counters.http_requests),
        ("http_errors_total", "counter", "HTTP error responses", counters.http_errors),
    ]
    if not getattr(engine, "reports_kv", True):  # an upstream holds the KV and reports it itself
        rows = [row for row in rows if not row[0].startswith("kv_")]
    lines = []
    for name, kind, help_, value in rows:
        lines += [f"# HELP apar_spec_{name} {help_}", f"# TYPE apar_spec_{name} {kind}", f"apar_spec_{name} {value}"]
    allowance = getattr(s, "draft_allowance", None)
    if allowance:  # load-adaptive speculation: one series per draft length chosen
        name = "apar_spec_draft_allowance_steps_total"
        lines += [f"# HELP {name} decode steps by draft nodes per branch chosen", f"# TYPE {name} counter"]
        lines += [f'{name}{{drafts="{k}"}} {n}' for k, n in sorted(allowance.items())]
    return "\n".join(lines) + "\n"


def serve_app(app: FastAPI, host: str, port: int, log_level: str = "warning") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)
