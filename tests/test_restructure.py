"""Restructuring rules on hand-written answers, the exact round trip on generated ones, and JSONL conversion."""

from __future__ import annotations

import json
import random

import pytest

from apar_spec.decoding.answer_tree import AnswerTree
from apar_spec.training.restructure import ConvertReport, convert_file, restructure


def child_texts(tree: AnswerTree) -> list[str]:
    return [f.child.text for f in tree.forks]


# ----------------------------------------------------------------- hand-written cases


def test_list_with_intro_and_outro():
    answer = (
        "Here are 3 tips:\n"
        "1. Fixed bedtime: Go to bed at the same time. It helps.\n"
        "2. Dark room: Block the light.\n"
        "3. No screens: Put the phone away.\n"
        "\n"
        "Good luck!"
    )
    tree = restructure(answer)
    assert tree.segments() == [
        "Here are 3 tips:\n1. Fixed bedtime:",
        "\n2. Dark room:",
        "\n3. No screens:",
        "\n\nGood luck!",
    ]
    assert child_texts(tree) == [" Go to bed at the same time. It helps.", " Block the light.", " Put the phone away."]
    assert all(not f.child.forks for f in tree.forks)
    assert tree.reassemble() == answer


def test_outro_without_blank_line_stays_in_parent():
    answer = "1. A: one.\n2. B: two.\n3. C: three.\nThat is all."
    tree = restructure(answer)
    assert tree.segments()[-1] == "\nThat is all."
    assert child_texts(tree)[-1] == " three."


def test_two_item_list_does_not_fork():
    answer = "Two options:\n1. Walk: It is free.\n2. Cycle: It is fast."
    assert restructure(answer).forks == []


def test_items_must_be_numbered_from_one_consecutively():
    not_from_one = "Next:\n2. A: x.\n3. B: y.\n4. C: z."
    with_gap = "Next:\n1. A: x.\n2. B: y.\n4. C: z."
    assert restructure(not_from_one).forks == []
    assert restructure(with_gap).forks == []


def test_every_item_needs_a_title():
    answer = "Steps:\n1. Prep: get ready.\n2. Then build it.\n3. Paint: finish."
    assert restructure(answer).forks == []


def test_decimal_number_is_not_a_list_item():
    answer = "Pack:\n1. Water: about 3.5 kg of it.\n2. Food: 2 kg.\n3.5 kg is the total weight."
    assert restructure(answer).forks == []  # "3.5 kg" is no third item, so the list has only 2
    listed = "Pack:\n1. Water: 3.5 kg. Carry it.\n2. Food: 2 kg.\n3. Tent: 1.5 kg."
    assert child_texts(restructure(listed)) == [" 3.5 kg. Carry it.", " 2 kg.", " 1.5 kg."]


def test_windows_newlines_stay_in_parent():
    answer = "Tips:\r\n1. A: x.\r\n2. B: y.\r\n3. C: z.\r\n\r\nBye.\r\n"
    tree = restructure(answer)
    assert tree.segments() == ["Tips:\r\n1. A:", "\r\n2. B:", "\r\n3. C:", "\r\n\r\nBye.\r\n"]
    assert child_texts(tree) == [" x.", " y.", " z."]
    assert tree.reassemble() == answer


def test_bold_titles_and_indented_continuation_lines():
    answer = "1. **Sleep:** Rest well.\n   Keep it dark.\n2. **Eat**: Eat well.\n3. **Move:** Walk daily."
    tree = restructure(answer)
    assert tree.segments()[:2] == ["1. **Sleep:**", "\n2. **Eat**:"]
    assert child_texts(tree)[0] == " Rest well.\n   Keep it dark."


def test_two_lists_both_fork():
    answer = "Pros:\n1. A: x.\n2. B: y.\n3. C: z.\n\nCons:\n1. D: u.\n2. E: v.\n3. F: w."
    tree = restructure(answer)
    assert len(tree.forks) == 6
    assert tree.segments()[3] == "\n\nCons:\n1. D:"


