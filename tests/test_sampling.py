"""Tests of the accept phase (apar_spec.decoding.sampling) on hand-built tiny vocabularies.

Deterministic tests pin each rule's corner cases; the statistical tests check the
one property that matters for sampling: whatever the draft proposes, the emitted
tokens follow the target distribution. They use a fixed seed, so they are
deterministic, and each comes with a power check showing the same test rejects a
classic wrong implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from apar_spec.decoding.sampling import (
    Acceptance,
    SamplingConfig,
    greedy_accept,
    rejection_accept,
    sample,
    to_probs,
    warp_logits,
)

V = 8  # tiny vocabulary for hand-built cases
GREEDY = SamplingConfig()


# ---------------------------------------------------------------- helpers


def target_logits_with_argmax(argmax: list[list[int]], vocab: int = V) -> torch.Tensor:
    """[n, k+1, V] logits whose argmax at [i, j] is argmax[i][j] (others lower, distinct)."""
    n, k1 = len(argmax), len(argmax[0])
    base = torch.linspace(0.0, 1.0, vocab)  # distinct background values, all < 5
    logits = base.repeat(n, k1, 1).clone()
    for i, row in enumerate(argmax):
        for j, tok in enumerate(row):
            logits[i, j, tok] = 5.0
    return logits


def one_hot_probs(tokens: list[list[int]], vocab: int = V) -> torch.Tensor:
    """[n, k+1, V] one-hot target probabilities."""
    return to_probs(target_logits_with_argmax(tokens, vocab), GREEDY)


def chi_square_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit of ``tokens`` [N] to ``probs`` [V].

    Cells with zero expected probability are excluded from the statistic; callers
    assert separately that they were never emitted. The p-value is the chi-square
    survival function, i.e. the regularised upper incomplete gamma Q(df/2, x/2).
    """
    probs = probs.double()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    support = probs > 0
    expected = probs[support] * tokens.numel()
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    df = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2.0))


def draft_from(q: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """[n] draft tokens sampled from one distribution q [V]."""
    return sample(q.expand(n, -1), generator=gen)


# ---------------------------------------------------------------- SamplingConfig


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_p": 0.0},
        {"top_p": -0.5},
        {"top_p": 1.5},
        {"top_k": -1},
        {"top_k": 2.5},
    ],
)
def test_invalid_config_raises_one_line_value_error(kwargs: dict) -> None:
    with pytest.raises(ValueError) as err:
        SamplingConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_config_greedy_flag_and_defaults() -> None:
    assert SamplingConfig().greedy
    assert SamplingConfig(temperature=0.0, top_k=3, top_p=0.5).greedy
    assert not SamplingConfig(temperature=0.7).greedy


# ---------------------------------------------------------------- warp_logits / to_probs


def test_temperature_scales_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    warped = warp_logits(logits, SamplingConfig(temperature=2.0))
    torch.testing.assert_close(warped, logits / 2.0)
    # Higher temperature flattens the distribution: the top token loses mass.
    cold = to_probs(logits, SamplingConfig(temperature=0.5))
    hot = to_probs(logits, SamplingConfig(temperature=2.0))
    assert cold[0, 0] > to_probs(logits, SamplingConfig(temperature=1.0))[0, 0] > hot[0, 0]
    torch.testing.assert_close(hot, (logits / 2.0).softmax(-1))


def test_top_k_keeps_exactly_the_k_largest() -> None:
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.5, 0.9, -0.2], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    warped = warp_logits(logits, SamplingConfig(temperature=1.0, top_k=3))
    kept = torch.isfinite(warped)
    assert kept.sum(-1).tolist() == [3, 3]
    assert kept[0].nonzero().flatten().tolist() == [1, 3, 4]
    assert kept[1].nonzero().flatten().tolist() == [0, 1, 2]
    torch.testing.assert_close(warped[kept], logits[kept])  # survivors untouched
    # top_k >= V is a no-op.
    no_op = warp_logits(logits, SamplingConfig(temperature=1.0, top_k=99))
    torch.testing.assert_close(no_op, logits)


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    # Probabilities 0.5, 0.25, 0.15, 0.1, shuffled so the scatter back is exercised.
    probs = torch.tensor([0.15, 0.5, 0.1, 0.25])
    logits = probs.log()[None]
    cases = {0.1: [1], 0.45: [1], 0.7: [1, 3], 0.74: [1, 3], 0.85: [0, 1, 3], 0.95: [0, 1, 2, 3]}
    for top_p, expected in cases.items():
        warped = warp_logits(logits, SamplingConfig(temperature=1.0, top_p=top_p))
        assert torch.isfinite(warped[0]).nonzero().flatten().tolist() == expected, top_p
        kept_probs = to_probs(logits, SamplingConfig(temperature=1.0, top_p=top_p))[0]
        torch.testing.assert_close(kept_probs.sum(), torch.tensor(1.0))
        assert float(probs[expected].sum()) >= top_p  # the kept set reaches p ...
        assert float(probs[expected[:-1]].sum()) < top_p  # ... and is the smallest that does


