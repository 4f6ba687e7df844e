"""The drafts built for smollm2-apar: smollm2-draft (a 2-layer LM), the heads, the token ranking.

Why apart from the adapter's stages (``train_smollm2.py``): each draft is distilled from a
finished adapter (or its answers) and rebuilt on its own (``--only draft``, ``vocab``,
``heads``, ``hydra``); they share the base's embedding and the frequency ranking of its tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from apar_spec.experiments.build.smollm2_facts import MODELS_DIR, merge_facts, print_progress, say

DRAFT_LAYERS = (0, 29)  # base layers the draft starts from


def draft_model(base, tokenizer):
    """A 2-layer Llama of the base's width, layers copied from the base, embedding shared (frozen)."""
    from transformers import AutoModelForCausalLM

    cfg = base.config.__class__.from_dict(base.config.to_dict())
    cfg.num_hidden_layers = len(DRAFT_LAYERS)
    # The LM head must stay tied to the (frozen, not shipped) embedding: the smollm2-apar
    # adapter's fitted [Fork] head row unties the base, and an untied draft head would be
    # trained here but never shipped (load_draft ties it back), so the draft would load a
    # random head and accept nothing.
    cfg.tie_word_embeddings = True
    draft = AutoModelForCausalLM.from_config(cfg)
    sd = base.state_dict()
    new = {}
    for k in draft.state_dict():
        if k == "lm_head.weight":
            continue  # tied: the embedding's rows
        src = k
        if ".layers." in k:
            pre, rest = k.split(".layers.", 1)
            i, tail = rest.split(".", 1)
            src = f"{pre}.layers.{DRAFT_LAYERS[int(i)]}.{tail}"
        new[k] = sd[src]
    draft.load_state_dict(new, strict=False)
    draft.tie_weights()
    draft.get_input_embeddings().weight.requires_grad_(False)  # shared with the base at load: not trained, not shipped
    return draft


def stage_draft(work: Path, data: Path, out: Path, apar_dir: Path, args) -> dict:
    from safetensors.torch import save_file

    from apar_spec.models import smollm2
    from apar_spec.models.adapter import apply_adapter
    from apar_spec.training.train import train

    base, tokenizer = smollm2.load_base(dtype=torch.float32, progress=say)
    apply_adapter(base, tokenizer, apar_dir)  # the APAR tokens and their rows (the draft reads [Fork]/[Child])
    draft = draft_model(base, tokenizer).to(torch.bfloat16)
    del base
    rows = [json.loads(line) for line in data.open(encoding="utf-8") if line.strip()]
    mixed = [r for r in rows if r["structured"]] + [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]
    report = train(
        draft,
        mixed,
        work / "draft-train",
        tokenizer=tokenizer,
        mode="apar",
        steps=args.draft_steps,
        batch_size=args.batch_size,
        lr=args.draft_lr,
        weight_decay=0.0,
        mix_ratio=0.5,
        max_len=args.max_len,
        resume=True,
        save_every=args.save_every,
        log_every=10,
        stop_after=args.stop_after,
        on_progress=print_progress,
    )
    facts = {
        "steps": report.steps,
        "batch_size": args.batch_size,
        "lr": args.draft_lr,
        "final_loss": report.final_loss,
        "losses": report.losses,
        "wall_time_s": report.wall_time_s,
        "trained_tokens": report.trained_tokens,
        "examples": report.num_examples,
        "init_layers": list(DRAFT_LAYERS),
        "threads": torch.get_num_threads(),
        "dtype": "bfloat16",
        "whole_lead": args.whole_lead,
    }
    if report.steps < args.draft_steps:
        return facts
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.to(torch.bfloat16).contiguous()
        for k, v in draft.state_dict().items()
        if "embed_tokens" not in k and "lm_head" not in k
    }
    save_file(state, str(out / "draft.safetensors"))
    cfg = draft.config.to_dict()
    (out / "draft_config.json").write_text(
        json.dumps({"config": cfg, "base": "smollm2", "embedding_from": "smollm2-apar"}, indent=1)
    )
    merge_facts(out / "train.json", facts)
    return facts


HEADS_PROMPTS = (240, 60)  # list-style and short-answer training prompts the heads are distilled on


def heads_prompts(answers: Path, seed: int = 1, counts: tuple[int, int] = HEADS_PROMPTS) -> list[dict]:
    """The prompts (only: each target answers them itself) the heads are self-distilled on:
    ``counts`` list-style and short-answer training prompts (default 240 and 60), shuffled with a fixed seed."""
    import random

    rows = [json.loads(line) for line in answers.open(encoding="utf-8") if line.strip()]
    rng = random.Random(seed)
    picked = []
    for kind, n in zip(("list", "short"), counts):
        mine = [r for r in rows if r["kind"] == kind]
        rng.shuffle(mine)
        picked += [{"prompt": r["prompt"]} for r in mine[:n]]
    return picked


