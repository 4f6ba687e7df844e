"""The fork router (apar_spec.models.router, DecodeOptions.fork_gate): a prompt it scores under the
threshold decodes with [Fork] disabled. Checked against the per-branch reference (which
applies the router by hand), against plain decoding, under speculation, and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from micro import CHILD, EOS, FORK, fork_processor, micro_model
from test_spec import speculators

from apar_spec.decoding.decoder import Decoder
from apar_spec.decoding.reference import reference_decode
from apar_spec.decoding.tokens import AparTokens
from apar_spec.models.adapter import AdapterError, apply_adapter
from apar_spec.models.router import ROUTER_FILE, ForkRouter, fit_router, prompt_states, router_of, set_router
from apar_spec.options import DecodeOptions

APAR = AparTokens(FORK, CHILD, frozenset(), {}, ())
PROMPTS = [[1, 10, 11, 12, 13, 14], [1, 20, 7], [1, 33, 34, 35, 36], [1, 40, 41], [1, 50, 51, 52], [1, 60, 8, 9]]


def routed_model(family: str = "llama", seed: int = 0, threshold: float = 0.5):
    """A micro model whose router splits PROMPTS: its bias puts the threshold at the median score."""
    model = micro_model(family, seed=seed)
    states = prompt_states(model, PROMPTS)  # [n, hidden]
    w = torch.randn(states.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = states.double() @ w  # [n]
    mid = float(z.sort().values[len(PROMPTS) // 2 - 1 : len(PROMPTS) // 2 + 1].mean())  # between two scores
    logit_t = torch.logit(torch.tensor(threshold, dtype=torch.float64))
    set_router(model, ForkRouter(tuple(w.tolist()), float(logit_t - mid), threshold))
    return model


def fork_path(branches, b) -> tuple:
    return () if b.parent is None else fork_path(branches, branches[b.parent]) + (b.fork_index,)


def tokens_by_path(result) -> dict:
    return {fork_path(result.branches, b): b.tokens for b in result.branches}


@pytest.mark.parametrize("family,seed", [("llama", 0), ("qwen2", 3), ("mistral", 1)])
def test_gated_prompts_do_not_fork_and_every_tree_equals_the_reference(family, seed):
    """Half the prompts are gated: each of those is one branch, equal to fork-disabled
    decoding; the others fork; all equal the reference in tokens, logits and shape."""
    model = routed_model(family, seed)
    opts = DecodeOptions(
        max_new_tokens=600, max_depth=2, max_branch_tokens=24, logits_processor=fork_processor(4, 3, salt=seed)
    )
    results = Decoder(model, opts, APAR, True, {EOS}, record_logits=True).run(PROMPTS)
    plain = Decoder(model, opts, APAR, False, {EOS}).run(PROMPTS)  # [Fork] disabled: the model's plain answer
    router = router_of(model)
    want_p = [router.p_list(h) for h in prompt_states(model, PROMPTS)]
    gated = [r.forks_gated for r in results]
    assert sum(gated) == len(PROMPTS) // 2  # the router really splits the batch
    for prompt, result, p_plain, p in zip(PROMPTS, results, plain, want_p):
        assert result.p_list == pytest.approx(p, abs=1e-9)
        assert result.forks_gated == (p < 0.5)
        if result.forks_gated:
            assert len(result.branches) == 1 and result.branches[0].tokens == p_plain.branches[0].tokens
        else:
            assert len(result.branches) > 1
        ref = reference_decode(model, prompt, opts, APAR, True, {EOS})
        mine = {fork_path(result.branches, b): b for b in result.branches}
        assert set(mine) == set(ref), "different tree shape"
        for path, rb in ref.items():
            assert mine[path].tokens == rb.tokens, f"branch {path} differs"
            for x, y in zip(mine[path].logits, rb.logits):
                torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


def test_the_threshold_option_overrides_the_routers_own():
    model = routed_model()
    proc = fork_processor(4, 3)

    def gated(**kw) -> list[bool]:
        opts = DecodeOptions(max_new_tokens=300, max_branch_tokens=16, logits_processor=proc, **kw)
        results = Decoder(model, opts, APAR, True, {EOS}).run(PROMPTS)
        return [r.forks_gated for r in results]

    assert sum(gated()) == len(PROMPTS) // 2  # the router's own threshold (0.5)
    assert not any(gated(fork_gate=0.0))  # 0 turns it off
    assert all(gated(fork_gate=1.0))  # every p(list) < 1
    assert sum(gated(fork_gate=0.5)) == len(PROMPTS) // 2
    plain_model = micro_model("llama", seed=0)  # no router: nothing gated by default ...
    opts = DecodeOptions(max_new_tokens=300, max_branch_tokens=16, logits_processor=proc)
    assert not any(
        r.forks_gated or r.p_list is not None for r in Decoder(plain_model, opts, APAR, True, {EOS}).run(PROMPTS)
    )
    with pytest.raises(ValueError) as err:  # ... and asking for a gate there is one line
        Decoder(plain_model, DecodeOptions(fork_gate=0.3), APAR, True, {EOS})
    assert "router" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), "0.3"])
def test_a_bad_threshold_is_one_line(bad):
    with pytest.raises(ValueError) as err:
        DecodeOptions(fork_gate=bad)
    assert "fork_gate" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["self", "random", "ngram"])
def test_speculation_is_lossless_under_the_gate(kind):
    model = routed_model()
    proc = fork_processor(4, 3)

    def run(spec=None, k=1):
        opts = DecodeOptions(
            max_new_tokens=400, max_branch_tokens=20, max_depth=2, logits_processor=proc, num_draft_tokens=k
        )
        return [tokens_by_path(r) for r in Decoder(model, opts, APAR, True, {EOS}, speculator=spec).run(PROMPTS)]

    plain = run()
    assert sum(len(t) == 1 for t in plain) == len(PROMPTS) // 2
    for k in (1, 3):
        assert run(speculators(model, proc, 0)[kind](), k) == plain


def test_fit_router_separates_and_folds_the_standardisation():
    """Two clusters on very different scales: the fitted router puts every point on its
    side of 0.5, and p(list) of a point is what the standardised fit would give."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([100.0, 0.01, 1.0, 5.0])
    lists = torch.randn(40, 4, generator=g) * scale + torch.tensor([50.0, 0.02, 1.0, 0.0])
    shorts = torch.randn(40, 4, generator=g) * scale - torch.tensor([50.0, 0.02, 1.0, 0.0])
    router = fit_router(torch.cat([lists, shorts]), [True] * 40 + [False] * 40, threshold=0.2, l2=0.01)
    p = [router.p_list(h) for h in torch.cat([lists, shorts])]
    assert all(x > 0.5 for x in p[:40]) and all(x < 0.5 for x in p[40:])
    assert router.threshold == 0.2 and len(router.weight) == 4
    with pytest.raises(ValueError):
        fit_router(lists, [True] * 40, threshold=0.1)  # one label only


