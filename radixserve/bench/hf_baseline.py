"""HF transformers as the baseline of `--compare-hf`, in the benchmark's own process.

A 30B MoE in bf16 fills most of an 80 GB GPU, so ours and HF's copies cannot both be
there: a benchmark measures ours first, drops every reference to its runner (weights,
KV pool, CUDA graphs) and calls `free_device_memory` before `build_hf_model`.
"""

from __future__ import annotations

import gc
import time

import torch
from torch import nn


def free_device_memory(device: str | torch.device) -> None:
    """Collect what is no longer referenced (a runner and its CUDA graphs form cycles)
    and hand the cached blocks back to the driver, so HF can allocate them."""
    gc.collect()
    device = torch.device(device)
    if device.type != "cuda":
        return
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    print(f"before HF: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free, "
          f"{torch.cuda.memory_allocated(device) / 2**30:.2f} GiB still allocated by torch",
          flush=True)


def build_hf_model(model_path: str, dtype: torch.dtype, device: str | torch.device
                   ) -> nn.Module:
    """HF's model of `model_path`'s config with random weights, built on `device` in
    `dtype`: every parameter is allocated there, never on the CPU, so HF's own init
    (one normal_ per weight) runs on the device too; the build time is printed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    experts = getattr(model.config, "_experts_implementation", None)
    print(f"HF {type(model).__name__} built on {device} in {time.perf_counter() - t0:.1f} s "
          f"(attention {model.config._attn_implementation}"
          f"{f', experts {experts}' if experts else ''})", flush=True)
    return model
