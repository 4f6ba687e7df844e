"""A union of speculators (``drafts/union.py``): one trie per branch, lossless, each part sees its own path."""

from __future__ import annotations

import pytest
from apar_spec.drafts.draft_lm import DraftModelSpeculator
from apar_spec.drafts.ngram import NGramSpeculator
from apar_spec.drafts.registry import lookup, resolve
from apar_spec.drafts.union import DEFAULT_CHAIN, UnionSpeculator, merge, parse_union
from micro import CHILD, VOCAB, micro_model, micro_tokenizer
from test_heads import chained_speculator
from test_spec import PROMPTS, tree_key
from test_spec_distribution import PROMPT, assert_exact_marginals
from test_tree_spec import SHAPES, GreedyTreeOf, RandomTree, greedy_case

from apar_spec import generate
from apar_spec.decoding.speculator import Proposal


def test_merge_shares_prefixes_orders_by_depth_and_keeps_each_parts_indices():
    heads = ([5, 6, 7, 8], [-1, -1, 0, 2])  # 5 -> 7 -> 8, and 6
    chain = ([5, 7, 9, 4], [-1, 0, 1, 2])  # 5 -> 7 -> 9 -> 4
    tokens, parents, sources = merge([heads, chain])
    # depth 1: 5, 6; depth 2: 7; depth 3: 8 (heads), 9 (chain); depth 4: 4
    assert tokens == [5, 6, 7, 8, 9, 4]
    assert parents == [-1, -1, 0, 2, 2, 4]
    assert sources == [{0: 0, 1: 0}, {0: 1}, {0: 2, 1: 1}, {0: 3}, {1: 2}, {1: 3}]
    # every path of every part is a path of the trie
    for part, (toks, pars) in enumerate([heads, chain]):
        for j in range(len(toks)):
            node = next(i for i, s in enumerate(sources) if s.get(part) == j)
            assert tokens[node] == toks[j]
            up = pars[j]
            assert parents[node] == (-1 if up < 0 else next(i for i, s in enumerate(sources) if s.get(part) == up))
    assert all(parents[i] < i for i in range(len(parents)))  # parents come first
    with pytest.raises(ValueError, match="hangs under"):
        merge([([5, 6], [-1, 3])])


@pytest.mark.parametrize("shape", [None, SHAPES[1], SHAPES[2]])
@pytest.mark.parametrize("first", ["random-lm", "junk", "heads"])
def test_union_is_lossless_in_greedy(shape, first):
    seed, model, tok, _, kw = greedy_case(shape)

    def union():
        lead = {
            "random-lm": lambda: DraftModelSpeculator(
                micro_model("llama", seed=100 + seed, hidden=16), mask_ids=(CHILD,)
            ),
            "junk": lambda: RandomTree(seed),
            "heads": lambda: chained_speculator(model, seed),
        }[first]()
        if shape is None and first == "junk":
            return UnionSpeculator([NGramSpeculator(), NGramSpeculator(2, 1)], [None, 7])
        return UnionSpeculator([lead, NGramSpeculator()], [None, 7])

    for plain_mode, spec_mode in [("ar", "spec"), ("apar", "apar+spec")]:
        plain = generate(model, tok, PROMPTS, mode=plain_mode, **kw)
        spec = generate(model, tok, PROMPTS, mode=spec_mode, draft=union(), tree=shape, **kw)
        for p, s in zip(plain, spec):
            assert tree_key(s) == tree_key(p)
            assert s.token_ids == p.token_ids and s.text == p.text
            assert s.stats.target_steps <= p.stats.target_steps
        assert sum(g.stats.accepted for g in spec) > 0


class Fixed:
    """Proposes fixed (tokens, parents) per view and records what ``observe`` told it."""

    def __init__(self, tokens, parents, name="fixed", depth_seen=None):
        self.tokens, self.parents, self.name = tokens, parents, name
        self.seen: list = []
        self.asked: list = []

    forwards = 0

    def reset(self, *a, **kw):
        pass

    def propose(self, views, sampling):
        self.asked.append([(v.k, v.shape) for v in views])
        return Proposal([list(self.tokens) for _ in views], [None] * len(views), [list(self.parents) for _ in views])

    def observe(self, outcome):
        self.seen.append((list(outcome.accepted), [list(p) for p in outcome.paths]))


