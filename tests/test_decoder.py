"""The tree decoder against HF generate and against the slow per-branch reference (float64)."""

from __future__ import annotations

import pytest
import torch
from micro import CHILD, EOS, FORK, VOCAB, fork_processor, micro_model, micro_tokenizer

from apar_spec import generate
from apar_spec.decoding.decoder import Decoder
from apar_spec.decoding.reference import reference_decode
from apar_spec.decoding.tokens import AparTokens
from apar_spec.decoding.tree_cache import UnsupportedModelError
from apar_spec.options import DecodeOptions

APAR = AparTokens(FORK, CHILD)
LINE_BREAKS = frozenset(range(5, VOCAB, 3))  # every third word stands in for a line-break token
APAR_LB = AparTokens(FORK, CHILD, LINE_BREAKS)
PROMPTS = [[1, 10, 11, 12, 13, 14], [1, 20, 7], [1, 33, 34, 35, 36, 37, 38, 39, 40, 41]]


def hf_new_tokens(model, prompt, n, eos=None):
    kwargs = {} if eos is None else {"eos_token_id": eos}
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, pad_token_id=0, **kwargs)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_ar_greedy_equals_hf_generate(family):
    model = micro_model(family)
    for prompt in PROMPTS:
        ref = hf_new_tokens(model, prompt, 24)
        got = generate(model, None, [prompt], mode="ar", max_new_tokens=24)[0]
        assert got.token_ids == ref  # same tokens, same length
        assert got.stats.target_steps == len(ref) == got.stats.critical_path


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_ar_stops_at_eos_like_hf(family):
    model = micro_model(family)
    prompt = PROMPTS[0]
    free = hf_new_tokens(model, prompt, 16)
    eos = free[len(free) // 2]  # a token greedy decoding really emits: both must stop there, EOS included
    model.generation_config.eos_token_id = eos
    ref = hf_new_tokens(model, prompt, 16, eos=eos)
    got = generate(model, None, [prompt], mode="ar", max_new_tokens=16)[0]
    assert got.token_ids == ref == free[: free.index(eos) + 1]
    assert got.branches[0].finish == "eos"


def test_unsupported_family_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        generate(model, None, [[1, 2, 3]], mode="ar", max_new_tokens=4)


def test_sliding_window_is_refused():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
    )
    with pytest.raises(UnsupportedModelError, match="sliding"):
        generate(MistralForCausalLM(cfg), None, [[1, 2, 3]], mode="ar", max_new_tokens=4)


def run_tree(model, prompts, opts, *, spec=None, on_step=None):
    dec = Decoder(
        model, opts, APAR, fork_enabled=True, eos_ids={EOS}, speculator=spec, record_logits=True, on_step=on_step
    )
    return dec.run(prompts)


def path_of(branches, b):
    path = []
    while b.parent is not None:
        path.append(b.fork_index)
        b = branches[b.parent]
    return tuple(reversed(path))


def assert_matches_reference(model, prompt, result, opts, apar=APAR):
    ref = reference_decode(model, prompt, opts, apar, True, {EOS})
    got = {path_of(result.branches, b): b for b in result.branches}
    assert set(got) == set(ref), "different tree shape"
    for path, rb in ref.items():
        b = got[path]
        assert b.tokens == rb.tokens, f"branch {path} differs"
        assert len(b.logits) == len(rb.logits)
        for x, y in zip(b.logits, rb.logits):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)
    return ref


CASES = [
    # (family, seed, fork_every, end_child_after, max_depth, max_branch_tokens)
    ("llama", 0, 5, 4, 1, 30),
    ("llama", 1, 4, 3, 2, 28),
    ("llama", 2, 7, 6, 3, 40),
    ("qwen2", 0, 4, 5, 2, 26),
    ("qwen2", 3, 3, 2, 2, 20),
    ("mistral", 0, 5, 3, 2, 30),
    ("mistral", 4, 6, 8, 1, 36),
    ("llama", 5, 3, 6, 3, 24),
]


