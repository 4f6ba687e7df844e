"""The benchmark report: per configuration and per category, from the rows of one run.

How each column is computed (all from rows of the same run, so machine drift cancels):

- per prompt, a metric is first reduced to its **median over repeats**; a column is
  then the **median over prompts** of those (a mean where noted). A prompt counts
  for a configuration once it has at least one row.
- ``tok/s``: tokens / wall, with tokens = tokens generated over all branches
  (``[Fork]`` and EOS included, as in ``GenerationStats``) and wall measured around
  the call.
- ``xAR`` / ``xHF``: speed-up = median tok/s of the configuration / median tok/s of
  ``ar`` (resp. ``hf-generate``), both over the prompts *both* finished (so an
  interrupted run does not compare different prompt sets).
- ``steps``: target forwards (prefill included); ``steps/tok`` = steps / tokens.
- ``acc.len``: mean acceptance length per branch-step **including the bonus token**
  (vLLM's convention: plain decoding is exactly 1.0); mean over rows. ``acc@pos``:
  per draft position, the mean over rows of that row's accepted/drafted rate at the
  position (rows that never drafted that far do not vote).
- ``KVxAR`` / ``attnxAR``: median peak live KV (resp. attended keys) over the same
  quantity for ``ar``, over common prompts. HF rows have no such counters (``-``).
- ``steps/crit``: target steps / critical path (the longest root-to-leaf chain of
  generated tokens); 1.0 for plain AR, below 1 once a step yields several tokens.
- ``pred`` / ``achv`` (the cost-model table): for every speculative row (``spec``,
  ``apar+spec``), the speed-up over the same mode without speculation (``ar``, resp.
  ``apar``) in this run. ``achv`` = ratio of median tok/s over common prompts, as above;
  ``pred`` = the same ratio of *predicted* tok/s, from the cached pass costs
  (``apar-spec costs measure``) and the rows' own tokens, steps, live branches, cache
  length and acceptance profile (``experiments/cost_rows.predict_prompt``). ``err`` =
  pred / achv - 1. Rows without cached costs, and HF rows, show ``-`` and a note.
- ``lossless``: greedy runs only. ``spec`` must equal ``ar``, ``apar+spec`` equal
  ``apar``, ``ar`` and ``hf-assisted`` equal ``hf-generate``: whole token lists are
  compared (length included, never zipped), on the first repeat both have, and only
  when both rows used the same model. No prompt is exempt: the token budget cuts the
  tokens plain APAR keeps whatever the speculator (``apar_spec.decoding.clock``). Every difference
  is explained under the table (``apar_spec.decoding.lossless``): ``low precision`` (bf16/fp16
  rows: a forward over several tokens rounds differently from one-token steps),
  ``near-tie`` (float32, the target's logit gap between the two tokens chosen at the
  first difference below 1e-4), or ``bug`` (anything else, a float32 gap of 1e-4 or more
  included; ``bench --strict`` then exits non-zero).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Optional

ALL = "all"
# speculative configuration -> the same mode without speculation (the cost model's baseline)
PLAIN_OF = {"spec": "ar", "apar+spec": "apar"}
# configuration -> the configuration its greedy output must equal
LOSSLESS_REFERENCE = {"spec": "ar", "apar+spec": "apar", "ar": "hf-generate", "hf-assisted": "hf-generate"}
LOW_PRECISION = {"bfloat16", "float16"}


@dataclass
class Lossless:
    reference: str  # the variant compared against
    equal: int = 0
    compared: int = 0
    first_difference: Optional[str] = None  # "prompt P: lengths 12 vs 10, first differs at token 7"
    skipped: Optional[str] = None  # why no comparison was made ("sampled", "different models")
    # every differing prompt: {"prompt", "reason" (lossless.explain), "detail"}
    differences: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> Optional[bool]:
        return None if self.skipped or not self.compared else self.equal == self.compared

    @property
    def bugs(self) -> int:
        return sum(d["reason"] == "bug" for d in self.differences)

    def short(self) -> str:
        if self.skipped:
            return f"n/a ({self.skipped})"
        if not self.compared:
            return "n/a (no common prompts)"
        why = ""
        if self.differences:
            counts = defaultdict(int)
            for d in self.differences:
                counts[d["reason"]] += 1
            why = " (" + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) + ")"
        return f"{'yes' if self.ok else 'NO'} {self.equal}/{self.compared}{why}"


@dataclass
class VariantSummary:
    variant: str
    config: str
    model: str
    draft: Optional[str]
    k: Optional[int]
    prompts: int
    rows: int
    tokens: Optional[float]
    wall_s: Optional[float]
    tokens_per_s: Optional[float]
    speedup_vs_ar: Optional[float]
    speedup_vs_hf: Optional[float]
    target_steps: Optional[float]
    steps_per_token: Optional[float]
    acceptance_length: Optional[float]
    acceptance_per_position: list[float] = field(default_factory=list)
    peak_kv_vs_ar: Optional[float] = None
    attended_keys_vs_ar: Optional[float] = None
    steps_per_critical_path: Optional[float] = None
    lossless: Optional[Lossless] = None
    plain: Optional[str] = None  # the variant this one's speculation is measured against (cost-model table)
    achieved_vs_plain: Optional[float] = None
    predicted_vs_plain: Optional[float] = None
    prediction_note: Optional[str] = None  # why there is no prediction

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Report:
    groups: dict[str, list[VariantSummary]]  # "all" first, then each category
    setup_ids: list[str]
    repeats: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "setup_ids": self.setup_ids,
            "repeats": self.repeats,
            "notes": self.notes,
            "groups": {g: [v.to_dict() for v in vs] for g, vs in self.groups.items()},
        }


# ------------------------------------------------------------------ math


def _median(xs: Iterable[Optional[float]]) -> Optional[float]:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _mean(xs: Iterable[Optional[float]]) -> Optional[float]:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def per_prompt(rows: Sequence[dict], key: str) -> dict[str, float]:
    """prompt id -> median over that prompt's repeats of ``row[key]`` (None values ignored)."""
    by_prompt: dict[str, list] = defaultdict(list)
    for r in rows:
        by_prompt[str(r["prompt_id"])].append(r.get(key))
    out = {}
    for p, vals in by_prompt.items():
        m = _median(vals)
        if m is not None:
            out[p] = m
    return out


