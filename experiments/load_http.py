"""Load over HTTP: stream chat requests to any OpenAI-compatible server (vLLM itself,
``apar-spec serve`` with or without ``--upstream``) at scheduled arrival times, reading
only what the standard stream carries (plus our ``apar`` fields where a server sends them)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Optional

from .load_rows import RequestRecord


def parse_urls(items: Sequence[str]) -> list[tuple[str, str]]:
    """``label=URL`` or bare URLs -> (label, url); a bad item is a one-line ValueError."""
    out: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        label, sep, url = item.partition("=")
        if not sep:
            label, url = f"url{i + 1}" if len(items) > 1 else "server", item
        label, url = label.strip(), url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--url '{item}' is not a URL (give http://HOST:PORT or label=http://HOST:PORT)")
        if not label or label in {x for x, _ in out}:
            raise ValueError(f"--url labels must be distinct and non-empty (got '{label}')")
        out.append((label, url))
    return out


def read_chunk(chunk: dict) -> tuple[str, int]:
    """The answer text a standard OpenAI stream chunk carries (chat ``delta.content`` or
    completion ``text``) and how many token ids it names (vLLM's ``token_ids``, else 0)."""
    text, n = "", 0
    for c in chunk.get("choices") or []:
        delta = c.get("delta")
        text += (delta.get("content") or "") if isinstance(delta, dict) else (c.get("text") or "")
        n += len(c.get("token_ids") or [])
    return text, n


async def _one_http(
    client, url: str, model: str, pid: str, text: str, max_tokens: int, at: float, start: float
) -> RequestRecord:
    """One streamed chat request. Read from the standard stream, so any OpenAI-compatible
    server is measured alike: TTFT at the first chunk with answer text, tokens from
    ``usage`` (``stream_options.include_usage``); our servers' ``apar`` fields, where
    present, give the answer tokens in reading order (control tokens excluded), branches,
    queue wait and child start latencies."""
    delay = start + at - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, final, usage_, error, finished = None, None, None, None, False
    parts: list[str] = []
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = chunk["error"].get("message")
                    piece, _ = read_chunk(chunk)
                    parts.append(piece)
                    if ttft is None and (piece or chunk.get("apar", {}).get("tokens")):
                        ttft = time.perf_counter() - t0  # first answer token reached the client
                    if chunk.get("usage"):
                        usage_ = chunk["usage"]
                    if chunk.get("choices") and chunk["choices"][0].get("finish_reason"):
                        finished = True
                        final = chunk.get("apar")
    except Exception as err:  # a lost request is a result, not a crash of the bench
        error = f"{type(err).__name__}: {err}"
    e2e = time.perf_counter() - t0
    ok = error is None and finished
    generated = (usage_ or {}).get("completion_tokens", 0)
    return RequestRecord(
        prompt_id=pid,
        arrival_s=at,
        ttft_s=ttft,
        e2e_s=e2e,
        queue_wait_s=(final or {}).get("queue_wait_s"),
        output_tokens=(final or {}).get("answer_tokens", generated),
        generated_tokens=generated,
        branches=(final or {}).get("num_branches", 1),
        ok=ok,
        error=error,
        text="".join(parts),
        child_start_s=((final or {}).get("upstream") or {}).get("child_start_s", []),
        step_s=((final or {}).get("upstream") or {}).get("root_token_interval_s"),
    )


def run_http(
    url: str, texts: list[tuple[str, str]], arrivals: list[float], max_tokens: int, timeout_s: float
) -> tuple[list[RequestRecord], float, str, Optional[int], Optional[int], Optional[int]]:
    """Stream every request through ``url``; also returns the server's model name and, for
    our own servers, their peak live KV since start, KV budget and peak physical KV (from /metrics)."""
    import httpx

    url = url.rstrip("/")

    async def main():
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s), limits=httpx.Limits(max_connections=None)
        ) as client:
            models = (await client.get(f"{url}/v1/models")).json()["data"]
            model = models[0]["id"]
            start = time.perf_counter()
            records = await asyncio.gather(
                *(
                    _one_http(client, url, model, pid, text, max_tokens, at, start)
                    for (pid, text), at in zip(texts, arrivals)
                )
            )
            duration = max((r.arrival_s + (r.e2e_s or 0.0)) for r in records)
            resp = await client.get(f"{url}/metrics")
            values = {}
            for ln in resp.text.splitlines() if resp.status_code == 200 else []:
                parts = ln.split()
                if len(parts) == 2 and not ln.startswith("#"):
                    try:
                        values[parts[0]] = float(parts[1])
                    except ValueError:
                        continue
            peak = values.get("apar_spec_kv_live_slots_peak")
            budget = values.get("apar_spec_kv_budget_slots")
            phys = values.get("apar_spec_kv_physical_slots_peak")
            return (
                list(records),
                duration,
                model,
                None if peak is None else int(peak),
                int(budget) if budget else None,
                None if phys is None else int(phys),
            )

    return asyncio.run(main())
