"""Triton kernels behind the CUDA path. Imported only when a CUDA tensor and Triton are present.

Every kernel reproduces the rounding points of the PyTorch code it replaces (HF computes
``silu(gate)`` in bf16, then the product in bf16, and so on), so that the fused and the unfused
model agree to bf16 noise. Each is one pass over its tensors, which is the whole point: these ops
are memory bound and HF runs each of them as several kernels with float32 temporaries.
``(v).to(storage_dtype).to(tl.float32)`` marks where an unfused op would have rounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


# ----------------------------------------------------------------------------- cross-entropy
@triton.jit
def _capped(x, cap, SOFTCAP: tl.constexpr):
    """(logit the loss sees, its derivative by the raw logit): cap * tanh(x / cap) with SOFTCAP."""
    if SOFTCAP:
        squashed = _tanh(x / cap)
        capped = squashed * cap
        slope = 1.0 - squashed * squashed
    else:
        capped = x
        slope = x * 0.0 + 1.0  # ones, shaped like x
    return capped, slope


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, labels_ptr, loss_ptr, stride_row, n_cols, ignore_index, cap,
                               BLOCK: tl.constexpr, SOFTCAP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    offsets = tl.arange(0, BLOCK)

    running_max = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
    running_sum = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    for start in range(0, n_cols, BLOCK):
        cols = start + offsets
        in_row = cols < n_cols
        x, _ = _capped(tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32), cap, SOFTCAP)
        x = tl.where(in_row, x, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(x, 0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    valid = label != ignore_index
    target, _ = _capped(tl.load(row_ptr + label, mask=valid, other=0.0).to(tl.float32), cap, SOFTCAP)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))

    # overwrite the logits with d loss_row / d raw logits = (softmax - onehot) * d capped / d raw
    # (zero for ignored rows)
    for start in range(0, n_cols, BLOCK):
        cols = start + offsets
        in_row = cols < n_cols
        x, slope = _capped(tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32), cap, SOFTCAP)
        grad = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * slope
        grad = tl.where(valid, grad, 0.0)
        tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                       softcap: float | None = None) -> torch.Tensor:
    rows, cols = logits.shape
    losses = torch.empty(rows, device=logits.device, dtype=torch.float32)
    labels = labels.contiguous()
    _cross_entropy_rows_kernel[(rows,)](
        logits, labels, losses, logits.stride(0), cols, ignore_index, float(softcap or 1.0), BLOCK=4096,
        SOFTCAP=softcap is not None, num_warps=8
    )
    return losses


# ----------------------------------------------------------------------------- RMSNorm
# UNIT_OFFSET: Gemma's norm, scaled by (1 + w) in float32 before rounding; else Llama's, rounded then scaled by w.
@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr,
                         UNIT_OFFSET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        y = x * rstd * (1.0 + w)
    else:
        y = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=in_row)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, stride_dy, stride_x, stride_dx, n_cols,
                         BLOCK: tl.constexpr, UNIT_OFFSET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < n_cols
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=in_row, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    x_hat = x * rstd
    if UNIT_OFFSET:
        d_normed = dy * (1.0 + w)
    else:
        d_normed = (dy * w).to(dx_ptr.dtype.element_ty).to(tl.float32)
    dx = rstd * (d_normed - x_hat * (tl.sum(d_normed * x_hat, 0) / n_cols))
    tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=in_row)


def _row_launch(n_cols: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n_cols)
    return block, min(16, max(4, block // 512))


def rms_norm_forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float,
                     unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x2d.shape
    y = torch.empty_like(x2d)
    rstd = torch.empty(rows, device=x2d.device, dtype=torch.float32)
    block, warps = _row_launch(cols)
    _rms_norm_fwd_kernel[(rows,)](x2d, weight, y, rstd, x2d.stride(0), y.stride(0), cols, eps, BLOCK=block,
                                  UNIT_OFFSET=unit_offset, num_warps=warps)
    return y, rstd


def rms_norm_backward(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      unit_offset: bool = False) -> torch.Tensor:
    rows, cols = x2d.shape
    dx = torch.empty_like(x2d)
    block, warps = _row_launch(cols)
    _rms_norm_bwd_kernel[(rows,)](
        dy2d, x2d, weight, rstd, dx, dy2d.stride(0), x2d.stride(0), dx.stride(0), cols, BLOCK=block,
        UNIT_OFFSET=unit_offset, num_warps=warps
    )
    return dx


# ----------------------------------------------------------------------------- gated activations
_ELEMENTWISE_BLOCK = 2048
_SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)
_GELU_CUBIC: tl.constexpr = tl.constexpr(0.044715)


@triton.jit
def _activate_and_grad(gate, GELU: tl.constexpr):
    """(act(gate), act'(gate)) in float32: SiLU, or GELU's tanh approximation."""
    if GELU:
        inner = _SQRT_2_OVER_PI * (gate + _GELU_CUBIC * gate * gate * gate)
        t = _tanh(inner)
        activated = 0.5 * gate * (1.0 + t)
        slope = 0.5 * (1.0 + t) + 0.5 * gate * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * gate * gate)
    else:
        sig = 1.0 / (1.0 + tl.exp(-gate))
        activated = gate * sig
        slope = sig * (1.0 + gate * (1.0 - sig))
    return activated, slope


@triton.jit
def _gated_fwd_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr, GELU: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    gate = tl.load(gate_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    activated, _ = _activate_and_grad(gate, GELU)
    activated = activated.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offsets, (activated * up).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _gated_bwd_kernel(grad_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, n, BLOCK: tl.constexpr, GELU: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    grad = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    activated, slope = _activate_and_grad(gate, GELU)
    activated = activated.to(grad_up_ptr.dtype.element_ty).to(tl.float32)
    grad_activated = (grad * up).to(grad_gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(grad_up_ptr + offsets, (grad * activated).to(grad_up_ptr.dtype.element_ty), mask=inside)
    tl.store(grad_gate_ptr + offsets, (grad_activated * slope).to(grad_gate_ptr.dtype.element_ty), mask=inside)


def gated_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    out = torch.empty_like(gate)
    n = gate.numel()
    _gated_fwd_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](gate, up, out, n, BLOCK=_ELEMENTWISE_BLOCK,
                                                             GELU=activation == "gelu_tanh", num_warps=8)
    return out


def gated_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str,
                   into_inputs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    grad_gate = gate if into_inputs else torch.empty_like(gate)
    grad_up = up if into_inputs else torch.empty_like(up)
    n = gate.numel()
    _gated_bwd_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](
        grad, gate, up, grad_gate, grad_up, n, BLOCK=_ELEMENTWISE_BLOCK, GELU=activation == "gelu_tanh", num_warps=8
    )
    return grad_gate, grad_up


# ----------------------------------------------------------------------------- rotary embedding
@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, seq_len, n_heads,
    sx_b, sx_h, sx_s, sx_d, so_b, so_h, so_s, so_d, sc_b, sc_s, sc_d, ss_b, ss_s, ss_d,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr,
):
    # one program per (batch, position): all heads share that position's cos/sin
    pid = tl.program_id(0)
    b = (pid // seq_len).to(tl.int64)
    s = (pid % seq_len).to(tl.int64)
    d = tl.arange(0, HALF)
    h = tl.arange(0, BLOCK_H)
    cos_row = cos_ptr + b * sc_b + s * sc_s
    sin_row = sin_ptr + b * ss_b + s * ss_s
    c1 = tl.load(cos_row + d * sc_d).to(tl.float32)[None, :]
    c2 = tl.load(cos_row + (d + HALF) * sc_d).to(tl.float32)[None, :]
    s1 = tl.load(sin_row + d * ss_d).to(tl.float32)[None, :]
    s2 = tl.load(sin_row + (d + HALF) * ss_d).to(tl.float32)[None, :]

    heads = h[:, None] < n_heads
    x_first = x_ptr + b * sx_b + s * sx_s + h[:, None] * sx_h + d[None, :] * sx_d
    o_first = out_ptr + b * so_b + s * so_s + h[:, None] * so_h + d[None, :] * so_d
    x1 = tl.load(x_first, mask=heads, other=0.0).to(tl.float32)
    x2 = tl.load(x_first + HALF * sx_d, mask=heads, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    if BACKWARD:
        # transpose of rotate_half: grad1 = g1*c1 + g2*s2, grad2 = g2*c2 - g1*s1
        out1 = (x1 * c1).to(dtype).to(tl.float32) + (x2 * s2).to(dtype).to(tl.float32)
        out2 = (x2 * c2).to(dtype).to(tl.float32) - (x1 * s1).to(dtype).to(tl.float32)
    else:
        # x*cos + rotate_half(x)*sin with rotate_half(x) = (-x2, x1)
        out1 = (x1 * c1).to(dtype).to(tl.float32) - (x2 * s1).to(dtype).to(tl.float32)
        out2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    tl.store(o_first, out1.to(dtype), mask=heads)
    tl.store(o_first + HALF * so_d, out2.to(dtype), mask=heads)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """x (B, H, S, D) any strides; cos, sin broadcastable to (B, S, D)."""
    batch, heads, seq_len, dim = x.shape
    out = torch.empty_like(x)
    cos = cos.expand(batch, seq_len, dim)
    sin = sin.expand(batch, seq_len, dim)
    _rotary_kernel[(batch * seq_len,)](
        x, cos, sin, out, seq_len, heads,
        *x.stride(), *(out.stride()[i] for i in (0, 1, 2, 3)), *cos.stride(), *sin.stride(),
        HALF=dim // 2, BLOCK_H=triton.next_power_of_2(heads), BACKWARD=backward, num_warps=4,
    )
    return out


# ----------------------------------------------------------------------------- per-row LoRA (mixed batches)
# Punica/S-LoRA's SGMV split in two: "shrink" x·Aᵀ to a rank-wide h, "expand" y += h·(sB)ᵀ in place.
# Tokens are (rows × tokens_per_row); each row reads its own slot of the stacked adapters, and a
# row on the base slot (an all-zero adapter) is skipped. The rank is a power of two >= 16 (tl.dot).
@triton.jit
def _row_tokens(slot_ptr, tokens_per_row, BLOCK_T: tl.constexpr):
    """This program's row (axis 0): its slot, and its block (axis 1) of BLOCK_T token indices with their mask."""
    row = tl.program_id(0)
    in_row = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    return tl.load(slot_ptr + row), (row * tokens_per_row + in_row).to(tl.int64), in_row < tokens_per_row


@triton.jit
def _row_lora_shrink_kernel(x_ptr, down_ptr, h_ptr, slot_ptr, tokens_per_row, n_tokens, n_in, cols_per_split, base_slot,
                            RANK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_IN: tl.constexpr):
    # Every tensor is contiguous (few arguments: on the host, a launch costs per argument).
    # Split over the input features (program axis 2): a row holds too few tokens to fill the GPU
    # otherwise (decoding: one), and each split writes its own float32 partial of h.
    slot, tokens, token_ok = _row_tokens(slot_ptr, tokens_per_row, BLOCK_T)
    if slot == base_slot:
        return
    ranks = tl.arange(0, RANK)
    split = tl.program_id(2)
    first = split * cols_per_split
    last = tl.minimum(first + cols_per_split, n_in)
    acc = tl.zeros((BLOCK_T, RANK), dtype=tl.float32)
    down = down_ptr + slot.to(tl.int64) * RANK * n_in
    for start in range(first, last, BLOCK_IN):
        cols = start + tl.arange(0, BLOCK_IN)
        col_ok = cols < last
        x = tl.load(x_ptr + tokens[:, None] * n_in + cols[None, :], mask=token_ok[:, None] & col_ok[None, :], other=0.0)
        a = tl.load(down + ranks[None, :] * n_in + cols[:, None], mask=col_ok[:, None], other=0.0)  # (BLOCK_IN, RANK)
        acc += tl.dot(x, a)
    tl.store(h_ptr + (split * n_tokens + tokens[:, None]) * RANK + ranks[None, :], acc, mask=token_ok[:, None])


@triton.jit
def _row_lora_expand_kernel(h_ptr, up_ptr, y_ptr, slot_ptr, tokens_per_row, n_tokens, n_splits, n_out, base_slot,
                            RANK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_OUT: tl.constexpr):
    slot, tokens, token_ok = _row_tokens(slot_ptr, tokens_per_row, BLOCK_T)
    if slot == base_slot:
        return
    outs = tl.program_id(2) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    out_ok = outs < n_out
    ranks = tl.arange(0, RANK)
    h = tl.zeros((BLOCK_T, RANK), dtype=tl.float32)
    for split in range(0, n_splits):
        h += tl.load(h_ptr + (split * n_tokens + tokens[:, None]) * RANK + ranks[None, :], mask=token_ok[:, None], other=0.0)
    up = tl.load(up_ptr + slot.to(tl.int64) * RANK * n_out + ranks[:, None] * n_out + outs[None, :],
                 mask=out_ok[None, :], other=0.0)  # (RANK, BLOCK_OUT)
    # h and the product are rounded to the storage dtype where torch's x·Aᵀ, then ·B, would round them
    delta = tl.dot(h.to(up_ptr.dtype.element_ty), up)
    y_at = y_ptr + tokens[:, None] * n_out + outs[None, :]
    both_ok = token_ok[:, None] & out_ok[None, :]
    y = tl.load(y_at, mask=both_ok, other=0.0).to(tl.float32)
    delta = delta.to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_at, (y + delta).to(y_ptr.dtype.element_ty), mask=both_ok)


