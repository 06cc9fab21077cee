"""The verification rule of speculative decoding (speculative/verify.py), on hand-made
logits: greedy chains keep exactly the target's argmax tokens, and sampled chains keep
the target's distribution (chi-square tests with a stated significance level)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from radixserve.core.req import Req
from radixserve.core.sampling_params import SamplingParams
from radixserve.speculative.verify import AcceptRule, verify_chain

VOCAB = 6
# A test fails at random with probability ALPHA when the rule is right.
ALPHA = 1e-4


def _req(**sp) -> Req:
    return Req("r", [1], SamplingParams(**sp))


def _peaked(tokens: list[int]) -> torch.Tensor:
    """Rows whose argmax is tokens[j]."""
    logits = torch.randn(len(tokens), VOCAB)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] += 10.0
    return logits


@pytest.mark.parametrize("agree", [0, 1, 2, 3])
def test_greedy_keeps_the_argmax_chain(agree):
    target = [4, 1, 5, 2]  # the target's argmax after the last token, d_1, d_2, d_3
    drafts = target[:agree] + [(t + 1) % VOCAB for t in target[agree:3]]
    out = verify_chain(_peaked(target), [_req(top_k=1)], [drafts], AcceptRule())
    assert out == [target[:agree + 1]]


def test_greedy_batch_with_empty_drafts():
    reqs = [_req(top_k=1) for _ in range(3)]
    drafts = [[], [3, 3], [0]]
    rows = [[2], [3, 3, 1], [5, 0]]
    logits = torch.cat([_peaked(r) for r in rows])
    out = verify_chain(logits, reqs, drafts, AcceptRule())
    assert out == [[2], [3, 3, 1], [5]]


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=-1)


def test_sampled_chain_keeps_the_target_distribution():
    torch.manual_seed(0)
    n = 8000
    temperature = 0.7
    row_logits = torch.randn(3, VOCAB) * 1.5  # after the last token, after d_1, after d_2
    drafts = [2, 4]
    # Make the drafts likely enough that both acceptance and rejection are common.
    row_logits[0, 2] += 1.0
    row_logits[1, 4] += 1.0
    reqs = [_req(temperature=temperature) for _ in range(n)]
    logits = row_logits.repeat(n, 1)
    out = verify_chain(logits, reqs, [drafts] * n, AcceptRule())
    p = _probs(row_logits, temperature)
    first = torch.tensor([o[0] for o in out])
    _assert_distribution(first, p[0])
    # Given the first token was d_1, the second follows the row after d_1.
    second = torch.tensor([o[1] for o in out if o[0] == drafts[0]])
    _assert_distribution(second, p[1])
    third = torch.tensor([o[2] for o in out if o[:2] == drafts])
    _assert_distribution(third, p[2])
    accepted = [len(o) - 1 for o in out]
    assert 0 < sum(accepted) < 2 * n  # both outcomes occurred


def test_sampled_with_top_k_never_emits_a_filtered_token():
    torch.manual_seed(1)
    n = 4000
    row_logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0]] * 2)
    reqs = [_req(temperature=1.0, top_k=2) for _ in range(n)]
    # Draft 5 is outside the top 2: always rejected; the residual is the top 2.
    out = verify_chain(row_logits.repeat(n, 1), reqs, [[5]] * n, AcceptRule())
    first = torch.tensor([o[0] for o in out])
    assert all(len(o) == 1 for o in out)
    top2 = torch.softmax(torch.tensor([3.0, 2.0]), dim=0)
    _assert_distribution(first, torch.cat([top2, torch.zeros(VOCAB - 2)]))


def test_threshold_single_accepts_likely_drafts():
    row_logits = torch.tensor([[0.0, 5.0, 0, 0, 0, 0], [0, 0, 5.0, 0, 0, 0]])
    rule = AcceptRule(threshold_single=0.5, threshold_acc=1.0)
    out = verify_chain(row_logits, [_req(temperature=1.0)], [[1]], rule)
    assert out[0][0] == 1  # p(1) is about 0.97 >= 0.5: accepted whatever the coin


def _assert_distribution(samples: torch.Tensor, p: torch.Tensor) -> None:
    counts = torch.bincount(samples, minlength=VOCAB).double()
    keep = p > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    pd = p.double()[keep]
    expected = pd / pd.sum() * counts.sum()
    stat = chisquare(counts[keep].numpy(), expected.numpy())
    assert stat.pvalue > ALPHA, f"chi-square p={stat.pvalue:.2e}: {counts} vs {expected}"
