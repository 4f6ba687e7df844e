"""apar-spec: APAR decoding + speculative decoding on Hugging Face causal LMs.

    model, tokenizer = apar_spec.load("tiny-apar")
    out = apar_spec.generate(model, tokenizer, ["Give 4 tips for better sleep."], mode="apar")
"""

from apar_spec.api import Generation, GenerationStats, generate
from apar_spec.loading import load
from apar_spec.options import MODES, DecodeOptions
from apar_spec.tokens import CHILD_TOKEN, FORK_TOKEN, AparTokens, add_apar_tokens, find_apar_tokens

__all__ = [
    "generate",
    "load",
    "Generation",
    "GenerationStats",
    "DecodeOptions",
    "MODES",
    "FORK_TOKEN",
    "CHILD_TOKEN",
    "AparTokens",
    "add_apar_tokens",
    "find_apar_tokens",
]
