"""The quantized linear layers' decode and prefill matmuls at the Qwen3-8B shapes, on
one GPU, against the bf16 layer (the GEMV at one row, cuBLAS above).

    python tests/gpu/bench_quant.py [--rows 1 16 4096]

Each variant is one linear layer's forward as the model runs it (activation
quantization included), timed in a CUDA graph of launches over distinct weights (about
1 GiB of them, so nothing is served from L2), divided by the launch count. Bandwidth
counts the weight bytes (scales included) over the time. Every variant is checked
against the float product of its dequantized weight before it is timed.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from radixserve.layers.linear import ColumnParallelLinear  # noqa: E402
from radixserve.layers.quantization import quantization_scope  # noqa: E402
from radixserve.layers.quantization.fp8 import Fp8Config  # noqa: E402
from radixserve.layers.quantization.int4 import AwqConfig, GptqConfig  # noqa: E402

DEV = torch.device("cuda")
SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 24576),
          ("down", 12288, 4096)]
VARIANTS = {
    "bf16": None,
    "fp8-block": Fp8Config(block=(128, 128), scale_name="weight_scale_inv"),
    "fp8-channel": Fp8Config.online("fp8"),
    "awq": AwqConfig(group_size=128),
    "gptq-act-order": GptqConfig(group_size=128, desc_act=True),
}


def _layer(config, k: int, n: int, seed: int) -> torch.nn.Module:
    with torch.device(DEV), quantization_scope(config):
        torch.set_default_dtype(torch.bfloat16)
        layer = ColumnParallelLinear(k, n, tp_rank=0, tp_size=1)
        torch.set_default_dtype(torch.float32)
    gen = torch.Generator(device=DEV).manual_seed(seed)
    for p in layer.parameters():
        if hasattr(p, "init_dummy"):
            p.init_dummy(p.data, gen)
        else:
            p.data.normal_(0, 0.02, generator=gen)
    layer.process_weights_after_loading()
    return layer


def _time(layers: list[torch.nn.Module], x: torch.Tensor) -> float:
    graph = torch.cuda.CUDAGraph()
    for layer in layers[:2]:
        layer(x)  # compile before capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for layer in layers:
            layer(x)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(layers))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 4096])
    args = parser.parse_args()
    print("shape | rows | variant | us | weight GB/s | rel err vs its float weight")
    for name, k, n in SHAPES:
        for rows in args.rows:
            x = torch.randn(rows, k, device=DEV, dtype=torch.bfloat16)
            for variant, config in VARIANTS.items():
                probe = _layer(config, k, n, 0)
                nbytes = sum(p.numel() * p.element_size() for p in probe.parameters())
                ref = _dequantized(probe, k, n) if config is not None else probe.weight.float()
                want = x.float() @ ref.t()
                err = ((probe(x).float() - want).norm() / want.norm()).item()
                copies = max(2, min(64, (1 << 30) // nbytes))
                layers = [probe] + [_layer(config, k, n, i) for i in range(1, copies)]
                t = _time(layers, x)
                print(f"{name} | {rows} | {variant} | {t * 1e6:.1f} | {nbytes / t / 1e9:.0f} | "
                      f"{err:.1e}")
                del layers, probe
                torch.cuda.empty_cache()


def _dequantized(layer: torch.nn.Module, k: int, n: int) -> torch.Tensor:
    """The layer's weight [N, K] as float32, from its processed parameters."""
    if hasattr(layer, "qweight"):
        from radixserve.layers.quantization.int4_packing import dequantize_reference

        return dequantize_reference(layer.qweight, layer.zeros, layer.scales, layer.g_idx).t()
    s = layer.weight_scale.float()
    if s.shape[1] == 1:
        return layer.weight.float() * s
    return layer.weight.float() * s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]


if __name__ == "__main__":
    main()
