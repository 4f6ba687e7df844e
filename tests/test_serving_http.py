"""The OpenAI-compatible server over real HTTP on 127.0.0.1 (uvicorn in a thread, httpx client).

Bounded: every call has a timeout, the server stops at the end of the module.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from micro import fork_processor, micro_model, micro_tokenizer  # noqa: E402

from apar_spec import generate  # noqa: E402
from apar_spec.serving import Engine  # noqa: E402
from apar_spec.serving.http import create_app  # noqa: E402

MODEL = micro_model("llama")
TOK = micro_tokenizer()
PROC = fork_processor()
NAME = "micro"
MAX_NEW = 32
BODY_LIMIT = 4096
TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    engine = Engine(MODEL, TOK, mode="apar", kv_budget=150, max_new_tokens=MAX_NEW, logits_processor=PROC).start()
    app = create_app(engine, NAME, max_body_bytes=BODY_LIMIT)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT)
    yield client, engine
    client.close()
    srv.should_exit = True
    thread.join(15)
    engine.stop()


def offline(prompt_ids, max_tokens=MAX_NEW):
    return generate(
        MODEL,
        TOK,
        [prompt_ids],
        mode="apar",
        logits_processor=PROC,
        max_new_tokens=max_tokens,
        max_branch_tokens=MAX_NEW,
    )[0]


def sse_events(response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"apar_spec_{name} "):
            return float(line.split()[1])
    raise KeyError(name)


def test_health_models_metrics(server):
    client, _ = server
    assert client.get("/health").json() == {"status": "ok"}
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [NAME]
    text = client.get("/metrics").text
    for name in (
        "requests_running",
        "requests_waiting",
        "kv_live_slots",
        "acceptance_length_mean",
        "output_tokens_per_second",
    ):
        assert f"# TYPE apar_spec_{name} " in text


def test_completion_equals_offline_and_carries_stats(server):
    client, _ = server
    ids = [1, 9, 10, 11, 12]
    r = client.post("/v1/completions", json={"model": NAME, "prompt": ids, "max_tokens": 20})
    assert r.status_code == 200, r.text
    body = r.json()
    off = offline(ids, 20)
    assert body["choices"][0]["text"] == off.text
    assert [b["token_ids"] for b in body["apar"]["branches"]] == [b.token_ids for b in off.branches]
    assert body["usage"]["completion_tokens"] == off.stats.tokens_generated
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["apar"]["steps"] == off.stats.target_steps and body["apar"]["num_branches"] == len(off.branches)


def test_streaming_text_and_branch_tokens_match_offline(server):
    client, _ = server
    ids = [1, 20, 21, 22]
    with client.stream(
        "POST",
        "/v1/completions",
        json={"model": NAME, "prompt": ids, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    off = offline(ids)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == off.text
    rebuilt: dict[int, list[int]] = {}
    for c in chunks:
        for t in c.get("apar", {}).get("tokens", []):
            rebuilt.setdefault(t["branch"], []).extend(t["token_ids"])
    assert rebuilt == {b.id: b.token_ids for b in off.branches} and len(rebuilt) > 1
    assert chunks[-1]["usage"]["completion_tokens"] == off.stats.tokens_generated
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] in ("stop", "length")


def test_chat_completion_stream_and_not(server):
    client, _ = server
    msg = {"model": NAME, "messages": [{"role": "user", "content": "w7 w8 w9"}], "max_tokens": 16}
    plain = client.post("/v1/chat/completions", json=msg).json()
    assert plain["object"] == "chat.completion"
    assert plain["choices"][0]["message"]["content"] == offline(TOK("w7 w8 w9")["input_ids"], 16).text
    with client.stream("POST", "/v1/chat/completions", json={**msg, "stream": True}) as r:
        events = sse_events(r)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1] if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]


BAD = [
    ("malformed json", dict(content=b'{"model": "micro", "prompt": [1, 2'), 400, None),
    ("not an object", dict(json=[1, 2, 3]), 400, None),
    ("empty body", dict(content=b""), 400, None),
    ("missing prompt", dict(json={"model": NAME}), 400, "prompt"),
    ("missing model", dict(json={"prompt": [1, 2]}), 400, "model"),
    ("prompt wrong type", dict(json={"model": NAME, "prompt": 12}), 400, "prompt"),
    ("prompt mixed list", dict(json={"model": NAME, "prompt": [1, "a"]}), 400, "prompt"),
    ("empty prompt", dict(json={"model": NAME, "prompt": "   "}), 400, "prompt"),
    ("empty id list", dict(json={"model": NAME, "prompt": []}), 400, "prompt"),
    ("max_tokens zero", dict(json={"model": NAME, "prompt": [1, 2], "max_tokens": 0}), 400, "max_tokens"),
    ("max_tokens negative", dict(json={"model": NAME, "prompt": [1, 2], "max_tokens": -5}), 400, "max_tokens"),
    ("max_tokens huge", dict(json={"model": NAME, "prompt": [1, 2], "max_tokens": 10**9}), 400, "max_tokens"),
    ("max_tokens string", dict(json={"model": NAME, "prompt": [1, 2], "max_tokens": "5"}), 400, "max_tokens"),
    ("stream wrong type", dict(json={"model": NAME, "prompt": [1, 2], "stream": "yes"}), 400, "stream"),
    ("unknown model", dict(json={"model": "gpt-9", "prompt": [1, 2]}), 404, "model"),
    ("prompt over context", dict(json={"model": NAME, "prompt": [5] * 600}), 400, None),
    ("token id out of vocab", dict(json={"model": NAME, "prompt": [1, 10_000]}), 400, None),
    ("n > 1", dict(json={"model": NAME, "prompt": [1, 2], "n": 2}), 400, "n"),
    ("best_of", dict(json={"model": NAME, "prompt": [1, 2], "best_of": 3}), 400, "best_of"),
    ("logprobs", dict(json={"model": NAME, "prompt": [1, 2], "logprobs": 5}), 400, "logprobs"),
    ("stop", dict(json={"model": NAME, "prompt": [1, 2], "stop": ["w5"]}), 400, "stop"),
    ("temperature", dict(json={"model": NAME, "prompt": [1, 2], "temperature": 0.7}), 400, "temperature"),
    ("batch prompts", dict(json={"model": NAME, "prompt": ["w5", "w6"]}), 400, "prompt"),
    ("oversized body", dict(json={"model": NAME, "prompt": "w5 " * 3000}), 413, None),
]


@pytest.mark.parametrize("what,kwargs,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_an_openai_error(server, what, kwargs, status, param):
    client, _ = server
    r = client.post("/v1/completions", **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    if status == 400 and what in ("n > 1", "best_of", "logprobs", "stop", "temperature", "batch prompts"):
        assert "not supported" in err["message"]


def test_neutral_values_of_unsupported_options_are_accepted(server):
    client, _ = server
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": "w5 w6"}],
        "max_tokens": 4,
        "n": 1,
        "logprobs": False,
        "presence_penalty": 0.0,
        "frequency_penalty": 0,
        "stop": [],
        "temperature": 0,
        "top_p": 1.0,
        "user": "x",
    }
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    for name, value in (("logprobs", True), ("presence_penalty", 0.5), ("n", True), ("echo", True)):
        r = client.post("/v1/chat/completions", json={**body, name: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == name, (name, r.text)


def test_bad_chat_input(server):
    client, _ = server
    for body in (
        {"model": NAME},
        {"model": NAME, "messages": []},
        {"model": NAME, "messages": [{"role": "user"}]},
        {"model": NAME, "messages": [{"role": "user", "content": " "}]},
        {"model": NAME, "messages": [{"role": "wizard", "content": "w5"}]},
    ):
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and "error" in r.json(), body
    assert client.get("/nope").status_code == 404 and "error" in client.get("/nope").json()


def test_disconnect_mid_stream_frees_the_request(server):
    client, engine = server
    cancelled0 = engine.stats.cancelled
    with client.stream("POST", "/v1/completions", json={"model": NAME, "prompt": [1, 30, 31], "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"apar"' in line:
                break  # first tokens arrived; now hang up
    deadline = time.time() + 30
    while engine.stats.cancelled == cancelled0:
        assert time.time() < deadline, "the cancelled request was never freed"
        time.sleep(0.05)
    while engine.stats.running:
        assert time.time() < deadline
        time.sleep(0.05)
    assert metric(client, "requests_running") == 0 and client.get("/health").status_code == 200


def test_bad_requests_during_load_lose_nothing(server):
    """Good requests stream concurrently with the bad-request list; all good ones finish == offline."""
    client, engine = server
    failed0 = engine.stats.failed
    prompts = [[1, 40 + i, 41 + i, 42] for i in range(6)]
    results: dict[int, str] = {}

    def good(i):
        with httpx.Client(base_url=str(client.base_url), timeout=TIMEOUT) as c:
            r = c.post("/v1/completions", json={"model": NAME, "prompt": prompts[i], "max_tokens": 24})
            results[i] = r.json()["choices"][0]["text"] if r.status_code == 200 else f"HTTP {r.status_code}"

    threads = [threading.Thread(target=good, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for _, kwargs, status, _ in BAD:
        assert client.post("/v1/completions", **kwargs).status_code == status
    for t in threads:
        t.join(TIMEOUT)
    assert {i: results.get(i) for i in range(len(prompts))} == {i: offline(p, 24).text for i, p in enumerate(prompts)}
    assert engine.stats.failed == failed0 and client.get("/health").json() == {"status": "ok"}


def test_load_bench_over_http(server):
    """load-bench --url: real streaming requests, TTFT measured at the client."""
    from apar_spec.experiments.load_bench import arrival_times
    from apar_spec.experiments.load_http import run_http
    from apar_spec.experiments.load_rows import summarize

    client, engine = server
    texts = [(f"p{i}", f"w{10 + i} w{20 + i} w30") for i in range(4)]
    records, duration, model, peak, budget, phys = run_http(
        str(client.base_url), texts, arrival_times(4, 50.0, seed=0), 12, TIMEOUT
    )
    assert model == NAME and peak > 0 and duration > 0 and budget == engine.kv_budget
    assert phys >= peak  # the padded cache holds at least every live slot
    assert all(r.ok and r.ttft_s is not None and 0 < r.ttft_s <= r.e2e_s and r.output_tokens > 0 for r in records), (
        records
    )
    row = summarize("server", model, 50.0, records, duration, peak, None, "url", None)
    assert row.completed == 4 and row.e2e_p50 is not None
