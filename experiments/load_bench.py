"""Load benchmark: many requests arriving over time, served with continuous batching.

Method (why each choice):

- Arrivals: Poisson at rate R (exponential gaps from a seeded RNG, the SAME schedule
  and prompt order for every mode at a given rate), or all at once (``inf``).
- Runs are interleaved (for each rate, every mode in turn) so that a drift of a shared
  machine's state hits every mode alike.
- Modes: ``ar`` on the AR baseline (``tiny-base`` for ``tiny-apar``, as the paper
  compares APAR-7B with its base), ``apar`` and ``apar+spec`` on the target, all under
  the same KV budget (slots of logical live KV, see ``apar_spec.serving.engine``).
- In process, the engine's worker thread decodes while this thread submits at the
  arrival times; against ``--url`` every request is a real streaming HTTP request
  (``/v1/chat/completions``), so TTFT includes the network and the server's queue.
- Metrics (vLLM ``benchmark_serving`` names): request throughput (req/s), output
  throughput (answer tokens/s: reading-order tokens, control tokens excluded), TTFT
  (submit -> first committed token), TPOT ((e2e - TTFT) / (tokens - 1)), end-to-end
  latency p50/p90/p99, queue wait (submit -> admission), peak live KV.
- Lossless under load: in process, every request's greedy output is compared with
  its offline ``generate()`` output (batch of one) on the same model and mode.
- HF ``model.generate`` tok/s on the baseline model is printed as the machine-state
  marker (absolute speeds move with the machine; ratios within one run are the result).
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from apar_spec.decoding.draft_tree import chain
from apar_spec.options import DecodeOptions

from .load_http import parse_urls, run_http
from .load_rows import LoadRow, RequestRecord, summarize
from .models import DEFAULT_TARGET, default_draft, encode_prompt, load_models
from .prompts import DEFAULT_SET, load_prompts

LOAD_MODES = ("ar", "apar", "apar+spec")


@dataclass
class LoadSettings:
    """Everything a load run depends on."""

    target: str = DEFAULT_TARGET
    base: Optional[str] = None  # None: the target's known base (tiny-apar -> tiny-base)
    draft: Optional[str] = None  # None: tiny-draft for embedded targets, n-gram otherwise
    modes: Sequence[str] = LOAD_MODES
    prompts: str = DEFAULT_SET
    category: Optional[str] = None
    limit: Optional[int] = None
    turn: int = 0
    num_requests: int = 24
    rates: Sequence[float] = (1.0, 2.0, 4.0, 8.0, math.inf)
    kv_budget: Optional[int] = 1024  # slots of logical live KV; the same for every mode
    max_new_tokens: int = 192
    k: int = DecodeOptions.num_draft_tokens
    seed: int = 0
    dtype: Optional[str] = None
    device: Optional[str] = None
    threads: Optional[int] = None
    # running OpenAI-compatible servers to measure through HTTP instead of in process, each
    # "label=URL" or a bare URL (labelled by its position): vLLM itself, `apar-spec serve`
    # (with or without --upstream); all on the same prompts and arrival schedule
    urls: Sequence[str] = ()
    check_offline: bool = True
    # spec modes: before each step the cost model picks the draft nodes per branch that pay at the
    # current batch, down to none (apar_spec/costs/planning.py); False drafts k at every step
    load_adaptive: bool = True
    timeout_s: float = 600.0  # per (mode, rate): a run that takes longer is an error, not a hang


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Poisson arrivals (seconds from start), or all at 0 for an infinite rate."""
    if n < 1:
        raise ValueError(f"--num-requests must be >= 1 (got {n})")
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError(f"rates must be > 0 (got {rate})")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def parse_rates(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            r = math.inf if part in ("inf", "infinity") else float(part)
        except ValueError:
            raise ValueError(f"--rates: '{part}' is not a number or 'inf'") from None
        if not r > 0:
            raise ValueError(f"--rates: every rate must be > 0 (got {part})")
        out.append(r)
    if not out:
        raise ValueError("--rates is empty; give e.g. 1,2,4,inf")
    return out


# ------------------------------------------------------------------ in process
def run_in_process(
    engine, prompts: list[tuple[str, list[int]]], arrivals: list[float], timeout_s: float
) -> tuple[list[RequestRecord], float]:
    """Submit each prompt at its arrival time to a started engine; wait for all."""
    start = time.perf_counter()
    handles = []
    for (pid, ids), at in zip(prompts, arrivals):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        handles.append((pid, at, engine.submit(ids)))
    deadline = start + timeout_s
    records = []
    for pid, at, h in handles:
        if not h.done.wait(max(0.0, deadline - time.perf_counter())):
            raise TimeoutError(f"load run did not finish within {timeout_s} s (raise --timeout)")
        g = h.generation
        ok = h.error is None and g is not None
        records.append(
            RequestRecord(
                prompt_id=pid,
                arrival_s=at,
                ttft_s=h.t_first_token - h.t_submit if h.t_first_token else None,
                e2e_s=h.t_finish - h.t_submit,
                queue_wait_s=h.t_admit - h.t_submit if h.t_admit else None,
                output_tokens=len(g.token_ids) if ok else 0,
                generated_tokens=g.stats.tokens_generated if ok else 0,
                branches=g.stats.num_branches if ok else 0,
                ok=ok,
                error=h.error,
                token_ids=list(g.token_ids) if ok else [],
            )
        )
    end = max(h.t_finish for _, _, h in handles)
    return records, end - start


def run_urls(settings: LoadSettings, chosen: list, say) -> list[LoadRow]:
    """Every (rate, URL): rates outside, URLs inside, the same prompts and arrivals for each.
    The HF ``generate`` marker is measured here on the baseline model (``--model``'s base)."""
    urls = parse_urls(settings.urls)
    ms = load_models(settings.target, settings.base, [], dtype=settings.dtype, device=settings.device)
    from .bench import torch_threads

    with torch_threads(settings.threads, ms.device):
        marker = hf_marker(ms.baseline, encode_prompt(ms.baseline, chosen[0].text))
    say(f"HF generate on {ms.baseline.name}: {marker:.0f} tok/s (machine-state marker)")
    texts = [(p.id, p.text) for p in chosen]
    rows = []
    for rate in settings.rates:
        arrivals = arrival_times(len(texts), rate, settings.seed)
        for label, url in urls:
            say(f"{label} ({url}) rate={rate}")
            records, duration, model, peak, budget, phys = run_http(
                url, texts, arrivals, settings.max_new_tokens, settings.timeout_s
            )
            row = summarize(label, model, rate, records, duration, peak, budget, url, None)
            row.hf_generate_tok_s, row.peak_physical_kv = marker, phys
            rows.append(row)
    return rows


# ------------------------------------------------------------------ driver
def hf_marker(loaded, ids: list[int], max_new: int = 64) -> float:
    """HF ``model.generate`` tok/s on one prompt (warm-up, then the median of 3)."""
    from apar_spec.experiments.hf_baselines import hf_generate

    hf_generate(loaded.model, loaded.tokenizer, ids, max_new_tokens=8)
    runs = [hf_generate(loaded.model, loaded.tokenizer, ids, max_new_tokens=max_new) for _ in range(3)]
    return statistics.median(len(r.token_ids) / r.wall_time_s for r in runs)


def load_bench(settings: LoadSettings, progress=None) -> list[LoadRow]:
    """Every (mode, rate) of the settings; returns one summary row each (see module docstring)."""
    from apar_spec import generate
    from apar_spec.serving import Engine
    from apar_spec.serving.engine import EngineStats

    from .bench import torch_threads

    prompts = load_prompts(settings.prompts, category=settings.category, limit=settings.limit, turn=settings.turn)
    rng = random.Random(settings.seed)
    chosen = [prompts[i % len(prompts)] for i in range(settings.num_requests)]
    rng.shuffle(chosen)
    rows: list[LoadRow] = []
    say = progress or (lambda msg: None)
    if settings.urls:
        return run_urls(settings, chosen, say)

    for mode in settings.modes:
        if mode not in LOAD_MODES and mode not in ("spec",):
            raise ValueError(f"unknown load-bench mode '{mode}' (choose from {', '.join(LOAD_MODES)}, spec)")
    draft_name = settings.draft or default_draft(settings.target)
    needs_draft = any("spec" in m for m in settings.modes)
    ms = load_models(
        settings.target,
        settings.base,
        [draft_name] if needs_draft else [],
        dtype=settings.dtype,
        device=settings.device,
    )
    with torch_threads(settings.threads, ms.device):
        marker = hf_marker(ms.baseline, encode_prompt(ms.baseline, chosen[0].text))
        say(f"HF generate on {ms.baseline.name}: {marker:.0f} tok/s (machine-state marker)")
        setups = {}
        for mode in settings.modes:
            loaded = ms.for_config(mode)
            ids = [(p.id, encode_prompt(loaded, p.text)) for p in chosen]
            draft = ms.draft.arg if "spec" in mode else None
            opts = dict(max_new_tokens=settings.max_new_tokens, num_draft_tokens=settings.k)
            offline: dict[str, list[int]] = {}
            if settings.check_offline:
                for pid, p_ids in dict(ids).items():
                    offline[pid] = generate(loaded.model, loaded.tokenizer, [p_ids], mode=mode, draft=draft, **opts)[
                        0
                    ].token_ids
            planner = None
            if settings.load_adaptive and "spec" in mode:
                from apar_spec.costs.planning import planner_for
                from apar_spec.decoding.speculator import resolve_draft as resolve_speculator

                spec = resolve_speculator(draft, loaded.model, loaded.tokenizer)
                planner = planner_for(
                    loaded.model, spec, chain(settings.k), draft_name=ms.draft.name, tokenizer=loaded.tokenizer, say=say
                )
            setups[mode] = (loaded, ids, draft, opts, offline, planner)
        # rates outside, modes inside: a drift of the machine's state hits every mode alike
        for rate in settings.rates:
            for mode in settings.modes:
                loaded, ids, draft, opts, offline, planner = setups[mode]
                say(f"{mode} on {loaded.name}, rate={rate}")
                engine = Engine(
                    loaded.model,
                    loaded.tokenizer,
                    mode=mode,
                    draft=draft,
                    kv_budget=settings.kv_budget,
                    load_adaptive=planner.fresh() if planner is not None else False,
                    **opts,
                )
                # warm-up (allocation, first-call costs) outside the timed run
                engine.submit(ids[0][1], 4)
                engine.run_until_idle()
                engine.stats = EngineStats()
                engine.start()
                try:
                    records, duration = run_in_process(
                        engine, ids, arrival_times(len(ids), rate, settings.seed), settings.timeout_s
                    )
                finally:
                    engine.stop()
                lossless = None
                if settings.check_offline:
                    lossless = sum(r.ok and r.token_ids == offline[r.prompt_id] for r in records) / len(records)
                row = summarize(
                    mode,
                    loaded.name,
                    rate,
                    records,
                    duration,
                    engine.stats.peak_live_kv,
                    settings.kv_budget,
                    "in-process",
                    lossless,
                )
                row.hf_generate_tok_s = marker
                row.peak_physical_kv = engine.stats.peak_physical_kv
                if planner is not None:
                    row.draft_allowance = {str(k): n for k, n in sorted(engine.stats.draft_allowance.items())}
                if engine.stats.budget_violations:
                    raise RuntimeError(
                        f"live KV exceeded the budget in {engine.stats.budget_violations} step(s) ({mode}, rate {rate})"
                    )
                rows.append(row)
        rows.sort(key=lambda r: (list(settings.modes).index(r.mode), list(settings.rates).index(r.rate)))
    return rows


# ------------------------------------------------------------------ goals
@dataclass
class Goals:
    """The issue's goals, read off one run's rows.

    AR *saturates* at the lowest rate where its requests wait for KV at least half as
    long as they take end to end (p50 queue wait >= p50 e2e / 2): from there on the
    queue, not decoding, sets its latency. ``inf`` (all at once) always counts. The
    ratios at that rate are the headline; ``capacity_*`` compare the ``inf`` rows,
    where every mode is saturated (maximum throughput under the budget)."""

    saturation_rate: Optional[float]
    throughput_ratio: Optional[float]  # APAR / AR output tokens/s at the saturation rate
    request_ratio: Optional[float]  # APAR / AR req/s
    e2e_p50_ratio: Optional[float]  # APAR / AR p50 e2e latency
    spec_throughput_ratio: Optional[float]  # APAR+spec / AR output tokens/s
    spec_e2e_p50_ratio: Optional[float]
    capacity_ratio: Optional[float]  # APAR / AR output tokens/s at rate inf
    spec_capacity_ratio: Optional[float]
    lossless_min: Optional[float]  # lowest share of requests == offline, over all rows
    failed: int


def _saturated(row: LoadRow) -> bool:
    if math.isinf(row.rate):
        return True
    return row.queue_wait_p50 is not None and row.e2e_p50 is not None and row.queue_wait_p50 >= row.e2e_p50 / 2


def goals(rows: list[LoadRow]) -> Goals:
    by = {(r.mode, r.rate): r for r in rows}
    rates = sorted({r.rate for r in rows})
    sat = next((rate for rate in rates if ("ar", rate) in by and _saturated(by[("ar", rate)])), None)

    def ratio(mode: str, key: str, rate) -> Optional[float]:
        a, b = by.get((mode, rate)), by.get(("ar", rate))
        if a is None or b is None or not getattr(b, key) or getattr(a, key) is None:
            return None
        return getattr(a, key) / getattr(b, key)

    ll = [r.lossless for r in rows if r.lossless is not None]
    return Goals(
        sat,
        ratio("apar", "output_throughput", sat),
        ratio("apar", "request_throughput", sat),
        ratio("apar", "e2e_p50", sat),
        ratio("apar+spec", "output_throughput", sat),
        ratio("apar+spec", "e2e_p50", sat),
        ratio("apar", "output_throughput", math.inf),
        ratio("apar+spec", "output_throughput", math.inf),
        min(ll) if ll else None,
        sum(r.failed for r in rows),
    )


# ------------------------------------------------------------------ output
def write_rows(rows: list[LoadRow], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r.to_dict()) + "\n")


