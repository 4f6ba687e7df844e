"""One benchmark row: a (configuration, prompt, repeat) decoded, timed and written down.

Why apart from the loop (``bench.py``): this is the measurement itself (the timed call, the
HF baselines' counters, the lossless check against a reference row) and the row it makes;
the loop around it only orders, resumes and writes rows.

Row schema (one JSON object per line, written by :func:`make_row`):

- identity: ``schema`` (1), ``setup_id`` (hash of what makes rows comparable),
  ``variant`` (``config``, or ``"spec ngram k=4"`` in a sweep), ``config``, ``prompt_id``,
  ``category``, ``repeat``, ``model`` (the model THIS row ran), ``draft``, ``k``
  (None for configurations without a draft), ``tree`` (the draft tree's text form, None =
  a chain of k), ``max_step_tokens`` (the step cap, None = none), ``temperature``, ``max_new_tokens``,
  ``device``, ``threads`` (torch CPU threads; None = untouched), ``dtype``, ``time``;
- measures: ``prompt_tokens``, ``tokens`` (generated over all branches, [Fork]/EOS
  included), ``answer_tokens`` (``len(output_ids)``), ``wall_s`` (around the call),
  ``tokens_per_s`` (= tokens / wall_s), ``steps_per_token``;
- every ``GenerationStats`` field: ``target_steps``, ``draft_forwards``,
  ``tokens_generated``, ``peak_live_kv``, ``mean_live_kv``, ``attended_keys``,
  ``critical_path``, ``wall_time_s`` (the decoder's own clock), ``num_branches``,
  ``accepted``, ``drafted``, ``mean_acceptance_length``, ``acceptance_rate_per_position``,
  ``depth_rank_verified`` / ``depth_rank_accepted`` (draft-tree nodes per [depth-1][rank] whose
  parent path was accepted / that were accepted: p(d, r) for the cost model),
  ``steps_per_critical_path``. HF rows count forwards with hooks and give None for the
  tree-decoder-only counters (live KV, attended keys, acceptance);
- outputs: ``output_ids`` (answer tokens in reading order, for the lossless check),
  ``text`` (first 200 characters); HF rows add ``hf`` (the generate() settings used).
- data-parallel runs (``accelerate launch`` / ``torchrun``, see ``parallel.py``) add
  ``process`` (the rank that measured the row) and ``processes`` (how many ran).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timezone

import torch
from apar_spec.experiments.hf_baselines import hf_generate

from apar_spec.api import eos_ids_of, generate
from apar_spec.decoding.lossless import first_difference, logit_gap
from apar_spec.decoding.tokens import find_apar_tokens
from apar_spec.models.router import gate_threshold
from apar_spec.options import DecodeOptions, fork_bias_of, fork_depth

from .bench_plan import BenchSettings, Variant
from .models import ModelSet, encode_prompt
from .prompts import Prompt
from .report import LOSSLESS_REFERENCE

_D = DecodeOptions
SCHEMA = 1
TEXT_CHARS = 200  # rows keep the first characters of each answer, for eyeballing


class _Runner:
    """Runs one (variant, prompt) and turns it into a row."""

    def __init__(self, settings: BenchSettings, ms: ModelSet, prompts: list[Prompt], finished: Sequence[dict] = ()):
        """``finished``: rows already in the output (a resumed run); their trees are the
        references a speculative row's first difference is found against."""
        self.s = settings
        self.ms = ms
        self.setup_id = settings.setup_id()
        self._ids: dict[tuple[int, str], list[int]] = {}
        # (config, model, prompt id, repeat) -> the answer tree: per branch (parent, fork index, tokens)
        self.trees: dict[tuple, list] = {
            (r["config"], r.get("model"), str(r["prompt_id"]), r["repeat"]): [tuple(b[:3]) for b in r["branches"]]
            for r in finished
            if r.get("branches") and r.get("setup_id") == self.setup_id
        }
        for p in prompts:  # encode up front: a template problem fails before the first row
            for loaded in (ms.target, ms.baseline):
                self.ids(loaded, p)

    def ids(self, loaded, prompt: Prompt) -> list[int]:
        key = (id(loaded), prompt.id)
        if key not in self._ids:
            self._ids[key] = encode_prompt(loaded, prompt.text, self.s.chat_template)
        return self._ids[key]

    def measure(self, v: Variant, prompt: Prompt, repeat: int) -> dict:
        s, ms = self.s, self.ms
        loaded = ms.for_config(v.config)
        ids = self.ids(loaded, prompt)
        k = v.k or s.fixed_k
        draft = ms.drafts.get(v.draft) if v.draft else None
        sampling = dict(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed)
        eos = eos_ids_of(loaded.model, loaded.tokenizer)
        if v.config.startswith("hf-"):
            assist = {}
            if v.config == "hf-assisted":
                assist = (
                    {"assistant_model": draft.model, "num_assistant_tokens": k}
                    if draft.kind == "model"
                    else {"prompt_lookup_num_tokens": k}
                )
            run = hf_generate(
                loaded.model, loaded.tokenizer, ids, max_new_tokens=s.hf_budget, eos_ids=eos, **sampling, **assist
            )
            out_ids, wall, text = (
                run.token_ids,
                run.wall_time_s,
                loaded.tokenizer.decode(run.token_ids, skip_special_tokens=True),
            )
            stats = _hf_stats(run, len(out_ids))
            extra = {"hf": run.settings}
        else:
            device = loaded.model.device
            _sync(device)
            start = time.perf_counter()
            gen = generate(
                loaded.model,
                loaded.tokenizer,
                [ids],
                mode=v.config,
                draft=draft.arg if draft else None,
                max_new_tokens=s.max_new_tokens,
                num_draft_tokens=k,
                tree=v.tree if draft else None,
                max_step_tokens=v.step_cap if draft else None,
                **sampling,
                **s.given_decode_options,
            )[0]
            _sync(device)
            wall = time.perf_counter() - start
            out_ids, text, stats, extra = gen.token_ids, gen.text, gen.stats.to_dict(), {}
        branches = (
            [[b.parent, b.fork_index, b.token_ids, b.finish] for b in gen.branches]
            if not v.config.startswith("hf-")
            else [[None, None, list(out_ids), None]]
        )
        row = make_row(self, v, prompt, repeat, loaded.name, len(ids), out_ids, text, wall, stats, extra)
        row["branches"] = branches
        self.check_lossless(row, loaded, ids)
        return row

    def check_lossless(self, row: dict, loaded, ids: list[int]) -> None:
        """Keep the row's tree; for a greedy row with a reference (``report.LOSSLESS_REFERENCE``)
        already run on this prompt and model, record where it parts from it and the target's
        logit gap there (``apar_spec.decoding.lossless``): the report tells a near-tie from a bug by it."""
        tree = [tuple(b[:3]) for b in row["branches"]]
        key = (row["config"], row["model"], str(row["prompt_id"]), row["repeat"])
        if row["repeat"] < 0:
            return
        self.trees[key] = tree
        ref = self.trees.get((LOSSLESS_REFERENCE.get(row["config"]), *key[1:]))
        if ref is None or (row.get("temperature") or 0) > 0:
            return
        d = first_difference(ids, ref, tree)
        if d is None:
            return
        apar = find_apar_tokens(loaded.tokenizer) if row.get("fork_bias") else None
        gap = logit_gap(
            loaded.model, d, apar.fork_id if apar else None, row.get("fork_bias") or 0.0, row.get("max_depth")
        )
        row["first_difference"] = {"reference": LOSSLESS_REFERENCE[row["config"]], **d.to_dict(), "logit_gap": gap}


