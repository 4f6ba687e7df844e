"""Training format and loop: packing equals separate sequences (float64), mask by hand, micro training."""

from __future__ import annotations

import json

import pytest
import torch

from apar_spec.answer_tree import AnswerTree, ForkPoint
from apar_spec.tokens import AparTokens, find_apar_tokens
from apar_spec.train import (
    IGNORE,
    build_tokenizer,
    collate,
    first_fit_rows,
    format_prompt,
    pack_plain,
    pack_tree,
    read_examples,
    separate_sequences,
    summed_loss,
    train,
)

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
    pears = AnswerTree(" green and soft; kinds:", [ForkPoint(len(" green and soft; kinds:"), AnswerTree(" Bosc, Anjou."))])
    main = "1. Apples:\n2. Pears:\n3. Plums:"
    cuts = [main.index(":") + 1, main.index(":", main.index("2.")) + 1, len(main)]
    children = [AnswerTree(" red and sweet."), pears, AnswerTree(" purple.")]
    return AnswerTree(main, [ForkPoint(c, ch) for c, ch in zip(cuts, children)])


def tiny_llama(vocab_size: int, dtype=torch.float64, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation=attn,
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
    assert abs(packed_loss.item() - sum(l.item() for l, _ in separate)) < 1e-8
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
            rows.append({"prompt": "Name three fruits.", "answer": tree.reassemble(), "structured": True, "tree": tree.to_dict()})
        else:
            rows.append({"prompt": "Why is the sky blue?", "answer": TEXTS[3], "structured": False,
                         "tree": AnswerTree(TEXTS[3]).to_dict()})
    return rows


def test_micro_training_loss_goes_down_and_reloads(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in micro_rows()))
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    report = train(cfg, data, tmp_path / "out", tokenizer=tokenizer, steps=40, batch_size=4, lr=1e-2, seed=0,
                   max_len=256, progress=False, save_dtype=torch.bfloat16, keep_checkpoint=False)
    assert report.steps == 40 and report.num_structured == 4 and report.num_examples == 8
    assert sum(report.losses[-3:]) < 0.5 * sum(report.losses[:3])
    assert not (tmp_path / "out" / "checkpoint").exists()

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert find_apar_tokens(tok) == find_apar_tokens(tokenizer)
    deepest = max(AnswerTree.from_dict(r["tree"]).depth() for r in micro_rows())
    assert report.fork_depth == deepest >= 1 and model.config.apar_max_depth == deepest  # decoding caps nesting there
    assert tok.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True, tokenize=False) == format_prompt("q")
    ex = read_examples(data)[0]
    from apar_spec.train import pack_example

    with torch.no_grad():
        loss, n = summed_loss(model.eval(), collate([pack_example(ex, tok, find_apar_tokens(tok))], tok.pad_token_id))
    assert loss.item() / n < report.losses[0] / 2


def test_resume_continues_exactly(tmp_path, tokenizer):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
    kw = dict(tokenizer=tokenizer, steps=6, batch_size=2, lr=3e-3, seed=1, max_len=256, progress=False)
    full = train(cfg, micro_rows(6), tmp_path / "full", **kw)
    part = train(cfg, micro_rows(6), tmp_path / "part", stop_after=4, **kw)
    assert part.steps == 4 and not (tmp_path / "part" / "model.safetensors").exists()
    rest = train(cfg, micro_rows(6), tmp_path / "part", resume=True, **kw)
    assert rest.start_step == 4 and len(rest.losses) == 2
    assert rest.losses == pytest.approx(full.losses[4:], rel=1e-5)
    assert (tmp_path / "part" / "model.safetensors").exists()


def test_canonical_list_order_sorts_items_and_keeps_the_rest():
    from apar_spec.corpus import TOPICS, Example
    from apar_spec.experiments.train_embedded import canonical_list_order

    titles = next(t for t in TOPICS if t.key == "sleep").titles
    answer = f"Here are 3 tips:\n1. {titles[5]}: five.\n2. {titles[0]}: zero.\n3. {titles[2]}: two.\n\nBe patient."
    got = canonical_list_order(Example("Give 3 tips for better sleep.", answer, "list", "sleep")).answer
    assert got == f"Here are 3 tips:\n1. {titles[0]}: zero.\n2. {titles[2]}: two.\n3. {titles[5]}: five.\n\nBe patient."
    other = Example("What is 2 plus 2?", "2 plus 2 is 4.", "noforks", "arithmetic")
    assert canonical_list_order(other) == other


