"""load_model: build the architecture on the target device and fill its weights."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

import torch
from torch import nn
from tqdm import tqdm

from radixserve.configs.gguf_config import resolve_gguf_file
from radixserve.configs.load_config import LoadConfig
from radixserve.configs.model_config import ModelConfig
from radixserve.distributed.parallel_state import get_tp_group
from radixserve.layers.quantization import quantization_scope
from radixserve.model_loader.dummy import init_dummy_weights
from radixserve.model_loader.gguf_loader import count_gguf_tensors, iterate_gguf
from radixserve.model_loader.quantization import (prepare_quantized_model,
                                                  process_weights_after_loading,
                                                  quant_config_for)
from radixserve.model_loader.safetensors_loader import (count_tensors, iterate_safetensors,
                                                        safetensors_files)
from radixserve.models.registry import get_model_class

logger = logging.getLogger(__name__)


def load_model(load: LoadConfig, model_config: ModelConfig) -> nn.Module:
    pooling = model_config.pooling
    model_cls = get_model_class(model_config.architecture, pooling)
    device = torch.device(load.device)
    start = time.perf_counter()
    # Parameters are allocated directly on the device in the serving dtype: no CPU copy
    # of the whole model, and no float32 detour for bf16 weights.
    quant_config = quant_config_for(load, model_config)
    with torch.device(device), _default_dtype(model_config.dtype), \
            quantization_scope(quant_config):
        model = (model_cls(model_config.hf_config) if pooling is None
                 else model_cls(model_config.hf_config, pooling))
        if quant_config is not None:
            prepare_quantized_model(model, quant_config)
    fmt = resolve_load_format(load)
    if fmt == "dummy":
        init_dummy_weights(model, seed=load.random_seed)
    else:
        weights, total = _weights(fmt, model_config)
        model.load_weights(tqdm(weights, total=total, desc=f"Loading {fmt} weights",
                                unit="tensor"))
    process_weights_after_loading(model)
    logger.info("loaded %s (%s, %s) on %s in %.2f s", model_config.architecture, fmt,
                model_config.dtype, device, time.perf_counter() - start)
    return model.eval()


def resolve_load_format(load: LoadConfig) -> str:
    if load.load_format != "auto":
        return load.load_format
    return "gguf" if load.is_gguf else "safetensors"


def _weights(fmt: str, model_config: ModelConfig
             ) -> tuple[Iterator[tuple[str, torch.Tensor]], int]:
    path = model_config.model_path
    if fmt == "gguf":
        gguf_file = resolve_gguf_file(path)
        return iterate_gguf(gguf_file, model_config.hf_config), count_gguf_tensors(gguf_file)
    if not os.path.isdir(path):
        raise ValueError(f"safetensors weights need a model folder, got {path}")
    # Under TP each rank reads only its own slices (see LazySlice).
    lazy = get_tp_group().size > 1
    return iterate_safetensors(path, lazy), count_tensors(safetensors_files(path)[0])


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
