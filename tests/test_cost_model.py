"""The cost model: prediction and the optimiser against synthetic costs with a known optimum,
the cost cache (keys, round trip, corrupt files), measuring on a micro model, "auto", the
report's predicted-vs-achieved column and the ``costs`` commands."""

import json
import math

import pytest
import torch
from micro import micro_model, micro_tokenizer
from typer.testing import CliRunner

from apar_spec import costs as cm
from apar_spec.decoding.draft_tree import chain, expected_accepted, layout

SIZES = (1, 2, 4, 8, 16, 32, 64)


def linear_costs(a: float, b: float, name: str = "lin", overhead: cm.Overhead = None) -> cm.ModelCosts:
    """A pass with n new tokens costs a + b*n seconds, at every cache length."""
    key = cm.CostKey("f" + name, "float32", "cpu", 1)
    table = {n: a + b * n for n in SIZES}
    return cm.ModelCosts(name, key, {64: dict(table), 512: dict(table)}, overhead or cm.Overhead(), names=[name])


# ------------------------------------------------------------------ prediction and the optimiser


def test_linear_cost_geometric_acceptance_best_chain_matches_closed_form():
    # tokens(k) = (1 - alpha^(k+1)) / (1 - alpha); cost(k) = a + b (k + 1). The continuous optimum
    # solves -ln(alpha) alpha^(k+1) (a + b (k+1)) = b (1 - alpha^(k+1)); the best integer k is beside it.
    for alpha, a, b in [(0.8, 1.0, 0.1), (0.6, 1.0, 0.3), (0.9, 1.0, 0.06), (0.7, 0.5, 0.5)]:
        costs = linear_costs(a, b)
        prof = cm.Profile.geometric(alpha)
        k = cm.choose_k(costs, prof, kind="ngram")

        def f(x):
            return (1 - alpha ** (x + 1)) / (1 - alpha) / (a + b * (x + 1))

        brute = max(range(1, 17), key=f)
        assert k == brute
        g = lambda x: -math.log(alpha) * alpha ** (x + 1) * (a + b * (x + 1)) - b * (1 - alpha ** (x + 1))  # noqa: E731
        lo, hi = 0.0, 40.0  # g > 0 left of the optimum, < 0 right of it
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if g(mid) > 0 else (lo, mid)
        assert k in (max(1, math.floor(lo)), math.ceil(lo)), (alpha, a, b, lo, k)
        # and the prediction's numbers are the formula's
        p = cm.predict(costs, "ngram", chain(k), prof)
        assert p.tokens_per_step == pytest.approx((1 - alpha ** (k + 1)) / (1 - alpha))
        assert p.speedup == pytest.approx(f(k) / f(0))


def all_trees(max_nodes: int, max_width: int, max_depth: int):
    """Every valid tree shape (as path lists) with 1..max_nodes nodes."""

    def subtrees(budget: int, depth_left: int):
        # lists of child-subtrees under one node: (paths relative to that node, size)
        yield [], 0
        if depth_left == 0:
            return

        def extend(rank: int, budget: int):
            yield [], 0
            if rank >= max_width or budget == 0:
                return
            for sub, n in subtrees(budget - 1, depth_left - 1):
                for rest, m in extend(rank + 1, budget - 1 - n):
                    yield [(rank,)] + [(rank,) + p for p in sub] + rest, 1 + n + m

        yield from ((p, n) for p, n in extend(0, budget) if n)

    for paths, n in subtrees(max_nodes, max_depth):
        if n:
            yield layout(paths)


