"""Predict a training step's memory and trainable parameters before any training.

The model is built from its config on the meta device (shapes only: no weights are read, no
memory is taken, no arithmetic is done) and made trainable with the method exactly as the
comparison does. Then:

* trainable parameters and weight bytes are counted on that model, so they are exact;
* gradients: one tensor of each trainable parameter's dtype and size;
* optimizer states: AdamW keeps two tensors per trainable parameter (exp_avg, exp_avg_sq)
  plus a 4-byte step counter per parameter tensor;
* activations: one forward pass on meta inputs of the requested batch and sequence length,
  with the same saved-tensor hooks the measurement uses. This follows the real code path of
  the architecture and the method (whatever autograd saves, layer by layer), instead of a
  hand-written per-layer formula that goes stale when transformers changes a layer.

Attention kernels differ by device: with attention dropout, PyTorch's scaled-dot-product
attention on CPU runs the "math" path, which saves the attention probabilities (b·heads·s² per
layer); without dropout on CPU, and always on CUDA, a fused kernel saves only q, k, v, the
output and a log-sum-exp. Meta always runs the math path, so the trace swaps in a stand-in
that saves what the fused kernel saves wherever the device would use one.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .. import hf_compat
from .measure import (
    MIB,
    MemoryBreakdown,
    SavedTensorCounter,
    count_parameters,
    loss_from_outputs,
    model_tensors,
    output_tensors,
    storage_bytes,
    storage_key,
    trainable_parameters,
)
from .methods import apply_method, method_settings, validate_methods
from .presets import MODEL_PRESETS

TASK_KINDS = ("classification", "causal_lm")
ADAMW_STEP_BYTES = 4  # torch keeps AdamW's step count as a float32 scalar tensor per parameter
# Optimizer state tensors per trained parameter, each of the parameter's size, and a step counter.
OPTIMIZERS: dict[str, tuple[int, int]] = {"adamw": (2, ADAMW_STEP_BYTES), "sgd": (0, 0), "sgd_momentum": (1, 0)}
WEIGHT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MethodEstimate:
    method: str
    trainable: int = 0
    total: int = 0
    memory: MemoryBreakdown = field(default_factory=MemoryBreakdown)
    error: str | None = None

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "trainable": self.trainable,
            "total": self.total,
            "percent": self.percent,
            "memory": self.memory.to_dict(),
            "error": self.error,
        }


@dataclass
class EstimateReport:
    """Predicted memory per method for one model shape, batch and sequence length."""

    model: str
    task_kind: str
    batch_size: int
    seq_len: int
    device: str
    mixed_precision: str
    rows: list[MethodEstimate]
    weights_dtype: str = "float32"
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    fsdp2_gpus: int = 1

    def row(self, method: str) -> MethodEstimate:
        for row in self.rows:
            if row.method == method:
                return row
        raise KeyError(f"No estimate for method {method!r}; estimated: {[r.method for r in self.rows]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "task_kind": self.task_kind,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "device": self.device,
            "mixed_precision": self.mixed_precision,
            "weights_dtype": self.weights_dtype,
            "gradient_checkpointing": self.gradient_checkpointing,
            "optimizer": self.optimizer,
            "fsdp2_gpus": self.fsdp2_gpus,
            "rows": [r.to_dict() for r in self.rows],
        }

    def render(self) -> str:
        """A plain-text table (MiB)."""
        header = f"{'method':<12} {'trainable':>14} {'%':>8} {'weights':>9} {'grads':>9} {'optim':>9} {'activ':>9} {'outputs':>9} {'peak':>10}"
        lines = [
            f"Estimate for {self.model} ({self.task_kind}), batch {self.batch_size} x {self.seq_len} tokens, "
            f"{self.device}, mixed precision: {self.mixed_precision}, base weights {self.weights_dtype}, "
            f"{self.optimizer}, checkpointing {'on' if self.gradient_checkpointing else 'off'}"
            + (f"; per GPU of {self.fsdp2_gpus} under FSDP2" if self.fsdp2_gpus > 1 else ""),
            header,
            "-" * len(header),
        ]
        for r in self.rows:
            if r.error:
                lines.append(f"{r.method:<12} failed: {r.error}")
                continue
            m = r.memory
            lines.append(
                f"{r.method:<12} {r.trainable:>14,} {r.percent:>7.3f}% {m.weights / MIB:>9.1f} {m.gradients / MIB:>9.1f} "
                f"{m.optimizer_states / MIB:>9.1f} {m.activations / MIB:>9.1f} {m.outputs / MIB:>9.1f} {m.peak / MIB:>10.1f}"
            )
        lines.append("(MiB; peak = weights + gradients + optimizer states + activations + outputs)")
        return "\n".join(lines)


def _load_config(source: Any) -> tuple[Any, str, str | None]:
    """(transformers config, display name, preset task kind) from a preset, folder or config."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source, type(source).__name__, None
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if text.lower() in MODEL_PRESETS:
            preset = MODEL_PRESETS[text.lower()]
            return preset.make_config(), preset.name, preset.task_kind
        if Path(text).is_dir():
            if not (Path(text) / "config.json").is_file():
                raise ValueError(f"{text} has no config.json; point to a transformers model folder.")
            return AutoConfig.from_pretrained(text), text, None
        raise ValueError(
            f"{text!r} is neither a model folder nor a preset. Presets: {', '.join(MODEL_PRESETS)}."
        )
    raise TypeError(f"Expected a preset name, a model folder, a transformers config or a model; got {type(source).__name__}.")


