"""A C kernel that dequantizes 4-bit weights on the CPU in one pass, built with the system's C
compiler on first use and loaded through ctypes.

The plain PyTorch path makes several passes over the weight (codes to int32, a table gather, the
scale multiply, the cast), each through memory. This reads each packed byte once, looks both
values up in a 256-entry pair table (the byte's two 4-bit codes), multiplies by the block's
float32 scale and writes the output dtype, one block at a time across OpenMP threads. The values
are the reference's bit for bit: one float32 multiply per value, then round-to-nearest-even to
bfloat16 as torch rounds (tests/test_quant.py).

Built with `cc -O3 -fopenmp` (no -march=native: the cached library may be used by another
machine sharing the home directory), into ~/.cache/deltatune (XDG_CACHE_HOME respected) under a
name hashed from the source, the compiler and the platform; written to a temporary file and moved
into place, so concurrent processes never load half a library. No compiler, a failed build or
DELTATUNE_DISABLE_CPU_KERNEL=1: `load()` returns None and callers use the PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("deltatune.quant")

SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* torch's float -> bfloat16: round to nearest even, NaN to the canonical quiet NaN */
static inline uint16_t to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* packed: n_blocks * block_size / 2 bytes, high nibble first; pairs: 256 x 2 floats (the two values
   of each byte); scales: one float per block; out: n_blocks * block_size values (float32, or
   bfloat16 when out_bf16). block_size is even and at most 4096. */
void dequantize_4bit(const uint8_t *packed, const float *pairs, const float *scales, void *out,
                     int64_t n_blocks, int64_t block_size, int out_bf16, int threads) {
    const int64_t half = block_size / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t block = 0; block < n_blocks; ++block) {
        const uint8_t *bytes = packed + block * half;
        const float scale = scales[block];
        float values[4096];
        for (int64_t i = 0; i < half; ++i) {
            const float *pair = pairs + 2 * (int64_t)bytes[i];
            values[2 * i] = pair[0] * scale;
            values[2 * i + 1] = pair[1] * scale;
        }
        if (out_bf16) {
            uint16_t *target = (uint16_t *)out + block * block_size;
            for (int64_t i = 0; i < block_size; ++i) target[i] = to_bf16(values[i]);
        } else {
            memcpy((float *)out + block * block_size, values, (size_t)block_size * sizeof(float));
        }
    }
}
"""

MAX_BLOCK_SIZE = 4096
OUTPUT_DTYPES = (torch.float32, torch.bfloat16)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "deltatune"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(compiler: str, target: Path) -> bool:
    """Compile SOURCE into `target` (with OpenMP if the compiler has it); True on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:
        source = Path(folder) / "dequantize.c"
        source.write_text(SOURCE)
        built = Path(folder) / target.name
        for flags in (["-fopenmp"], []):
            command = [compiler, "-O3", "-shared", "-fPIC", *flags, str(source), "-o", str(built)]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if result.returncode == 0:
                os.replace(built, target)  # atomic: another process sees the old file or the whole new one
                return True
            log.debug("building the CPU dequantize kernel failed (%s): %s", " ".join(command), result.stderr[-500:])
    return False


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None where it cannot be built or loaded."""
    if os.environ.get("DELTATUNE_DISABLE_CPU_KERNEL", "0") == "1":
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\n".join([SOURCE, compiler, version, platform.machine(), sys.platform]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"dequantize_4bit_{key}.so"
        if not target.exists() and not _build(compiler, target):
            return None
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        log.debug("the CPU dequantize kernel is unavailable: %s", error)
        return None
    function = library.dequantize_4bit
    function.restype = None
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    return library


def applies(packed: torch.Tensor, block_size: int, dtype: torch.dtype) -> bool:
    """Whether dequantize() can take this case (CPU, a supported dtype and block size, kernel built)."""
    return (packed.device.type == "cpu" and dtype in OUTPUT_DTYPES and block_size % 2 == 0
            and 0 < block_size <= MAX_BLOCK_SIZE and load() is not None)


def dequantize(packed: torch.Tensor, pairs: torch.Tensor, scales: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(n_blocks * block_size,) values in `dtype` from packed bytes, the (256, 2) float32 pair table
    and one float32 scale per block. Check `applies` first."""
    packed, pairs, scales = packed.contiguous(), pairs.contiguous().float(), scales.contiguous().float()
    n_blocks = scales.numel()
    if packed.numel() * 2 != n_blocks * block_size:
        raise ValueError(f"{packed.numel()} packed bytes do not hold {n_blocks} blocks of {block_size} values.")
    out = torch.empty(n_blocks * block_size, dtype=dtype)
    load().dequantize_4bit(packed.data_ptr(), pairs.data_ptr(), scales.data_ptr(), out.data_ptr(),
                           n_blocks, block_size, int(dtype == torch.bfloat16), torch.get_num_threads())
    return out
