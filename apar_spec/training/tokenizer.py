"""How the models see text: the prompt format, the chat template, the embedded models' tokenizer.

Why a file of its own: the prompt a model is trained on must be the prompt it is asked
with at inference, so the format (:data:`PROMPT_FORMAT`), the chat template that renders
exactly that string, and :func:`prompt_token_ids` (the one place a training prompt is
tokenised) live together. The embedded models' byte-level BPE tokenizer is built here
too, with ``<pad>``, ``<eos>``, ``[Fork]`` and ``[Child]`` as special tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from apar_spec.decoding.tokens import CHILD_TOKEN, FORK_TOKEN

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"

# The prompt format the embedded models are trained with. The chat template below
# renders exactly this string, so `apply_chat_template` and `format_prompt` agree.
PROMPT_FORMAT = "Question: {prompt}\nAnswer:"
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ 'Question: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'Answer:' + message['content'] + eos_token + '\\n' }}"
    "{%- else -%}"
    "{{ message['content'] + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Answer:' }}{%- endif -%}"
)


def format_prompt(prompt: str) -> str:
    """The prompt string the embedded models were trained on: ``Question: p\\nAnswer:``."""
    return PROMPT_FORMAT.format(prompt=prompt)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer on ``texts``; returns a ``PreTrainedTokenizerFast``.

    Byte-level so any text round-trips; no prefix space, so a child's leading ``" details"``
    tokenises the same whether or not it follows its parent's text. ``<pad>``, ``<eos>``,
    ``[Fork]`` and ``[Child]`` are special (never split, hidden by
    ``skip_special_tokens``). Nothing is added automatically: EOS is appended by the packer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN, FORK_TOKEN, CHILD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[FORK_TOKEN, CHILD_TOKEN],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def prompt_token_ids(prompt: str, tokenizer) -> list[int]:
    """The prompt as the model sees it at inference: its chat template when it has one.

    The embedded models' template renders exactly :func:`format_prompt`; a real instruct
    model (SmolLM2) is trained in its own chat format, as ``apar-spec bench`` prompts it.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = format_prompt(prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
