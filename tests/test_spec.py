"""Speculation across branches: lossless greedy, one target forward per step, the draft registry."""

from __future__ import annotations

import json

import pytest
from apar_spec.drafts.draft_lm import DraftModelSpeculator
from apar_spec.drafts.ngram import NGramSpeculator
from apar_spec.drafts.registry import get, load_user_entries, resolve, vocab_fingerprint
from micro import CHILD, EOS, FORK, VOCAB, fork_processor, micro_model, micro_tokenizer

from apar_spec import generate
from apar_spec.decoding.decoder import Decoder
from apar_spec.decoding.tokens import AparTokens
from apar_spec.options import DecodeOptions

PROMPTS = ["w10 w11 w12 w13 w14", "w20 w7", "w5 w6 w5 w6 w5"]


def tree_key(gen):
    """Branches keyed by their fork path (ids may differ between schedules): token ids, lengths included."""

    def path(b):
        p = []
        while b.parent is not None:
            p.append(b.fork_index)
            b = gen.branches[b.parent]
        return tuple(reversed(p))

    return {path(b): b.token_ids for b in gen.branches}


def fork_path(branches, b) -> tuple:
    """A branch's fork indices from the root (branch ids may differ between schedules)."""
    return () if b.parent is None else fork_path(branches, branches[b.parent]) + (b.fork_index,)


def decode_trees(model, apar, prompts, opts, spec=None) -> list[dict]:
    """Each request's branches as {fork path: tokens}, decoded by the tree decoder."""
    results = Decoder(model, opts, apar, True, {EOS}, speculator=spec).run(prompts)
    return [{fork_path(r.branches, b): b.tokens for b in r.branches} for r in results]


class Recorder:
    """Wraps a speculator and records (branch, tokens before the step, drafted, accepted)."""

    def __init__(self, inner):
        self.inner, self.name, self.log = inner, inner.name, []

    forwards = property(lambda self: self.inner.forwards)

    def reset(self, *a, **kw):
        self.inner.reset(*a, **kw)

    def propose(self, views, sampling):
        self.last = self.inner.propose(views, sampling)
        return self.last

    def observe(self, outcome):
        for v, a in zip(outcome.views, outcome.accepted):
            self.log.append(((v.request, v.branch), len(v.tokens), v.k, a))
        self.inner.observe(outcome)


def speculators(model, proc, seed):
    return {
        "self": lambda: DraftModelSpeculator(model, mask_ids=(CHILD,), logits_processor=proc),
        "random": lambda: DraftModelSpeculator(micro_model("llama", seed=100 + seed, hidden=16), mask_ids=(CHILD,)),
        "ngram": lambda: NGramSpeculator(),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["self", "random", "ngram"])
def test_speculation_is_lossless_in_greedy(seed, kind):
    model = micro_model("llama" if seed != 1 else "qwen2", seed=seed)
    tok = micro_tokenizer()
    proc = fork_processor(3, 3, salt=seed)
    kw = dict(max_new_tokens=600, max_branch_tokens=22, max_depth=8, logits_processor=proc, batch_size=3)
    for plain_mode, spec_mode in [("ar", "spec"), ("apar", "apar+spec")]:
        plain = generate(model, tok, PROMPTS, mode=plain_mode, **kw)
        for k in (1, 3):
            spec = generate(
                model,
                tok,
                PROMPTS,
                mode=spec_mode,
                draft=speculators(model, proc, seed)[kind](),
                num_draft_tokens=k,
                **kw,
            )
            for p, s in zip(plain, spec):
                assert tree_key(s) == tree_key(p)  # same tree, same tokens, same lengths
                assert s.token_ids == p.token_ids and s.text == p.text
                assert s.stats.target_steps <= p.stats.target_steps
        if plain_mode == "apar":
            assert max(len(g.branches) for g in plain) >= 3  # drafts really cross [Fork] and EOS


