"""``apar-spec convert``, ``train`` and ``fit-router``: data restructuring, fine-tuning, the fork router.

Thin commands over ``training.restructure.convert_file``, ``training.train.train`` and
``training.router_fit.fit_router_into``; their defaults are read from those signatures.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from apar_spec.options import given
from apar_spec.training.restructure import convert_file
from apar_spec.training.router_fit import fit_router_into
from apar_spec.training.train import train as train_fn

from .errors import fail, handle_errors
from .options import AsJson, Threads, default
from .output import print_json, quiet_transformers, stdout_console
from .progress import ensure_packaged_base, train_progress


@handle_errors
def convert(
    input: Annotated[Path, typer.Argument(help="JSONL with prompt/answer or ShareGPT 'conversations' rows.")],
    output: Annotated[Path, typer.Argument(help="Where the APAR-restructured rows go (JSONL).")],
    max_depth: Annotated[int, typer.Option("--max-depth", help="Fork nesting depth to restructure.")] = default(
        convert_file, "max_depth"
    ),
    whole_lead: Annotated[
        int,
        typer.Option(
            "--whole-lead",
            help="Paragraph answers: keep the first N forkable paragraphs whole in the parent (0: the paper's rule).",
        ),
    ] = default(convert_file, "whole_lead"),
    as_json: AsJson = False,
) -> None:
    """Restructure answers into APAR trees. Bad rows are reported, not fatal."""
    rep = convert_file(input, output, max_depth=max_depth, whole_lead=whole_lead)
    if as_json:
        print_json(dataclasses.asdict(rep))
        return
    console = stdout_console()
    console.print(
        f"read {rep.rows_read} rows, wrote {rep.rows_written} to {output}: "
        f"{rep.structured} structured, {rep.unstructured} unstructured, {len(rep.bad_rows)} bad",
        markup=False,
    )
    for line, reason in rep.bad_rows:
        console.print(f"  line {line}: {reason}", markup=False)


@handle_errors
def train(
    model: Annotated[
        str, typer.Option("--model", help="Model to fine-tune: embedded name, local path or cached HF id.")
    ],
    data: Annotated[
        Path, typer.Option("--data", help="JSONL: prompt/answer rows, ShareGPT rows, or `apar-spec convert` output.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the trained model (safetensors).")],
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")],
    batch_size: Annotated[int, typer.Option("--batch-size")] = default(train_fn, "batch_size"),
    lr: Annotated[float, typer.Option("--lr")] = default(train_fn, "lr"),
    seed: Annotated[int, typer.Option("--seed")] = default(train_fn, "seed"),
    mode: Annotated[str, typer.Option("--mode", help="apar (answer trees) or plain (sequential answers).")] = default(
        train_fn, "mode"
    ),
    max_len: Annotated[int, typer.Option("--max-len")] = default(train_fn, "max_len"),
    max_depth: Annotated[int, typer.Option("--max-depth")] = default(train_fn, "max_depth"),
    mix_ratio: Annotated[float, typer.Option("--mix-ratio", help="Share of structured examples per batch.")] = default(
        train_fn, "mix_ratio"
    ),
    mixed_precision: Annotated[str, typer.Option("--mixed-precision", help="no, fp16 or bf16 (accelerate).")] = default(
        train_fn, "mixed_precision"
    ),
    save_every: Annotated[int, typer.Option("--save-every")] = default(train_fn, "save_every"),
    distill: Annotated[
        float,
        typer.Option(
            "--distill",
            help="0-1: weight of KL to the starting model's own distribution at ordinary nodes (keeps a pretrained "
            "model's wording; [Fork]/EOS nodes learn from the labels).",
        ),
    ] = default(train_fn, "distill"),
    distill_hard_roots: Annotated[
        Optional[str],
        typer.Option(
            "--distill-hard-roots",
            help="With --distill: root branches that learn from the labels only: 'forked' (answers with forks: their "
            "structure) or 'all' (only children learn from the teacher).",
        ),
    ] = default(train_fn, "distill_hard_roots"),
    root_eos: Annotated[
        float,
        typer.Option(
            "--root-eos",
            help=">= 0: weight of a term against EOS at root nodes that go on (children's EOS after a paragraph "
            "otherwise teaches roots to stop early).",
        ),
    ] = default(train_fn, "root_eos"),
    root_eos_lead_only: Annotated[
        bool,
        typer.Option("--root-eos-lead-only", help="With --root-eos: only the root's nodes before its first [Fork]."),
    ] = default(train_fn, "root_eos_lead_only"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from out/checkpoint.")] = default(
        train_fn, "resume"
    ),
    router: Annotated[
        bool,
        typer.Option(
            "--router",
            help="Then fit a fork router on the same data (as `apar-spec fit-router` does, its defaults) and save it "
            "with the model: prompts it scores as wanting one short answer never fork.",
        ),
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Fine-tune a model into APAR form (or train a plain base) with accelerate."""
    from apar_spec.models.loading import EMBEDDED, embedded_dir

    quiet_transformers()
    if router and mode != "apar":
        fail("--router needs --mode apar: a router decides which prompts may fork")
    if router:  # the router's labels, checked before hours of training rather than after
        from apar_spec.training.data import read_examples

        forked = [ex.structured for ex in read_examples(data)]
        if all(forked) or not any(forked):
            fail(
                f"--router needs answers with forks and answers without in {data} ({sum(forked)} of {len(forked)} "
                f"fork): "
                "a router learns which prompts get which; drop --router or add the other kind"
            )
    source = str(embedded_dir(model)) if model in EMBEDDED else model
    with train_progress(stdout_console(stderr=True), out.name) as on_progress:  # a bar on a terminal, else lines
        rep = train_fn(
            source,
            data,
            out,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            mode=mode,
            max_len=max_len,
            max_depth=max_depth,
            mix_ratio=mix_ratio,
            mixed_precision=mixed_precision,
            save_every=save_every,
            resume=resume,
            distill=distill,
            distill_hard_roots=distill_hard_roots,
            root_eos=root_eos,
            root_eos_lead_only=root_eos_lead_only,
            on_progress=None if as_json else on_progress,
        )
    fit = None
    if router:
        fit = fit_router_into(rep.out_dir, data)
    if as_json:
        print_json({**dataclasses.asdict(rep), **given(router=dataclasses.asdict(fit) if fit else None)})
        return
    stdout_console().print(
        f"trained {rep.steps} steps ({rep.num_examples} examples, {rep.num_structured} structured) in "
        f"{rep.wall_time_s:.1f}s; final loss {rep.final_loss:.4f}; saved to {rep.out_dir}",
        markup=False,
    )
    if fit:
        stdout_console().print(_router_line(fit), markup=False)


