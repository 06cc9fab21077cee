"""radixserve: an LLM serving engine in the style of SGLang.

    import radixserve as rs
    with rs.Engine(model_path=...) as engine:
        engine.generate("The capital of France is", {"max_new_tokens": 8})

Importing the package is light: `Engine` and `ServerArgs` load (with torch and the
model code) on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return "0.0.0+unknown"
    try:
        return version("radixserve")
    except PackageNotFoundError:
        return "0.0.0+unknown"


__version__ = _version()
__all__ = ["Engine", "ServerArgs", "__version__"]

if TYPE_CHECKING:
    from radixserve.engine import Engine
    from radixserve.server_args import ServerArgs

_LAZY = {"Engine": "radixserve.engine", "ServerArgs": "radixserve.server_args"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'radixserve' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
