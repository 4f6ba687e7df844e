"""The batched quality pass: fork rate, steps APAR / AR, NLL under the base, well-formed lists.

Why a separate pass from ``bench``: these figures are per request and do not depend on
batching (a request's target steps, branches and tokens are the same whether it is
decoded alone or beside 15 others: greedy decoding, per-branch rules), so they are
measured over *every* prompt with batched generation, which is ~10x cheaper than the
batch-1 timed rows. Wall-time ratios need batch 1 and come from ``apar-spec bench``.

Per prompt (one JSONL row each, ``kind: "quality"``):

- ``forked``: the APAR answer has more than one branch;
- ``ar_steps`` / ``apar_steps``: target steps of the base's greedy AR answer and of the
  APAR model's answer (prefill included in both); ``steps_ratio`` = apar / ar;
- ``nll_ar`` / ``nll_apar``: mean per-token negative log-likelihood, under the *base*
  model, of the base's own greedy answer and of the reassembled APAR answer (both
  re-tokenised from text, EOS excluded); ``nll_ratio`` = apar / ar;
- ``nll_ar_matched``: the base's answer scored over only as many tokens as the APAR
  answer has (a length-matched control: per-token NLL falls along an answer, so an
  answer that stops early scores worse by its length alone);
- ``well_formed``: for an answer that forked, its numbered list (if any) counts 1..N
  with no repeated item and no empty item, and no paragraph is empty.

The modules, by job: ``quality_nll`` (the NLL judge), ``quality_floor`` (the sibling-blind
floor), ``quality_summary`` (answer checks, prompt groups, the summary table), and this one:
the pass itself, its resumable phases and the rows it writes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

from apar_spec.models.router import gate_threshold
from apar_spec.options import DecodeOptions, fork_bias_of, fork_depth

from .prompts import Prompt
from .quality_floor import sibling_blind_answers
from .quality_nll import answer_ids, mean_nll
from .quality_summary import QualitySummary, label_agreement, summarize, well_formed, write_sides


def _read_jsonl(path: Optional[Path]) -> list[dict]:
    if path is None or not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line: that prompt is redone
    return rows


def run_quality(
    target: str,
    base: str,
    prompts: list[Prompt],
    *,
    max_new_tokens: int = 384,  # the budget `apar-spec quality` has always used (it reads this default)
    batch_size: int = 16,
    dtype: str = "bfloat16",
    out: Optional[Path] = None,
    sides: Optional[Path] = None,
    sides_count: int = 10,
    ar_only: bool = False,
    control_dtype: Optional[str] = None,
    max_depth: Optional[int] = None,
    depth_cap: Optional[str] = None,
    fork_bias: Optional[float] = None,
    repeated_title: Optional[str] = None,
    fork_gate: Optional[float] = None,
    floor: bool = False,
    progress=None,
) -> QualitySummary:
    """Greedy base AR and target APAR answers for every prompt (batched), then NLL under the base.

    Two resumable phases: the base's AR answers (+ their NLL) go to ``<out>.ar.jsonl``,
    which does not depend on the APAR model, so it can run before training ends
    (``ar_only``); the APAR answers and the per-prompt rows go to ``out``.

    ``control_dtype`` (e.g. ``"float32"``) adds a control for the NLL ratio: the base's own
    greedy answers decoded again in that precision (``<out>.control.jsonl``, resumable),
    judged like the others. They are the same model's answers, differing only where
    rounding flips a near-tie, so their ratio (``nll_ratio_control``) is what the metric
    gives an answer of unchanged quality.

    ``max_depth``: the fork nesting cap of the APAR answers (None: the target's trained
    nesting, else the decoder's default); ``depth_cap``: what a child at that cap does when
    it asks for [Fork] (None: ``DecodeOptions.depth_cap``); ``fork_bias``: the [Fork] logit
    offset (None: the target's recorded one, else 0); ``repeated_title``: what a branch does
    when it forks after a title it already forked after (None: ``DecodeOptions.repeated_title``);
    ``fork_gate``: the fork router's threshold (None: the target router's own; 0: off). Rows
    record all five (a gate that is off as 0, with each prompt's router score ``p_list`` and
    ``forks_gated`` where one ran), and resume only reuses rows decoded under the same ones.

    ``floor`` adds the sibling-blind floor of the NLL ratio (``sibling_blind_answers``): the
    base's own answer restructured, every child rewritten by the base in the context an APAR
    child sees, scored like the APAR answer (``nll_floor``, ``floor_forks``; resumable in
    ``<out>.floor.jsonl``). It needs only the base, so it is the same for every APAR model.
    ``progress(done, total)`` after each batch of prompts; the floor phase calls it with a
    third argument, ``"floor"``.
    """
    import apar_spec

    from .models import Loaded, encode_prompt, short_name

    t0 = time.perf_counter()
    ar_path = out.with_suffix(".ar.jsonl") if out is not None else None
    ar_done = {
        str(r["prompt_id"]): r
        for r in _read_jsonl(ar_path)
        if r.get("base") == short_name(base) and r.get("max_new_tokens") == max_new_tokens
    }
    tm = tt = None
    depth = max_depth
    cap = depth_cap or DecodeOptions.depth_cap
    bias = fork_bias
    repeat = repeated_title or DecodeOptions.repeated_title
    # bad values: a one-line error before anything loads
    DecodeOptions(depth_cap=cap, fork_bias=fork_bias or 0.0, repeated_title=repeat, fork_gate=fork_gate)
    gate = 0.0  # the threshold in effect (0: no gate)
    if not ar_only:  # loaded first: its trained fork nesting decides which saved rows still count
        tm, tt = apar_spec.load(target, dtype=dtype)
        depth = fork_depth(tm, max_depth)
        bias = fork_bias_of(tm, fork_bias)
        gate = gate_threshold(tm, fork_gate)
    done = {
        str(r["prompt_id"]): r
        for r in _read_jsonl(out)
        if r.get("kind") == "quality"
        and r.get("target") == short_name(target)
        and r.get("max_new_tokens") == max_new_tokens
        and (depth is None or r.get("max_depth", DecodeOptions.max_depth) == depth)  # rows before the cap: the default
        and r.get("depth_cap", "mask") == cap  # rows before the option were decoded as "mask"
        and r.get("fork_bias", 0.0) == (bias or 0.0)
        and r.get("repeated_title", "keep") == repeat  # rows before the option forked on repeats
        and r.get("fork_gate", 0.0) == gate
    }  # rows before the router had none
    bm = bt = None
    ar_todo = [p for p in prompts if p.id not in ar_done and p.id not in done]
    if ar_todo:
        bm, bt = apar_spec.load(base, dtype=dtype)
        _base_answers(
            bm,
            bt,
            bm,
            ar_todo,
            ar_path,
            ar_done,
            "ar",
            short_name(base),
            max_new_tokens,
            batch_size,
            lambda n: progress(n, len(prompts)) if progress else None,
        )
    control: dict[str, dict] = {}
    if control_dtype is not None:
        ctl_path = out.with_suffix(".control.jsonl") if out is not None else None
        control = {
            str(r["prompt_id"]): r
            for r in _read_jsonl(ctl_path)
            if r.get("base") == short_name(base)
            and r.get("max_new_tokens") == max_new_tokens
            and r.get("dtype") == control_dtype
        }
        ctl_todo = [p for p in prompts if p.id not in control]
        if ctl_todo:
            if bm is None:
                bm, bt = apar_spec.load(base, dtype=dtype)
            cm, ct = apar_spec.load(base, dtype=control_dtype)
            _base_answers(
                cm,
                ct,
                bm,
                ctl_todo,
                ctl_path,
                control,
                "control",
                short_name(base),
                max_new_tokens,
                batch_size,
                None,
                extra={"dtype": control_dtype},
            )
            del cm
    rows = [done[p.id] for p in prompts if p.id in done]
    todo = [] if ar_only else [p for p in prompts if p.id not in done]
    if todo:
        if bm is None:
            bm, bt = apar_spec.load(base, dtype=dtype)
        b_loaded, t_loaded = Loaded(short_name(base), bm, bt), Loaded(short_name(target), tm, tt)
        f = out.open("a", encoding="utf-8") if out is not None else None
        try:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                b_ids = [encode_prompt(b_loaded, p.text) for p in chunk]
                t_ids = [encode_prompt(t_loaded, p.text) for p in chunk]
                ap = apar_spec.generate(
                    tm,
                    tt,
                    t_ids,
                    mode="apar",
                    max_new_tokens=max_new_tokens,
                    batch_size=len(chunk),
                    max_depth=depth,
                    depth_cap=cap,
                    fork_bias=bias,
                    repeated_title=repeat,
                    fork_gate=gate,
                )
                nll_ap = mean_nll(bm, bt, b_ids, [g.text for g in ap])
                matched = mean_nll(
                    bm,
                    bt,
                    b_ids,
                    [ar_done[p.id]["ar_text"] for p in chunk],
                    max_tokens=[len(answer_ids(bt, g.text)) for g in ap],
                )
                for p, g, ng, nm in zip(chunk, ap, nll_ap, matched):
                    a = ar_done[p.id]
                    na = a["nll_ar"]
                    row = {
                        "kind": "quality",
                        "prompt_id": p.id,
                        "category": p.category,
                        "target": t_loaded.name,
                        "base": b_loaded.name,
                        "dtype": str(tm.dtype).removeprefix("torch."),
                        "max_new_tokens": max_new_tokens,
                        "max_depth": depth,
                        "depth_cap": cap,
                        "fork_bias": bias,
                        "repeated_title": repeat,
                        "fork_gate": gate,
                        "p_list": g.stats.p_list,
                        "forks_gated": g.stats.forks_gated,
                        "forked": g.forked,
                        "branches": len(g.branches),
                        "repeat_ends": sum(b.finish == "repeat" for b in g.branches),
                        "ar_steps": a["ar_steps"],
                        "apar_steps": g.stats.target_steps,
                        "steps_ratio": g.stats.target_steps / max(1, a["ar_steps"]),
                        "ar_tokens": a["ar_tokens"],
                        "apar_tokens": g.stats.tokens_generated,
                        "apar_critical_path": g.stats.critical_path,
                        "nll_ar": na,
                        "nll_apar": ng,
                        "nll_ratio": ng / na if na and not math.isnan(na) else math.nan,
                        "nll_ar_matched": nm,
                        "well_formed": well_formed(g.text) if g.forked else None,
                        "prompt": p.text,
                        "ar_text": a["ar_text"],
                        "apar_text": g.text,
                    }
                    rows.append(row)
                    if f is not None:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                        f.flush()
                if progress:
                    progress(len(rows), len(prompts))
        finally:
            if f is not None:
                f.close()
    _backfill_matched(rows, prompts, base, dtype, (bm, bt))
    order = {p.id: i for i, p in enumerate(prompts)}
    rows.sort(key=lambda r: order.get(str(r["prompt_id"]), 0))
    for r in rows:
        if str(r["prompt_id"]) in control:
            r["nll_control"] = control[str(r["prompt_id"])]["nll_control"]
    if floor and rows:
        _add_floor(rows, prompts, base, dtype, max_new_tokens, batch_size, out, (bm, bt), progress)
    if sides is not None and rows:
        write_sides(rows, sides, sides_count)
    dtype_name = rows[0]["dtype"] if rows else dtype
    return QualitySummary(
        rows,
        summarize(rows) if rows else {},
        labels=label_agreement(rows),
        wall_s=time.perf_counter() - t0,
        dtype=dtype_name,
    )


def _add_floor(
    rows: list[dict],
    prompts: list[Prompt],
    base: str,
    dtype: str,
    max_new_tokens: int,
    batch_size: int,
    out: Optional[Path],
    loaded: tuple,
    progress=None,
) -> None:
    """``nll_floor`` / ``floor_forks`` on every row: read back from ``<out>.floor.jsonl``, else
    computed from the row's base answer (``sibling_blind_answers``) and appended there, a batch
    of prompts at a time (so an interrupted pass resumes where it stopped)."""
    import apar_spec

    from .models import Loaded, encode_prompt, short_name

    path = out.with_suffix(".floor.jsonl") if out is not None else None
    done = {
        str(r["prompt_id"]): r
        for r in _read_jsonl(path)
        if r.get("base") == short_name(base) and r.get("max_new_tokens") == max_new_tokens
    }
    todo = [r for r in rows if str(r["prompt_id"]) not in done]
    if todo:
        bm, bt = loaded if loaded[0] is not None else apar_spec.load(base, dtype=dtype)
        text = {p.id: p.text for p in prompts}
        f = path.open("a", encoding="utf-8") if path is not None else None
        try:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                b_ids = [
                    encode_prompt(Loaded(short_name(base), bm, bt), text.get(str(r["prompt_id"]), r.get("prompt", "")))
                    for r in chunk
                ]
                blind = sibling_blind_answers(bm, bt, b_ids, [r["ar_text"] for r in chunk], batch_size=batch_size)
                nll = mean_nll(bm, bt, b_ids, [t for t, _ in blind])
                for r, (t, forks), n in zip(chunk, blind, nll):
                    # an answer with no fork is its own floor (the same text, the same NLL)
                    row = {
                        "prompt_id": r["prompt_id"],
                        "base": short_name(base),
                        "max_new_tokens": max_new_tokens,
                        "nll_floor": n if forks else r["nll_ar"],
                        "floor_forks": forks,
                        "floor_text": t,
                    }
                    done[str(r["prompt_id"])] = row
                    if f is not None:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                        f.flush()
                if progress:
                    progress(len(rows) - len(todo) + start + len(chunk), len(rows), "floor")
        finally:
            if f is not None:
                f.close()
    for r in rows:
        fl = done[str(r["prompt_id"])]
        r["nll_floor"], r["floor_forks"] = fl["nll_floor"], fl["floor_forks"]


def _backfill_matched(rows: list[dict], prompts: list[Prompt], base: str, dtype: str, loaded: tuple) -> None:
    """Score the length-matched control for rows saved before it existed (in memory, not in the file)."""
    import apar_spec

    from .models import Loaded, encode_prompt, short_name

    missing = [r for r in rows if "nll_ar_matched" not in r and "ar_text" in r and "apar_text" in r]
    if not missing:
        return
    bm, bt = loaded if loaded[0] is not None else apar_spec.load(base, dtype=dtype)
    text = {p.id: p.text for p in prompts}
    b_ids = [
        encode_prompt(Loaded(short_name(base), bm, bt), text.get(str(r["prompt_id"]), r.get("prompt", "")))
        for r in missing
    ]
    nll = mean_nll(
        bm,
        bt,
        b_ids,
        [r["ar_text"] for r in missing],
        max_tokens=[len(answer_ids(bt, r["apar_text"])) for r in missing],
    )
    for r, n in zip(missing, nll):
        r["nll_ar_matched"] = n


def _base_answers(
    model,
    tokenizer,
    judge,
    prompts: list[Prompt],
    path: Optional[Path],
    done: dict,
    prefix: str,
    base_name: str,
    max_new_tokens: int,
    batch_size: int,
    progress=None,
    extra: Optional[dict] = None,
) -> None:
    """Greedy AR answers of ``model`` (the base, in some precision), their NLL under ``judge``;
    rows (``<prefix>_steps``, ``<prefix>_tokens``, ``nll_<prefix>``, ``<prefix>_text``) are
    appended to ``path`` batch by batch and put in ``done``."""
    import apar_spec

    from .models import Loaded, encode_prompt

    loaded = Loaded(base_name, model, tokenizer)
    f = path.open("a", encoding="utf-8") if path is not None else None
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids = [encode_prompt(loaded, p.text) for p in chunk]
            gens = apar_spec.generate(
                model, tokenizer, ids, mode="ar", max_new_tokens=max_new_tokens, batch_size=len(chunk)
            )
            nll = mean_nll(judge, tokenizer, ids, [g.text for g in gens])
            for p, g, n in zip(chunk, gens, nll):
                r = {
                    "prompt_id": p.id,
                    "base": base_name,
                    "max_new_tokens": max_new_tokens,
                    **(extra or {}),
                    f"{prefix}_steps": g.stats.target_steps,
                    f"{prefix}_tokens": g.stats.tokens_generated,
                    f"nll_{prefix}": n,
                    f"{prefix}_text": g.text,
                }
                done[p.id] = r
                if f is not None:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
                    f.flush()
            if progress:
                progress(len(done))
    finally:
        if f is not None:
            f.close()