def test_item_without_details_gets_no_fork():
    answer = "1. A: x.\n2. B:\n3. C: z."
    tree = restructure(answer)
    assert child_texts(tree) == [" x.", " z."]
    assert tree.reassemble() == answer


NESTED = (
    "Plan:\n"
    "1. Prep: Get ready.\n"
    "   a. Tools: A hammer.\n"
    "   b. Wood: Two planks.\n"
    "   c. Glue: Strong glue.\n"
    "2. Build: Do it.\n"
    "3. Paint: Finish it."
)


def test_nested_list_stays_in_child_at_depth_one():
    tree = restructure(NESTED, max_depth=1)
    assert tree.depth() == 1
    assert (
        child_texts(tree)[0] == " Get ready.\n   a. Tools: A hammer.\n   b. Wood: Two planks.\n   c. Glue: Strong glue."
    )


def test_nested_list_forks_at_depth_two():
    tree = restructure(NESTED, max_depth=2)
    assert tree.depth() == 2
    first = tree.forks[0].child
    assert first.segments() == [" Get ready.\n   a. Tools:", "\n   b. Wood:", "\n   c. Glue:", ""]
    assert child_texts(first) == [" A hammer.", " Two planks.", " Strong glue."]
    assert tree.reassemble() == NESTED


def test_max_depth_zero_never_forks_and_negative_is_rejected():
    assert restructure(NESTED, max_depth=0).forks == []
    with pytest.raises(ValueError, match="max_depth"):
        restructure(NESTED, max_depth=-1)


def test_paragraphs_fork_after_first_sentence():
    answer = "Sleep matters. It restores you.\n\nOne sentence only.\n\nTry this, e.g. a walk. Then rest! Done."
    tree = restructure(answer)
    assert tree.segments() == ["Sleep matters.", "\n\nOne sentence only.\n\nTry this, e.g. a walk.", ""]
    assert child_texts(tree) == [" It restores you.", " Then rest! Done."]


def test_two_paragraphs_stay_unstructured():
    assert restructure("First part. More.\n\nSecond part. More.").forks == []


def test_code_blocks_do_not_fork():
    listy_code = "Run this:\n\n```\n1. A: x\n2. B: y\n3. C: z\n```\n\nDone."
    assert restructure(listy_code).forks == []
    mixed = "Use a loop. It is simple.\n\n```python\nx = 1. \n\ny = 2\n```\n\nCall it once. Then check."
    tree = restructure(mixed)
    assert child_texts(tree) == [" It is simple.", " Then check."]
    assert "```python\nx = 1. \n\ny = 2\n```" in tree.text


def test_one_liner_and_empty_answer_are_unstructured():
    assert restructure("17 plus 25 is 42.") == AnswerTree("17 plus 25 is 42.")
    assert restructure("") == AnswerTree("")


# ----------------------------------------------------------------- generated cases

WORDS = "apple sleep water run code plan rest walk light book 3.5 kg e.g. time".split()


def sentence(rng: random.Random) -> str:
    words = rng.choices(WORDS, k=rng.randint(2, 7))
    return words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice(".!?")


def clean_list(rng: random.Random, nl: str) -> tuple[str, int]:
    """A list the rules must fork exactly once per item, with intro and maybe outro."""
    n = rng.randint(3, 8)
    titles = rng.sample(["Sleep", "Water", "Dark room", "Walk daily", "Less sugar", "Plan", "Read more", "Rest"], n)
    items = [f"{i}. {t}: " + " ".join(sentence(rng) for _ in range(rng.randint(1, 3))) for i, t in enumerate(titles, 1)]
    text = sentence(rng) + nl + nl.join(items)
    if rng.random() < 0.5:
        text += nl * rng.randint(1, 2) + sentence(rng)
    return text, n


