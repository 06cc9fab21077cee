"""Loaded by pytest before any test module: on a machine without CUDA, Triton kernels run
in the interpreter. Triton reads TRITON_INTERPRET when a kernel is defined, so it has to
be set before the first kernel module is imported, whichever test imports it first."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