@pytest.mark.parametrize("family,seed,every,after,depth,cap", CASES)
def test_tree_decoder_equals_per_branch_reference(family, seed, every, after, depth, cap):
    model = micro_model(family, seed=seed)
    opts = DecodeOptions(
        max_new_tokens=2000,
        max_depth=depth,
        max_branch_tokens=cap,
        logits_processor=fork_processor(every, after, salt=seed),
        compact_threshold=0.25,
    )
    for prompt in PROMPTS[:2]:
        result = run_tree(model, [prompt], opts)[0]
        ref = assert_matches_reference(model, prompt, result, opts)
        assert len(ref) >= 3, "the case should exercise several branches"
        assert result.counters.target_steps < sum(b.generated for b in result.branches)


def test_nested_forks_equal_reference_and_respect_max_depth():
    model = micro_model("llama", seed=6)
    for depth in (1, 2, 3):
        opts = DecodeOptions(
            max_new_tokens=4000, max_depth=depth, max_branch_tokens=30, logits_processor=fork_processor(3, 9, salt=6)
        )
        result = run_tree(model, [PROMPTS[0]], opts)[0]
        ref = assert_matches_reference(model, PROMPTS[0], result, opts)
        assert max(len(p) for p in ref) == depth  # nesting reaches max_depth and never exceeds it


@pytest.mark.parametrize("family,seed", [("llama", 0), ("qwen2", 3), ("mistral", 4)])
def test_a_child_asking_to_fork_at_the_depth_cap_ends_at_its_last_line_break(family, seed):
    """depth_cap="end" vs "mask": both equal the reference; the trees have the same branches;
    parents are identical; an ended child is the masked child cut back to a line break."""
    model = micro_model(family, seed=seed)
    base = dict(
        max_new_tokens=3000, max_depth=1, max_branch_tokens=30, logits_processor=fork_processor(4, 9, salt=seed)
    )
    runs = {}
    for policy in ("end", "mask"):
        opts = DecodeOptions(depth_cap=policy, **base)
        result = Decoder(model, opts, APAR_LB, True, {EOS}, record_logits=True).run([PROMPTS[0]])[0]
        assert_matches_reference(model, PROMPTS[0], result, opts, APAR_LB)
        runs[policy] = {path_of(result.branches, b): b for b in result.branches}
    end, mask = runs["end"], runs["mask"]
    assert set(end) == set(mask) and len(end) >= 3
    cut_at_break = 0
    for path, b in end.items():
        m = mask[path].tokens
        assert FORK not in b.tokens[1:] or not path  # no capped child keeps a [Fork]
        if b.finish == "depth":
            n = len(b.tokens)
            assert len(m) > n and m[:n] == b.tokens
            assert n == 1 or b.tokens[-1] not in LINE_BREAKS  # a run of line breaks goes whole
            cut_at_break += m[n] in LINE_BREAKS
        else:
            assert b.tokens == m, f"branch {path} should not differ between the policies"
    assert cut_at_break >= 2, "the case should cut capped children back to a line break"


FENCE_TEXTS = {i: ("```", "```", "``", "`")[i % 4] for i in range(5, VOCAB)}  # fences split over tokens too
APAR_CODE = AparTokens(FORK, CHILD, LINE_BREAKS, FENCE_TEXTS)


def answer_text_inside_code(branches, b, upto):
    """Independent of both decoders: an odd number of ``` in the branch's answer text before
    its token ``upto`` (its ancestors' tokens up to the fork, then its own)."""
    tokens = b.tokens[:upto]
    while b.parent is not None:
        parent = branches[b.parent]
        tokens = parent.tokens[: b.fork_index + 1] + tokens
        b = parent
    return "".join(FENCE_TEXTS.get(t, "x") for t in tokens).count("```") % 2 == 1