def messy_answer(rng: random.Random) -> str:
    """Anything: broken lists, nested items, code, odd whitespace; only the round trip is promised."""
    nl = rng.choice(["\n", "\r\n"])
    blocks = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(["para", "list", "code", "raw"])
        if kind == "para":
            blocks.append(" ".join(sentence(rng) for _ in range(rng.randint(1, 4))))
        elif kind == "list":
            start = rng.choice([1, 1, 1, 2])
            lines = []
            for i in range(start, start + rng.randint(1, 5)):
                title = rng.choice(["Title: ", "**Bold:** ", "", "Time 3:1 "])
                lines.append(f"{i}{rng.choice(['.', '.', ')'])} {title}{sentence(rng)}")
                for j in range(rng.choice([0, 0, 3])):
                    marker = rng.choice([f"{'abc'[j]}.", f"{j + 1}.", "-"])
                    lines.append(f"{' ' * rng.choice([2, 3, 4])}{marker} {rng.choice(['Sub: ', ''])}{sentence(rng)}")
            blocks.append(nl.join(lines))
        elif kind == "code":
            blocks.append(f"```{nl}1. A: x{nl}{nl}y = 3.5{nl}```")
        else:
            blocks.append("".join(rng.choices("1a.:- *\n\r\t xyz`#", k=rng.randint(0, 40))))
    return (nl * rng.randint(1, 3)).join(blocks) + rng.choice(["", nl, "  "])


def assert_well_formed(tree: AnswerTree, max_depth: int) -> None:
    offsets = [f.offset for f in tree.forks]
    assert offsets == sorted(set(offsets)) and all(0 <= o <= len(tree.text) for o in offsets)
    assert tree.depth() <= max_depth
    for fork in tree.forks:
        assert fork.child.text.strip(), "a child must have something to write"
        assert_well_formed(fork.child, max_depth - 1)


def test_generated_clean_lists_fork_once_per_item():
    rng = random.Random(0)
    for _ in range(300):
        answer, n = clean_list(rng, rng.choice(["\n", "\r\n"]))
        tree = restructure(answer)
        assert len(tree.forks) == n, answer
        assert all(text.startswith(" ") and "\n" not in text for text in child_texts(tree))
        assert tree.reassemble() == answer


@pytest.mark.parametrize("max_depth", [1, 2, 3])
def test_generated_answers_round_trip_exactly(max_depth):
    rng = random.Random(max_depth)
    structured = 0
    for _ in range(400):
        answer = messy_answer(rng)
        tree = restructure(answer, max_depth=max_depth)
        assert tree.reassemble() == answer, repr(answer)
        assert AnswerTree.from_dict(json.loads(json.dumps(tree.to_dict()))) == tree
        assert_well_formed(tree, max_depth)
        structured += bool(tree.forks)
    assert structured > 40  # the generator does exercise the forking paths


# ----------------------------------------------------------------- convert_file

LIST_ANSWER = "Tips:\n1. A: x.\n2. B: y.\n3. C: z."


def test_convert_file_counts_and_reports_bad_rows(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"prompt": "Give 3 tips.", "answer": LIST_ANSWER}),  # 1
        json.dumps(
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "Add 2 and 2."},
                    {"from": "gpt", "value": "2 plus 2 is 4."},
                    {"from": "human", "value": "Thanks"},
                ]
            }
        ),  # 2
        "{not json",  # 3
        json.dumps({"prompt": "No answer here"}),  # 4
        json.dumps({"prompt": "Empty", "answer": "   "}),  # 5
        "",  # blank lines are skipped, not rows
        json.dumps(["a", "list"]),  # 7
        json.dumps({"conversations": [{"from": "user", "value": "Hi"}]}),  # 8
    ]
    src.write_bytes(("\n".join(lines) + "\n").encode() + b'{"prompt": "\xff", "answer": "x"}\n')  # 9
    out = tmp_path / "sub" / "out.jsonl"

    report = convert_file(src, out)

    assert (report.rows_read, report.rows_written, report.structured, report.unstructured) == (8, 2, 1, 1)
    assert [n for n, _ in report.bad_rows] == [3, 4, 5, 7, 8, 9]
    reasons = dict(report.bad_rows)
    assert reasons[3].startswith("invalid JSON")
    assert "'answer'" in reasons[4]
    assert reasons[5] == "empty answer"
    assert "gpt/assistant" in reasons[8]
    assert "UTF-8" in reasons[9]
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["Give 3 tips.", "Add 2 and 2."]
    assert [r["structured"] for r in rows] == [True, False]
    assert rows[1]["answer"] == "2 plus 2 is 4."
    for row in rows:
        assert set(row) == {"prompt", "answer", "structured", "tree"}
        assert AnswerTree.from_dict(row["tree"]).reassemble() == row["answer"]


