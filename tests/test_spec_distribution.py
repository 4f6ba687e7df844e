"""End to end: sampled speculation through the decoder keeps the target's distribution.

One prompt repeated in a batch of 4000 rows is decoded with a deliberately bad
draft LM (another random model) at temperature 1; the marginals of the 2nd and
3rd tokens - which come from accepted drafts, resampled rejections or bonus
tokens - are compared by chi-square with the exact marginals computed from the
target by enumeration.
"""

from __future__ import annotations

import torch
from micro import VOCAB, micro_model

from apar_spec import generate
from apar_spec.drafts.draft_lm import DraftModelSpeculator

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
    outs = generate(target, None, [PROMPT] * N, mode="spec", draft=DraftModelSpeculator(draft), num_draft_tokens=2,
                    max_new_tokens=3, temperature=1.0, seed=5, batch_size=N, eos_token_id=[])
    assert all(len(o.token_ids) == 3 for o in outs)
    assert sum(o.stats.accepted for o in outs) > 0.1 * N  # drafts were really accepted (and rejected)
    assert sum(o.stats.accepted for o in outs) < sum(o.stats.drafted for o in outs)
    c2, p2 = assert_exact_marginals(target, outs)
    # the test has power: the draft's own distribution is far from the target's
    with torch.inference_mode():
        q2 = (draft(torch.tensor([PROMPT])).logits[0, -1].softmax(-1))
    assert chi_square_p(c2, 0.5 * p2 + 0.5 * q2) < 1e-3