def test_choose_tree_agrees_with_brute_force_over_all_small_trees():
    table = [[0.6, 0.25, 0.1], [0.7, 0.2, 0.05], [0.5, 0.3, 0.1], [0.8, 0.1, 0.05]]
    prof = cm.Profile(table)
    trees = list(all_trees(6, 3, 4))
    assert len(trees) > 100 and len({t.paths for t in trees}) == len(trees)
    for a, b in [(1.0, 0.05), (1.0, 0.2), (1.0, 0.6)]:
        costs = linear_costs(a, b)
        best = max(trees, key=lambda t: cm.score(costs, "ngram", t, prof))
        grown = [t for t in cm.grown_trees(prof, max_nodes=6, max_width=3, max_depth=4)]
        picked = cm.choose_tree(costs, prof, grown, kind="ngram")
        assert cm.score(costs, "ngram", picked, prof) == pytest.approx(cm.score(costs, "ngram", best, prof))
        # the default family holds the grown trees (and more), so it does at least as well (free heads: same costs)
        costs.heads = {1: 0.0, 16: 0.0}
        assert (
            cm.score(costs, "heads", cm.choose_tree(costs, prof, kind="heads"), prof)
            >= cm.score(costs, "ngram", best, prof) - 1e-12
        )
        assert cm.choose_tree(costs, prof, kind="ngram").is_chain  # prompt lookup proposes chains only


def test_grown_trees_are_best_per_size():
    prof = cm.Profile([[0.6, 0.25, 0.1], [0.7, 0.2, 0.05], [0.5, 0.3, 0.1]])
    by_size: dict[int, float] = {}
    for t in all_trees(5, 3, 3):
        by_size[t.size] = max(by_size.get(t.size, 0.0), expected_accepted(t, prof))
    for t in cm.grown_trees(prof, max_nodes=5, max_width=3, max_depth=3):
        assert expected_accepted(t, prof) == pytest.approx(by_size[t.size])


def test_cheap_verification_favours_wide_trees_and_costly_favours_short_chains():
    prof = cm.Profile.geometric(0.6)
    flat = linear_costs(1.0, 0.0)  # a GPU-like pass: more tokens cost nothing
    flat.heads = {1: 0.0, 16: 0.0}
    assert cm.choose_tree(flat, prof, kind="heads").size >= 16
    steep = linear_costs(1.0, 1.0)  # every verified token costs a whole pass
    assert cm.choose_tree(steep, prof, kind="ngram").size == 1


def test_draft_lm_pays_one_forward_per_depth_over_the_frontier():
    target, draft = linear_costs(1.0, 0.0), linear_costs(0.5, 0.1, "d")
    prof = cm.Profile.geometric(0.0)  # nothing accepted: the first draft forward feeds the bonus only
    tree = layout([[0], [1], [0, 0], [1, 0], [0, 0, 0]])  # depth 3; frontiers 1 (bonus), 2, 1
    expected = (0.5 + 0.1 * 1) + (0.5 + 0.1 * 2) + (0.5 + 0.1 * 1)
    assert cm.draft_cost("model", tree, 1.0, target, draft, 0.0) == pytest.approx(expected)
    assert cm.draft_cost("model", tree, 3.0, target, draft, 0.0) == pytest.approx(3 * 0.5 + 0.1 * 3 * 4)
    assert cm.draft_cost("ngram", tree, 1.0, target, None) == 0.0
    with pytest.raises(ValueError, match="draft model's costs"):
        cm.draft_cost("model", tree, 1.0, target, None)
    step = cm.step_cost(target, "model", tree, 2.0, draft, prof)
    assert step == pytest.approx(1.0 + cm.draft_cost("model", tree, 2.0, target, draft, 0.0))


def test_interpolation_and_context():
    c = cm.ModelCosts(
        "m", cm.CostKey("x", "float32", "cpu", 1), {64: {1: 1.0, 4: 4.0, 8: 6.0}, 512: {1: 2.0, 4: 5.0, 8: 7.0}}
    )
    assert c.forward_cost(2) == pytest.approx(2.0)  # between sizes
    assert c.forward_cost(16) == pytest.approx(10.0)  # past the largest: the last slope
    assert c.forward_cost(0.5) == pytest.approx(1.0)
    assert c.forward_cost(4, 288) == pytest.approx(4.5)  # halfway between the cache lengths
    assert c.forward_cost(4, 960) == pytest.approx(6.0)  # extrapolated in the cache length


# ------------------------------------------------------------------ acceptance profiles


