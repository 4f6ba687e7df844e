"""Prompt sets: the built-in set and every file format the benchmark accepts, plus bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from apar_spec.experiments.prompts import BUILTIN_SETS, PLAIN_CATEGORY, Prompt, load_prompts, read_prompt_file

from apar_spec.training.corpus import split_of


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_builtin_default_is_held_out_mixed_and_interleaved():
    prompts = load_prompts()
    assert prompts == list(BUILTIN_SETS["default"])
    assert len(prompts) >= 10
    assert len({p.id for p in prompts}) == len(prompts)
    assert all(split_of(p.text) == "heldout" for p in prompts), "built-in prompts must not be training prompts"
    categories = [p.category for p in prompts]
    assert {"list", "short"} <= set(categories)
    assert len(set(categories[:3])) == 3, "--limit 3 should give one prompt of each category"


def test_builtin_category_and_limit():
    short = load_prompts("default", category="short")
    assert short and all(p.category == "short" for p in short)
    both = load_prompts("default", category="short,list", limit=3)
    assert len(both) == 3 and {p.category for p in both} <= {"short", "list"}


def test_plain_text_one_prompt_per_line(tmp_path):
    f = write(tmp_path / "p.txt", "First prompt?\n\n  Second prompt.  \n")
    prompts = load_prompts(f)
    assert prompts == [Prompt("L1", "First prompt?", PLAIN_CATEGORY), Prompt("L3", "Second prompt.", PLAIN_CATEGORY)]


def test_jsonl_with_prompt_id_and_category(tmp_path):
    f = jsonl(tmp_path / "p.jsonl", [{"prompt": "A?", "id": "a", "category": "x"}, {"prompt": "B?"}])
    assert load_prompts(f) == [Prompt("a", "A?", "x"), Prompt("L2", "B?", PLAIN_CATEGORY)]


def test_question_jsonl_first_turn_by_default_and_turn_option(tmp_path):
    rows = [
        {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]},
        {"question_id": 101, "category": "math", "turns": ["What is 2+2?", "And 3+3?"], "reference": ["4", "6"]},
    ]
    f = jsonl(tmp_path / "question.jsonl", rows)
    assert load_prompts(f) == [Prompt("81", "Write a poem.", "writing"), Prompt("101", "What is 2+2?", "math")]
    assert [p.text for p in load_prompts(f, turn=1)] == ["Now shorter.", "And 3+3?"]
    assert [p.id for p in load_prompts(f, category="math")] == ["101"]


def test_jsonl_detected_by_content_without_suffix(tmp_path):
    f = write(tmp_path / "questions", json.dumps({"prompt": "Hi?"}) + "\n")
    assert load_prompts(f)[0].text == "Hi?"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "ok"}\n{"prompt": "bad"\n', "line 2: invalid JSON"),
        ('{"prompt": "ok"}\n\n{"text": "no prompt"}\n', "line 3: needs a 'prompt' string or a 'turns' list"),
        ('{"turns": []}\n', "line 1: 'turns' must be a non-empty list"),
        ('{"prompt": 5}\n', "line 1: 'prompt' must be a string"),
        ('{"prompt": "   "}\n', "line 1: the prompt is empty"),
        ("[1, 2]\n", "line 1: expected a JSON object"),
        ('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 1}\n', "line 2: duplicate prompt id '1' (first on line 1)"),
        ('{"question_id": 1, "turns": ["one"]}\n', None),  # fine at turn 0 ...
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path, content, message):
    f = write(tmp_path / "bad.jsonl", content)
    if message is None:
        assert load_prompts(f)[0].text == "one"
        with pytest.raises(ValueError, match="line 1: has 1 turn"):  # ... but not at turn 1
            load_prompts(f, turn=1)
        return
    with pytest.raises(ValueError) as err:
        load_prompts(f)
    assert message in str(err.value)
    assert str(f) in str(err.value)


def test_missing_empty_directory_and_binary_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_prompts(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="did you mean 'default'"):
        load_prompts("defualt")
    with pytest.raises(ValueError, match="empty"):
        load_prompts(write(tmp_path / "empty.txt", "\n \n"))
    with pytest.raises(ValueError, match="directory"):
        load_prompts(tmp_path)
    (tmp_path / "bin.txt").write_bytes(b"fine\n\xff\xfe bad\n")
    with pytest.raises(ValueError, match="line 2: not valid UTF-8"):
        read_prompt_file(tmp_path / "bin.txt")


def test_unknown_category_suggests_close_name():
    with pytest.raises(ValueError, match="unknown category 'lsit'.*did you mean 'list'"):
        load_prompts("default", category="lsit")


def test_bad_limit():
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        load_prompts("default", limit=0)


@pytest.mark.parametrize("name", ["spec_bench", "mt_bench", "vicuna_bench"])
def test_shared_question_files_parse_when_present(name):
    path = Path("/work/shared/eval") / name / "question.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not on this machine")
    prompts = load_prompts(path)
    assert prompts and all(p.text.strip() and p.category for p in prompts)
    assert len({p.id for p in prompts}) == len(prompts)


def test_select_prompts_mixes_sets_per_category_and_interleaves(tmp_path):
    from apar_spec.experiments.prompts import select_prompts

    for name, cats in (("a", ["x", "x", "y"]), ("b", ["x"])):
        (tmp_path / name).mkdir()
        rows = [
            {"question_id": i, "category": c, "turns": [f"{name} q{i}", f"{name} again{i}"]} for i, c in enumerate(cats)
        ]
        (tmp_path / name / "question.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    both = f"{tmp_path / 'a' / 'question.jsonl'},{tmp_path / 'b' / 'question.jsonl'}"
    ps = select_prompts(both)
    assert [p.category for p in ps] == ["a/x", "a/y", "b/x", "a/x"]
    assert ps[0].id == "a/0"
    assert [p.id for p in select_prompts(both, per_category=1)] == ["a/0", "a/2", "b/0"]
    assert [p.text for p in select_prompts(both, per_category=1, turn=1)] == ["a again0", "a again2", "b again0"]
    one = str(tmp_path / "a" / "question.jsonl")
    assert [p.id for p in select_prompts(one)] == ["0", "1", "2"]  # one set: file order, no prefix
    assert [p.id for p in select_prompts(one, per_category=1)] == ["0", "2"]
    with pytest.raises(ValueError, match="unknown category 'a/z'"):
        select_prompts(both, category="a/z")
    with pytest.raises(ValueError, match="--per-category must be >= 1"):
        select_prompts(both, per_category=0)


def test_sot_router_labels_csv(tmp_path):
    """Skeleton-of-Thought's ``label;request`` files: a quoted request may span lines (and hold
    ';' and '"'), ids name the row's first line, labels become sot-list / sot-not-list."""
    f = write(
        tmp_path / "r.csv",
        'label;request\n1;How can I sleep better?\n0;"Sum the array:\n\n[1; 2] ""fast"""\n\n0;What is 2+2?\n',
    )
    assert load_prompts(f) == [
        Prompt("L2", "How can I sleep better?", "sot-list"),
        Prompt("L3", 'Sum the array:\n\n[1; 2] "fast"', "sot-not-list"),
        Prompt("L7", "What is 2+2?", "sot-not-list"),
    ]
    assert [p.id for p in load_prompts(f, category="sot-list")] == ["L2"]
    with pytest.raises(ValueError, match=r"r2.csv line 3: the label must be 0 or 1 \(got 'yes'\)"):
        load_prompts(write(tmp_path / "r2.csv", "label;request\n1;A?\nyes;B?\n"))
    with pytest.raises(ValueError, match="line 2: the request is empty"):
        load_prompts(write(tmp_path / "r3.csv", "label;request\n0;  \n"))
    with pytest.raises(ValueError, match="has a 'label;request' header but no rows"):
        load_prompts(write(tmp_path / "r4.csv", "label;request\n\n"))


