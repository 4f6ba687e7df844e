"""apar-spec: APAR decoding + speculative decoding on Hugging Face causal LMs.

    model, tokenizer = apar_spec.load("tiny-apar")
    out = apar_spec.generate(model, tokenizer, ["Give 4 tips for better sleep."], mode="apar")

This file is the package's declared *facade* (ARCHITECTURE.md): the one place where the
core and its plugins meet. Importing ``apar_spec.drafts`` registers the draft registry
as the core's draft catalog, so ``generate(draft="ngram")`` resolves names while no core
module imports ``drafts/``.
"""

import apar_spec.drafts  # noqa: E402,F401 - registers the draft catalog (see above)
from apar_spec.api import Generation, GenerationStats, generate
from apar_spec.decoding.tokens import CHILD_TOKEN, FORK_TOKEN, AparTokens, add_apar_tokens, find_apar_tokens
from apar_spec.models.loading import load
from apar_spec.options import MODES, DecodeOptions

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
