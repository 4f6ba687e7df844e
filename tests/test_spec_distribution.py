"""End to end: sampled speculation through the decoder keeps the target's distribution.

One prompt repeated in a batch of 4000 rows is decoded with a deliberately bad
draft LM (another random model) at temperature 1; the marginals of the 2nd and
3rd tokens - which come from accepted drafts, resampled rejections or bonus
tokens - are compared by chi-square with the exact marginals computed from the
target by enumeration.
"""

from __future__ import annotations

import torch
from apar_spec.drafts.draft_lm import DraftModelSpeculator
from micro import VOCAB, micro_model

from apar_spec import generate

N = 4000
PROMPT = [1, 10, 11, 12]


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed ``counts`` against ``probs``; bins expecting < 5 are pooled."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2.0))


@torch.inference_mode()
def exact_marginals(model):
    p1 = model(torch.tensor([PROMPT])).logits[0, -1].softmax(-1)  # [V]
    seqs2 = torch.tensor([PROMPT + [t] for t in range(VOCAB)])  # [V, P+1]
    p2_given = model(seqs2).logits[:, -1].softmax(-1)  # [V, V]
    p2 = p1 @ p2_given  # [V]
    seqs3 = torch.tensor([PROMPT + [a, b] for a in range(VOCAB) for b in range(VOCAB)])  # [V*V, P+2]
    p3_given = model(seqs3).logits[:, -1].softmax(-1).view(VOCAB, VOCAB, VOCAB)  # [t1, t2, V]
    joint12 = p1[:, None] * p2_given  # [t1, t2]
    p3 = torch.einsum("ab,abv->v", joint12, p3_given)  # [V]
    return p2, p3


def assert_exact_marginals(target, outs) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens 2 and 3 of ``outs`` (3-token samples after PROMPT) follow ``target``'s exact
    marginals (chi-square). Returns token 2's counts and exact probabilities for a power check."""
    p2, p3 = exact_marginals(target)
    c2 = torch.bincount(torch.tensor([o.token_ids[1] for o in outs]), minlength=VOCAB).double()
    c3 = torch.bincount(torch.tensor([o.token_ids[2] for o in outs]), minlength=VOCAB).double()
    assert chi_square_p(c2, p2) > 1e-3
    assert chi_square_p(c3, p3) > 1e-3
    return c2, p2


def test_sampled_speculation_matches_exact_target_marginals():
    target = micro_model("llama", seed=11)
    draft = micro_model("llama", seed=12, hidden=16)
    outs = generate(
        target,
        None,
        [PROMPT] * N,
        mode="spec",
        draft=DraftModelSpeculator(draft),
        num_draft_tokens=2,
        max_new_tokens=3,
        temperature=1.0,
        seed=5,
        batch_size=N,
        eos_token_id=[],
    )
    assert all(len(o.token_ids) == 3 for o in outs)
    assert sum(o.stats.accepted for o in outs) > 0.1 * N  # drafts were really accepted (and rejected)
    assert sum(o.stats.accepted for o in outs) < sum(o.stats.drafted for o in outs)
    c2, p2 = assert_exact_marginals(target, outs)
    # the test has power: the draft's own distribution is far from the target's
    with torch.inference_mode():
        q2 = draft(torch.tensor([PROMPT])).logits[0, -1].softmax(-1)
    assert chi_square_p(c2, 0.5 * p2 + 0.5 * q2) < 1e-3


def test_sampled_apar_speculation_keeps_the_fork_biased_distribution():
    """apar+spec at temperature 1 under a fork_bias: the root's 2nd and 3rd tokens (accepted
    drafts, resampled rejections or bonus tokens: the 3rd is often verified at a draft node)
    follow the exact marginals of the rule-processed target: [Child] never, [Fork] offset by
    the bias where allowed, banned right after a [Fork] and where the branch cap leaves no room."""
    from micro import CHILD, FORK

    from apar_spec.decoding.decoder import Decoder
    from apar_spec.decoding.tokens import AparTokens
    from apar_spec.options import DecodeOptions

    target = micro_model("llama", seed=11)
    draft = micro_model("llama", seed=12, hidden=16)
    bias, cap = 2.5, 4

    def processed(logits: torch.Tensor, fork_ok: torch.Tensor, b: float) -> torch.Tensor:
        """[..., V] logits -> probabilities under the decoder's rules (``fork_ok`` [...])."""
        lg = logits.clone()
        lg[..., CHILD] = float("-inf")
        lg[..., FORK] = torch.where(fork_ok, lg[..., FORK] + b, torch.tensor(float("-inf"), dtype=lg.dtype))
        return lg.softmax(-1)

    @torch.inference_mode()
    def root_marginals(b: float) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(VOCAB)
        p1 = processed(target(torch.tensor([PROMPT])).logits[0, -1], torch.tensor(True), b)  # [V]
        l2 = target(torch.tensor([PROMPT + [a] for a in range(VOCAB)])).logits[:, -1]  # [t1, V]
        p2_given = processed(l2, t != FORK, b)  # [t1, V]
        seqs3 = torch.tensor([PROMPT + [a, c] for a in range(VOCAB) for c in range(VOCAB)])  # [V*V, P+2]
        l3 = target(seqs3).logits[:, -1].view(VOCAB, VOCAB, VOCAB)  # [t1, t2, V]
        p3_given = processed(l3, (t != FORK)[None, :].expand(VOCAB, VOCAB), b)  # fork ok after t2 != [Fork]
        joint12 = p1[:, None] * p2_given  # [t1, t2]
        return p1 @ p2_given, torch.einsum("ab,abv->v", joint12, p3_given)

    opts = DecodeOptions(
        max_new_tokens=64,
        max_branch_tokens=cap,
        max_depth=1,
        temperature=1.0,
        seed=5,
        batch_size=N,
        num_draft_tokens=2,
        fork_bias=bias,
    )
    spec = DraftModelSpeculator(draft, mask_ids=(CHILD,))
    results = Decoder(target, opts, AparTokens(FORK, CHILD), True, set(), speculator=spec).run([PROMPT] * N)
    roots = [next(b for b in r.branches if b.parent is None) for r in results]
    assert all(len(b.tokens) == cap for b in roots)
    assert sum(b.tokens[0] == FORK for b in roots) > 0.05 * N  # the bias makes forks common
    assert sum(r.counters.accepted for r in results) > 0.05 * N  # drafts were really accepted (and rejected)
    c2, c3 = (torch.bincount(torch.tensor([b.tokens[i] for b in roots]), minlength=VOCAB).double() for i in (1, 2))
    p2, p3 = root_marginals(bias)
    assert chi_square_p(c2, p2) > 1e-3 and chi_square_p(c3, p3) > 1e-3
    q2, q3 = root_marginals(0.0)  # power: without the bias they are other distributions
    assert chi_square_p(c2, q2) < 1e-3 and chi_square_p(c3, q3) < 1e-3