def test_profile_from_rows_chain_rates_are_made_conditional():
    rows = [{"acceptance_rate_per_position": [0.8, 0.4, 0.2], "mean_acceptance_length": 2.4, "tokens": 24}]
    prof = cm.Profile.from_rows(rows)
    assert prof.table == [[pytest.approx(0.8)], [pytest.approx(0.5)], [pytest.approx(0.5)]]
    assert expected_accepted(chain(3), prof) == pytest.approx(0.8 + 0.4 + 0.2)
    assert prof(9, 0) == pytest.approx(0.5) and prof(1, 1) == 0.0


def test_profile_from_rows_prefers_depth_rank_counts():
    rows = [
        {
            "depth_rank_verified": [[10, 10], [6]],
            "depth_rank_accepted": [[6, 2], [3]],
            "acceptance_rate_per_position": [0.1],
        },
        {"depth_rank_verified": [[10, 0], [4]], "depth_rank_accepted": [[4, 0], [1]]},
    ]
    prof = cm.Profile.from_rows(rows)
    assert prof.table == [[0.5, 0.2], [0.4]]
    assert cm.Profile.from_rows([{"acceptance_rate_per_position": []}]) is None


def test_geometric_profile_fitted_to_an_acceptance_length():
    for length, k in [(4.0, 4), (2.0, 4), (1.5, 2)]:
        prof = cm.Profile.from_acceptance_length(length, k)
        assert expected_accepted(chain(k), prof) + 1 == pytest.approx(length, abs=1e-6)
    assert "tiny-draft" in cm.default_profile("model", "tiny-draft").source
    assert cm.default_profile("ngram").table[0][0] == cm.DEFAULT_ALPHA["ngram"]
    # a registry acceptance length is fitted at the chain length it was measured at
    from apar_spec.drafts import registry

    for name in ("smollm2-hydra", "tiny-heads", "tiny-draft"):
        entry = registry.get(name)
        assert entry.acceptance_k is not None
        prof = cm.default_profile("heads", name)
        assert expected_accepted(chain(entry.acceptance_k), prof) + 1 == pytest.approx(
            entry.acceptance_length, abs=1e-6
        )


# ------------------------------------------------------------------ measuring and the cache


def tiny_measure(model, name="micro", **kw):
    return cm.measure(
        model,
        name,
        sizes=(1, 2, 4),
        contexts=(8, 16),
        repeats=1,
        warmup=0,
        with_heads=kw.pop("with_heads", False),
        with_overhead=kw.pop("with_overhead", False),
        **kw,
    )


def test_measure_round_trip_and_keys(tmp_path):
    m64 = micro_model(dtype=torch.float64)
    costs = tiny_measure(m64, threads=1, with_heads=True, with_overhead=True, overhead_steps=3)
    assert set(costs.forward) == {8, 16} and set(costs.forward[8]) == {1, 2, 4}
    assert all(v > 0 for t in costs.forward.values() for v in t.values())
    assert set(costs.heads) == set(cm.HEAD_ROWS)
    o = costs.overhead
    assert min(o.base, o.per_branch, o.per_draft) >= 0.0
    path = cm.save(costs, tmp_path)
    again = cm.load_costs(cm.key_for(m64, 1), tmp_path)
    assert again == costs
    # another dtype, another shape, another thread count: another file, nothing found
    m32 = micro_model(dtype=torch.float32)
    wide = micro_model(dtype=torch.float64, hidden=64)
    assert cm.key_for(m32, 1).filename() != path.name
    assert cm.key_for(wide, 1).filename() != path.name
    assert cm.key_for(m64, 2).filename() != path.name
    assert cm.load_costs(cm.key_for(m32, 1), tmp_path) is None
    assert cm.load_costs(cm.key_for(wide, 1), tmp_path) is None
    # same shape, other weights: same costs
    assert cm.key_for(micro_model(seed=5, dtype=torch.float64), 1) == cm.key_for(m64, 1)


