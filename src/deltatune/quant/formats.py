"""4-bit weight formats in plain PyTorch: NF4, FP4 (E2M1) and int4, blockwise, with double quantization.

A weight is cut into blocks of `block_size` values (64 by default, as in QLoRA). Each block is
divided by its absolute maximum, each value is replaced by the index of the nearest of 16 code
values, and two indices are packed into one byte. The per-block absmax constants cost 32 bits /
64 values = 0.5 bits per weight; double quantization stores them instead as int8 around their mean,
with one float32 scale per `nested_block_size` (256) constants: 8/64 + 32/(64·256) ≈ 0.127 bits.

The layout is the one bitsandbytes computes with (same NF4 table, high nibble first, absmax =
code · nested_scale + offset; our int8 codes index its 256-entry table after adding 128), so the
backends in backends.py dequantize these very tensors and give the same values.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace

import torch

QUANT_TYPES = ("nf4", "fp4", "int4")
DEFAULT_BLOCK_SIZE = 64
NESTED_BLOCK_SIZE = 256

# NF4: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA, Dettmers et al. 2023).
# The exact float32 values bitsandbytes uses, so both compute the same dequantized weight.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# FP4 E2M1 (1 sign, 2 exponent, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6), scaled so 6 -> 1.
# Code = sign bit · 8 + magnitude index; codes 0 and 8 are +0 and -0.
FP4_VALUES = tuple(s * m / 6.0 for s in (1.0, -1.0) for m in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0))
# Symmetric int4 (absmax scaling): code k stands for (k - 8) / 7, i.e. the integers -8..7 over 7.
INT4_VALUES = tuple((k - 8) / 7.0 for k in range(16))

_CODEBOOKS = {"nf4": NF4_VALUES, "fp4": FP4_VALUES, "int4": INT4_VALUES}
# Values quantized at once. Small, equal-sized temporaries (12 bytes/value) let the allocator reuse
# its memory; 4M-value chunks raised the peak RSS of load_quantized(SmolLM2) by ~170 MB.
_CHUNK_ELEMENTS = 1 << 20


class QuantizationError(ValueError):
    """A quantization setting cannot work for this tensor."""


def check_quant_type(quant_type: str) -> str:
    key = str(quant_type).lower()
    if key not in _CODEBOOKS:
        raise QuantizationError(f"Unknown 4-bit type {quant_type!r}; choose one of {', '.join(QUANT_TYPES)}.")
    return key


@functools.lru_cache(maxsize=None)
def codebook(quant_type: str, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """The 16 values a 4-bit code stands for (a constant of the format, not stored per layer)."""
    return torch.tensor(_CODEBOOKS[check_quant_type(quant_type)], dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _nearest_code_tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints between sorted code values, code of each sorted slot) for nearest-value search."""
    values = codebook(quant_type, device)
    sorted_values, order = torch.sort(values, stable=True)
    return (sorted_values[1:] + sorted_values[:-1]) / 2, order.to(torch.uint8)


