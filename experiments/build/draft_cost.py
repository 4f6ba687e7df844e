"""What drafting costs per step: the time inside ``propose`` for several drafts, side by side.

Why a separate driver: wall time per token mixes the draft's cost with how much it
saves, and in bfloat16 the outputs (hence branch counts) of two configurations may
differ, so a reduced draft vocabulary (``NAME@N``) is best judged by its own cost.
Every draft decodes the same prompts with ``apar+spec`` (or ``spec``); each call to
``propose`` is timed, and the table gives the median milliseconds per call, per
drafted token, and the target's median step time for scale.

    python experiments/build/draft_cost.py --target smollm2-apar \
        --drafts smollm2-heads,smollm2-heads@8192,smollm2-draft,smollm2-draft@8192
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class TimedSpeculator:
    """Forwards everything to a speculator and times its ``propose`` calls."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[float] = []
        self.drafted = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def propose(self, views, sampling):
        t0 = time.perf_counter()
        proposal = self.inner.propose(views, sampling)
        self.calls.append(time.perf_counter() - t0)
        self.drafted += sum(len(d) for d in proposal.tokens)
        return proposal


def measure(
    target: str,
    drafts: list[str],
    prompts: list[str],
    *,
    mode: str,
    k: int,
    max_new_tokens: int,
    dtype: str,
    repeats: int,
) -> list[dict]:
    from apar_spec.drafts import resolve_speculator
    from apar_spec.experiments.models import Loaded, encode_prompt

    import apar_spec

    model, tok = apar_spec.load(target, dtype=dtype)
    ids = [encode_prompt(Loaded(target, model, tok), p) for p in prompts]
    rows = []
    for rep in range(repeats + 1):  # round 0 warms up
        for name in drafts:
            spec = TimedSpeculator(resolve_speculator(name, model, tok))
            steps: list[float] = []
            last = [time.perf_counter()]

            def on_step(live, tc, steps=steps, last=last):  # bound now: runs within this iteration
                now = time.perf_counter()
                steps.append(now - last[0])
                last[0] = now

            for p in ids:
                last[0] = time.perf_counter()
                apar_spec.generate(
                    model,
                    tok,
                    [p],
                    mode=mode,
                    draft=spec,
                    num_draft_tokens=k,
                    max_new_tokens=max_new_tokens,
                    on_step=on_step,
                )
            if rep:
                rows.append(
                    {
                        "draft": name,
                        "repeat": rep,
                        "propose_ms": 1e3 * statistics.median(spec.calls),
                        "per_drafted_ms": 1e3 * sum(spec.calls) / max(1, spec.drafted),
                        "step_ms": 1e3 * statistics.median(steps),
                        "calls": len(spec.calls),
                    }
                )
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="smollm2-apar")
    ap.add_argument("--drafts", default="smollm2-heads,smollm2-heads@8192,smollm2-draft,smollm2-draft@8192")
    ap.add_argument("--mode", default="apar+spec", choices=("spec", "apar+spec"))
    ap.add_argument("-k", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = ["How can I improve my time management skills?", "What are the benefits of regular exercise?"]
    rows = measure(
        args.target,
        [d.strip() for d in args.drafts.split(",") if d.strip()],
        prompts,
        mode=args.mode,
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        repeats=args.repeats,
    )
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "draft",
        "propose ms (median)",
        "ms per drafted token",
        "target step ms (median)",
        title=f"{args.target}, {args.mode}, k={args.k}, {args.dtype}, {args.threads} threads, "
        f"median of {args.repeats} rounds",
        header_style="bold",
    )
    table.columns[0].no_wrap = True  # draft names such as smollm2-heads@8192 stay whole
    for name in dict.fromkeys(r["draft"] for r in rows):
        mine = [r for r in rows if r["draft"] == name]
        table.add_row(
            name,
            *(f"{statistics.median(r[key] for r in mine):.2f}" for key in ("propose_ms", "per_drafted_ms", "step_ms")),
        )
    Console().print(table)


if __name__ == "__main__":
    main()
