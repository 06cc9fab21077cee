"""Random weights for benchmarks: shapes from the config, values seeded and cheap.

Initialised in place on the model's device, so an 8B model fills in a moment on GPU.
Norm weights are 1 and biases 0 so activations keep a sane scale through the layers.
"""

from __future__ import annotations

import torch
from torch import nn


def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    for name, param in model.named_parameters():
        gen = torch.Generator(device=param.device).manual_seed(seed)
        seed += 1  # a different stream per tensor, same values on every run
        if hasattr(param, "init_dummy"):  # quantized tensors: codes and scales in range
            param.init_dummy(param.data, gen)
        elif name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith(".bias"):
            param.data.zero_()
        else:
            param.data.normal_(0.0, std, generator=gen)
