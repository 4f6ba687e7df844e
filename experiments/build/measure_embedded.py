"""Measure the embedded APAR model on held-out prompts (issue: embedded default models).

    python -m apar_spec.experiments.build.measure_embedded --lists 200 --others 100 --speed 20

Reports, in one run:
- how often ``tiny-apar`` forks on held-out list prompts and on non-list prompts
  (short facts, arithmetic, code: the corpus' "noforks" kind) - and, for
  information, on multi-paragraph "explain" prompts, which the APAR format forks;
- how many reassembled list answers are well-formed (items numbered 1..N in
  order, no duplicated item title);
- target steps of ``tiny-apar`` in APAR mode vs ``tiny-base`` in AR mode on the
  list prompts (same prompts, greedy), and peak live KV / attended keys;
- tokens/s of both on a subset, decoded one prompt at a time, interleaved, after a
  warm-up, with ``tiny-base``'s own HF ``generate`` as the honest baseline.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import apar_spec
from apar_spec.training.corpus import make_corpus

_ITEM = re.compile(r"^\s*(\d+)\.\s*([^:\n]*):?", re.M)


def list_items(text: str) -> list[tuple[int, str]]:
    """(number, title) of every ``N. Title:`` line of an answer."""
    return [(int(n), title.strip().lower()) for n, title in _ITEM.findall(text)]


def well_formed(text: str) -> bool:
    """Items numbered 1..N in order (N >= 1), no duplicated item title."""
    items = list_items(text)
    if not items:
        return False
    numbers = [n for n, _ in items]
    titles = [t for _, t in items]
    return numbers == list(range(1, len(items) + 1)) and len(set(titles)) == len(titles)


@dataclass
class Summary:
    list_prompts: int = 0
    other_prompts: int = 0
    explain_prompts: int = 0
    fork_rate_lists: float = 0.0
    fork_rate_others: float = 0.0
    fork_rate_explain: float = 0.0
    well_formed_lists: float = 0.0
    apar_steps: int = 0
    base_ar_steps: int = 0
    steps_ratio: float = 0.0  # APAR steps / AR steps, summed over the list prompts
    mean_branches_lists: float = 0.0
    apar_peak_live_kv_mean: float = 0.0
    base_peak_live_kv_mean: float = 0.0
    apar_attended_keys: int = 0
    base_attended_keys: int = 0
    apar_tokens: int = 0
    base_tokens: int = 0
    speed_prompts: int = 0
    apar_tokens_per_s: float = 0.0  # medians over prompts
    base_ar_tokens_per_s: float = 0.0
    base_hf_tokens_per_s: float = 0.0
    apar_vs_base_ar_speedup: float = 0.0  # ratio of median wall times per prompt (AR / APAR)
    apar_vs_base_hf_speedup: float = 0.0
    examples: list[dict] = field(default_factory=list)


def chat(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return prompt


def measure(
    lists: int, others: int, explains: int, speed: int, max_new_tokens: int, seed: int, batch_size: int
) -> Summary:
    apar_model, apar_tok = apar_spec.load("tiny-apar")
    base_model, base_tok = apar_spec.load("tiny-base")
    s = Summary()
    held_lists = make_corpus(lists, seed=seed, split="heldout", kinds=("list",))
    held_others = make_corpus(others, seed=seed + 1, split="heldout", kinds=("noforks",))
    held_explain = make_corpus(explains, seed=seed + 2, split="heldout", kinds=("explain",)) if explains else []
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)

    def run(model, tok, exs, mode):
        return apar_spec.generate(model, tok, [chat(tok, e.prompt) for e in exs], mode=mode, **kw)

    apar_lists = run(apar_model, apar_tok, held_lists, "apar")
    base_lists = run(base_model, base_tok, held_lists, "ar")
    apar_others = run(apar_model, apar_tok, held_others, "apar")
    apar_explain = run(apar_model, apar_tok, held_explain, "apar") if held_explain else []

    s.list_prompts, s.other_prompts, s.explain_prompts = len(held_lists), len(held_others), len(held_explain)
    s.fork_rate_lists = sum(g.forked for g in apar_lists) / len(apar_lists)
    s.fork_rate_others = sum(g.forked for g in apar_others) / max(1, len(apar_others))
    s.fork_rate_explain = sum(g.forked for g in apar_explain) / max(1, len(apar_explain))
    s.well_formed_lists = sum(well_formed(g.text) for g in apar_lists) / len(apar_lists)
    s.apar_steps = sum(g.stats.target_steps for g in apar_lists)
    s.base_ar_steps = sum(g.stats.target_steps for g in base_lists)
    s.steps_ratio = s.apar_steps / s.base_ar_steps
    s.mean_branches_lists = statistics.mean(g.stats.num_branches for g in apar_lists)
    s.apar_peak_live_kv_mean = statistics.mean(g.stats.peak_live_kv for g in apar_lists)
    s.base_peak_live_kv_mean = statistics.mean(g.stats.peak_live_kv for g in base_lists)
    s.apar_attended_keys = sum(g.stats.attended_keys for g in apar_lists)
    s.base_attended_keys = sum(g.stats.attended_keys for g in base_lists)
    s.apar_tokens = sum(g.stats.tokens_generated for g in apar_lists)
    s.base_tokens = sum(g.stats.tokens_generated for g in base_lists)
    for ex, g, b in list(zip(held_lists, apar_lists, base_lists))[:3]:
        s.examples.append({"prompt": ex.prompt, "apar": g.text, "base": b.text, "branches": g.stats.num_branches})
    if speed:
        s.speed_prompts = speed
        timing = time_one_by_one(apar_model, apar_tok, base_model, base_tok, held_lists[:speed], max_new_tokens)
        (
            s.apar_tokens_per_s,
            s.base_ar_tokens_per_s,
            s.base_hf_tokens_per_s,
            s.apar_vs_base_ar_speedup,
            s.apar_vs_base_hf_speedup,
        ) = timing
    return s


def time_one_by_one(apar_model, apar_tok, base_model, base_tok, exs, max_new_tokens: int):
    """Per prompt, interleaved: APAR (tiny-apar), AR (tiny-base, our loop), HF generate (tiny-base)."""
    walls = {"apar": [], "ar": [], "hf": []}
    rates = {"apar": [], "ar": [], "hf": []}

    def hf(prompt):
        ids = base_tok(chat(base_tok, prompt), return_tensors="pt")
        t0 = time.perf_counter()
        out = base_model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens)
        return time.perf_counter() - t0, out.shape[1] - ids["input_ids"].shape[1]

    def ours(model, tok, prompt, mode):
        t0 = time.perf_counter()
        g = apar_spec.generate(model, tok, [chat(tok, prompt)], mode=mode, max_new_tokens=max_new_tokens)[0]
        return time.perf_counter() - t0, g.stats.tokens_generated

    (
        ours(apar_model, apar_tok, exs[0].prompt, "apar"),
        ours(base_model, base_tok, exs[0].prompt, "ar"),
        hf(exs[0].prompt),
    )  # warm-up
    for ex in exs:
        for name, fn in (
            ("apar", lambda ex=ex: ours(apar_model, apar_tok, ex.prompt, "apar")),
            ("ar", lambda ex=ex: ours(base_model, base_tok, ex.prompt, "ar")),
            ("hf", lambda ex=ex: hf(ex.prompt)),
        ):
            wall, n = fn()
            walls[name].append(wall)
            rates[name].append(n / wall)
    med = {k: statistics.median(v) for k, v in walls.items()}
    return (
        statistics.median(rates["apar"]),
        statistics.median(rates["ar"]),
        statistics.median(rates["hf"]),
        med["ar"] / med["apar"],
        med["hf"] / med["apar"],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lists", type=int, default=200)
    ap.add_argument("--others", type=int, default=100)
    ap.add_argument("--explains", type=int, default=50)
    ap.add_argument("--speed", type=int, default=20, help="list prompts timed one by one (0 = skip)")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16, help="for the step/fork counts (timing runs use 1)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the bench's, one on CPU)")
    ap.add_argument("--out", type=Path, default=None, help="write the summary as JSON here")
    a = ap.parse_args()
    from apar_spec.experiments.bench import torch_threads

    with torch_threads(a.threads, "cpu"):
        s = measure(a.lists, a.others, a.explains, a.speed, a.max_new_tokens, a.seed, a.batch_size)
    text = json.dumps(asdict(s), indent=2)
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