def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


TABLE_HEADERS = [
    "mode",
    "rate",
    "done",
    "req/s",
    "out tok/s",
    "TTFT p50",
    "TPOT p50",
    "e2e p50",
    "e2e p90",
    "e2e p99",
    "queue p50",
    "peak KV",
    "phys KV",
    "branches",
    "drafts/step",
    "child start s (steps)",
    "lossless",
]


def allowance_text(hist: Optional[dict[str, int]]) -> str:
    """A load-adaptive run's histogram as ``drafts:share`` of its steps, e.g. ``0:62% 4:38%``."""
    if not hist:
        return "-"
    total = sum(hist.values())
    return " ".join(f"{k}:{100 * n / total:.0f}%" for k, n in sorted(hist.items(), key=lambda kv: int(kv[0])))


def table_body(rows: list[LoadRow]) -> list[list[str]]:
    return [
        [
            r.mode,
            "inf" if math.isinf(r.rate) else f"{r.rate:g}",
            f"{r.completed}/{r.num_requests}",
            _f(r.request_throughput),
            _f(r.output_throughput, "{:.0f}"),
            _f(r.ttft_p50, "{:.3f}"),
            _f(r.tpot_p50, "{:.4f}"),
            _f(r.e2e_p50, "{:.2f}"),
            _f(r.e2e_p90, "{:.2f}"),
            _f(r.e2e_p99, "{:.2f}"),
            _f(r.queue_wait_p50, "{:.2f}"),
            "-" if r.peak_live_kv is None else str(r.peak_live_kv),
            "-" if r.peak_physical_kv is None else str(r.peak_physical_kv),
            f"{r.mean_branches:.1f}",
            allowance_text(r.draft_allowance),
            "-" if r.child_start_p50 is None else f"{r.child_start_p50:.3f} ({_f(r.child_start_steps_p50, '{:.1f}')})",
            "-" if r.lossless is None else f"{100 * r.lossless:.0f}%",
        ]
        for r in rows
    ]