def test_fence_state_by_hand():
    from apar_spec.decoding.fork_rules import Fence

    assert Fence().after("```python") == Fence(True, 0)
    assert Fence().after("``").after("`") == Fence(True, 0)  # split over two tokens
    assert Fence().after("``").after(None).after("`") == Fence(False, 1)  # another token between: no fence
    assert Fence().after("````") == Fence(True, 1)
    assert Fence(True, 0).after("\n```") == Fence(False, 0)
    assert Fence(True, 2).after(None) == Fence(True, 0)


@pytest.mark.parametrize("family,seed", [("llama", 0), ("qwen2", 3)])
def test_no_fork_inside_a_code_fence(family, seed):
    """fork_in_code=False (the default) bans [Fork] while the branch's answer text is inside a
    ``` block; both settings equal the reference; the rule really changes the tree."""
    model = micro_model(family, seed=seed)
    trees, inside = {}, {}
    for allowed in (False, True):
        opts = DecodeOptions(
            max_new_tokens=3000,
            max_depth=2,
            max_branch_tokens=30,
            fork_in_code=allowed,
            logits_processor=fork_processor(4, 6, salt=seed),
        )
        result = Decoder(model, opts, APAR_CODE, True, {EOS}, record_logits=True).run([PROMPTS[0]])[0]
        assert_matches_reference(model, PROMPTS[0], result, opts, APAR_CODE)
        got = {path_of(result.branches, b): b for b in result.branches}
        trees[allowed] = {p: b.tokens for p, b in got.items()}
        inside[allowed] = sum(
            answer_text_inside_code(result.branches, b, i)
            for b in result.branches
            for i, t in enumerate(b.tokens)
            if t == FORK
        )
        assert len(got) >= 3
    assert inside[False] == 0
    assert inside[True] >= 1, "the case should fork inside code when allowed"
    assert trees[False] != trees[True]


@pytest.mark.parametrize("family,seed,depth", [("llama", 0, 2), ("qwen2", 3, 1)])
def test_fork_bias_moves_the_fork_decision_and_equals_the_reference(family, seed, depth):
    """fork_bias is added to the [Fork] logit where a fork is allowed and would spawn a child:
    -20 overturns even the processor's forced forks (a +10 margin), +1 adds forks; each tree
    equals the reference, which applies the bias on its own (and not to a child at the depth
    cap, whose [Fork] ends it: depth_cap="end")."""
    model = micro_model(family, seed=seed)
    forks, ends = {}, {}
    for bias in (-20.0, 0.0, 1.0):
        opts = DecodeOptions(
            max_new_tokens=3000,
            max_depth=depth,
            max_branch_tokens=30,
            fork_bias=bias,
            logits_processor=fork_processor(7, 6, salt=seed),
        )
        result = Decoder(model, opts, APAR_LB, True, {EOS}, record_logits=True).run([PROMPTS[0]])[0]
        assert_matches_reference(model, PROMPTS[0], result, opts, APAR_LB)
        forks[bias] = sum(t == FORK for b in result.branches for t in b.tokens)
        ends[bias] = sum(b.finish == "depth" for b in result.branches)
    assert forks[-20.0] == 0
    assert forks[1.0] > forks[0.0] >= 1
    assert ends[1.0] >= 1, "the case should end a capped child by its [Fork]"


def test_a_model_records_its_fork_bias_and_the_caller_can_override_it():
    model = micro_model("llama", seed=0)
    kw = dict(max_new_tokens=3000, max_branch_tokens=30, max_depth=2, logits_processor=fork_processor(7, 6, salt=0))

    def tree(**extra):
        g = generate(model, micro_tokenizer(), [PROMPTS[0]], mode="apar", **kw, **extra)[0]
        return len(g.branches), g.token_ids

    default = tree()
    model.config.apar_fork_bias = -20.0
    try:
        recorded, explicit = tree(), tree(fork_bias=0.0)
    finally:
        del model.config.apar_fork_bias
    assert default[0] >= 3 and recorded[0] == 1
    assert recorded == tree(fork_bias=-20.0) and explicit == default


