"""The replicas an ``UpstreamEngine`` sends branches to: connecting, and the startup probe
that refuses, in one line each, an upstream APAR cannot run on (unreachable, no token-id
prompts or token ids in its stream, a vocabulary whose ``[Fork]`` is not ours)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from apar_spec.decoding.tokens import FORK_TOKEN, AparTokens

BAN = -100.0  # the strongest logit_bias OpenAI servers accept (vLLM clamps to [-100, 100])
CONNECT_TIMEOUT_S = 5.0


class UpstreamError(RuntimeError):
    """The upstream failed a request (down, died, refused): an HTTP 502/503 to our client."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


@dataclass
class Replica:
    url: str
    model_id: str = ""
    max_model_len: Optional[int] = None
    inflight: int = 0  # our requests running on it (routing: least loaded)
    client: Any = None  # httpx.AsyncClient, made on the orchestrator's loop
    # whether it takes ``logit_bias`` (vLLM refuses it while its own speculative decoding is on)
    logit_bias: bool = True


async def connect(rep: Replica, headers: dict, apar: Optional[AparTokens], fork_bias: float) -> None:
    """Open ``rep``'s client, read its model, and probe it (``probe``). Raises ValueError."""
    import httpx

    rep.client = httpx.AsyncClient(
        base_url=rep.url,
        headers=headers,
        timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
    )
    try:
        resp = await rep.client.get("/v1/models", timeout=10)
    except httpx.HTTPError as err:
        msg = f"upstream {rep.url} is not reachable ({type(err).__name__}); start it first"
        raise ValueError(msg) from None
    if resp.status_code != 200:
        raise ValueError(f"upstream {rep.url}/v1/models answered {resp.status_code}; is it OpenAI-compatible?")
    data = resp.json().get("data") or []
    if not data:
        raise ValueError(f"upstream {rep.url} serves no model")
    rep.model_id = data[0]["id"]
    rep.max_model_len = data[0].get("max_model_len")
    await probe(rep, apar, fork_bias)


async def probe(rep: Replica, apar: Optional[AparTokens], fork_bias: float) -> None:
    """The upstream takes id prompts, streams ids, and its vocabulary has our control tokens."""
    probe_ids = [apar.fork_id, apar.child_id] if apar is not None else [0]
    body = {"model": rep.model_id, "prompt": probe_ids, "max_tokens": 1, "temperature": 0, "return_token_ids": True}
    resp = await rep.client.post("/v1/completions", json=body, timeout=60)
    if resp.status_code != 200:
        raise ValueError(
            f"upstream {rep.url} refused a token-id prompt ({resp.status_code}: {resp.text[:120]}); "
            "serve the model with vLLM's OpenAI server"
        )
    choice = (resp.json().get("choices") or [{}])[0]
    if "token_ids" not in choice or choice["token_ids"] is None:
        raise ValueError(f"upstream {rep.url} does not return token ids (return_token_ids); use vLLM >= 0.10.2")
    if apar is None:
        return
    body["logit_bias"] = {str(apar.child_id): BAN}
    resp = await rep.client.post("/v1/completions", json=body, timeout=60)
    if resp.status_code == 400 and "logit_bias" in resp.text:
        rep.logit_bias = False  # every ban by check and an exact one-token resubmit instead
        if fork_bias:
            raise ValueError(
                f"upstream {rep.url} does not take logit_bias (vLLM refuses it under its own speculative "
                f"decoding), so fork_bias={fork_bias:g} cannot be honoured there; serve with "
                "--fork-bias 0 or run vLLM without --speculative-config"
            )
    elif resp.status_code != 200:
        raise ValueError(f"upstream {rep.url} refused logit_bias ({resp.status_code}: {resp.text[:120]})")
    ask = {"model": rep.model_id, "tokens": [apar.fork_id]}
    resp = await rep.client.post("/detokenize", json=ask, timeout=30)
    if resp.status_code == 404:  # not vLLM: the first completion's logit_bias check is what is left
        return
    text = resp.json().get("prompt") if resp.status_code == 200 else None
    fork = FORK_TOKEN
    if text is None or text.strip() != fork:
        seen = "outside its vocabulary" if text is None else repr(text)
        raise ValueError(
            f"upstream {rep.url} serves '{rep.model_id}', whose token {apar.fork_id} is {seen}, "
            f"not {fork}: serve an `apar-spec export` of this model there"
        )
