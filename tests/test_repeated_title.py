"""DecodeOptions.repeated_title: a branch that forks after a title it already forked after
(in the same run of forked lines) ends there, minus that title; checked against the
per-branch reference, under speculation, in streams, and on a scripted answer."""

from __future__ import annotations

import pytest
import torch
from micro import CHILD, EOS, FORK, VOCAB, fork_processor, micro_model
from test_spec import speculators

from apar_spec.decoding.decoder import Decoder
from apar_spec.decoding.fork_rules import open_segment_start, title_key, title_run
from apar_spec.decoding.reference import reference_decode
from apar_spec.decoding.tokens import AparTokens
from apar_spec.options import DecodeOptions
from apar_spec.training.restructure import cut_repeated_items

LINE_BREAKS = frozenset(range(5, VOCAB, 3))
# Few distinct texts, so that short forked segments often repeat: " a", " b", a list number,
# markdown (the last two are set aside by the comparison).
TEXTS = tuple("" if i < 5 else "\n" if i in LINE_BREAKS else (" a", " b", " 7.", "**")[i % 4] for i in range(VOCAB))
APAR = AparTokens(FORK, CHILD, LINE_BREAKS, {}, TEXTS)
PROMPTS = [[1, 10, 11, 12, 13, 14], [1, 20, 7], [1, 33, 34, 35, 36]]


def fork_path(branches, b) -> tuple:
    return () if b.parent is None else fork_path(branches, branches[b.parent]) + (b.fork_index,)


def trees(results) -> list[dict]:
    return [{fork_path(r.branches, b): (b.tokens, b.finish) for b in r.branches} for r in results]


def test_title_key_sets_aside_numbers_bullets_markdown_case_and_the_colon():
    assert (
        title_key("3. **Be Considerate of the Host**:")
        == title_key("9) be considerate  of the host")
        == "be considerate of the host"
    )
    assert title_key("- Cost") == title_key("**Cost**") == title_key("# cost:") == "cost"
    assert title_key("1234. x") == "1234. x"  # not an item number
    assert title_key("12.") is None and title_key("  ** : ") is None  # nothing to compare
    assert title_key("The answer is 12.") != title_key("The answer is 13.")


def test_title_run_by_hand():
    """Forked segments back to the last non-blank line without a [Fork]; blank lines do not
    end a run, a header does."""
    words = {10: "Intro", 11: "Pros:", 12: "1. A", 13: "2. B", 14: "\n", 15: " tail", 16: "\n\n"}
    texts = tuple(words.get(i, "") for i in range(VOCAB))
    toks = [10, 14, 11, 14, 12, FORK, 16, 13, FORK, 15, 14, 12]
    keys, segment = title_run(texts, FORK, toks)
    assert keys == {"a", "b"} and segment == "1. A"
    keys, _ = title_run(texts, FORK, [12, FORK, 14, 11, 14, 12])  # "Pros:" starts a new run
    assert keys == set()
    keys, segment = title_run(texts, FORK, [12, FORK, 13, FORK, 15])  # forks on one line
    assert keys == {"a", "b"} and segment == " tail"
    # the cut point: the last run of line breaks, or just after a later [Fork]
    assert open_segment_start([12, FORK, 14, 16, 13], frozenset({14, 16}), FORK, 0, 5) == 2
    assert open_segment_start([12, FORK, 14, 13, FORK, 15], frozenset({14, 16}), FORK, 0, 6) == 5
    assert open_segment_start([12, 13], frozenset({14}), FORK, 0, 2) == 0


