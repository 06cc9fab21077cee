"""The skinny GEMV kernel against its PyTorch reference, on small awkward shapes.

Without CUDA the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1 must be set
before the kernel module is imported). The interpreter computes bf16 `tl.dot` wrongly
(triton 3.9), so the tensor-core path is checked here in fp16 and the FMA path in bf16
too; tests/gpu/test_gemv_gpu.py covers bf16 at the model's shapes.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from radixserve.layers.triton_kernels.gemv import (  # noqa: E402
    GemvConfig, default_config, gemv, gemv_reference)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _operands(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("m,n,k,cfg,bias", [
    (1, 37, 100, GemvConfig(block_n=16, block_k=32), False),            # ragged N and K
    (3, 48, 96, GemvConfig(block_n=16, block_k=32, split_k=3), True),   # split-K + bias
    (16, 20, 64, GemvConfig(block_n=32, block_k=16, split_k=2), False),  # M at the limit
    (5, 64, 130, GemvConfig(block_n=16, block_k=64, split_k=4), True),  # split tail is short
    (2, 17, 40, GemvConfig(block_n=16, block_k=16, split_k=8), False),  # empty splits
])
def test_gemv_dot(m: int, n: int, k: int, cfg: GemvConfig, bias: bool) -> None:
    x, w, b = _operands(m, n, k, torch.float16, bias, seed=m * 1000 + n)
    out = gemv(x, w, b, cfg)
    assert out.shape == (m, n) and out.dtype == x.dtype
    assert rel_err(out, gemv_reference(x, w, b)) < 2e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,split_k", [(33, 72, 1), (40, 200, 3)])
def test_gemv_fma_single_row(dtype: torch.dtype, n: int, k: int, split_k: int) -> None:
    x, w, b = _operands(1, n, k, dtype, True, seed=n + k)
    out = gemv(x, w, b, GemvConfig(block_n=16, block_k=32, split_k=split_k, use_dot=False))
    assert rel_err(out, gemv_reference(x, w, b)) < 1e-2


def test_gemv_strided_rows_and_default_config() -> None:
    # x as a row-strided view (as q/k/v slices of a fused output are).
    x_full, w, _ = _operands(3, 24, 2 * 64, torch.float16, False, seed=7)
    x = x_full[:, :64]
    w = w[:, :64].contiguous()
    out = gemv(x, w)
    assert rel_err(out, gemv_reference(x, w)) < 2e-3


@pytest.mark.parametrize("m,n,k", [(1, 37, 100), (1, 24, 2100), (1, 10, 4100), (4, 40, 600),
                                   (9, 16, 48)])
def test_gemv_default_config(m: int, n: int, k: int) -> None:
    x, w, b = _operands(m, n, k, torch.float16, True, seed=m + n + k)
    assert rel_err(gemv(x, w, b), gemv_reference(x, w, b)) < 2e-3


def test_default_config_splits_only_narrow_outputs() -> None:
    assert not default_config(1, 4096, 12288).use_dot
    assert default_config(4, 1024, 3072).split_k > 1  # 16 programs without a split
    assert default_config(4, 24576, 4096).split_k == 1


def test_gemv_rejects_wide_batches() -> None:
    x, w, _ = _operands(17, 16, 16, torch.float16, False, seed=0)
    with pytest.raises(ValueError):
        gemv(x, w)


@pytest.mark.parametrize("m,n,k,cfg", [
    (1, 37, 100, GemvConfig(block_n=16, block_k=32, use_dot=False)),       # FMA, ragged K
    (1, 40, 200, GemvConfig(block_n=16, block_k=32, split_k=3, use_dot=False)),
    (3, 48, 96, GemvConfig(block_n=16, block_k=32, split_k=3)),            # dot + split-K
    (16, 20, 70, GemvConfig(block_n=32, block_k=16)),                      # M at the limit
])
def test_gemv_with_silu_and_mul_input(m: int, n: int, k: int, cfg: GemvConfig) -> None:
    """The down projection reading cat(gate, up): bit for bit the separate silu_and_mul
    kernel, then gemv."""
    from radixserve.layers.triton_kernels.activation import (silu_and_mul,
                                                             silu_and_mul_reference)

    gate_up, _, _ = _operands(m, 1, 2 * k, torch.float16, False, seed=m + n + k)
    _, w, b = _operands(m, n, k, torch.float16, True, seed=n * k)
    out = gemv(gate_up, w, b, cfg, silu_and_mul_input=True)
    unfused = gemv(silu_and_mul(gate_up), w, b, cfg)
    assert out.shape == (m, n)
    torch.testing.assert_close(out, unfused, rtol=0, atol=0)
    assert rel_err(out, gemv_reference(silu_and_mul_reference(gate_up), w, b)) < 2e-3


@pytest.mark.parametrize("m,n,k,cfg", [
    (1, 17, 200, GemvConfig(block_n=16, block_k=64, use_dot=False)),           # FMA, ragged K
    (1, 300, 1000, GemvConfig(block_n=8, block_k=256, split_k=3, use_dot=False)),
    (1, 17, 96, GemvConfig(block_n=16, block_k=32)),                           # dot at M == 1
    (3, 300, 96, GemvConfig(block_n=64, block_k=32, split_k=2)),               # dot + split-K
    (3, 17, 1000, GemvConfig(block_n=16, block_k=128)),
    (16, 17, 200, GemvConfig(block_n=16, block_k=64, split_k=3)),              # M at the limit
    (16, 300, 1000, None),                                                     # default config
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rmsnorm_gemv_equals_norm_kernel_then_gemv(m: int, n: int, k: int,
                                                   cfg: GemvConfig | None, dtype: torch.dtype,
                                                   with_residual: bool) -> None:
    """The qkv / gate-up projection reading the un-normalised hidden state: bit for bit
    the separate (fused-add) RMSNorm kernel, then gemv; the new residual too."""
    from radixserve.layers.triton_kernels import fused_add_rmsnorm, rmsnorm
    from radixserve.layers.triton_kernels.gemv import rmsnorm_gemv

    g = torch.Generator().manual_seed(m * n + k)
    x = (torch.randn(m, k, generator=g) * 3).to(DEVICE, dtype)
    residual = (torch.randn(m, k, generator=g) * 3).to(DEVICE, dtype) if with_residual else None
    norm_w = (1 + torch.randn(k, generator=g) / 4).to(DEVICE, dtype)
    _, w, b = _operands(m, n, k, dtype, True, seed=n * k)
    x_before = x.clone()
    res_before = residual.clone() if with_residual else None

    out, new_residual = rmsnorm_gemv(x, residual, norm_w, 1e-6, w, b, cfg)

    if with_residual:
        normed, want_residual = fused_add_rmsnorm(x.clone(), residual.clone(), norm_w, 1e-6)
        assert torch.equal(residual, res_before)  # read, never written
        assert new_residual.data_ptr() not in (x.data_ptr(), residual.data_ptr())
    else:
        normed, want_residual = rmsnorm(x, norm_w, 1e-6), x
    assert torch.equal(x, x_before)
    assert out.shape == (m, n) and out.dtype == dtype
    torch.testing.assert_close(new_residual, want_residual, rtol=0, atol=0)
    want = gemv(normed, w, b, cfg)
    if DEVICE.type == "cpu":
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    else:
        # The norm kernel may spread a row over fewer or more warps than the GEMV, so
        # its fp32 sum of squares may differ in the last bit; tests/gpu/test_gemv_gpu.py
        # checks the model's shapes bit for bit.
        assert rel_err(out, want) < 1e-3


def test_rmsnorm_gemv_rejects_a_residual_of_another_dtype() -> None:
    from radixserve.layers.triton_kernels.gemv import rmsnorm_gemv

    x, w, _ = _operands(2, 16, 32, torch.float16, False, seed=0)
    with pytest.raises(ValueError):
        rmsnorm_gemv(x, x.float(), torch.ones(32, device=DEVICE), 1e-6, w)


def _norm_by_kernel(self, x: torch.Tensor, residual: torch.Tensor | None = None):
    """RMSNorm's CUDA branch (the Triton kernels), for CPU tensors."""
    from radixserve.layers.triton_kernels import fused_add_rmsnorm, rmsnorm

    if residual is None:
        return rmsnorm(x, self.weight, self.variance_epsilon)
    return fused_add_rmsnorm(x, residual, self.weight, self.variance_epsilon)


