"""Fill a model's parameters from HF-named checkpoint tensors.

A model says, for each of its parameters, which checkpoint tensors (with shard ids for
its weight_loader) fill it; this loads them and names every missing, unexpected or
mis-shaped tensor in one error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from radixserve.layers.linear import default_weight_loader

ShardId = str | int | tuple[int, int | None] | None
CheckpointNames = Callable[[str], list[tuple[str, ShardId]]]


def load_by_checkpoint_names(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                             checkpoint_names: CheckpointNames,
                             skip: Callable[[str], bool] = lambda name: False) -> None:
    params = dict(model.named_parameters())
    targets = {hf: (name, shard) for name in params for hf, shard in checkpoint_names(name)}
    seen: set[str] = set()
    unexpected: list[str] = []
    for hf_name, tensor in weights:
        if skip(hf_name):
            continue
        if hf_name not in targets:
            unexpected.append(hf_name)
            continue
        name, shard = targets[hf_name]
        param = params[name]
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor, shard)
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {hf_name!r}: {e}") from e
        seen.add(hf_name)
    missing = sorted(set(targets) - seen)
    if missing or unexpected:
        raise ValueError(f"{type(model).__name__}: missing tensors {missing}, "
                         f"unexpected tensors {sorted(unexpected)}")
