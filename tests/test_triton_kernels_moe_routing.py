"""The one-launch routing kernel against select_experts, for every variant it covers.

Without CUDA the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1 is set
before the kernel module is imported). tests/gpu/test_moe_decode_gpu.py runs the same
checks at the real models' shapes.
"""

from __future__ import annotations

import os
from unittest import mock

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from radixserve.layers.moe import RoutingConfig, route_experts, select_experts  # noqa: E402
from radixserve.layers.moe.topk_triton import (  # noqa: E402
    fused_routing_covers, fused_select_experts)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# A token whose k-th and (k+1)-th candidates (or topk_group-th and next groups) are this
# close, relative, may be chosen either way by two correct float32 implementations.
NEAR_TIE = 1e-5


def _reference_choice(logits: torch.Tensor, cfg: RoutingConfig,
                      bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What select_experts ranks: the experts' choice values, and the group scores."""
    scores = logits.float().softmax(-1) if cfg.scoring == "softmax" else logits.float().sigmoid()
    choice = scores if bias is None else scores + bias.float()
    if not cfg.num_expert_group or cfg.num_expert_group == 1:
        return choice, None
    groups = choice.view(choice.shape[0], cfg.num_expert_group, -1)
    group_scores = (groups.max(-1).values if cfg.group_score == "max"
                    else groups.topk(2, dim=-1).values.sum(-1))
    return choice, group_scores


def _stable_topk(values: torch.Tensor, k: int, dim: int = -1):
    """torch.topk's result with ties in ascending index order."""
    order = torch.sort(values, dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
    return torch.return_types.topk((values.gather(dim, order), order))


def select_experts_lowest_first(logits: torch.Tensor, cfg: RoutingConfig,
                                bias: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """select_experts with torch.topk made to take tied values in ascending index order
    (torch.topk itself leaves that order unspecified): the kernel's tie rule."""
    with mock.patch.object(torch, "topk", _stable_topk):
        return select_experts(logits, cfg, bias)


def _near_tie(values: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: whether its sorted values come within NEAR_TIE (but are not equal:
    exact ties follow the tie rule) at the cut after `upto`, and anywhere before it."""
    top = values.sort(-1, descending=True).values
    gap = top[:, :-1] - top[:, 1:]
    near = (gap > 0) & (gap <= NEAR_TIE * top[:, :-1].abs())
    cut = near[:, upto - 1] if upto < values.shape[1] else torch.zeros_like(near[:, 0])
    return cut, near[:, :upto - 1].any(-1)


def weights_for(ids: torch.Tensor, logits: torch.Tensor, cfg: RoutingConfig) -> torch.Tensor:
    """The weights select_experts gives a token for these ids."""
    scores = logits.float().softmax(-1) if cfg.scoring == "softmax" else logits.float().sigmoid()
    w = scores.gather(1, ids.long())
    if cfg.renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * cfg.routed_scaling_factor


def assert_same_routing(logits: torch.Tensor, cfg: RoutingConfig, bias: torch.Tensor | None,
                        got: tuple[torch.Tensor, torch.Tensor]) -> None:
    """ids identical to the reference's, slot by slot, on every token without a near
    tie (ties broken lowest id first); as a set where two chosen experts nearly tie;
    not compared where the k-th and the next nearly tie, at most 1% of the tokens. The
    weights are the reference's for the chosen ids, within 1e-6."""
    weights, ids = got
    ref_w, ref_ids = select_experts_lowest_first(logits, cfg, bias)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == ref_ids.shape
    choice, group_scores = _reference_choice(logits, cfg, bias)
    cut, inside = _near_tie(choice, cfg.top_k)
    if group_scores is not None:
        group_cut, group_inside = _near_tie(group_scores, cfg.topk_group)
        cut, inside = cut | group_cut, inside | group_inside
    assert int(cut.sum()) <= 1 + logits.shape[0] // 100
    exact = ~cut & ~inside
    assert torch.equal(ids[exact], ref_ids[exact])
    torch.testing.assert_close(weights[exact], ref_w[exact], rtol=1e-6, atol=1e-6)
    loose = ~cut & inside
    assert torch.equal(ids[loose].sort(-1).values, ref_ids[loose].sort(-1).values)
    torch.testing.assert_close(weights, weights_for(ids, logits, cfg), rtol=1e-6, atol=1e-6)
    assert all(len(set(row)) == cfg.top_k for row in ids.tolist())


QWEN = RoutingConfig(4, renormalize=True)
V2_LITE = RoutingConfig(3, routed_scaling_factor=1.5)
V2 = RoutingConfig(3, num_expert_group=4, topk_group=2, routed_scaling_factor=1.5)
V3 = RoutingConfig(4, scoring="sigmoid", renormalize=True, num_expert_group=4, topk_group=2,
                   group_score="top2_sum", routed_scaling_factor=2.5)

VARIANTS = [
    # (config, experts, bias?)
    (QWEN, 16, False),
    (V2_LITE, 12, False),  # E not a power of two
    (V2, 16, False),
    (V3, 16, True),
    (RoutingConfig(3, scoring="sigmoid", renormalize=True, routed_scaling_factor=2.0), 10, True),
    (RoutingConfig(2, scoring="sigmoid"), 9, False),  # sigmoid, no renormalisation
    (RoutingConfig(3, renormalize=True), 8, True),  # softmax plus a bias: chosen on scores
    (RoutingConfig(2, num_expert_group=3, topk_group=2, group_score="top2_sum"), 12, False),
    (RoutingConfig(6, renormalize=True), 6, False),  # top-k = every expert
    (RoutingConfig(8, scoring="sigmoid", renormalize=True, num_expert_group=4, topk_group=2,
                   group_score="top2_sum"), 16, True),  # k = all experts of the kept groups
]


@pytest.mark.parametrize("cfg,experts,with_bias", VARIANTS)
@pytest.mark.parametrize("tokens", [1, 3, 37])
def test_routing_kernel_matches_select_experts(cfg: RoutingConfig, experts: int,
                                               with_bias: bool, tokens: int) -> None:
    g = torch.Generator().manual_seed(tokens * 100 + experts)
    logits = (torch.randn(tokens, experts, generator=g) * 2).to(DEVICE)
    bias = (torch.randn(experts, generator=g) * 0.3).to(DEVICE) if with_bias else None
    assert fused_routing_covers(cfg, experts)
    assert_same_routing(logits, cfg, bias, fused_select_experts(logits, cfg, bias))


@pytest.mark.parametrize("cfg,with_bias", [(QWEN, False), (V3, True)])
def test_routing_kernel_bf16_logits_and_many_programs(cfg: RoutingConfig,
                                                     with_bias: bool) -> None:
    """bf16 logits (Qwen's router output dtype, with many exact ties) converted as
    select_experts converts them; 300 experts make 4-token programs, so 7 tokens span two, the last one short;
    a strided logits view is read in place."""
    experts = 300 if cfg.num_expert_group is None else 320
    g = torch.Generator().manual_seed(7)
    wide = torch.randn(7, experts + 5, generator=g).to(DEVICE, torch.bfloat16)
    logits = wide[:, :experts]
    bias = (torch.randn(experts, generator=g) * 0.3).to(DEVICE) if with_bias else None
    assert_same_routing(logits, cfg, bias, fused_select_experts(logits, cfg, bias))


@pytest.mark.parametrize("cfg,with_bias", [(QWEN, False), (V2, False), (V3, True),
                                            (RoutingConfig(3, scoring="sigmoid"), True)])
def test_ties_go_to_the_lowest_expert_and_group(cfg: RoutingConfig, with_bias: bool) -> None:
    """Logits of 0 to 3 and biases of 0 or 0.5: exact ties between experts and between
    groups everywhere, all broken lowest id (group) first. (No negative logits: with
    sigmoid(a) + sigmoid(-a) = 1, two groups' top-2 sums would tie up to rounding, which
    two implementations may round apart.)"""
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 4, (40, 16), generator=g).float().to(DEVICE)
    logits[0] = 0.0  # one token where every expert ties
    bias = (torch.randint(0, 2, (16,), generator=g).float() * 0.5).to(DEVICE) if with_bias \
        else None
    weights, ids = fused_select_experts(logits, cfg, bias)
    ref_w, ref_ids = select_experts_lowest_first(logits, cfg, bias)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-6)


def test_route_experts_uses_the_reference_off_cuda_and_for_uncovered_configs() -> None:
    """On CPU route_experts is select_experts exactly; configs the kernel leaves out
    are reported so, and the kernel refuses them."""
    logits = torch.randn(5, 16)
    for cfg in (QWEN, V2):
        got, ref = route_experts(logits, cfg), select_experts(logits, cfg)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    uncovered = [(RoutingConfig(17), 16),  # k above E
                 (RoutingConfig(2, num_expert_group=3, topk_group=1), 16),  # E % groups
                 (RoutingConfig(2, num_expert_group=4, topk_group=5), 16),  # keep > groups
                 (RoutingConfig(5, num_expert_group=4, topk_group=1), 16),  # k > kept
                 (RoutingConfig(1, num_expert_group=4, topk_group=2, group_score="top2_sum"), 4),
                 (RoutingConfig(2), 2048)]
    for cfg, experts in uncovered:
        assert not fused_routing_covers(cfg, experts)
    with pytest.raises(ValueError, match="does not cover"):
        fused_select_experts(logits.to(DEVICE), RoutingConfig(17))


def test_routing_kernel_no_tokens() -> None:
    weights, ids = fused_select_experts(torch.empty(0, 16, device=DEVICE), QWEN)
    assert weights.shape == ids.shape == (0, 4)