def stage_heads(answers: Path, work: Path, out: Path, args, kind: str = "medusa") -> dict:
    """Draft heads for smollm2-apar (and the base): ``apar_spec.drafts.train_heads`` on the targets'
    own greedy answers (APAR mode for smollm2-apar: its branches, forks included).

    ``kind="medusa"``: smollm2-heads, 300 prompts. ``kind="hydra"``: smollm2-hydra, chained
    heads distilled on every training prompt and (``--draft-prompts``, the default) the 797
    draft prompts in other registers: the chained heads gain from more and more varied data,
    where Medusa heads mostly memorised their 300 answers. The distillation is cached per
    prompt, so a rerun after the Medusa stage only answers the new ones; for the base
    (``--heads-targets smollm2``) the training prompts' answers in ``answers.jsonl`` are
    already its own greedy answers and are used as given."""
    from apar_spec.drafts.train_heads import HeadsTrainConfig, train_heads

    import apar_spec
    from apar_spec.models import smollm2

    everything = (10**9, 10**9)
    rows = heads_prompts(answers, counts=everything if kind == "hydra" else HEADS_PROMPTS)
    if kind == "hydra" and args.draft_prompts:  # the varied registers too (stories, role-play, how/why ...)
        from apar_spec.experiments.build.smollm2_draft_prompts import draft_prompts

        rows += [{"prompt": p.text} for p in draft_prompts()]
    if kind == "hydra":  # the same token ranking as smollm2-heads (this run's, else the shipped one), next to the heads
        from apar_spec.drafts.vocab import VOCAB_FILE

        ranking = args.out / "smollm2-heads" / VOCAB_FILE
        out.mkdir(parents=True, exist_ok=True)
        (out / VOCAB_FILE).write_bytes(
            (ranking if ranking.exists() else MODELS_DIR / "smollm2-heads" / VOCAB_FILE).read_bytes()
        )
    rows = rows[: args.limit] if args.limit else rows
    facts = {}
    for target in args.heads_targets:
        # bfloat16: the precision the models are measured in on a CPU (see README), and ~3x
        # faster to distil; the heads themselves train in float32 on the cast hidden states
        if target == "smollm2-apar":  # the adapter this run wrote (--out), not necessarily the shipped one
            model, tokenizer = smollm2.load_apar(dtype=torch.bfloat16, folder=args.out / "smollm2-apar")
        else:
            model, tokenizer = apar_spec.load(target, dtype="bfloat16")
        if kind == "hydra":
            cfg = HeadsTrainConfig(steps=args.hydra_steps, kind="hydra")
            folder = work / f"hydra-{target}"
            medusa_cache = work / f"heads-{target}" / "distill.jsonl"
            if medusa_cache.exists() and not (folder / "distill.jsonl").exists():  # keyed by prompt: reuse its answers
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "distill.jsonl").write_bytes(medusa_cache.read_bytes())
        else:
            cfg = HeadsTrainConfig(steps=args.heads_steps)
            folder = work / f"heads-{target}"
        vocab = _heads_vocab(out, args.heads_vocab, model)
        mine = rows
        if (
            kind == "hydra" and target == "smollm2"
        ):  # answers.jsonl already holds the base's own greedy answers: reuse them
            done = [json.loads(line) for line in answers.open(encoding="utf-8") if line.strip()]
            given = {r["prompt"]: r["answer"] for r in done if r.get("answer")}
            mine = [{**r, "answer": given[r["prompt"]]} if r["prompt"] in given else r for r in rows]
        report = train_heads(
            model,
            tokenizer,
            mine,
            folder,
            cfg,
            target_name=target,
            progress=lambda msg: print(msg, flush=True),
            vocab=vocab,
        )
        dest = out / target
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("heads.json", "heads.safetensors"):
            (dest / name).write_bytes((folder / name).read_bytes())

        facts[target] = {
            k: report[k] for k in ("steps", "positions", "val_loss", "val_top1_accuracy", "train_vocab", "seconds")
        }
    return facts


def _heads_vocab(out: Path, size: int, model):
    """The reduced vocabulary the heads train against: the top ``size`` of the heads' own
    ranking (``vocab.json``, written by the vocab stage; the shipped one when this run has none)."""
    from apar_spec.drafts.vocab import VOCAB_FILE, load_vocab

    folder = out if (out / VOCAB_FILE).exists() else MODELS_DIR / "smollm2-heads"
    return load_vocab(folder, size, model.get_output_embeddings().weight.shape[0], "smollm2-heads")


VOCAB_SIZES = (2048, 4096, 8192, 16384, 32768)
VOCAB_KEEP = 32768  # ranked ids stored (a larger draft vocabulary saves too little to matter)


def stage_vocab(clean: Path, folders: list[Path]) -> dict:
    """Rank SmolLM2's tokens by frequency over the self-distilled answers (``drafts/vocab.py``):
    what ``smollm2-draft@N`` and ``smollm2-heads@N`` propose from. EOS ids and ``[Fork]``
    are always ranked first (a draft must be able to end a branch and to fork)."""
    from apar_spec.drafts.vocab import coverage, rank_tokens, save_ranking

    import apar_spec
    from apar_spec.decoding.tokens import FORK_TOKEN, find_apar_tokens

    _, tokenizer = apar_spec.load("smollm2-apar", dtype="bfloat16")
    fork_id = find_apar_tokens(tokenizer).fork_id
    answers = [json.loads(line)["answer"] for line in clean.open(encoding="utf-8") if line.strip()]
    seqs = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    keep = [t for t in eos if isinstance(t, int) and t >= 0] + [fork_id]
    ranked, counted = rank_tokens(seqs, keep=keep)
    # tokens never seen in the answers follow in id order, so any size up to VOCAB_KEEP is defined
    seen = set(ranked)
    ranked += [t for t in range(fork_id) if t not in seen]
    ranked = ranked[:VOCAB_KEEP]
    meta = {
        "source": f"{len(answers)} self-distilled SmolLM2 answers ({clean.name}), frequency-ranked; "
        f"first: EOS ids {eos} and {FORK_TOKEN} (id {fork_id})",
        "counted_tokens": counted,
        "coverage": coverage(ranked, seqs, VOCAB_SIZES),
    }
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        save_ranking(folder, ranked, meta)
    return {"counted_tokens": counted, "coverage": meta["coverage"]}
