"""Every environment switch radixserve reads, in one typed object.

The switches are for A/B timing of the GPU fast paths, not for serving: each turns one
fusion or launch feature off so that a benchmark run can measure what it is worth. The
one setting (RADIXSERVE_CACHE_DIR) says where derived files are kept.
Flags (ServerArgs) are the interface for everything a deployment chooses.

    from radixserve.envs import envs
    if envs.RADIXSERVE_DISABLE_PDL.get(): ...

`get()` reads os.environ at call time (so tests can monkeypatch it). The modules that
consult a switch on a hot path read it once, at import, into a module constant, so it
must be set before radixserve is imported (in the shell that starts the server).

No module of radixserve but this one reads os.environ.

Read by others, not by radixserve: `TRITON_INTERPRET=1` makes Triton run its kernels
in its CPU interpreter; the CPU tests set it before triton is imported, to run the
Triton kernels without a GPU. Triton reads it itself, so it has no entry here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvBool:
    """An on/off switch: on when the variable is exactly "1", otherwise `default`
    (unset, "0", or any other value)."""

    name: str
    default: bool
    doc: str

    def __set_name__(self, owner: type, attr: str) -> None:
        # The attribute is the variable's name, so grepping either finds the other.
        if attr != self.name:
            raise TypeError(f"{owner.__name__}.{attr} holds the switch {self.name}")

    def get(self) -> bool:
        raw = os.environ.get(self.name)
        if raw is None:
            return self.default
        return raw == "1"


@dataclass(frozen=True)
class EnvStr:
    """A string setting: the variable's value, or `default` when unset or empty."""

    name: str
    default: str
    doc: str

    def __set_name__(self, owner: type, attr: str) -> None:
        if attr != self.name:
            raise TypeError(f"{owner.__name__}.{attr} holds the setting {self.name}")

    def get(self) -> str:
        return os.environ.get(self.name) or self.default


class Envs:
    """The switches, one attribute each, named as the environment variable."""

    RADIXSERVE_CACHE_DIR = EnvStr(
        "RADIXSERVE_CACHE_DIR", "~/.cache/radixserve",
        "Where radixserve keeps what it derives from a model file between starts (a GGUF "
        "file's HF config and converted tokenizer: configs/gguf_config.py); `off` keeps "
        "nothing. Read on each use.")

    RADIXSERVE_DISABLE_ROPE_KV_WRITE = EnvBool(
        "RADIXSERVE_DISABLE_ROPE_KV_WRITE", False,
        "Set to 1 to keep the KV-cache store a launch of the attention backend's own. By "
        "default the rotary kernel writes the new k and v into the KV cache itself "
        "(layers/attention/triton.py). Read once at import.")
    RADIXSERVE_DISABLE_NORM_GEMV = EnvBool(
        "RADIXSERVE_DISABLE_NORM_GEMV", False,
        "Set to 1 to run the residual add + RMSNorm as its own kernel again. By default, "
        "in a batch-1 decode step on CUDA for small hidden sizes, it runs inside the GEMV "
        "of the projection that reads it (layers/linear_dispatch.py). Read once at import.")
    RADIXSERVE_DISABLE_PDL = EnvBool(
        "RADIXSERVE_DISABLE_PDL", False,
        "Set to 1 to launch the Triton kernels without programmatic dependent launch, "
        "which they use on Hopper and later by default (layers/triton_kernels/pdl.py). "
        "Read on the first launch on each GPU.")

    def all(self) -> list[EnvBool | EnvStr]:
        return [v for v in vars(type(self)).values() if isinstance(v, (EnvBool, EnvStr))]


envs = Envs()


# Written for others: prometheus_client reads this variable when it is first imported, and
# then keeps each process's metrics in files under that directory, which /metrics merges
# (radixserve/metrics/prometheus_setup.py sets it before the workers are spawned).
PROMETHEUS_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


def prometheus_multiproc_dir() -> str | None:
    return os.environ.get(PROMETHEUS_MULTIPROC_DIR) or None


def set_prometheus_multiproc_dir(path: str) -> None:
    os.environ[PROMETHEUS_MULTIPROC_DIR] = path
