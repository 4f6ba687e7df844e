from apar_spec.experiments.build.measure_embedded import list_items, well_formed


def test_well_formed_lists():
    good = "Here are 3 tips:\n1. Sleep: Go to bed.\n2. Food: Eat well.\n3. Walk: Move daily."
    assert list_items(good) == [(1, "sleep"), (2, "food"), (3, "walk")]
    assert well_formed(good)
    assert not well_formed(good.replace("2. Food", "3. Food"))  # numbering out of order
    assert not well_formed(good.replace("Walk", "Sleep"))  # duplicated item
    assert not well_formed("17 plus 25 is 42.")  # no list at all
    assert not well_formed("1. A: x\n3. B: y")  # a gap
