"""Draft trees inside branches: greedy output identical to plain decoding, exact sampling, counters."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from apar_spec.drafts.draft_lm import DraftModelSpeculator
from micro import CHILD, EOS, FORK, VOCAB, fork_processor, micro_model, micro_tokenizer
from test_spec import PROMPTS, tree_key
from test_spec_distribution import PROMPT, assert_exact_marginals, chi_square_p

from apar_spec import generate
from apar_spec.decoding.draft_tree import parse_tree, prune_tree, tree_depths_ranks
from apar_spec.decoding.sampling import SamplingConfig, greedy_accept, tree_accept_path
from apar_spec.decoding.speculator import Proposal

SHAPES = [
    "[[0],[1]]",  # depth 1, two candidates
    "topk:2x2",  # depth 2, full binary
    "[[0],[1],[0,0],[1,0],[0,1],[0,0,0]]",  # depth 3
    "topk:2x4",  # depth 4, 30 nodes
    "[[0],[1],[2],[0,0],[0,0,0],[0,0,1],[0,0,0,0],[0,0,0,0,0],[0,0,0,0,1]]",  # depth 5
]


class RandomTree:
    """Deterministic, seeded junk: a tree of the asked shape whose tokens are drawn from a
    small pool holding [Fork], EOS and a few words, plus the target's own greedy guess
    from a helper draft at rank 0 now and then. Whatever it proposes, output must not change."""

    name = "random-tree"
    forwards = 0

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def reset(self, *a, **kw):
        pass

    def propose(self, views, sampling):
        tokens, parents = [], []
        for v in views:
            shape = v.shape
            pool = [FORK, EOS, CHILD] + [self.rng.randrange(5, VOCAB) for _ in range(3)]
            tokens.append([self.rng.choice(pool) for _ in range(shape.size)])
            parents.append(list(shape.parents))
        return Proposal(tokens, [None] * len(views), parents)

    def observe(self, outcome):
        pass


def speculator(kind, model, proc, seed):
    if kind == "self":
        return DraftModelSpeculator(model, mask_ids=(CHILD,), logits_processor=proc)
    if kind == "random-lm":
        return DraftModelSpeculator(micro_model("llama", seed=100 + seed, hidden=16), mask_ids=(CHILD,))
    return RandomTree(seed)


def greedy_case(shape):
    """(seed, model, tokenizer, fork processor, generate kwargs) of a lossless-in-greedy test for ``shape``:
    a per-branch cap and a budget no answer reaches, so no output depends on scheduling."""
    seed = 0 if shape is None else len(shape) % 3
    model = micro_model("llama", seed=seed)
    proc = fork_processor(3, 3, salt=seed)
    kw = dict(max_new_tokens=3000, max_branch_tokens=20, max_depth=3, logits_processor=proc, batch_size=3)
    return seed, model, micro_tokenizer(), proc, kw


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["self", "random-lm", "junk"])
def test_tree_speculation_is_lossless_in_greedy(shape, kind):
    seed, model, tok, proc, kw = greedy_case(shape)
    for plain_mode, spec_mode in [("ar", "spec"), ("apar", "apar+spec")]:
        plain = generate(model, tok, PROMPTS, mode=plain_mode, **kw)
        assert all(b.finish != "budget" for g in plain for b in g.branches)  # no scheduling-dependent cut
        spec = generate(
            model, tok, PROMPTS, mode=spec_mode, draft=speculator(kind, model, proc, seed), tree=shape, **kw
        )
        for p, s in zip(plain, spec):
            assert tree_key(s) == tree_key(p)  # same branches, same tokens, same lengths
            assert s.token_ids == p.token_ids and s.text == p.text
            assert s.stats.target_steps <= p.stats.target_steps
            verified = sum(map(sum, s.stats.depth_rank_verified))
            accepted = sum(map(sum, s.stats.depth_rank_accepted))
            assert accepted == s.stats.accepted <= verified <= s.stats.drafted
        if plain_mode == "apar":
            assert max(len(g.branches) for g in plain) >= 3  # trees really cross [Fork] and EOS
        if kind == "self":
            # the self draft's rank-0 guesses are the target's own: nearly always right
            assert sum(g.stats.accepted for g in spec) > 0.5 * sum(g.stats.depth_rank_verified[0][0] for g in spec)


def test_self_draft_tree_takes_fewer_steps_than_its_chain():
    model = micro_model("llama", seed=2)
    noisy = copy.deepcopy(model)  # the target with a noisy LM head: its rank 0 is often wrong, rank 1-3 often right
    with torch.no_grad():
        w = noisy.lm_head.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=w.dtype) * w.std())
    kw = dict(mode="spec", max_new_tokens=120, eos_token_id=[])
    chain = generate(model, None, [PROMPT], draft=DraftModelSpeculator(noisy), tree="2", **kw)[0]
    tree = generate(model, None, [PROMPT], draft=DraftModelSpeculator(noisy), tree="topk:4x2", **kw)[0]
    assert tree.token_ids == chain.token_ids
    # rank > 0 candidates are accepted sometimes, so the tree accepts more per step
    assert sum(row[r] for row in tree.stats.depth_rank_accepted for r in range(1, len(row))) > 0
    assert tree.stats.mean_acceptance_length > chain.stats.mean_acceptance_length


def test_tree_walk_equals_greedy_accept_on_chains():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        k = int(torch.randint(0, 5, (1,), generator=gen))
        logits = torch.randn(1, k + 1, 6, generator=gen, dtype=torch.float64)
        target = logits.argmax(-1)[0].tolist()
        drafts = [t if torch.rand(1, generator=gen) < 0.7 else (t + 1) % 6 for t in target[:k]]
        ref = greedy_accept(torch.tensor([drafts + [-1] * 0], dtype=torch.long).view(1, k), torch.tensor([k]), logits)
        path = tree_accept_path(list(range(-1, k - 1)), drafts, target)
        assert len(path) == int(ref.num_accepted[0]) and path == list(range(len(path)))
        assert (target[path[-1] + 1] if path else target[0]) == int(ref.bonus[0])


def test_tree_walk_follows_the_matching_sibling():
    # pending -> {a=5 (0), b=6 (1)}; under b: {7 (2), 8 (3)}; target says 6, then 8, then 9
    parents, tokens = [-1, -1, 1, 1], [5, 6, 7, 8]
    choice = [6, 0, 8, 0, 9]  # per fed node: pending, d0, d1, d2, d3
    assert tree_accept_path(parents, tokens, choice) == [1, 3]


def test_prune_keeps_depth_drops_repeated_siblings_and_refuses_bad_parents():
    assert prune_tree([5, 6, 5, 7, 8], [-1, -1, -1, 0, 3], 2, "x") == ([5, 6, 7], [-1, -1, 0])
    assert tree_depths_ranks([-1, -1, 0, 0, 1]) == ([1, 1, 2, 2, 2], [0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="parents must come first"):
        prune_tree([1, 2], [1, -1], 3, "x")


class GreedyTreeOf:
    """A draft LM's greedy top-k tree even when the request samples: deterministic drafts
    (no probs), so the decoder may verify the tree by sampling the target at every node."""

    def __init__(self, inner):
        self.inner, self.name = inner, "greedy-tree"

    forwards = property(lambda self: self.inner.forwards)

    def reset(self, *a, **kw):
        self.inner.reset(*a, **kw)

    def propose(self, views, sampling):
        return self.inner.propose(views, SamplingConfig())

    def observe(self, outcome):
        self.inner.observe(outcome)


def test_sampled_tree_verification_matches_exact_target_marginals():
    target = micro_model("llama", seed=11)
    n = 3000
    outs = generate(
        target,
        None,
        [PROMPT] * n,
        mode="spec",
        draft=GreedyTreeOf(DraftModelSpeculator(target)),
        tree="topk:3x2",
        max_new_tokens=3,
        temperature=1.0,
        seed=7,
        batch_size=n,
        eos_token_id=[],
    )
    assert all(len(o.token_ids) == 3 for o in outs)
    ranks = [sum(o.stats.depth_rank_accepted[0][r] for o in outs if o.stats.depth_rank_accepted) for r in range(3)]
    assert sum(ranks) > 0.05 * n and ranks[1] > 0 and ranks[2] > 0, ranks  # siblings of every rank were taken
    c2, p2 = assert_exact_marginals(target, outs)
    # power: a distribution tilted toward the tree's rank-0 guesses is rejected
    top = torch.zeros(VOCAB, dtype=torch.float64)
    top[p2.argmax()] = 1.0
    assert chi_square_p(c2, 0.7 * p2 + 0.3 * top) < 1e-3


def test_sampled_draft_trees_fall_back_to_chains():
    model = micro_model("llama", seed=7)
    out = generate(
        model,
        micro_tokenizer(),
        PROMPTS[:1],
        mode="spec",
        draft=DraftModelSpeculator(micro_model("llama", seed=8, hidden=16)),
        tree="topk:2x3",
        max_new_tokens=40,
        temperature=0.8,
        seed=3,
    )[0]
    assert all(len(row) == 1 for row in out.stats.depth_rank_verified)  # rank 0 only: a chain
    assert len(out.stats.depth_rank_verified) <= 3


def test_tree_option_is_validated():
    with pytest.raises(ValueError, match="skips rank"):
        generate(micro_model(), micro_tokenizer(), PROMPTS[:1], mode="spec", draft="ngram", tree="[[1]]")
    # generate() resolves "auto" with the cost model (tests/test_cost_model.py); the decoder
    # itself never runs an unresolved "auto"
    from apar_spec.decoding.decoder import Decoder
    from apar_spec.options import DecodeOptions

    with pytest.raises(ValueError, match="cost model"):
        Decoder(micro_model(), DecodeOptions(tree="auto"), None, fork_enabled=False, eos_ids={EOS})
    assert parse_tree("topk:2x2").size == 6


# ------------------------------------------------------------------ bench / sweep over trees
@pytest.fixture(scope="module")
def micro_setup(tmp_path_factory):
    from test_bench import make_micro_setup

    return make_micro_setup(tmp_path_factory.mktemp("micro-trees"))


def test_sweep_runs_tree_shapes_next_to_ks(micro_setup, tmp_path):
    from apar_spec.experiments.bench import sweep
    from apar_spec.experiments.bench_files import read_rows
    from apar_spec.experiments.bench_plan import BenchSettings

    s = BenchSettings(
        target=micro_setup["target"],
        draft="ngram",
        prompts=micro_setup["prompts"],
        out=tmp_path / "s.jsonl",
        device="cpu",
        max_new_tokens=8,
        repeats=1,
        warmup=0,
        limit=1,
        modes="ar,spec",
    )
    sweep(s, drafts=[micro_setup["draft"]], ks=[2], trees=["topk:2x2"])
    rows = {r["variant"]: r for r in read_rows(s.out)}
    d = micro_setup["draft"]
    assert set(rows) == {"ar", f"spec {d} k=2", f"spec {d} tree=topk:2x2"}
    tree_row = rows[f"spec {d} tree=topk:2x2"]
    assert tree_row["tree"] == "topk:2x2" and tree_row["output_ids"] == rows["ar"]["output_ids"]
    assert len(tree_row["depth_rank_verified"][0]) == 2  # two candidates at depth 1
    with pytest.raises(ValueError, match="skips rank"):
        sweep(s, drafts=["ngram"], ks=[], trees=["[[1]]"])


def test_cli_bench_tree_and_sweep_trees(micro_setup, tmp_path):
    from apar_spec.experiments.bench_files import read_rows
    from test_cli import assert_user_error, run

    out = tmp_path / "b.jsonl"
    result = run(
        "bench",
        "--target",
        micro_setup["target"],
        "--draft",
        micro_setup["draft"],
        "--prompts",
        micro_setup["prompts"],
        "--modes",
        "ar,spec",
        "--tree",
        "[[0],[1],[0,0]]",
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
    assert [r["variant"] for r in read_rows(out)] == ["ar", "spec tree=[[0],[1],[0,0]]"]
    result = run(
        "sweep",
        "--target",
        micro_setup["target"],
        "--prompts",
        micro_setup["prompts"],
        "--drafts",
        "ngram",
        "--ks",
        "",
        "--trees",
        "topk:1x2;[[0],[1]]",
        "--modes",
        "ar,spec",
        "--out",
        tmp_path / "s.jsonl",
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
    assert [r["variant"] for r in read_rows(tmp_path / "s.jsonl")] == [
        "ar",
        "spec ngram tree=topk:1x2",
        "spec ngram tree=[[0],[1]]",
    ]
    assert_user_error(run("bench", "--tree", "topk:2", "--out", tmp_path / "x.jsonl"), "unknown tree spec")


def test_step_token_cap_cuts_drafts_evenly_and_keeps_every_pending_token():
    from apar_spec.decoding.decoder import Decoder
    from apar_spec.options import DecodeOptions

    model = micro_model("llama", seed=0)
    dec = Decoder(model, DecodeOptions(max_step_tokens=7), None, False, {EOS})
    probs = torch.full((3, VOCAB), 1.0 / VOCAB)
    prop = Proposal([[1, 2, 3], [4, 5, 6], [7, 8]], [probs, None, None], [[-1, 0, 1], [-1, -1, 0], [-1, 0]])
    cut = dec.fit_step_budget(prop)
    # 3 pending tokens + 4 drafts = 7: two each for the first, the rest in order
    assert cut.tokens == [[1, 2], [4], [7]] and cut.parents == [[-1, 0], [-1], [-1]]
    assert cut.probs[0].shape == (2, VOCAB) and cut.probs[1:] == [None, None]
    dec.opts = DecodeOptions(max_step_tokens=2)  # fewer than the branches: pending tokens only
    assert dec.fit_step_budget(prop).tokens == [[], [], []]
    dec.opts = DecodeOptions(max_step_tokens=11)  # everything fits: unchanged
    assert dec.fit_step_budget(prop) is prop
    with pytest.raises(ValueError, match="max_step_tokens must be >= 1"):
        DecodeOptions(max_step_tokens=0)


@pytest.mark.parametrize("cap", [1, 4, 9])
def test_step_token_cap_is_lossless_and_drafts_less(cap):
    model = micro_model("llama", seed=1)
    tok = micro_tokenizer()
    proc = fork_processor(3, 3, salt=1)
    kw = dict(max_new_tokens=3000, max_branch_tokens=20, max_depth=3, logits_processor=proc, batch_size=3)
    plain = generate(model, tok, PROMPTS, mode="apar", **kw)
    spec = lambda **extra: generate(
        model,
        tok,
        PROMPTS,
        mode="apar+spec",
        tree="topk:2x2",
        draft=DraftModelSpeculator(model, mask_ids=(CHILD,), logits_processor=proc),
        **kw,
        **extra,
    )
    free, capped = spec(), spec(max_step_tokens=cap)
    for p, f, c in zip(plain, free, capped):
        assert tree_key(c) == tree_key(p) == tree_key(f)
    assert sum(g.stats.drafted for g in capped) < sum(g.stats.drafted for g in free)
    if cap == 1:  # pending tokens only: no drafts, the plain decode's steps
        assert sum(g.stats.drafted for g in capped) == 0
        assert [g.stats.target_steps for g in capped] == [g.stats.target_steps for g in plain]


def test_bench_and_sweep_carry_the_step_cap(micro_setup, tmp_path):
    from apar_spec.experiments.bench_files import read_rows
    from test_cli import assert_user_error, run

    common = [
        "--target",
        micro_setup["target"],
        "--prompts",
        micro_setup["prompts"],
        "--max-new-tokens",
        "8",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--limit",
        "1",
    ]
    out = tmp_path / "b.jsonl"
    result = run(
        "bench", *common, "--draft", micro_setup["draft"], "--modes", "ar,spec", "--max-step-tokens", "2", "--out", out
    )
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert [r["variant"] for r in rows] == ["ar", "spec cap=2"] and rows[1]["max_step_tokens"] == 2
    assert rows[1]["output_ids"] == rows[0]["output_ids"] and rows[1]["drafted"] <= rows[1]["target_steps"]
    result = run(
        "sweep",
        *common,
        "--drafts",
        "ngram",
        "--ks",
        "3",
        "--step-caps",
        "none,2",
        "--modes",
        "ar,spec",
        "--out",
        tmp_path / "s.jsonl",
    )
    assert result.exit_code == 0, result.output
    rows = {r["variant"]: r for r in read_rows(tmp_path / "s.jsonl")}
    assert set(rows) == {"ar", "spec ngram k=3", "spec ngram k=3 cap=2"}
    assert rows["spec ngram k=3"]["max_step_tokens"] is None and rows["spec ngram k=3 cap=2"]["max_step_tokens"] == 2
    assert_user_error(
        run("sweep", *common, "--drafts", "ngram", "--step-caps", "0", "--out", tmp_path / "x.jsonl"), "step caps"
    )
    assert_user_error(run("bench", *common, "--max-step-tokens", "0", "--out", tmp_path / "y.jsonl"), "max_step_tokens")
