"""Reduced draft vocabularies (FR-Spec): lossless in greedy, exact under sampling, only ranked ids drafted."""

from __future__ import annotations

import json

import pytest
import torch
from apar_spec.drafts.draft_lm import DraftModelSpeculator
from apar_spec.drafts.heads import HeadsSpeculator
from apar_spec.drafts.registry import lookup
from apar_spec.drafts.vocab import DraftVocab, coverage, load_vocab, rank_tokens, save_ranking, split_name
from micro import CHILD, EOS, FORK, VOCAB, fork_processor, micro_model, micro_tokenizer
from test_heads import random_heads
from test_spec import PROMPTS, tree_key
from test_spec_distribution import PROMPT, N, assert_exact_marginals

from apar_spec import generate

# half the micro vocabulary, EOS and [Fork] included: many target tokens are undraftable
SUBSET = [EOS, FORK] + list(range(5, VOCAB, 2))


class Recording:
    """Wraps a speculator and records every drafted token."""

    def __init__(self, inner):
        self.inner, self.seen = inner, set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def propose(self, views, sampling):
        p = self.inner.propose(views, sampling)
        self.seen.update(t for d in p.tokens for t in d)
        return p


def test_ranking_keeps_forced_ids_first_and_counts_coverage():
    ranked, counted = rank_tokens([[5, 5, 6, 7, 5], [6, 9]], keep=[2, 3])
    assert ranked == [2, 3, 5, 6, 7, 9] and counted == 7
    cov = coverage(ranked, [[5, 6, 42]], sizes=(3, 4, 10))
    assert cov == {"3": pytest.approx(1 / 3), "4": pytest.approx(2 / 3), "10": pytest.approx(2 / 3)}


def test_reduced_head_gives_the_full_heads_logits_on_its_ids():
    model = micro_model("llama", seed=1)
    vocab = DraftVocab(torch.tensor(SUBSET))
    head = vocab.head(model.get_output_embeddings())
    h = torch.randn(3, model.config.hidden_size, dtype=model.dtype)
    full = model.get_output_embeddings()(h)  # [3, V]
    assert torch.allclose(head(h), full[:, SUBSET])
    assert vocab.columns([FORK, 4, 7]) == [1, SUBSET.index(7)]


@pytest.mark.parametrize("kind", ["draft-lm", "heads"])
@pytest.mark.parametrize("shape", [None, "topk:2x3"])
def test_reduced_vocab_drafts_are_lossless_in_greedy_and_only_propose_ranked_ids(kind, shape):
    model = micro_model("llama", seed=3)
    tok = micro_tokenizer()
    kw = dict(
        max_new_tokens=3000,
        max_branch_tokens=20,
        max_depth=3,
        logits_processor=fork_processor(3, 3, salt=1),
        batch_size=3,
        tree=shape,
    )
    vocab = DraftVocab(torch.tensor(SUBSET))

    def make():
        if kind == "heads":
            return HeadsSpeculator(
                random_heads(model, 1), model.get_output_embeddings(), mask_ids=(CHILD,), vocab=vocab
            )
        return DraftModelSpeculator(micro_model("llama", seed=4, hidden=16), mask_ids=(CHILD,), vocab=vocab)

    for plain_mode, spec_mode in [("ar", "spec"), ("apar", "apar+spec")]:
        plain = generate(model, tok, PROMPTS, mode=plain_mode, **kw)
        rec = Recording(make())
        spec = generate(model, tok, PROMPTS, mode=spec_mode, draft=rec, **kw)
        for p, s in zip(plain, spec):
            assert tree_key(s) == tree_key(p)
            assert s.token_ids == p.token_ids
        assert rec.seen and rec.seen <= set(SUBSET)
        emitted = {t for p in plain for t in p.token_ids}
        assert emitted - set(SUBSET), "the target still emits tokens the draft cannot propose"