@dataclass
class QuantizedWeight:
    """A 4-bit tensor as stored.

    packed: uint8, two codes per byte (first value in the high nibble), padded to whole blocks.
    absmax: float32 per block, or int8 per block when double-quantized.
    nested_scale / offset: double quantization's float32 scale per `nested_block_size` absmax
        values and the mean they were centred on (None without double quantization).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_scale: torch.Tensor | None
    offset: torch.Tensor | None
    shape: tuple[int, ...]
    quant_type: str
    block_size: int = DEFAULT_BLOCK_SIZE
    nested_block_size: int = NESTED_BLOCK_SIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_scale is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def nbytes(self) -> int:
        """Bytes of everything stored: codes and constants."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bytes_per_param(self) -> float:
        return self.nbytes() / max(self.numel, 1)

    def row_alignment(self) -> int:
        """Row counts at which a 2-D weight can be cut without splitting a block or nested block."""
        width = math.prod(self.shape[1:])
        unit = self.block_size * (self.nested_block_size if self.double_quant else 1)
        return unit // math.gcd(unit, width)

    def row_slice(self, first: int, last: int) -> "QuantizedWeight":
        """Rows [first, last) of a 2-D weight as their own QuantizedWeight (views, no copies).

        `first` must be a multiple of row_alignment(), and so must `last` unless it is the end.
        """
        align, rows = self.row_alignment(), self.shape[0]
        if first % align or (last % align and last != rows) or not 0 <= first < last <= rows:
            raise ValueError(f"Rows [{first}, {last}) of {self.shape} do not fall on block edges (multiples of {align}).")
        width, block = math.prod(self.shape[1:]), self.block_size
        start, stop = first * width // block, -(-last * width // block)
        nested = None
        if self.double_quant:
            nested = self.nested_scale[start // self.nested_block_size : -(-stop // self.nested_block_size)]
        return replace(
            self, packed=self.packed[start * block // 2 : stop * block // 2], absmax=self.absmax[start:stop],
            nested_scale=nested, shape=(last - first, *self.shape[1:]),
        )

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        moved = {name: t.to(device) for name, t in self.tensors().items()}
        return replace(self, **moved)


def block_scales(absmax: torch.Tensor, nested_scale: torch.Tensor | None, offset: torch.Tensor | None, nested_block_size: int = NESTED_BLOCK_SIZE) -> torch.Tensor:
    """The float32 absmax of every block, undoing double quantization if it was used."""
    if nested_scale is None:
        return absmax.float()
    scale = nested_scale.repeat_interleave(nested_block_size)[: absmax.numel()]
    return absmax.float() * scale + offset


def _double_quantize(absmax: torch.Tensor, nested_block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """absmax -> (int8 codes, float32 scale per nested block, float32 mean): constants in 8 bits."""
    # Centring first (as QLoRA does) spends the int8 range on the spread, not on the common size.
    offset = absmax.mean()
    centred = absmax - offset
    pad = (-centred.numel()) % nested_block_size
    groups = torch.nn.functional.pad(centred, (0, pad)).view(-1, nested_block_size)
    scale = (groups.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round(groups / scale[:, None]).clamp(-127, 127).to(torch.int8).flatten()[: absmax.numel()]
    return codes, scale, offset


def _encode(blocks: torch.Tensor, scales: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Nearest-code indices (uint8) of `blocks` (rows of one block) divided by their scale."""
    midpoints, slot_code = _nearest_code_tables(quant_type, blocks.device)
    codes = torch.empty(blocks.shape, dtype=torch.uint8, device=blocks.device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // blocks.shape[1])
    for start in range(0, blocks.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        safe = torch.where(scales[rows] > 0, scales[rows], torch.ones_like(scales[rows]))
        normalised = blocks[rows].float() / safe[:, None]
        codes[rows] = slot_code[torch.bucketize(normalised, midpoints)]
    return codes


def quantize(
    weight: torch.Tensor,
    quant_type: str = "nf4",
    block_size: int = DEFAULT_BLOCK_SIZE,
    double_quant: bool = True,
    nested_block_size: int = NESTED_BLOCK_SIZE,
) -> QuantizedWeight:
    """Quantize any floating tensor to 4 bits blockwise (the reference implementation)."""
    quant_type = check_quant_type(quant_type)
    if block_size <= 0 or block_size % 2:
        raise QuantizationError(f"block_size must be a positive even number (64 in QLoRA), got {block_size}.")
    if not weight.is_floating_point():
        raise QuantizationError(f"Only floating-point weights can be quantized, got {weight.dtype}.")
    shape = tuple(weight.shape)
    if weight.is_meta:
        return _meta_quantized(shape, quant_type, block_size, double_quant, nested_block_size)
    flat = weight.detach().reshape(-1)
    blocks = torch.nn.functional.pad(flat, (0, (-flat.numel()) % block_size)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1).float()
    nested_scale = offset = None
    if double_quant:
        absmax, nested_scale, offset = _double_quantize(absmax, nested_block_size)
    # Codes are chosen against the scale dequantization will really use, so the rounding of the
    # constants is partly absorbed instead of added on top.
    scales = block_scales(absmax, nested_scale, offset, nested_block_size)
    codes = _encode(blocks, scales, quant_type).view(-1, 2)
    packed = (codes[:, 0] << 4) | codes[:, 1]
    return QuantizedWeight(packed, absmax, nested_scale, offset, shape, quant_type, block_size, nested_block_size)


def _meta_quantized(shape: tuple[int, ...], quant_type: str, block_size: int, double_quant: bool, nested_block_size: int) -> QuantizedWeight:
    """Right-sized empty tensors, so memory estimates on the meta device see the 4-bit sizes."""
    blocks = math.ceil(math.prod(shape) / block_size)
    meta = {"device": "meta"}
    packed = torch.empty(blocks * block_size // 2, dtype=torch.uint8, **meta)
    if not double_quant:
        return QuantizedWeight(packed, torch.empty(blocks, **meta), None, None, shape, quant_type, block_size, nested_block_size)
    return QuantizedWeight(
        packed, torch.empty(blocks, dtype=torch.int8, **meta), torch.empty(math.ceil(blocks / nested_block_size), **meta),
        torch.empty((), **meta), shape, quant_type, block_size, nested_block_size,
    )


@functools.lru_cache(maxsize=None)
def byte_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """(256, 2): the two values each packed byte stands for; one lookup per byte, no unpacking."""
    values = codebook(quant_type, device)
    return torch.stack((values.repeat_interleave(16), values.repeat(16)), dim=1)


def dequantize(qweight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight in `dtype`, in plain PyTorch (works on every device, meta included)."""
    if qweight.packed.is_meta:
        return torch.empty(qweight.shape, dtype=dtype, device="meta")
    scales = block_scales(qweight.absmax, qweight.nested_scale, qweight.offset, qweight.nested_block_size)
    pairs = torch.nn.functional.embedding(qweight.packed.int(), byte_table(qweight.quant_type, qweight.packed.device))
    values = pairs.view(-1, qweight.block_size) * scales[:, None]
    return values.flatten()[: qweight.numel].view(qweight.shape).to(dtype)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """‖approx − exact‖ / ‖exact‖ (Frobenius), computed in float64."""
    exact64 = exact.detach().double()
    return ((approx.detach().double() - exact64).norm() / exact64.norm().clamp_min(1e-30)).item()
