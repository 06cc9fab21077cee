"""What the multimodal path reads from the flags: processor settings, per-request
limits, how payloads are fetched, and the size of the vision-embedding cache."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

PROCESS_KEYS = {"image": {"min_pixels", "max_pixels"},
                "video": {"min_pixels", "max_pixels", "fps", "max_frames"}}
MODALITIES = ("image", "video")


@dataclass(frozen=True)
class MultimodalConfig:
    process_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_items: dict[str, int] = field(default_factory=dict)  # per modality, per request
    allow_http: bool = False
    fetch_timeout_s: float = 10.0
    max_input_bytes: int = 64 << 20
    max_image_pixels: int = 32 * 1024 * 1024
    embedding_cache_bytes: int = 1 << 30

    @classmethod
    def from_flags(cls, process_config: str | dict | None, limit_per_request: str | dict | None,
                   allow_http: bool, timeout_s: float, max_input_bytes: int,
                   max_image_pixels: int, cache_mb: int) -> "MultimodalConfig":
        """Raises ValueError naming the flag on a bad value."""
        process = _json_object(process_config, "mm_process_config")
        for modality, settings in process.items():
            if modality not in PROCESS_KEYS or not isinstance(settings, dict):
                raise ValueError(f"mm_process_config: keys are {sorted(PROCESS_KEYS)}, each an "
                                 f"object; got {modality!r}")
            unknown = set(settings) - PROCESS_KEYS[modality]
            if unknown:
                raise ValueError(f"mm_process_config.{modality}: unknown settings "
                                 f"{sorted(unknown)} (known: {sorted(PROCESS_KEYS[modality])})")
            for key, value in settings.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ValueError(f"mm_process_config.{modality}.{key} must be a positive "
                                     f"number, got {value!r}")
        limits = _json_object(limit_per_request, "limit_mm_data_per_request")
        for modality, n in limits.items():
            if modality not in MODALITIES or isinstance(n, bool) or not isinstance(n, int) \
                    or n < 0:
                raise ValueError(f"limit_mm_data_per_request: expected {{\"image\": N, "
                                 f"\"video\": N}} with N >= 0, got {modality!r}: {n!r}")
        for name, value in (("mm_per_request_timeout", timeout_s),
                            ("mm_max_input_bytes", max_input_bytes),
                            ("mm_max_image_pixels", max_image_pixels)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if cache_mb < 0:
            raise ValueError(f"mm_embedding_cache_size_mb must be >= 0, got {cache_mb}")
        return cls(process, limits, bool(allow_http), float(timeout_s), int(max_input_bytes),
                   int(max_image_pixels), int(cache_mb) << 20)


def _json_object(value: str | dict | None, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{name} is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(parsed).__name__}")
    return parsed
