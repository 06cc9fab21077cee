"""The loader's side of quantization: which QuantConfig a model is built with, which
of its modules stay float, and the pass after loading that turns checkpoint tensors
into what the kernels read."""

from __future__ import annotations

from torch import nn

from radixserve.configs.load_config import LoadConfig
from radixserve.configs.model_config import ModelConfig
from radixserve.layers.linear import LinearBase
from radixserve.layers.moe import FusedMoE
from radixserve.layers.quantization import QuantConfig, resolve_quant_config
from radixserve.layers.quantization.unquantized import UnquantizedLinearMethod
from radixserve.models.llama import _checkpoint_names


def quant_config_for(load: LoadConfig, model_config: ModelConfig) -> QuantConfig | None:
    """From --quantization and config.json's quantization_config; ValueError naming a
    method, scheme or combination that is not supported."""
    checkpoint = getattr(model_config.hf_config, "quantization_config", None)
    if load.is_gguf or load.load_format == "gguf":
        if load.quantization is not None:
            raise ValueError(f"--quantization {load.quantization} does not apply to a GGUF "
                             f"file (its tensors carry their own quantization)")
        return None
    return resolve_quant_config(load.quantization, checkpoint)


def prepare_quantized_model(model: nn.Module, config: QuantConfig) -> None:
    """Keep the modules the checkpoint leaves unquantized in float; refuse layers that
    have no quantized path yet rather than load them wrongly."""
    for name, module in model.named_modules():
        if isinstance(module, FusedMoE):
            raise ValueError(f"{config.name} quantization of MoE experts ({name}) is not "
                             f"supported yet")
        if not isinstance(module, LinearBase) or not config.ignored:
            continue
        hf_names = [hf.rsplit(".", 1)[0] for hf, _ in _checkpoint_names(f"{name}.weight")]
        ignored = [config.is_ignored(hf) for hf in hf_names]
        if all(ignored):
            module.set_quant_method(UnquantizedLinearMethod())
        elif any(ignored):
            raise ValueError(f"{name}: the checkpoint quantizes only some of {hf_names}")


def process_weights_after_loading(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.process_weights_after_loading()
