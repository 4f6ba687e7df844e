"""What a benchmark run measures: its settings (``BenchSettings``) and the configurations planned from them.

Why apart from the loop (``bench.py``): the settings and the variant plan are checked and
built before any model loads (a bad option fails in a second), and the CLI builds settings
without running anything. ``compare_variants`` plans every configuration that applies (one
draft, one k); ``sweep_variants`` the baselines once plus each (draft, k or tree, step cap).
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from apar_spec.options import DecodeOptions

from .models import DEFAULT_TARGET, ModelSet, default_draft
from .prompts import DEFAULT_SET

_D = DecodeOptions
CONFIGS = ("hf-generate", "hf-assisted", "ar", "apar", "spec", "apar+spec")
DRAFT_CONFIGS = ("hf-assisted", "spec", "apar+spec")
APAR_CONFIGS = ("apar", "apar+spec")


@dataclass
class BenchSettings:
    """Everything a run depends on. Decoding defaults come from ``DecodeOptions``."""

    target: str = DEFAULT_TARGET
    base: Optional[str] = None  # None: the target's known base (tiny-apar -> tiny-base), else the target
    draft: Optional[str] = None  # None: tiny-draft for embedded targets, the n-gram draft otherwise
    modes: Optional[Sequence[str]] = None  # None: every configuration that applies
    prompts: str = DEFAULT_SET  # a built-in set, a file, or several files comma-separated (select_prompts)
    category: Optional[str] = None
    limit: Optional[int] = None
    turn: int = 0
    per_category: Optional[int] = None  # at most this many prompts of each category
    max_new_tokens: int = _D.max_new_tokens
    k: int | str = _D.num_draft_tokens  # "auto": the cost model picks k per configuration (apar_spec.costs)
    tree: Optional[str] = _D.tree  # draft tree per branch (parse_tree text); None = a chain of k
    max_step_tokens: Optional[int] = _D.max_step_tokens  # tokens one target forward takes (spec configs); None = no cap
    max_depth: Optional[int] = (
        None  # fork nesting cap (apar modes); None = the model's trained depth, else DecodeOptions'
    )
    depth_cap: Optional[str] = (
        None  # what a capped child asking for [Fork] does (DecodeOptions.depth_cap); None = its default
    )
    fork_bias: Optional[float] = (
        None  # [Fork] logit offset (apar modes); None = the model's recorded one, else DecodeOptions'
    )
    repeated_title: Optional[str] = (
        None  # a fork after a repeated title (DecodeOptions.repeated_title); None = its default
    )
    fork_gate: Optional[float] = (
        None  # the fork router's threshold (DecodeOptions.fork_gate); None = the model's router's own
    )
    # each branch's own cap (DecodeOptions.max_branch_tokens); None = max_new_tokens. HF and ar rows get it as their
    # budget. Why: under a shared budget, which branch is cut depends on how much each step accepted, so a
    # speculative row may hold other (e.g. more repetitive) text than the plain row it is compared with
    max_branch_tokens: Optional[int] = None
    temperature: float = _D.temperature
    top_p: float = _D.top_p
    top_k: int = _D.top_k
    seed: Optional[int] = _D.seed
    repeats: int = 3
    warmup: int = 1
    dtype: Optional[str] = None
    device: Optional[str] = "auto"
    device_map: Optional[str] = None  # "auto": accelerate spreads target and base over the devices (too large for one)
    threads: Optional[int] = None  # torch intra-op threads; None = 1 on CPU (see torch_threads), untouched on GPU
    chat_template: Optional[bool] = None  # None: use the tokenizer's template when it has one
    out: Path = Path("results.jsonl")
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1 (got {self.repeats})")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0 (got {self.warmup})")
        if self.k != "auto" and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"-k must be >= 1 (an integer) or 'auto' (got {self.k})")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1 (got {self.threads})")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; pick one")
        DecodeOptions.build(  # the decoder's own checks, before anything is loaded
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            num_draft_tokens=self.fixed_k,
            tree=self.tree,
            max_step_tokens=self.max_step_tokens,
            **self.given_decode_options,
        )
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (got {self.temperature})")
        if self.modes is not None:
            self.modes = tuple(parse_modes(self.modes))
        if self.device_map is not None and self.device not in (None, "auto"):
            raise ValueError(f"--device-map {self.device_map} places the models itself; drop --device {self.device}")

    @property
    def fixed_k(self) -> int:
        return _D.num_draft_tokens if self.k == "auto" else self.k

    @property
    def given_decode_options(self) -> dict:
        """``max_depth`` / ``depth_cap`` / ``fork_bias`` / ``repeated_title`` / ``max_branch_tokens``
        for ``generate`` only
        when given: otherwise the model's own default (max_depth, fork_bias) or DecodeOptions' applies."""
        given = {
            "max_depth": self.max_depth,
            "depth_cap": self.depth_cap,
            "fork_bias": self.fork_bias,
            "repeated_title": self.repeated_title,
            "fork_gate": self.fork_gate,
            "max_branch_tokens": self.max_branch_tokens,
        }
        return {k: v for k, v in given.items() if v is not None}

    @property
    def hf_budget(self) -> int:
        """HF ``generate``'s budget: one sequence, so a branch cap caps it too (as it caps ``ar``'s root)."""
        return min(self.max_new_tokens, self.max_branch_tokens or self.max_new_tokens)

    @property
    def draft_name(self) -> str:
        return self.draft if self.draft is not None else default_draft(self.target)

    def setup(self) -> dict:
        """What makes two rows comparable; ``resume`` refuses a file whose rows differ here."""
        return {
            "target": self.target,
            "base": self.base,
            "prompts": self.prompts,
            "turn": self.turn,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "dtype": self.dtype,
            "device": self.device,
            "threads": self.threads,
            "chat_template": self.chat_template,
        }

    def setup_id(self) -> str:
        setup = self.setup()
        if self.device_map is not None:  # only then, so files written before the option keep their id
            setup["device_map"] = self.device_map
        setup.update(self.given_decode_options)  # likewise
        return hashlib.sha1(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Variant:
    """One measured configuration: a config name plus the draft and k it uses (if any)."""

    config: str
    draft: Optional[str] = None
    k: Optional[int] = None
    label: str = ""
    tree: Optional[str] = None  # draft tree text (parse_tree); None = a chain of k
    step_cap: Optional[int] = None  # DecodeOptions.max_step_tokens; None = no cap

    @property
    def name(self) -> str:
        return self.label or self.config


def parse_modes(modes: Iterable[str] | str) -> list[str]:
    """Configuration names from a list or a comma-separated string; unknown -> close-name hint."""
    items = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) for m in str(m).split(",")]
    items = [m for m in items if m]
    if not items:
        raise ValueError(f"--modes is empty (choose from {', '.join(CONFIGS)})")
    for m in items:
        if m not in CONFIGS:
            close = difflib.get_close_matches(m, CONFIGS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown mode '{m}' (choose from {', '.join(CONFIGS)}){hint}")
    return list(dict.fromkeys(items))


def compare_variants(
    settings: BenchSettings, ms: ModelSet, say: Optional[Callable[[str], None]] = None
) -> tuple[list[Variant], list[str]]:
    wanted = list(settings.modes or CONFIGS)
    explicit = settings.modes is not None
    variants, notes = [], []
    for config in wanted:
        reason = not_applicable(config, ms)
        if reason:
            if explicit:
                raise ValueError(f"mode '{config}' cannot run: {reason}")
            notes.append(f"{config} skipped: {reason}")
            continue
        uses_draft = config in DRAFT_CONFIGS
        ours = uses_draft and config != "hf-assisted"
        tree = settings.tree if ours else None
        cap = settings.max_step_tokens if ours else None
        label = (
            " ".join([config] + ([f"tree={tree}"] if tree else []) + ([f"cap={cap}"] if cap else []))
            if tree or cap
            else ""
        )
        k = (_auto_k(ms, config, say) if settings.k == "auto" else settings.k) if uses_draft else None
        variants.append(Variant(config, ms.draft.name if uses_draft else None, k, label, tree, cap))
    if not variants:
        raise ValueError("no configuration can run with these models; see --modes")
    return variants, notes


def _auto_k(ms: ModelSet, config: str, say: Optional[Callable[[str], None]] = None) -> int:
    """``-k auto``: the chain length the cost model picks for this configuration's model and draft
    (cached costs, measured first when missing; a default acceptance profile for the draft)."""
    from apar_spec import costs as cm

    d = ms.draft
    if d.kind == "union":
        raise ValueError(f"-k auto: the cost model has no costs for a union of drafts ('{d.name}'); give -k or --tree")
    kind = d.kind if d.kind in cm.KINDS else "model"
    branches = cm.APAR_BRANCHES_GUESS if config in APAR_CONFIGS else 1.0
    shape = cm.resolve_auto(
        ms.for_config(config).model,
        speculator_kind=kind,
        draft_model=d.model,
        draft_name=d.name,
        name=ms.for_config(config).name,
        chains_only=True,
        branches=branches,
        tokenizer=ms.for_config(config).tokenizer,
        say=say,
    )
    return shape.size


def sweep_variants(
    settings: BenchSettings,
    ms: ModelSet,
    drafts: Sequence[str],
    ks: Sequence[int],
    trees: Sequence[str] = (),
    step_caps: Sequence[Optional[int]] = (None,),
):
    wanted = list(settings.modes or CONFIGS)
    base = [c for c in wanted if c not in DRAFT_CONFIGS and not not_applicable(c, ms)]
    for needed in ("ar",):  # speed-ups need the AR baseline
        if needed not in base:
            base.insert(0, needed)
    variants = [Variant(c) for c in base]
    notes = []
    shapes = [(k, None, f"k={k}") for k in ks] + [(None, t, f"tree={t}") for t in trees]
    for name in drafts:
        for (k, tree, what), cap in itertools.product(shapes, step_caps):
            for config in (c for c in wanted if c in DRAFT_CONFIGS):
                if (tree is not None or cap is not None) and config == "hf-assisted":
                    continue  # HF assisted generation drafts chains only, uncapped
                reason = not_applicable(config, ms, draft=name)
                if reason:
                    notes.append(f"{config} {name} skipped: {reason}")
                    continue
                label = f"{config} {name} {what}" + (f" cap={cap}" if cap is not None else "")
                variants.append(Variant(config, name, k if k is not None else settings.k, label, tree, cap))
    return variants, sorted(set(notes))


def not_applicable(config: str, ms: ModelSet, draft: Optional[str] = None) -> Optional[str]:
    if config in APAR_CONFIGS and not ms.target.has_apar_tokens:
        return f"target '{ms.target.name}' has no [Fork]/[Child] tokens (not an APAR model)"
    if config in DRAFT_CONFIGS:
        d = ms.drafts.get(draft) if draft else ms.draft
        if d is None:
            return "no draft given (--draft)"
        if config == "hf-assisted" and d.kind == "heads":
            return "HF assisted generation has no Medusa heads"
        if config == "hf-assisted" and d.kind == "union":
            return "HF assisted generation drafts with one assistant, not a union"
        if config == "hf-assisted" and d.kind == "model":
            tv = ms.baseline.model.config.vocab_size
            dv = d.model.config.vocab_size
            if tv != dv:
                return f"HF assisted generation needs equal vocabulary sizes (draft {dv}, target {tv})"
    return None