def test_convert_file_row_flags(tmp_path):
    """``restructure: false`` keeps a list as one branch; ``open_end`` passes on; a bad flag is a bad row."""
    src = tmp_path / "in.jsonl"
    lines = [
        {"prompt": "Give 3 tips.", "answer": LIST_ANSWER, "open_end": True},
        {"prompt": "Work it out.", "answer": LIST_ANSWER, "restructure": False},
        {"prompt": "Bad flag.", "answer": LIST_ANSWER, "open_end": "yes"},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    report = convert_file(src, tmp_path / "out.jsonl")
    assert (report.rows_written, report.structured, report.unstructured) == (2, 1, 1)
    assert report.bad_rows == [(3, "'open_end' must be true or false, not 'yes'")]
    first, second = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert first["open_end"] is True and first["structured"] is True
    assert "open_end" not in second and second["structured"] is False
    assert AnswerTree.from_dict(second["tree"]).reassemble() == LIST_ANSWER


def test_convert_file_max_depth_reaches_nested_lists(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "p", "answer": NESTED}) + "\n", encoding="utf-8")
    convert_file(src, tmp_path / "out.jsonl", max_depth=2)
    tree = AnswerTree.from_dict(json.loads((tmp_path / "out.jsonl").read_text(encoding="utf-8"))["tree"])
    assert tree.depth() == 2


def test_convert_file_missing_input_and_same_output(tmp_path):
    with pytest.raises(FileNotFoundError, match="input file not found: .*nope.jsonl"):
        convert_file(tmp_path / "nope.jsonl", tmp_path / "out.jsonl")
    src = tmp_path / "in.jsonl"
    src.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="is the input file"):
        convert_file(src, src)
    assert convert_file(src, tmp_path / "out.jsonl") == ConvertReport()


def test_whole_lead_keeps_the_first_forkable_paragraphs_whole():
    answer = (
        "# Title\n\nSleep matters. It restores you.\n\nOne sentence only.\n\n"
        "Move daily. It helps.\n\nEat well. Mostly plants."
    )
    paper = restructure(answer)
    assert child_texts(paper) == [" It restores you.", " It helps.", " Mostly plants."]
    lead = restructure(answer, whole_lead=1)
    # the title and the one-sentence paragraph cannot fork, so they do not use up the lead
    assert child_texts(lead) == [" It helps.", " Mostly plants."]
    assert lead.segments()[0] == "# Title\n\nSleep matters. It restores you.\n\nOne sentence only.\n\nMove daily."
    assert restructure(answer, whole_lead=3).forks == []
    for n in range(4):
        assert restructure(answer, whole_lead=n).reassemble() == answer
    # lists are the paper's rule 1 and ignore the lead
    listy = "Intro. More intro.\n\n1. A: x.\n2. B: y.\n3. C: z."
    assert restructure(listy, whole_lead=2) == restructure(listy)
    with pytest.raises(ValueError, match="whole_lead must be >= 0"):
        restructure(answer, whole_lead=-1)


def test_convert_file_whole_lead(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps(
            {"prompt": "p", "answer": "Rest well. Sleep more.\n\nMove daily. Walk often.\n\nEat well. Cook often."}
        )
        + "\n",
        encoding="utf-8",
    )
    convert_file(src, tmp_path / "out.jsonl", whole_lead=1)
    tree = AnswerTree.from_dict(json.loads((tmp_path / "out.jsonl").read_text(encoding="utf-8"))["tree"])
    assert child_texts(tree) == [" Walk often.", " Cook often."]
    with pytest.raises(ValueError, match="--whole-lead must be >= 0"):
        convert_file(src, tmp_path / "out2.jsonl", whole_lead=-2)