def test_resume_with_other_trainable_parameters_is_a_one_line_error(tmp_path, tokenizer):
    """A checkpoint whose optimizer covered other parameters is refused in one line, not torch's traceback."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
    kw = dict(tokenizer=tokenizer, steps=4, batch_size=2, lr=3e-3, seed=1, max_len=256, progress=False)
    train(cfg, micro_rows(4), tmp_path / "part", stop_after=2, **kw)
    model = LlamaForCausalLM(cfg)
    for p in model.model.layers[0].mlp.parameters():
        p.requires_grad_(False)  # fewer trainable parameters than the checkpoint's optimizer holds
    with pytest.raises(ValueError, match="another set of trainable parameters") as err:
        train(model, micro_rows(4), tmp_path / "part", resume=True, **kw)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- distillation


def _distill_case(tokenizer):
    """A packed fruit tree + a plain answer, and the labelled nodes' (label, input) pairs."""
    apar = find_apar_tokens(tokenizer)
    prompt_ids = tokenizer(format_prompt("Name three fruits."), add_special_tokens=False)["input_ids"]
    batch = collate([pack_tree(prompt_ids, fruit_tree(), tokenizer, apar), pack_plain(prompt_ids, "Just words.", tokenizer)],
                    tokenizer.pad_token_id)
    return apar, batch


def _reference_distill(student, teacher, batch, weight, hard_labels, hard_inputs, never, hard_after=0, hard_roots=None, child_id=None):
    """Node by node, in float64: CE at structural nodes, (1-w) CE + w KL elsewhere.
    ``hard_roots="forked"``: CE also at the root nodes of a row holding ``child_id`` (one
    example per row); ``"all"``: at every row's root nodes."""
    with torch.no_grad():
        s_all = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
        t_all = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    total = 0.0
    for b in range(batch.labels.shape[0]):
        hard_root = hard_roots == "all" or (hard_roots == "forked" and child_id in batch.input_ids[b].tolist())
        in_child = False
        for i in range(batch.labels.shape[1]):
            y = int(batch.labels[b, i])
            in_child = in_child or int(batch.input_ids[b, i]) == child_id
            if y == IGNORE:
                continue
            log_ps = torch.log_softmax(s_all[b, i].double(), -1)
            t = torch.full_like(log_ps, float("-inf"))
            t[: t_all.shape[-1]] = t_all[b, i].double()
            t[list(never)] = float("-inf")
            log_pt = torch.log_softmax(t, -1)
            ce = -float(log_ps[y])
            finite = torch.isfinite(log_pt)
            kl = float((log_pt[finite].exp() * (log_pt[finite] - log_ps[finite])).sum())
            recent = batch.input_ids[b, max(0, i - hard_after) : i + 1].tolist()
            if y in hard_labels or any(t in hard_inputs for t in recent) or (hard_root and not in_child):
                total += ce
            else:
                total += (1 - weight) * ce + weight * kl
    return total


def test_distill_loss_matches_a_node_by_node_reference(tokenizer):
    from apar_spec.train import Distill, model_teacher

    apar, batch = _distill_case(tokenizer)
    student = tiny_llama(len(tokenizer))
    torch.manual_seed(1)
    teacher = tiny_llama(len(tokenizer))
    with torch.no_grad():  # a teacher unlike the student (tiny_llama reseeds), and two vocabulary rows short
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
        teacher.resize_token_embeddings(len(tokenizer) - 2)
    hard_labels = (apar.fork_id, apar.child_id, tokenizer.eos_token_id)
    hard_inputs = (apar.fork_id, apar.child_id)
    never = (apar.fork_id, apar.child_id)
    for weight, after, roots in ((0.0, 0, None), (0.5, 0, None), (1.0, 0, None), (0.7, 2, None), (0.7, 0, "forked"), (0.7, 0, "all")):
        d = Distill(weight, model_teacher(teacher), hard_labels, hard_inputs, never, hard_after=after, hard_roots=roots,
                    child_id=apar.child_id)
        with torch.no_grad():
            got, n = summed_loss(student, batch, d)
        want = _reference_distill(student, teacher, batch, weight, hard_labels, hard_inputs, never, after, roots, apar.child_id)
        assert got.item() == pytest.approx(want, rel=1e-6)
        assert n == int((batch.labels != IGNORE).sum())
    with torch.no_grad():  # each scope really changes the loss ("forked" leaves the plain row's KL mix, "all" not)
        losses = [summed_loss(student, batch, Distill(0.7, model_teacher(teacher), hard_labels, hard_inputs, never, 0,
                                                      hard_roots=roots, child_id=apar.child_id))[0].item()
                  for roots in (None, "forked", "all")]
    assert len({round(x, 6) for x in losses}) == 3
    with torch.no_grad():
        plain, _ = summed_loss(student, batch)
        mixed, _ = summed_loss(student, batch, Distill(0.5, model_teacher(teacher), hard_labels, hard_inputs, never, hard_after=0))
    assert mixed.item() != pytest.approx(plain.item(), rel=1e-3)  # the KL term really enters


