"""Every decoding default, in one place (the API, the CLI and the benchmarks read them here)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Optional, Union

import torch

MODES = ("ar", "apar", "spec", "apar+spec")
SPEC_MODES = ("spec", "apar+spec")  # the modes that draft
APAR_MODES = ("apar", "apar+spec")  # the modes that fork


def check_mode(mode: str) -> str:
    """``mode`` if it is one of ``MODES``, else a one-line ``ValueError`` with the closest name."""
    import difflib

    if mode not in MODES:
        close = difflib.get_close_matches(str(mode), MODES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown mode '{mode}' (choose from {', '.join(MODES)}){hint}")
    return mode


def given(**options) -> dict:
    """The options a user set (not None): pass these and let every other default come from
    its one home (``DecodeOptions``, or what the model records about itself)."""
    return {k: v for k, v in options.items() if v is not None}


DEPTH_CAP_POLICIES = ("end", "mask")  # DecodeOptions.depth_cap
REPEATED_TITLE_POLICIES = ("end", "keep")  # DecodeOptions.repeated_title
KV_LAYOUTS = ("auto", "paged", "padded")  # DecodeOptions.kv_layout

# (context token ids incl. the node's own token, logits [vocab]) -> logits [vocab].
# Must depend only on the branch's own context (DESIGN.md: outputs must not depend on scheduling).
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass
class DecodeOptions:
    """Knobs of one ``generate`` call. Token-changing caps are per branch and deterministic."""

    # Per request, counted over all branches ([Fork] and EOS count, forced [Child] not). It keeps
    # the tokens plain APAR samples first (apar_spec.decoding.clock), so it cuts the same tokens
    # whatever the speculator and however many branches may run at once.
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: Optional[int] = None
    # Fork nesting: a branch at level >= max_depth may not fork (root = level 0). A model that
    # records the nesting it was trained on (``model_decode_defaults``) decodes with that
    # unless the caller gives max_depth; this value is for models that record nothing.
    max_depth: int = 2
    # What a *child* at max_depth does when its model asks for [Fork]. Such a child has run
    # past its own item into the next one (it has just written a sibling's title, which its
    # parent writes too). "end": end the child there and drop that unfinished line (back to
    # its last line break). "mask": forbid the [Fork] and take the best other token - the
    # model's output under the constraint, measured on smollm2-apar as stray words ("Convell
    # The system ...") and repeated items. A root branch at the cap always masks.
    depth_cap: str = "end"
    # What a branch does when it forks after a title it already forked after: the same
    # text, once a list item's number/bullet, markdown and closing colon are set aside, as
    # an earlier forked line of the same run (forked lines back to the branch's last
    # non-blank line without a [Fork]; a header or a paragraph starts a new run, so "Pros:"
    # and "Cons:" may each have a "1. **Cost**"). Such a branch is looping: measured on
    # smollm2-apar, most ill-formed forked lists repeat titles ("4. **Take Care of Your
    # Self-Care**" twice, "The answer is 12." five times), and each repeat spawns a child that
    # writes the same details again. "end": the branch ends there, minus that line (back to
    # its last line break, or to its previous [Fork] on the same line). "keep": fork anyway.
    # It decides on committed tokens only, so speculation stays lossless under it.
    repeated_title: str = "end"
    max_forks_per_branch: int = 16
    # Whether a branch may fork inside a ``` code block (counted over the branch's own answer
    # text: its ancestors' tokens up to the fork and its own). A fork there splits one piece of
    # code over two branches that never see each other; measured on KL-trained SmolLM2
    # adapters, which forked C++ right after "#include <".
    fork_in_code: bool = False
    # Added to the [Fork] logit where a fork is allowed and would spawn a child (below
    # max_depth), before greedy choice or sampling: a calibration knob that trades forks (fewer
    # steps) against quality (forks in answers that want none). Not where a [Fork] ends a child
    # at the cap: that is the child's end-of-item decision, not a fork. Part of the target's
    # distribution, so speculation stays lossless under it. A model may record its own
    # (``model_decode_defaults``); the caller's value wins.
    fork_bias: float = 0.0
    # The fork router's threshold (apar_spec.models.router): a request whose prompt the model's
    # router scores under it as wanting a list, p(list) < fork_gate, decodes with [Fork]
    # disabled - the model's plain answer. Why: forks on short-answer prompts (arithmetic,
    # facts, translations) cost quality and save nothing. None = the threshold the router was
    # fitted with, if the model records a router (no router: no gate); 0 = off. A number
    # > 0 needs a model with a router. It reads the prompt only, so speculation stays lossless.
    fork_gate: Optional[float] = None
    max_branch_tokens: Optional[int] = None  # per-branch cap; None = max_new_tokens
    max_live_branches: Optional[int] = (
        None  # memory bound: extra children wait in a queue (never changes tokens, budget included)
    )
    batch_size: int = 1  # requests decoded together (one cache row each)
    num_draft_tokens: int = 4  # k: draft tokens per branch per step
    # Draft tree per branch (apar_spec.decoding.draft_tree.parse_tree: "K", "chain:K", "topk:WxD", a JSON
    # path list, or a list of paths); None = a chain of num_draft_tokens. "auto" passes validation
    # here and must be resolved (cost model) before decoding; the Decoder refuses it unresolved.
    tree: Optional[Union[str, list]] = None
    # Cap on the tokens ONE target forward takes (each active branch's pending token + its
    # drafts, over the whole batch); drafts beyond it are cut, shared evenly over the branches.
    # Where a wide verify costs more than it saves (a CPU with several live branches), this
    # keeps a step cheap. Never changes greedy tokens; None = no cap.
    max_step_tokens: Optional[int] = None
    adaptive_draft: bool = False  # per branch: k += 2 after a fully accepted draft, k -= 1 otherwise
    max_draft_tokens: int = 16  # ceiling for adaptive k
    compact_threshold: float = 0.25  # drop dead KV slots once they exceed this share of the cache (0 = every step)
    # How the target's KV is held (apar_spec.decoding.paged_cache): "paged" packs every row's new
    # nodes into one forward over a slot pool (no padding); "padded" is the plain reference layout
    # (one row per request, every row as wide as the longest). "auto": paged for a batch of
    # requests and in the serving engine, padded for one request alone (nothing to pad there, and
    # the pool's gathers cost ~0.5 ms a forward: 15-20% on the embedded models). Never changes tokens.
    kv_layout: str = "auto"
    logits_processor: Optional[LogitsProcessor] = None
    eos_token_id: Optional[int | list[int]] = None  # None = from the model's generation config / tokenizer

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0 (got {self.max_new_tokens})")
        if self.max_branch_tokens is not None and self.max_branch_tokens <= 0:
            raise ValueError(f"max_branch_tokens must be > 0 or None (got {self.max_branch_tokens})")
        if self.max_depth < 0 or self.max_forks_per_branch < 0:
            raise ValueError("max_depth and max_forks_per_branch must be >= 0")
        if self.depth_cap not in DEPTH_CAP_POLICIES:
            raise ValueError(f"depth_cap must be one of {', '.join(DEPTH_CAP_POLICIES)} (got {self.depth_cap!r})")
        if self.repeated_title not in REPEATED_TITLE_POLICIES:
            raise ValueError(
                f"repeated_title must be one of {', '.join(REPEATED_TITLE_POLICIES)} (got {self.repeated_title!r})"
            )
        if self.max_live_branches is not None and self.max_live_branches < 1:
            raise ValueError(f"max_live_branches must be >= 1 or None (got {self.max_live_branches})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1 (got {self.num_draft_tokens})")
        # the adaptive ceiling is never below the starting length: one home for that rule
        self.max_draft_tokens = max(self.max_draft_tokens, self.num_draft_tokens)
        if self.tree is not None and not (isinstance(self.tree, str) and self.tree.strip() == "auto"):
            from apar_spec.decoding.draft_tree import parse_tree

            parse_tree(self.tree)  # a malformed shape is a one-line ValueError here, before any work
        if self.max_step_tokens is not None and self.max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be >= 1 or None (got {self.max_step_tokens})")
        if not math.isfinite(self.fork_bias):
            raise ValueError(f"fork_bias must be a finite number (got {self.fork_bias})")
        if self.fork_gate is not None and not (is_finite_number(self.fork_gate) and 0.0 <= self.fork_gate <= 1.0):
            raise ValueError(
                f"fork_gate must be a number in [0, 1] or None (got {self.fork_gate!r}); 0 turns the router off"
            )
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {', '.join(KV_LAYOUTS)} (got {self.kv_layout!r})")
        if not 0.0 <= self.compact_threshold <= 1.0:
            raise ValueError(f"compact_threshold must be in [0, 1] (got {self.compact_threshold})")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def build(cls, **kwargs) -> DecodeOptions:
        """Like the constructor, but an unknown option name is a one-line ValueError with a hint."""
        import difflib

        known = set(cls.names())
        for key in kwargs:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"unknown option '{key}'{hint}")
        return cls(**kwargs)


# The deepest fork nesting a model was trained on, kept in its config (``apar-spec train``
# writes it; an APAR adapter carries it as ``max_depth`` in adapter.json).
TRAINED_DEPTH_KEY = "apar_max_depth"
# A [Fork] logit offset a model was calibrated with (adapter.json: ``fork_bias``).
FORK_BIAS_KEY = "apar_fork_bias"


def model_decode_defaults(model) -> dict:
    """Decode options a model records about its own training; the caller's options win.

    ``max_depth``, why: a model never trained on nested forks still emits ``[Fork]`` inside a child now
    and then, and what it writes after such a fork is out of its training distribution
    (measured on smollm2-apar: stray words right after the nested fork). Capping the
    nesting at the trained depth keeps every branch in distribution. ``fork_bias``: the
    [Fork] logit offset the model was calibrated with (see ``DecodeOptions.fork_bias``).
    """
    config = getattr(model, "config", None)
    out: dict = {}
    depth = getattr(config, TRAINED_DEPTH_KEY, None)
    if isinstance(depth, int) and not isinstance(depth, bool) and depth >= 1:
        out["max_depth"] = depth
    bias = getattr(config, FORK_BIAS_KEY, None)
    if is_finite_number(bias) and bias != 0:
        out["fork_bias"] = float(bias)
    return out


def fork_depth(model, max_depth: Optional[int] = None) -> int:
    """The fork nesting cap a decode of ``model`` runs under: ``max_depth`` if given, else the
    model's recorded one, else ``DecodeOptions.max_depth`` (what ``generate`` resolves)."""
    if max_depth is not None:
        return max_depth
    return model_decode_defaults(model).get("max_depth", DecodeOptions.max_depth)


def is_finite_number(x) -> bool:
    """A real int or float that is not inf/NaN (a bool is not a number here)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fork_bias_of(model, bias: Optional[float] = None) -> float:
    """The [Fork] logit offset a decode of ``model`` runs under: ``bias`` if given, else the
    model's recorded one, else ``DecodeOptions.fork_bias``."""
    if bias is not None:
        return bias
    return model_decode_defaults(model).get("fork_bias", DecodeOptions.fork_bias)
