"""A Triton kernel that dequantizes 4-bit weights (any of our formats) on CUDA in one pass.

The reference path (formats.dequantize) takes several kernels and an int32 copy of the codes;
this one reads each packed byte once, looks both codes up in the 16-entry table, undoes double
quantization of the block scale and writes the two values in the output dtype. The matmul then
runs in cuBLAS. It is checked against the reference on CPU with TRITON_INTERPRET=1
(tests/test_quant.py); its speed on a GPU has NOT been measured yet.
"""

from __future__ import annotations

import functools
import os

import torch

from .formats import QuantizedWeight, codebook

BYTES_PER_PROGRAM = 1024


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    if os.environ.get("DELTATUNE_DISABLE_TRITON", "0") == "1":
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dequantize_kernel(
        packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, out_ptr, n_bytes, n_values,
        BLOCK: tl.constexpr, NESTED_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BYTES: tl.constexpr,
    ):
        byte = tl.program_id(0) * BYTES + tl.arange(0, BYTES)
        in_range = byte < n_bytes
        packed = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
        high = tl.load(code_ptr + (packed >> 4))
        low = tl.load(code_ptr + (packed & 15))
        block = (byte * 2) // BLOCK  # both values of a byte share a block: BLOCK is even
        scale = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.float32)
        if DOUBLE_QUANT:
            nested = tl.load(nested_ptr + block // NESTED_BLOCK, mask=in_range, other=0)
            scale = scale * nested + tl.load(offset_ptr)
        first = byte * 2
        out_type = out_ptr.dtype.element_ty
        tl.store(out_ptr + first, (high * scale).to(out_type), mask=in_range & (first < n_values))
        tl.store(out_ptr + first + 1, (low * scale).to(out_type), mask=in_range & (first + 1 < n_values))

    return dequantize_kernel


def triton_dequantize(qweight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight in `dtype`, computed by the Triton kernel (same values as formats.dequantize)."""
    device = qweight.packed.device
    out = torch.empty(qweight.numel, dtype=dtype, device=device)
    n_bytes = qweight.packed.numel()
    absmax = qweight.absmax
    nested = qweight.nested_scale if qweight.double_quant else absmax  # unused without double quant
    offset = qweight.offset.reshape(1) if qweight.double_quant else absmax
    grid = (triton_cdiv(n_bytes, BYTES_PER_PROGRAM),)
    _kernel()[grid](
        qweight.packed, absmax, nested, offset, codebook(qweight.quant_type, device), out, n_bytes, qweight.numel,
        BLOCK=qweight.block_size, NESTED_BLOCK=qweight.nested_block_size, DOUBLE_QUANT=qweight.double_quant,
        BYTES=BYTES_PER_PROGRAM,
    )
    return out.view(qweight.shape)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
