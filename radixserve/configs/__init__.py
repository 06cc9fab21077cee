"""Model configs and the per-layer config views built from ServerArgs.

Views (frozen dataclasses, built by `ServerArgs.load_config()`, `.parallel_config()` and
`.runner_config()`): each layer below server_args receives the part of the flags it
reads, never the whole ServerArgs.

Importing the package stays light: ModelConfig (which pulls in transformers) loads on
first access, so server_args can import the views cheaply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from radixserve.configs.load_config import LoadConfig
from radixserve.configs.parallel_config import ParallelConfig
from radixserve.configs.runner_config import RunnerConfig

if TYPE_CHECKING:
    from radixserve.configs.model_config import ModelConfig

__all__ = ["LoadConfig", "ModelConfig", "ParallelConfig", "RunnerConfig"]


def __getattr__(name: str) -> Any:
    if name != "ModelConfig":
        raise AttributeError(f"module 'radixserve.configs' has no attribute {name!r}")
    from radixserve.configs.model_config import ModelConfig

    return ModelConfig
