"""Depth-first reassembly of hand-made branch trees."""

from apar_spec.decoding.reassemble import BranchInfo, reading_order, to_answer_tree

FORK, CHILD, EOS = 1, 2, 0
PIECES = {
    3: "Tips:",
    4: "\n1. Sleep:",
    5: " Go to bed early.",
    6: "\n2. Food:",
    7: " Eat well.",
    8: "\nDone.",
    9: " Avoid",
    10: " sugar.",
    11: "\n  a. Fruit:",
    12: " Apples.",
    13: "Plain answer.",
    14: "2. Walk:",
    15: "Move.",
}


def decode(ids):
    return "".join(PIECES.get(i, "") for i in ids)


def branch(id, parent, fork_index, tokens, finish="eos"):
    return BranchInfo(id, parent, fork_index, tokens, finish)


def test_list_tree_reads_item_then_details_then_next_item():
    tree = [
        branch(0, None, None, [3, 4, FORK, 6, FORK, 8, EOS]),
        branch(1, 0, 2, [CHILD, 5, EOS]),
        branch(2, 0, 4, [CHILD, 7, EOS]),
    ]
    assert reading_order(tree, FORK, CHILD, {EOS}) == [3, 4, 5, 6, 7, 8, EOS]  # root EOS kept, children's dropped
    t = to_answer_tree(tree, decode, FORK, CHILD)
    assert t.reassemble() == "Tips:\n1. Sleep: Go to bed early.\n2. Food: Eat well.\nDone."
    assert [f.offset for f in t.forks] == [len("Tips:\n1. Sleep:"), len("Tips:\n1. Sleep:\n2. Food:")]


def test_nested_children_and_children_finishing_in_any_order():
    # ids and order of branches follow spawn time; reading order follows the tree
    tree = [
        branch(0, None, None, [3, 4, FORK, 6, FORK, EOS]),
        branch(1, 0, 4, [CHILD, 7, EOS]),  # the second item's child was spawned... and listed first
        branch(2, 0, 2, [CHILD, 9, 10, 11, FORK, EOS]),
        branch(3, 2, 4, [CHILD, 12, EOS]),
    ]
    assert reading_order(tree, FORK, CHILD, {EOS}) == [3, 4, 9, 10, 11, 12, 6, 7, EOS]
    text = to_answer_tree(tree, decode, FORK, CHILD).reassemble()
    assert text == "Tips:\n1. Sleep: Avoid sugar.\n  a. Fruit: Apples.\n2. Food: Eat well."


def test_conventions_add_the_missing_space_and_line_break():
    tree = [
        branch(0, None, None, [4, FORK, 14, FORK, EOS]),
        branch(1, 0, 1, [CHILD, 15, EOS]),
        branch(2, 0, 3, [CHILD, 15, EOS]),
    ]
    assert to_answer_tree(tree, decode, FORK, CHILD).reassemble() == "\n1. Sleep: Move.\n2. Walk: Move."


def test_unforked_answer_and_a_fork_whose_child_never_ran():
    assert to_answer_tree([branch(0, None, None, [13, EOS])], decode, FORK, CHILD).reassemble() == "Plain answer."
    cut = [branch(0, None, None, [3, 4, FORK], finish="budget")]  # budget ended before the child ran
    assert reading_order(cut, FORK, CHILD, {EOS}) == [3, 4]
    assert to_answer_tree(cut, decode, FORK, CHILD).reassemble() == "Tips:\n1. Sleep:"
