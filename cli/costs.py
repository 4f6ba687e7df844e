"""``apar-spec costs``: measure, show and use the cost model (``apar_spec.costs``).

Thin commands: ``measure`` loads the model(s) and calls ``costs.measure`` under the
same thread count the benchmark uses (1 on CPU unless ``--threads``), then caches the
result; ``show`` lists the cache; ``choose`` prints what ``--tree auto`` / ``-k auto``
would pick, with the best candidates and their predicted speed-ups.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from apar_spec.experiments.bench_plan import BenchSettings

from apar_spec import costs as cost_model

from .errors import handle_errors
from .options import default
from .output import print_json, stdout_console

costs_app = typer.Typer(
    help="The cost model: measured pass costs, predicted speed-ups, auto tree size.", no_args_is_help=True
)

Model = Annotated[str, typer.Option("--model", "-m", help="Target model: embedded name, local path or cached HF id.")]
Draft = Annotated[
    Optional[str],
    typer.Option(
        "--draft", help="Draft LM to measure as well (registry name or path); model-free drafts need nothing."
    ),
]
Dtype = Annotated[
    Optional[str], typer.Option("--dtype", help="float32, bfloat16, float16 (default: as `bench` loads the model).")
]
Device = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or auto.")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads (default: 1 on CPU, as `bench`).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def _progress():
    """Progress lines on stderr (overwritten in place on a terminal)."""
    err = stdout_console(stderr=True)
    if not err.is_terminal:
        return lambda msg: err.print(msg, markup=False, highlight=False)

    def show(msg: str) -> None:
        err.file.write("\r\033[K" + msg)
        err.file.flush()

    return show


def _end_progress() -> None:
    err = stdout_console(stderr=True)
    if err.is_terminal:
        err.file.write("\r\033[K")
        err.file.flush()


def _load_draft_model(name: str, target, dtype, device):
    from apar_spec.drafts import registry

    from apar_spec.models.loading import load

    entry = registry.lookup(name)
    if entry.kind != "model":
        return entry.kind, None
    model, _ = load(entry.weights, dtype=dtype or target.dtype, device=device)
    return "model", model


@costs_app.command("measure")
@handle_errors
def measure(
    model: Model = default(BenchSettings, "target"),
    draft: Draft = None,
    dtype: Dtype = None,
    device: Device = None,
    threads: Threads = None,
    repeats: Annotated[
        int, typer.Option("--repeats", help="Timed rounds per size (each round times every size once).")
    ] = default(cost_model.measure, "repeats"),
    as_json: AsJson = False,
) -> None:
    """Measure a model's (and a draft's) costs now and cache them, replacing older ones."""
    from apar_spec.experiments.bench import torch_threads

    from apar_spec import costs as cm
    from apar_spec.models.loading import load

    from .output import quiet_transformers

    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1 (got {repeats})")
    quiet_transformers()
    target, tokenizer = load(model, dtype=dtype, device=device)
    todo = [(model, target, True)]
    if draft:
        kind, dm = _load_draft_model(draft, target, dtype, device)
        if dm is not None:
            todo.append((draft, dm, False))
    say = _progress()
    with torch_threads(threads, str(target.device)) as used:
        measured = [
            cm.measure(m, name, threads=used, repeats=repeats, with_heads=heads, tokenizer=tokenizer, progress=say)
            for name, m, heads in todo
        ]
        if len(todo) == 2:  # a draft LM: what switching between the two models costs, and its own Python work
            measured[0].switch[measured[1].key.fingerprint] = cm.measure_switch(
                target,
                todo[1][1],
                repeats=repeats,
                progress=say,
                label=model,
                target_costs=measured[0],
                draft_costs=measured[1],
                tokenizer=tokenizer,
            )
        saved = [(cm.save(c), c) for c in measured]
    _end_progress()
    if as_json:
        print_json([{"path": str(p), **c.to_dict()} for p, c in saved])
        return
    _print_costs([(p, c, None) for p, c in saved])


@costs_app.command("show")
@handle_errors
def show(as_json: AsJson = False) -> None:
    """Every cached cost file: model, setup, pass costs at a few sizes, overheads."""
    from apar_spec import costs as cm

    found = cm.all_costs()
    if as_json:
        print_json([{"path": str(p), **(c.to_dict() if c else {"error": e})} for p, c, e in found])
        return
    if not found:
        stdout_console().print(
            f"no cached costs in {cm.cache_dir()}; run `apar-spec costs measure --model NAME`", markup=False
        )
        return
    _print_costs(found)


def _print_costs(found) -> None:
    console = stdout_console()
    for path, c, err in found:
        if c is None:
            console.print(f"{path}: {err}", markup=False)
            continue
        k = c.key
        names = ", ".join(c.names or [c.name])
        console.print(
            f"{names}  [{k.dtype}, {k.device}, threads={k.threads}, fingerprint {k.fingerprint}]  {path}", markup=False
        )
        for ctx in c.contexts:
            shown = "  ".join(
                f"n={n}: {c.forward[ctx][n] * 1e3:.2f}" for n in sorted(c.forward[ctx]) if n in (1, 2, 4, 8, 16, 32, 64)
            )
            console.print(f"  pass ms @ {ctx} cached: {shown}", markup=False)
        o = c.overhead
        console.print(
            f"  decoder overhead per step: {o.base * 1e3:.3f} ms + {o.per_branch * 1e3:.3f} ms/branch + "
            f"{o.per_draft * 1e3:.3f} ms/draft",
            markup=False,
        )
        for fp, sw in c.switch.items():
            console.print(
                f"  with draft {fp}: switching +{sw.get('target', 0) * 1e3:.3f} ms on the target's pass, "
                f"+{sw.get('draft', 0) * 1e3:.3f} ms on the draft's; draft Python "
                f"{sw.get('per_pass', 0) * 1e3:.3f} ms per draft pass",
                markup=False,
            )
        if c.heads:
            console.print(
                f"  heads stand-in ({c.num_heads} heads): "
                + "  ".join(f"{n} row(s): {v * 1e3:.3f} ms" for n, v in sorted(c.heads.items())),
                markup=False,
            )
        console.print(
            f"  measured {c.measured_at} ({', '.join(f'{a} {b}' for a, b in c.versions.items())})", markup=False
        )


@costs_app.command("choose")
@handle_errors
def choose(
    model: Model = default(BenchSettings, "target"),
    draft: Annotated[
        str, typer.Option("--draft", help="Registry name or path of the draft (kind model, ngram or heads).")
    ] = "tiny-draft",
    branches: Annotated[
        float, typer.Option("--branches", help="Live branches per step (APAR answers have several).")
    ] = 1.0,
    acceptance: Annotated[
        Optional[float],
        typer.Option(
            "--acceptance", help="Assumed acceptance length at k=4 (default: the registry's, or a per-kind default)."
        ),
    ] = None,
    chains_only: Annotated[bool, typer.Option("--chains-only", help="Only chains (what -k auto picks).")] = False,
    dtype: Dtype = None,
    device: Device = None,
    threads: Threads = None,
    top: Annotated[int, typer.Option("--top", help="How many candidates to list.")] = 8,
    as_json: AsJson = False,
) -> None:
    """What `--tree auto` (or `-k auto` with --chains-only) picks, and the runners-up."""
    from apar_spec.experiments.bench import torch_threads

    from apar_spec import costs as cm
    from apar_spec.decoding.draft_tree import chain
    from apar_spec.models.loading import load

    from .output import quiet_transformers

    quiet_transformers()
    target_model, tokenizer = load(model, dtype=dtype, device=device)
    kind, draft_model = _load_draft_model(draft, target_model, dtype, device)
    say = _progress()
    with torch_threads(threads, str(target_model.device)):
        target = cm.get_costs(target_model, model, say=say, with_heads=kind == "heads", tokenizer=tokenizer)
        dcosts = cm.get_costs(draft_model, draft, say=say, with_heads=False) if draft_model is not None else None
        if dcosts is not None:
            target = cm.ensure_switch(target, target_model, dcosts, draft_model, say=say, tokenizer=tokenizer)
    _end_progress()
    profile = cm.Profile.from_acceptance_length(acceptance, 4) if acceptance else cm.default_profile(kind, draft)
    cands = [chain(k) for k in range(1, 17)] if chains_only else cm.candidate_shapes(profile, kind)
    ranked = sorted(
        ((cm.predict(target, kind, s, profile, branches, dcosts), s) for s in cands), key=lambda ps: -ps[0].tokens_per_s
    )
    rows = [
        {
            "tree": s.describe(),
            "paths": s.to_json(),
            "nodes": s.size,
            "tokens_per_step": p.tokens_per_step,
            "ms_per_step": p.cost_per_step * 1e3,
            "speedup": p.speedup,
        }
        for p, s in ranked[:top]
    ]
    if as_json:
        print_json({"profile": profile.source, "kind": kind, "branches": branches, "best": rows[0], "candidates": rows})
        return
    console = stdout_console()
    console.print(
        f"{model} + {draft} ({kind}), {branches:g} live branch(es); acceptance: {profile.source}", markup=False
    )
    for r in rows:
        console.print(
            f"  {r['tree']:<16} tokens/step {r['tokens_per_step']:.2f}  {r['ms_per_step']:.2f} ms/step  "
            f"predicted {r['speedup']:.2f}x  {r['paths'] if r['nodes'] <= 12 else ''}",
            markup=False,
        )
