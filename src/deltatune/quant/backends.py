"""Which code turns stored 4-bit weights back into floats: PyTorch, our Triton kernel, bitsandbytes.

All read the same stored tensors (see formats.py) and give the same values to float32 rounding,
so the choice changes speed, never results or files.

On the CPU the default is our C kernel (cpu_kernel.py: one pass, OpenMP, built with the system's C
compiler on first use in ~0.1 s and cached), else the reference. Measured on 2 CPU cores
(bitsandbytes 0.50.2, torch 2.13; `python benchmarks/qlora_throughput.py --device cpu
--dequant-bench`), NF4 4096×4096 with double quantization: see that script's docstring for the
figures (the kernel at 1.3x bitsandbytes' compiled CPU path to bf16, 1.6x to float32, the
reference at 0.25-0.5x). Importing bitsandbytes also pulls in torch.compile's machinery, 4-16 s
per process, which a short run never earns back: it is opt-in. On CUDA: our Triton kernel (triton_dequant.py) when Triton is importable,
else bitsandbytes when installed, else the reference. The Triton kernel undoes double quantization
inside its one launch; bitsandbytes takes a launch for the nested constants, conversions of our
int8 codes to its layout and a Python QuantState per call. Measured on the lent H100 in two
runs (benchmarks/qlora_throughput.py --dequant-bench, a 4096×14336 NF4 weight to bf16, calls back
to back): Triton 55-70 us of GPU time (2.1-2.7 TB/s moved) and 40-60 us of host time per call,
bitsandbytes 170-230 us and 170-290 us, the reference 580 us and 140-220 us. On the GPU the Triton
kernel fuses the nested scale's multiply-add (one rounding instead of two), so its float32 values
can differ from the reference's by ~2e-7 relative, as bitsandbytes' do.
torchao 0.18's NF4 was slower than both on CPU and needs its scale blocks to divide the block
count, so it is not used. FP4 and int4 always take the reference: bitsandbytes' FP4 is another
table and it has no int4.

DELTATUNE_QUANT_BACKEND=torch|native|triton|bitsandbytes forces one everywhere (A/B timing, ruling one out).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from . import cpu_kernel
from .formats import QuantizedWeight, block_scales, byte_table, codebook, dequantize as reference_dequantize
from .triton_dequant import triton_available, triton_dequantize

BACKENDS = ("torch", "native", "triton", "bitsandbytes")
_BNB_DEVICES = ("cpu", "cuda")


@functools.lru_cache(maxsize=1)
def _bitsandbytes():
    bnb_logger = logging.getLogger("bitsandbytes")
    level = bnb_logger.level
    # Its CPU backend warns about an optional kernel download we never want; keep the import quiet.
    bnb_logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnb_functional
    except Exception:
        return None
    finally:
        bnb_logger.setLevel(level)
    return bnb_functional


def backend_name(device_type: str = "cpu") -> str:
    """The backend for tensors on `device_type`: the environment's choice, else the default above."""
    chosen = os.environ.get("DELTATUNE_QUANT_BACKEND", "").strip().lower()
    if chosen:
        if chosen not in BACKENDS:
            raise ValueError(f"DELTATUNE_QUANT_BACKEND={chosen!r}; use one of {', '.join(BACKENDS)} or leave it unset.")
        if chosen == "bitsandbytes" and _bitsandbytes() is None:
            raise ImportError("DELTATUNE_QUANT_BACKEND=bitsandbytes but bitsandbytes is not installed: pip install bitsandbytes.")
        if chosen == "triton" and not triton_available():
            raise ImportError("DELTATUNE_QUANT_BACKEND=triton but Triton cannot be imported (or DELTATUNE_DISABLE_TRITON=1).")
        if chosen == "native" and cpu_kernel.load() is None:
            raise ImportError("DELTATUNE_QUANT_BACKEND=native but the CPU kernel could not be built: it needs a C compiler "
                              "(cc, gcc or clang, or $CC) and DELTATUNE_DISABLE_CPU_KERNEL unset.")
        return chosen
    if device_type != "cuda":
        return "native" if device_type == "cpu" and cpu_kernel.load() is not None else "torch"
    if triton_available():
        return "triton"
    return "bitsandbytes" if _bitsandbytes() is not None else "torch"


@functools.lru_cache(maxsize=None)
def _linear_int8_map(device: torch.device) -> torch.Tensor:
    # Our int8 absmax codes q stand for q / 127; bitsandbytes indexes a 256-entry map with q + 128.
    return (torch.arange(256, dtype=torch.float32, device=device) - 128) / 127


def _bnb_dequantize(qweight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    F = _bitsandbytes()
    device = qweight.packed.device
    nested_state = None
    absmax = qweight.absmax
    if qweight.double_quant:
        nested_state = F.QuantState(
            absmax=qweight.nested_scale * 127, code=_linear_int8_map(device), blocksize=qweight.nested_block_size, dtype=torch.float32
        )
        absmax = (absmax.to(torch.int16) + 128).to(torch.uint8)
    padded = qweight.packed.numel() * 2
    state = F.QuantState(
        absmax=absmax, shape=torch.Size([padded]), code=codebook("nf4", device), blocksize=qweight.block_size,
        quant_type="nf4", dtype=dtype, offset=qweight.offset, state2=nested_state,
    )
    flat = F.dequantize_4bit(qweight.packed.view(-1, 1), state)
    return flat[: qweight.numel].view(qweight.shape)


def dequantize(qweight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight in `dtype`, by the chosen backend where it supports the case, else the reference."""
    device_type = qweight.packed.device.type
    if device_type == "meta":
        return reference_dequantize(qweight, dtype)
    backend = backend_name(device_type)
    half_or_float = dtype in (torch.float32, torch.bfloat16, torch.float16)
    if backend == "bitsandbytes" and qweight.quant_type == "nf4" and device_type in _BNB_DEVICES and half_or_float:
        return _bnb_dequantize(qweight, dtype)
    if backend == "native" and cpu_kernel.applies(qweight.packed, qweight.block_size, dtype):
        scales = block_scales(qweight.absmax, qweight.nested_scale, qweight.offset, qweight.nested_block_size)
        pairs = byte_table(qweight.quant_type, qweight.packed.device)
        return cpu_kernel.dequantize(qweight.packed, pairs, scales, qweight.block_size, dtype)[: qweight.numel].view(qweight.shape)
    # Triton runs on CUDA, or anywhere under its interpreter (TRITON_INTERPRET=1: how CPU tests check it).
    if backend == "triton" and half_or_float and (device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        return triton_dequantize(qweight, dtype)
    return reference_dequantize(qweight, dtype)