def test_sampled_reduced_vocab_draft_keeps_the_target_distribution():
    target = micro_model("llama", seed=11)
    draft = micro_model("llama", seed=12, hidden=16)
    spec = DraftModelSpeculator(draft, vocab=DraftVocab(torch.tensor(SUBSET)))
    outs = generate(
        target,
        None,
        [PROMPT] * N,
        mode="spec",
        draft=spec,
        num_draft_tokens=2,
        max_new_tokens=3,
        temperature=1.0,
        seed=7,
        batch_size=N,
        eos_token_id=[],
    )
    assert sum(o.stats.accepted for o in outs) > 0.05 * N
    c2, _ = assert_exact_marginals(target, outs)
    # tokens outside the draft's vocabulary still come out (as resampled or bonus tokens)
    outside = [t for t in range(VOCAB) if t not in SUBSET]
    assert c2[outside].sum() > 0.2 * N


def test_names_with_a_vocabulary_suffix_and_their_errors(tmp_path):
    assert split_name("smollm2-draft@8192") == ("smollm2-draft", "8192")
    assert split_name("tiny-draft") == ("tiny-draft", None)
    e = lookup("smollm2-draft@8192")
    assert e.name == "smollm2-draft@8192" and e.draft_vocab == 8192 and e.kind == "model"
    assert lookup("smollm2-draft@full").draft_vocab is None
    for bad, words in [
        ("ngram@100", "no LM head"),
        ("tiny-draft@abc", "token count or 'full'"),
        ("tiny-draft@0", ">= 1"),
    ]:
        with pytest.raises(ValueError, match=words):
            lookup(bad)
    with pytest.raises(ValueError, match="has no token ranking"):
        load_vocab(tmp_path, 100, 2048, "tiny-draft@100")
    save_ranking(tmp_path, [5, 99999, 7, 1], {"source": "test"})
    v = load_vocab(tmp_path, 3, 2048, "x")
    assert v.ids.tolist() == [5, 7, 1]  # ids past the vocabulary are skipped
    assert load_vocab(tmp_path, 4096, 2048, "x") is None  # as large as the vocabulary: the full head
    (tmp_path / "vocab.json").write_text(json.dumps({"ranked": []}))
    with pytest.raises(ValueError, match="not a valid token ranking"):
        load_vocab(tmp_path, 3, 2048, "x")


def test_tiny_draft_without_a_ranking_is_refused_in_one_line():
    import apar_spec

    model, tok = apar_spec.load("tiny-apar")
    with pytest.raises(ValueError, match="no token ranking"):
        generate(model, tok, ["Give three tips."], mode="spec", draft="tiny-draft@512", max_new_tokens=4)


def test_served_reduced_vocab_draft_equals_offline():
    """Continuous batching (admit/release mid-flight) with a reduced-vocabulary draft LM."""
    from test_serving_engine import DRAFT, MODEL, PROC, TOK, random_workload, serve

    from apar_spec.serving import Engine

    def spec():
        return DraftModelSpeculator(DRAFT, mask_ids=(CHILD,), vocab=DraftVocab(torch.tensor(SUBSET)))

    prompts, budgets, arrivals = random_workload(7)
    engine = Engine(MODEL, TOK, mode="apar+spec", draft=spec(), kv_budget=120, max_new_tokens=32, logits_processor=PROC)
    handles = serve(engine, prompts, budgets, arrivals)
    for p, m, h in zip(prompts, budgets, handles):
        offline = generate(
            MODEL, TOK, [p], mode="apar+spec", draft=spec(), logits_processor=PROC, **engine.offline_options(m)
        )[0]
        assert [b.token_ids for b in h.result(0).branches] == [b.token_ids for b in offline.branches]
    assert engine.stats.finished == len(prompts)


def test_vocab_fingerprint_is_remembered_per_tokenizer_and_follows_added_tokens():
    """Memoised (a benchmark must not time the hashing), yet a grown vocabulary is a new fingerprint."""
    from apar_spec.drafts.registry import vocab_fingerprint
    from micro import micro_tokenizer

    tok = micro_tokenizer()
    first = vocab_fingerprint(tok)
    assert vocab_fingerprint(tok) == first == vocab_fingerprint(micro_tokenizer())
    words = vocab_fingerprint(tok, words_only=True)
    assert words[0] == first[0] - 2  # [Fork]/[Child] left out
    tok.add_special_tokens({"additional_special_tokens": ["[Fork]", "[Child]", "[Extra]"]})
    grown = vocab_fingerprint(tok)
    assert grown[0] == first[0] + 1 and grown[1] != first[1]
