"""Triton kernels that dequantize 4-bit weights (any of our formats) on CUDA in one pass.

The reference path (formats.dequantize) takes several kernels and an int32 copy of the codes;
these read each packed byte once, look both codes up in the 16-entry table, undo double
quantization of the block scale and write the two values in the output dtype. The matmul then
runs in cuBLAS. Both are checked against the reference on CPU with TRITON_INTERPRET=1
(tests/test_quant.py).

The block kernel is the one used when block_size is a power of two (64 in QLoRA): each program
takes ROWS whole quantization blocks as a (ROWS, block/2) tile of bytes, loads each block's scale
once, and interleaves the high and low values (tl.join) so each thread stores 16 contiguous bytes.
The byte kernel (one program per BYTES_PER_PROGRAM bytes, two strided stores) covers other block
sizes. On the lent H100 the block kernel dequantizes a 4096×14336 NF4 weight (double quant) to bf16
in 55-70 us (2.1-2.7 TB/s of bytes moved). After the first call for a given argument
specialization the compiled kernel is launched directly (_launch), skipping Triton's per-call
Python binding: 27-60 us of host time per dequantization, against 50-76 us through triton's own
launch in the same kind of run (the host's speed varied by ~1.5x between machines).
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


BLOCKS_PER_PROGRAM = 64


@functools.lru_cache(maxsize=1)
def _block_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dequantize_blocks_kernel(
        packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, out_ptr, n_blocks, n_values,
        HALF: tl.constexpr, ROWS: tl.constexpr, NESTED_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_blocks
        byte = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
        packed = tl.load(packed_ptr + byte, mask=row_ok[:, None], other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + rows, mask=row_ok, other=0).to(tl.float32)
        if DOUBLE_QUANT:
            nested = tl.load(nested_ptr + rows // NESTED_BLOCK, mask=row_ok, other=0)
            scale = scale * nested + tl.load(offset_ptr)
        high = tl.load(code_ptr + (packed >> 4)) * scale[:, None]
        low = tl.load(code_ptr + (packed & 15)) * scale[:, None]
        values = tl.reshape(tl.join(high, low), (ROWS, 2 * HALF))  # high nibble first
        index = rows[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
        tl.store(out_ptr + index, values.to(out_ptr.dtype.element_ty), mask=index < n_values)

    return dequantize_blocks_kernel


# Compiled kernels by (kernel, device, every fact Triton specializes an argument on, constexprs).
# Triton's own launch binds and specializes the arguments in Python on every call (~40-60 us of
# host time on the lent H100, where a QLoRA step dequantizes each weight three times and is bound
# by host time); a compiled kernel launched directly takes a fraction of that.
_COMPILED: dict[tuple, object] = {}


def _specialization(value) -> tuple:
    """What Triton specializes a runtime argument on: a tensor's dtype and 16-byte alignment; an
    integer's being 1, divisible by 16, and fitting in 32 bits. Keying on all of it (and more)
    means a cached kernel is only reused where Triton would have picked the same one."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("bool", value)
    return ("int", value == 1, value % 16 == 0, -(2**31) <= value < 2**31)


def _launch(jit_fn, grid: tuple[int], args: tuple, constexprs: tuple) -> None:
    """jit_fn[grid](*args, *constexprs), straight to the compiled kernel once it exists."""
    device = args[0].device
    if device.type != "cuda":  # the interpreter (TRITON_INTERPRET=1): always the ordinary path
        jit_fn[grid](*args, *constexprs)
        return
    key = (id(jit_fn), device.index, constexprs, tuple(_specialization(a) for a in args))
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = jit_fn[grid](*args, *constexprs)
        if callable(getattr(compiled, "__getitem__", None)):
            _COMPILED[key] = compiled
        return
    grid3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
    compiled[grid3](*args, *constexprs, stream=torch.cuda.current_stream(device).cuda_stream)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def triton_dequantize(qweight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight in `dtype`, computed by the Triton kernel (same values as formats.dequantize)."""
    device = qweight.packed.device
    absmax = qweight.absmax
    nested = qweight.nested_scale if qweight.double_quant else absmax  # unused without double quant
    half = qweight.block_size // 2
    if _is_power_of_two(half) and half >= 2:
        out = torch.empty(qweight.shape, dtype=dtype, device=device)
        offset = qweight.offset if qweight.double_quant else absmax  # read as offset_ptr[0]
        n_blocks = absmax.numel()
        rows = max(1, min(BLOCKS_PER_PROGRAM, 4096 // half))
        _launch(
            _block_kernel(), (triton_cdiv(n_blocks, rows),),
            (qweight.packed, absmax, nested, offset, codebook(qweight.quant_type, device), out, n_blocks, qweight.numel),
            (half, rows, qweight.nested_block_size, qweight.double_quant),
        )
        return out
    out = torch.empty(qweight.numel, dtype=dtype, device=device)
    n_bytes = qweight.packed.numel()
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
