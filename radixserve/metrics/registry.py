"""Metric objects created once per process and name: a second Engine in the same process
(or a second collector) reuses them instead of registering a duplicate."""

from __future__ import annotations

from typing import Any

_METRICS: dict[str, Any] = {}


def metric(kind: str, name: str, documentation: str, labelnames: list[str],
           **kwargs: Any) -> Any:
    """A prometheus_client `kind` ("Counter", "Gauge", "Histogram") named `name`."""
    existing = _METRICS.get(name)
    if existing is not None:
        return existing
    import prometheus_client

    made = getattr(prometheus_client, kind)(name=name, documentation=documentation,
                                            labelnames=labelnames, **kwargs)
    _METRICS[name] = made
    return made


def metric_name(prefix: str, name: str) -> str:
    """SGLang's names after the prefix (`sglang:token_usage` is `<prefix>:token_usage`), so
    that an SGLang dashboard works once its prefix is changed."""
    return f"{prefix}:{name}"
