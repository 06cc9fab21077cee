"""The decode-path MoE kernels on CUDA at the real models' shapes: the one-launch routing
kernel against select_experts for every routing family we serve, the small-batch
expert kernels against the reference and the grouped GEMM (TP-sliced intermediate
sizes too), FusedMoE's choice between them, and CUDA-graph capture of routing plus
experts. The CPU versions of these checks are tests/test_triton_kernels_moe_*.py.

Run from the repository root: `python -m pytest tests/gpu/test_moe_decode_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    # Skip before the kernel modules are imported: on CPU they must be decorated in
    # interpreter mode, which the root conftest arranges for the CPU tests.
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from radixserve.layers.moe import (FusedMoE, RoutingConfig, fused_experts,  # noqa: E402
                                   fused_experts_reference, route_experts)
from radixserve.layers.moe.fused_moe import use_small_batch  # noqa: E402
from radixserve.layers.moe.fused_moe_triton import fused_experts_triton  # noqa: E402
from radixserve.layers.moe.small_batch_moe import small_batch_experts  # noqa: E402
from radixserve.layers.moe.topk_triton import fused_select_experts  # noqa: E402
from tests.test_triton_kernels_moe_routing import (  # noqa: E402
    assert_same_routing, select_experts_lowest_first)
from tests.test_triton_kernels_moe_small_batch import moe_operands, rel_err  # noqa: E402

pytestmark = [pytest.mark.gpu]

DEV = torch.device("cuda")

ROUTINGS = {
    # name: (config, experts, correction bias?, logits dtype as the model's router gives)
    "qwen3-30b-a3b": (RoutingConfig(8, renormalize=True), 128, False, torch.bfloat16),
    "qwen1.5-moe-a2.7b": (RoutingConfig(4), 60, False, torch.bfloat16),
    "deepseek-v2-lite": (RoutingConfig(6), 64, False, torch.float32),
    "deepseek-v2": (RoutingConfig(6, num_expert_group=8, topk_group=3,
                                  routed_scaling_factor=16.0), 160, False, torch.float32),
    "deepseek-v3": (RoutingConfig(8, scoring="sigmoid", renormalize=True, num_expert_group=8,
                                  topk_group=4, group_score="top2_sum",
                                  routed_scaling_factor=2.5), 256, True, torch.float32),
}

# (experts, hidden, intermediate, top_k): Qwen3-30B-A3B and DeepSeek-V2-Lite.
EXPERT_SHAPES = {"qwen3-30b-a3b": (128, 2048, 768, 8), "deepseek-v2-lite": (64, 2048, 1408, 6)}


def _logits(tokens: int, experts: int, dtype: torch.dtype, with_bias: bool, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    logits = (torch.randn(tokens, experts, generator=g, device=DEV) * 2).to(dtype)
    bias = torch.randn(experts, generator=g, device=DEV) * 0.3 if with_bias else None
    return logits, bias


@pytest.mark.parametrize("name", list(ROUTINGS))
@pytest.mark.parametrize("tokens", [1, 7, 256, 4096])
def test_routing_kernel_matches_select_experts(name: str, tokens: int) -> None:
    cfg, experts, with_bias, dtype = ROUTINGS[name]
    logits, bias = _logits(tokens, experts, dtype, with_bias, seed=tokens)
    got = fused_select_experts(logits, cfg, bias)
    assert_same_routing(logits, cfg, bias, got)
    routed = route_experts(logits, cfg, bias)  # what the models call takes the kernel
    assert torch.equal(routed[0], got[0]) and torch.equal(routed[1], got[1])


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v2", "deepseek-v3"])
def test_routing_ties_go_to_the_lowest_expert(name: str) -> None:
    cfg, experts, with_bias, _ = ROUTINGS[name]
    g = torch.Generator(device=DEV).manual_seed(1)
    # 0 to 3, as in the CPU test (its docstring says why not negative).
    logits = torch.randint(0, 4, (64, experts), generator=g, device=DEV).float()
    bias = (torch.randint(0, 2, (experts,), generator=g, device=DEV).float() * 0.5
            if with_bias else None)
    weights, ids = fused_select_experts(logits, cfg, bias)
    ref_w, ref_ids = select_experts_lowest_first(logits, cfg, bias)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model", list(EXPERT_SHAPES))
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("tokens", [1, 2, 4, 8, 16])
def test_small_batch_bf16_matches_reference(model: str, tp: int, tokens: int) -> None:
    """This rank's slice of the intermediate dimension under TP, routing over the first
    100 (of 128) or 50 (of 64) experts so that some get no token."""
    experts, hidden, inter, top_k = EXPERT_SHAPES[model]
    args = moe_operands(tokens, experts, hidden, inter // tp, top_k, experts * 25 // 32,
                        torch.bfloat16, seed=tokens + tp, device=DEV)
    out = small_batch_experts(*args)
    ref = fused_experts_reference(*(a.float() if a.is_floating_point() else a for a in args))
    assert rel_err(out, ref) < 1e-2
    assert rel_err(out, fused_experts_triton(*args)) < 2e-2
    assert torch.equal(small_batch_experts(*args), out)  # deterministic: no atomics


@pytest.mark.parametrize("tokens,top_k", [(1, 1), (3, 3), (16, 9)])
def test_small_batch_fp32_awkward_shapes(tokens: int, top_k: int) -> None:
    """Hidden and intermediate sizes that are no multiple of any tile; top-k = all 9
    experts; 2 of the 9 unused where k allows."""
    args = moe_operands(tokens, 9, 200, 72, top_k, 9 if top_k == 9 else 7, torch.float32,
                        seed=tokens, device=DEV)
    torch.testing.assert_close(small_batch_experts(*args), fused_experts_reference(*args),
                               rtol=1e-4, atol=1e-4)


def test_fused_moe_picks_the_small_batch_path_for_decode_batches() -> None:
    """FusedMoE.forward equals the small-batch kernels bit for bit where use_small_batch
    says so and the grouped GEMM bit for bit beyond (both are deterministic)."""
    experts, hidden, inter, top_k = EXPERT_SHAPES["qwen3-30b-a3b"]
    layer = FusedMoE(experts, hidden, inter, tp_rank=0, tp_size=1).to(DEV, torch.bfloat16)
    for tokens in (1, 16, 17, 64):
        x, w13, w2, w, ids = moe_operands(tokens, experts, hidden, inter, top_k, experts,
                                          torch.bfloat16, seed=tokens, device=DEV)
        layer.w13_weight.data.copy_(w13)
        layer.w2_weight.data.copy_(w2)
        out = layer(x, w, ids)
        kernel = small_batch_experts if use_small_batch(tokens, top_k, experts) \
            else fused_experts_triton
        assert torch.equal(out, kernel(x, w13, w2, w, ids)), tokens
        assert use_small_batch(tokens, top_k, experts) == (tokens <= 16)


@pytest.mark.parametrize("name", list(EXPERT_SHAPES))
def test_routing_and_small_batch_replay_in_a_cuda_graph(name: str) -> None:
    """No host sync in the routing kernel or the small-batch kernels: one capture, then
    replays with new logits and activations follow the reference."""
    cfg, _, with_bias, dtype = ROUTINGS[name]
    experts, hidden, inter, top_k = EXPERT_SHAPES[name]
    tokens = 4
    x, w13, w2, _, _ = moe_operands(tokens, experts, hidden, inter, top_k, experts,
                                    torch.bfloat16, device=DEV)
    logits, bias = _logits(tokens, experts, dtype, with_bias)

    def step() -> torch.Tensor:
        weights, ids = route_experts(logits, cfg, bias)
        return fused_experts(x, w13, w2, weights, ids)

    step()  # compile outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in (1, 2):
        logits.copy_(_logits(tokens, experts, dtype, with_bias, seed=seed)[0])
        x.copy_(torch.randn(tokens, hidden, device=DEV, dtype=torch.bfloat16))
        graph.replay()
        weights, ids = select_experts_lowest_first(logits, cfg, bias)
        assert rel_err(out, fused_experts_reference(x, w13, w2, weights, ids)) < 2e-2


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_routing_kernel_replays_in_a_cuda_graph(name: str) -> None:
    cfg, experts, with_bias, dtype = ROUTINGS[name]
    logits, bias = _logits(16, experts, dtype, with_bias)
    fused_select_experts(logits, cfg, bias)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = fused_select_experts(logits, cfg, bias)
    for seed in (1, 2):
        logits.copy_(_logits(16, experts, dtype, with_bias, seed=seed)[0])
        graph.replay()
        assert_same_routing(logits, cfg, bias, got)
