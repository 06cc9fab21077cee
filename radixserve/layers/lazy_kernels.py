"""The Triton kernels' entry points, imported on first use.

CPU-only installs may lack triton and never need it: a layer asks here for its kernel
when a CUDA tensor arrives, gets None where triton cannot be imported, and takes its
PyTorch path instead. Each module is imported once.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any


@functools.cache
def triton_kernel(module: str, name: str | None = None) -> Any:
    """`module.name` (the module itself without a name), or None without triton."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    return mod if name is None else getattr(mod, name)