def test_cut_to_last_line_drops_the_fork_and_the_line_before_it():
    from apar_spec.decoding.fork_rules import cut_to_last_line

    nl = frozenset({9})
    for before, after in [
        ([CHILD, 5, 9, 6, 7, FORK], [CHILD, 5]),  # back to the line break
        ([CHILD, 5, 9, 9, 6, FORK], [CHILD, 5]),  # a blank line (two breaks) goes whole
        ([CHILD, 9, 6, FORK], [CHILD]),  # nothing left but [Child]
        ([CHILD, 5, 6, FORK], [CHILD, 5, 6]),  # no line break: only the [Fork] goes
        ([CHILD, 5, 9, FORK], [CHILD, 5]),
    ]:
        tokens = list(before)
        cut_to_last_line(tokens, nl, start=1)
        assert tokens == after, before


def test_a_root_at_depth_cap_zero_masks_instead_of_ending():
    model = micro_model("llama", seed=1)
    opts = DecodeOptions(
        max_new_tokens=200, max_depth=0, max_branch_tokens=20, logits_processor=fork_processor(3, 5, salt=1)
    )
    result = Decoder(model, opts, APAR_LB, True, {EOS}).run([PROMPTS[0]])[0]
    assert len(result.branches) == 1 and result.branches[0].finish == "length"
    assert FORK not in result.branches[0].tokens


def test_a_model_records_its_trained_fork_depth_and_the_caller_can_override_it():
    """``config.apar_max_depth`` (written by training / an adapter) caps nesting like max_depth;
    an explicit max_depth still wins, and a model without it keeps DecodeOptions' default."""
    model = micro_model("llama", seed=6)
    kw = dict(max_new_tokens=4000, max_branch_tokens=30, logits_processor=fork_processor(3, 9, salt=6))

    def nesting(**extra):
        g = generate(model, micro_tokenizer(), [PROMPTS[0]], mode="apar", **kw, **extra)[0]
        level = {b.id: 0 if b.parent is None else None for b in g.branches}
        for b in g.branches:  # parents come before their children
            if b.parent is not None:
                level[b.id] = level[b.parent] + 1
        return max(level.values()), g.token_ids

    default_depth, default_ids = nesting()
    assert default_depth == DecodeOptions.max_depth
    model.config.apar_max_depth = 1
    try:
        recorded, recorded_ids = nesting()
        explicit, explicit_ids = nesting(max_depth=3)
    finally:
        del model.config.apar_max_depth
    assert recorded == 1 and recorded_ids == nesting(max_depth=1)[1] != default_ids
    assert explicit == 3 and explicit_ids == nesting(max_depth=3)[1]


def test_batched_requests_and_live_branch_bound_do_not_change_tokens():
    model = micro_model("llama", seed=1)
    base = dict(max_new_tokens=2000, max_depth=2, max_branch_tokens=24, logits_processor=fork_processor(4, 3, salt=1))
    alone = [run_tree(model, [p], DecodeOptions(**base))[0] for p in PROMPTS]
    batched = run_tree(model, PROMPTS, DecodeOptions(**base))
    bounded = run_tree(model, PROMPTS, DecodeOptions(max_live_branches=2, **base))
    for a, b, c in zip(alone, batched, bounded):
        key = lambda r: {path_of(r.branches, x): x.tokens for x in r.branches}
        assert key(a) == key(b) == key(c)
        assert len(a.branches) >= 3
    # the bound really bounds, and costs steps
    assert sum(r.counters.target_steps for r in bounded) > sum(r.counters.target_steps for r in batched)


def brute_force_visible(tc_row, anchors):
    """Nodes reachable by walking parents from every anchor (each live branch's newest cached node)."""
    seen = set()
    for n in anchors:
        while n >= 0 and n not in seen:
            seen.add(n)
            n = tc_row.parent[n]
    return seen


