"""MoE routing and the fused MoE Triton kernel (CPU interpreter) against references."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from radixserve.layers.moe import FusedMoE, RoutingConfig, fused_experts_reference, select_experts
from radixserve.layers.moe.fused_moe_triton import fused_experts_triton, moe_align_block_size
from radixserve.layers.moe import tuned_configs
from radixserve.layers.moe.tuned_configs import (MoEKernelConfig, format_tuned,
                                                 get_moe_config, tuned_from_json,
                                                 tuned_tables)

# On a CUDA machine the same tests run the compiled kernel.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _experts(num_experts: int, hidden: int, inter: int, seed: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_experts, 2 * inter, hidden, generator=g) * 0.2,
            torch.randn(num_experts, hidden, inter, generator=g) * 0.2)


@pytest.mark.parametrize("tokens,top_k,block_m", [(1, 1, 16), (13, 2, 16), (37, 3, 32)])
def test_fused_moe_kernel_matches_reference(tokens: int, top_k: int, block_m: int) -> None:
    """Awkward sizes (hidden 40, intermediate 24: partial K and N tiles), and routing to
    only 5 of 7 experts, so two experts get no token at all."""
    num_experts, hidden, inter = 7, 40, 24
    w13, w2 = _experts(num_experts, hidden, inter)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=g)
    ids = torch.stack([torch.randperm(5, generator=g)[:top_k] for _ in range(tokens)]).int()
    weights = torch.rand(tokens, top_k, generator=g)
    cfg = MoEKernelConfig(block_m=block_m, block_n=16, block_k=16, group_m=2, num_warps=1,
                          num_stages=1)
    args = [t.to(DEVICE) for t in (x, w13, w2, weights, ids)]
    got = fused_experts_triton(*args, cfg)
    ref = fused_experts_reference(*args)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_align_groups_by_expert_and_pads_per_block() -> None:
    ids = torch.tensor([[2, 0], [2, 3], [0, 2]], dtype=torch.int32)
    sorted_ids, block_expert, num_padded = moe_align_block_size(ids.to(DEVICE), num_experts=5,
                                                                block_m=4)
    assert int(num_padded) == 12  # experts 0, 2, 3 take one 4-row block each; 1, 4 none
    assert block_expert[:3].tolist() == [0, 2, 3]
    blocks = sorted_ids[:12].view(3, 4).tolist()
    assert blocks == [[1, 4, 6, 6], [0, 2, 5, 6], [3, 6, 6, 6]]  # 6 = T*k: padding


def test_fused_moe_tp_slices_reassemble() -> None:
    """Two ranks' expert slices hold the halves of each expert's intermediate dim, and
    their partial outputs sum to the full layer's."""
    num_experts, hidden, inter = 3, 8, 6
    gate, up = torch.randn(num_experts, inter, hidden), torch.randn(num_experts, inter, hidden)
    down = torch.randn(num_experts, hidden, inter)
    layers = [FusedMoE(num_experts, hidden, inter, tp_rank=r, tp_size=tp)
              for tp in (1, 2) for r in range(tp)]
    for layer in layers:
        for e in range(num_experts):
            layer.weight_loader(layer.w13_weight, gate[e], (e, 0))
            layer.weight_loader(layer.w13_weight, up[e], (e, 1))
            layer.weight_loader(layer.w2_weight, down[e], (e, None))
    full, rank0, rank1 = layers
    assert torch.equal(rank1.w13_weight[:, :3], gate[:, 3:])
    assert torch.equal(rank1.w13_weight[:, 3:], up[:, 3:])
    x, ids = torch.randn(5, hidden), torch.randint(0, num_experts, (5, 2))
    w = torch.rand(5, 2)
    parts = [fused_experts_reference(x, m.w13_weight, m.w2_weight, w, ids) for m in layers]
    torch.testing.assert_close(parts[1] + parts[2], parts[0], rtol=1e-5, atol=1e-5)


