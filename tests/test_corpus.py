"""The synthetic corpus: determinism, kinds and mix, APAR structure of each kind, held-out disjointness."""

from __future__ import annotations

import collections
import re

import pytest

from apar_spec.training.corpus import MAX_ITEMS, TOPICS, Example, make_corpus, split_of, write_jsonl
from apar_spec.training.restructure import convert_file, restructure

CORPUS = make_corpus(600, seed=3)


def of_kind(kind: str) -> list[Example]:
    return [e for e in CORPUS if e.kind == kind]


def test_same_seed_same_corpus_other_seed_differs():
    assert make_corpus(50, seed=7) == make_corpus(50, seed=7)
    assert make_corpus(50, seed=7) != make_corpus(50, seed=8)


def test_default_mix_gives_exact_counts_and_mix_and_kinds_select():
    counts = collections.Counter(e.kind for e in make_corpus(40))
    assert counts == {"list": 20, "explain": 10, "noforks": 10}
    assert {e.kind for e in make_corpus(10, kinds=("noforks",))} == {"noforks"}
    assert collections.Counter(e.kind for e in make_corpus(9, mix={"list": 2, "explain": 1, "noforks": 0})) == {
        "list": 6,
        "explain": 3,
    }
    assert make_corpus(0) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kinds": ("poems",)}, "unknown kind"),
        ({"split": "test"}, "unknown split"),
        ({"mix": {"list": 0}, "kinds": ("list",)}, "positive"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_corpus(5, **kwargs)


def test_topics_are_many_with_short_distinct_titles():
    assert len(TOPICS) >= 30 and len({t.key for t in TOPICS}) == len(TOPICS)
    for topic in TOPICS:
        assert len(set(topic.titles)) == len(topic.titles) >= MAX_ITEMS
        assert all(1 <= len(title.split()) <= 3 for title in topic.titles), topic.key
    used = {e.topic for e in make_corpus(1000, kinds=("list",))}
    assert used == {t.key for t in TOPICS}


def test_list_answers_fork_once_per_requested_item():
    examples = of_kind("list")
    assert len(examples) >= 100
    sizes = set()
    for e in examples:
        n = int(re.search(r"\d+", e.prompt).group())
        sizes.add(n)
        tree = restructure(e.answer)
        assert len(tree.forks) == n, e.answer
        titles = re.findall(r"^\d+\. ([^:]+):", e.answer, flags=re.M)
        assert len(titles) == len(set(titles)) == n
        for segment, fork in zip(tree.segments()[1:], tree.forks[1:]):
            assert len(segment.split()) <= 4  # "\n3. Bedtime books:": the parent writes little ...
        for fork in tree.forks:
            assert 12 <= len(fork.child.text.split()) <= 35  # ... the children write the bulk
            assert len(re.findall(r"[.!?](?:\s|$)", fork.child.text)) == 2
    assert sizes == set(range(3, MAX_ITEMS + 1))


def test_explain_answers_fork_once_per_paragraph():
    examples = of_kind("explain")
    assert len(examples) >= 50
    for e in examples:
        paragraphs = e.answer.split("\n\n")
        assert 3 <= len(paragraphs) <= 4
        assert all(2 <= len(re.findall(r"[.!?](?:\s|$)", p)) <= 3 for p in paragraphs)
        tree = restructure(e.answer)
        assert len(tree.forks) == len(paragraphs)
        assert all(f.child.text.startswith(" ") for f in tree.forks)


def test_noforks_answers_never_fork():
    examples = of_kind("noforks")
    assert {"arithmetic", "facts", "code", "definitions"} <= {e.topic for e in examples}
    for e in examples:
        assert "\n" not in e.answer
        assert restructure(e.answer).forks == [], e.answer


def test_arithmetic_answers_are_correct():
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    checked = 0
    for e in make_corpus(200, kinds=("noforks",)):
        m = re.fullmatch(r"(\d+) (plus|minus|times) (\d+) (?:is|equals) (\d+)\.", e.answer)
        if e.topic == "arithmetic":
            assert m is not None, e.answer
            assert ops[m[2]](int(m[1]), int(m[3])) == int(m[4])
            assert f"{m[1]} {m[2]} {m[3]}" in e.prompt
            checked += 1
    assert checked > 10


def test_heldout_prompts_never_appear_in_train():
    train = {e.prompt for e in make_corpus(3000, seed=0)}
    heldout = make_corpus(300, seed=0, split="heldout")
    assert len(heldout) == 300
    assert {e.kind for e in heldout} == {"list", "explain", "noforks"}
    assert train.isdisjoint(e.prompt for e in heldout)
    assert all(split_of(p) == "train" for p in train)
    assert all(split_of(e.prompt) == "heldout" for e in heldout)


def test_write_jsonl_feeds_convert_file(tmp_path):
    examples = make_corpus(30, seed=1)
    path = tmp_path / "corpus.jsonl"
    assert write_jsonl(examples, path) == 30
    report = convert_file(path, tmp_path / "apar.jsonl")
    assert (report.rows_written, report.bad_rows) == (30, [])
    assert report.structured == sum(e.kind != "noforks" for e in examples)