def test_live_kv_equals_nodes_some_live_branch_can_see():
    model = micro_model("qwen2", seed=2)
    checked = []

    def on_step(live, tc):
        # compact_threshold=0: the slot axis is exactly as wide as the row with the most live KV
        # (a narrower row's dead slots cost nothing: every row spans the same width anyway)
        assert tc.num_slots == max(r.counters.live_kv[-1] for r in live)
        for r in live:
            row = tc.rows[r.row]
            anchors = []
            for b in r.branches:
                if not (b.active or b.id in r.queue):
                    continue
                if b.nodes:
                    anchors.append(b.nodes[-1])
                elif b.parent is None:
                    anchors.append(r.prompt_nodes[-1])
                elif b.fork_index < len(r.branches[b.parent].nodes):
                    anchors.append(r.branches[b.parent].nodes[b.fork_index])
                # else: its [Fork] is the parent's pending token; the parent's anchor covers it
            if not anchors:
                continue
            visible = brute_force_visible(row, anchors)
            in_cache = {n for n in row.slot_node if n >= 0}
            assert visible <= in_cache
            assert r.counters.live_kv[-1] == len(visible)
            if r.counters.live_kv[-1] == tc.num_slots:
                assert in_cache == visible  # the widest row holds exactly its visible nodes
            checked.append(len(visible))

    opts = DecodeOptions(
        max_new_tokens=2000,
        max_depth=2,
        max_branch_tokens=22,
        logits_processor=fork_processor(4, 3, salt=2),
        compact_threshold=0.0,
    )
    results = run_tree(model, PROMPTS[:2], opts, on_step=on_step)
    assert len(checked) > 20
    assert max(len(r.branches) for r in results) >= 3
    # finished branches free KV: the live count falls at some step
    lk = results[0].counters.live_kv
    assert any(b < a for a, b in zip(lk, lk[1:]))


def test_generate_apar_reassembles_and_reports_stats():
    model = micro_model("llama", seed=1)
    tok = micro_tokenizer()
    prompt = "w5 w6 w7 w8"
    out = generate(
        model,
        tok,
        [prompt],
        mode="apar",
        max_new_tokens=400,
        max_branch_tokens=24,
        logits_processor=fork_processor(4, 3, salt=1),
    )[0]
    assert out.forked and out.stats.num_branches == len(out.branches) >= 3
    assert FORK not in out.token_ids and CHILD not in out.token_ids
    assert out.stats.tokens_generated == sum(len(b.token_ids) - (b.parent is not None) for b in out.branches)
    # every sampled token but the control tokens and children's EOS appears once, in reading order
    n_ctrl = sum(t == FORK for b in out.branches for t in b.token_ids)
    n_child_eos = sum(b.token_ids[-1] == EOS for b in out.branches if b.parent is not None)
    assert len(out.token_ids) == out.stats.tokens_generated - n_ctrl - n_child_eos
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True).replace("  ", " ") or out.text
    assert out.stats.critical_path <= out.stats.target_steps < out.stats.tokens_generated
    assert out.stats.peak_live_kv >= out.stats.mean_live_kv > 0


def test_sampling_is_reproducible_with_a_seed():
    model = micro_model("llama", seed=1)
    kw = dict(mode="apar", max_new_tokens=60, temperature=0.9, top_p=0.9, logits_processor=fork_processor(4, 3))
    a = generate(model, micro_tokenizer(), ["w1 w2 w3"], seed=7, **kw)[0]
    b = generate(model, micro_tokenizer(), ["w1 w2 w3"], seed=7, **kw)[0]
    c = generate(model, micro_tokenizer(), ["w1 w2 w3"], seed=8, **kw)[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=["  "]), "prompt 0 is empty"),
        (dict(prompts=["w1"], max_new_tokens=0), "max_new_tokens must be > 0"),
        (dict(prompts=["w1"], mode="fast"), "unknown mode"),
        (dict(prompts=["w1"], max_dept=2), "did you mean 'max_depth'"),
        (dict(prompts=["w1"], depth_cap="stop"), "depth_cap must be one of end, mask"),
        (dict(prompts=[[1] * 600]), "more than the model's context"),
        (dict(prompts=["w1"], mode="spec"), "needs a draft"),
    ],
)
def test_bad_input_is_a_clear_value_error(kwargs, message):
    model = micro_model("llama")
    prompts = kwargs.pop("prompts")
    with pytest.raises(ValueError, match=message):
        generate(model, micro_tokenizer(), prompts, **kwargs)


