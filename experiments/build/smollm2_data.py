"""Self-distilled answers: SmolLM2 answers our own training prompts, greedily, through our decoder.

    python experiments/build/smollm2_data.py --out /work/smol_runs/answers.jsonl --threads 2

Why self-distillation (as Medusa's): the APAR model is fine-tuned on its base's own
answers, restructured, so it learns *where* to fork without drifting from the base
model's distribution -- the quality guard (NLL under the base) then measures only what
the restructuring changed.

Resumable: rows are appended to the JSONL file as each batch finishes; a rerun skips
the ids already there (a half-written last line from a crash is dropped). Prompts are
sorted by kind, then by length, so a batch holds prompts of similar answer lengths.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from apar_spec.experiments.build.smollm2_prompts import TrainPrompt, training_prompts

MAX_NEW_TOKENS = {"list": 320, "short": 128}


def chat_ids(tokenizer, text: str) -> list[int]:
    """The prompt as the instruct model expects it: its chat template, generation prompt added."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def done_ids(path: Path) -> set[str]:
    """Ids already answered; a torn last line (crash mid-write) is cut off so appends stay valid JSONL."""
    if not path.is_file():
        return set()
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
    ids = set()
    for line in raw.decode("utf-8").splitlines():
        if line.strip():
            ids.add(json.loads(line)["id"])
    return ids


def _interleaved_batches(todo: list[TrainPrompt], batch_size: int) -> list[list[TrainPrompt]]:
    """Batches of one kind each, the kinds interleaved in proportion and the prompts in a seeded
    shuffle, so that any prefix of the run (a run stopped early) is a balanced sample."""
    import random

    by_kind: dict[str, list[list[TrainPrompt]]] = {}
    for kind in sorted({p.kind for p in todo}):
        ps = [p for p in todo if p.kind == kind]
        random.Random(1).shuffle(ps)
        by_kind[kind] = [ps[i : i + batch_size] for i in range(0, len(ps), batch_size)]
    total = sum(len(b) for b in by_kind.values())
    # each batch gets a fractional position (i + 0.5) / n within its kind; merge by that position
    keyed = [((i + 0.5) / len(bs), kind, b) for kind, bs in by_kind.items() for i, b in enumerate(bs)]
    assert len(keyed) == total
    return [b for _, _, b in sorted(keyed, key=lambda x: (x[0], x[1]))]


def generate_answers(
    out: Path, *, batch_size: int = 16, dtype: str = "bfloat16", limit: int | None = None, progress: bool = True
) -> Path:
    """Answer every training prompt not yet in ``out``; returns ``out``."""
    import apar_spec

    prompts: list[TrainPrompt] = training_prompts()
    if limit is not None:
        prompts = prompts[:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(out)
    todo = [p for p in prompts if p.id not in done]
    if not todo:
        print(f"all {len(prompts)} answers already in {out}")
        return out
    model, tokenizer = apar_spec.load("smollm2", dtype=dtype)
    ids = {p.id: chat_ids(tokenizer, p.text) for p in todo}
    batches = _interleaved_batches(todo, batch_size)

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]answers[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not progress,
    )
    t0, tokens = time.perf_counter(), 0
    with bar, out.open("a", encoding="utf-8") as f:
        task = bar.add_task("gen", total=len(prompts), completed=len(prompts) - len(todo), rate="")
        for batch in batches:
            kind = batch[0].kind
            gens = apar_spec.generate(
                model,
                tokenizer,
                [ids[p.id] for p in batch],
                mode="ar",
                max_new_tokens=MAX_NEW_TOKENS[kind],
                batch_size=len(batch),
            )
            for p, g in zip(batch, gens):
                finish = g.branches[0].finish
                row = {
                    "id": p.id,
                    "kind": p.kind,
                    "style": p.style,
                    "prompt": p.text,
                    "answer": g.text.strip(),
                    "tokens": len(g.token_ids),
                    "finish": finish,
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                tokens += len(g.token_ids)
            f.flush()
            rate = tokens / (time.perf_counter() - t0)
            bar.update(task, advance=len(batch), rate=f"{rate:.0f} tok/s")
    print(f"wrote {out} ({tokens} new tokens, {time.perf_counter() - t0:.0f}s)")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("smol_runs/answers.jsonl"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    generate_answers(args.out, batch_size=args.batch_size, dtype=args.dtype, limit=args.limit)


if __name__ == "__main__":
    main()