@pytest.mark.parametrize("kind", ["self", "random", "ngram"])
def test_speculation_is_lossless_where_capped_children_end(kind):
    """max_depth=1, depth_cap="end": a drafted [Fork] in a capped child ends it (cut back to a
    line break) exactly as plain decoding does, whatever the draft proposed after it."""
    model = micro_model("llama", seed=5)
    proc = fork_processor(3, 6, salt=5)
    apar = AparTokens(FORK, CHILD, frozenset(range(5, VOCAB, 3)))
    prompts = [[1, 10, 11, 12, 13, 14], [1, 20, 7]]

    def run(spec=None, k=1):
        opts = DecodeOptions(
            max_new_tokens=800, max_branch_tokens=24, max_depth=1, logits_processor=proc, num_draft_tokens=k
        )
        results = Decoder(model, opts, apar, True, {EOS}, speculator=spec).run(prompts)

        def path(branches, b):  # fork path from the root: ids may differ between schedules
            return () if b.parent is None else path(branches, branches[b.parent]) + (b.fork_index,)

        return [{path(r.branches, b): (b.tokens, b.finish) for b in r.branches} for r in results], results

    plain, results = run()
    assert sum(b.finish == "depth" for r in results for b in r.branches) >= 2
    for k in (1, 3):
        got, spec_results = run(speculators(model, proc, 5)[kind](), k)
        assert got == plain
        assert sum(r.counters.target_steps for r in spec_results) <= sum(r.counters.target_steps for r in results)


@pytest.mark.parametrize("kind", ["self", "random", "ngram"])
def test_speculation_is_lossless_with_the_code_fence_rule(kind):
    """Drafts that open or close a ``` block change where [Fork] is allowed at the next
    node; verification applies the rule along each draft path, so the output is plain decoding's."""
    model = micro_model("qwen2", seed=2)
    proc = fork_processor(3, 5, salt=2)
    texts = {i: ("```", "```", "``", "`")[i % 4] for i in range(5, VOCAB)}  # fences split over tokens too
    apar = AparTokens(FORK, CHILD, frozenset(), texts)
    prompts = [[1, 10, 11, 12, 13, 14], [1, 20, 7]]

    def run(spec=None, k=1):
        opts = DecodeOptions(
            max_new_tokens=800, max_branch_tokens=24, max_depth=2, logits_processor=proc, num_draft_tokens=k
        )
        return decode_trees(model, apar, prompts, opts, spec)

    plain = run()
    assert max(len(r) for r in plain) >= 3
    for k in (1, 3):
        assert run(speculators(model, proc, 2)[kind](), k) == plain


@pytest.mark.parametrize("kind", ["self", "random", "ngram"])
def test_speculation_is_lossless_under_a_fork_bias(kind):
    """The [Fork] offset is part of the target's distribution: verification applies it at
    every draft node (the self draft does not, so its drafts disagree exactly there)."""
    model = micro_model("llama", seed=0)
    proc = fork_processor(7, 6, salt=0)
    prompts = [[1, 10, 11, 12, 13, 14], [1, 20, 7]]
    apar = AparTokens(FORK, CHILD)
    for bias in (-1.5, 1.0):
        opts = dict(max_new_tokens=800, max_branch_tokens=24, max_depth=2, logits_processor=proc, fork_bias=bias)
        plain = decode_trees(model, apar, prompts, DecodeOptions(**opts))
        assert max(len(r) for r in plain) >= 3
        for k in (1, 3):
            spec = speculators(model, proc, 0)[kind]()
            assert decode_trees(model, apar, prompts, DecodeOptions(**opts, num_draft_tokens=k), spec) == plain


def test_self_draft_accepts_everything_except_at_branch_ends():
    model = micro_model("llama", seed=3)
    proc = fork_processor(4, 3, salt=3)
    rec = Recorder(DraftModelSpeculator(model, mask_ids=(CHILD,), logits_processor=proc))
    out = generate(
        model,
        micro_tokenizer(),
        PROMPTS[:1],
        mode="apar+spec",
        draft=rec,
        num_draft_tokens=2,
        max_new_tokens=600,
        max_branch_tokens=30,
        max_depth=8,
        logits_processor=proc,
    )[0]
    final_len = {(0, b.id): len(b.token_ids) for b in out.branches}
    checked = 0
    for key, before, k, accepted in rec.log:
        drafted = min(k, 30 - (before - (key[1] > 0)) - 1)
        if before + accepted + 1 < final_len[key]:  # the branch went on after this step
            assert accepted == drafted
            checked += 1
    assert checked >= 5 and len(out.branches) >= 3
    assert out.stats.mean_acceptance_length > 2.0