# One token per row (a decode step): no token blocks, so no tl.dot over 16 rows of which 15 are
# padding; each program reduces one block of features for one row with plain multiply-adds.
# Layers that read the same x (q/k/v, gate/up) share one shrink launch: program axis 2 picks the
# layer (up to three down stacks), and each layer's expand reads its RANK columns of the partials.
@triton.jit
def _row_lora_shrink_one_kernel(x_ptr, down0_ptr, down1_ptr, down2_ptr, h_ptr, slot_ptr, n_rows, n_in, base_slot,
                                RANK: tl.constexpr, BLOCK_IN: tl.constexpr):
    row = tl.program_id(0)
    slot = tl.load(slot_ptr + row)
    if slot == base_slot:
        return
    split = tl.program_id(1)
    layer = tl.program_id(2)
    if layer == 0:
        down_ptr = down0_ptr
    elif layer == 1:
        down_ptr = down1_ptr
    else:
        down_ptr = down2_ptr
    cols = split * BLOCK_IN + tl.arange(0, BLOCK_IN)
    col_ok = cols < n_in
    ranks = tl.arange(0, RANK)
    x = tl.load(x_ptr + row.to(tl.int64) * n_in + cols, mask=col_ok, other=0.0).to(tl.float32)
    a = tl.load(down_ptr + slot.to(tl.int64) * RANK * n_in + ranks[:, None] * n_in + cols[None, :],
                mask=col_ok[None, :], other=0.0)  # (RANK, BLOCK_IN)
    partial = tl.sum(a.to(tl.float32) * x[None, :], axis=1)
    width = tl.num_programs(2) * RANK  # partials: (splits, rows, layers · RANK)
    tl.store(h_ptr + (split * n_rows + row) * width + layer * RANK + ranks, partial)


