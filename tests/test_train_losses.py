"""Training losses against node-by-node references: distillation (KL to the base's own
distribution, hard labels, peft and full-model teachers) and the root-EOS term."""

from __future__ import annotations

import pytest
import torch
from test_train import TEXTS, CharTokenizer, fruit_tree, micro_rows, tiny_llama

from apar_spec.decoding.answer_tree import AnswerTree, ForkPoint
from apar_spec.decoding.tokens import AparTokens, find_apar_tokens
from apar_spec.training.losses import summed_loss
from apar_spec.training.packing import IGNORE, collate, pack_plain, pack_tree
from apar_spec.training.tokenizer import build_tokenizer, format_prompt
from apar_spec.training.train import train


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS * 20, vocab_size=400)


def _distill_case(tokenizer):
    """A packed fruit tree + a plain answer, and the labelled nodes' (label, input) pairs."""
    apar = find_apar_tokens(tokenizer)
    prompt_ids = tokenizer(format_prompt("Name three fruits."), add_special_tokens=False)["input_ids"]
    batch = collate(
        [pack_tree(prompt_ids, fruit_tree(), tokenizer, apar), pack_plain(prompt_ids, "Just words.", tokenizer)],
        tokenizer.pad_token_id,
    )
    return apar, batch


def _reference_distill(
    student, teacher, batch, weight, hard_labels, hard_inputs, never, hard_after=0, hard_roots=None, child_id=None
):
    """Node by node, in float64: CE at structural nodes, (1-w) CE + w KL elsewhere.
    ``hard_roots="forked"``: CE also at the root nodes of a row holding ``child_id`` (one
    example per row); ``"all"``: at every row's root nodes."""
    with torch.no_grad():
        s_all = student(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
        t_all = teacher(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
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
    from apar_spec.training.losses import Distill, model_teacher

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
    for weight, after, roots in (
        (0.0, 0, None),
        (0.5, 0, None),
        (1.0, 0, None),
        (0.7, 2, None),
        (0.7, 0, "forked"),
        (0.7, 0, "all"),
    ):
        d = Distill(
            weight,
            model_teacher(teacher),
            hard_labels,
            hard_inputs,
            never,
            hard_after=after,
            hard_roots=roots,
            child_id=apar.child_id,
        )
        with torch.no_grad():
            got, n = summed_loss(student, batch, d)
        want = _reference_distill(
            student, teacher, batch, weight, hard_labels, hard_inputs, never, after, roots, apar.child_id
        )
        assert got.item() == pytest.approx(want, rel=1e-6)
        assert n == int((batch.labels != IGNORE).sum())
    with torch.no_grad():  # each scope really changes the loss ("forked" leaves the plain row's KL mix, "all" not)
        losses = [
            summed_loss(
                student,
                batch,
                Distill(
                    0.7,
                    model_teacher(teacher),
                    hard_labels,
                    hard_inputs,
                    never,
                    0,
                    hard_roots=roots,
                    child_id=apar.child_id,
                ),
            )[0].item()
            for roots in (None, "forked", "all")
        ]
    assert len({round(x, 6) for x in losses}) == 3
    with torch.no_grad():
        plain, _ = summed_loss(student, batch)
        mixed, _ = summed_loss(
            student, batch, Distill(0.5, model_teacher(teacher), hard_labels, hard_inputs, never, hard_after=0)
        )
    assert mixed.item() != pytest.approx(plain.item(), rel=1e-3)  # the KL term really enters


def test_distill_from_itself_leaves_only_the_structural_nodes(tokenizer):
    """Teacher == student and weight 1: KL is zero, so the loss is the CE of the structural nodes alone."""
    from apar_spec.training.losses import Distill, model_teacher

    apar, batch = _distill_case(tokenizer)
    model = tiny_llama(len(tokenizer))
    hard_labels = (apar.fork_id, apar.child_id, tokenizer.eos_token_id)
    hard_inputs = (apar.fork_id, apar.child_id)
    with torch.no_grad():
        got, _ = summed_loss(
            model, batch, Distill(1.0, model_teacher(model), hard_labels, hard_inputs, (), hard_after=0)
        )
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
    keep = batch.labels != IGNORE
    labels, inputs = batch.labels[keep], batch.input_ids[keep]
    hard = torch.isin(labels, torch.tensor(hard_labels)) | torch.isin(inputs, torch.tensor(hard_inputs))
    assert 0 < int(hard.sum()) < int(keep.sum())
    ce = torch.nn.functional.cross_entropy(logits[keep][hard], labels[hard], reduction="sum")
    assert got.item() == pytest.approx(ce.item(), abs=1e-8)


def test_distill_training_with_a_peft_adapter_teaches_from_the_base(tmp_path, tokenizer):
    """train(distill=...) on a peft model: the teacher is the model with its adapter off."""
    peft = pytest.importorskip("peft")
    from apar_spec.decoding.tokens import add_apar_tokens
    from apar_spec.training.losses import adapter_off_teacher

    base = tiny_llama(len(tokenizer), dtype=torch.float32)
    add_apar_tokens(base, tokenizer)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    apar, batch = _distill_case(tokenizer)
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
            ).logits
        on = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
    assert not torch.allclose(on, base_logits)  # the adapter changes the model...
    assert torch.allclose(adapter_off_teacher(model)(batch), base_logits)  # ...and the teacher is the base
    with pytest.raises(ValueError, match="needs a peft model"):
        adapter_off_teacher(tiny_llama(len(tokenizer)))
    report = train(
        model,
        micro_rows(),
        tmp_path / "out",
        tokenizer=tokenizer,
        steps=8,
        batch_size=4,
        lr=1e-2,
        max_len=256,
        distill=0.5,
    )
    assert report.steps == 8 and all(torch.isfinite(torch.tensor(report.losses)))
    assert report.losses[-1] < report.losses[0]
    with pytest.raises(ValueError, match="distill must be in"):
        train(model, micro_rows(), tmp_path / "bad", tokenizer=tokenizer, steps=1, distill=1.5)


def test_distill_full_model_teaches_from_a_frozen_copy_of_the_start(tmp_path, tokenizer):
    """Without peft the default teacher is a frozen copy of the model as training starts:
    the same losses as passing that copy explicitly, other losses with another teacher."""
    import copy

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
    torch.manual_seed(0)
    start = LlamaForCausalLM(cfg)
    torch.manual_seed(1)
    other = LlamaForCausalLM(cfg)
    kw = dict(tokenizer=tokenizer, steps=4, batch_size=4, lr=1e-2, seed=0, max_len=256, distill=0.7)
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
    torch.manual_seed(0)
    start = LlamaForCausalLM(cfg)
    kw = dict(tokenizer=tokenizer, steps=3, batch_size=4, lr=1e-2, seed=0, max_len=256)
    ce = train(copy.deepcopy(start), micro_rows(), tmp_path / "ce", **kw)
    every = train(
        copy.deepcopy(start),
        micro_rows(),
        tmp_path / "all",
        distill=1.0,
        distill_hard_labels=tuple(range(len(tokenizer))),
        **kw,
    )
    none = train(copy.deepcopy(start), micro_rows(), tmp_path / "none", distill=1.0, **kw)
    assert every.losses == pytest.approx(ce.losses, rel=1e-5)
    assert none.losses[0] < ce.losses[0]  # teacher == student at step 0: KL 0 where CE is not


def test_root_nodes_by_hand_across_shared_rows():
    """Root nodes: labelled nodes before an example's first [Child]; a second example in the
    same row (its prompt unlabelled) starts a fresh root."""
    from apar_spec.training.losses import root_nodes

    apar = AparTokens(fork_id=2, child_id=3)
    tree = AnswerTree("ab", [ForkPoint(1, AnswerTree("c"))])
    tok = CharTokenizer()
    # nodes: 0:10 1:11 | 2:'a' 3:[Fork] 4:'b' 5:EOS | 6:[Child] 7:'c' 8:EOS, then 10 11 | 'x' 'y' EOS
    batch = collate(
        [pack_tree([10, 11], tree, tok, apar), pack_tree([10, 11], AnswerTree("xy"), tok, apar)], 0, share_rows=True
    )
    assert batch.input_ids.shape[0] == 1  # both examples share one row
    ids = batch.input_ids[0].tolist()
    assert ids[:14] == [10, 11, 97, 2, 98, 1, 3, 99, 1, 10, 11, 120, 121, 1]  # the longer example first
    want = (
        [False] + [True] * 4 + [False] * 5 + [True] * 3 + [False]
    )  # EOS nodes and the prompt but its last: unlabelled
    got = root_nodes(batch, apar.child_id)[0].tolist()
    assert got[: len(want)] == want
    assert not any(got[len(want) :])  # padding
    lead = root_nodes(batch, apar.child_id, apar.fork_id)[0].tolist()  # only before the root's first [Fork] input
    assert lead[: len(want)] == [False, True, True] + [False] * 7 + [True] * 3 + [False]
    assert not any(lead[len(want) :])
    forked = root_nodes(batch, apar.child_id, structured_only=True)[0].tolist()  # the second example has no [Child]
    assert forked == [False] + [True] * 4 + [False] * (len(got) - 5)


def test_root_eos_term_matches_a_node_by_node_reference(tokenizer):
    """summed_loss with RootEos = CE (or the distill mix) + w * -log(1 - p(EOS)) at every root
    node whose label is not EOS, and nothing at child nodes or at the root's EOS."""
    from apar_spec.training.losses import RootEos, root_nodes

    apar, batch = _distill_case(tokenizer)
    student = tiny_llama(len(tokenizer))
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        base, n = summed_loss(student, batch)
        got, n2 = summed_loss(student, batch, None, RootEos(0.7, eos, apar.child_id))
        logits = student(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits.double()
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