def test_distill_from_itself_leaves_only_the_structural_nodes(tokenizer):
    """Teacher == student and weight 1: KL is zero, so the loss is the CE of the structural nodes alone."""
    from apar_spec.train import Distill, model_teacher

    apar, batch = _distill_case(tokenizer)
    model = tiny_llama(len(tokenizer))
    hard_labels = (apar.fork_id, apar.child_id, tokenizer.eos_token_id)
    hard_inputs = (apar.fork_id, apar.child_id)
    with torch.no_grad():
        got, _ = summed_loss(model, batch, Distill(1.0, model_teacher(model), hard_labels, hard_inputs, (), hard_after=0))
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    keep = batch.labels != IGNORE
    labels, inputs = batch.labels[keep], batch.input_ids[keep]
    hard = torch.isin(labels, torch.tensor(hard_labels)) | torch.isin(inputs, torch.tensor(hard_inputs))
    assert 0 < int(hard.sum()) < int(keep.sum())
    ce = torch.nn.functional.cross_entropy(logits[keep][hard], labels[hard], reduction="sum")
    assert got.item() == pytest.approx(ce.item(), abs=1e-8)


def test_distill_training_with_a_peft_adapter_teaches_from_the_base(tmp_path, tokenizer):
    """train(distill=...) on a peft model: the teacher is the model with its adapter off."""
    peft = pytest.importorskip("peft")
    from apar_spec.tokens import add_apar_tokens
    from apar_spec.train import adapter_off_teacher

    base = tiny_llama(len(tokenizer), dtype=torch.float32)
    add_apar_tokens(base, tokenizer)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    apar, batch = _distill_case(tokenizer)
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
        on = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    assert not torch.allclose(on, base_logits)  # the adapter changes the model...
    assert torch.allclose(adapter_off_teacher(model)(batch), base_logits)  # ...and the teacher is the base
    with pytest.raises(ValueError, match="needs a peft model"):
        adapter_off_teacher(tiny_llama(len(tokenizer)))
    report = train(model, micro_rows(), tmp_path / "out", tokenizer=tokenizer, steps=8, batch_size=4, lr=1e-2,
                   max_len=256, progress=False, distill=0.5)
    assert report.steps == 8 and all(torch.isfinite(torch.tensor(report.losses)))
    assert report.losses[-1] < report.losses[0]
    with pytest.raises(ValueError, match="distill must be in"):
        train(model, micro_rows(), tmp_path / "bad", tokenizer=tokenizer, steps=1, progress=False, distill=1.5)


def test_distill_full_model_teaches_from_a_frozen_copy_of_the_start(tmp_path, tokenizer):
    """Without peft the default teacher is a frozen copy of the model as training starts:
    the same losses as passing that copy explicitly, other losses with another teacher."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    start = LlamaForCausalLM(cfg)
    torch.manual_seed(1)
    other = LlamaForCausalLM(cfg)
    kw = dict(tokenizer=tokenizer, steps=4, batch_size=4, lr=1e-2, seed=0, max_len=256, progress=False, distill=0.7)
    default = train(copy.deepcopy(start), micro_rows(), tmp_path / "a", **kw)
    explicit = train(copy.deepcopy(start), micro_rows(), tmp_path / "b", teacher=copy.deepcopy(start), **kw)
    stranger = train(copy.deepcopy(start), micro_rows(), tmp_path / "c", teacher=other, **kw)
    ce = train(copy.deepcopy(start), micro_rows(), tmp_path / "d", **{**kw, "distill": 0.0})
    assert default.losses == pytest.approx(explicit.losses, rel=1e-6)
    assert default.losses[-1] != pytest.approx(default.losses[0], rel=1e-3)  # the student moved away from its teacher
    assert stranger.losses[0] != pytest.approx(default.losses[0], rel=1e-3)
    assert default.losses[0] < ce.losses[0]  # a teacher equal to the student: KL ~0 where CE is not


def test_distill_hard_labels_train_with_cross_entropy_only(tmp_path, tokenizer):
    """``distill_hard_labels`` moves nodes with those labels to plain CE: with every token id
    listed, a weight-1 distillation is the CE run, step by step; with none, it is not."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    start = LlamaForCausalLM(cfg)
    kw = dict(tokenizer=tokenizer, steps=3, batch_size=4, lr=1e-2, seed=0, max_len=256, progress=False)
    ce = train(copy.deepcopy(start), micro_rows(), tmp_path / "ce", **kw)
    every = train(copy.deepcopy(start), micro_rows(), tmp_path / "all", distill=1.0,
                  distill_hard_labels=tuple(range(len(tokenizer))), **kw)
    none = train(copy.deepcopy(start), micro_rows(), tmp_path / "none", distill=1.0, **kw)
    assert every.losses == pytest.approx(ce.losses, rel=1e-5)
    assert none.losses[0] < ce.losses[0]  # teacher == student at step 0: KL 0 where CE is not


