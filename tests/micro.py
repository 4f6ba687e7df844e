"""Micro models and a word-level tokenizer for fast CPU tests (random weights, float64)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 64
EOS = 2
WORDS = ["<pad>", "<bos>", "<eos>", "[Fork]", "[Child]"] + [f"w{i}" for i in range(VOCAB - 5)]
FORK, CHILD = 3, 4


LINE_BREAK_IDS = frozenset(range(5, VOCAB, 3))  # micro_tokenizer(line_breaks=True): these words end a line


def micro_tokenizer(line_breaks: bool = False) -> PreTrainedTokenizerFast:
    """``line_breaks``: the words at ``LINE_BREAK_IDS`` decode with a trailing newline."""
    words = [w + "\n" if line_breaks and i in LINE_BREAK_IDS else w for i, w in enumerate(WORDS)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    t.add_special_tokens({"additional_special_tokens": ["[Fork]", "[Child]"]})
    return t


def micro_model(family: str = "llama", seed: int = 0, dtype=torch.float64, layers: int = 2, hidden: int = 32):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=EOS,
        pad_token_id=0,
        bos_token_id=1,
    )
    cfg = {
        "llama": lambda: LlamaConfig(**common),
        "qwen2": lambda: Qwen2Config(**common),
        "mistral": lambda: MistralConfig(sliding_window=None, **common),
    }[family]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    # Random weights spread probability thinly; sharpen the head so greedy paths are not near-ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return model


def fork_processor(fork_every: int = 7, end_child_after: int = 6, salt: int = 0):
    """Force [Fork] and EOS deterministically from the branch's own context only.

    A branch forks when a hash of its last two tokens hits ``fork_every`` (or
    ``2 * fork_every`` tokens passed without a control token, so loops fork too); a
    child ends (EOS) once it has written ``end_child_after`` + (hash % 4) tokens,
    so children finish at different steps (early-finishing branches). The root
    never ends by EOS (it runs to its per-branch cap), so every tree branches.
    """

    def proc(ctx: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        last = ctx[-1]
        controls = [i for i, t in enumerate(ctx) if t in (FORK, CHILD)]
        since_control = len(ctx) - 1 - (controls[-1] if controls else 0)
        hit = (ctx[-1] * 31 + ctx[-2] * 17 + salt) % fork_every == 0
        if last not in (FORK, CHILD) and (hit or since_control >= 2 * fork_every):
            logits[FORK] = logits.max() + 10.0
        if CHILD not in ctx:  # the root ends at its cap, so trees have room to branch
            logits[EOS] = float("-inf")
        else:
            since = len(ctx) - 1 - max(i for i, t in enumerate(ctx) if t == CHILD)
            if since >= end_child_after + (ctx[-1] + salt) % 4:
                logits[EOS] = logits.max() + 20.0
        return logits

    return proc
