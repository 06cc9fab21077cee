"""Which quantization the linear layers being built take.

Model classes build their layers without a quantization argument; the loader builds
the model inside `quantization_scope(config)`, and each linear layer asks
`linear_method()` for its method as it is created, as it takes its TP rank from the
process group. Outside a scope layers are unquantized.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from radixserve.layers.quantization.base import QuantConfig, QuantMethod
from radixserve.layers.quantization.unquantized import UnquantizedLinearMethod

_CURRENT: ContextVar[QuantConfig | None] = ContextVar("radixserve_quant_config", default=None)


@contextlib.contextmanager
def quantization_scope(config: QuantConfig | None) -> Iterator[None]:
    token = _CURRENT.set(config)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def linear_method() -> QuantMethod:
    config = _CURRENT.get()
    return UnquantizedLinearMethod() if config is None else config.linear_method()