@triton.jit
def _row_lora_expand_one_kernel(h_ptr, up_ptr, y_ptr, slot_ptr, n_rows, n_splits, n_out, base_slot, h_width,
                                RANK: tl.constexpr, SPLITS: tl.constexpr, BLOCK_OUT: tl.constexpr):
    # h_ptr: this layer's first column of partials (splits, rows, h_width)
    row = tl.program_id(0)
    slot = tl.load(slot_ptr + row)
    if slot == base_slot:
        return
    ranks = tl.arange(0, RANK)
    splits = tl.arange(0, SPLITS)  # SPLITS: n_splits rounded up to a power of two
    partials = tl.load(h_ptr + (splits[:, None] * n_rows + row) * h_width + ranks[None, :],
                       mask=(splits < n_splits)[:, None], other=0.0)
    # h and the product rounded to the storage dtype where torch's x·Aᵀ, then ·B, would round them
    h = tl.sum(partials, axis=0).to(up_ptr.dtype.element_ty).to(tl.float32)
    outs = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    out_ok = outs < n_out
    up = tl.load(up_ptr + slot.to(tl.int64) * RANK * n_out + ranks[:, None] * n_out + outs[None, :],
                 mask=out_ok[None, :], other=0.0)  # (RANK, BLOCK_OUT)
    delta = tl.sum(h[:, None] * up.to(tl.float32), axis=0).to(y_ptr.dtype.element_ty).to(tl.float32)
    y_at = y_ptr + row.to(tl.int64) * n_out + outs
    y = tl.load(y_at, mask=out_ok, other=0.0).to(tl.float32)
    tl.store(y_at, (y + delta).to(y_ptr.dtype.element_ty), mask=out_ok)


