"""MoE and MLA on CUDA: the fused MoE Triton kernel and the MLA kernels against their
references at the real models' shapes, CUDA-graph capture of the MoE path, and tiny
Qwen3-MoE / DeepSeek-V3 checkpoints end to end against HF transformers.

Run from the repository root: `python -m pytest tests/gpu/test_moe_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    # Skip before the kernel modules are imported: on CPU they must be decorated in
    # interpreter mode, which the root conftest arranges for the CPU tests.
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from radixserve.layers.moe import fused_experts_reference  # noqa: E402
from radixserve.layers.moe.fused_moe_triton import fused_experts_triton  # noqa: E402
from tests.test_mla import run_mla_backends, run_mla_decode_kernel  # noqa: E402

pytestmark = [pytest.mark.gpu]

DEV = torch.device("cuda")
# Qwen3-30B-A3B: 128 experts, hidden 2048, moe_intermediate 768, top-8.
E, H, I, K = 128, 2048, 768, 8


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _moe_inputs(tokens: int, dtype: torch.dtype, num_experts: int = E, hidden: int = H,
                inter: int = I, top_k: int = K, used: int = 100, seed: int = 0):
    """Routing over the first `used` experts only: the rest get no token."""
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) * hidden ** -0.5)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) * inter ** -0.5)
    x = torch.randn(tokens, hidden, generator=g)
    ids = torch.stack([torch.randperm(used, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k, generator=g), -1)
    return (x.to(DEV, dtype), w13.to(DEV, dtype), w2.to(DEV, dtype), weights.to(DEV),
            ids.to(DEV, torch.int32))


@pytest.mark.parametrize("tokens", [1, 7, 64, 257, 1024])
def test_fused_moe_bf16_matches_reference(tokens: int) -> None:
    x, w13, w2, w, ids = _moe_inputs(tokens, torch.bfloat16)
    got = fused_experts_triton(x, w13, w2, w, ids)
    ref = fused_experts_reference(x, w13, w2, w, ids)
    assert rel_err(got, ref) < 2e-2


@pytest.mark.parametrize("tokens,top_k", [(1, 1), (13, 2), (300, 6)])
def test_fused_moe_fp32_awkward_shapes(tokens: int, top_k: int) -> None:
    """Hidden and intermediate sizes that are not multiples of any block size."""
    x, w13, w2, w, ids = _moe_inputs(tokens, torch.float32, num_experts=9, hidden=200,
                                     inter=72, top_k=top_k, used=7)
    got = fused_experts_triton(x, w13, w2, w, ids)
    ref = fused_experts_reference(x, w13, w2, w, ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_fused_moe_replays_in_a_cuda_graph() -> None:
    """No host sync in routing alignment or launch: capture once, replay new routings."""
    x, w13, w2, w, ids = _moe_inputs(8, torch.bfloat16)
    fused_experts_triton(x, w13, w2, w, ids)  # compile outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts_triton(x, w13, w2, w, ids)
    for seed in (1, 2):
        x2, _, _, w_new, ids_new = _moe_inputs(8, torch.bfloat16, seed=seed, used=40)
        x.copy_(x2)
        w.copy_(w_new)
        ids.copy_(ids_new)
        graph.replay()
        assert rel_err(out, fused_experts_reference(x, w13, w2, w, ids)) < 2e-2


@pytest.mark.parametrize("heads", [16, 128])  # DeepSeek-V2-Lite, DeepSeek-V3
def test_mla_decode_bf16_matches_reference(heads: int) -> None:
    lens = [1, 100, 1000, 4096, 17, 2500]
    out, ref = run_mla_decode_kernel(lens, heads, 512, 64, torch.bfloat16, DEV, max_splits=8)
    assert rel_err(out, ref) < 2e-2


def test_triton_mla_backend_bf16_matches_torch() -> None:
    """DeepSeek-V2-Lite's attention shapes, with cached prefixes and one decode step."""
    (e_ref, s_ref, d_ref), (e_got, s_got, d_got) = run_mla_backends(
        [0, 100, 700], [1, 300, 64], 16, 128, 64, 128, 512, torch.bfloat16, DEV)
    assert torch.equal(s_got, s_ref)
    assert rel_err(e_got, e_ref) < 2e-2
    assert rel_err(d_got, d_ref) < 2e-2


@pytest.fixture(scope="module", params=["qwen3-moe", "deepseek-v3", "deepseek-v2"])
def checkpoint(request, tmp_path_factory):
    from tests.moe_factory import make_tiny_moe_checkpoint

    path = make_tiny_moe_checkpoint(request.param, tmp_path_factory.mktemp(request.param),
                                    with_tokenizer=False)
    return request.param, str(path)


def _hf_greedy(path: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEV).eval()
    outs = []
    with torch.no_grad():
        for ids in prompts:
            seq = list(ids)
            for _ in range(n):
                seq.append(int(hf(torch.tensor([seq], device=DEV)).logits[0, -1].argmax()))
            outs.append(seq[len(ids):])
    return outs


@pytest.mark.parametrize("cuda_graph", [True, False])
def test_float32_greedy_equals_hf(checkpoint, cuda_graph: bool) -> None:
    """Fused MoE kernel, Triton MLA backend and CUDA graphs in the real engine loop,
    with a shared prefix (radix cache) and chunked prefill."""
    from radixserve.engine import Engine

    arch, path = checkpoint
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(3, 40000, (40,), generator=g).tolist()
    prompts = [shared + [5], shared[:23], torch.randint(3, 40000, (130,), generator=g).tolist(),
               [9]]
    ref = _hf_greedy(path, prompts, 24)
    engine = Engine(model_path=path, skip_tokenizer_init=True, dtype="float32",
                    max_total_tokens=16384, cuda_graph_max_bs=16, mem_fraction_static=0.5,
                    chunked_prefill_size=64, disable_cuda_graph=not cuda_graph)
    try:
        assert engine.server_args.attention_backend == "triton"
        sp = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
        for _ in range(2):  # the second round reuses the radix cache
            outs = engine.generate(input_ids=prompts, sampling_params=sp)
            assert [o["output_ids"] for o in outs] == ref, arch
    finally:
        engine.shutdown()
