"""Iterate the tensors of an HF folder: one model.safetensors, or shards listed in
model.safetensors.index.json. Unreadable files raise naming the file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(model_dir: str) -> tuple[list[str], dict[str, str] | None]:
    """(files, weight_map) where weight_map is the index's tensor -> file, if sharded."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.isfile(os.path.join(model_dir, name))]
        if missing:
            raise ValueError(f"{index} lists shard files that do not exist: {missing}")
        return [os.path.join(model_dir, name) for name in files], weight_map
    files = sorted(os.path.join(model_dir, name) for name in os.listdir(model_dir)
                   if name.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no .safetensors files (and no {INDEX_FILE})")
    return files, None


def count_tensors(files: list[str]) -> int:
    total = 0
    for path in files:
        with _open(path) as f:
            total += len(f.keys())
    return total


class LazySlice:
    """A checkpoint tensor not read yet: `narrow` reads only the rows or columns asked
    for, so a TP rank never loads the other ranks' shards. Valid while its file is open
    (until the iterator moves on)."""

    def __init__(self, handle: safe_open, name: str) -> None:
        self._slice = handle.get_slice(name)
        self.shape = torch.Size(self._slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self._slice[(slice(None),) * dim + (slice(start, start + length),)]

    def full(self) -> torch.Tensor:
        return self._slice[:]


def iterate_safetensors(model_dir: str, lazy: bool = False
                        ) -> Iterator[tuple[str, torch.Tensor | LazySlice]]:
    """(name, tensor) pairs; with `lazy`, (name, LazySlice) pairs instead. Whole-tensor
    reads of a sharded checkpoint read the next shard in a background thread while the
    caller copies this one's tensors to the device (disk and host-to-device copies
    overlap; at most two shards are in host memory at once)."""
    files, weight_map = safetensors_files(model_dir)
    if lazy or len(files) == 1:
        for path in files:
            yield from _shard_items(path, weight_map, lazy)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-reader") as pool:
        ahead = pool.submit(_read_shard, files[0], weight_map)
        for i in range(len(files)):
            tensors = ahead.result()
            if i + 1 < len(files):
                ahead = pool.submit(_read_shard, files[i + 1], weight_map)
            yield from tensors
            del tensors


def _read_shard(path: str, weight_map: dict[str, str] | None
                ) -> list[tuple[str, torch.Tensor]]:
    return list(_shard_items(path, weight_map, lazy=False))


def _shard_items(path: str, weight_map: dict[str, str] | None, lazy: bool
                 ) -> Iterator[tuple[str, torch.Tensor | LazySlice]]:
    with _open(path) as f:
        names = list(f.keys())
        if weight_map is not None:
            listed = {n for n, file in weight_map.items() if file == os.path.basename(path)}
            absent = sorted(listed - set(names))
            if absent:
                raise ValueError(f"{path}: tensors listed in {INDEX_FILE} are absent: {absent}")
        for name in names:
            try:
                tensor = LazySlice(f, name) if lazy else f.get_tensor(name)
            except SafetensorError as e:
                raise ValueError(f"{path}: cannot read tensor {name!r}: {e}") from e
            yield name, tensor


def _open(path: str) -> safe_open:
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read safetensors file {path}: {e}") from e