def infer_task_kind(config: Any) -> str:
    architectures = " ".join(getattr(config, "architectures", None) or [])
    if "SequenceClassification" in architectures:
        return "classification"
    if "CausalLM" in architectures or "LMHead" in architectures:
        return "causal_lm"
    return "classification" if hf_compat.is_encoder_only(config) else "causal_lm"


def _head_modules(model: nn.Module, task_kind: str) -> list[str]:
    """The freshly initialised head a classification task must train beside any adapter."""
    if task_kind != "classification":
        return []
    return [n for n in ("classifier", "score") if isinstance(getattr(model, n, None), nn.Module)]


def build_meta_model(source: Any, task_kind: str | None = None, num_labels: int = 2) -> tuple[nn.Module, str, str]:
    """A model with the architecture of `source` on the meta device: (model, name, task kind)."""
    if isinstance(source, nn.Module):
        config = getattr(source, "config", None)
        if config is None:
            # Not a transformers model, so no config to rebuild it from: move a copy to meta.
            return copy.deepcopy(source).to("meta"), type(source).__name__, task_kind or "classification"
        kind = task_kind or infer_task_kind(config)
        with torch.device("meta"):
            model = type(source)._from_config(copy.deepcopy(config)) if hasattr(type(source), "_from_config") else type(source)(config)
        return model, getattr(config, "_name_or_path", "") or type(source).__name__, kind
    config, name, preset_kind = _load_config(source)
    kind = task_kind or preset_kind or infer_task_kind(config)
    if kind not in TASK_KINDS:
        raise ValueError(f"task_kind must be one of {', '.join(TASK_KINDS)}, got {kind!r}.")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    with torch.device("meta"):
        if kind == "classification":
            config.num_labels = num_labels
            if getattr(config, "pad_token_id", None) is None:
                config.pad_token_id = 0  # decoder classifiers find the last token through it
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    return model, name, kind


