"""Training format and loop: packing equals separate sequences (float64), mask by hand, micro training."""

from __future__ import annotations

import json

import pytest
import torch

from apar_spec.decoding.answer_tree import AnswerTree, ForkPoint
from apar_spec.decoding.tokens import AparTokens, find_apar_tokens
from apar_spec.training.data import read_examples
from apar_spec.training.losses import summed_loss
from apar_spec.training.packing import IGNORE, collate, first_fit_rows, pack_plain, pack_tree, separate_sequences
from apar_spec.training.tokenizer import build_tokenizer, format_prompt
from apar_spec.training.train import train

TEXTS = [
    format_prompt("Name three fruits."),
    "1. Apples: red and sweet.\n2. Pears: green and soft.\n3. Plums: purple.",
    format_prompt("Why is the sky blue?"),
    "The sky looks blue because air scatters short wavelengths of sunlight more than long ones.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS * 20, vocab_size=400)


def fruit_tree() -> AnswerTree:
    """Three children; the second forks once more (a nested child)."""
    pears = AnswerTree(
        " green and soft; kinds:", [ForkPoint(len(" green and soft; kinds:"), AnswerTree(" Bosc, Anjou."))]
    )
    main = "1. Apples:\n2. Pears:\n3. Plums:"
    cuts = [main.index(":") + 1, main.index(":", main.index("2.")) + 1, len(main)]
    children = [AnswerTree(" red and sweet."), pears, AnswerTree(" purple.")]
    return AnswerTree(main, [ForkPoint(c, ch) for c, ch in zip(cuts, children)])


def tiny_llama(vocab_size: int, dtype=torch.float64, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


class CharTokenizer:
    """One token per character (ord), EOS = 1: makes the hand-written layout readable."""

    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, list):
            return {"input_ids": [[ord(c) for c in t] for t in text]}
        return {"input_ids": [ord(c) for c in text]}


def test_hand_layout_mask_positions_labels():
    apar = AparTokens(fork_id=2, child_id=3)
    tree = AnswerTree("ab", [ForkPoint(1, AnswerTree("c"))])
    p = pack_tree([10, 11], tree, CharTokenizer(), apar)
    # nodes: 0:10 1:11 | 2:'a' 3:[Fork] 4:'b' 5:EOS | 6:[Child] 7:'c' 8:EOS
    assert p.input_ids.tolist() == [10, 11, 97, 2, 98, 1, 3, 99, 1]
    assert p.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 6]
    a, f, b, c = 97, 2, 98, 99
    assert p.labels.tolist() == [IGNORE, a, f, b, 1, IGNORE, c, 1, IGNORE]
    parents = [-1, 0, 1, 2, 3, 4, 3, 6, 7]
    for i in range(9):
        ancestors = {i}
        j = parents[i]
        while j >= 0:
            ancestors.add(j)
            j = parents[j]
        assert {j for j in range(9) if p.attention[i, j]} == ancestors, i
    assert p.num_trained() == 6  # a [Fork] b EOS c EOS; never the prompt nor [Child]


def test_open_end_drops_only_the_main_branch_eos():
    """A cut answer (``open_end``) trains no EOS at its end; its children, complete blocks, keep theirs."""
    apar = AparTokens(fork_id=2, child_id=3)
    tree = AnswerTree("ab", [ForkPoint(1, AnswerTree("c"))])
    p = pack_tree([10, 11], tree, CharTokenizer(), apar, open_end=True)
    # nodes: 0:10 1:11 | 2:'a' 3:[Fork] 4:'b' | 5:[Child] 6:'c' 7:EOS
    assert p.input_ids.tolist() == [10, 11, 97, 2, 98, 3, 99, 1]
    assert p.labels.tolist() == [IGNORE, 97, 2, 98, IGNORE, 99, 1, IGNORE]
    main, child = separate_sequences([10, 11], tree, CharTokenizer(), apar, open_end=True)
    assert main.input_ids.tolist() == [10, 11, 97, 2, 98] and child.input_ids.tolist()[-1] == 1
    assert p.num_trained() == main.num_trained() + child.num_trained()
    plain = pack_tree([10, 11], AnswerTree("ab"), CharTokenizer(), apar, open_end=True)
    assert plain.labels.tolist() == [IGNORE, 97, 98, IGNORE]  # a plain cut answer: no EOS anywhere