def _sync(device) -> None:
    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


def _hf_stats(run, tokens: int) -> dict:
    """The GenerationStats fields HF can honestly report: forwards are counted, the
    tree-decoder-only measures (live KV, attended keys) are None, not invented."""
    return {
        "target_steps": run.target_forwards,
        "draft_forwards": run.draft_forwards,
        "tokens_generated": tokens,
        "peak_live_kv": None,
        "mean_live_kv": None,
        "attended_keys": None,
        "critical_path": tokens,  # one sequence: every token depends on the previous one
        "wall_time_s": run.wall_time_s,
        "num_branches": 1,
        "accepted": None,
        "drafted": None,
        "mean_acceptance_length": None,
        "acceptance_rate_per_position": [],
        "depth_rank_verified": [],
        "depth_rank_accepted": [],
        "steps_per_critical_path": run.target_forwards / tokens if tokens else 0.0,
    }


def make_row(
    runner: _Runner,
    v: Variant,
    prompt: Prompt,
    repeat: int,
    model: str,
    prompt_tokens: int,
    out_ids: list[int],
    text: str,
    wall: float,
    stats: dict,
    extra: dict,
) -> dict:
    """One JSONL row. ``tokens`` = tokens generated over all branches ([Fork] and EOS count,
    as in GenerationStats); ``tokens_per_s`` = tokens / ``wall_s`` (measured around the call);
    ``wall_time_s`` is the decoder's own timing, kept for reference."""
    s = runner.s
    tokens = int(stats["tokens_generated"])
    stats = dict(stats)
    stats.pop("tokens_per_s", None)  # the decoder's own rate; ours is measured around the call
    row = {
        "schema": SCHEMA,
        "setup_id": runner.setup_id,
        "variant": v.name,
        "config": v.config,
        "prompt_id": prompt.id,
        "category": prompt.category,
        "repeat": repeat,
        "model": model,
        "draft": v.draft,
        "k": v.k,
        "tree": v.tree,
        "max_step_tokens": v.step_cap,
        "max_depth": fork_depth(runner.ms.for_config(v.config).model, s.max_depth)
        if v.config in ("apar", "apar+spec")
        else None,
        "depth_cap": (s.depth_cap or _D.depth_cap) if v.config in ("apar", "apar+spec") else None,
        "fork_bias": fork_bias_of(runner.ms.for_config(v.config).model, s.fork_bias)
        if v.config in ("apar", "apar+spec")
        else None,
        "repeated_title": (s.repeated_title or _D.repeated_title) if v.config in ("apar", "apar+spec") else None,
        "fork_gate": gate_threshold(runner.ms.for_config(v.config).model, s.fork_gate)
        if v.config in ("apar", "apar+spec")
        else None,
        "max_branch_tokens": s.max_branch_tokens,
        "temperature": s.temperature,
        "max_new_tokens": s.max_new_tokens,
        "device": runner.ms.device,
        "threads": s.threads,
        "dtype": str(runner.ms.for_config(v.config).model.dtype).removeprefix("torch."),
        "prompt_tokens": prompt_tokens,
        "tokens": tokens,
        "answer_tokens": len(out_ids),
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        **stats,
        "steps_per_token": stats["target_steps"] / tokens if tokens else None,
        "output_ids": list(out_ids),
        "text": text[:TEXT_CHARS],
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    return row
