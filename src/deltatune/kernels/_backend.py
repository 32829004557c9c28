"""Decides whether a tensor's work goes to a Triton kernel or to the plain PyTorch path.

Both paths compute the same function; the PyTorch path is what CPU CI tests, the Triton path is
what CUDA runs. ``DELTATUNE_DISABLE_TRITON=1`` forces the PyTorch path everywhere (for A/B timing
and for isolating a suspected kernel bug).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def triton_disabled() -> bool:
    return os.environ.get("DELTATUNE_DISABLE_TRITON", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor lives on a CUDA device and Triton can be used there."""
    if triton_disabled() or not triton_importable():
        return False
    return all(t.is_cuda for t in tensors)