def test_warp_order_temperature_then_top_k_then_top_p() -> None:
    logits = torch.tensor([[0.4, 0.35, 0.25]]).log()
    # top-p measured after top-k renormalised {0.4, 0.35} -> {0.533, 0.467}: 0.533 >= 0.5
    # keeps one token (top-p before top-k would keep two).
    warped = warp_logits(logits, SamplingConfig(temperature=1.0, top_k=2, top_p=0.5))
    assert torch.isfinite(warped).sum() == 1
    # top-p measured after temperature: hot flattens 0.6/0.3/0.1 so more survive.
    logits = torch.tensor([[0.6, 0.3, 0.1]]).log()
    cold = warp_logits(logits, SamplingConfig(temperature=1.0, top_p=0.55))
    hot = warp_logits(logits, SamplingConfig(temperature=10.0, top_p=0.55))
    assert torch.isfinite(cold).sum() == 1
    assert torch.isfinite(hot).sum() == 2


def test_warp_never_empties_a_row_and_does_not_modify_input() -> None:
    logits = torch.tensor([[-math.inf, 3.0, -math.inf, -math.inf], [1.0, 1.0, 1.0, 1.0]])
    before = logits.clone()
    for cfg in [
        SamplingConfig(temperature=1.0, top_p=1e-6),
        SamplingConfig(temperature=0.3, top_k=1, top_p=1e-6),
        SamplingConfig(temperature=1.0, top_k=1),
        GREEDY,
    ]:
        warped = warp_logits(logits, cfg)
        assert torch.isfinite(warped).any(-1).all(), cfg
        assert warped[0].argmax() == 1
        assert not torch.isnan(to_probs(logits, cfg)).any(), cfg
    torch.testing.assert_close(logits, before)


def test_greedy_is_one_hot_of_argmax_and_dtypes() -> None:
    logits = torch.tensor([[0.1, 2.0, -3.0, 1.9], [7.0, 7.0, 1.0, 0.0]])  # row 1 ties -> first
    probs = to_probs(logits, GREEDY)
    expected = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert probs.dtype == torch.float32
    assert torch.equal(probs, expected)
    assert torch.equal(warp_logits(logits, GREEDY).softmax(-1), expected)
    assert to_probs(logits.double(), GREEDY).dtype == torch.float64
    assert to_probs(logits.bfloat16(), SamplingConfig(temperature=1.0)).dtype == torch.float32
    assert to_probs(logits.double(), SamplingConfig(temperature=1.0)).dtype == torch.float64
    # works on [n, k+1, V] blocks as the verify phase produces them
    assert to_probs(logits.expand(3, 2, 4), GREEDY).shape == (3, 2, 4)


def test_sample_shapes_and_zero_probability() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0]]).expand(5000, -1)
    tokens = sample(probs, generator=gen)
    assert tokens.shape == (5000,) and tokens.dtype == torch.long
    assert set(tokens.unique().tolist()) == {1, 2}
    assert sample(torch.eye(4)).tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------- greedy_accept


def test_greedy_full_accept_gives_bonus_after_last_draft() -> None:
    logits = target_logits_with_argmax([[3, 1, 4, 6]])
    acc = greedy_accept(torch.tensor([[3, 1, 4]]), torch.tensor([3]), logits)
    assert isinstance(acc, Acceptance)
    assert acc.num_accepted.tolist() == [3]
    assert acc.bonus.tolist() == [6]
    assert acc.num_accepted.dtype == torch.long and acc.bonus.dtype == torch.long