def test_read_examples_carries_open_end(tmp_path):
    rows = [{"prompt": "p", "answer": "a b", "open_end": True}, {"prompt": "q", "answer": "c"}]
    assert [e.open_end for e in read_examples(rows)] == [True, False]
    assert [e.open_end for e in read_examples(rows, mode="plain")] == [True, False]
    with pytest.raises(ValueError, match="example 0: 'open_end' must be true or false"):
        read_examples([{"prompt": "p", "answer": "a", "open_end": "yes"}])


def test_first_fit_rows():
    assert first_fit_rows([5, 3, 2, 4], 5) == [[0], [3], [1, 2]]
    assert first_fit_rows([1, 1, 1], 8) == [[0, 1, 2]]


def test_hand_separate_sequences():
    apar = AparTokens(fork_id=2, child_id=3)
    tree = AnswerTree("ab", [ForkPoint(1, AnswerTree("c"))])
    main, child = separate_sequences([10, 11], tree, CharTokenizer(), apar)
    assert main.input_ids.tolist() == [10, 11, 97, 2, 98, 1]
    assert main.labels.tolist() == [IGNORE, 97, 2, 98, 1, IGNORE]
    assert child.input_ids.tolist() == [10, 11, 97, 2, 3, 99, 1]
    assert child.labels.tolist() == [IGNORE] * 4 + [99, 1, IGNORE]
    assert child.position_ids.tolist() == list(range(7))


def test_packed_loss_equals_separate_sequences_float64(tokenizer):
    apar = find_apar_tokens(tokenizer)
    tree = fruit_tree()
    assert tree.num_branches() == 5 and tree.depth() == 2
    prompt_ids = tokenizer(format_prompt("Name three fruits."), add_special_tokens=False)["input_ids"]
    model = tiny_llama(len(tokenizer))
    packed = pack_tree(prompt_ids, tree, tokenizer, apar)
    seqs = separate_sequences(prompt_ids, tree, tokenizer, apar)
    assert len(seqs) == 5
    assert packed.num_trained() == sum(s.num_trained() for s in seqs)
    with torch.no_grad():
        packed_loss, n = summed_loss(model, collate([packed], tokenizer.pad_token_id))
        separate = [summed_loss(model, collate([s], tokenizer.pad_token_id)) for s in seqs]
        # batched with padding and a plain example beside it: padding must not change anything
        plain = pack_plain(prompt_ids, "Just words.", tokenizer)
        both, _ = summed_loss(model, collate([plain, packed], tokenizer.pad_token_id))
        plain_alone, _ = summed_loss(model, collate([plain], tokenizer.pad_token_id))
        # two short examples sharing one row (block-diagonal mask, restarted positions) change nothing either
        shared_batch = collate([packed, plain, plain], tokenizer.pad_token_id, share_rows=True)
        shared, _ = summed_loss(model, shared_batch)
    assert shared_batch.input_ids.shape[0] == 2  # the two plain examples fit beside each other
    assert abs(shared.item() - packed_loss.item() - 2 * plain_alone.item()) < 1e-8
    assert n == sum(k for _, k in separate)
    assert abs(packed_loss.item() - sum(loss.item() for loss, _ in separate)) < 1e-8
    assert abs(both.item() - plain_alone.item() - packed_loss.item()) < 1e-8


def test_eager_attention_gets_an_additive_mask(tokenizer):
    apar = find_apar_tokens(tokenizer)
    prompt_ids = tokenizer(format_prompt("Name three fruits."), add_special_tokens=False)["input_ids"]
    batch = collate([pack_tree(prompt_ids, fruit_tree(), tokenizer, apar)], tokenizer.pad_token_id)
    with torch.no_grad():
        sdpa, _ = summed_loss(tiny_llama(len(tokenizer)), batch)
        eager, _ = summed_loss(tiny_llama(len(tokenizer), attn="eager"), batch)
    assert abs(sdpa.item() - eager.item()) < 1e-4  # eager's softmax runs in float32