def test_router_from_dict_errors_are_one_line():
    good = {"weight": [0.1, -0.2], "bias": 0.0, "threshold": 0.1}
    assert ForkRouter.from_dict(good).to_dict() == good
    for bad in (
        [1, 2],
        {**good, "weight": []},
        {**good, "weight": [1, "x"]},
        {**good, "bias": None},
        {**good, "threshold": 2},
        {**good, "threshold": True},
    ):
        with pytest.raises(ValueError) as err:
            ForkRouter.from_dict(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError) as err:
        ForkRouter.from_dict(good).p_list(torch.zeros(3))
    assert "another model" in str(err.value)


def test_an_adapter_carries_its_router_and_refuses_a_bad_one(tmp_path):
    """router.json becomes the model's router; a malformed one is a one-line error before the
    model or tokenizer change."""
    from test_smollm2 import _tiny_llama, _trained_peft

    _trained_peft(tmp_path)
    hidden = _tiny_llama(0)[0].config.hidden_size
    router = ForkRouter(tuple([0.01] * hidden), -1.0, 0.1)
    (tmp_path / "ad" / ROUTER_FILE).write_text(json.dumps(router.to_dict()))
    fresh, fresh_tok = _tiny_llama(0)
    apply_adapter(fresh, fresh_tok, tmp_path / "ad")
    assert router_of(fresh) == router
    for text in ("{not json", json.dumps({**router.to_dict(), "threshold": -1})):
        (tmp_path / "ad" / ROUTER_FILE).write_text(text)
        fresh, fresh_tok = _tiny_llama(0)
        with pytest.raises(AdapterError) as err:
            apply_adapter(fresh, fresh_tok, tmp_path / "ad")
        assert ROUTER_FILE in str(err.value) and "\n" not in str(err.value)
        assert len(fresh_tok) == 64 and router_of(fresh) is None  # nothing was changed