@handle_errors
def fit_router_command(
    model: Annotated[
        Path,
        typer.Option(
            "--model",
            help="A local APAR model folder (the router goes into its config.json) or an APAR adapter folder "
            "(router.json).",
        ),
    ],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="JSONL as `apar-spec train` reads it: a prompt whose answer forks counts as wanting a forked answer.",
        ),
    ],
    threshold: Annotated[
        float, typer.Option("--threshold", help="Prompts scored under this p(list) decode without forks.")
    ] = default(fit_router_into, "threshold"),
    l2: Annotated[
        float, typer.Option("--l2", help="L2 weight of the logistic regression (on standardised states).")
    ] = default(fit_router_into, "l2"),
    check: Annotated[
        Optional[Path], typer.Option("--check", help="Held-out data in the same format: reported, not fitted on.")
    ] = None,
    threads: Threads = None,
    as_json: AsJson = False,
) -> None:
    """Fit a fork router for an APAR model: prompts it scores as wanting one short answer never fork."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    quiet_transformers()
    ensure_packaged_base(stdout_console(stderr=True), str(model))
    fit = fit_router_into(model, data, threshold=threshold, l2=l2, check=check)
    if as_json:
        print_json(dataclasses.asdict(fit))
        return
    stdout_console().print(_router_line(fit), markup=False)


def _router_line(fit) -> str:
    """One line: where a fitted router went and how it splits the labelled prompts."""
    line = (
        f"fork router written to {fit.path}: gates {fit.gated_plain} of {fit.prompts - fit.forked} prompts whose "
        f"answer "
        f"does not fork and {fit.gated_forked} of {fit.forked} whose answer forks (threshold {fit.threshold:g})"
    )
    if fit.check:
        c = fit.check
        line += (
            f"; held out: {c['gated_plain']} of {c['prompts'] - c['forked']} and {c['gated_forked']} of {c['forked']}"
        )
    return line