# (BLOCK_IN, num_warps) of the one-token shrink, (BLOCK_OUT, num_warps) of its expand: the least
# time summed over the 1B and 7B Llama projection shapes on an H200 (benchmarks/row_lora_kernels.py).
# 200 calls in one graph: 3.8-6.2 us a pair against 5.0-10.6 us for the token-block kernels.
ONE_TOKEN_SHRINK, ONE_TOKEN_EXPAND = (128, 4), (256, 1)
ONE_TOKEN_KERNELS = True  # benchmarks turn it off to compare with the token-block kernels
MAX_SHARED_SHRINK = 3  # down stacks one shrink launch reads (q, k, v)


def row_lora_shrink_one(x: torch.Tensor, downs: list[torch.Tensor], row_slot: torch.Tensor, base_slot: int) -> torch.Tensor:
    """Float32 partials (splits, rows, len(downs) · R) of x·Aᵀ for one token per row, one launch for
    up to three layers reading the same x (rows, in); each down (slots, R, in), all of one shape."""
    (rows, n_in), rank = x.shape, downs[0].shape[1]
    block_in, warps = ONE_TOKEN_SHRINK
    splits = triton.cdiv(n_in, block_in)
    partials = torch.empty((splits, rows, len(downs) * rank), dtype=torch.float32, device=x.device)
    pointers = downs + [downs[0]] * (MAX_SHARED_SHRINK - len(downs))  # unused slots: never read
    _row_lora_shrink_one_kernel[(rows, splits, len(downs))](
        x, *pointers, partials, row_slot, rows, n_in, base_slot, RANK=rank, BLOCK_IN=block_in, num_warps=warps,
    )
    return partials


