"""``apar-spec serve`` (OpenAI-compatible server) and ``apar-spec load-bench`` (serving under load).

Thin typer commands: ``serve`` loads the model, starts an ``Engine`` in its worker
thread and hands ``apar_spec.serving.http.create_app`` to uvicorn; ``load-bench``
calls ``experiments.load_bench.load_bench`` and prints its rows (rich table, JSONL,
a PNG or a terminal chart). Defaults live in ``DecodeOptions`` / ``LoadSettings``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from apar_spec.experiments.bench_plan import BenchSettings
from apar_spec.experiments.load_bench import LoadSettings

from apar_spec.options import DecodeOptions, given
from apar_spec.serving import Engine

from .errors import fail, handle_errors
from .options import MODEL_HELP, ForkBias, ForkGate, RepeatedTitle, check_mode, default, model_option, with_groups
from .output import stdout_console
from .progress import ensure_packaged_base

Dtype = Annotated[
    Optional[str],
    typer.Option("--dtype", help="float32, bfloat16, float16, float64 (default: float32 for embedded models)."),
]
Device = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, or auto.")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads (default: 1 on CPU).")]
KvBudget = Annotated[
    Optional[int],
    typer.Option(
        "--kv-budget", help="KV budget in slots of logical live KV; requests queue while it is full (never evicted)."
    ),
]


LoadAdaptive = Annotated[
    bool,
    typer.Option(
        "--load-adaptive/--fixed-k",
        help="Spec modes: before each step the cost model picks the draft tokens per branch that pay at the "
        "current batch, down to none (costs measured once per model and cached). --fixed-k drafts k every step.",
    ),
]


def check_positive(**values: Optional[int]) -> None:
    """Counts and budgets that make no sense (zero, negative) are one line before any model loads."""
    for name, value in values.items():
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1 (got {value})")


@handle_errors
@with_groups
def serve_command(
    model: Annotated[str, model_option(MODEL_HELP)] = default(BenchSettings, "target"),
    draft: Annotated[
        Optional[str],
        typer.Option(
            "--draft",
            help="Draft for spec modes (registry name, path or a union 'a+b:8'). Default: tiny-draft for embedded "
            "models, else ngram.",
        ),
    ] = None,
    mode: Annotated[str, typer.Option("--mode", help="ar, apar, spec or apar+spec.")] = default(Engine, "mode"),
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    kv_budget: KvBudget = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="Largest max_tokens a request may ask for; also the per-branch cap.")
    ] = default(DecodeOptions, "max_new_tokens"),
    k: Annotated[int, typer.Option("-k", help="Draft tokens per branch per step.")] = default(
        DecodeOptions, "num_draft_tokens"
    ),
    temperature: Annotated[
        float, typer.Option("--temperature", help="Temperature of every request (0 = greedy).")
    ] = default(DecodeOptions, "temperature"),
    served_name: Annotated[
        Optional[str], typer.Option("--served-model-name", help="Model name clients send (default: --model).")
    ] = None,
    upstream: Annotated[
        Optional[str],
        typer.Option(
            "--upstream",
            help="Run APAR on OpenAI-compatible servers (vLLM) at URL[,URL...] serving an `apar-spec export` of "
            "--model; several URLs are replicas (each request goes to the least loaded). Without it: our own engine.",
        ),
    ] = None,
    fork_bias: ForkBias = None,
    repeated_title: RepeatedTitle = None,
    fork_gate: ForkGate = None,
    load_adaptive: LoadAdaptive = default(LoadSettings, "load_adaptive"),
    dtype: Dtype = None,
    device: Device = None,
    threads: Threads = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API with continuous batching."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        fail("`apar-spec serve` needs the serve extra: pip install 'apar-spec[serve]'")
    from apar_spec.experiments.bench import torch_threads
    from apar_spec.experiments.models import Loaded, default_draft, resolve_draft

    from apar_spec.models.loading import load
    from apar_spec.serving.http import create_app, serve_app

    from .output import quiet_transformers

    check_mode(mode)
    urls = [u.strip() for u in (upstream or "").split(",") if u.strip()]
    if upstream is not None and not urls:
        fail("--upstream needs at least one URL, e.g. http://127.0.0.1:8100")
    for u in urls:
        if not u.startswith(("http://", "https://")):
            fail(f"--upstream URL '{u}' must start with http:// or https://")
    if urls and (kv_budget is not None or draft):
        fail("--kv-budget and --draft are our own engine's; with --upstream the upstream budgets KV and speculates")
    if draft and "spec" not in mode:
        fail(f"--draft is only used by --mode spec or apar+spec (got --mode {mode})")
    if not 0 < port < 65536:
        fail(f"--port must be in 1..65535 (got {port})")
    check_positive(kv_budget=kv_budget, threads=threads, max_tokens=max_tokens)
    decode = given(
        fork_bias=fork_bias, repeated_title=repeated_title, fork_gate=fork_gate
    )  # absent: the model's own apply
    DecodeOptions(**decode)  # a bad value: one line before the model loads
    quiet_transformers()
    ensure_packaged_base(stdout_console(stderr=True), model, draft)  # a first SmolLM2 load says why it waits
    loaded = Loaded(model, *load(model, dtype=dtype, device=device))
    draft_arg = None
    if "spec" in mode:
        draft_arg = resolve_draft(draft or default_draft(model), loaded, loaded, dtype=dtype, device=device).arg
    if urls:
        from apar_spec.serving.upstream import UpstreamEngine

        with torch_threads(threads, str(loaded.model.device)):
            up = UpstreamEngine(
                loaded.model,
                loaded.tokenizer,
                urls,
                mode=mode,
                max_new_tokens=max_tokens,
                temperature=temperature,
                **decode,
            ).start()
            err = stdout_console(stderr=True)
            err.print(
                f"serving {served_name or model} ({mode}) on http://{host}:{port} over {', '.join(urls)}", markup=False
            )
            try:
                serve_app(create_app(up, served_name or model), host, port)
            finally:
                up.stop()
        return
    with torch_threads(threads, str(loaded.model.device)):
        err = stdout_console(stderr=True)
        planner = None
        if load_adaptive and "spec" in mode:
            from apar_spec.costs.planning import planner_for
            from apar_spec.decoding.draft_tree import chain
            from apar_spec.decoding.speculator import resolve_draft as resolve_speculator

            spec = resolve_speculator(draft_arg, loaded.model, loaded.tokenizer)
            planner = planner_for(
                loaded.model,
                spec,
                chain(k),
                draft_name=draft or default_draft(model),
                tokenizer=loaded.tokenizer,
                say=lambda msg: err.print(msg, markup=False),
            )
        engine = Engine(
            loaded.model,
            loaded.tokenizer,
            mode=mode,
            draft=draft_arg,
            kv_budget=kv_budget,
            max_new_tokens=max_tokens,
            num_draft_tokens=k,
            temperature=temperature,
            load_adaptive=planner or False,
            **decode,
        ).start()
        app = create_app(engine, served_name or model)
        err.print(
            f"serving {served_name or model} ({mode}) on http://{host}:{port}  kv budget: {kv_budget or 'unlimited'} "
            f"slots",
            markup=False,
        )
        try:
            serve_app(app, host, port)
        finally:
            engine.stop()


@handle_errors
@with_groups
def load_bench_command(
    url: Annotated[
        Optional[list[str]],
        typer.Option(
            "--url",
            help="Measure running OpenAI-compatible servers over HTTP instead of in process: label=URL or URL, "
            "repeatable (e.g. --url ar=http://127.0.0.1:8100 --url apar=http://127.0.0.1:8000 compares vLLM AR with "
            "APAR through `serve --upstream` on the same prompts and arrivals).",
        ),
    ] = None,
    model: Annotated[
        str,
        model_option(
            "Target model (APAR modes): embedded name, local path or cached HF id; the AR baseline is its base "
            "(tiny-base for tiny-apar)."
        ),
    ] = default(LoadSettings, "target"),
    base: Annotated[Optional[str], typer.Option("--base", help="AR baseline model ('same' = the target).")] = None,
    draft: Annotated[
        Optional[str], typer.Option("--draft", help="Draft for apar+spec (default: tiny-draft for embedded targets).")
    ] = None,
    modes: Annotated[str, typer.Option("--modes", help="Comma-separated: ar, apar, apar+spec, spec.")] = ",".join(
        default(LoadSettings, "modes")
    ),
    prompts: Annotated[
        str, typer.Option("--prompts", help="Built-in set, text file, JSONL or question.jsonl.")
    ] = default(LoadSettings, "prompts"),
    category: Annotated[Optional[str], typer.Option("--category", help="Only these categories.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="At most this many distinct prompts.")] = None,
    turn: Annotated[int, typer.Option("--turn", help="Turn of question.jsonl rows.")] = default(LoadSettings, "turn"),
    num_requests: Annotated[
        int, typer.Option("--num-requests", "-n", help="Requests per (mode, rate); prompts are cycled.")
    ] = default(LoadSettings, "num_requests"),
    rates: Annotated[
        str, typer.Option("--rates", help="Poisson arrival rates in requests/s; 'inf' = all at once.")
    ] = ",".join("inf" if math.isinf(r) else f"{r:g}" for r in default(LoadSettings, "rates")),
    kv_budget: KvBudget = default(LoadSettings, "kv_budget"),
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="max_tokens of every request.")] = default(
        LoadSettings, "max_new_tokens"
    ),
    k: Annotated[int, typer.Option("-k", help="Draft tokens per branch per step (apar+spec).")] = default(
        LoadSettings, "k"
    ),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the arrival schedule and prompt order.")] = default(
        LoadSettings, "seed"
    ),
    check_offline: Annotated[
        bool,
        typer.Option(
            "--check-offline/--no-check-offline", help="Compare every output with offline generate() (in process)."
        ),
    ] = default(LoadSettings, "check_offline"),
    dtype: Dtype = None,
    device: Device = None,
    threads: Threads = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Append one JSONL row per (mode, rate).")] = None,
    plot: Annotated[
        Optional[Path],
        typer.Option(
            "--plot", help="PNG throughput-vs-latency plot (needs the plot extra); a terminal chart otherwise."
        ),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds one (mode, rate) run may take.")] = default(
        LoadSettings, "timeout_s"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON rows instead of tables.")] = False,
    load_adaptive: LoadAdaptive = default(LoadSettings, "load_adaptive"),
) -> None:
    """Serve N requests with Poisson arrivals at several rates; AR vs APAR vs APAR+spec under one KV budget."""
    from apar_spec.experiments.load_bench import goals, load_bench, parse_rates, plot_png, write_rows

    from .output import quiet_transformers

    check_positive(num_requests=num_requests, max_new_tokens=max_new_tokens, kv_budget=kv_budget, threads=threads)
    if not timeout > 0:  # NaN too
        fail(f"--timeout must be > 0 seconds (got {timeout})")
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    settings = LoadSettings(
        target=model,
        base=base,
        draft=draft,
        modes=mode_list,
        prompts=prompts,
        category=category,
        limit=limit,
        turn=turn,
        num_requests=num_requests,
        rates=parse_rates(rates),
        kv_budget=kv_budget,
        max_new_tokens=max_new_tokens,
        k=k,
        seed=seed,
        dtype=dtype,
        device=device,
        threads=threads,
        urls=tuple(url or ()),
        check_offline=check_offline,
        load_adaptive=load_adaptive,
        timeout_s=timeout,
    )
    if url:
        from apar_spec.experiments.load_bench import parse_urls

        parse_urls(url)  # a bad --url: one line before anything loads
        try:
            import httpx  # noqa: F401
        except ImportError:
            fail("--url needs httpx: pip install httpx")
    quiet_transformers()
    # a server elsewhere loads its own model; over --url only the HF generate marker's baseline loads here
    ensure_packaged_base(stdout_console(stderr=True), model, base, None if url else draft)
    console = stdout_console()
    err = stdout_console(stderr=True)
    rows = load_bench(settings, progress=None if as_json else (lambda msg: err.print(msg, markup=False)))
    if out is not None:
        write_rows(rows, out)
    g = goals(rows)
    if as_json:
        print(json.dumps({"rows": [r.to_dict() for r in rows], "goals": dataclasses.asdict(g)}, default=str))
        return
    _render(rows, g, console)
    if plot is not None:
        if plot_png(rows, plot):
            console.print(f"plot: {plot}", markup=False)
        else:
            console.print(
                "note: matplotlib is not installed (pip install 'apar-spec[plot]'); terminal chart instead",
                markup=False,
            )
            _chart(rows, console)
    else:
        _chart(rows, console)


def _render(rows, g, console) -> None:
    from apar_spec.experiments.load_bench import TABLE_HEADERS, table_body
    from rich.table import Table

    marker = next((r.hf_generate_tok_s for r in rows if r.hf_generate_tok_s), None)
    title = (
        f"load-bench (KV budget {rows[0].kv_budget if rows else '-'} slots"
        + (f"; HF generate {marker:.0f} tok/s" if marker else "")
        + ")"
    )
    body = table_body(rows)
    if console.is_terminal:
        table = Table(title=title, title_justify="left", header_style="bold")
        for h in TABLE_HEADERS:
            table.add_column(h, justify="left" if h == "mode" else "right")
        for row in body:
            table.add_row(*row)
        console.print(table)
    else:
        from .report_view import plain_table

        console.print(plain_table(title, TABLE_HEADERS, body), markup=False, highlight=False, soft_wrap=True)

    def x(v):
        return "-" if v is None else f"{v:.2f}x"

    sat = "-" if g.saturation_rate is None else ("inf" if math.isinf(g.saturation_rate) else f"{g.saturation_rate:g}/s")
    console.print(
        f"at the rate where AR saturates ({sat}): APAR/AR output tok/s {x(g.throughput_ratio)}, req/s "
        f"{x(g.request_ratio)}, "
        f"p50 e2e {x(g.e2e_p50_ratio)}; APAR+spec/AR tok/s {x(g.spec_throughput_ratio)}, p50 e2e "
        f"{x(g.spec_e2e_p50_ratio)}; "
        f"capacity (rate inf) APAR/AR tok/s {x(g.capacity_ratio)}, APAR+spec/AR {x(g.spec_capacity_ratio)}; "
        f"outputs == offline: {'-' if g.lossless_min is None else f'{100 * g.lossless_min:.0f}%'} (lowest row); "
        f"failed requests: {g.failed}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _chart(rows, console) -> None:
    from apar_spec.experiments.load_bench import terminal_chart

    for line in terminal_chart(rows):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