def test_each_part_observes_the_accepted_path_in_its_own_indices():
    model = micro_model("llama", seed=3)
    truth = generate(model, None, [PROMPT], mode="ar", max_new_tokens=5, eos_token_id=[])[0].token_ids
    # part 0 (tree): a wrong first token, then the right one with a wrong child;
    # part 1 (chain): the right first three tokens
    wrong = next(t for t in range(5, VOCAB) if t not in truth)
    a = Fixed([wrong, truth[1], wrong], [-1, -1, 1], "a")
    b = Fixed(truth[1:4], [-1, 0, 1], "b")
    u = UnionSpeculator([a, b], [None, 3])
    out = generate(
        model, None, [PROMPT], mode="spec", draft=u, tree="[[0],[1],[1,0]]", max_new_tokens=5, eos_token_id=[]
    )[0]
    assert out.token_ids == truth
    # the first step: trie = [wrong, t1, wrong(under t1), t2(under t1), t3]; accepted t1 -> t2 -> t3
    acc_a, paths_a = a.seen[0]
    acc_b, paths_b = b.seen[0]
    assert (acc_b, paths_b) == ([3], [[0, 1, 2]])  # the chain's own indices, all three
    assert (acc_a, paths_a) == ([1], [[1]])  # part a drafted only t1 on that path (its index 1)
    # the chain part was asked for its own length, the first part for the decoder's shape
    assert b.asked[0][0] == (3, None) and a.asked[0][0][1] is not None
    assert out.stats.accepted >= 3


def test_union_may_draft_deeper_than_the_shape():
    model = micro_model("llama", seed=3)
    truth = generate(model, None, [PROMPT], mode="ar", max_new_tokens=9, eos_token_id=[])[0].token_ids
    chain = Fixed(truth[1:8], list(range(-1, 6)), "oracle")
    u = UnionSpeculator([Fixed([], [], "none"), chain], [None, 7])
    out = generate(model, None, [PROMPT], mode="spec", draft=u, tree="[[0]]", max_new_tokens=9, eos_token_id=[])[0]
    assert out.token_ids == truth
    assert out.stats.target_steps <= 3  # prefill, then one step keeps 7 drafts and a bonus
    assert out.stats.accepted == 7


def test_sampled_union_keeps_the_exact_target_distribution():
    target = micro_model("llama", seed=11)
    n = 3000
    u = UnionSpeculator([GreedyTreeOf(DraftModelSpeculator(target)), NGramSpeculator(2, 1)], [None, 3])
    outs = generate(
        target,
        None,
        [PROMPT] * n,
        mode="spec",
        draft=u,
        tree="topk:2x2",
        max_new_tokens=3,
        temperature=1.0,
        seed=7,
        batch_size=n,
        eos_token_id=[],
    )
    assert all(len(o.token_ids) == 3 for o in outs)
    assert sum(o.stats.accepted for o in outs) > 0.05 * n
    assert_exact_marginals(target, outs)


def test_a_sampled_part_is_refused():
    model = micro_model("llama", seed=7)
    u = UnionSpeculator([DraftModelSpeculator(micro_model("llama", seed=8, hidden=16)), NGramSpeculator()], [None, 4])
    with pytest.raises(ValueError, match="deterministic drafts only"):
        generate(
            model, micro_tokenizer(), PROMPTS[:1], mode="spec", draft=u, max_new_tokens=20, temperature=0.8, seed=3
        )


