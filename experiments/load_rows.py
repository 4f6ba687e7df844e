"""The records and summary rows of a load run (in process or over HTTP), in one place
that both drivers import (``load_bench``, ``load_http``)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class RequestRecord:
    prompt_id: str
    arrival_s: float  # scheduled, from the run's start
    ttft_s: Optional[float]
    e2e_s: Optional[float]
    queue_wait_s: Optional[float]
    output_tokens: int  # answer tokens (reading order)
    generated_tokens: int  # sampled tokens over all branches ([Fork], EOS included)
    branches: int
    ok: bool
    error: Optional[str] = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # the answer as streamed (over HTTP)
    child_start_s: list[float] = field(default_factory=list)  # [Fork] -> child's first token (APAR over an upstream)
    step_s: Optional[float] = None  # the root branch's median token interval: one upstream engine step

    @property
    def tpot_s(self) -> Optional[float]:
        if self.e2e_s is None or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class LoadRow:
    """One (mode, rate) run: the summary row written to JSONL."""

    mode: str
    model: str
    rate: float
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    ttft_p50: Optional[float]
    ttft_p99: Optional[float]
    tpot_p50: Optional[float]
    e2e_p50: Optional[float]
    e2e_p90: Optional[float]
    e2e_p99: Optional[float]
    queue_wait_p50: Optional[float]
    queue_wait_p99: Optional[float]
    peak_live_kv: Optional[int]
    kv_budget: Optional[int]
    mean_branches: float
    lossless: Optional[float]  # share of requests whose output == offline (None: not checked)
    source: str  # "in-process" | url
    hf_generate_tok_s: Optional[float] = None
    # slots the engine's cache tensors held at peak (padding and dead slots included): what
    # memory really held, beside the logical ``peak_live_kv`` (None: a server that does not say)
    peak_physical_kv: Optional[int] = None
    child_start_p50: Optional[float] = None  # s from a [Fork] to its child's first token (APAR over an upstream)
    child_start_steps_p50: Optional[float] = None  # the same in engine steps (÷ its request's root token interval)
    # load-adaptive speculation: draft nodes per branch the cost model chose -> decode steps (None: not planned)
    draft_allowance: Optional[dict[str, int]] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rate"] = "inf" if math.isinf(self.rate) else self.rate
        return d


def percentile(xs: Sequence[Optional[float]], q: float) -> Optional[float]:
    vals = sorted(x for x in xs if x is not None)
    if not vals:
        return None
    pos = (len(vals) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def summarize(
    mode: str, model: str, rate: float, records: list[RequestRecord], duration: float, peak_kv, budget, source, lossless
) -> LoadRow:
    ok = [r for r in records if r.ok]
    return LoadRow(
        mode=mode,
        model=model,
        rate=rate,
        num_requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration,
        request_throughput=len(ok) / duration if duration > 0 else 0.0,
        output_throughput=sum(r.output_tokens for r in ok) / duration if duration > 0 else 0.0,
        ttft_p50=percentile([r.ttft_s for r in ok], 0.5),
        ttft_p99=percentile([r.ttft_s for r in ok], 0.99),
        tpot_p50=percentile([r.tpot_s for r in ok], 0.5),
        e2e_p50=percentile([r.e2e_s for r in ok], 0.5),
        e2e_p90=percentile([r.e2e_s for r in ok], 0.9),
        e2e_p99=percentile([r.e2e_s for r in ok], 0.99),
        queue_wait_p50=percentile([r.queue_wait_s for r in ok], 0.5),
        queue_wait_p99=percentile([r.queue_wait_s for r in ok], 0.99),
        peak_live_kv=peak_kv,
        kv_budget=budget,
        mean_branches=statistics.fmean([r.branches for r in ok]) if ok else 0.0,
        lossless=lossless,
        source=source,
        child_start_p50=percentile([c for r in ok for c in r.child_start_s], 0.5),
        child_start_steps_p50=percentile([c / r.step_s for r in ok if r.step_s for c in r.child_start_s], 0.5),
    )
