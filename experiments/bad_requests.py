"""Send the issue's bad-request list (and mid-stream disconnects) to a running server, repeatedly.

Run it next to ``apar-spec load-bench --url`` to check that bad input costs the
server nothing: every bad request must get a 4xx OpenAI-style error, no 5xx, and
the load's requests must all complete (``failed requests: 0`` in load-bench,
``apar_spec_requests_failed_total 0`` in /metrics)::

    apar-spec serve --model tiny-apar --port 8765 --kv-budget 1024 --max-tokens 192 &
    python -m apar_spec.experiments.bad_requests http://127.0.0.1:8765 tiny-apar 40 &
    apar-spec load-bench --url http://127.0.0.1:8765 -n 32 --rates 4,inf

Prints one JSON line: status counts, 5xx count, disconnects. Exits 1 on any 5xx or
a body without an ``error`` object. Needs httpx.
"""

from __future__ import annotations

import json
import sys
import time


def bad_requests(model: str, context: int = 1024) -> list[dict]:
    """httpx ``post`` kwargs for each bad request of the issue's list."""
    return [
        dict(content=b'{"model": "' + model.encode() + b'", "prompt": [1, 2'),  # malformed JSON
        dict(json=[1, 2]),
        dict(content=b""),  # not an object, empty body
        dict(json={"model": model}),
        dict(json={"prompt": "hi"}),  # missing fields
        dict(json={"model": model, "prompt": 12}),
        dict(json={"model": model, "prompt": "hi", "max_tokens": "5"}),  # wrong types
        dict(json={"model": model, "prompt": "  "}),  # empty prompt
        dict(json={"model": model, "prompt": "hi", "max_tokens": 0}),
        dict(json={"model": model, "prompt": "hi", "max_tokens": -3}),
        dict(json={"model": model, "prompt": "hi", "max_tokens": 10**9}),
        dict(json={"model": "no-such-model", "prompt": "hi"}),
        dict(json={"model": model, "prompt": [5] * (context + 10)}),  # over the context length
        dict(json={"model": model, "prompt": "hi", "n": 2}),
        dict(json={"model": model, "prompt": "hi", "logprobs": 3}),
        dict(json={"model": model, "prompt": "hi", "temperature": 0.9}),
        dict(content=b'{"model": "' + model.encode() + b'", "prompt": "' + b"a" * (2 << 20) + b'"}'),  # oversized body
    ]


def main(url: str, model: str, seconds: float) -> int:
    import httpx

    counts: dict[str, int] = {}
    errors, t0 = 0, time.time()
    with httpx.Client(base_url=url, timeout=60) as client:
        while time.time() - t0 < seconds:
            for kwargs in bad_requests(model):
                r = client.post("/v1/completions", **kwargs)
                counts[str(r.status_code)] = counts.get(str(r.status_code), 0) + 1
                errors += r.status_code >= 500 or "error" not in r.json()
            for path in ("/v1/completions", "/v1/chat/completions"):  # hang up after the first tokens
                body = {"model": model, "stream": True, "max_tokens": 128}
                if "chat" in path:
                    body["messages"] = [{"role": "user", "content": "List 5 ways to reduce stress."}]
                else:
                    body["prompt"] = "Question: List 5 ways to reduce stress.\nAnswer:"
                with client.stream("POST", path, json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: ") and '"apar"' in line:
                            break
                counts["disconnect"] = counts.get("disconnect", 0) + 1
    print(json.dumps({"statuses": counts, "bad_responses": errors}))
    return 1 if errors else 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print("usage: python -m apar_spec.experiments.bad_requests URL MODEL SECONDS", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
