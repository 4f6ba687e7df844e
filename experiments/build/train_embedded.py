"""Retrain the embedded model trio from scratch: tiny-base, tiny-apar, tiny-draft.

    python experiments/build/train_embedded.py --threads 1   # full run: 35 min on a shared 2-core CPU
    python experiments/build/train_embedded.py --quick        # end-to-end dry run in ~1 min (weights not usable)

(``--threads 1`` when other jobs share the two cores: with two threads each step
waited on a busy core and ran 3x slower; on an idle machine the default 2 is fine.)
The committed models came from the first command: tiny-base 18.1 min, tiny-apar
9.8 min, tiny-draft 7.0 min; held-out check: tiny-apar forks on 20/20 list and 0/20
no-fork prompts, 20/20 reassembled lists well-formed with the asked item count.

Why these three (DESIGN.md, "Models"): the paper compares APAR-7B against its own
Vicuna base, so the fair AR baseline here is a base model trained on the *same*
corpus in plain sequential form; tiny-apar is that base fine-tuned on the corpus
restructured into APAR trees (mixed 0.5/0.5 with unstructured examples, as in the
paper); tiny-draft is a much smaller model with the same tokenizer.

The draft must serve both targets, so its unstructured half holds the sequential
form of *every* answer (what tiny-base writes) while its structured half holds the
APAR trees (what tiny-apar writes). Inside a branch the context already shows which
form is being written (``[Fork]``/``[Child]`` tokens), so the mix only blurs the
draft's first fork decision, which the target decides anyway.

One deliberate change to the corpus: list items are put in their topic's canonical
title order (:func:`canonical_list_order`). The corpus draws a random subset of a
topic's titles in random order, so the next title is uniform over the unused ones;
a 4M-parameter model trained for minutes learns that only weakly, and under greedy
decoding it then repeats its favourite title (measured: 3/20 held-out lists
well-formed). In canonical order the most likely next title is simply the one after
the previous one, which greedy decoding follows without repeats. Base and APAR models
see the same reordered answers, so the comparison stays fair.

Everything is seeded; the corpus comes from ``apar_spec.training.corpus.make_corpus``. Final
weights are stored in bfloat16 (the package stays small); ``apar_spec.load`` upcasts
embedded models to float32. Each model's build facts (size, data, steps, loss, wall time)
go to ``experiments/build/logs/<YYYY-MM-DD>-<model>-build.md`` (``--logs``); a build never
writes the model cards (``apar_spec/models/tiny-*/README.md``, kept by hand) and keeps them
when it replaces the weights.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from apar_spec.decoding.answer_tree import AnswerTree
from apar_spec.decoding.tokens import find_apar_tokens
from apar_spec.training.corpus import TOPICS, Example, make_corpus, write_jsonl
from apar_spec.training.restructure import convert_file
from apar_spec.training.tokenizer import build_tokenizer, format_prompt
from apar_spec.training.train import TrainProgress, TrainReport, train

MODELS_DIR = Path(__file__).resolve().parents[2] / "apar_spec" / "models"
LOGS_DIR = Path(__file__).resolve().parent / "logs"  # the build facts (never the model cards)


def print_progress(event: TrainProgress) -> None:
    """The loop's notes (a resume, every ``log_every`` steps) as lines: a script may print, the library does not."""
    if event.message:
        print(event.message, flush=True)


@dataclass
class Plan:
    """Corpus size and optimisation settings; ``--quick`` shrinks everything."""

    corpus_size: int = 6000
    vocab_size: int = 2048
    batch_size: int = 16
    max_len: int = 512
    base_steps: int = 1200
    base_lr: float = 2e-3
    apar_steps: int = 1000
    apar_lr: float = 1e-3
    draft_steps: int = 2000
    draft_lr: float = 3e-3

    @classmethod
    def quick(cls) -> Plan:
        return cls(corpus_size=300, base_steps=20, apar_steps=20, draft_steps=20)


_ITEM_LINE = re.compile(r"(\d+)\. ([^:\n]+):(.*)")
_TITLE_RANK = {t.key: {title: k for k, title in enumerate(t.titles)} for t in TOPICS}


def canonical_list_order(ex: Example) -> Example:
    """A list answer with its ``N. Title: details`` lines sorted by the topic's title order and renumbered.

    Only the item lines move (each with its own details); intro and outro stay put.
    Other kinds, and lists whose titles are not the topic's, are returned unchanged.
    """
    ranks = _TITLE_RANK.get(ex.topic)
    if ex.kind != "list" or ranks is None:
        return ex
    lines = ex.answer.split("\n")
    at = [i for i, line in enumerate(lines) if _ITEM_LINE.fullmatch(line)]
    items = [_ITEM_LINE.fullmatch(lines[i]) for i in at]
    if any(m.group(2) not in ranks for m in items):
        return ex
    for n, (i, m) in enumerate(zip(at, sorted(items, key=lambda m: ranks[m.group(2)])), start=1):
        lines[i] = f"{n}. {m.group(2)}:{m.group(3)}"
    return replace(ex, answer="\n".join(lines))