@pytest.mark.parametrize("model_type,overrides,dtype,prompt_lens", [
    ("qwen3", dict(head_dim=32), torch.bfloat16, (1,)),          # decode-like: the FMA GEMV
    ("qwen3", dict(head_dim=32), torch.float16, (3, 4)),         # 7 rows: the tensor-core GEMV
    ("qwen2", dict(tie_word_embeddings=True), torch.float16, (5,)),  # qkv bias
    ("llama", {}, torch.bfloat16, (1,)),
    ("qwen2_moe", dict(moe_intermediate_size=32, shared_expert_intermediate_size=48,
                       num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1]),
     torch.float16, (2, 1)),                                     # a sparse layer stays unfused
])
@pytest.mark.skipif(torch.cuda.is_available(), reason="forces the CUDA paths onto the CPU")
def test_model_logits_equal_with_rmsnorm_in_gemv(tmp_path, monkeypatch, model_type: str,
                                                 overrides: dict, dtype: torch.dtype,
                                                 prompt_lens: tuple[int, ...]) -> None:
    """A tiny model's logits with the decoder norms fused into the qkv and gate/up GEMVs
    equal those with the norm's own kernel, bit for bit. CPU tensors take the CUDA
    paths here: the GEMV dispatch admits them and RMSNorm runs its Triton kernels."""
    from radixserve.configs.model_config import ModelConfig
    from radixserve.layers import linear_dispatch
    from radixserve.layers.layernorm import RMSNorm
    from radixserve.layers.triton_kernels import gemv as gemv_module
    from radixserve.model_loader import load_model
    from radixserve.models.llama import LlamaMLP
    from radixserve.server_args import ServerArgs
    from tests.test_models import make_checkpoint, prefill_logits

    make_checkpoint(str(tmp_path), model_type, **overrides)
    args = ServerArgs(model_path=str(tmp_path), device="cpu", dtype=str(dtype)[6:])
    config = ModelConfig.from_load_config(args.load_config())
    model = load_model(args.load_config(), config)
    monkeypatch.setattr(linear_dispatch, "_GEMV_DEVICES", ("cuda", "cpu"))
    # The multi-row prompts exercise the GEMV's tensor-core kernel, which the dispatch
    # no longer picks by default (GEMV_MAX_ROWS) but which rmsnorm_gemv still offers.
    monkeypatch.setattr(linear_dispatch, "GEMV_MAX_ROWS", gemv_module.MAX_M)
    monkeypatch.setattr(RMSNorm, "forward_native", _norm_by_kernel)
    fused_calls = []
    real = gemv_module.rmsnorm_gemv
    monkeypatch.setattr(gemv_module, "rmsnorm_gemv",
                        lambda *a, **kw: fused_calls.append(1) or real(*a, **kw))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist()
               for n in prompt_lens]

    def logits() -> torch.Tensor:
        return torch.cat(prefill_logits(model, prompts, config.num_hidden_layers,
                                        config.num_key_value_heads, config.head_dim))

    fused = logits()
    assert len(fused_calls) == sum(
        isinstance(layer.mlp, LlamaMLP) for layer in model.model.layers) + len(
        model.model.layers)
    monkeypatch.setattr(linear_dispatch, "FUSE_RMSNORM", False)
    unfused = logits()
    assert not fused.isnan().any()
    torch.testing.assert_close(fused, unfused, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="forces the CUDA paths onto the CPU")