def test_greedy_first_and_mid_position_reject() -> None:
    logits = target_logits_with_argmax([[3, 1, 4, 6], [3, 1, 4, 6], [3, 1, 4, 6]])
    drafts = torch.tensor([[2, 1, 4], [3, 1, 5], [3, 0, 4]])  # reject at 0, at 2, at 1
    acc = greedy_accept(drafts, torch.tensor([3, 3, 3]), logits)
    assert acc.num_accepted.tolist() == [0, 2, 1]
    # The bonus is the target's token at the first mismatch; a later match (row 2,
    # position 2) does not count once the prefix is broken.
    assert acc.bonus.tolist() == [3, 4, 1]


def test_greedy_variable_lengths_including_zero() -> None:
    logits = target_logits_with_argmax([[3, 1, 4, 6], [2, 7, 0, 5], [3, 1, 4, 6], [0, 0, 0, 0]])
    drafts = torch.tensor([[3, 1, -1], [2, -1, -1], [-1, -1, -1], [0, 0, -1]])
    lens = torch.tensor([2, 1, 0, 2])
    acc = greedy_accept(drafts, lens, logits)
    assert acc.num_accepted.tolist() == [2, 1, 0, 2]
    assert acc.bonus.tolist() == [4, 7, 3, 0]
    # Padding past draft_lens is ignored even if it happens to match the target.
    acc = greedy_accept(torch.tensor([[3, 1, 4]]), torch.tensor([1]), logits[:1])
    assert acc.num_accepted.tolist() == [1] and acc.bonus.tolist() == [1]


def test_greedy_with_no_drafts_is_plain_argmax() -> None:
    logits = torch.randn(4, 1, V, generator=torch.Generator().manual_seed(1))
    no_drafts = torch.empty(4, 0, dtype=torch.long)
    acc = greedy_accept(no_drafts, torch.zeros(4, dtype=torch.long), logits)
    assert acc.num_accepted.tolist() == [0, 0, 0, 0]
    assert torch.equal(acc.bonus, logits[:, 0].argmax(-1))


def test_shape_mismatch_raises() -> None:
    drafts, lens = torch.tensor([[1, 2]]), torch.tensor([2])
    with pytest.raises(ValueError, match="k\\+1"):
        greedy_accept(drafts, lens, torch.zeros(1, 2, V))  # needs k+1 = 3 positions
    with pytest.raises(ValueError, match="draft_lens"):
        greedy_accept(drafts, torch.tensor([2, 2]), torch.zeros(1, 3, V))
    with pytest.raises(ValueError, match="draft_probs"):
        rejection_accept(drafts, lens, torch.zeros(1, 3, V), torch.zeros(1, 3, V))


# ---------------------------------------------------------------- rejection_accept: corner cases


def test_rejection_on_one_hot_target_equals_greedy() -> None:
    gen = torch.Generator().manual_seed(2)
    n, k = 400, 4
    logits = torch.randn(n, k + 1, 5, generator=gen)
    target_tokens = logits.argmax(-1)
    # drafts agree with the target most of the time so every acceptance length occurs
    noise = torch.randint(0, 5, (n, k), generator=gen)
    agree = torch.rand(n, k, generator=gen) < 0.7
    drafts = torch.where(agree, target_tokens[:, :k], noise)
    lens = torch.randint(0, k + 1, (n,), generator=gen)
    drafts = torch.where(torch.arange(k) < lens[:, None], drafts, -1)
    expected = greedy_accept(drafts, lens, logits)
    assert set(expected.num_accepted.tolist()) == set(range(k + 1))
    p = to_probs(logits, GREEDY)
    q_greedy = torch.zeros(n, k, 5).scatter_(2, drafts.clamp(min=0)[..., None], 1.0)
    for q in (None, q_greedy):
        got = rejection_accept(drafts, lens, q, p, generator=gen)
        assert torch.equal(got.num_accepted, expected.num_accepted)
        assert torch.equal(got.bonus, expected.bonus)


def test_rejection_q_equal_p_always_accepts() -> None:
    gen = torch.Generator().manual_seed(3)
    n, k = 3000, 3
    p = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0]).expand(n, k + 1, -1)
    drafts = sample(p[:, :k].reshape(-1, 5), generator=gen).reshape(n, k)
    lens = torch.randint(0, k + 1, (n,), generator=gen)
    acc = rejection_accept(drafts, lens, p[:, :k].clone(), p, generator=gen)
    assert torch.equal(acc.num_accepted, lens)
    assert (acc.bonus != 4).all()


