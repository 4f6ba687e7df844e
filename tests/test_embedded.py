"""The embedded trio ships in the package and loads offline; apar_spec.load's errors are clear."""

from __future__ import annotations

import pytest
import torch
from apar_spec.drafts.registry import get, resolve, vocab_fingerprint
from micro import micro_model, micro_tokenizer

import apar_spec
from apar_spec.models.loading import EMBEDDED, embedded_dir


def non_embedding_params(model) -> int:
    emb = {id(p) for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


@pytest.fixture(scope="module")
def trio():
    return {name: apar_spec.load(name) for name in EMBEDDED}


def test_trio_loads_offline_shares_one_vocabulary_and_fits_the_size_budget(trio):
    fingerprints = {vocab_fingerprint(tok) for _, tok in trio.values()}
    assert len(fingerprints) == 1
    entry = get("tiny-draft")  # the registry's built-in entry names the embedded vocabulary
    assert fingerprints == {(entry.vocab_size, entry.fingerprint)}
    for model, tok in trio.values():
        assert model.dtype == torch.float32 and apar_spec.find_apar_tokens(tok) is not None
    assert non_embedding_params(trio["tiny-draft"][0]) * 8 <= non_embedding_params(trio["tiny-apar"][0])
    size = sum(f.stat().st_size for name in EMBEDDED for f in embedded_dir(name).iterdir())
    assert size <= 30 * 1024 * 1024


def test_apar_tokens_know_the_line_break_tokens(trio):
    """The ids a capped child is cut back to: exactly the tokens whose text holds a newline."""
    _, tok = trio["tiny-apar"]
    apar = apar_spec.find_apar_tokens(tok)
    newline = tok("a\nb", add_special_tokens=False)["input_ids"]
    assert apar.line_break_ids & set(newline)
    assert all("\n" in tok.decode([i]) for i in apar.line_break_ids)
    assert not any(
        "\n" in tok.decode([i]) for i in tok("Give three tips: sleep well.", add_special_tokens=False)["input_ids"]
    )
    assert apar_spec.find_apar_tokens(tok).line_break_ids is apar.line_break_ids  # memoised per tokenizer


def test_tiny_apar_forks_on_a_list_prompt_and_not_on_arithmetic(trio):
    model, tok = trio["tiny-apar"]

    def ask(p):
        text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        return apar_spec.generate(model, tok, [text], mode="apar", max_new_tokens=300)[0]

    listy = ask("Give 4 tips for better sleep.")
    assert listy.stats.num_branches >= 4 and "1." in listy.text
    assert listy.stats.target_steps < listy.stats.tokens_generated
    assert not ask("What is 17 plus 25?").forked


def test_load_errors_are_one_line_and_helpful(tmp_path):
    with pytest.raises(ValueError, match="Did you mean 'tiny-apar'"):
        apar_spec.load("tiny-apr")
    with pytest.raises(ValueError, match="not an embedded name"):
        apar_spec.load("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        apar_spec.load(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown dtype"):
        apar_spec.load("tiny-draft", dtype="float8")


def test_load_a_local_folder(tmp_path):
    micro_model("qwen2").save_pretrained(tmp_path / "m")
    micro_tokenizer().save_pretrained(tmp_path / "m")
    model, tok = apar_spec.load(tmp_path / "m", dtype="float64")
    assert model.config.model_type == "qwen2" and model.dtype == torch.float64 and not model.training
    assert apar_spec.find_apar_tokens(tok) is not None


def test_registry_refuses_the_embedded_draft_for_another_vocabulary_before_loading_it():
    with pytest.raises(
        ValueError, match=r"draft 'tiny-draft' does not fit.*draft has 2048 tokens \(fingerprint 3b10c36d7acb\)"
    ):
        resolve("tiny-draft", micro_model("llama"), micro_tokenizer())


def test_registry_drafts_are_loaded_once_per_target(trio):
    from apar_spec.drafts import registry

    model, tok = trio["tiny-apar"]
    registry.clear_cache()
    a = resolve("tiny-draft", model, tok)
    b = resolve("tiny-draft", model, tok)
    assert a is not b and a.model is b.model  # fresh speculator state, the same weights
    other, _ = trio["tiny-base"]
    assert resolve("tiny-draft", other, tok).model is not a.model  # keyed by target identity


def test_shipped_heads_fit_both_embedded_targets_and_are_lossless(trio):
    from apar_spec.drafts.heads import HeadsSpeculator
    from apar_spec.drafts.train_heads import encode

    specs = {name: resolve("tiny-heads", trio[name][0], trio[name][1]) for name in ("tiny-apar", "tiny-base")}
    assert all(isinstance(s, HeadsSpeculator) for s in specs.values())
    assert not torch.equal(specs["tiny-apar"].heads.blocks[0].weight, specs["tiny-base"].heads.blocks[0].weight)
    model, tok = trio["tiny-apar"]
    with pytest.raises(ValueError, match="no draft heads .* trained for this target"):
        resolve("tiny-heads", trio["tiny-draft"][0], tok)
    prompt = [encode(tok, "Give me 4 tips for better sleep.")]
    plain = apar_spec.generate(model, tok, prompt, mode="apar", max_new_tokens=200)[0]
    spec = apar_spec.generate(
        model, tok, prompt, mode="apar+spec", draft="tiny-heads", tree="[[0],[1],[0,0],[0,0,0]]", max_new_tokens=200
    )[0]
    assert spec.token_ids == plain.token_ids and spec.forked
    assert spec.stats.mean_acceptance_length > 2.0 and spec.stats.draft_forwards == 0