class _FusedAttentionShapes(torch.autograd.Function):
    """Stands in for a fused attention kernel (flash / memory-efficient): saves q, k, v, out, lse."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        batch, heads, length, _ = query.shape
        # Fused kernels write the output as (batch, length, heads, dim): the usual transpose
        # back to (batch, length, hidden) is then a view, not a copy.
        out = query.new_empty(batch, length, heads, value.shape[-1]).transpose(1, 2)
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # pragma: no cover - never run on meta
        query, key, value, _, _ = ctx.saved_tensors
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)


def _dropout_of(args: tuple, kwargs: dict) -> float:
    # scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, ...)
    return float(kwargs.get("dropout_p", args[1] if len(args) > 1 else 0.0))


@contextlib.contextmanager
def _attention_as_on(device: str) -> Iterator[None]:
    """Make attention save on meta what it saves on `device`.

    On meta, scaled_dot_product_attention always runs the math path. CUDA always has a fused
    kernel for training; CPU uses its fused (flash) kernel only without attention dropout.
    """
    original = torch.nn.functional.scaled_dot_product_attention

    def as_on_device(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if device == "cuda" or _dropout_of(args, kwargs) == 0.0:
            return _FusedAttentionShapes.apply(query, key, value)
        return original(query, key, value, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = as_on_device
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _meta_batch(task_kind: str, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    input_ids = torch.ones(batch_size, seq_len, dtype=torch.long, device="meta")
    # No attention mask: an all-ones mask is what the model builds itself, and building a
    # padding mask needs data the meta device does not have.
    if task_kind == "classification":
        return {"input_ids": input_ids, "labels": torch.zeros(batch_size, dtype=torch.long, device="meta")}
    return {"input_ids": input_ids, "labels": input_ids}


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, kwargs.get("hidden_states")):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _trace_step(model: nn.Module, batch: dict[str, torch.Tensor], device: str, compute_dtype: torch.dtype | None,
                gradient_checkpointing: bool = False) -> tuple[int, int, list[str]]:
    """(activation bytes, output bytes, notes) from one meta forward pass.

    With checkpointing, each block (hf_compat.checkpointable_blocks) keeps only its input, and
    backward recomputes one block at a time: the saved bytes outside the blocks, plus every
    block's input, plus the largest block's own saved bytes. (transformers' checkpointing itself
    does not run on meta tensors, so the trace measures each block instead.)"""
    notes: list[str] = []
    traced = model
    if compute_dtype is not None:
        # Autocast does not run on meta; a low-precision copy saves the same shapes.
        traced = copy.deepcopy(model).to(compute_dtype)
    traced.train()
    blocks = hf_compat.checkpointable_blocks(traced) if gradient_checkpointing else []
    per_block: list[list[int]] = []  # [input bytes, saved bytes before, saved bytes after]
    with SavedTensorCounter(exclude=model_tensors(traced)) as saved, _attention_as_on(device):
        def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
            tensor = _first_tensor(args, kwargs)
            per_block.append([tensor.numel() * tensor.element_size() if tensor is not None else 0, saved.total_bytes, 0])

        def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            per_block[-1][2] = saved.total_bytes

        handles = [h for b in blocks for h in (b.register_forward_pre_hook(before, with_kwargs=True),
                                                b.register_forward_hook(after, with_kwargs=True))]
        try:
            outputs = traced(**batch)
        finally:
            for handle in handles:
                handle.remove()
    loss_from_outputs(outputs)
    excluded = {storage_key(t) for t in model_tensors(traced)} | saved.keys
    outputs_bytes = storage_bytes(output_tensors(outputs), exclude=excluded)
    activations = saved.total_bytes
    if gradient_checkpointing and per_block:
        inside = [end - start for _, start, end in per_block]
        activations = activations - sum(inside) + sum(size for size, _, _ in per_block) + max(inside)
        notes.append(f"checkpointing {len(per_block)} blocks: their inputs, plus one block recomputed")
    elif gradient_checkpointing:
        notes.append("this model has no checkpointable blocks: activations as without checkpointing")
    if compute_dtype is not None:
        # Autocast keeps a low-precision copy of each matmul weight stored in another dtype for
        # backward; under checkpointing, only one block's at a time.
        element = torch.empty((), dtype=compute_dtype).element_size()
        linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.dtype != compute_dtype]
        copies = sum(m.weight.numel() * element for m in linears)
        if blocks:
            copies = copies - copies * (len(blocks) - 1) // len(blocks)
        if copies:
            activations += copies
            notes.append("includes autocast's low-precision copies of linear weights")
    return activations, outputs_bytes, notes


def _shard_bytes(tensor: torch.Tensor, gpus: int) -> int:
    """Bytes of one rank's FSDP2 shard of `tensor`: dim 0 split in `gpus` chunks, padded to equal size."""
    if tensor.dim() == 0:
        return tensor.element_size()
    rows = -(-tensor.shape[0] // gpus)
    return rows * (tensor.numel() // max(tensor.shape[0], 1)) * tensor.element_size()


def _fsdp2_per_gpu(model: nn.Module, memory: MemoryBreakdown, gpus: int, states: int, step_bytes: int) -> MemoryBreakdown:
    """What one of `gpus` FSDP2 ranks holds (deltatune.distributed.prepare: each block, then the root,
    sharded by parameter): its shards of the parameters (the 4-bit codes among them), of their
    gradients and optimizer states; buffers whole; and what FSDP2 gathers at a time: the block being
    computed and the next one prefetched, and one block's whole gradients before their reduce-scatter.
    Activations are per GPU already (the batch is per GPU)."""
    params = list({id(p): p for p in model.parameters()}.values())
    codes = {id(t): t for m in model.modules() for name in getattr(m, "shardable_buffers", ())
             if (t := m._buffers.get(name)) is not None}
    whole_buffers = [b for b in model.buffers() if id(b) not in codes]
    shardable = [*params, *codes.values()]
    trained = [p for p in params if p.requires_grad]

    def block_bytes(block: nn.Module, grads: bool) -> int:
        tensors = [t for t in [*block.parameters(), *block.buffers()] if (id(t) in codes or isinstance(t, nn.Parameter))]
        return sum(t.numel() * t.element_size() for t in tensors if not grads or t.requires_grad)

    blocks = hf_compat.checkpointable_blocks(model)
    gathered = 2 * max((block_bytes(b, grads=False) for b in blocks), default=0)
    block_grads = max((block_bytes(b, grads=True) for b in blocks), default=0)
    return MemoryBreakdown(
        weights=sum(_shard_bytes(t, gpus) for t in shardable) + storage_bytes(whole_buffers) + gathered,
        gradients=sum(_shard_bytes(p, gpus) for p in trained) + block_grads,
        optimizer_states=sum(states * _shard_bytes(p, gpus) + step_bytes for p in trained),
        activations=memory.activations,
        outputs=memory.outputs,
        notes=[*memory.notes, f"FSDP2 over {gpus} GPUs, per GPU: weights hold {gathered / MIB:.1f} MiB of two "
               f"gathered blocks, gradients {block_grads / MIB:.1f} MiB of one block's before their reduce-scatter"],
    )


def estimate_prepared(model: nn.Module, task_kind: str, batch_size: int, seq_len: int, *, device: str = "cpu",
                      compute_dtype: torch.dtype | None = None, gradient_checkpointing: bool = False,
                      optimizer: str = "adamw", fsdp2_gpus: int = 1) -> tuple[int, int, MemoryBreakdown]:
    """(trainable, total, memory) of a meta model already made trainable by its method; with
    `fsdp2_gpus` > 1, the memory of one GPU of that many under FSDP2 (batch_size per GPU)."""
    params = trainable_parameters(model)
    trainable, total = count_parameters(model)
    gradients = sum(p.numel() * p.element_size() for p in params)
    states, step_bytes = OPTIMIZERS[optimizer]
    optimizer_states = sum(states * p.numel() * p.element_size() + step_bytes for p in params)
    activations, outputs, notes = _trace_step(model, _meta_batch(task_kind, batch_size, seq_len), device, compute_dtype,
                                              gradient_checkpointing)
    memory = MemoryBreakdown(
        weights=storage_bytes(model_tensors(model)),
        gradients=gradients,
        optimizer_states=optimizer_states,
        activations=activations,
        outputs=outputs,
        notes=notes,
    )
    if fsdp2_gpus > 1:
        memory = _fsdp2_per_gpu(model, memory, fsdp2_gpus, states, step_bytes)
    return trainable, total, memory


def estimate(
    model: Any,
    methods: Sequence[str] | str | None = None,
    *,
    batch_size: int = 8,
    seq_len: int = 512,
    task_kind: str | None = None,
    num_labels: int = 2,
    method_options: dict[str, dict[str, Any]] | None = None,
    device: str = "cpu",
    mixed_precision: str = "auto",
    weights_dtype: str = "float32",
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    fsdp2_gpus: int = 1,
) -> EstimateReport:
    """Predict trainable parameters and the memory breakdown of one training step per method.

    model: a preset name (see `deltatune.compare.presets.MODEL_PRESETS`, e.g. "llama-7b"), a
        local transformers model folder, a transformers config, or a model instance.
    methods: "full" and/or registered method names (default: full fine-tuning and every method).
    method_options: {method: {config field: value}} on top of the comparison's settings.
    device: "cpu" or "cuda" (selects the attention kernel's saved tensors and mixed precision).
    mixed_precision: "auto" (bf16 on CUDA, none on CPU), "no", "bf16" or "fp16".
    weights_dtype: how the base is stored: "float32" (mixed precision's master weights), "bfloat16"
        or "float16" (a half-precision base, as PEFT usually trains; adapters stay float32).
    gradient_checkpointing: recompute each block's activations in backward.
    optimizer: "adamw" (two states per trained parameter), "sgd_momentum" (one) or "sgd" (none).
    fsdp2_gpus: > 1 predicts one GPU of that many under FSDP2 (deltatune.distributed.prepare(...,
        "fsdp2")), with batch_size sequences per GPU.
    """
    from .methods import available_compare_methods

    if isinstance(methods, str):
        methods = methods.split(",")
    chosen = validate_methods(methods or available_compare_methods())
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}.")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}.")
    precision = mixed_precision.lower()
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "no"
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be auto, no, bf16 or fp16; got {mixed_precision!r}.")
    if weights_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weights_dtype must be one of {', '.join(WEIGHT_DTYPES)}; got {weights_dtype!r}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}.")
    if isinstance(fsdp2_gpus, bool) or not isinstance(fsdp2_gpus, int) or fsdp2_gpus < 1:
        raise ValueError(f"fsdp2_gpus must be a whole number of GPUs (1 or more), got {fsdp2_gpus!r}.")
    # Built once up front so that a bad model name fails here, not once per method.
    _, name, kind = build_meta_model(model, task_kind, num_labels)
    rows = []
    for method in chosen:
        row = MethodEstimate(method)
        try:
            meta_model, _, _ = build_meta_model(model, kind, num_labels)
            meta_model.to(WEIGHT_DTYPES[weights_dtype])
            settings = method_settings(method, (method_options or {}).get(method))
            calibration = [_meta_batch(kind, batch_size, seq_len)] if settings.needs_calibration_data else None
            with torch.device("meta"):
                prepared = apply_method(meta_model, settings, _head_modules(meta_model, kind), calibration)
            row.trainable, row.total, row.memory = estimate_prepared(
                prepared, kind, batch_size, seq_len, device=device, compute_dtype=compute_dtype,
                gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, fsdp2_gpus=fsdp2_gpus,
            )
        except (ValueError, TypeError) as err:
            row.error = f"{type(err).__name__}: {err}"
        except (RuntimeError, NotImplementedError) as err:
            # e.g. a method whose setup needs real numbers (data-dependent masks) cannot run on meta.
            row.error = f"cannot be traced on the meta device ({type(err).__name__}: {err})"
        rows.append(row)
    return EstimateReport(name, kind, batch_size, seq_len, device, precision, rows, weights_dtype,
                          gradient_checkpointing, optimizer, fsdp2_gpus)


def estimate_error(estimated: MemoryBreakdown, measured: MemoryBreakdown) -> dict[str, float | None]:
    """Relative error (estimate - measured) / measured per component, in percent."""

    def relative(est: int, meas: int) -> float | None:
        return None if not meas else 100.0 * (est - meas) / meas

    return {
        "peak": relative(estimated.peak, measured.peak),
        "weights": relative(estimated.weights, measured.weights),
        "gradients": relative(estimated.gradients, measured.gradients),
        "optimizer_states": relative(estimated.optimizer_states, measured.optimizer_states),
        "activations": relative(estimated.activations, measured.activations),
    }