def test_root_nodes_by_hand_across_shared_rows():
    """Root nodes: labelled nodes before an example's first [Child]; a second example in the
    same row (its prompt unlabelled) starts a fresh root."""
    from apar_spec.train import root_nodes

    apar = AparTokens(fork_id=2, child_id=3)
    tree = AnswerTree("ab", [ForkPoint(1, AnswerTree("c"))])
    tok = CharTokenizer()
    # nodes: 0:10 1:11 | 2:'a' 3:[Fork] 4:'b' 5:EOS | 6:[Child] 7:'c' 8:EOS, then 10 11 | 'x' 'y' EOS
    batch = collate([pack_tree([10, 11], tree, tok, apar), pack_tree([10, 11], AnswerTree("xy"), tok, apar)], 0,
                    share_rows=True)
    assert batch.input_ids.shape[0] == 1  # both examples share one row
    ids = batch.input_ids[0].tolist()
    assert ids[:14] == [10, 11, 97, 2, 98, 1, 3, 99, 1, 10, 11, 120, 121, 1]  # the longer example first
    want = [False] + [True] * 4 + [False] * 5 + [True] * 3 + [False]  # EOS nodes and the prompt but its last: unlabelled
    got = root_nodes(batch, apar.child_id)[0].tolist()
    assert got[: len(want)] == want
    assert not any(got[len(want):])  # padding
    lead = root_nodes(batch, apar.child_id, apar.fork_id)[0].tolist()  # only before the root's first [Fork] input
    assert lead[: len(want)] == [False, True, True] + [False] * 7 + [True] * 3 + [False]
    assert not any(lead[len(want):])
    forked = root_nodes(batch, apar.child_id, structured_only=True)[0].tolist()  # the second example has no [Child]
    assert forked == [False] + [True] * 4 + [False] * (len(got) - 5)


def test_root_eos_term_matches_a_node_by_node_reference(tokenizer):
    """summed_loss with RootEos = CE (or the distill mix) + w * -log(1 - p(EOS)) at every root
    node whose label is not EOS, and nothing at child nodes or at the root's EOS."""
    from apar_spec.train import RootEos, root_nodes

    apar, batch = _distill_case(tokenizer)
    student = tiny_llama(len(tokenizer))
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        base, n = summed_loss(student, batch)
        got, n2 = summed_loss(student, batch, None, RootEos(0.7, eos, apar.child_id))
        logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids).logits.double()
    roots = root_nodes(batch, apar.child_id)
    extra, counted = 0.0, 0
    for b in range(batch.labels.shape[0]):
        in_child = False
        for i in range(batch.labels.shape[1]):
            y = int(batch.labels[b, i])
            in_child = (in_child or int(batch.input_ids[b, i]) == apar.child_id) and y != IGNORE
            if y == IGNORE:
                continue
            assert bool(roots[b, i]) == (not in_child)
            if not in_child and y != eos:
                extra += -0.7 * float(torch.log1p(-torch.softmax(logits[b, i], -1)[eos]))
                counted += 1
    assert counted > 0 and bool((roots & (batch.input_ids == apar.child_id)).sum() == 0)
    assert n2 == n
    assert got.item() == pytest.approx(base.item() + extra, rel=1e-6)
    assert got.item() > base.item()
