"""One short GPU check: the benchmark in bf16 on the embedded models and on any model given.

Jobs: ``embedded`` (tiny-apar / tiny-base / tiny-draft, every configuration),
``embedded-heads`` (the same targets with the tiny-heads Medusa heads and a 7-node draft
tree: no draft forward, so the verify pass is the whole cost - where a GPU should
differ most from a CPU), then one job per model path given.

    python experiments/gpu_check.py OUT_DIR [MODEL_PATH ...]

Writes under ``OUT_DIR``: ``env.json`` (GPU, versions, settings), per benchmark a
results file ``<name>.jsonl`` and its report ``<name>.report.txt`` / ``.report.json``,
and ``summary.txt`` (every report, plus anything that failed). Runs only where CUDA is
present (exit 2 otherwise); CI never runs it.

Why it fits in 5 minutes on one GPU: a global time budget (default 240 s) is split
between the benchmarks still to run; a benchmark that reaches its share stops like a
Ctrl-C (finished rows kept) and its report compares configurations over the prompts
all of them finished, so a cut run still yields honest ratios. Models load once each.

Model paths are benchmarked as their own AR baseline with the n-gram draft (an APAR
model path also gets ``apar``/``apar+spec``). In bf16 the lossless column can show
rare differences that are numerics, not bugs: verification runs several tokens per
forward, whose bf16 kernels round differently from one-token steps, and a near-tie can
flip. The float64 CPU tests are the exactness check; here the column is information.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
from apar_spec.cli.report_view import render
from apar_spec.experiments.bench import RowEvent, compare
from apar_spec.experiments.bench_files import read_rows
from apar_spec.experiments.bench_plan import BenchSettings
from apar_spec.experiments.models import SAME_AS_TARGET
from apar_spec.experiments.report import summarize

from apar_spec.options import DecodeOptions

HEADS_TREE = "[[0],[1],[0,0],[0,0,0],[0,0,0,0],[0,0,0,0,0],[0,0,0,0,0,0]]"  # the tree tiny-heads' card measures


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out_dir", type=Path, help="where results and reports go")
    p.add_argument("models", nargs="*", help="extra model paths (local folders or .gguf files) to benchmark")
    p.add_argument("--budget-s", type=float, default=240.0, help="total time for all benchmarks (default 240)")
    p.add_argument("--max-new-tokens", type=int, default=DecodeOptions.max_new_tokens)
    p.add_argument("--limit", type=int, default=6, help="prompts per benchmark (built-in set, interleaved categories)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda", help="cuda (default); 'cpu' only to smoke-test this script")
    return p.parse_args(argv)


def environment(args: argparse.Namespace) -> dict:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": args.device,
        "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
        "limit": args.limit,
        "repeats": args.repeats,
        "budget_s": args.budget_s,
        "models": args.models,
    }
    if args.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = list(torch.cuda.get_device_capability(0))
    return env


def run_one(name: str, settings: BenchSettings, deadline: float, log) -> str:
    """One benchmark under a deadline; returns its plain-text report (or why there is none)."""
    start = time.perf_counter()

    def progress(event: RowEvent) -> None:
        if event.row is not None:
            r = event.row
            log(
                f"  [{event.done}/{event.total}] {r['variant']} {r['prompt_id']} r{r['repeat']}: "
                f"{r['tokens']} tok, {r['tokens_per_s']:.1f} tok/s"
            )
        if time.perf_counter() > deadline:
            raise KeyboardInterrupt  # the driver stops cleanly and keeps every finished row

    log(f"== {name}: target {settings.target} ({settings.out})")
    result = compare(settings, progress=progress)
    status = "stopped at its time share" if result.interrupted else "complete"
    log(f"   {result.written} rows, {status}, {time.perf_counter() - start:.0f}s; notes: {result.notes or '-'}")
    rows = read_rows(settings.out) if settings.out.is_file() else []
    if not rows:
        return f"{name}: no rows finished\n"
    report = summarize(rows)
    buf = io.StringIO()
    from rich.console import Console

    render(report, Console(file=buf, width=240))
    text = f"{name} ({status}; models: {result.models})\n{buf.getvalue()}"
    settings.out.with_suffix(".report.txt").write_text(text)
    settings.out.with_suffix(".report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("Error: gpu_check needs CUDA and none is available here (CI never runs this script)", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log_file = (args.out_dir / "log.txt").open("w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass
    (args.out_dir / "env.json").write_text(json.dumps(environment(args), indent=2))
    common = dict(
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        repeats=args.repeats,
        warmup=1,
        dtype=args.dtype,
        device=args.device,
        overwrite=True,
    )
    jobs = [
        ("embedded", BenchSettings(out=args.out_dir / "embedded.jsonl", **common)),
        (
            "embedded-heads",
            BenchSettings(
                draft="tiny-heads",
                tree=HEADS_TREE,
                modes=("hf-generate", "ar", "apar", "spec", "apar+spec"),
                out=args.out_dir / "embedded-heads.jsonl",
                **common,
            ),
        ),
    ]
    for i, path in enumerate(args.models, start=1):
        stem = Path(path.rstrip("/")).name.replace(" ", "_") or f"model{i}"
        jobs.append(
            (
                f"model{i}-{stem}",
                BenchSettings(target=path, base=SAME_AS_TARGET, out=args.out_dir / f"model{i}-{stem}.jsonl", **common),
            )
        )
    texts, failures = [], []
    for n, (name, settings) in enumerate(jobs):
        remaining = args.budget_s - (time.perf_counter() - t0)
        deadline = time.perf_counter() + max(remaining, 0.0) / (len(jobs) - n)
        try:
            texts.append(run_one(name, settings, deadline, log))
        except Exception as err:  # one broken model must not cost the others' results
            failures.append(f"{name}: {type(err).__name__}: {err}")
            log(f"   FAILED: {type(err).__name__}: {err}")
            (args.out_dir / f"{name}.error.txt").write_text(traceback.format_exc())
    summary = "\n".join(texts) + ("\nFAILED:\n" + "\n".join(failures) + "\n" if failures else "")
    summary += f"\ntotal {time.perf_counter() - t0:.0f}s\n"
    (args.out_dir / "summary.txt").write_text(summary)
    log(summary)
    log_file.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