def test_segments_are_token_boundaries_and_plain_is_causal(tokenizer):
    apar = find_apar_tokens(tokenizer)
    tree = fruit_tree()
    packed = pack_tree([5, 6], tree, tokenizer, apar)
    text = tokenizer.decode(packed.input_ids[2:].tolist(), skip_special_tokens=False)
    assert text.startswith("1. Apples:[Fork]\n2. Pears:[Fork]\n3. Plums:[Fork]<eos>[Child] red and sweet.<eos>")
    plain = pack_plain([5, 6], tree.reassemble(), tokenizer)
    L = len(plain)
    assert torch.equal(plain.attention, torch.tril(torch.ones(L, L, dtype=torch.bool)))
    assert plain.position_ids.tolist() == list(range(L))
    assert plain.labels[:-1].tolist()[1:] == plain.input_ids[2:].tolist()
    assert plain.labels[-1] == IGNORE and plain.labels[0] == IGNORE


def test_chat_template_is_format_prompt(tokenizer):
    got = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three fruits."}], add_generation_prompt=True, tokenize=False
    )
    assert got == format_prompt("Name three fruits.") == "Question: Name three fruits.\nAnswer:"
    assert tokenizer.eos_token == "<eos>" and tokenizer.pad_token == "<pad>"
    ids = tokenizer("x[Fork]y[Child]", add_special_tokens=False)["input_ids"]
    apar = find_apar_tokens(tokenizer)
    assert apar.fork_id in ids and apar.child_id in ids


def test_data_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_examples(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        read_examples(bad, mode="plain")
    bad.write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: .*'answer'"):
        read_examples(bad)


def micro_rows(n: int = 8) -> list[dict]:
    rows = []
    for i in range(n):
        if i % 2 == 0:
            tree = fruit_tree()
            rows.append(
                {
                    "prompt": "Name three fruits.",
                    "answer": tree.reassemble(),
                    "structured": True,
                    "tree": tree.to_dict(),
                }
            )
        else:
            rows.append(
                {
                    "prompt": "Why is the sky blue?",
                    "answer": TEXTS[3],
                    "structured": False,
                    "tree": AnswerTree(TEXTS[3]).to_dict(),
                }
            )
    return rows


def test_micro_training_loss_goes_down_and_reloads(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in micro_rows()))
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    report = train(
        cfg,
        data,
        tmp_path / "out",
        tokenizer=tokenizer,
        steps=40,
        batch_size=4,
        lr=1e-2,
        seed=0,
        max_len=256,
        save_dtype=torch.bfloat16,
        keep_checkpoint=False,
    )
    assert report.steps == 40 and report.num_structured == 4 and report.num_examples == 8
    assert sum(report.losses[-3:]) < 0.5 * sum(report.losses[:3])
    assert not (tmp_path / "out" / "checkpoint").exists()

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert find_apar_tokens(tok) == find_apar_tokens(tokenizer)
    deepest = max(AnswerTree.from_dict(r["tree"]).depth() for r in micro_rows())
    assert report.fork_depth == deepest >= 1 and model.config.apar_max_depth == deepest  # decoding caps nesting there
    assert tok.apply_chat_template(
        [{"role": "user", "content": "q"}], add_generation_prompt=True, tokenize=False
    ) == format_prompt("q")
    ex = read_examples(data)[0]
    from apar_spec.training.data import pack_example

    with torch.no_grad():
        loss, n = summed_loss(model.eval(), collate([pack_example(ex, tok, find_apar_tokens(tok))], tok.pad_token_id))
    assert loss.item() / n < report.losses[0] / 2


