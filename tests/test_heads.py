"""Medusa-style draft heads: lossless trees in one pass, no extra forward, training, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from apar_spec.drafts.heads import DraftHeads, HeadsSpeculator, load_heads, pick_folder, save_heads, target_fingerprint
from apar_spec.drafts.registry import resolve, vocab_fingerprint
from apar_spec.drafts.train_heads import HeadsTrainConfig, train_heads
from micro import CHILD, fork_processor, micro_model, micro_tokenizer
from test_spec import PROMPTS, tree_key
from test_tree_spec import SHAPES, greedy_case

from apar_spec import generate


def random_heads(model, seed=0, num_heads=4):
    torch.manual_seed(seed)
    heads = DraftHeads(model.config.hidden_size, num_heads).to(model.dtype)
    with torch.no_grad():
        for b in heads.blocks:
            b.weight.normal_(0, 0.3)
    return heads


def speculator(model, seed=0):
    return HeadsSpeculator(random_heads(model, seed), model.get_output_embeddings(), mask_ids=(CHILD,))


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
@pytest.mark.parametrize("shape", [None] + SHAPES)
def test_heads_trees_are_lossless_in_greedy(shape, kind):
    seed, model, tok, _, kw = greedy_case(shape)
    make = speculator if kind == "medusa" else chained_speculator
    for plain_mode, spec_mode in [("ar", "spec"), ("apar", "apar+spec")]:
        plain = generate(model, tok, PROMPTS, mode=plain_mode, **kw)
        spec = generate(model, tok, PROMPTS, mode=spec_mode, draft=make(model, seed), tree=shape, **kw)
        for p, s in zip(plain, spec):
            assert tree_key(s) == tree_key(p)
            assert s.token_ids == p.token_ids and s.text == p.text
            assert s.stats.draft_forwards == 0 and s.stats.drafted > 0


def test_heads_need_no_extra_target_forward_and_skip_a_childs_first_step():
    model = micro_model("llama", seed=5)
    calls = {"n": 0}
    model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    base_calls = {"n": 0}
    model.get_decoder().register_forward_hook(lambda *a: base_calls.__setitem__("n", base_calls["n"] + 1))
    proc = fork_processor(4, 3, salt=5)
    seen = []

    class Spy(HeadsSpeculator):
        def propose(self, views, sampling=None):
            seen.extend((v.parent is not None and len(v.tokens) == 1, v.hidden is None) for v in views)
            return super().propose(views, sampling)

    spy = Spy(random_heads(model), model.get_output_embeddings(), mask_ids=(CHILD,))
    out = generate(
        model,
        micro_tokenizer(),
        PROMPTS[:1],
        mode="apar+spec",
        draft=spy,
        tree="topk:2x2",
        max_new_tokens=400,
        max_branch_tokens=24,
        logits_processor=proc,
    )[0]
    assert len(out.branches) >= 3
    assert calls["n"] == 0  # every pass went through the base model + LM head ...
    assert base_calls["n"] == out.stats.target_steps  # ... once per step: prefill + one verify per step
    assert all(first == no_hidden for first, no_hidden in seen)  # only a child's first step lacks a hidden state


def test_saved_heads_reload_and_refuse_another_target(tmp_path):
    model, tok = micro_model("llama", seed=1), micro_tokenizer()
    heads = random_heads(model)
    n, fp = vocab_fingerprint(tok)
    meta = {
        "target": "micro",
        "hidden_size": 32,
        "vocab_size": n,
        "fingerprint": fp,
        "target_fingerprint": target_fingerprint(model),
    }
    save_heads(heads, tmp_path / "h", meta)
    again = load_heads(tmp_path / "h", model, tok)
    assert torch.allclose(again.blocks[0].weight, heads.blocks[0].weight.to(torch.bfloat16).to(model.dtype))
    assert isinstance(resolve(str(tmp_path / "h"), model, tok), HeadsSpeculator)  # a heads folder path resolves too
    with pytest.raises(ValueError, match="hidden size 32 .* has 16"):
        load_heads(tmp_path / "h", micro_model("llama", hidden=16), tok)
    other = json.loads((tmp_path / "h" / "heads.json").read_text())
    other["fingerprint"] = "000000000000"
    (tmp_path / "h" / "heads.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="fit vocabulary 000000000000"):
        load_heads(tmp_path / "h", model, tok)


def test_one_name_serves_several_targets_by_lm_head(tmp_path):
    a, b = micro_model("llama", seed=1), micro_model("llama", seed=2)
    for name, m in (("a", a), ("b", b)):
        save_heads(
            random_heads(m, seed=ord(name)),
            tmp_path / "both" / name,
            {"target": name, "hidden_size": 32, "target_fingerprint": target_fingerprint(m)},
        )
    ha, hb = load_heads(tmp_path / "both", a), load_heads(tmp_path / "both", b)
    assert not torch.equal(ha.blocks[0].weight, hb.blocks[0].weight)
    with pytest.raises(ValueError, match="no draft heads .* were trained for this target"):
        load_heads(tmp_path / "both", micro_model("llama", seed=3))


def test_an_apar_model_and_its_base_get_their_own_heads_by_vocabulary_size(tmp_path):
    """smollm2-apar shares smollm2's LM-head rows (plus [Fork]/[Child]): same fingerprint, more rows."""
    base = micro_model("llama", seed=1)
    apar = micro_model("llama", seed=1)
    apar.resize_token_embeddings(base.config.vocab_size + 2)
    assert target_fingerprint(apar) == target_fingerprint(base)
    for name, m in (("base", base), ("base-apar", apar)):  # "base" sorts first: order alone would pick it
        rows = m.get_output_embeddings().weight.shape[0]
        save_heads(
            random_heads(m, seed=len(name)),
            tmp_path / "two" / name,
            {"target": name, "hidden_size": 32, "vocab_size": rows, "target_fingerprint": target_fingerprint(m)},
        )
    assert pick_folder(tmp_path / "two", base).name == "base"
    assert pick_folder(tmp_path / "two", apar).name == "base-apar"
    spec = resolve(str(tmp_path / "two"), apar, None)  # a folder of per-target heads resolves as heads, by path too
    assert isinstance(spec, HeadsSpeculator) and spec.heads.blocks[0].weight.shape == (32, 32)


