"""generate() takes prompts in every form a tokenizer hands them out, and refuses the rest clearly.

Each accepted form must give exactly the tokens of the plain id-list call on the same
prompt (the reference); each refused form must be a one-line ValueError naming what was
wrong. The embedded tiny models are used in float32 (only ids are compared with ids from
the same model, so near-ties cannot differ between the two calls).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from apar_spec.cli.app import app
from typer.testing import CliRunner

import apar_spec
from apar_spec.api import encode_prompts

QUESTIONS = ["Give 3 tips for sleep.", "Name two colours."]
MAX_NEW = 6


@pytest.fixture(scope="module")
def tiny():
    return apar_spec.load("tiny-base", device="cpu")


@pytest.fixture(scope="module")
def reference(tiny):
    """Plain id lists of the chat-templated questions, and their greedy outputs."""
    model, tok = tiny
    ids = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False)
        for q in QUESTIONS
    ]
    assert all(isinstance(x, list) and isinstance(x[0], int) for x in ids)
    assert len(ids[0]) != len(ids[1])  # so padding really happens below
    outs = [apar_spec.generate(model, tok, [x], mode="ar", max_new_tokens=MAX_NEW)[0].token_ids for x in ids]
    return ids, outs


def chat(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def test_apply_chat_template_returns_a_batch_encoding_in_this_transformers(tiny):
    """The form item 5 is about: tokenize=True gives a dict-like BatchEncoding, not a list."""
    _, tok = tiny
    enc = tok.apply_chat_template(chat(QUESTIONS[0]), add_generation_prompt=True, tokenize=True)
    assert "input_ids" in enc and not isinstance(enc, list)


def forms(tok, ids):
    """Every accepted form of both prompts -> the prompt rows it must give."""
    both = [chat(q) for q in QUESTIONS]
    single = [tok.apply_chat_template(chat(q), add_generation_prompt=True, tokenize=True) for q in QUESTIONS]
    yield "list of single BatchEncodings", single, ids
    yield "batched BatchEncoding", tok.apply_chat_template(both, add_generation_prompt=True, tokenize=True), ids
    yield "one single BatchEncoding", single[0], ids[:1]
    for side in ("left", "right"):
        tok.padding_side = side
        try:
            padded = tok.apply_chat_template(
                both, add_generation_prompt=True, tokenize=True, padding=True, return_tensors="pt"
            )
        finally:
            tok.padding_side = "right"
        assert padded["attention_mask"].min() == 0  # really padded
        yield f"{side}-padded tensors", padded, ids
    yield "2D tensor without mask", torch.tensor([ids[0], ids[0]]), [ids[0], ids[0]]
    yield "1D tensor", torch.tensor(ids[1]), ids[1:]
    yield "list of 1D tensors", [torch.tensor(x) for x in ids], ids
    yield "numpy rows", [np.array(x, dtype=np.int64) for x in ids], ids
    yield "plain dict", {"input_ids": ids[1]}, ids[1:]
    yield "flat id list (return_dict=False)", ids[0], ids[:1]
    yield "mixed list", [QUESTIONS[0], single[1]], [tok(QUESTIONS[0])["input_ids"], ids[1]]
    text_batch = tok(QUESTIONS, padding=True, return_tensors="pt")
    yield "tokenizer(...) batch", text_batch, [tok(q)["input_ids"] for q in QUESTIONS]
    yield (
        "list holding a batch (rows flattened)",
        [single[0], text_batch],
        [ids[0]] + [tok(q)["input_ids"] for q in QUESTIONS],
    )


def test_every_tokenizer_output_form_gives_the_plain_prompt_ids(tiny, reference):
    model, tok = tiny
    ids, _ = reference
    vocab = model.get_input_embeddings().num_embeddings
    for name, given, expected in forms(tok, ids):
        assert encode_prompts(tok, given, vocab_size=vocab) == expected, name


def test_generate_on_a_padded_batch_encoding_equals_the_plain_calls(tiny, reference):
    model, tok = tiny
    ids, outs = reference
    tok.padding_side = "left"
    try:
        enc = tok.apply_chat_template(
            [chat(q) for q in QUESTIONS], add_generation_prompt=True, tokenize=True, padding=True, return_tensors="pt"
        )
    finally:
        tok.padding_side = "right"
    gens = apar_spec.generate(model, tok, enc, mode="ar", max_new_tokens=MAX_NEW)
    assert [g.prompt_ids for g in gens] == ids
    assert [g.token_ids for g in gens] == outs
    single = tok.apply_chat_template(chat(QUESTIONS[1]), add_generation_prompt=True, tokenize=True)
    assert apar_spec.generate(model, tok, [single], mode="ar", max_new_tokens=MAX_NEW)[0].token_ids == outs[1]


@pytest.mark.parametrize(
    "prompts,fragments",
    [
        ([[5, 2048, 7]], ["prompt 0", "token id 2048", "vocabulary of 2048"]),
        ([[5, 6], [5, -1]], ["prompt 1", "token id -1", "vocabulary of 2048"]),
        (torch.tensor([[1, 2], [3, 99999]]), ["prompt 1", "99999", "2048"]),
        ([None], ["prompt 0 is None"]),
        (["ok", None], ["prompt 1 is None"]),
        ([[[1, 2], [3]]], ["prompt 0 is a nested list"]),
        ([[1, 2.5]], ["prompt 0", "token 1 is a float"]),
        ([[1.0, 2.0]], ["token 0 is a float"]),
        ([[True, 2]], ["token 0 is a bool"]),
        ([True], ["prompt 0 is a bool"]),
        ([3.5], ["prompt 0 is a float"]),
        ([1, [2, 3]], ["prompt 0 is an int"]),
        ([["input_ids", "attention_mask"]], ["key 'input_ids'", "BatchEncoding itself"]),
        ([torch.tensor([1.0, 2.0])], ["prompt 0", "float32", "integers"]),
        ([torch.tensor([True])], ["bool", "integers"]),
        (torch.ones(1, 2, 3, dtype=torch.long), ["3D tensor"]),
        ([{"attention_mask": [1]}], ["prompt 0", "without 'input_ids'"]),
        ({"input_ids": [[1, 2], [3, 4]], "attention_mask": [[1, 1]]}, ["1 rows for 2 rows"]),
        ({"input_ids": [1, 2, 3], "attention_mask": [1, 0, 1]}, ["prompt 0", "holes"]),
        ({"input_ids": [1, 2, 3], "attention_mask": [1, 1]}, ["2 entries for 3 token ids"]),
        ({"input_ids": [1, 2], "attention_mask": [0, 0]}, ["prompt 0 is empty"]),
        ([[]], ["prompt 0 is empty"]),
        ([], ["prompts is empty"]),
        ("just a string", ["wrap a single string in a list"]),
        (None, ["prompts is None"]),
        (42, ["prompts is an int"]),
        ([b"bytes"], ["prompt 0 is a bytes"]),
        (["  \n"], ["prompt 0 is empty"]),
    ],
)
def test_bad_prompts_are_one_line_value_errors(tiny, prompts, fragments):
    model, tok = tiny
    with pytest.raises(ValueError) as info:
        apar_spec.generate(model, tok, prompts, mode="ar", max_new_tokens=2)
    message = str(info.value)
    assert "\n" not in message
    for f in fragments:
        assert f in message, (f, message)


def test_vocab_check_uses_the_embedding_not_the_tokenizer(tiny):
    """An id the embedding holds is valid even when the tokenizer is smaller (padded vocabularies)."""
    model, _ = tiny
    top = model.get_input_embeddings().num_embeddings - 1
    assert apar_spec.generate(model, None, [[5, top]], mode="ar", max_new_tokens=2)[0].prompt_ids == [5, top]


runner = CliRunner()


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_cli_generate_refuses_an_empty_prompt(prompt):
    result = runner.invoke(app, ["generate", prompt, "--model", "tiny-base", "--mode", "ar"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "prompt is empty" in lines[0]
    assert "Traceback" not in result.output and result.stdout == ""


def test_cli_generate_still_answers_a_real_prompt():
    result = runner.invoke(
        app,
        [
            "generate",
            "Name two colours.",
            "--model",
            "tiny-base",
            "--mode",
            "ar",
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert '"token_ids"' in result.stdout