@pytest.mark.parametrize("deterministic", [True, False])
def test_rejection_zero_target_probability_always_rejects(deterministic: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    n = 3000
    p = torch.tensor([0.0, 0.5, 0.3, 0.2, 0.0])  # the draft proposes token 0, p(0) = 0
    target = p.expand(n, 3, -1)
    drafts = torch.zeros(n, 2, dtype=torch.long)
    q = None if deterministic else torch.tensor([0.9, 0.0, 0.0, 0.0, 0.1]).expand(n, 2, -1)
    acc = rejection_accept(drafts, torch.full((n,), 2), q, target, generator=gen)
    assert (acc.num_accepted == 0).all()
    assert (acc.bonus != 0).all()  # never re-emit the rejected token
    assert (acc.bonus != 4).all()  # nor any token the target gives 0
    assert set(acc.bonus.tolist()) == {1, 2, 3}


def test_rejection_stops_at_first_impossible_position() -> None:
    # position 0: q == p (always accepted); position 1: p(d) = 0 (always rejected)
    gen = torch.Generator().manual_seed(5)
    n = 1000
    target = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.6, 0.4], [0.2, 0.2, 0.6]]).expand(n, -1, -1)
    q = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]).expand(n, -1, -1)
    drafts = torch.tensor([[1, 0]]).expand(n, -1)
    acc = rejection_accept(drafts, torch.full((n,), 2), q, target, generator=gen)
    assert (acc.num_accepted == 1).all()
    assert set(acc.bonus.tolist()) == {1, 2}  # from p at position 1 minus the rejected token 0