def test_corrupt_cache_is_one_line_error_or_measured_again(tmp_path):
    m = micro_model(dtype=torch.float64)
    key = cm.key_for(m, 1)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / key.filename()).write_text('{"version": 1, "forw')
    with pytest.raises(cm.CostCacheError, match="corrupt") as err:
        cm.load_costs(key, tmp_path)
    assert "\n" not in str(err.value) and key.filename() in str(err.value)
    said = []
    costs = cm.get_costs(
        m,
        "micro",
        threads=1,
        with_heads=False,
        directory=tmp_path,
        say=said.append,
        sizes=(1, 2),
        contexts=(8,),
        repeats=1,
        warmup=0,
        with_overhead=False,
    )
    assert any("corrupt" in s and "measuring again" in s for s in said)
    assert cm.load_costs(key, tmp_path) == costs  # the file is good again
    said.clear()
    assert cm.get_costs(m, "micro", threads=1, with_heads=False, directory=tmp_path, say=said.append) == costs
    assert said == []  # cached: nothing measured, nothing said


def test_auto_without_cached_costs_measures_first_and_says_so(capsys, monkeypatch):
    from apar_spec.api import generate
    from apar_spec.costs import measuring

    model, tok = micro_model(dtype=torch.float64), micro_tokenizer()
    original = cm.measure
    said: list[str] = []
    monkeypatch.setattr(
        measuring,
        "measure",
        lambda *a, **kw: original(
            *a, **{**kw, "sizes": (1, 2, 4, 8), "contexts": (8, 16), "repeats": 1, "warmup": 0, "overhead_steps": 3}
        ),
    )
    threads = torch.get_num_threads()
    assert cm.load_costs(cm.key_for(model, threads)) is None
    out = generate(
        model,
        tok,
        ["w5 w6 w7 w5 w6 w7"],
        mode="spec",
        draft="ngram",
        max_new_tokens=12,
        num_draft_tokens="auto",
        on_note=said.append,
    )[0]
    err = "\n".join(said)
    assert "no cached costs" in err and "measuring them once" in err and "auto: picked chain:" in err
    assert capsys.readouterr().err == ""  # the library never prints: notes go to the callback
    assert cm.load_costs(cm.key_for(model, threads)) is not None
    plain = generate(model, tok, ["w5 w6 w7 w5 w6 w7"], mode="ar", max_new_tokens=12)[0]
    assert out.token_ids == plain.token_ids  # whatever k was picked, speculation stays lossless
    # second time: cached, no measuring
    said.clear()
    opts = cm.resolve_auto_options(model, tok, "spec", "ngram", {"tree": "auto"}, say=said.append)
    assert not any("measuring" in s for s in said)
    from apar_spec.decoding.draft_tree import parse_tree

    shape = parse_tree(opts["tree"])
    assert opts["num_draft_tokens"] == shape.depth
    from apar_spec.options import DecodeOptions

    assert DecodeOptions(num_draft_tokens=opts["num_draft_tokens"]).max_draft_tokens >= shape.depth
    # a non-speculative mode ignores auto
    assert cm.resolve_auto_options(model, tok, "ar", None, {"num_draft_tokens": "auto"})["num_draft_tokens"] == 4