def scripted(root: list[int], child: list[int]):
    """A processor that makes the root write ``root`` (then EOS) and every child ``child``
    (then EOS), whatever the model: each position's token gets a +100 margin."""

    def proc(ctx: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        if CHILD in ctx:
            i = len(ctx) - 1 - max(j for j, t in enumerate(ctx) if t == CHILD)
            script = child
        else:
            i = len(ctx) - len(PROMPT)
            script = root
        logits[script[i] if i < len(script) else EOS] = logits.max() + 100.0
        return logits

    return proc


PROMPT = [1, 20, 7]
W = {"1.": 10, "2.": 11, "3.": 12, "4.": 13, " A": 15, " B": 16, " C": 18, ":": 19, "\n": 5, "Cons": 21, " x": 22}
SCRIPT_TEXTS = tuple({v: k for k, v in W.items()}.get(i, "?") for i in range(VOCAB))
SCRIPT_APAR = AparTokens(FORK, CHILD, frozenset({5}), {}, SCRIPT_TEXTS)


@pytest.mark.parametrize("policy", ["end", "keep"])
def test_a_root_that_repeats_a_title_ends_before_it(policy):
    """1. A [Fork] 2. B [Fork] 3. A [Fork] 4. C [Fork]: under "end" the root stops after
    "2. B:[Fork]" (two children); under "keep" it writes on (four children)."""
    w = W
    root = [
        w["1."],
        w[" A"],
        w[":"],
        FORK,
        w["\n"],
        w["2."],
        w[" B"],
        w[":"],
        FORK,
        w["\n"],
        w["3."],
        w[" A"],
        w[":"],
        FORK,
        w["\n"],
        w["4."],
        w[" C"],
        FORK,
    ]
    opts = DecodeOptions(
        max_new_tokens=400, max_depth=1, repeated_title=policy, logits_processor=scripted(root, [w[" x"], w[" x"]])
    )
    model = micro_model("llama", seed=0)
    result = Decoder(model, opts, SCRIPT_APAR, True, {EOS}).run([PROMPT])[0]
    ref = reference_decode(model, PROMPT, opts, SCRIPT_APAR, True, {EOS})
    assert {fork_path(result.branches, b): b.tokens for b in result.branches} == {p: rb.tokens for p, rb in ref.items()}
    r0 = result.branches[0]
    if policy == "end":
        assert r0.tokens == root[:9] and r0.finish == "repeat"
        assert len(result.branches) == 3
    else:
        assert r0.tokens == root + [EOS] and len(result.branches) == 5


def test_a_header_starts_a_new_run():
    """ "1. A [Fork]" under a header, then "Cons" and "1. A [Fork]" again: a new list, no repeat."""
    w = W
    root = [
        w["1."],
        w[" A"],
        FORK,
        w["\n"],
        w["Cons"],
        w["\n"],
        w["1."],
        w[" A"],
        FORK,
        w["\n"],
        w["2."],
        w[" A"],
        FORK,
    ]
    opts = DecodeOptions(max_new_tokens=400, max_depth=1, logits_processor=scripted(root, [w[" x"]]))
    result = Decoder(micro_model("llama", seed=0), opts, SCRIPT_APAR, True, {EOS}).run([PROMPT])[0]
    r0 = result.branches[0]
    assert r0.finish == "repeat" and r0.tokens == root[:9]  # only the third "A" (same run as the second) ends it
    assert len(result.branches) == 3


CASES = [("llama", 0, 3, 4, 1, 30), ("qwen2", 3, 3, 2, 2, 26), ("mistral", 1, 4, 5, 2, 30), ("llama", 5, 3, 6, 1, 24)]


@pytest.mark.parametrize("family,seed,every,after,depth,cap", CASES)
def test_random_trees_equal_the_reference_under_both_policies(family, seed, every, after, depth, cap):
    """Logits, tokens and tree shape equal the per-branch reference (which applies the rule
    on its own), some branch ends on a repeat, and the rule really changes the tree."""
    model = micro_model(family, seed=seed)
    got = {}
    for policy in ("end", "keep"):
        opts = DecodeOptions(
            max_new_tokens=3000,
            max_depth=depth,
            max_branch_tokens=cap,
            repeated_title=policy,
            logits_processor=fork_processor(every, after, salt=seed),
        )
        results = Decoder(model, opts, APAR, True, {EOS}, record_logits=True).run(PROMPTS)
        for prompt, result in zip(PROMPTS, results):
            ref = reference_decode(model, prompt, opts, APAR, True, {EOS})
            mine = {fork_path(result.branches, b): b for b in result.branches}
            assert set(mine) == set(ref), "different tree shape"
            for path, rb in ref.items():
                assert mine[path].tokens == rb.tokens, f"branch {path} differs"
                assert len(mine[path].logits) == len(rb.logits)
                for x, y in zip(mine[path].logits, rb.logits):
                    torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)
        got[policy] = trees(results)
        repeats = sum(b.finish == "repeat" for r in results for b in r.branches)
        assert (repeats >= 1) if policy == "end" else (repeats == 0)
    assert got["end"] != got["keep"]


@pytest.mark.parametrize("kind", ["self", "random", "ngram"])
def test_speculation_is_lossless_under_the_rule(kind):
    """A drafted [Fork] after a repeated title ends the branch exactly as plain decoding does."""
    model = micro_model("llama", seed=0)
    proc = fork_processor(3, 4, salt=0)

    def run(spec=None, k=1):
        opts = DecodeOptions(
            max_new_tokens=900, max_branch_tokens=30, max_depth=2, logits_processor=proc, num_draft_tokens=k
        )
        return trees(Decoder(model, opts, APAR, True, {EOS}, speculator=spec).run(PROMPTS))

    plain = run()
    assert sum(f == "repeat" for t in plain for _, f in t.values()) >= 1
    for k in (1, 3):
        assert run(speculators(model, proc, 0)[kind](), k) == plain


def test_a_stream_never_sends_a_title_the_rule_later_cuts():
    """settled_length holds back the open segment of a branch inside a run of forked titles:
    every prefix it reported after a step is a prefix of the branch's final tokens."""
    model = micro_model("qwen2", seed=3)
    opts = DecodeOptions(
        max_new_tokens=3000, max_depth=2, max_branch_tokens=26, logits_processor=fork_processor(3, 2, salt=3)
    )
    seen: list[tuple[int, int, list[int]]] = []
    dec = None

    def on_step(live, tc):
        for r in live:
            for b in r.branches:
                seen.append((r.index, b.id, list(b.tokens[: dec.rules.settled_length(b)])))

    dec = Decoder(model, opts, APAR, True, {EOS}, on_step=on_step)
    results = dec.run(PROMPTS)
    assert sum(b.finish == "repeat" for r in results for b in r.branches) >= 1
    for index, bid, prefix in seen:
        assert results[index].branches[bid].tokens[: len(prefix)] == prefix


def test_cut_repeated_items_by_hand():
    loop = "Intro\n1. **Sleep**: rest.\n2. **Eat**: food.\n3. **sleep:** again.\n4. More"
    assert cut_repeated_items(loop) == "Intro\n1. **Sleep**: rest.\n2. **Eat**: food."
    fresh = "Pros:\n1. Cost: low.\n2. Speed: high.\nCons:\n1. Cost: hidden.\n2. Size: big."
    assert cut_repeated_items(fresh) == fresh  # a list that restarts at 1 is a new list
    nested = "1. A: x.\n   1. B: y.\n   2. B: y.\n2. C: z."
    assert cut_repeated_items(nested) == nested  # only top-level items count
    code = "1. A: x.\n```\n1. A: x.\n```\n2. B: y."
    assert cut_repeated_items(code) == code  # never inside a code block
    untitled = "1. Mix the flour.\n2. Add eggs.\n3. Mix the flour."
    assert cut_repeated_items(untitled) == "1. Mix the flour.\n2. Add eggs."  # no title: the whole line
