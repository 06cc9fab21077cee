"""The scheduler's counters, read by /get_server_info, metrics and tests."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SchedulerStats:
    num_retractions: int = 0
    total_prefill_tokens: int = 0  # tokens actually run through prefill (not cached)
    total_cached_tokens: int = 0
    # Host time of the last step, without the time spent waiting for the device.
    last_step_host_s: float = 0.0