def micro_training_setup():
    """A float32 micro target, its tokenizer and 24 training prompts (seeded)."""
    torch.manual_seed(0)
    model, tok = micro_model("llama", seed=9, dtype=torch.float32), micro_tokenizer()
    return model, tok, [{"prompt": f"w{5 + i % 20} w{6 + i % 13} w{7 + i % 7}"} for i in range(24)]


def micro_heads_config(steps: int) -> HeadsTrainConfig:
    return HeadsTrainConfig(
        num_heads=2, steps=steps, batch_size=64, lr=3e-3, max_new_tokens=24, gen_batch_size=8, save_every=30
    )


def test_head_training_reduces_the_heads_loss(tmp_path):
    model, tok, rows = micro_training_setup()
    cfg = micro_heads_config(steps=60)
    rep = train_heads(model, tok, rows, tmp_path / "h", cfg, target_name="micro")
    assert rep["val_loss"] < 0.95 * rep["val_loss_start"], (rep["val_loss"], rep["val_loss_start"])
    assert (tmp_path / "h" / "heads.safetensors").is_file() and (tmp_path / "h" / "distill.jsonl").is_file()
    # resume: a second run with more steps continues from the saved state, distillation is not redone
    lines = (tmp_path / "h" / "distill.jsonl").read_text()
    msgs = []
    train_heads(
        model, tok, rows, tmp_path / "h", micro_heads_config(steps=70), target_name="micro", progress=msgs.append
    )
    assert (tmp_path / "h" / "distill.jsonl").read_text() == lines
    assert any("resumed at step 60" in m for m in msgs)
    assert json.loads((tmp_path / "h" / "heads.json").read_text())["val_loss_start"] == rep["val_loss_start"]


def test_remap_labels_to_a_reduced_head():
    from apar_spec.drafts.train_heads import remap_labels

    Y = torch.tensor([[5, -100], [2, 9]])
    assert remap_labels(Y, torch.tensor([9, 5]), 12).tolist() == [[1, -100], [-100, 0]]


