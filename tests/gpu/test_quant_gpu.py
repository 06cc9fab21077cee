"""Quantization on CUDA: the kernels at the Qwen3-8B shapes in bf16 against their torch
references, torch._scaled_mm's path against the reference, and quantized tiny models
end to end (prefill logits close to HF on the dequantized weights; the same greedy
tokens with and without CUDA graphs)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from radixserve.configs.model_config import ModelConfig  # noqa: E402
from radixserve.engine import Engine  # noqa: E402
from radixserve.layers.quantization import fp8_ops  # noqa: E402
from radixserve.layers.quantization.int4_packing import (int4_matmul_reference,  # noqa: E402
                                                         pack_rows)
from radixserve.layers.triton_kernels.fp8_block_gemm import (  # noqa: E402
    per_token_group_quant_fp8, w8a8_block_matmul)
from radixserve.layers.triton_kernels.int4_gemm import int4_gemm, int4_gemv  # noqa: E402
from radixserve.model_loader import load_model  # noqa: E402
from radixserve.server_args import ServerArgs  # noqa: E402
from tests import quant_checkpoints as qc  # noqa: E402
from tests.test_models import make_checkpoint, max_rel_err, prefill_logits  # noqa: E402

pytestmark = [pytest.mark.gpu]
DEVICE = torch.device("cuda")
# (K, N) of Qwen3-8B's qkv, o, gate/up and down projections, and an awkward one.
SHAPES = [(4096, 6144), (4096, 4096), (4096, 24576), (12288, 4096), (1000, 328)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("m", [1, 7, 333])
@pytest.mark.parametrize("k,group", [(4096, 128), (12288, 12288), (1000, 128)])
def test_group_quant_is_exact_on_gpu(m: int, k: int, group: int) -> None:
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16) * 4
    q, s = per_token_group_quant_fp8(x, group)
    q_ref, s_ref = fp8_ops.quantize_per_token_group(x, group)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    assert torch.equal(q.float(), q_ref.float())


@pytest.mark.parametrize("m", [1, 16, 333])
@pytest.mark.parametrize("k,n", SHAPES)
def test_fp8_block_matmul_model_shapes(m: int, k: int, n: int) -> None:
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEVICE) / k ** 0.5
    x_q, x_s = per_token_group_quant_fp8(x, 128)
    w_s = torch.rand(-(-n // 128), -(-k // 128), device=DEVICE) * 0.01 + 1e-3
    w_q = fp8_ops.quantize_with_scale(
        w, w_s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k])
    out = w8a8_block_matmul(x_q, x_s, w_q, w_s, (128, 128), None, torch.bfloat16)
    ref = fp8_ops.block_scaled_mm_reference(x_q, x_s, w_q, w_s, (128, 128), None,
                                            torch.float32)
    assert rel_err(out, ref) < 5e-3


@pytest.mark.parametrize("m", [1, 16, 333])
@pytest.mark.parametrize("k,n", SHAPES[:4])
def test_scaled_mm_path_equals_reference(m: int, k: int, n: int) -> None:
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) / k ** 0.5
    b = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)
    x_q, x_s = fp8_ops.quantize_per_token(x)
    w_q, w_s = fp8_ops.quantize_weight_per_channel(w)
    out = fp8_ops.scaled_mm(x_q, x_s, w_q, w_s, b, torch.bfloat16)
    ref = fp8_ops.scaled_mm_reference(x_q, x_s, w_q, w_s, b, torch.float32)
    assert rel_err(out, ref) < 5e-3


def _int4(k: int, n: int, act_order: bool):
    groups = -(-k // 128)
    q = torch.randint(0, 16, (k, n), device=DEVICE)
    zeros = torch.randint(0, 16, (groups, n), device=DEVICE).half()
    scales = (torch.rand(groups, n, device=DEVICE) * 0.01 + 1e-3).half()
    g_idx = torch.arange(k, device=DEVICE, dtype=torch.int32) // 128
    if act_order:
        g_idx = g_idx[torch.randperm(k, device=DEVICE)]
    return pack_rows(q), zeros, scales, g_idx


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("m", [1, 4, 333])
@pytest.mark.parametrize("k,n", [(4096, 6144), (12288, 4096), (1024, 328)])
def test_int4_kernels_model_shapes(m: int, k: int, n: int, act_order: bool) -> None:
    qweight, zeros, scales, g_idx = _int4(k, n, act_order)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    ref = int4_matmul_reference(x.float(), qweight, zeros, scales, g_idx)
    assert rel_err(int4_gemm(x, qweight, zeros, scales, g_idx), ref) < 1e-2
    if m <= 4:
        assert rel_err(int4_gemv(x, qweight, zeros, scales, g_idx), ref) < 1e-2


WRITERS = {
    "fp8-block": (lambda hf, p: qc.write_fp8_block(hf, p, (32, 32)), 0.08),
    "compressed-tensors-channel": (qc.write_compressed_tensors_channel, 0.08),
    "awq": (lambda hf, p: qc.write_awq(hf, p, 32), 0.03),
    "gptq-act-order": (lambda hf, p: qc.write_gptq(hf, p, 32, desc_act=True), 0.03),
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_quantized_model_on_gpu(tmp_path, fmt: str) -> None:
    """bf16 on CUDA: prefill logits near HF float32 on the dequantized weights; greedy
    tokens the same with CUDA graphs as without."""
    hf = make_checkpoint(str(tmp_path / "float"), "qwen3", hidden_size=64,
                         intermediate_size=128, head_dim=16, tie_word_embeddings=False)
    write, tol = WRITERS[fmt]
    path = str(tmp_path / fmt)
    write(hf, path)
    args = ServerArgs(model_path=path, device="cuda", dtype="bfloat16")
    config = ModelConfig.from_load_config(args.load_config())
    model = load_model(args.load_config(), config)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (1, 17, 40)]
    ours = prefill_logits(model, prompts, config.num_hidden_layers,
                          config.num_key_value_heads, config.head_dim)
    for prompt, got in zip(prompts, ours):
        with torch.inference_mode():
            ref = hf(torch.tensor([prompt])).logits[0]
        assert max_rel_err(got.float().cpu(), ref) < tol, len(prompt)
    del model
    outs = []
    for graphs_off in (False, True):
        engine = Engine(model_path=path, dtype="bfloat16", skip_tokenizer_init=True,
                        max_total_tokens=2048, disable_cuda_graph=graphs_off)
        try:
            outs.append([o["output_ids"] for o in engine.generate(
                input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 16,
                                                    "ignore_eos": True})])
        finally:
            engine.shutdown()
    assert outs[0] == outs[1]
