"""Public API: ``generate`` and the ``Generation`` it returns."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from apar_spec.decoding.answer_tree import AnswerTree
from apar_spec.decoding.decoder import Decoder
from apar_spec.decoding.reassemble import BranchInfo, reading_order, to_answer_tree
from apar_spec.decoding.speculator import resolve_draft
from apar_spec.decoding.state import DecodeResult
from apar_spec.decoding.tokens import find_apar_tokens
from apar_spec.decoding.tree_cache import check_supported
from apar_spec.inputs import normalize_prompts
from apar_spec.options import DecodeOptions, check_mode, model_decode_defaults

_D = DecodeOptions  # class attributes hold the one source of every default


@dataclass
class GenerationStats:
    """Per-request measurements. Conventions (vLLM's): acceptance length counts the bonus,
    so plain decoding has 1.0; live KV counts cache slots some live branch can see."""

    target_steps: int  # target forwards this request took part in (prefill included)
    draft_forwards: int  # draft-model forwards during the batch (0 without a draft LM)
    tokens_generated: int  # sampled tokens over all branches ([Fork] and EOS included, forced [Child] not)
    peak_live_kv: int
    mean_live_kv: float
    attended_keys: int  # sum over fed nodes of the slots each attends to (logical attention work)
    critical_path: int  # longest root-to-leaf chain of sampled tokens: a lower bound on steps at 1 token/step
    wall_time_s: float  # of the batch this request was decoded in
    num_branches: int
    accepted: int = 0  # accepted draft tokens
    drafted: int = 0
    mean_acceptance_length: float = 1.0  # accepted + bonus per branch-step
    acceptance_rate_per_position: list[float] = field(default_factory=list)
    # Draft-tree nodes per [depth - 1][rank]: verified = the node's parent path was accepted;
    # accepted = the target's token there was the node's. accepted / verified = p(depth, rank).
    depth_rank_verified: list[list[int]] = field(default_factory=list)
    depth_rank_accepted: list[list[int]] = field(default_factory=list)
    # The fork router (DecodeOptions.fork_gate): its p(list) for the prompt (None: no router in
    # use) and whether it kept the request from forking.
    p_list: Optional[float] = None
    forks_gated: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_generated / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def steps_per_critical_path(self) -> float:
        return self.target_steps / self.critical_path if self.critical_path else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        d["steps_per_critical_path"] = self.steps_per_critical_path
        return d


@dataclass
class Generation:
    text: str  # the reassembled answer
    token_ids: list[int]  # answer tokens in reading order (control tokens and children's EOS dropped)
    branches: list[BranchInfo]
    stats: GenerationStats
    prompt_ids: list[int]
    tree: AnswerTree  # the answer as branches of text with fork offsets

    @property
    def forked(self) -> bool:
        return len(self.branches) > 1

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "branches": [b.to_dict() for b in self.branches],
            "stats": self.stats.to_dict(),
        }


def eos_ids_of(model, tokenizer, override=None) -> set[int]:
    ids = override
    if ids is None:
        ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple, set)) else {int(ids)}


def encode_prompts(tokenizer, prompts: Any, *, vocab_size: Optional[int] = None) -> list[list[int]]:
    """Token ids of each prompt, used as given (no chat template here). Strings, id lists,
    tensors and tokenizer outputs are accepted (``apar_spec.inputs``); anything else, and
    ids outside ``[0, vocab_size)``, is a one-line ``ValueError`` naming the prompt."""
    return normalize_prompts(tokenizer, prompts, vocab_size=vocab_size)


def vocab_size_of(model) -> Optional[int]:
    """Rows of the input embedding: the ids the model can look up (may exceed the tokenizer's)."""
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        return getattr(getattr(model, "config", None), "vocab_size", None)


def generate(
    model,
    tokenizer,
    prompts: Union[Sequence[Any], Any],
    *,
    mode: str = "apar",
    draft: Any = None,
    max_new_tokens: int = _D.max_new_tokens,
    temperature: float = _D.temperature,
    top_p: float = _D.top_p,
    top_k: int = _D.top_k,
    seed: Optional[int] = _D.seed,
    on_step: Optional[Callable[[list, Any], None]] = None,
    on_note: Optional[Callable[[str], None]] = None,
    **options: Any,
) -> list[Generation]:
    """Decode ``prompts`` with the token-tree decoder.

    ``prompts``: a list of strings or token-id lists, or what ``tokenizer(...)`` and
    ``tokenizer.apply_chat_template(..., tokenize=True)`` return (a ``BatchEncoding``,
    single or batched, or a list of them; padding is stripped by its attention mask),
    or a 1D/2D integer tensor (one prompt per row). One ``Generation`` per prompt row.

    ``mode``: ``"ar"`` (plain), ``"apar"`` (branches fork at ``[Fork]``), ``"spec"``
    and ``"apar+spec"`` (a speculator drafts for every active branch; needs
    ``draft``: a registry name, a path/id, a loaded model, or a speculator object).
    ``options``: any field of ``DecodeOptions`` (``max_depth``, ``num_draft_tokens``...);
    ``max_depth`` defaults to the fork nesting the model records it was trained on, if any;
    ``num_draft_tokens="auto"`` / ``tree="auto"``: the cost model's choice (``apar_spec.costs.resolve_auto``).
    ``on_step(requests, tree_cache)``: called after every step with the decoder's live
    requests (their ``branches`` growing) - for live views and tests; must not mutate them.
    ``on_note(text)``: one-line notes the library has for a person (what "auto" picked, a
    cost measurement it had to run first); the library never prints, the caller renders.
    """
    check_mode(mode)
    if options.get("num_draft_tokens") == "auto" or options.get("tree") == "auto":
        # the cost model picks k / the tree from cached pass costs (measured first, once, if missing)
        from apar_spec.costs import resolve_auto_options

        options = resolve_auto_options(model, tokenizer, mode, draft, options, say=on_note)
    opts = DecodeOptions.build(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        **{**model_decode_defaults(model), **options},
    )
    check_supported(model)
    prompt_ids = encode_prompts(tokenizer, prompts, vocab_size=vocab_size_of(model))
    apar = find_apar_tokens(tokenizer) if tokenizer is not None else None
    uses_apar = mode in ("apar", "apar+spec")
    if uses_apar and apar is None:
        raise ValueError(
            f"the tokenizer has no [Fork]/[Child] tokens, so the model cannot run mode='{mode}'; "
            "use mode='ar' (or 'spec'), or an APAR-trained model (see `apar-spec train`)"
        )
    max_pos = getattr(model.config, "max_position_embeddings", None)
    for i, ids in enumerate(prompt_ids):
        if max_pos is not None and len(ids) >= max_pos:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens, more than the model's context of {max_pos - 1}; shorten it"
            )
    speculator = None
    if mode in ("spec", "apar+spec"):
        if draft is None:
            raise ValueError(f"mode='{mode}' needs a draft (a registry name such as 'ngram', a model path, or a model)")
        speculator = resolve_draft(draft, model, tokenizer)
    eos = eos_ids_of(model, tokenizer, opts.eos_token_id)
    decoder = Decoder(model, opts, apar, fork_enabled=uses_apar, eos_ids=eos, speculator=speculator, on_step=on_step)
    results: list[DecodeResult] = []
    for start in range(0, len(prompt_ids), opts.batch_size):
        results.extend(decoder.run(prompt_ids[start : start + opts.batch_size]))
    return [_to_generation(r, tokenizer, apar, eos) for r in results]


def _to_generation(r: DecodeResult, tokenizer, apar, eos: set[int]) -> Generation:
    fork_id = apar.fork_id if apar else None
    child_id = apar.child_id if apar else None
    branches = [BranchInfo(b.id, b.parent, b.fork_index, list(b.tokens), b.finish) for b in r.branches]
    token_ids = reading_order(branches, fork_id, child_id, eos)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else ""

    tree = to_answer_tree(branches, decode, fork_id, child_id)
    c = r.counters
    return Generation(
        text=tree.reassemble(),
        token_ids=token_ids,
        branches=branches,
        stats=GenerationStats(
            target_steps=c.target_steps,
            draft_forwards=r.draft_forwards,
            tokens_generated=sum(b.generated for b in r.branches),
            peak_live_kv=max(c.live_kv, default=0),
            mean_live_kv=sum(c.live_kv) / len(c.live_kv) if c.live_kv else 0.0,
            attended_keys=c.attended_keys,
            critical_path=_critical_path(r),
            wall_time_s=r.wall_time_s,
            num_branches=len(r.branches),
            accepted=c.accepted,
            drafted=c.drafted,
            mean_acceptance_length=c.accept_plus_bonus / c.branch_steps if c.branch_steps else 1.0,
            acceptance_rate_per_position=[a / d for a, d in zip(c.accepted_at, c.drafted_at) if d],
            depth_rank_verified=[list(x) for x in c.depth_rank_verified],
            depth_rank_accepted=[list(x) for x in c.depth_rank_accepted],
            p_list=r.p_list,
            forks_gated=r.forks_gated,
        ),
        prompt_ids=r.prompt,
        tree=tree,
    )


def _critical_path(r: DecodeResult) -> int:
    """Longest chain of sampled tokens from the root to any branch's end."""
    prefix: dict[int, int] = {}
    longest = 0
    for b in r.branches:  # parents come before children
        start = 0
        if b.parent is not None:
            parent = r.branches[b.parent]
            # the parent's sampled tokens up to and including the [Fork] (its forced [Child] excluded)
            start = prefix[b.parent] + (b.fork_index + 1) - (1 if parent.is_child else 0)
        prefix[b.id] = start
        longest = max(longest, start + b.generated)
    return longest
