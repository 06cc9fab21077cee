"""The small-batch MoE kernels (gate/up GEMV per (token, slot), down GEMV per token with
the k slots summed in the program) against the per-expert PyTorch reference.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 is set
before the kernel module is imported); tests/gpu/test_moe_decode_gpu.py covers the
real models' shapes and CUDA-graph capture.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from radixserve.layers.moe import fused_experts_reference  # noqa: E402
from radixserve.layers.moe import small_batch_moe  # noqa: E402
from radixserve.layers.moe.fused_moe import use_small_batch  # noqa: E402
from radixserve.layers.moe.small_batch_moe import (  # noqa: E402
    SmallBatchConfig, default_small_config, small_batch_experts)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def moe_operands(tokens: int, num_experts: int, hidden: int, inter: int, top_k: int,
                 used: int, dtype: torch.dtype, seed: int = 0, device: torch.device = DEVICE):
    """Experts and a routing over the first `used` experts only (the rest get no
    token), top-k distinct experts a token, softmax weights."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device)

    w13 = (randn(num_experts, 2 * inter, hidden) * hidden ** -0.5).to(dtype)
    w2 = (randn(num_experts, hidden, inter) * inter ** -0.5).to(dtype)
    x = randn(tokens, hidden).to(dtype)
    ids = torch.stack([torch.randperm(used, generator=g, device=device)[:top_k]
                       for _ in range(tokens)]).to(torch.int32)
    weights = torch.softmax(randn(tokens, top_k), -1)
    return x, w13, w2, weights, ids


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


CASES = [
    # tokens, experts, hidden, inter, top_k, used
    (1, 7, 37, 26, 2, 7),  # one token; H and I not multiples of any tile
    (3, 7, 37, 26, 3, 5),  # two experts get no token
    (3, 4, 40, 24, 4, 4),  # top-k = every expert
    (5, 6, 48, 32, 2, 6),  # H and I multiples of the tiles: the unmasked loads
]


@pytest.mark.parametrize("tokens,experts,hidden,inter,top_k,used", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_batch_matches_reference(tokens: int, experts: int, hidden: int, inter: int,
                                       top_k: int, used: int, dtype: torch.dtype) -> None:
    args = moe_operands(tokens, experts, hidden, inter, top_k, used, dtype, seed=tokens)
    out = small_batch_experts(*args)
    assert out.shape == (tokens, hidden) and out.dtype == dtype
    # The reference in float32 from the same (rounded) operands: the kernel rounds only
    # act (to x's dtype, as the grouped kernel stores it) and the output.
    ref = fused_experts_reference(*(a.float() if a.is_floating_point() else a for a in args))
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        assert rel_err(out, ref) < 1e-2
        # and as close to the bf16 reference as bf16 rounding allows
        assert rel_err(out, fused_experts_reference(*args)) < 2e-2


@pytest.mark.parametrize("cfg", [
    SmallBatchConfig(block_i=1, block_k=64, block_h=2, block_di=32, num_warps=1,
                     num_stages=1),  # one row of I a program; one step spans all of H
    SmallBatchConfig(block_i=16, block_k=8, block_h=64, block_di=8, num_warps=2,
                     num_stages=2),  # tiles wider than I and H
])
def test_small_batch_tile_shapes(cfg: SmallBatchConfig) -> None:
    args = moe_operands(2, 5, 37, 13, 3, 5, torch.float32, seed=11)
    torch.testing.assert_close(small_batch_experts(*args, config=cfg),
                               fused_experts_reference(*args), rtol=1e-5, atol=1e-5)


def test_small_batch_tp_slice_is_the_full_layers_share() -> None:
    """A rank's w13 / w2 slice (half of I) gives its part of the full layer's sum."""
    x, w13, w2, w, ids = moe_operands(3, 6, 32, 20, 2, 6, torch.float32, seed=5)
    half = 10
    parts = [small_batch_experts(x, torch.cat([w13[:, r * half:(r + 1) * half],
                                               w13[:, 20 + r * half:20 + (r + 1) * half]], 1),
                                 w2[:, :, r * half:(r + 1) * half].contiguous(), w, ids)
             for r in range(2)]
    torch.testing.assert_close(parts[0] + parts[1], fused_experts_reference(x, w13, w2, w, ids),
                               rtol=1e-5, atol=1e-5)


def test_small_batch_no_tokens_and_bad_shapes() -> None:
    x, w13, w2, w, ids = moe_operands(1, 4, 16, 8, 2, 4, torch.float32)
    assert small_batch_experts(x[:0], w13, w2, w[:0], ids[:0]).shape == (0, 16)
    with pytest.raises(ValueError, match="w13"):
        small_batch_experts(x, w13, w2.transpose(1, 2), w, ids)


@pytest.mark.parametrize("hidden,inter,top_k", [
    (2048, 768, 8), (2048, 96, 8),  # Qwen3-30B-A3B, TP 1 and 8
    (2048, 1408, 6), (2048, 176, 6),  # DeepSeek-V2-Lite, TP 1 and 8
])
@pytest.mark.parametrize("tokens", [1, 2, 4, 8, 16])
def test_default_config_spreads_small_batches_over_the_gpu(
        hidden: int, inter: int, top_k: int, tokens: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a 132-SM GPU each kernel gets at least two programs an SM even at one token,
    with power-of-two tiles of at most _STEP_ELEMS elements a step."""
    monkeypatch.setattr(small_batch_moe, "_sm_count", lambda index: 132)
    cfg = default_small_config(tokens, top_k, hidden, inter, torch.device("cuda", 0))
    gate_up_programs = tokens * top_k * -(-inter // cfg.block_i)
    down_programs = tokens * -(-hidden // cfg.block_h)
    assert min(gate_up_programs, down_programs) >= 2 * 132
    for size in (cfg.block_i, cfg.block_k, cfg.block_h, cfg.block_di):
        assert size & (size - 1) == 0
    assert 2 * cfg.block_i * cfg.block_k <= small_batch_moe._STEP_ELEMS
    assert cfg.block_h * cfg.block_di <= small_batch_moe._STEP_ELEMS


def test_small_batch_threshold_depends_on_shapes_only() -> None:
    """Decode batches take the small path up to T*k = E pairs (Qwen3-30B-A3B: 16
    tokens; DeepSeek-V2-Lite: 10), larger ones and empty ones the grouped GEMM."""
    assert [t for t in range(0, 40) if use_small_batch(t, 8, 128)] == list(range(1, 17))
    assert [t for t in range(0, 40) if use_small_batch(t, 6, 64)] == list(range(1, 11))
    assert use_small_batch(1, 4, 4) and not use_small_batch(2, 4, 4)
