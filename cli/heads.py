"""``apar-spec train-heads``: Medusa-1 draft heads for a frozen target (``apar_spec.drafts.train_heads``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from apar_spec.drafts.train_heads import HeadsTrainConfig

from .errors import handle_errors
from .options import default, model_option, with_groups
from .output import print_json, stdout_console
from .progress import ensure_packaged_base


def read_rows(data: str) -> list[dict]:
    """Rows with a ``prompt`` (and optionally an ``answer``) from a JSONL file, or
    ``corpus:N`` = N training prompts of the embedded corpus generator (seeded)."""
    if data.startswith("corpus:"):
        from apar_spec.training.corpus import make_corpus

        n = data.removeprefix("corpus:")
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--data {data}: write corpus:N with N >= 1, e.g. corpus:400")
        return [{"prompt": ex.prompt} for ex in make_corpus(int(n), seed=7)]
    from apar_spec.jsonl import json_objects

    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f'--data {data}: no such file (a JSONL file of {{"prompt": ...}} rows, or corpus:N)')
    rows = []
    for _, where, row in json_objects(path, path.read_text().splitlines()):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f'{where}: needs a non-empty "prompt" string')
        rows.append(row)
    return rows


@handle_errors
@with_groups
def train_heads(
    model: Annotated[str, model_option("Target model (kept frozen): embedded name, local path or cached HF id.")],
    data: Annotated[
        str, typer.Option("--data", help='JSONL of {"prompt"} rows (an "answer" is used as given), or corpus:N.')
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for heads.safetensors + heads.json (and resumable state).")
    ],
    num_heads: Annotated[int, typer.Option("--heads")] = default(HeadsTrainConfig, "num_heads"),
    kind: Annotated[
        str,
        typer.Option(
            "--kind",
            help="medusa (each head reads the hidden state) or hydra (each head also reads the token before it).",
        ),
    ] = default(HeadsTrainConfig, "kind"),
    width: Annotated[
        int, typer.Option("--width", help="hydra: hidden width of each head (0 = the target's hidden size).")
    ] = default(HeadsTrainConfig, "width"),
    steps: Annotated[int, typer.Option("--steps")] = default(HeadsTrainConfig, "steps"),
    batch_size: Annotated[int, typer.Option("--batch-size", help="Positions per step.")] = default(
        HeadsTrainConfig, "batch_size"
    ),
    lr: Annotated[float, typer.Option("--lr")] = default(HeadsTrainConfig, "lr"),
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Per distilled answer.")] = default(
        HeadsTrainConfig, "max_new_tokens"
    ),
    seed: Annotated[int, typer.Option("--seed")] = default(HeadsTrainConfig, "seed"),
    mode: Annotated[
        str, typer.Option("--mode", help="Distil answers in apar or ar mode (auto: apar iff the tokenizer has [Fork]).")
    ] = default(HeadsTrainConfig, "mode"),
    vocab: Annotated[
        int,
        typer.Option(
            "--vocab", help="Train against the N most frequent tokens only (what NAME@N drafts from; 0 = every token)."
        ),
    ] = 0,
    vocab_from: Annotated[
        Path | None,
        typer.Option(
            "--vocab-from",
            help="Folder holding the token ranking vocab.json "
            "(default: the parent of --out, where the registry looks).",
        ),
    ] = None,
    threads: Annotated[int, typer.Option("--threads", help="torch CPU threads (0 = leave as is).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Self-distill draft heads (Medusa-1 or Hydra) for a frozen target; re-run with the same --out to resume."""
    import torch
    from apar_spec.drafts.train_heads import train_heads as train_fn

    from apar_spec.models.loading import load

    if threads > 0:
        torch.set_num_threads(threads)
    cfg = HeadsTrainConfig(
        num_heads=num_heads,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        max_new_tokens=max_new_tokens,
        seed=seed,
        mode=mode,
        kind=kind,
        width=width,
    )
    rows = read_rows(data)
    ranking_dir = vocab_from or out.parent
    if vocab < 0:
        raise ValueError(f"--vocab must be >= 0 (got {vocab}); 0 trains against every token")
    if vocab and not (ranking_dir / "vocab.json").is_file():
        raise ValueError(
            f"--vocab {vocab} needs a token ranking at {ranking_dir / 'vocab.json'} "
            "(drafts/vocab.py save_ranking); pass --vocab-from FOLDER or drop --vocab"
        )
    ensure_packaged_base(stdout_console(stderr=True), model)  # a first SmolLM2 load says why it waits
    target, tokenizer = load(model)
    from apar_spec.drafts.vocab import load_vocab

    reduced = (
        load_vocab(ranking_dir, vocab or None, target.get_output_embeddings().weight.shape[0], str(out))
        if vocab
        else None
    )
    progress = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not as_json else None
    report = train_fn(target, tokenizer, rows, out, cfg, target_name=model, progress=progress, vocab=reduced)
    if as_json:
        print_json(report)
        return
    stdout_console().print(
        f"trained {report['steps']} steps on {report['positions']} positions in {report['seconds']}s; val loss "
        f"{report['val_loss_start']} -> {report['val_loss']:.3f}; top-1 per head "
        f"{', '.join(f'{a:.2f}' for a in report['val_top1_accuracy'])}; saved to {out}",
        markup=False,
    )