def test_rejection_all_accepted_bonus_from_position_draft_len() -> None:
    # one-hot targets make every choice deterministic; rows have 0..3 drafts
    target = one_hot_probs([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    drafts = torch.tensor([[1, 2, 3], [1, 2, -1], [1, -1, -1], [-1, -1, -1]])
    acc = rejection_accept(drafts, torch.tensor([3, 2, 1, 0]), None, target)
    assert acc.num_accepted.tolist() == [3, 2, 1, 0]
    assert acc.bonus.tolist() == [4, 3, 2, 1]


def test_rejection_with_no_drafts_is_plain_sampling() -> None:
    no_drafts, zero = torch.empty(3, 0, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    target = one_hot_probs([[5], [0], [7]])  # [3, 1, V]
    for q in (None, torch.empty(3, 0, V)):
        acc = rejection_accept(no_drafts, zero, q, target)
        assert acc.num_accepted.tolist() == [0, 0, 0]
        assert acc.bonus.tolist() == [5, 0, 7]
    gen = torch.Generator().manual_seed(8)
    p = torch.tensor([0.0, 0.7, 0.0, 0.3]).expand(4000, 1, -1)
    no_drafts, zero = torch.empty(4000, 0, dtype=torch.long), torch.zeros(4000, dtype=torch.long)
    acc = rejection_accept(no_drafts, zero, None, p, gen)
    assert set(acc.bonus.tolist()) == {1, 3}
    assert abs(float((acc.bonus == 1).double().mean()) - 0.7) < 0.03


def test_rejection_is_reproducible_with_a_seeded_generator() -> None:
    n, k = 500, 3
    p = torch.tensor([0.3, 0.3, 0.2, 0.2]).expand(n, k + 1, -1)
    q = torch.tensor([0.1, 0.1, 0.1, 0.7]).expand(n, k, -1)
    drafts = torch.full((n, k), 3)
    lens = torch.full((n,), k)
    a = rejection_accept(drafts, lens, q, p, generator=torch.Generator().manual_seed(6))
    b = rejection_accept(drafts, lens, q, p, generator=torch.Generator().manual_seed(6))
    c = rejection_accept(drafts, lens, q, p, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.num_accepted, b.num_accepted) and torch.equal(a.bonus, b.bonus)
    assert not (torch.equal(a.num_accepted, c.num_accepted) and torch.equal(a.bonus, c.bonus))


# ---------------------------------------------------------------- rejection_accept: statistics

N_DRAWS = 40_000
P_MIN = 1e-3  # fixed seed, so deterministic; a correct sampler passes with huge margin

# Target p per position and a deliberately bad draft q: q puts mass where p has
# none (token 5 at position 0), none where p has some (token 5 at position 1),
# and is far from p elsewhere.
P = torch.tensor(
    [
        [0.30, 0.25, 0.20, 0.15, 0.10, 0.00],
        [0.05, 0.10, 0.50, 0.05, 0.00, 0.30],
        [0.10, 0.10, 0.10, 0.10, 0.30, 0.30],
    ]
)
Q = torch.tensor(
    [
        [0.02, 0.05, 0.03, 0.10, 0.40, 0.40],
        [0.50, 0.20, 0.05, 0.05, 0.20, 0.00],
    ]
)


def _speculate(gen: torch.Generator, deterministic: bool = False):
    """One vectorised round over N_DRAWS rows with draft lengths 0..2 mixed."""
    n, k = N_DRAWS, 2
    if deterministic:  # an n-gram-like proposer: fixed tokens, cycling over rows
        drafts = torch.stack([torch.arange(n) % 6, (torch.arange(n) // 6) % 6], dim=1)
    else:
        drafts = torch.stack([draft_from(Q[0], n, gen), draft_from(Q[1], n, gen)], dim=1)
    lens = torch.randint(0, k + 1, (n,), generator=gen)
    drafts = torch.where(torch.arange(k) < lens[:, None], drafts, -1)
    q = None if deterministic else Q.expand(n, -1, -1)
    acc = rejection_accept(drafts, lens, q, P.expand(n, -1, -1), generator=gen)
    first = torch.where(acc.num_accepted >= 1, drafts[:, 0], acc.bonus)
    return drafts, lens, acc, first


def test_first_emitted_token_follows_target_with_bad_draft() -> None:
    gen = torch.Generator().manual_seed(10)
    drafts, lens, acc, first = _speculate(gen)
    assert (first != 5).all()  # p(5) = 0 at position 0, although q drafts it 40% of the time
    assert chi_square_pvalue(first, P[0]) > P_MIN
    # Power check: emitting the drafts as-is, or resampling from p instead of the
    # residual max(p - q, 0) after a rejection, are clearly rejected by the same test.
    has_draft = lens >= 1
    assert chi_square_pvalue(drafts[has_draft, 0], P[0]) < 1e-12
    naive = torch.where(acc.num_accepted >= 1, drafts[:, 0], sample(P[0].expand(N_DRAWS, -1), gen))
    assert chi_square_pvalue(naive[has_draft], P[0]) < 1e-12


def test_second_token_given_first_accepted_follows_target() -> None:
    gen = torch.Generator().manual_seed(11)
    drafts, lens, acc, _ = _speculate(gen)
    accepted_first = acc.num_accepted >= 1
    assert accepted_first.sum() > 5000  # enough draws for the test below
    second = torch.where(acc.num_accepted >= 2, drafts[:, 1], acc.bonus)[accepted_first]
    assert (second != 4).all()  # p(4) = 0 at position 1
    assert chi_square_pvalue(second, P[1]) > P_MIN
    # Rows that accepted both drafts draw their bonus from position 2.
    all_accepted = acc.num_accepted == 2
    assert all_accepted.sum() > 800  # ~ 40k/3 * 0.30 * 0.25
    assert chi_square_pvalue(acc.bonus[all_accepted], P[2]) > P_MIN


def test_deterministic_proposals_follow_target() -> None:
    gen = torch.Generator().manual_seed(12)
    drafts, lens, acc, first = _speculate(gen, deterministic=True)
    assert (first != 5).all()
    assert chi_square_pvalue(first, P[0]) > P_MIN
    # Whatever fixed token was proposed, the emitted token still follows p.
    for proposed in range(6):
        rows = (lens >= 1) & (drafts[:, 0] == proposed)
        assert rows.sum() > 3000
        assert chi_square_pvalue(first[rows], P[0]) > P_MIN, proposed
    accepted_first = acc.num_accepted >= 1
    second = torch.where(acc.num_accepted >= 2, drafts[:, 1], acc.bonus)[accepted_first]
    assert chi_square_pvalue(second, P[1]) > P_MIN