def ratio_of_medians(rows: Sequence[dict], base_rows: Sequence[dict], key: str) -> Optional[float]:
    """median over common prompts of ``key`` for ``rows``, divided by the same for ``base_rows``."""
    mine, base = per_prompt(rows, key), per_prompt(base_rows, key)
    common = sorted(set(mine) & set(base))
    if not common:
        return None
    num, den = _median(mine[p] for p in common), _median(base[p] for p in common)
    return num / den if den else None


def acceptance_per_position(rows: Sequence[dict]) -> list[float]:
    """Mean over rows of each draft position's acceptance rate (rows without that position abstain)."""
    columns: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        for j, rate in enumerate(r.get("acceptance_rate_per_position") or []):
            columns[j].append(rate)
    return [sum(columns[j]) / len(columns[j]) for j in sorted(columns)]


def compare_outputs(rows: Sequence[dict], ref_rows: Sequence[dict], reference: str) -> Lossless:
    """Greedy-equality of whole token lists, per prompt, on the first repeat both have.
    Every difference is explained (module docstring) from the row's ``lossless`` record,
    which the bench writes with the target's logit gap at the first differing token."""
    from apar_spec.decoding.lossless import NEAR_TIE, explain

    result = Lossless(reference)
    if any((r.get("temperature") or 0) > 0 for r in [*rows, *ref_rows]):
        result.skipped = "sampled"
        return result
    models = {r.get("model") for r in rows} | {r.get("model") for r in ref_rows}
    if len(models) > 1:
        result.skipped = "different models"
        return result
    mine = _first_repeat(rows)
    ref = _first_repeat(ref_rows)
    for p in sorted(set(mine) & set(ref), key=str):
        a, b = mine[p]["output_ids"], ref[p]["output_ids"]
        result.compared += 1
        if a == b:  # list equality compares lengths too: a truncated output is a difference
            result.equal += 1
            continue
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        detail = f"lengths {len(a)} vs {len(b)}, first differs at answer token {at}"
        dtypes = {str(r.get("dtype")) for r in (mine[p], ref[p])}
        low = sorted(dtypes & LOW_PRECISION)
        rec = mine[p].get("first_difference") or {}
        gap = rec.get("logit_gap")
        if rec:
            detail += (
                f"; first in APAR time at branch {rec.get('branch')} token {rec.get('index')}: "
                f"{rec.get('want')} vs {rec.get('got')}, logit gap "
                + ("n/a (a different stop)" if gap is None else f"{gap:.2e}")
            )
        else:
            detail += "; no first-difference record (the reference ran in another bench run)"
        reason = explain(low[0] if low else "float32", gap)
        if reason == "low precision":
            detail += f" ({'/'.join(low)}: rerun in float32 to tell numerics from a bug)"
        elif reason == "bug" and gap is not None:
            detail += f" (>= {NEAR_TIE:g}: not rounding)"
        result.differences.append({"prompt": str(p), "reason": reason, "detail": detail})
        if result.first_difference is None:
            result.first_difference = f"prompt {p}: {detail}"
    return result