def test_tuned_tables_load_round_trip_and_pick_buckets(monkeypatch) -> None:
    """The shipped Qwen3-30B-A3B H100 table loads; what bench_moe.py --write writes
    reads back the same (extra fields ignored); a batch uses the first bucket whose
    max_tokens is >= its tokens, the last bucket beyond."""
    key = ("NVIDIA H100 80GB HBM3", "bfloat16", 128, 768, 2048, 8)
    table = tuned_tables()[key]
    text = format_tuned(key, table, "note", {16: {"ms": 0.1, "tuned_at_tokens": 16}})
    assert tuned_from_json(json.loads(text)) == (key, table)
    monkeypatch.setattr(tuned_configs, "_device_name", lambda index: key[0])
    bounds = sorted(table)
    for tokens, bound in ((1, bounds[0]), (bounds[0], bounds[0]), (bounds[0] + 1, bounds[1]),
                          (bounds[-2] + 1, bounds[-1]), (1 << 20, bounds[-1])):
        got = get_moe_config(128, 768, 2048, 8, tokens, torch.bfloat16, torch.device("cuda", 0))
        assert got == table[bound], tokens
    other = get_moe_config(64, 768, 2048, 8, 1, torch.bfloat16, torch.device("cuda", 0))
    assert other == tuned_configs._default(1, 8, 64, torch.device("cuda", 0))


def test_expert_checkpoint_names() -> None:
    names = FusedMoE.checkpoint_names("model.layers.3.mlp.experts.w13_weight", 2)
    assert names == [("model.layers.3.mlp.experts.0.gate_proj.weight", (0, 0)),
                     ("model.layers.3.mlp.experts.0.up_proj.weight", (0, 1)),
                     ("model.layers.3.mlp.experts.1.gate_proj.weight", (1, 0)),
                     ("model.layers.3.mlp.experts.1.up_proj.weight", (1, 1))]
    assert FusedMoE.checkpoint_names("model.layers.3.mlp.gate.weight", 2) is None


def _same_choice(ours: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor,
                 ids: torch.Tensor) -> None:
    """Compare routings up to the order of the k slots."""
    w, i = ours
    order, ref_order = i.long().argsort(-1), ids.argsort(-1)
    assert torch.equal(i.long().gather(1, order), ids.gather(1, ref_order))
    torch.testing.assert_close(w.gather(1, order), weights.float().gather(1, ref_order))


def test_routing_matches_hf_routers() -> None:
    hidden, experts = 32, 16  # hidden: a multiple of the configs' default head count
    x = torch.randn(50, hidden)
    qwen = tf.Qwen2MoeConfig(hidden_size=hidden, num_experts=experts, num_experts_per_tok=4,
                             norm_topk_prob=True)
    router = tf.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter(qwen)
    router.weight.data.normal_()
    _, w, ids = router(x)
    _same_choice(select_experts(x @ router.weight.T, RoutingConfig(4, renormalize=True)), w, ids)

    v3 = tf.DeepseekV3Config(hidden_size=hidden, n_routed_experts=experts,
                             num_experts_per_tok=4, n_group=4, topk_group=2,
                             routed_scaling_factor=2.5, norm_topk_prob=True)
    router = tf.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(v3)
    router.weight.data.normal_()
    router.e_score_correction_bias.normal_(0, 0.5)
    _, w, ids = router(x)
    cfg = RoutingConfig(4, scoring="sigmoid", renormalize=True, num_expert_group=4,
                        topk_group=2, group_score="top2_sum", routed_scaling_factor=2.5)
    _same_choice(select_experts(x @ router.weight.T, cfg, router.e_score_correction_bias),
                 w, ids)

    v2 = tf.DeepseekV2Config(hidden_size=hidden, n_routed_experts=experts,
                             num_experts_per_tok=3, n_group=4, topk_group=2,
                             topk_method="group_limited_greedy", routed_scaling_factor=1.5)
    router = tf.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter(v2)
    router.weight.data.normal_()
    _, w, ids = router(x)
    cfg = RoutingConfig(3, num_expert_group=4, topk_group=2, routed_scaling_factor=1.5)
    _same_choice(select_experts(x @ router.weight.T, cfg), w, ids)