def test_resume_continues_exactly(tmp_path, tokenizer):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    kw = dict(tokenizer=tokenizer, steps=6, batch_size=2, lr=3e-3, seed=1, max_len=256)
    full = train(cfg, micro_rows(6), tmp_path / "full", **kw)
    part = train(cfg, micro_rows(6), tmp_path / "part", stop_after=4, **kw)
    assert part.steps == 4 and not (tmp_path / "part" / "model.safetensors").exists()
    rest = train(cfg, micro_rows(6), tmp_path / "part", resume=True, **kw)
    assert rest.start_step == 4 and len(rest.losses) == 2
    assert rest.losses == pytest.approx(full.losses[4:], rel=1e-5)
    assert (tmp_path / "part" / "model.safetensors").exists()


def test_canonical_list_order_sorts_items_and_keeps_the_rest():
    from apar_spec.experiments.build.train_embedded import canonical_list_order

    from apar_spec.training.corpus import TOPICS, Example

    titles = next(t for t in TOPICS if t.key == "sleep").titles
    answer = f"Here are 3 tips:\n1. {titles[5]}: five.\n2. {titles[0]}: zero.\n3. {titles[2]}: two.\n\nBe patient."
    got = canonical_list_order(Example("Give 3 tips for better sleep.", answer, "list", "sleep")).answer
    assert got == f"Here are 3 tips:\n1. {titles[0]}: zero.\n2. {titles[2]}: two.\n3. {titles[5]}: five.\n\nBe patient."
    other = Example("What is 2 plus 2?", "2 plus 2 is 4.", "noforks", "arithmetic")
    assert canonical_list_order(other) == other


def test_training_reports_progress_through_the_callback_and_prints_nothing(tmp_path, tokenizer, capsys):
    """``on_progress`` hears a start event, then one event per step (steps monotonic, counting
    those before a resume), with the resume note and the ``log_every`` lines as messages."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    kw = dict(tokenizer=tokenizer, steps=5, batch_size=2, lr=3e-3, seed=1, max_len=256, log_every=2)
    events = []
    part = train(cfg, micro_rows(4), tmp_path / "run", stop_after=3, on_progress=events.append, **kw)
    assert [e.step for e in events] == [0, 1, 2, 3] and {e.total for e in events} == {5}
    assert events[0].loss is None and events[0].message is None  # the start event of a fresh run
    assert [e.loss for e in events[1:]] == part.losses
    assert [e.message is not None for e in events] == [False, False, True, False]
    assert events[2].message.startswith("step 2/5 loss ")
    times = [e.elapsed_s for e in events]
    assert times == sorted(times)

    events.clear()
    rest = train(cfg, micro_rows(4), tmp_path / "run", resume=True, on_progress=events.append, **kw)
    assert [e.step for e in events] == [3, 4, 5] and rest.start_step == 3
    assert events[0].loss is None and events[0].message == f"resuming from {tmp_path / 'run' / 'checkpoint'} at step 3"
    assert events[1].message is not None and events[1].message.startswith("step 4/5 loss ")
    out, err = capsys.readouterr()  # (stderr may hold transformers' own save bars, which the CLI turns off)
    assert out == "" and "resuming" not in err and "loss" not in err  # the library never prints: the caller renders


def test_the_library_never_imports_rich():
    """The library never prints, so it has no use for rich: no file under ``apar_spec/`` imports it,
    not even inside a function (the CLI renders progress; see cli/progress.py)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = []
    for path in sorted((root / "apar_spec").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            if any(n == "rich" or n.startswith("rich.") for n in names):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert found == []


def test_resume_with_other_trainable_parameters_is_a_one_line_error(tmp_path, tokenizer):
    """A checkpoint whose optimizer covered other parameters is refused in one line, not torch's traceback."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    kw = dict(tokenizer=tokenizer, steps=4, batch_size=2, lr=3e-3, seed=1, max_len=256)
    train(cfg, micro_rows(4), tmp_path / "part", stop_after=2, **kw)
    model = LlamaForCausalLM(cfg)
    for p in model.model.layers[0].mlp.parameters():
        p.requires_grad_(False)  # fewer trainable parameters than the checkpoint's optimizer holds
    with pytest.raises(ValueError, match="another set of trainable parameters") as err:
        train(model, micro_rows(4), tmp_path / "part", resume=True, **kw)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- distillation
