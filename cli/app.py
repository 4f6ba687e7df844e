"""The ``apar-spec`` command line: thin typer commands over library functions.

Every command parses options, calls one library function (``apar_spec.generate``,
``experiments.bench.compare`` / ``sweep``, ``experiments.report.summarize``,
``restructure.convert_file``, ``train.train``, ``drafts.registry``) and prints the
result: rich on a terminal, plain text when piped, JSON with ``--json``. Defaults are
read from where they live (``DecodeOptions``, ``BenchSettings``, the library
functions' signatures), never written here a second time. Input errors become one
``Error: ...`` line and exit code 2 (``cli/errors.py``).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from apar_spec.options import DecodeOptions

from .errors import EXIT_INTERRUPTED, fail, handle_errors
from .output import print_json, show_generation, stdout_console

app = typer.Typer(
    name="apar-spec",
    help="APAR + speculative decoding: generate, benchmark against honest baselines, report.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
drafts_app = typer.Typer(help="The draft registry: which speculators exist and which targets they fit.", no_args_is_help=True)
app.add_typer(drafts_app, name="drafts")
from . import heads as _heads  # noqa: E402  (command modules register after the app exists)

app.command("train-heads")(_heads.train_heads)
from .costs import costs_app  # noqa: E402 - the cost model's commands live in their own module

app.add_typer(costs_app, name="costs")


def _default(obj: Any, name: str) -> Any:
    """A default from its one source: a dataclass field or a function parameter."""
    if dataclasses.is_dataclass(obj):
        return {f.name: f.default for f in dataclasses.fields(obj)}[name]
    return inspect.signature(obj).parameters[name].default


def _bench_default(name: str) -> Any:
    from apar_spec.experiments.bench import BenchSettings

    return _default(BenchSettings, name)


def _generate_default(name: str) -> Any:
    from apar_spec.api import generate

    return _default(generate, name)


def _quiet_transformers() -> None:
    """HF's per-call warnings and weight-loading bars would drown the report."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - logging is cosmetic
        pass


# ------------------------------------------------------------------ shared options

