"""Block sizes for the fused MoE kernel, by problem shape and token count.

Tuned tables live in `tuned/*.json`, one file per (device, dtype, E, I, H, top_k), as
`tests/gpu/bench_moe.py --tune --write` writes them (`tuned_file_name`): a list of
buckets, each with the block sizes and its `max_tokens` (null for the last); a batch of
T tokens uses the first bucket with max_tokens >= T. Without a file for the shape on
this GPU, `_default` picks by tokens per expert: few want a small BLOCK_M (most blocks
are padding otherwise) and wide N/K tiles to stream weights; many want the large square
tiles of a dense GEMM.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class MoEKernelConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


_TUNED_DIR = Path(__file__).with_name("tuned")
_NO_LIMIT = 1 << 62
_FIELDS = [f.name for f in fields(MoEKernelConfig)]

TunedKey = tuple[str, str, int, int, int, int]  # device, dtype, E, I, H, top_k


def tuned_file_name(key: TunedKey) -> str:
    device, dtype, num_experts, inter, hidden, top_k = key
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return f"{slug}_{dtype}_e{num_experts}_i{inter}_h{hidden}_k{top_k}.json"


def format_tuned(key: TunedKey, buckets: dict[int, MoEKernelConfig], note: str,
                 extra: dict[int, dict[str, Any]] | None = None) -> str:
    """A tuned file's text, one bucket a line; `extra` adds fields to a bucket (kept
    for the reader, ignored when loading)."""
    device, dtype, num_experts, inter, hidden, top_k = key
    head = {"device": device, "dtype": dtype, "num_experts": num_experts,
            "intermediate_size": inter, "hidden_size": hidden, "top_k": top_k, "note": note}
    rows = [{"max_tokens": None if bound >= _NO_LIMIT else bound, **asdict(cfg),
             **(extra or {}).get(bound, {})} for bound, cfg in sorted(buckets.items())]
    lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    body = ",\n".join(f"  {json.dumps(r)}" for r in rows)
    return "{\n" + "\n".join(lines) + '\n "buckets": [\n' + body + "\n ]\n}\n"


def tuned_from_json(data: dict[str, Any]) -> tuple[TunedKey, dict[int, MoEKernelConfig]]:
    key = (data["device"], data["dtype"], data["num_experts"], data["intermediate_size"],
           data["hidden_size"], data["top_k"])
    buckets = {_NO_LIMIT if b["max_tokens"] is None else b["max_tokens"]:
               MoEKernelConfig(**{f: b[f] for f in _FIELDS}) for b in data["buckets"]}
    if _NO_LIMIT not in buckets:
        raise ValueError(f"{tuned_file_name(key)}: the last bucket needs max_tokens null")
    return key, buckets


@functools.cache
def tuned_tables() -> dict[TunedKey, dict[int, MoEKernelConfig]]:
    tables = {}
    for path in sorted(_TUNED_DIR.glob("*.json")):
        key, buckets = tuned_from_json(json.loads(path.read_text(encoding="utf-8")))
        tables[key] = buckets
    return tables


def _default(tokens: int, top_k: int, num_experts: int, device: torch.device
             ) -> MoEKernelConfig:
    if device.type != "cuda":
        # The CPU interpreter runs only in tests: small tiles so that tiny shapes still
        # span several blocks in M, N and K.
        return MoEKernelConfig(16, 16, 16, 2, 1, 1)
    per_expert = tokens * top_k / num_experts
    if per_expert <= 16:
        return MoEKernelConfig(16, 64, 128, 1, 4, 4)
    if per_expert <= 64:
        return MoEKernelConfig(32, 128, 64, 8, 4, 3)
    return MoEKernelConfig(64, 128, 64, 8, 4, 3)


def get_moe_config(num_experts: int, inter: int, hidden: int, top_k: int, tokens: int,
                   dtype: torch.dtype, device: torch.device) -> MoEKernelConfig:
    """The tuned config for this shape on this GPU if there is one, else a heuristic."""
    if device.type == "cuda":
        key = (_device_name(device.index), str(dtype).removeprefix("torch."),
               num_experts, inter, hidden, top_k)
        table = tuned_tables().get(key)
        if table is not None:
            return table[min(b for b in table if b >= tokens)]
    return _default(tokens, top_k, num_experts, device)


@functools.cache
def _device_name(index: int | None) -> str:
    return torch.cuda.get_device_name(index)
