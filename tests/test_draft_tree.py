"""Draft-tree shapes: layout, parsing, validation errors, expected acceptance."""

import pytest

from apar_spec.decoding.draft_tree import chain, expected_accepted, full_tree, layout, parse_tree


def test_layout_orders_parents_before_children_and_derives_depth_rank():
    shape = layout([[0, 0, 0], [1], [0], [0, 1], [1, 0], [0, 0]])
    assert shape.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    assert shape.parents == (-1, -1, 0, 0, 1, 2)
    assert shape.depths == (1, 1, 2, 2, 2, 3)
    assert shape.ranks == (0, 1, 0, 1, 0, 0)
    for i, parent in enumerate(shape.parents):
        assert parent < i  # a parent is always laid out first
        if parent >= 0:
            assert shape.paths[i][:-1] == shape.paths[parent]
    assert shape.children(-1) == [0, 1] and shape.children(0) == [2, 3]
    assert shape.width(2) == 2 and shape.depth == 3 and not shape.is_chain


def test_chain_and_full_tree():
    c = chain(4)
    assert c.is_chain and c.size == 4 and c.parents == (-1, 0, 1, 2) and c.describe() == "chain:4"
    t = full_tree(2, 3)
    assert t.size == 2 + 4 + 8 and t.depth == 3 and t.width(3) == 2


@pytest.mark.parametrize(
    "text, size, depth",
    [("4", 4, 4), ("chain:2", 2, 2), ("topk:3x2", 12, 2), ("[[0],[1],[0,0]]", 3, 2), (" chain:1 ", 1, 1)],
)
def test_parse_tree_forms(text, size, depth):
    shape = parse_tree(text)
    assert (shape.size, shape.depth) == (size, depth)
    assert parse_tree(shape.to_json()) == shape  # the JSON form round-trips


@pytest.mark.parametrize(
    "spec, message",
    [
        ("[[0],[0,0,0]]", "no parent path"),
        ("[[0],[2]]", "skips rank 1"),
        ("[[0],[0]]", "appears twice"),
        ("[[0],[-1]]", "ranks >= 0"),
        ("[[]]", "non-empty"),
        ("[]", "at least one path"),
        ("[[0]", "not valid JSON"),
        ("{}", "unknown tree spec"),
        ("chain:0", "k >= 1"),
        ("topk:0x2", "width >= 1"),
        ("auto", "cost model"),
        ("wide", "unknown tree spec"),
    ],
)
def test_bad_tree_specs_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_tree(spec)
    assert "\n" not in str(err.value)


def test_expected_accepted_matches_brute_force_enumeration():
    """Enumerate the target's token at each depth (rank r with prob p[d][r], else a miss)."""
    import itertools

    p = {1: [0.6, 0.2], 2: [0.5, 0.3], 3: [0.7]}
    shape = layout([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    outcomes = {d: list(range(len(ps))) + [None] for d, ps in p.items()}
    total = 0.0
    for combo in itertools.product(*(outcomes[d] for d in sorted(p))):
        prob = 1.0
        for d, r in zip(sorted(p), combo):
            prob *= p[d][r] if r is not None else 1 - sum(p[d])
        # accepted = longest path of the tree matching the target's ranks
        best, path = 0, ()
        for r in combo:
            if r is None or path + (r,) not in shape.paths:
                break
            path = path + (r,)
            best += 1
        total += prob * best
    got = expected_accepted(shape, lambda d, r: p[d][r] if r < len(p[d]) else 0.0)
    assert got == pytest.approx(total, abs=1e-12)
    assert expected_accepted(chain(3), lambda d, r: 1.0) == 3.0