def _first_repeat(rows: Sequence[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r["repeat"]):
        out.setdefault(str(r["prompt_id"]), r)
    return out


class _CostLookup:
    """Cached costs per (model, dtype, device, threads), looked up once per report."""

    def __init__(self):
        self.found: dict[tuple, object] = {}
        self.missing: set[str] = set()

    def get(self, name, row: dict):
        from apar_spec import costs as cm

        key = (name, row.get("dtype"), row.get("device"), row.get("threads"))
        if key not in self.found:
            try:
                self.found[key] = cm.find_costs(
                    str(name), str(row.get("dtype")), str(row.get("device") or "cpu"), row.get("threads")
                )
            except cm.CostCacheError as err:
                self.found[key] = None
                self.missing.add(str(err))
            if self.found[key] is None and not any(str(name) in m for m in self.missing):
                t = row.get("threads")
                self.missing.add(
                    f"no cached costs for {name} ({row.get('dtype')}, {row.get('device')}, threads={t}): "
                    f"run `apar-spec costs measure --model {name}{f' --threads {t}' if t else ''}` for predictions"
                )
        return self.found[key]


def predicted_vs_plain(
    vrows: Sequence[dict], plain_rows: Sequence[dict], lookup: _CostLookup
) -> tuple[Optional[float], Optional[str]]:
    """Ratio of median predicted tok/s (speculative / plain) over common prompts, or (None, why)."""
    from . import cost_rows as cm

    first = vrows[0]
    target = lookup.get(first.get("model"), first)
    if target is None:
        return None, "no cached costs"
    kind = cm.draft_kind_of_row(first)
    draft = None
    if kind == "model":
        draft = lookup.get(first.get("draft"), first)
        if draft is None:
            return None, "no cached draft costs"
    mine: dict[str, list[dict]] = defaultdict(list)
    base: dict[str, list[dict]] = defaultdict(list)
    for r in vrows:
        mine[str(r["prompt_id"])].append(r)
    for r in plain_rows:
        base[str(r["prompt_id"])].append(r)
    spec_tps, base_tps = [], []
    for p in sorted(set(mine) & set(base)):
        try:
            pred = cm.predict_prompt(mine[p], base[p], target, draft)
        except ValueError as err:  # e.g. heads rows with costs measured without the heads stand-in
            return None, str(err).split(";")[0]
        if pred is None:
            return None, f"cannot cost draft kind {kind!r}"
        spec_tps.append(pred.spec_tokens / pred.spec_s)
        base_tps.append(pred.base_tokens / pred.base_s)
    if not spec_tps:
        return None, "no common prompts"
    return statistics.median(spec_tps) / statistics.median(base_tps), None


def summarize(rows: Sequence[dict]) -> Report:
    """Summaries for all prompts and for each category (see the module docstring)."""
    if not rows:
        raise ValueError("no rows to report (the results file is empty)")
    groups: dict[str, list[dict]] = {ALL: list(rows)}
    for r in rows:
        groups.setdefault(str(r.get("category", "?")), []).append(r)
    if len(groups) == 2:  # one category: its table would repeat "all"
        groups = {ALL: groups[ALL]}
    report = Report({}, sorted({r.get("setup_id", "?") for r in rows}), max(int(r["repeat"]) for r in rows) + 1)
    if len(report.setup_ids) > 1:
        report.notes.append(
            f"rows of {len(report.setup_ids)} different setups are mixed in this file: ratios may mean nothing"
        )
    lookup = _CostLookup()
    for name, group_rows in groups.items():
        report.groups[name] = _summarize_group(group_rows, lookup)
    report.notes.extend(sorted(lookup.missing))
    return report


def _summarize_group(rows: Sequence[dict], lookup: Optional[_CostLookup] = None) -> list[VariantSummary]:
    by_variant: dict[str, list[dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    by_config = {}
    for name, vrows in by_variant.items():
        by_config.setdefault(vrows[0]["config"], name)  # the first variant of a config is its baseline
    ar = by_variant.get(by_config.get("ar", ""), [])
    hf = by_variant.get(by_config.get("hf-generate", ""), [])
    out = []
    for name, vrows in by_variant.items():
        first = vrows[0]
        config = first["config"]
        ref_config = LOSSLESS_REFERENCE.get(config)
        lossless = None
        if ref_config and ref_config in by_config:
            lossless = compare_outputs(vrows, by_variant[by_config[ref_config]], by_config[ref_config])
        out.append(
            VariantSummary(
                variant=name,
                config=config,
                model=", ".join(sorted({str(r.get("model")) for r in vrows})),
                draft=first.get("draft"),
                k=first.get("k"),
                prompts=len({r["prompt_id"] for r in vrows}),
                rows=len(vrows),
                tokens=_median(per_prompt(vrows, "tokens").values()),
                wall_s=_median(per_prompt(vrows, "wall_s").values()),
                tokens_per_s=_median(per_prompt(vrows, "tokens_per_s").values()),
                speedup_vs_ar=ratio_of_medians(vrows, ar, "tokens_per_s") if ar else None,
                speedup_vs_hf=ratio_of_medians(vrows, hf, "tokens_per_s") if hf else None,
                target_steps=_median(per_prompt(vrows, "target_steps").values()),
                steps_per_token=_median(per_prompt(vrows, "steps_per_token").values()),
                acceptance_length=_mean(r.get("mean_acceptance_length") for r in vrows),
                acceptance_per_position=acceptance_per_position(vrows),
                peak_kv_vs_ar=ratio_of_medians(vrows, ar, "peak_live_kv") if ar else None,
                attended_keys_vs_ar=ratio_of_medians(vrows, ar, "attended_keys") if ar else None,
                steps_per_critical_path=_median(per_prompt(vrows, "steps_per_critical_path").values()),
                lossless=lossless,
            )
        )
        plain = PLAIN_OF.get(config)
        if plain and plain in by_config:
            s = out[-1]
            plain_rows = by_variant[by_config[plain]]
            s.plain = by_config[plain]
            s.achieved_vs_plain = ratio_of_medians(vrows, plain_rows, "tokens_per_s")
            s.predicted_vs_plain, s.prediction_note = predicted_vs_plain(vrows, plain_rows, lookup or _CostLookup())
    return out


# ------------------------------------------------------------------ rendering
