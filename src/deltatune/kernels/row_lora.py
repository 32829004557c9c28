"""Per-row LoRA for mixed batches (one adapter per batch row), added into the base output in place.

    y[b, t] += (x[b, t] · A_sᵀ) · (s·B_s)ᵀ        with s = row_slot[b]

The adapters are stacked along a leading slot dimension (`methods/lora`'s mixed-batch stacks;
the last slot is all zeros and marks rows that keep the base output). On CUDA in bf16/fp16 this
is two Triton kernels in the way of Punica's SGMV: shrink to the rank-wide h, expand into y in
place. Neither copies a row's adapter nor computes another adapter's product, and a CUDA graph
captures them as two launches per layer. Elsewhere the same sum runs as batched matmuls.

Over a plain bias-free linear base (`linear_plus_row_lora`), outside a capture, the products are
computed first and the base matmul accumulates onto them (cuBLAS's beta = 1, read in its epilogue
for free): one pass over the output fewer than adding the products afterwards.

Layers that read the same x (a block's q/k/v, its gate/up) may share the shrink of a decode step:
`shrink_for_siblings` runs one launch for all of them and each layer's expand reads its columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ._backend import use_triton

__all__ = ["row_lora_add_", "row_lora_reference", "kernel_rank", "linear_plus_row_lora", "shrink_for_siblings", "SharedShrink"]

_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def kernel_rank(rank: int, device: torch.device) -> int:
    """The rank the stacks are padded to on `device`: a power of two >= 16 where the kernel runs."""
    if device.type != "cuda":
        return rank
    return max(16, 1 << (rank - 1).bit_length())


def row_lora_reference(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, row_slot: torch.Tensor) -> torch.Tensor:
    """The per-row products alone: x (rows, T, in) -> (rows, T, out), each row through its slot."""
    hidden = torch.bmm(x, down.index_select(0, row_slot).transpose(1, 2))
    return torch.bmm(hidden, up.index_select(0, row_slot))


def _kernels_apply(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> bool:
    return (
        use_triton(x, down)
        and torch.cuda.is_current_stream_capturing()
        and x.dtype == down.dtype == up.dtype
        and x.dtype in _KERNEL_DTYPES
        and down.shape[1] == kernel_rank(down.shape[1], x.device)
        and all(t.is_contiguous() for t in (x, down, up))
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, down, up)))
    )


def kernel_applies(y: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether row_lora_add_ runs the Triton kernels for these tensors (else the reference).

    Only while a CUDA graph is being captured: a replay pays nothing per launch, and there the two
    kernels are the least GPU time (a decode step's layer: ~7 us against ~20 us for the masked
    matmuls on an H200). Run eagerly, a Triton launch costs the host ~40 us against ~5 us for an
    ATen op, and an eager forward is bound by the host: the batched matmuls serve it."""
    return (
        _kernels_apply(x, down, up)
        and y.device == x.device
        and y.dtype == x.dtype
        and y.is_contiguous()
        and not (torch.is_grad_enabled() and y.requires_grad)
    )


@dataclass(frozen=True)
class SharedShrink:
    """One layer's x·Aᵀ from a shrink launch shared with its siblings (one token per row)."""

    partials: torch.Tensor  # (splits, rows, siblings · R) float32, summed over splits by the expand
    column: int  # this layer's first column


def shrink_for_siblings(x: torch.Tensor, downs: Sequence[torch.Tensor], row_slot: torch.Tensor,
                        base_slot: int) -> list[SharedShrink] | None:
    """x·Aᵀ for each of several layers reading x (rows, in), one token per row, in one kernel
    launch while a CUDA graph is captured (a decode step: three launches become one for q/k/v);
    None where the kernels do not run. downs: each layer's stacked A (slots, R, in), one shape."""
    if not (len(downs) > 1 and x.dim() == 2 and x.shape[0] == row_slot.shape[0]
            and all(d.shape == downs[0].shape and _kernels_apply(x, d, d) for d in downs)):
        return None
    # imported only where the kernels apply (CUDA with Triton)
    from ._triton_kernels import MAX_SHARED_SHRINK, ONE_TOKEN_KERNELS, row_lora_shrink_one

    if len(downs) > MAX_SHARED_SHRINK or not ONE_TOKEN_KERNELS:
        return None
    partials = row_lora_shrink_one(x, list(downs), row_slot, base_slot)
    return [SharedShrink(partials, index * downs[0].shape[1]) for index in range(len(downs))]


def row_lora_add_(y: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, row_slot: torch.Tensor,
                  base_slot: int, shrunk: SharedShrink | None = None) -> torch.Tensor:
    """y (rows, T, out) += each row's LoRA product of x (rows, T, in), in place where the kernel
    runs (inference); otherwise returns y + product as a new tensor (autograd-safe). Use the result.

    down: (slots, R, in) A stacked; up: (slots, R, out) (s·B)ᵀ stacked; row_slot: (rows,) long;
    base_slot: the all-zero slot (rows on it are left as they are); shrunk: x·downᵀ already
    computed by shrink_for_siblings (then only the expand runs)."""
    if kernel_applies(y, x, down, up):
        y2d, x2d = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        if shrunk is not None and x2d.shape[0] == row_slot.shape[0]:
            from ._triton_kernels import row_lora_expand_one_

            row_lora_expand_one_(y2d, shrunk.partials, shrunk.column, up, row_slot, base_slot)
            return y
        from ._triton_kernels import row_lora_add_ as triton_add

        triton_add(y2d, x2d, down, up, row_slot, base_slot)
        return y
    return y + row_lora_reference(x, down, up, row_slot).to(y.dtype)


def linear_plus_row_lora(x_rows: torch.Tensor, weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                         row_slot: torch.Tensor, base_slot: int, product: Callable[[], torch.Tensor],
                         shrunk: SharedShrink | None = None) -> torch.Tensor:
    """x_rows·weightᵀ plus each row's LoRA product: (rows, T, in) -> (rows, T, out), for a bias-free
    linear base at inference (no autograd through the result; all of one dtype).

    product(): the rows' products as a new contiguous tensor of rows·T·out elements, used where
    the kernels do not run (the caller picks gathered or masked matmuls); shrunk: as in
    row_lora_add_. Measured on an H200 (1B Llama shape, 32 x 256 tokens, 32 adapters): the
    prefill's device time 46.7 -> 45.0 ms against 39.9 ms merged, the base matmuls as fast with
    the accumulation as without."""
    x2d = x_rows.reshape(-1, x_rows.shape[-1])
    if _kernels_apply(x2d, down, up):
        y = x2d @ weight.t()
        row_lora_add_(y, x2d, down, up, row_slot, base_slot, shrunk)
    else:
        y = product().view(x2d.shape[0], -1)
        y.addmm_(x2d, weight.t())
    return y.view(*x_rows.shape[:-1], y.shape[-1])