def test_apar_mode_without_apar_tokens_suggests_ar():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")))
    with pytest.raises(ValueError, match="mode='ar'"):
        generate(micro_model("llama"), plain, ["a b"], mode="apar")


def test_requests_finishing_at_the_first_token_leave_the_batch():
    model = micro_model("llama", seed=1)
    first = hf_new_tokens(model, PROMPTS[1], 1)[0]
    model.generation_config.eos_token_id = first  # request 1 ends at its first token, the others go on
    outs = generate(model, None, PROMPTS, mode="ar", max_new_tokens=10, batch_size=3)
    alone = [generate(model, None, [p], mode="ar", max_new_tokens=10)[0] for p in PROMPTS]
    assert outs[1].token_ids == [first] and outs[1].stats.target_steps == 1
    assert [o.token_ids for o in outs] == [a.token_ids for a in alone]
    one = generate(model, None, [PROMPTS[1]], mode="ar", max_new_tokens=10)[0]
    assert one.token_ids == [first]


def test_grouped_kv_attention_gives_the_sdpa_logits_and_restores_the_model():
    """The target's CPU tree forward reads grouped K/V in place (sdpa_gqa_attention): same
    logits as transformers' own sdpa path, and the model's attention setting is untouched
    afterwards, even when the forward fails. The decoder asks for it for the target only."""
    from apar_spec.decoding import tree_cache as tc_mod

    model = micro_model("qwen2", seed=3)  # 4 query heads, 2 KV heads
    assert model.config._attn_implementation == "sdpa" and tc_mod.uses_gqa_attention(model)
    calls = []
    real = tc_mod.sdpa_gqa_attention

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    from transformers import AttentionInterface

    AttentionInterface.register(tc_mod.GQA_ATTENTION, counting)
    try:
        results = {}
        for gqa in (True, False):
            tc = tc_mod.TreeCache(model, 2, gqa_attention=gqa)
            assert tc.gqa == gqa
            a = tc.add_chain(0, PROMPTS[0], -1)
            tc.add_chain(1, PROMPTS[1], -1)
            first = tc.forward().logits
            tc.add(0, 7, a[-1]), tc.add(0, 9, a[-1])  # two siblings under the same parent: a tree
            results[gqa] = (first, tc.forward().logits)
            assert model.config._attn_implementation == "sdpa"
        assert len(calls) == 2 * model.config.num_hidden_layers  # two forwards, every layer
        for x, y in zip(results[True], results[False]):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    finally:
        AttentionInterface.register(tc_mod.GQA_ATTENTION, real)
    tc = tc_mod.TreeCache(model, 1, gqa_attention=True)
    tc.add(0, VOCAB + 5, -1)
    tc.add(
        0, VOCAB + 6, 0
    )  # two query tokens: the switch happens  # out of the vocabulary: the embedding lookup fails inside the block
    with pytest.raises(IndexError):
        tc.forward()
    assert model.config._attn_implementation == "sdpa"


def test_the_decoder_gives_grouped_kv_attention_to_the_target_only(monkeypatch):
    from apar_spec.drafts.draft_lm import DraftModelSpeculator

    model, draft = micro_model("llama", seed=1), micro_model("llama", seed=2, layers=1)
    seen = {}
    real = Decoder.prefill

    def spy(self, *a, **k):
        requests, tc = real(self, *a, **k)
        seen["target"] = tc.gqa
        return requests, tc

    monkeypatch.setattr(Decoder, "prefill", spy)
    spec = DraftModelSpeculator(draft, mask_ids=(CHILD,))
    opts = DecodeOptions(max_new_tokens=8, kv_layout="padded")  # the paged layout never copies groups either way
    Decoder(model, opts, APAR, True, {EOS}, speculator=spec).run([PROMPTS[0]])
    assert seen["target"] is True and spec.tc.gqa is False