@pytest.mark.parametrize("hidden,fused", [(2048, True), (2048 + 64, False)])
def test_rmsnorm_linear_fuses_up_to_the_hidden_bound(monkeypatch, hidden: int,
                                                     fused: bool) -> None:
    """The norm runs inside the GEMV only up to NORM_GEMV_MAX_HIDDEN (past it the GEMV's
    re-reads of the rows cost more than the launch it saves); both ways give the norm's
    output and the same new residual."""
    from radixserve.layers import linear_dispatch
    from radixserve.layers.layernorm import RMSNorm
    from radixserve.layers.triton_kernels import gemv as gemv_module

    assert linear_dispatch.NORM_GEMV_MAX_HIDDEN == 2048
    monkeypatch.setattr(linear_dispatch, "_GEMV_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(RMSNorm, "forward_native", _norm_by_kernel)
    calls = []
    real = gemv_module.rmsnorm_gemv
    monkeypatch.setattr(gemv_module, "rmsnorm_gemv",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(1, hidden, generator=gen).to(torch.bfloat16)
    residual = torch.randn(1, hidden, generator=gen).to(torch.bfloat16)
    norm = RMSNorm(hidden).to(torch.bfloat16)
    w = (torch.randn(16, hidden, generator=gen) / hidden ** 0.5).to(torch.bfloat16)
    want_normed, want_h = norm(x.clone(), residual.clone())
    out, h = linear_dispatch.rmsnorm_linear(x, residual, norm, w)
    assert len(calls) == (1 if fused else 0)
    assert torch.equal(h, want_h)
    assert torch.equal(out, linear_dispatch.linear(want_normed, w))


@pytest.mark.parametrize("split_k", [1, 3])
def test_gemv_writes_into_a_given_out(split_k: int) -> None:
    """With `out` the product lands there (what a row-parallel layer uses to write
    straight into the all-reduce's buffer), equal to the product in a new tensor."""
    x, w, b = _operands(1, 40, 200, torch.bfloat16, True, seed=split_k)
    cfg = GemvConfig(block_n=16, block_k=32, split_k=split_k, use_dot=False)
    backing = torch.full((3, 40), 7.0, dtype=torch.bfloat16, device=DEVICE)
    got = gemv(x, w, b, cfg, out=backing[1:2])
    assert got.data_ptr() == backing[1].data_ptr()
    assert torch.equal(got, gemv(x, w, b, cfg))
    assert (backing[0] == 7).all() and (backing[2] == 7).all()  # nothing around it
    with pytest.raises(ValueError, match="out must be"):
        gemv(x, w, b, cfg, out=backing[:, :20].contiguous()[:1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="forces the CUDA paths onto the CPU")
@pytest.mark.parametrize("rows,bias,gemv_path", [(1, False, True), (1, True, True),
                                                 (3, True, False), (3, False, False)])
def test_linear_writes_into_a_given_out(monkeypatch, rows: int, bias: bool,
                                        gemv_path: bool) -> None:
    """`linear(..., out=)` on both of its paths (the GEMV at one row, the BLAS matmul
    otherwise) gives what it gives without `out`, in `out`; a wrong `out` is refused."""
    from radixserve.layers import linear_dispatch

    monkeypatch.setattr(linear_dispatch, "_GEMV_DEVICES", ("cuda", "cpu"))
    calls = []
    real = linear_dispatch._gemv_module().gemv
    monkeypatch.setattr(linear_dispatch._gemv_module(), "gemv",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, w, b = _operands(rows, 24, 64, torch.bfloat16, bias, seed=rows)
    x = x.view(rows, 1, 64)
    want = linear_dispatch.linear(x, w, b)
    out = torch.empty(rows, 1, 24, dtype=torch.bfloat16)
    got = linear_dispatch.linear(x, w, b, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got, want)
    assert len(calls) == (2 if gemv_path else 0)
    with pytest.raises(ValueError, match="out must be"):
        linear_dispatch.linear(x, w, b, out=torch.empty(rows, 24, dtype=torch.float32))
