"""Quantized layers split across two TP ranks compute what the whole layer computes:
column-parallel ranks' outputs reassemble it, row-parallel ranks' partial products sum
to it. The checkpoint tensors (FP8 weights and block scales, AWQ / GPTQ packed words,
group scales and zeros, act-order g_idx) are cut by the layouts in linear.py."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                      QKVParallelLinear, RowParallelLinear)
from radixserve.layers.quantization import quantization_scope
from radixserve.layers.quantization.fp8 import Fp8Config
from radixserve.layers.quantization.int4 import AwqConfig, GptqConfig

CONFIGS = {
    "fp8-block": Fp8Config(block=(16, 16), scale_name="weight_scale_inv"),
    "fp8-per-tensor-static": Fp8Config(weight_strategy="tensor", activation_scheme="static"),
    "awq": AwqConfig(group_size=16),
    "gptq-act-order": GptqConfig(group_size=16, desc_act=True),
}


def _checkpoint(config, in_size: int, out_size: int, seed: int, row: bool = False
                ) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """Random checkpoint tensors of one [out, in] projection, and the whole layer
    loaded from them."""
    gen = torch.Generator().manual_seed(seed)
    with quantization_scope(config):
        cls = RowParallelLinear if row else ColumnParallelLinear
        layer = cls(in_size, out_size, tp_rank=0, tp_size=1)
    tensors = {}
    for name, p in layer.named_parameters():
        if name == "g_idx":  # one act-order per input, as q/k/v (gate/up) share it
            p.data.copy_(torch.randperm(in_size, generator=torch.Generator().manual_seed(0))
                         // 16)
        elif p.shard_layout.shard_scalar:  # a per-tensor scale: one value on disk
            value = torch.rand((), generator=gen) * 0.01 + 1e-3
            p.data.fill_(value.item())
            tensors[name] = value
            continue
        elif name in ("weight_scale", "weight_scale_inv", "scales"):
            p.data.copy_(torch.rand(p.shape, generator=gen) * 0.01 + 1e-3)
        elif name == "input_scale":
            p.data.fill_(0.01 + seed * 1e-3)
        else:
            p.init_dummy(p.data, gen)
        tensors[name] = p.data.clone()
    layer.process_weights_after_loading()
    return tensors, layer


def _load(layer: torch.nn.Module, tensors: dict[str, torch.Tensor], shard=None) -> None:
    params = dict(layer.named_parameters())
    for name, t in tensors.items():
        params[name].weight_loader(params[name], t, shard)


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_merged_and_qkv_shards(fmt: str) -> None:
    config = CONFIGS[fmt]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    parts = {"q": _checkpoint(config, 64, 64, 1), "k": _checkpoint(config, 64, 32, 2),
             "v": _checkpoint(config, 64, 32, 3)}
    gate, up = _checkpoint(config, 64, 64, 4), _checkpoint(config, 64, 64, 5)
    qkv_out, gu_out = [], []
    for rank in range(2):
        with quantization_scope(config):
            qkv = QKVParallelLinear(64, 16, 4, 2, tp_rank=rank, tp_size=2)
            gu = MergedColumnParallelLinear(64, [64, 64], tp_rank=rank, tp_size=2)
        for shard, (tensors, _) in parts.items():
            _load(qkv, tensors, shard)
        _load(gu, gate[0], 0)
        _load(gu, up[0], 1)
        qkv.process_weights_after_loading()
        gu.process_weights_after_loading()
        qkv_out.append(qkv(x).split([32, 16, 16], dim=-1))
        gu_out.append(gu(x).chunk(2, dim=-1))
    for i, (_, whole) in enumerate(parts.values()):
        expected = whole(x)
        if fmt.endswith("static"):  # the packed layer keeps the largest input scale
            expected = _with_input_scale(whole, parts["v"][0]["input_scale"], x)
        torch.testing.assert_close(torch.cat([o[i] for o in qkv_out], -1), expected)
    for i, (_, whole) in enumerate((gate, up)):
        expected = whole(x)
        if fmt.endswith("static"):
            expected = _with_input_scale(whole, up[0]["input_scale"], x)
        torch.testing.assert_close(torch.cat([o[i] for o in gu_out], -1), expected)


def _with_input_scale(layer: torch.nn.Module, scale: torch.Tensor, x: torch.Tensor
                      ) -> torch.Tensor:
    layer.input_scale.data.copy_(scale)
    return layer(x)


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_row_parallel_partial_products_sum(fmt: str) -> None:
    config = CONFIGS[fmt]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    tensors, whole = _checkpoint(config, 64, 48, 7, row=True)
    total = torch.zeros(3, 48)
    for rank in range(2):
        with quantization_scope(config):
            layer = RowParallelLinear(64, 48, tp_rank=rank, tp_size=2)
        _load(layer, tensors)
        layer.process_weights_after_loading()
        # tp_size 2 without a process group: take the partial product directly.
        total += layer.quant_method.apply(layer, x[:, rank * 32:(rank + 1) * 32], None)
    expected = whole(x)
    tol = 0.05 if fmt.startswith("fp8") else 1e-5  # FP8 rescales each half's activations
    assert ((total - expected).norm() / expected.norm()).item() < tol



def test_block_scales_refuse_a_split_inside_a_block() -> None:
    """24 rows per rank do not split blocks of 16: a named error, not shifted scales."""
    config = CONFIGS["fp8-block"]
    with quantization_scope(config):
        gu = MergedColumnParallelLinear(64, [48, 48], tp_rank=0, tp_size=2)
    tensors, _ = _checkpoint(config, 64, 48, 9)
    with pytest.raises(ValueError, match="whole groups of 16"):
        _load(gu, tensors, 0)


def test_act_order_shards_must_share_g_idx() -> None:
    config = CONFIGS["gptq-act-order"]
    with quantization_scope(config):
        qkv = QKVParallelLinear(64, 16, 4, 2, tp_rank=0, tp_size=1)
    q, _ = _checkpoint(config, 64, 64, 1)
    k, _ = _checkpoint(config, 64, 32, 2)
    k["g_idx"] = k["g_idx"].flip(0)
    _load(qkv, q, "q")
    with pytest.raises(ValueError, match="disagree"):
        _load(qkv, k, "k")