def test_several_label_files_in_one_folder_are_told_apart_by_their_names(tmp_path):
    from apar_spec.experiments.prompts import select_prompts

    a = write(tmp_path / "vicuna_router.csv", "label;request\n1;List tips for focus.\n")
    b = write(tmp_path / "wizardlm_router.csv", "label;request\n0;What is 3*3?\n1;Ways to save money?\n")
    ps = select_prompts(f"{a},{b}")
    assert [(p.id, p.category) for p in ps] == [
        ("vicuna_router/L2", "vicuna_router/sot-list"),
        ("wizardlm_router/L2", "wizardlm_router/sot-not-list"),
        ("wizardlm_router/L3", "wizardlm_router/sot-list"),
    ]


@pytest.mark.parametrize("name,rows,lists", [("vicuna", 80, 37), ("wizardlm", 218, 58)])
def test_shared_sot_label_files_parse_when_present(name, rows, lists):
    path = Path("/work/shared/eval/sot_router_labels") / f"{name}_router.csv"
    if not path.is_file():
        pytest.skip(f"{path} not on this machine")
    prompts = load_prompts(path)
    assert len(prompts) == rows and sum(p.category == "sot-list" for p in prompts) == lists  # ../shared/eval/README.md
    assert len({p.id for p in prompts}) == rows and all(p.text.strip() for p in prompts)