@pytest.mark.parametrize("mode,draft", [("apar", None), ("apar+spec", "ngram")])
def test_served_requests_are_routed_as_offline(mode, draft):
    """Requests arriving mid-flight are routed at their own prefill: each served answer (and its
    gate decision) equals offline generate's."""
    import random

    from micro import micro_tokenizer
    from test_serving_engine import serve

    from apar_spec import generate
    from apar_spec.serving import Engine

    model, tok, proc = routed_model(), micro_tokenizer(), fork_processor(4, 3)
    rng = random.Random(5)
    budgets = [rng.choice([12, 24]) for _ in PROMPTS]
    arrivals = sorted(rng.randrange(0, 10) for _ in PROMPTS)
    engine = Engine(model, tok, mode=mode, draft=draft, kv_budget=120, max_new_tokens=24, logits_processor=proc)
    handles = serve(engine, PROMPTS, budgets, arrivals)
    gated = []
    for p, m, h in zip(PROMPTS, budgets, handles):
        offline = generate(model, tok, [p], mode=mode, draft=draft, logits_processor=proc, **engine.offline_options(m))[
            0
        ]
        got = h.result(0)
        assert [b.token_ids for b in got.branches] == [b.token_ids for b in offline.branches]
        assert got.stats.forks_gated == offline.stats.forks_gated and got.stats.p_list == pytest.approx(
            offline.stats.p_list
        )
        gated.append(got.stats.forks_gated)
        assert len(got.branches) == 1 or not got.stats.forks_gated
    assert 0 < sum(gated) < len(PROMPTS)
    assert any(len(h.result(0).branches) > 1 for h in handles)  # the others really forked


LIST_PROMPTS = [
    "Give 3 tips for better sleep.",
    "List 4 ways to save money.",
    "Name 3 steps to learn to swim.",
    "Give 3 reasons to read more.",
    "List 3 ways to stay calm.",
    "Name 4 tips for a tidy desk.",
]
SHORT_PROMPTS = [
    "What is 2 + 3?",
    "What is 7 + 1?",
    "What is 4 + 4?",
    "What is 9 + 2?",
    "What is 5 + 6?",
    "What is 3 + 3?",
]
LIST_ANSWER = "1. Plan: make a plan first.\n2. Start: begin with small steps.\n3. Keep: repeat it every day."