def _llama_config(vocab_size: int, hidden: int, intermediate: int, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )


def base_config(vocab_size: int):
    return _llama_config(vocab_size, hidden=256, intermediate=704, layers=4)


def draft_config(vocab_size: int):
    return _llama_config(vocab_size, hidden=128, intermediate=320, layers=2)


def non_embedding_parameters(model) -> int:
    """Parameters outside the (tied) token embedding: the size that sets a draft's cost."""
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def write_build_log(
    logs: Path,
    name: str,
    purpose: str,
    model,
    report: TrainReport,
    batch: int,
    data: str,
    threads: int,
    date: str | None = None,
) -> Path:
    """The build's facts (what it is, how big, on what and how long it was trained) as
    ``logs/<YYYY-MM-DD>-<name>-build.md``; returns the file.

    Never the model card: ``README.md`` next to the weights is a short card kept by hand, so a
    rebuild cannot undo it (``export`` keeps it). A second build on the same day replaces
    that day's log."""
    date = date or time.strftime("%Y-%m-%d")
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    text = f"""# {name}: build facts, {date}

Written by `experiments/build/train_embedded.py`; the model card (`apar_spec/models/{name}/README.md`) is kept by hand.

{purpose}

| | |
|---|---|
| architecture | Llama, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, intermediate {cfg.intermediate_size}, tied embeddings |
| parameters | {total:,} total, {non_embedding_parameters(model):,} non-embedding |
| vocabulary | {cfg.vocab_size} (byte-level BPE trained on the corpus; `[Fork]`, `[Child]`, `<pad>`, `<eos>` special) |
| data | {data} |
| steps | {report.steps} x batch {batch} ({report.trained_tokens:,} trained tokens) |
| final loss | {report.final_loss:.4f} (mean per-token cross-entropy, last 10% of steps) |
| training wall time | {report.wall_time_s / 60:.1f} min ({threads} CPU thread{"s" if threads > 1 else ""}) |
| stored as | bfloat16 safetensors; `apar_spec.load("{name}")` upcasts to float32 |

Prompt format: `Question: {{prompt}}\\nAnswer:` (the tokenizer's chat template renders it).

Rebuild with `python experiments/build/train_embedded.py` (seeded, from scratch).
"""
    path = logs / f"{date}-{name}-build.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def export(
    src: Path,
    dst: Path,
    name: str,
    purpose: str,
    report: TrainReport,
    batch: int,
    data: str,
    threads: int,
    logs: Path = LOGS_DIR,
) -> None:
    """Copy a trained float32 folder into the package as bfloat16 + tokenizer; the build's facts go
    to ``logs`` (``write_build_log``). The hand-kept model card (``README.md``) in ``dst`` stays."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src)
    card = dst / "README.md"
    kept = card.read_bytes() if card.is_file() else None
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    if kept is not None:
        card.write_bytes(kept)
    model.to(torch.bfloat16).save_pretrained(dst, safe_serialization=True)
    # chat template inside tokenizer_config.json: the package data globs ship */*.json, not .jinja files
    tokenizer.save_pretrained(dst, save_jinja_files=False)
    print(f"build facts: {write_build_log(logs, name, purpose, model, report, batch, data, threads)}", flush=True)


@torch.inference_mode()
def sanity_check(models_dir: Path, n_prompts: int = 20, seed: int = 1) -> dict:
    """Greedy generations on held-out prompts with plain ``generate`` (no tree decoder).

    tiny-apar's main branch is an ordinary causal sequence (``[Fork]`` predicts the
    parent's continuation), so plain ``generate`` shows where it forks. Children are
    decoded as the reference formulation: prompt + main branch up to the ``[Fork]`` +
    ``[Child]``. Fork rates and list well-formedness are printed per kind.
    """
    import re

    from transformers import AutoModelForCausalLM, AutoTokenizer

    held = make_corpus(3 * n_prompts, seed=seed, split="heldout", mix={"list": 1, "explain": 1, "noforks": 1})
    out: dict = {}
    tok = AutoTokenizer.from_pretrained(models_dir / "tiny-apar")
    apar = find_apar_tokens(tok)

    def gen(model, ids: list[int], max_new: int = 400) -> list[int]:
        x = torch.tensor([ids])
        y = model.generate(
            x,
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            attention_mask=torch.ones_like(x),
        )
        new = y[0, len(ids) :].tolist()
        return new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new

    def items(text: str) -> list[tuple[int, str]]:
        return [(int(n), t.strip().lower()) for n, t in re.findall(r"^\s*(\d+)\.\s*([^:\n]*):?", text, flags=re.M)]

    def well_formed(text: str) -> bool:
        """Items numbered 1..N in order, no repeated title (as experiments/build/measure_embedded counts it)."""
        found = items(text)
        titles = [t for _, t in found]
        return (
            bool(found) and [n for n, _ in found] == list(range(1, len(found) + 1)) and len(set(titles)) == len(titles)
        )

    for name in ("tiny-base", "tiny-apar", "tiny-draft"):
        model = AutoModelForCausalLM.from_pretrained(models_dir / name, dtype=torch.float32).eval()
        stats = {k: {"n": 0, "forked": 0, "well_formed": 0, "asked_count": 0} for k in ("list", "explain", "noforks")}
        shown: set[str] = set()
        for ex in held:
            prompt_ids = tok(format_prompt(ex.prompt), add_special_tokens=False)["input_ids"]
            main = gen(model, prompt_ids)
            text_main = tok.decode(main, skip_special_tokens=False)
            forks = [i for i, t in enumerate(main) if t == apar.fork_id][:12]  # an untrained model may fork endlessly
            pieces, prev = [], 0
            for i in forks:  # reassemble: own segment, then the child's text
                child = gen(model, prompt_ids + main[: i + 1] + [apar.child_id], max_new=200)
                pieces += [tok.decode(main[prev:i]), tok.decode(child)]
                prev = i + 1
            pieces.append(tok.decode(main[prev:]))
            text = "".join(pieces)
            s = stats[ex.kind]
            s["n"] += 1
            s["forked"] += bool(forks)
            if ex.kind == "list":
                asked = re.search(r"\b(\d+) ", ex.prompt)
                s["well_formed"] += well_formed(text)
                s["asked_count"] += asked is not None and len(items(text)) == int(asked.group(1))
            if ex.kind not in shown:  # one example of each kind
                shown.add(ex.kind)
                print(f"--- {name} | {ex.prompt}\n[main] {text_main!r}\n[text] {text}\n", flush=True)
        out[name] = stats
        print(f"{name}: {json.dumps(stats)}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny corpus and a few steps: checks the pipeline end to end")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"where tiny-base/, tiny-apar/, tiny-draft/ go (default {MODELS_DIR}; with --quick WORK/models)",
    )
    ap.add_argument(
        "--work", type=Path, default=Path("/tmp/apar_embedded"), help="corpus, float32 weights, checkpoints"
    )
    ap.add_argument(
        "--logs",
        type=Path,
        default=None,
        help=f"where the build facts go (<date>-<model>-build.md; default {LOGS_DIR}; with --quick WORK/logs)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue interrupted stages from their checkpoints")
    ap.add_argument("--only", choices=("base", "apar", "draft", "check"), nargs="*", help="run only these stages")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the log to one line per event
    plan = Plan.quick() if args.quick else Plan()
    stages = set(args.only or ("base", "apar", "draft", "check"))
    work = args.work
    out = args.out or (work / "models" if args.quick else MODELS_DIR)
    logs = args.logs or (work / "logs" if args.quick else LOGS_DIR)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    print(f"plan: {asdict(plan)}", flush=True)

    # corpus: raw rows, then the APAR-restructured rows (trees); both kept for inspection
    examples = [canonical_list_order(e) for e in make_corpus(plan.corpus_size, seed=args.seed, split="train")]
    raw, converted = work / "corpus.jsonl", work / "corpus_apar.jsonl"
    write_jsonl(examples, raw)
    conv = convert_file(raw, converted, max_depth=1)
    print(
        f"corpus: {conv.rows_written} rows, {conv.structured} structured, {conv.unstructured} unstructured", flush=True
    )
    rows = [json.loads(line) for line in converted.read_text().splitlines()]

    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists() or not args.resume:
        tokenizer = build_tokenizer((format_prompt(e.prompt) + e.answer for e in examples), vocab_size=plan.vocab_size)
        tokenizer.save_pretrained(tok_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    print(f"tokenizer: {len(tokenizer)} tokens, apar ids {find_apar_tokens(tokenizer)}", flush=True)
    common = dict(
        batch_size=plan.batch_size,
        seed=args.seed,
        max_len=plan.max_len,
        resume=args.resume,
        on_progress=print_progress,
        save_every=200,
        keep_checkpoint=False,
        log_every=50,
    )
    summary: dict = {}
    data_desc = (
        f"{plan.corpus_size} synthetic train examples (apar_spec.training.corpus, seed {args.seed}: 50% lists, 25% "
        "explanations, 25% no-fork answers; list items in canonical title order, see the script)"
    )

    if "base" in stages:
        torch.manual_seed(args.seed)
        r = train(
            base_config(len(tokenizer)),
            converted,
            work / "tiny-base",
            tokenizer=tokenizer,
            mode="plain",
            steps=plan.base_steps,
            lr=plan.base_lr,
            checkpoint_dir=work / "ckpt-base",
            **common,
        )
        export(
            work / "tiny-base",
            out / "tiny-base",
            "tiny-base",
            "The AR baseline: trained from scratch on the corpus answers in plain sequential form (never forks).",
            r,
            plan.batch_size,
            data_desc + ", sequential answers",
            args.threads,
            logs,
        )
        summary["tiny-base"] = r
        print(f"tiny-base: loss {r.final_loss:.4f}, {r.wall_time_s / 60:.1f} min", flush=True)

    if "apar" in stages:
        r = train(
            str(work / "tiny-base"),
            converted,
            work / "tiny-apar",
            tokenizer=tokenizer,
            mode="apar",
            mix_ratio=0.5,
            steps=plan.apar_steps,
            lr=plan.apar_lr,
            checkpoint_dir=work / "ckpt-apar",
            **common,
        )
        export(
            work / "tiny-apar",
            out / "tiny-apar",
            "tiny-apar",
            "tiny-base fine-tuned on the same corpus restructured into APAR trees (apar_spec.training.restructure, "
            "max depth 1): "
            "emits `[Fork]` after each list title / first sentence of a paragraph; children start after a forced "
            "`[Child]`.",
            r,
            plan.batch_size,
            data_desc + f"; {conv.structured} APAR trees mixed 0.5/0.5 per batch with "
            f"{conv.unstructured} unstructured (no-fork) answers",
            args.threads,
            logs,
        )
        summary["tiny-apar"] = r
        print(f"tiny-apar: loss {r.final_loss:.4f}, {r.wall_time_s / 60:.1f} min", flush=True)

    if "draft" in stages:
        # structured half: the APAR trees; unstructured half: every answer in sequential form
        draft_rows = [r_ for r_ in rows if r_["structured"]] + [
            {"prompt": r_["prompt"], "tree": AnswerTree(r_["answer"]).to_dict()} for r_ in rows
        ]
        torch.manual_seed(args.seed)
        r = train(
            draft_config(len(tokenizer)),
            draft_rows,
            work / "tiny-draft",
            tokenizer=tokenizer,
            mode="apar",
            mix_ratio=0.5,
            steps=plan.draft_steps,
            lr=plan.draft_lr,
            checkpoint_dir=work / "ckpt-draft",
            **common,
        )
        export(
            work / "tiny-draft",
            out / "tiny-draft",
            "tiny-draft",
            "A small draft model for speculative decoding with tiny-apar and tiny-base (same tokenizer).",
            r,
            plan.batch_size,
            data_desc + "; APAR trees mixed 0.5/0.5 with the sequential form of every answer, "
            "so it drafts for both tiny-apar and tiny-base",
            args.threads,
            logs,
        )
        summary["tiny-draft"] = r
        print(f"tiny-draft: loss {r.final_loss:.4f}, {r.wall_time_s / 60:.1f} min", flush=True)

    if {"apar", "draft"} <= stages or (out / "tiny-apar").exists() and (out / "tiny-draft").exists():
        from transformers import AutoModelForCausalLM

        big = non_embedding_parameters(AutoModelForCausalLM.from_pretrained(out / "tiny-apar"))
        small = non_embedding_parameters(AutoModelForCausalLM.from_pretrained(out / "tiny-draft"))
        print(
            f"non-embedding parameters: tiny-apar {big:,}, tiny-draft {small:,} (ratio {small / big:.3f})", flush=True
        )
        assert small * 8 <= big, "the draft must have <= 1/8 of the target's non-embedding parameters"

    size = sum(f.stat().st_size for f in out.glob("tiny-*/*") if f.is_file())
    print(f"package models: {size / 1e6:.1f} MB", flush=True)
    (work / "summary.json").write_text(
        json.dumps(
            {k: {kk: vv for kk, vv in asdict(v).items() if kk != "losses"} for k, v in summary.items()}, indent=2
        )
    )
    if "check" in stages:
        sanity_check(out, n_prompts=5 if args.quick else 20)
    print(f"total wall time: {(time.perf_counter() - t_all) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