def test_adaptive_draft_length_is_lossless():
    model = micro_model("llama", seed=4)
    tok = micro_tokenizer()
    proc = fork_processor(5, 4, salt=4)
    kw = dict(max_new_tokens=500, max_branch_tokens=26, logits_processor=proc)
    plain = generate(model, tok, PROMPTS, mode="apar", **kw)
    spec = generate(model, tok, PROMPTS, mode="apar+spec", draft=NGramSpeculator(), adaptive_draft=True, **kw)
    assert [tree_key(g) for g in spec] == [tree_key(g) for g in plain]


def test_one_target_forward_per_step_and_k_draft_forwards():
    model = micro_model("llama", seed=5)
    draft = micro_model("llama", seed=6, hidden=16)
    calls = {"target": 0, "draft": 0}
    model.register_forward_hook(lambda *a: calls.__setitem__("target", calls["target"] + 1))
    draft.register_forward_hook(lambda *a: calls.__setitem__("draft", calls["draft"] + 1))
    proc = fork_processor(4, 3, salt=5)
    out = generate(
        model,
        micro_tokenizer(),
        PROMPTS[:1],
        mode="apar+spec",
        draft=DraftModelSpeculator(draft, mask_ids=(CHILD,)),
        num_draft_tokens=3,
        max_new_tokens=400,
        max_branch_tokens=24,
        logits_processor=proc,
    )[0]
    assert len(out.branches) >= 3
    assert calls["target"] == out.stats.target_steps  # prefill + one verify forward per step, all branches together
    assert calls["draft"] == out.stats.draft_forwards == 3 * (out.stats.target_steps - 1)


def test_sampled_speculation_runs_and_is_seeded():
    model = micro_model("llama", seed=7)
    tok = micro_tokenizer()
    kw = dict(mode="apar+spec", max_new_tokens=80, temperature=0.8, top_k=20, logits_processor=fork_processor(4, 3))
    a = generate(
        model, tok, PROMPTS[:1], draft=DraftModelSpeculator(micro_model("llama", seed=8, hidden=16)), seed=3, **kw
    )[0]
    b = generate(
        model, tok, PROMPTS[:1], draft=DraftModelSpeculator(micro_model("llama", seed=8, hidden=16)), seed=3, **kw
    )[0]
    assert a.token_ids == b.token_ids
    assert a.stats.drafted > 0 and 1.0 <= a.stats.mean_acceptance_length <= 5.0


def test_ngram_lookup_copies_the_latest_match():
    ng = NGramSpeculator(max_ngram=2)
    assert ng.lookup([1, 2, 3, 9, 1, 2, 4, 5, 1, 2], k=3) == [4, 5, 1]  # latest earlier match of (1, 2)
    assert ng.lookup([7, 8, 9], k=3) == []
    assert ng.lookup([5, 6, 5], k=2) == [6, 5]  # falls back to the 1-gram


# ----------------------------------------------------------------- registry
def test_registry_knows_builtins_and_suggests_close_names():
    assert get("ngram").kind == "ngram" and get("tiny-draft").kind == "model"
    with pytest.raises(ValueError, match="did you mean 'ngram'"):
        get("ngrm")


def test_registry_refuses_a_draft_with_another_vocabulary(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    draft = micro_model("llama", seed=1, hidden=16)
    draft.save_pretrained(tmp_path / "d")
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")))
    other.save_pretrained(tmp_path / "d")
    target, tok = micro_model("llama"), micro_tokenizer()
    n, fp = vocab_fingerprint(tok)
    with pytest.raises(ValueError, match=rf"draft has 2 tokens .* target has {n} \(fingerprint {fp}\)"):
        resolve(str(tmp_path / "d"), target, tok)
    micro_tokenizer().save_pretrained(tmp_path / "d")
    assert isinstance(resolve(str(tmp_path / "d"), target, tok), DraftModelSpeculator)


def test_user_registry_file_adds_entries_and_rejects_malformed(tmp_path, monkeypatch):
    f = tmp_path / "drafts.json"
    monkeypatch.setenv("APAR_SPEC_DRAFTS", str(f))
    f.write_text(json.dumps([{"name": "my-draft", "kind": "model", "weights": "/x", "notes": "mine"}]))
    assert get("my-draft").weights == "/x" and get("my-draft").source == str(f)
    f.write_text("[{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_user_entries()
    f.write_text(json.dumps([{"name": "x", "kind": "medusa"}]))
    with pytest.raises(ValueError, match="kind 'medusa'"):
        load_user_entries()
    f.write_text(json.dumps([{"name": "x", "kind": "model"}]))
    with pytest.raises(ValueError, match="needs 'weights'"):
        load_user_entries()