def router_data(path, list_prompts, short_prompts):
    rows = [{"prompt": p, "answer": LIST_ANSWER} for p in list_prompts] + [
        {"prompt": p, "answer": "It is 5."} for p in short_prompts
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_fit_router_writes_a_router_into_a_model_folder(tmp_path):
    """Labels come from the data's own answer trees; the router lands in config.json, loads with
    the model, and gates the short prompts at decode time. Held-out counts are reported."""
    import shutil

    from test_cli import run

    from apar_spec import generate
    from apar_spec.models.loading import embedded_dir, load

    folder = tmp_path / "m"
    shutil.copytree(embedded_dir("tiny-apar"), folder)
    data = router_data(tmp_path / "d.jsonl", LIST_PROMPTS[:5], SHORT_PROMPTS[:5])
    check = router_data(tmp_path / "c.jsonl", LIST_PROMPTS[5:], SHORT_PROMPTS[5:])
    res = run(
        "fit-router", "--model", str(folder), "--data", str(data), "--check", str(check), "--threshold", "0.5", "--json"
    )
    assert res.exit_code == 0, res.output
    fit = json.loads(res.stdout)
    assert (fit["prompts"], fit["forked"], fit["gated_forked"], fit["gated_plain"]) == (10, 5, 0, 5)
    assert fit["check"]["prompts"] == 2 and fit["path"] == str(folder / "config.json")
    model, tok = load(str(folder))
    assert router_of(model).threshold == 0.5
    outs = generate(
        model,
        tok,
        ["Question: What is 8 + 1?\nAnswer:", "Question: Give 3 tips for a calm morning.\nAnswer:"],
        mode="apar",
        max_new_tokens=40,
    )
    assert [o.stats.forks_gated for o in outs] == [True, False] and outs[0].stats.p_list < 0.5 < outs[1].stats.p_list


def test_cli_fit_router_bad_input_is_one_line_and_writes_nothing(tmp_path):
    import shutil

    from test_cli import assert_user_error, run

    from apar_spec.models.loading import embedded_dir

    folder = tmp_path / "m"
    shutil.copytree(embedded_dir("tiny-apar"), folder)
    before = (folder / "config.json").read_text()
    one_kind = router_data(tmp_path / "d.jsonl", LIST_PROMPTS, [])
    assert_user_error(
        run("fit-router", "--model", str(folder), "--data", str(one_kind)), "answers with forks and answers without"
    )
    assert_user_error(run("fit-router", "--model", str(tmp_path / "nope"), "--data", str(one_kind)), "is not a folder")
    assert_user_error(run("fit-router", "--model", str(folder), "--data", str(tmp_path / "missing.jsonl")), "not found")
    assert_user_error(
        run("fit-router", "--model", str(folder), "--data", str(one_kind), "--threshold", "1.5"),
        "threshold must be in (0, 1)",
    )
    assert (folder / "config.json").read_text() == before and not list(folder.glob("*.tmp"))


def test_cli_train_with_router_saves_a_router_fitted_on_the_same_data(tmp_path):
    """``apar-spec train --router`` = train, then ``fit-router`` on the same data into the saved model;
    data with one kind of answer is refused before any training."""
    from test_cli import assert_user_error, run

    from apar_spec.models.loading import load

    data = router_data(tmp_path / "d.jsonl", LIST_PROMPTS[:5], SHORT_PROMPTS[:5])
    out = tmp_path / "trained"
    res = run(
        "train",
        "--model",
        "tiny-apar",
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--router",
        "--json",
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["steps"] == 1 and rep["router"]["path"] == str(out / "config.json")
    assert (rep["router"]["prompts"], rep["router"]["forked"]) == (10, 5)
    model, _ = load(str(out))
    assert router_of(model) is not None and router_of(model).threshold == rep["router"]["threshold"]
    one_kind = router_data(tmp_path / "one.jsonl", LIST_PROMPTS[:4], [])
    assert_user_error(
        run(
            "train",
            "--model",
            "tiny-apar",
            "--data",
            str(one_kind),
            "--out",
            str(tmp_path / "x"),
            "--steps",
            "1",
            "--router",
        ),
        "answers with forks and answers without",
    )
    assert not (tmp_path / "x").exists()  # refused before training
    assert_user_error(
        run(
            "train",
            "--model",
            "tiny-apar",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "y"),
            "--steps",
            "1",
            "--mode",
            "plain",
            "--router",
        ),
        "--router needs --mode apar",
    )