Target = Annotated[str, typer.Option("--target", help="Target model: embedded name, local path, .gguf file or cached HF id.")]
Base = Annotated[Optional[str], typer.Option("--base", help="AR baseline model for an APAR target ('same' = the target). Default: tiny-base for tiny-apar, else the target.")]
Modes = Annotated[Optional[str], typer.Option("--modes", help="Comma-separated configurations: hf-generate, hf-assisted, ar, apar, spec, apar+spec. Default: all that apply.")]
Prompts = Annotated[str, typer.Option("--prompts", help="Built-in set name, a text file (one prompt a line), JSONL with 'prompt', or Spec-Bench/FastChat question.jsonl; several files comma-separated (ids get the folder name: vicuna_bench/1).")]
Category = Annotated[Optional[str], typer.Option("--category", help="Only these categories (comma-separated).")]
Limit = Annotated[Optional[int], typer.Option("--limit", help="At most this many prompts (after --category).")]
PerCategory = Annotated[Optional[int], typer.Option("--per-category", help="At most this many prompts of each category (several prompt files: categories interleaved).")]
Turn = Annotated[int, typer.Option("--turn", help="Which turn of question.jsonl rows to use (0 = first).")]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", help="Token budget per request, over all branches.")]
MaxDepth = Annotated[Optional[int], typer.Option("--max-depth", help="Fork nesting cap for apar modes (a branch at this level may not fork; root = 0). Default: the nesting the model was trained on, else 2.")]
MaxBranch = Annotated[Optional[int], typer.Option("--max-branch-tokens", help="Cap on each branch's own tokens (default: --max-new-tokens). With a large --max-new-tokens every branch ends on its own, so speculative rows hold the same tokens as plain ones (no shared budget for acceptance to cut elsewhere); HF and ar rows get the cap as their budget.")]
ForkBias = Annotated[Optional[float], typer.Option("--fork-bias", help="Added to the [Fork] logit where a fork is allowed and would spawn a child (apar modes): > 0 forks more, < 0 less. Default: the model's recorded one, else 0.")]
DepthCap = Annotated[Optional[str], typer.Option("--depth-cap", help="What a child at the --max-depth cap does when it asks for [Fork]: end (it ends, minus the line it began) or mask (it writes on). Default: end.")]
RepeatedTitle = Annotated[Optional[str], typer.Option("--repeated-title", help="What a branch does when it forks after a title it already forked after in the same list (a loop): end (it ends, minus that title) or keep (it forks again). Default: end.")]
ForkGate = Annotated[Optional[float], typer.Option("--fork-gate", help="The fork router's threshold (apar modes): a prompt the model's router scores under it as wanting a list decodes without forks. Default: the router's own (no router: no gate); 0 turns it off.")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 = greedy (lossless checks need greedy).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed for sampling.")]
Repeats = Annotated[int, typer.Option("--repeats", help="Timed repeats per (configuration, prompt); the report takes medians.")]
Warmup = Annotated[int, typer.Option("--warmup", help="Untimed warm-up calls per configuration before the first row.")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="float32, bfloat16, float16, float64 (default: float32 for embedded models, the checkpoint's otherwise).")]
Device = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, or auto (accelerate picks).")]
DeviceMap = Annotated[Optional[str], typer.Option("--device-map", help="auto: accelerate spreads a model too large for one device over all of them (instead of --device).")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads for the run (default: 1 on CPU, where batch-1 decoding of small models is latency-bound; untouched on GPU).")]
ChatTemplate = Annotated[Optional[bool], typer.Option("--chat-template/--no-chat-template", help="Wrap prompts in the tokenizer's chat template (default: when it has one).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Results file (JSONL, one row per configuration x prompt x repeat).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue --out: skip rows already there.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Start --out again when it already holds rows.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
Strict = Annotated[bool, typer.Option("--strict", help="Exit non-zero when a lossless check finds a bug: a greedy answer that differs from its reference where the target's logit gap at the first difference is 1e-4 or more, or is missing (float32; bf16/fp16 rounding is not a bug).")]


# ------------------------------------------------------------------ generate


def _check_mode(mode: str) -> None:
    """Fail on an unknown --mode before any model is loaded."""
    import difflib

    from apar_spec.options import MODES

    if mode not in MODES:
        close = difflib.get_close_matches(mode, MODES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        fail(f"unknown mode '{mode}' (choose from {', '.join(MODES)}){hint}")


@app.command()
@handle_errors
def generate(
    prompt: Annotated[str, typer.Argument(help="The question to answer.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Embedded name, local path, .gguf file or cached HF id.")] = _bench_default("target"),
    mode: Annotated[str, typer.Option("--mode", help="ar, apar, spec or apar+spec.")] = _generate_default("mode"),
    draft: Annotated[Optional[str], typer.Option("--draft", help="Draft for spec modes: registry name (see `apar-spec drafts list`), model path, or a union such as 'smollm2-hydra+ngram:8'.")] = None,
    k: Annotated[int, typer.Option("-k", help="Draft tokens per branch per step.")] = DecodeOptions.num_draft_tokens,
    max_new_tokens: MaxNew = DecodeOptions.max_new_tokens,
    max_depth: MaxDepth = None,
    depth_cap: DepthCap = None,
    fork_bias: ForkBias = None,
    repeated_title: RepeatedTitle = None,
    fork_gate: ForkGate = None,
    fork_in_code: Annotated[bool, typer.Option("--fork-in-code", help="Let a branch fork inside a ``` code block (off by default: a fork there splits one piece of code over two branches).")] = DecodeOptions.fork_in_code,
    temperature: Temperature = DecodeOptions.temperature,
    seed: Seed = DecodeOptions.seed,
    chat_template: ChatTemplate = None,
    dtype: Dtype = None,
    device: Device = None,
    device_map: DeviceMap = None,
    threads: Threads = None,
    live: Annotated[bool, typer.Option("--live", help="Show the branches growing, step by step.")] = False,
    as_json: AsJson = False,
) -> None:
    """Answer one prompt and print the answer with its stats."""
    from apar_spec.api import generate as run_generate
    from apar_spec.experiments.bench import torch_threads
    from apar_spec.experiments.models import Loaded, default_draft, encode_prompt, resolve_draft
    from apar_spec.loading import load

    if not prompt.strip():
        fail("the prompt is empty; pass the question to answer, e.g. apar-spec generate \"Give 3 tips for sleep\"")
    _quiet_transformers()
    model_name = model
    _check_mode(mode)
    if draft and mode not in ("spec", "apar+spec"):
        fail(f"--draft is only used by --mode spec or apar+spec (got --mode {mode})")
    loaded = Loaded(model_name, *load(model_name, dtype=dtype, device=device, device_map=device_map))
    draft_name = draft or (default_draft(model_name) if mode in ("spec", "apar+spec") else None)
    draft_device = loaded.model.device if device_map else device  # a draft runs where the target's inputs are
    draft_arg = resolve_draft(draft_name, loaded, loaded, dtype=dtype, device=draft_device).arg if draft_name else None
    ids = encode_prompt(loaded, prompt, chat_template)
    kwargs = dict(
        mode=mode, draft=draft_arg, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
        num_draft_tokens=k, max_draft_tokens=max(k, DecodeOptions.max_draft_tokens), fork_in_code=fork_in_code,
        **({} if max_depth is None else {"max_depth": max_depth}),
        **({} if depth_cap is None else {"depth_cap": depth_cap}),
        **({} if fork_bias is None else {"fork_bias": fork_bias}),
        **({} if repeated_title is None else {"repeated_title": repeated_title}),
        **({} if fork_gate is None else {"fork_gate": fork_gate}),
    )
    console = stdout_console()
    with torch_threads(threads, str(loaded.model.device)):
        if live and console.is_terminal and not as_json:
            from .live import generate_live

            gen = generate_live(loaded.model, loaded.tokenizer, ids, console=console, **kwargs)
        else:
            gen = run_generate(loaded.model, loaded.tokenizer, [ids], **kwargs)[0]
    if as_json:
        print_json({"model": model_name, "mode": mode, "draft": draft_name, **gen.to_dict()})
    else:
        show_generation(gen, console, model=model_name, mode=mode, draft=draft_name)


# ------------------------------------------------------------------ bench / sweep / report


def _settings(**kwargs: Any):
    from apar_spec.experiments.bench import BenchSettings

    return BenchSettings(**kwargs)


def _run_with_progress(run, settings, as_json: bool, strict: bool = False) -> None:
    """Run a driver with a progress bar (stderr), then print the report of the whole file.
    Under a data-parallel launch only the main process shows progress and the report."""
    from apar_spec.experiments.parallel import Processes

    err = stdout_console(stderr=True)
    if not Processes.current(settings.device).is_main:
        run(None)  # its rows go to its shard; the main process merges them and reports
        return
    if err.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       TextColumn("{task.description}"), console=err, transient=True)
        task = bar.add_task("loading models…", total=None)

        def progress(event) -> None:
            desc = "" if event.row is None else f"{event.row['variant']} · {event.row['prompt_id']} · {event.row['tokens_per_s']:.1f} tok/s"
            bar.update(task, completed=event.done, total=event.total, description=desc)

        with bar:
            result = run(progress)
    else:

        def progress(event) -> None:
            if event.row is not None:
                r = event.row
                err.print(f"[{event.done}/{event.total}] {r['variant']} {r['prompt_id']} r{r['repeat']}: "
                          f"{r['tokens']} tokens, {r['tokens_per_s']:.1f} tok/s", markup=False)

        result = run(progress)
    for note in result.notes:
        err.print(f"note: {note}", markup=False)
    summary = _print_report(settings.out, as_json) if result.written or result.skipped else None
    msg = f"{result.written} new row(s) in {result.out}" + (f" ({result.skipped} kept from before)" if result.skipped else "")
    if result.interrupted:
        err.print(f"Interrupted: {msg}; rerun with --resume to finish.", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    err.print(msg, markup=False)
    if strict and summary is not None:
        _check_strict(summary)


def _check_strict(summary) -> None:
    """``--strict``: a lossless 'bug' (see experiments/report.py) fails the command, the rows kept."""
    from apar_spec.experiments.report import ALL

    bugs = [(v.variant, v.lossless) for v in summary.groups[ALL] if v.lossless and v.lossless.bugs]
    if bugs:
        fail("lossless check failed: " + "; ".join(f"{name} differs from {ll.reference} on {ll.bugs} prompt(s) by more "
                                                   "than a near-tie" for name, ll in bugs) + " (see the report above)")


@app.command()
@handle_errors
def bench(
    target: Target = _bench_default("target"),
    base: Base = None,
    draft: Annotated[Optional[str], typer.Option("--draft", help="Draft: registry name (see `apar-spec drafts list`), model path, or a union 'a+b:8' (b adds an 8-token chain to a's tree). Default: tiny-draft for embedded targets, else ngram.")] = None,
    modes: Modes = None,
    prompts: Prompts = _bench_default("prompts"),
    category: Category = None,
    limit: Limit = None,
    per_category: PerCategory = None,
    turn: Turn = _bench_default("turn"),
    max_new_tokens: MaxNew = _bench_default("max_new_tokens"),
    max_depth: MaxDepth = None,
    depth_cap: DepthCap = None,
    fork_bias: ForkBias = None,
    repeated_title: RepeatedTitle = None,
    fork_gate: ForkGate = None,
    max_branch_tokens: MaxBranch = None,
    k: Annotated[str, typer.Option("-k", help="Draft tokens per branch per step (spec, apar+spec, hf-assisted), or 'auto' (the cost model picks).")] = str(_bench_default("k")),
    tree: Annotated[Optional[str], typer.Option("--tree", help="Draft tree per branch for spec/apar+spec: K, chain:K, topk:WxD or a JSON path list.")] = None,
    max_step_tokens: Annotated[Optional[int], typer.Option("--max-step-tokens", help="Cap on the tokens one target forward takes (pending + drafts over all live branches; spec/apar+spec). Default: no cap.")] = None,
    temperature: Temperature = _bench_default("temperature"),
    seed: Seed = _bench_default("seed"),
    repeats: Repeats = _bench_default("repeats"),
    warmup: Warmup = _bench_default("warmup"),
    dtype: Dtype = None,
    device: Device = _bench_default("device"),
    device_map: DeviceMap = None,
    threads: Threads = None,
    chat_template: ChatTemplate = None,
    out: Out = _bench_default("out"),
    resume: Resume = False,
    overwrite: Overwrite = False,
    as_json: AsJson = False,
    strict: Strict = False,
) -> None:
    """Compare configurations on a prompt set (defaults: the embedded models, offline)."""
    from apar_spec.experiments.bench import compare

    _quiet_transformers()
    settings = _settings(
        target=target, base=base, draft=draft, modes=modes, prompts=prompts, category=category, limit=limit, turn=turn,
        per_category=per_category, max_new_tokens=max_new_tokens, k=_k_option(k), tree=tree, max_step_tokens=max_step_tokens, max_depth=max_depth, depth_cap=depth_cap, fork_bias=fork_bias, repeated_title=repeated_title, fork_gate=fork_gate, max_branch_tokens=max_branch_tokens, temperature=temperature, seed=seed, repeats=repeats,
        warmup=warmup, dtype=dtype, device=device, device_map=device_map, threads=threads, chat_template=chat_template,
        out=out, resume=resume, overwrite=overwrite,
    )
    _run_with_progress(lambda progress: compare(settings, progress=progress), settings, as_json, strict)


def _k_option(k: str) -> int | str:
    """``-k``: an integer or 'auto'."""
    if k.strip() == "auto":
        return "auto"
    try:
        return int(k)
    except ValueError:
        fail(f"-k must be >= 1 (an integer) or 'auto' (got '{k}')")


def _csv(value: str, what: str, cast=str) -> list:
    try:
        items = [cast(x.strip()) for x in value.split(",") if x.strip()]
    except ValueError:
        fail(f"{what} must be a comma-separated list, got '{value}'")
    if not items:
        fail(f"{what} is empty")
    return items


@app.command()
@handle_errors
def sweep(
    drafts: Annotated[str, typer.Option("--drafts", help="Comma-separated drafts (registry names, paths or unions such as 'smollm2-hydra+ngram:8').")] = "ngram",
    ks: Annotated[str, typer.Option("--ks", help="Comma-separated draft lengths ('' = none).")] = "1,2,4,8",
    trees: Annotated[str, typer.Option("--trees", help="Semicolon-separated draft tree shapes, e.g. 'topk:2x3;[[0],[1],[0,0]]'.")] = "",
    step_caps: Annotated[str, typer.Option("--step-caps", help="Comma-separated caps on the tokens one target forward takes, 'none' = no cap, e.g. 'none,8,12'.")] = "none",
    target: Target = _bench_default("target"),
    base: Base = None,
    modes: Annotated[Optional[str], typer.Option("--modes", help="Configurations; draft ones (spec, apar+spec, hf-assisted) are swept. Default: all.")] = None,
    prompts: Prompts = _bench_default("prompts"),
    category: Category = None,
    limit: Limit = None,
    per_category: PerCategory = None,
    turn: Turn = _bench_default("turn"),
    max_new_tokens: MaxNew = _bench_default("max_new_tokens"),
    max_depth: MaxDepth = None,
    depth_cap: DepthCap = None,
    fork_bias: ForkBias = None,
    repeated_title: RepeatedTitle = None,
    fork_gate: ForkGate = None,
    max_branch_tokens: MaxBranch = None,
    temperature: Temperature = _bench_default("temperature"),
    seed: Seed = _bench_default("seed"),
    repeats: Repeats = _bench_default("repeats"),
    warmup: Warmup = _bench_default("warmup"),
    dtype: Dtype = None,
    device: Device = _bench_default("device"),
    device_map: DeviceMap = None,
    threads: Threads = None,
    chat_template: ChatTemplate = None,
    out: Out = Path("sweep.jsonl"),
    resume: Resume = False,
    overwrite: Overwrite = False,
    as_json: AsJson = False,
    strict: Strict = False,
) -> None:
    """Sweep draft length k, draft tree shape and draft choice, next to the ar/apar/hf-generate baselines."""
    from apar_spec.experiments.bench import sweep as run_sweep

    _quiet_transformers()
    draft_list = _csv(drafts, "--drafts")
    k_list = _csv(ks, "--ks", int) if ks.strip() or not trees.strip() else []
    tree_list = [t.strip() for t in trees.split(";") if t.strip()]
    cap_list = _csv(step_caps, "--step-caps", lambda x: None if x.lower() == "none" else int(x))
    settings = _settings(
        target=target, base=base, draft=draft_list[0], modes=modes, prompts=prompts, category=category, limit=limit,
        per_category=per_category, turn=turn, max_new_tokens=max_new_tokens, max_depth=max_depth, depth_cap=depth_cap, fork_bias=fork_bias, repeated_title=repeated_title, fork_gate=fork_gate, max_branch_tokens=max_branch_tokens, k=max(k_list, default=_bench_default("k")), temperature=temperature,
        seed=seed, repeats=repeats, warmup=warmup, dtype=dtype, device=device, device_map=device_map, threads=threads,
        chat_template=chat_template, out=out, resume=resume, overwrite=overwrite,
    )
    _run_with_progress(lambda progress: run_sweep(settings, drafts=draft_list, ks=k_list, trees=tree_list, step_caps=cap_list, progress=progress), settings, as_json, strict)


@app.command()
@handle_errors
def report(
    results: Annotated[Path, typer.Argument(help="A results file written by `apar-spec bench` or `sweep`.")],
    as_json: AsJson = False,
    strict: Strict = False,
) -> None:
    """Summarise a results file: speed-ups, steps, acceptance, KV, lossless checks."""
    summary = _print_report(results, as_json)
    if strict:
        _check_strict(summary)


def _print_report(results: Path, as_json: bool):
    from apar_spec.experiments.bench import read_rows
    from apar_spec.experiments.report import render, summarize

    summary = summarize(read_rows(results))
    if as_json:
        print_json(summary.to_dict())
    else:
        render(summary, stdout_console())
    return summary


# ------------------------------------------------------------------ data and training


def _convert_default(name: str) -> Any:
    from apar_spec.restructure import convert_file

    return _default(convert_file, name)


@app.command()
@handle_errors
def convert(
    input: Annotated[Path, typer.Argument(help="JSONL with prompt/answer or ShareGPT 'conversations' rows.")],
    output: Annotated[Path, typer.Argument(help="Where the APAR-restructured rows go (JSONL).")],
    max_depth: Annotated[int, typer.Option("--max-depth", help="Fork nesting depth to restructure.")] = _convert_default("max_depth"),
    whole_lead: Annotated[int, typer.Option(
        "--whole-lead", help="Paragraph answers: keep the first N forkable paragraphs whole in the parent (0: the paper's rule).")
    ] = _convert_default("whole_lead"),
    as_json: AsJson = False,
) -> None:
    """Restructure answers into APAR trees. Bad rows are reported, not fatal."""
    from apar_spec.restructure import convert_file

    rep = convert_file(input, output, max_depth=max_depth, whole_lead=whole_lead)
    if as_json:
        print_json(dataclasses.asdict(rep))
        return
    console = stdout_console()
    console.print(f"read {rep.rows_read} rows, wrote {rep.rows_written} to {output}: "
                  f"{rep.structured} structured, {rep.unstructured} unstructured, {len(rep.bad_rows)} bad", markup=False)
    for line, reason in rep.bad_rows:
        console.print(f"  line {line}: {reason}", markup=False)


def _train_default(name: str) -> Any:
    from apar_spec.train import train as train_fn

    return _default(train_fn, name)


@app.command()
@handle_errors
def train(
    model: Annotated[str, typer.Option("--model", help="Model to fine-tune: embedded name, local path or cached HF id.")],
    data: Annotated[Path, typer.Option("--data", help="JSONL: prompt/answer rows, ShareGPT rows, or `apar-spec convert` output.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the trained model (safetensors).")],
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")],
    batch_size: Annotated[int, typer.Option("--batch-size")] = _train_default("batch_size"),
    lr: Annotated[float, typer.Option("--lr")] = _train_default("lr"),
    seed: Annotated[int, typer.Option("--seed")] = _train_default("seed"),
    mode: Annotated[str, typer.Option("--mode", help="apar (answer trees) or plain (sequential answers).")] = _train_default("mode"),
    max_len: Annotated[int, typer.Option("--max-len")] = _train_default("max_len"),
    max_depth: Annotated[int, typer.Option("--max-depth")] = _train_default("max_depth"),
    mix_ratio: Annotated[float, typer.Option("--mix-ratio", help="Share of structured examples per batch.")] = _train_default("mix_ratio"),
    mixed_precision: Annotated[str, typer.Option("--mixed-precision", help="no, fp16 or bf16 (accelerate).")] = _train_default("mixed_precision"),
    save_every: Annotated[int, typer.Option("--save-every")] = _train_default("save_every"),
    distill: Annotated[float, typer.Option("--distill", help="0-1: weight of KL to the starting model's own distribution at ordinary nodes (keeps a pretrained model's wording; [Fork]/EOS nodes learn from the labels).")] = _train_default("distill"),
    distill_hard_roots: Annotated[Optional[str], typer.Option("--distill-hard-roots", help="With --distill: root branches that learn from the labels only: 'forked' (answers with forks: their structure) or 'all' (only children learn from the teacher).")] = _train_default("distill_hard_roots"),
    root_eos: Annotated[float, typer.Option("--root-eos", help=">= 0: weight of a term against EOS at root nodes that go on (children's EOS after a paragraph otherwise teaches roots to stop early).")] = _train_default("root_eos"),
    root_eos_lead_only: Annotated[bool, typer.Option("--root-eos-lead-only", help="With --root-eos: only the root's nodes before its first [Fork].")] = _train_default("root_eos_lead_only"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from out/checkpoint.")] = False,
    router: Annotated[bool, typer.Option("--router", help="Then fit a fork router on the same data (as `apar-spec fit-router` does, its defaults) and save it with the model: prompts it scores as wanting one short answer never fork.")] = False,
    as_json: AsJson = False,
) -> None:
    """Fine-tune a model into APAR form (or train a plain base) with accelerate."""
    from apar_spec.loading import EMBEDDED, embedded_dir
    from apar_spec.train import train as train_fn

    _quiet_transformers()
    if router and mode != "apar":
        fail("--router needs --mode apar: a router decides which prompts may fork")
    if router:  # the router's labels, checked before hours of training rather than after
        from apar_spec.train import read_examples

        forked = [ex.structured for ex in read_examples(data)]
        if all(forked) or not any(forked):
            fail(f"--router needs answers with forks and answers without in {data} ({sum(forked)} of {len(forked)} fork): "
                 "a router learns which prompts get which; drop --router or add the other kind")
    source = str(embedded_dir(model)) if model in EMBEDDED else model
    rep = train_fn(
        source, data, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, mode=mode, max_len=max_len,
        max_depth=max_depth, mix_ratio=mix_ratio, mixed_precision=mixed_precision, save_every=save_every,
        distill=distill, distill_hard_roots=distill_hard_roots, root_eos=root_eos, root_eos_lead_only=root_eos_lead_only, resume=resume, progress=stdout_console().is_terminal and not as_json,
    )
    fit = None
    if router:
        from apar_spec.router import fit_router_into

        fit = fit_router_into(rep.out_dir, data)
    if as_json:
        print_json({**dataclasses.asdict(rep), **({"router": dataclasses.asdict(fit)} if fit else {})})
        return
    stdout_console().print(
        f"trained {rep.steps} steps ({rep.num_examples} examples, {rep.num_structured} structured) in "
        f"{rep.wall_time_s:.1f}s; final loss {rep.final_loss:.4f}; saved to {rep.out_dir}", markup=False
    )
    if fit:
        stdout_console().print(_router_line(fit), markup=False)


def _router_default(name: str) -> Any:
    from apar_spec.router import fit_router_into

    return _default(fit_router_into, name)


@app.command("fit-router")
@handle_errors
def fit_router_command(
    model: Annotated[Path, typer.Option("--model", help="A local APAR model folder (the router goes into its config.json) or an APAR adapter folder (router.json).")],
    data: Annotated[Path, typer.Option("--data", help="JSONL as `apar-spec train` reads it: a prompt whose answer forks counts as wanting a forked answer.")],
    threshold: Annotated[float, typer.Option("--threshold", help="Prompts scored under this p(list) decode without forks.")] = _router_default("threshold"),
    l2: Annotated[float, typer.Option("--l2", help="L2 weight of the logistic regression (on standardised states).")] = _router_default("l2"),
    check: Annotated[Optional[Path], typer.Option("--check", help="Held-out data in the same format: reported, not fitted on.")] = None,
    threads: Threads = None,
    as_json: AsJson = False,
) -> None:
    """Fit a fork router for an APAR model: prompts it scores as wanting one short answer never fork."""
    import torch

    from apar_spec.router import fit_router_into

    if threads:
        torch.set_num_threads(threads)
    _quiet_transformers()
    fit = fit_router_into(model, data, threshold=threshold, l2=l2, check=check)
    if as_json:
        print_json(dataclasses.asdict(fit))
        return
    stdout_console().print(_router_line(fit), markup=False)


def _router_line(fit) -> str:
    """One line: where a fitted router went and how it splits the labelled prompts."""
    line = (f"fork router written to {fit.path}: gates {fit.gated_plain} of {fit.prompts - fit.forked} prompts whose answer "
            f"does not fork and {fit.gated_forked} of {fit.forked} whose answer forks (threshold {fit.threshold:g})")
    if fit.check:
        c = fit.check
        line += f"; held out: {c['gated_plain']} of {c['prompts'] - c['forked']} and {c['gated_forked']} of {c['forked']}"
    return line


# ------------------------------------------------------------------ drafts


@drafts_app.command("list")
@handle_errors
def drafts_list(as_json: AsJson = False) -> None:
    """The drafts the registry knows (built-in and from your drafts.json).

    Any two or more combine as a union, 'smollm2-hydra+ngram:8': the first drafts the
    decoder's tree, each later one adds a chain of its own length, one verify pass checks all."""
    from apar_spec.drafts import registry

    entries = registry.entries()
    if as_json:
        print_json([e.to_dict() for e in entries])
        return
    console = stdout_console()

    def acceptance(e) -> str:
        return f"{e.acceptance_length:.2f}" if e.acceptance_length is not None else "-"

    def vocab(e) -> str:  # tokens the draft proposes from (NAME@N overrides; drafts/vocab.py)
        return "-" if e.kind == "ngram" else (str(e.draft_vocab) if e.draft_vocab else "full")

    if not console.is_terminal:  # one line per draft, the table's columns (tab-separated)
        for e in entries:
            fields = (e.name, e.kind, e.weights or "-", ", ".join(e.targets) or "-", vocab(e), acceptance(e), e.source)
            console.print("\t".join(fields), markup=False)
        return
    from rich.table import Table

    table = Table("name", "kind", "weights", "targets", "vocab", "acceptance", "source", header_style="bold")
    for e in entries:
        acc = acceptance(e)
        table.add_row(e.name, e.kind, e.weights or "-", ", ".join(e.targets) or "-", vocab(e), acc, e.source)
    console.print(table)


@drafts_app.command("show")
@handle_errors
def drafts_show(name: Annotated[str, typer.Argument(help="A registry name (or a union such as 'smollm2-hydra+ngram:8').")], as_json: AsJson = False) -> None:
    """Everything the registry records about one draft."""
    from apar_spec.drafts import registry

    entry = registry.lookup(name)
    if as_json:
        print_json(entry.to_dict())
        return
    console = stdout_console()
    for key, value in entry.to_dict().items():
        shown = ", ".join(value) if isinstance(value, list) else value
        console.print(f"{key}: {shown if shown not in (None, '') else '-'}", markup=False)


from .serve import load_bench_command, serve_command  # noqa: E402  (serving commands live in cli/serve.py)

app.command("serve")(serve_command)
app.command("load-bench")(load_bench_command)

from .quality import quality as _quality  # noqa: E402  (own module, registered here)

app.command("quality")(_quality)


def main() -> None:
    """Console-script entry point (``apar-spec``)."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