def test_union_names_parse_and_resolve():
    assert parse_union("ngram") is None
    assert parse_union("tiny-heads+ngram") == [("tiny-heads", None), ("ngram", DEFAULT_CHAIN)]
    assert parse_union("a@8192+ngram:12") == [("a@8192", None), ("ngram", 12)]
    for bad, msg in [
        ("a:3+ngram", "first part"),
        ("a+ngram:0", "at least 1"),
        ("a+ngram:x", "at least 1"),
        ("a++ngram", "empty part"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_union(bad)
    entry = lookup("ngram+ngram:5")
    assert entry.kind == "union" and entry.name == "ngram+ngram:5"
    with pytest.raises(ValueError, match="unknown draft 'ngramm'"):
        lookup("ngram+ngramm")
    model = micro_model("llama")
    spec = resolve("ngram+ngram:5", model, micro_tokenizer())
    assert isinstance(spec, UnionSpeculator) and spec.chains == [None, 5] and spec.max_draft_depth == 5
    assert spec.name == "ngram+ngram"
    with pytest.raises(ValueError, match="at least two parts"):
        UnionSpeculator([NGramSpeculator()], [None])


@pytest.fixture(scope="module")
def micro_setup(tmp_path_factory):
    from test_bench import make_micro_setup

    return make_micro_setup(tmp_path_factory.mktemp("micro-union"))


def test_bench_runs_a_union_and_skips_hf_assisted_for_it(micro_setup, tmp_path):
    from apar_spec.experiments.bench_files import read_rows
    from test_cli import assert_user_error, run

    union = f"{micro_setup['draft']}+ngram:4"
    out = tmp_path / "s.jsonl"
    result = run(
        "sweep",
        "--target",
        micro_setup["target"],
        "--prompts",
        micro_setup["prompts"],
        "--drafts",
        union,
        "--ks",
        "2",
        "--modes",
        "ar,spec,hf-assisted",
        "--out",
        out,
        "--max-new-tokens",
        "8",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--limit",
        "1",
    )
    assert result.exit_code == 0, result.output
    rows = {r["variant"]: r for r in read_rows(out)}
    assert set(rows) == {"ar", f"spec {union} k=2"}  # HF assisted has one assistant, not a union
    assert "not a union" in result.output
    row = rows[f"spec {union} k=2"]
    assert row["output_ids"] == rows["ar"]["output_ids"] and row["draft"] == union
    assert_user_error(
        run(
            "bench",
            "--target",
            micro_setup["target"],
            "--draft",
            union,
            "--prompts",
            micro_setup["prompts"],
            "-k",
            "auto",
            "--modes",
            "ar,spec",
            "--out",
            tmp_path / "x.jsonl",
        ),
        "union of drafts",
        "give -k or --tree",
    )
    shown = run("drafts", "show", "ngram+ngram:3")
    assert shown.exit_code == 0 and "kind: union" in shown.output and "chain of 3" in shown.output
    assert_user_error(run("drafts", "show", "ngram+ngram:0"), "at least 1")


def test_branch_cap_rows_hold_the_same_tokens_and_hf_gets_the_cap(micro_setup, tmp_path):
    """--max-branch-tokens with a large budget: every branch ends on its own, so spec rows equal plain rows."""
    from apar_spec.experiments.bench_files import read_rows
    from test_cli import assert_user_error, run

    out = tmp_path / "c.jsonl"
    result = run(
        "sweep",
        "--target",
        micro_setup["target"],
        "--prompts",
        micro_setup["prompts"],
        "--drafts",
        "ngram+ngram:3",
        "--ks",
        "2",
        "--modes",
        "hf-generate,ar,spec",
        "--out",
        out,
        "--max-new-tokens",
        "500",
        "--max-branch-tokens",
        "9",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--limit",
        "2",
    )
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert {r["max_branch_tokens"] for r in rows} == {9}
    for r in rows:
        assert r["answer_tokens"] <= 9, r["variant"]  # HF generate got the cap as its budget too
    by = {(r["prompt_id"], r["variant"]): r for r in rows}
    for pid in {r["prompt_id"] for r in rows}:
        assert by[(pid, "spec ngram+ngram:3 k=2")]["output_ids"] == by[(pid, "ar")]["output_ids"]
    assert_user_error(run("bench", "--max-branch-tokens", "0", "--out", tmp_path / "x.jsonl"), "max_branch_tokens")