def test_resolve_auto_bad_input():
    model = micro_model(dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown speculator kind"):
        cm.resolve_auto(model, speculator_kind="magic")
    with pytest.raises(ValueError, match="loaded in"):
        cm.resolve_auto(model, dtype="float32", speculator_kind="ngram")


# ------------------------------------------------------------------ the report


def bench_rows(model="m", draft="ngram"):
    rows = []
    for p in ("p1", "p2"):
        common = dict(
            prompt_id=p,
            category="c",
            repeat=0,
            model=model,
            dtype="float32",
            device="cpu",
            threads=1,
            temperature=0.0,
            max_new_tokens=512,
            prompt_tokens=10,
            mean_live_kv=60.0,
            setup_id="s",
        )
        rows.append(
            dict(
                common,
                variant="ar",
                config="ar",
                draft=None,
                k=None,
                tokens=101,
                target_steps=101,
                tokens_per_s=100.0,
                wall_s=1.01,
                output_ids=[1] * 101,
                mean_acceptance_length=1.0,
                acceptance_rate_per_position=[],
                accepted=0,
            )
        )
        rows.append(
            dict(
                common,
                variant="spec",
                config="spec",
                draft=draft,
                k=1,
                tokens=101,
                target_steps=51,
                tokens_per_s=180.0,
                wall_s=0.56,
                output_ids=[1] * 101,
                mean_acceptance_length=2.0,
                acceptance_rate_per_position=[1.0],
                accepted=50,
            )
        )
    return rows


def test_report_shows_predicted_next_to_achieved():
    from apar_spec.cli.report_view import render
    from apar_spec.experiments.report import summarize
    from rich.console import Console

    rows = bench_rows()
    rep = summarize(rows)
    spec = next(v for v in rep.groups["all"] if v.variant == "spec")
    assert spec.predicted_vs_plain is None and spec.prediction_note == "no cached costs"
    assert any("apar-spec costs measure --model m" in n for n in rep.notes)
    costs = cm.ModelCosts("m", cm.CostKey("nofp", "float32", "cpu", 1), {64: {n: 0.001 for n in SIZES}}, names=["m"])
    cm.save(costs)
    rep = summarize(rows)
    spec = next(v for v in rep.groups["all"] if v.variant == "spec")
    assert spec.achieved_vs_plain == pytest.approx(1.8)
    # a constant pass cost: 1 prefill + 100 steps vs 1 prefill + 100 / 2 steps
    assert spec.predicted_vs_plain == pytest.approx(101 / 51)
    console = Console(record=True, width=200, force_terminal=False)
    render(rep, console)
    text = console.export_text()
    assert "predicted vs achieved" in text and "1.80x" in text and "1.98x" in text


# ------------------------------------------------------------------ the commands


def test_costs_commands(tmp_path):
    from apar_spec.cli.app import app

    runner = CliRunner()
    empty = runner.invoke(app, ["costs", "show"])
    assert empty.exit_code == 0 and "no cached costs" in empty.stdout
    folder = tmp_path / "m"
    micro_model(dtype=torch.float32).save_pretrained(folder)
    micro_tokenizer().save_pretrained(folder)
    res = runner.invoke(app, ["costs", "measure", "--model", str(folder), "--repeats", "1"])
    assert res.exit_code == 0, res.output
    assert "measuring" in res.stderr and "pass ms @" in res.stdout
    shown = runner.invoke(app, ["costs", "show", "--json"])
    data = json.loads(shown.stdout)
    assert len(data) == 1 and data[0]["names"] == [str(folder)] and data[0]["key"]["threads"] == 1
    chosen = runner.invoke(app, ["costs", "choose", "--model", str(folder), "--draft", "ngram", "--json"])
    assert chosen.exit_code == 0, chosen.output
    assert json.loads(chosen.stdout)["best"]["nodes"] >= 1
    bad = runner.invoke(app, ["costs", "measure", "--model", str(folder), "--repeats", "0"])
    assert bad.exit_code == 2 and bad.stderr.startswith("Error: --repeats")


def test_bench_k_auto_picks_k_from_the_cost_model(tmp_path, capsys, monkeypatch):
    from apar_spec.experiments.bench import compare
    from apar_spec.experiments.bench_files import read_rows
    from apar_spec.experiments.bench_plan import BenchSettings
    from test_bench import make_micro_setup

    micro = make_micro_setup(tmp_path / "micro")
    s = BenchSettings(
        target=micro["target"],
        draft="ngram",
        prompts=micro["prompts"],
        out=tmp_path / "r.jsonl",
        device="cpu",
        modes=["ar", "spec"],
        k="auto",
        max_new_tokens=6,
        repeats=1,
        warmup=0,
        limit=1,
    )
    from apar_spec.costs import measuring

    original = cm.measure
    monkeypatch.setattr(
        measuring,
        "measure",
        lambda *a, **kw: original(
            *a, **{**kw, "sizes": (1, 2, 4), "contexts": (8,), "repeats": 1, "warmup": 0, "overhead_steps": 2}
        ),
    )
    said: list[str] = []
    compare(s, say=said.append)
    assert any("measuring them once" in m for m in said)
    spec = [r for r in read_rows(tmp_path / "r.jsonl") if r["config"] == "spec"]
    assert spec and all(isinstance(r["k"], int) and 1 <= r["k"] <= 16 for r in spec)
    with pytest.raises(ValueError, match="'auto'"):
        BenchSettings(k="many")
    from apar_spec.cli.app import app

    bad = CliRunner().invoke(app, ["bench", "-k", "many", "--out", str(tmp_path / "x.jsonl")])
    assert bad.exit_code == 2 and bad.stderr.strip() == "Error: -k must be >= 1 (an integer) or 'auto' (got 'many')"


def test_switch_costs_of_a_draft_lm_are_measured_and_used():
    target, draft = micro_model(dtype=torch.float64), micro_model(seed=1, dtype=torch.float64, hidden=16)
    tc, dc = tiny_measure(target, "t", threads=1), tiny_measure(draft, "d", threads=1)
    sw = cm.measure_switch(
        target,
        draft,
        repeats=1,
        warmup=0,
        context=8,
        target_costs=tc,
        draft_costs=dc,
        tokenizer=micro_tokenizer(),
        steps=2,
    )
    assert set(sw) == {"target", "draft", "per_pass"} and min(sw.values()) >= 0.0
    # the prediction charges both switches once per step and the draft's Python once per depth
    t, d = linear_costs(1.0, 0.0), linear_costs(0.5, 0.0, "d")
    before = cm.draft_cost("model", chain(3), 1.0, t, d)
    t.switch[d.key.fingerprint] = {"target": 0.25, "draft": 0.125, "per_pass": 0.5}
    assert cm.draft_cost("model", chain(3), 1.0, t, d) == pytest.approx(before + 0.375 + 3 * 0.5)
    assert cm.draft_cost("model", chain(3), 2.0, t, d) - cm.draft_cost(
        "model", chain(3), 2.0, t, linear_costs(0.5, 0.0, "e")
    ) == pytest.approx(0.375 + 2 * 3 * 0.5)


def test_heads_trees_are_no_deeper_than_the_heads():
    costs = linear_costs(1.0, 0.0)
    costs.heads = {1: 0.01, 16: 0.05}
    prof = cm.Profile.geometric(0.9)
    shape = cm.choose_tree(costs, prof, kind="heads")
    assert shape.depth <= costs.num_heads and shape.size > costs.num_heads  # free verification: wide, not deep
    assert cm.choose_k(costs, prof, kind="heads", max_k=costs.num_heads) == costs.num_heads


def test_cached_costs_without_heads_get_only_the_heads_added(tmp_path):
    m = micro_model(dtype=torch.float64)
    costs = tiny_measure(m, threads=1)
    costs.switch["x"] = {"target": 0.5}
    cm.save(costs, tmp_path)
    said = []
    again = cm.get_costs(m, "other-name", threads=1, with_heads=True, directory=tmp_path, say=said.append)
    assert again.heads and again.forward == costs.forward and again.switch == costs.switch  # nothing else re-measured
    assert said and all("heads" in s for s in said)
    assert cm.load_costs(cm.key_for(m, 1), tmp_path).names == ["micro", "other-name"]


def test_report_names_what_is_missing_for_heads_rows():
    from apar_spec.experiments.report import summarize

    rows = bench_rows()
    for r in rows:
        if r["config"] == "spec":
            r["draft_kind"] = "heads"
    cm.save(cm.ModelCosts("m", cm.CostKey("nofp", "float32", "cpu", 1), {64: {n: 0.001 for n in SIZES}}, names=["m"]))
    spec = next(v for v in summarize(rows).groups["all"] if v.variant == "spec")
    assert spec.predicted_vs_plain is None and "no heads measurement" in spec.prediction_note
