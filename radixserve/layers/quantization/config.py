"""Which quantization a model is served with: the checkpoint's `quantization_config`
(config.json) and the `--quantization` flag, reconciled.

A checkpoint that states a method is loaded with it; the flag may name the same method
(or, for FP8 checkpoints, `w8a8_fp8`). The flag on a float checkpoint quantizes it as
it loads (fp8, w8a8_fp8). Every other combination, and every method or scheme not
implemented here, is a ValueError that names it: no silent fallback to float weights.
"""

from __future__ import annotations

from typing import Any

from radixserve.layers.quantization import compressed_tensors
from radixserve.layers.quantization.base import QuantConfig
from radixserve.layers.quantization.fp8 import Fp8Config
from radixserve.layers.quantization.int4 import AwqConfig, GptqConfig

# The --quantization choices (SGLang's names for the methods implemented here).
QUANTIZATION_METHODS = ("fp8", "w8a8_fp8", "awq", "gptq", compressed_tensors.NAME)
# Methods the flag can apply to a float checkpoint at load.
ONLINE_METHODS = ("fp8", "w8a8_fp8")
# Flag names accepted for a checkpoint's own method.
_ALIASES = {"fp8": ("fp8", "w8a8_fp8"), compressed_tensors.NAME: (compressed_tensors.NAME,
                                                                  "w8a8_fp8"),
            "awq": ("awq",), "gptq": ("gptq",)}


def config_from_checkpoint(cfg: dict[str, Any]) -> QuantConfig:
    """The QuantConfig of a config.json `quantization_config`."""
    method = str(cfg.get("quant_method", "")).lower()
    if method == "fp8":
        return Fp8Config.from_hf(cfg)
    if method == compressed_tensors.NAME:
        return compressed_tensors.config_from_hf(cfg)
    if method == "awq":
        return AwqConfig.from_hf(cfg)
    if method == "gptq":
        return GptqConfig.from_hf(cfg)
    raise ValueError(f"quantization method {method!r} of the checkpoint is not supported "
                     f"(supported: {', '.join(_ALIASES)})")


def resolve_quant_config(requested: str | None, checkpoint_cfg: dict[str, Any] | None
                         ) -> QuantConfig | None:
    """The quantization to serve with, or None for float weights."""
    if requested is not None and requested not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, "
                         f"got {requested!r}")
    if checkpoint_cfg:
        if not isinstance(checkpoint_cfg, dict):
            checkpoint_cfg = checkpoint_cfg.to_dict()
        config = config_from_checkpoint(checkpoint_cfg)
        method = str(checkpoint_cfg.get("quant_method")).lower()
        if requested is not None and requested not in _ALIASES[method]:
            raise ValueError(f"--quantization {requested} does not match the checkpoint's "
                             f"quantization method {method!r}")
        return config
    if requested is None:
        return None
    if requested not in ONLINE_METHODS:
        raise ValueError(f"--quantization {requested} needs a checkpoint quantized with it "
                         f"(config.json has no quantization_config); only "
                         f"{', '.join(ONLINE_METHODS)} quantize float weights at load")
    return Fp8Config.online(requested)