def plot_png(rows: list[LoadRow], path: Path) -> bool:
    """Throughput vs p50 latency per mode; False if matplotlib is missing (the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(r.mode for r in rows):
        pts = sorted((r.output_throughput, r.e2e_p50, r.rate) for r in rows if r.mode == mode and r.e2e_p50 is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        for x, y, rate in pts:
            ax.annotate(
                "inf" if math.isinf(rate) else f"{rate:g}/s",
                (x, y),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
            )
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("p50 end-to-end latency (s)")
    ax.set_title("throughput vs latency (labels: arrival rate)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def terminal_chart(rows: list[LoadRow], width: int = 40) -> list[str]:
    """Output tokens/s per (mode, rate) as bars (when no PNG is wanted or possible)."""
    top = max((r.output_throughput for r in rows), default=0.0) or 1.0
    out = []
    for r in rows:
        label = f"{r.mode:<10} {'inf' if math.isinf(r.rate) else f'{r.rate:g}':>5}"
        n = round(r.output_throughput / top * width)
        out.append(f"{label}  {'#' * n}{' ' * (width - n)} {r.output_throughput:.0f} tok/s, p50 {_f(r.e2e_p50)} s")
    return out


def load_settings_dict(settings: LoadSettings) -> dict[str, Any]:
    d = asdict(settings)
    d["rates"] = ["inf" if math.isinf(r) else r for r in settings.rates]
    return d
