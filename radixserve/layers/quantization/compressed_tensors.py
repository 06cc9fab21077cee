"""compressed-tensors checkpoints (llm-compressor's `quant_method: compressed-tensors`):
the FP8 W8A8 schemes, mapped onto Fp8Config.

Supported: one config group targeting Linear, FP8 weights (8-bit float, symmetric) with
`tensor`, `channel` or `block` strategy, and FP8 activations that are dynamic per token
(or per group of the block's K for block weights) or static per tensor. Anything else
(int schemes, weight-only FP8, several groups, a KV cache scheme) fails naming what was
found.
"""

from __future__ import annotations

from typing import Any

from radixserve.layers.quantization.fp8 import Fp8Config

NAME = "compressed-tensors"


def _unsupported(what: str) -> ValueError:
    return ValueError(f"compressed-tensors checkpoint: {what} is not supported (only FP8 W8A8 "
                      f"schemes are)")


def _check_fp8(args: dict[str, Any] | None, role: str) -> dict[str, Any]:
    if not args:
        raise _unsupported(f"a scheme without {role} quantization")
    if args.get("type") != "float" or args.get("num_bits") != 8:
        raise _unsupported(f"{role} of type {args.get('type')!r} with "
                           f"{args.get('num_bits')} bits")
    if args.get("symmetric") is False:
        raise _unsupported(f"asymmetric {role}")
    return args


def config_from_hf(cfg: dict[str, Any]) -> Fp8Config:
    if cfg.get("kv_cache_scheme"):
        raise _unsupported("a kv_cache_scheme")
    groups = list((cfg.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise _unsupported(f"{len(groups)} config groups")
    group = groups[0]
    if set(group.get("targets") or []) != {"Linear"}:
        raise _unsupported(f"targets {group.get('targets')}")
    weights = _check_fp8(group.get("weights"), "weight")
    acts = _check_fp8(group.get("input_activations"), "input activation")
    strategy = weights.get("strategy")
    if strategy not in ("tensor", "channel", "block"):
        raise _unsupported(f"weight strategy {strategy!r}")
    block = None
    if strategy == "block":
        structure = weights.get("block_structure") or []
        if len(structure) != 2:
            raise _unsupported(f"block_structure {structure}")
        block = (int(structure[0]), int(structure[1]))
    if acts.get("dynamic"):
        expected = "group" if block else "token"
        if acts.get("strategy") != expected:
            raise _unsupported(f"dynamic activations per {acts.get('strategy')!r} with "
                               f"{strategy} weights")
        scheme = "dynamic"
    else:
        if acts.get("strategy") != "tensor" or block:
            raise _unsupported(f"static activations per {acts.get('strategy')!r} with "
                               f"{strategy} weights")
        scheme = "static"
    return Fp8Config(name=NAME, serialized=True, weight_strategy=strategy,
                     activation_scheme=scheme, block=block, scale_name="weight_scale",
                     ignored=tuple(cfg.get("ignore") or ()))