def test_heads_train_on_a_reduced_vocabulary_and_count_outside_tokens_as_misses(tmp_path):
    from apar_spec.drafts.train_heads import features, head_accuracy
    from apar_spec.drafts.vocab import DraftVocab

    model, tok, rows = micro_training_setup()
    cfg = micro_heads_config(steps=60)
    full = train_heads(model, tok, rows, tmp_path / "full", cfg, target_name="micro")
    seqs = [json.loads(line) for line in (tmp_path / "full" / "distill.jsonl").read_text().splitlines()]
    assert seqs  # the distilled answers the reduced run reuses below (same prompts, same model)
    V = model.get_output_embeddings().weight.shape[0]
    ids = torch.arange(V // 2)  # half the vocabulary: some targets fall outside
    msgs = []
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "distill.jsonl").write_text((tmp_path / "full" / "distill.jsonl").read_text())
    half = train_heads(
        model, tok, rows, tmp_path / "half", cfg, target_name="micro", progress=msgs.append, vocab=DraftVocab(ids)
    )
    assert half["train_vocab"] == V // 2 and full["train_vocab"] is None
    assert any("reduced vocabulary" in m for m in msgs)
    assert half["val_loss"] < 0.95 * half["val_loss_start"], (half["val_loss"], half["val_loss_start"])
    # accuracy in full ids: a head that only knows the first half can never hit a token of the second half
    heads = load_heads(tmp_path / "half", model)
    sequences = [(list(ids_), int(first)) for r in seqs for ids_, first in r["sequences"]]
    feats = features(model, sequences, 2)
    H, Y = feats.H, feats.Y
    outside = float(((Y >= V // 2) & (Y >= 0)).sum() / (Y >= 0).sum())
    assert outside > 0.05  # the check below can fail
    acc = head_accuracy(heads, DraftVocab(ids).head(model.get_output_embeddings()), H, Y, ids)
    assert all(a <= 1 - outside + 1e-6 for a in acc)
    with pytest.raises(ValueError, match=f"trained with vocabulary {V // 2}, not full"):
        train_heads(model, tok, rows, tmp_path / "half", micro_heads_config(steps=70), target_name="micro")


def test_cli_train_heads_and_its_bad_input(tmp_path):
    from test_bench import save_micro
    from test_cli import assert_user_error, run

    target = save_micro(tmp_path, "t", 0)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"w{5 + i} w{9 + i}"}) + "\n" for i in range(6)))
    out = tmp_path / "h"
    result = run(
        "train-heads",
        "--target",
        target,
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "4",
        "--heads",
        "2",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "16",
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "heads.json").read_text())["num_heads"] == 2
    data.write_text('{"prompt": ""}\n')
    assert_user_error(
        run("train-heads", "--target", target, "--data", str(data), "--out", str(out)), "line 1", "prompt"
    )
    assert_user_error(run("train-heads", "--target", target, "--data", "corpus:x", "--out", str(out)), "corpus:N")
    assert_user_error(
        run("train-heads", "--target", target, "--data", str(data), "--out", str(out), "--kind", "eagle"),
        "kind must be medusa or hydra",
    )
    data.write_text("".join(json.dumps({"prompt": f"w{5 + i} w{9 + i}"}) + "\n" for i in range(6)))
    reduced = tmp_path / "ranked" / "h"
    assert_user_error(
        run("train-heads", "--target", target, "--data", str(data), "--out", str(reduced), "--vocab", "16"),
        "vocab.json",
        "--vocab-from",
    )
    from apar_spec.drafts.vocab import save_ranking

    reduced.parent.mkdir()
    save_ranking(reduced.parent, list(range(63, -1, -1)), {})
    result = run(
        "train-heads",
        "--target",
        target,
        "--data",
        str(data),
        "--out",
        str(reduced),
        "--steps",
        "4",
        "--heads",
        "2",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "16",
        "--vocab",
        "16",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads((reduced / "heads.json").read_text())["train_vocab"] == 16


def test_tree_cache_hidden_path_gives_the_plain_logits():
    from apar_spec.decoding.tree_cache import TreeCache

    model = micro_model("llama", seed=3)
    outs = []
    for hidden in (False, True):
        tc = TreeCache(model, 2)
        tc.add_chain(0, [1, 5, 6, 7], -1)
        tc.add_chain(1, [1, 9], -1)
        first = tc.forward(hidden=hidden)
        tc.add(0, 8, 3)
        tc.add(0, 9, 3)  # a sibling: a small tree
        tc.add(1, 10, 1)
        second = tc.forward(hidden=hidden)
        outs.append((first, second))
    (a1, a2), (b1, b2) = outs
    assert torch.allclose(a1.logits, b1.logits) and torch.allclose(a2.logits, b2.logits)
    assert a2.hidden is None and b2.hidden.shape == (2, 2, model.config.hidden_size)
    with torch.inference_mode():
        assert torch.allclose(model.get_output_embeddings()(b2.hidden), b2.logits)


def test_distill_notes_given_answers_for_an_apar_target(tmp_path):
    from apar_spec.drafts.train_heads import distill

    model, tok = micro_model("llama", seed=2), micro_tokenizer()
    said = []
    rows = [{"prompt": "w5 w6", "answer": "w7 w8 w9"}, {"prompt": "w10 w11"}]
    seqs = distill(model, tok, rows, tmp_path, HeadsTrainConfig(max_new_tokens=4), said.append)
    assert any("1 rows carry an answer" in m for m in said)
    assert len(seqs) >= 2  # the given answer as one sequence, the distilled one as its branches
    said.clear()
    (tmp_path / "b").mkdir()
    distill(model, tok, [{"prompt": "w12"}], tmp_path / "b", HeadsTrainConfig(max_new_tokens=4), said.append)
    assert not any("carry an answer" in m for m in said)


# --- chained (hydra) heads -------------------------------------------------------------------


def random_chained(model, seed=0, num_heads=3, width=24):
    from apar_spec.drafts.heads import ChainedHeads

    torch.manual_seed(seed)
    heads = ChainedHeads(model.config.hidden_size, num_heads, width).to(model.dtype)
    with torch.no_grad():
        for layer in heads.out:
            layer.weight.normal_(0, 0.3)
    return heads


def chained_speculator(model, seed=0, **kw):
    return HeadsSpeculator(
        random_chained(model, seed, **kw),
        model.get_output_embeddings(),
        mask_ids=(CHILD,),
        embed=model.get_input_embeddings(),
    )


def reference_chained_tree(heads, lm_head, embed, hidden, pending, shape, masked=(CHILD,)):
    """Slow reference: expand every node on its own, recursively, from (state, token)."""
    out_tokens = [None] * len(shape.parents)

    def guesses(state, token, depth):
        with torch.inference_mode():
            new = heads.step(depth - 1, state[None], embed(torch.tensor([token])))[0]
            logits = lm_head(new).float()
            logits[list(masked)] = float("-inf")
        return new, logits.argsort(descending=True).tolist()

    def grow(node, state, token, depth):
        if depth > heads.num_heads:
            return
        kids = [i for i, p in enumerate(shape.parents) if p == node]
        if not kids:
            return
        new, order = guesses(state, token, depth)
        for i in kids:
            out_tokens[i] = order[shape.ranks[i]]
            grow(i, new, out_tokens[i], depth + 1)

    grow(-1, hidden, pending, 1)
    return [t for t in out_tokens if t is not None]


@pytest.mark.parametrize("shape", ["chain:3", "topk:2x2", "[[0],[1],[0,0],[1,0],[0,1],[0,0,0]]", "topk:2x4"])
def test_chained_heads_propose_what_expanding_each_node_alone_gives(shape):
    from apar_spec.decoding.draft_tree import parse_tree
    from apar_spec.decoding.speculator import BranchView

    model = micro_model("llama", seed=4)
    spec = chained_speculator(model, seed=4)
    spec.reset(1, model.config.vocab_size)
    tree = parse_tree(shape)
    torch.manual_seed(1)
    views = [
        BranchView(
            0, b, None, None, [5, 6 + b], [], tree.depth, tree, torch.randn(model.config.hidden_size).to(model.dtype)
        )
        for b in range(3)
    ]
    got = spec.propose(views)
    for i, v in enumerate(views):
        want = reference_chained_tree(
            spec.heads, model.get_output_embeddings(), model.get_input_embeddings(), v.hidden, v.tokens[-1], tree
        )
        assert got.tokens[i] == want
        assert got.parents[i] == list(tree.parents[: len(want)])
    assert len(got.tokens[0]) == min(
        tree.size, sum(1 for d in tree.depths if d <= 3)
    )  # nodes deeper than 3 heads dropped
    assert spec.head_calls == min(tree.depth, 3)  # one batched call per depth, over every branch


def test_chained_heads_save_reload_and_refuse_an_unknown_kind(tmp_path):
    from apar_spec.drafts.heads import ChainedHeads

    model, tok = micro_model("llama", seed=1), micro_tokenizer()
    heads = random_chained(model, width=20)
    save_heads(
        heads, tmp_path / "h", {"target": "micro", "hidden_size": 32, "target_fingerprint": target_fingerprint(model)}
    )
    cfg = json.loads((tmp_path / "h" / "heads.json").read_text())
    assert cfg["kind"] == "hydra" and cfg["width"] == 20 and cfg["num_heads"] == 3
    again = load_heads(tmp_path / "h", model, tok)
    assert isinstance(again, ChainedHeads) and again.width == 20
    assert torch.allclose(again.out[1].weight, heads.out[1].weight.to(torch.bfloat16).to(model.dtype))
    spec = resolve(str(tmp_path / "h"), model, tok)
    assert isinstance(spec, HeadsSpeculator) and spec.embed is model.get_input_embeddings()
    cfg["kind"] = "eagle9"
    (tmp_path / "h" / "heads.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown kind 'eagle9'"):
        load_heads(tmp_path / "h", model, tok)
    with pytest.raises(ValueError, match="need the target's input embeddings"):
        HeadsSpeculator(heads, model.get_output_embeddings())


def test_medusa_heads_run_only_the_heads_a_shallow_draft_needs():
    model = micro_model("llama", seed=2)
    heads = random_heads(model, num_heads=4)
    ran = []
    for i, block in enumerate(heads.blocks):
        block.register_forward_hook(lambda *a, i=i: ran.append(i))
    generate(
        model,
        micro_tokenizer(),
        PROMPTS[:1],
        mode="spec",
        draft=HeadsSpeculator(heads, model.get_output_embeddings()),
        num_draft_tokens=2,
        max_new_tokens=12,
    )
    assert ran and set(ran) == {0, 1}


def test_chained_head_training_reduces_the_loss_and_resumes_only_its_kind(tmp_path):
    from dataclasses import replace

    model, tok, rows = micro_training_setup()
    cfg = replace(micro_heads_config(steps=60), kind="hydra", width=16)
    rep = train_heads(model, tok, rows, tmp_path / "h", cfg, target_name="micro")
    assert rep["val_loss"] < 0.95 * rep["val_loss_start"], (rep["val_loss"], rep["val_loss_start"])
    saved = json.loads((tmp_path / "h" / "heads.json").read_text())
    assert saved["kind"] == "hydra" and saved["width"] == 16
    with pytest.raises(ValueError, match="holds hydra heads, not medusa"):
        train_heads(model, tok, rows, tmp_path / "h", micro_heads_config(steps=70), target_name="micro")
    with pytest.raises(ValueError, match="kind must be medusa or hydra"):
        HeadsTrainConfig(kind="eagle")


def test_held_out_split_keeps_whole_sequences_apart():
    from apar_spec.drafts.train_heads import split_held_out

    seq = torch.arange(25).repeat_interleave(4)  # 25 sequences of 4 positions
    val, tr = split_held_out(seq, torch.Generator().manual_seed(0))
    assert set(seq[val].tolist()) == {0, 10, 20} and not set(seq[tr].tolist()) & {0, 10, 20}
    assert len(val) + len(tr) == len(seq)
    val, tr = split_held_out(torch.zeros(30, dtype=torch.long), torch.Generator().manual_seed(0))  # one sequence
    assert len(val) == 3 and len(tr) == 27