def row_lora_expand_one_(y: torch.Tensor, partials: torch.Tensor, column: int, up: torch.Tensor,
                         row_slot: torch.Tensor, base_slot: int) -> None:
    """y (rows, out) += the rows' h·up, h summed from partials[:, :, column : column + R]."""
    (splits, rows, width), (n_out, rank) = partials.shape, (y.shape[1], up.shape[1])
    block_out, warps = ONE_TOKEN_EXPAND
    _row_lora_expand_one_kernel[(rows, triton.cdiv(n_out, block_out))](
        partials[:, :, column:], up, y, row_slot, rows, splits, n_out, base_slot, width, RANK=rank,
        SPLITS=triton.next_power_of_2(splits), BLOCK_OUT=block_out, num_warps=warps,
    )


_SM_COUNT: dict[int, int] = {}


def _programs_to_fill(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter (TRITON_INTERPRET=1, CPU tests): any count does
        return 64
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 4 * _SM_COUNT[index]


def row_lora_add_(y: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, row_slot: torch.Tensor,
                  base_slot: int) -> None:
    """y (rows·T, out) += per row (x·downᵀ)·up, in place. x (rows·T, in); down (slots, R, in);
    up (slots, R, out); row_slot (rows,). All contiguous; R a power of two >= 16."""
    rows, (n_tokens, n_in) = row_slot.shape[0], x.shape
    if n_tokens == rows and ONE_TOKEN_KERNELS:
        row_lora_expand_one_(y, row_lora_shrink_one(x, [down], row_slot, base_slot), 0, up, row_slot, base_slot)
        return
    tokens_per_row = n_tokens // rows
    rank = down.shape[1]
    decoding = tokens_per_row <= 16
    block_t, block_in = (16, 128) if decoding else (64, 64)
    t_blocks = triton.cdiv(tokens_per_row, block_t)
    chunks = triton.cdiv(n_in, block_in)
    if decoding:  # few programs per split, few partials for the expand to add: 512 features each
        chunks_per_split = 4
    else:
        chunks_per_split = triton.cdiv(chunks, max(1, triton.cdiv(_programs_to_fill(x.device), rows * t_blocks)))
    cols_per_split = chunks_per_split * block_in
    splits = triton.cdiv(n_in, cols_per_split)
    partial_h = torch.empty((splits, n_tokens, rank), dtype=torch.float32, device=x.device)
    _row_lora_shrink_kernel[(rows, t_blocks, splits)](
        x, down, partial_h, row_slot, tokens_per_row, n_tokens, n_in, cols_per_split, base_slot, RANK=rank, BLOCK_T=block_t, BLOCK_IN=block_in, num_warps=4,
    )
    block_out = 256 if decoding else 128
    _row_lora_expand_kernel[(rows, t_blocks, triton.cdiv(y.shape[1], block_out))](
        partial_h, up, y, row_slot, tokens_per_row, n_tokens, splits, y.shape[1], base_slot, RANK=rank, BLOCK_T=block_t, BLOCK_OUT=block_out, num_warps=4,
    )
