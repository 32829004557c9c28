"""Measure what one training step really holds in memory, and how long steps take.

The breakdown is tensor accounting, so it works the same on CPU, CUDA and the meta device:

* weights: every parameter and buffer of the model;
* gradients: the ``.grad`` tensors after ``backward()``;
* optimizer states: every tensor in ``optimizer.state`` after the first ``step()``;
* activations: every tensor autograd saved for backward during the forward pass, caught with
  ``torch.autograd.graph.saved_tensors_hooks`` and counted once per storage; storages that
  belong to parameters are left out because they are already counted as weights;
* outputs: model outputs (logits, loss) held until backward that autograd did not save itself.

Tensors are told apart by their storage (``untyped_storage()._cdata``, the address of the
C++ storage object), so views of one buffer count once and meta tensors work too.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..kernels.cuda_graph import peak_memory_bytes
from ..layer import packed_parameter_count

MIB = 2**20


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of the memory a tensor lives in (shared by all its views)."""
    return tensor.untyped_storage()._cdata


def storage_bytes(tensors: Iterable[torch.Tensor], exclude: set[int] | None = None) -> int:
    """Bytes of the distinct storages behind `tensors`, skipping storages in `exclude`."""
    seen: set[int] = set(exclude or ())
    total = 0
    for tensor in tensors:
        key = storage_key(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def model_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (tied weights counted once)."""
    return storage_bytes(model_tensors(model))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for param in model.parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            params.append(param)
    return params


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) element counts, tied parameters counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        if not param.is_floating_point():
            continue  # packed 4-bit codes made parameters for sharding: counted by packed_parameter_count
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total + packed_parameter_count(model)


def base_storage(model: nn.Module) -> dict[str, Any]:
    """How the frozen base's linear weights are stored: bytes per weight element as held in memory
    (4.0 in float32; about 0.52 for NF4 with double-quantized constants), and for the whole model."""
    from ..quant import quantized_layers, storage_report

    report = storage_report(model)
    layers = quantized_layers(model)
    if layers:
        per_param = report["quantized_bytes_per_param"]
    else:
        linear = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
        weight = linear.weight if linear is not None else next(model.parameters(), None)
        per_param = float(weight.element_size()) if weight is not None else None
    return {
        "quant_type": layers[0][1].quant_type if layers else None,
        "quantized_layers": len(layers),
        "linear_bytes_per_param": per_param,
        "model_bytes_per_param": report["model_bytes_per_param"],
    }


@dataclass
class MemoryBreakdown:
    """Bytes held by one training step, by kind. `peak` is their sum (everything alive at once)."""

    weights: int = 0
    gradients: int = 0
    optimizer_states: int = 0
    activations: int = 0
    outputs: int = 0
    # Information from the allocator/OS when available; not part of `peak`. device_peak counts
    # CUDA-graph pools too (kernels.peak_memory_bytes: an upper bound where a pool grew after the peak).
    device_peak: int | None = None
    process_rss_peak: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.activations + self.outputs

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["peak"] = self.peak
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MemoryBreakdown":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class SavedTensorCounter:
    """Counts the distinct storages autograd saves for backward while the context is open."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {storage_key(t) for t in exclude}
        self._sizes: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key not in self._excluded and key not in self._sizes:
            self._sizes[key] = tensor.untyped_storage().nbytes()
        return tensor

    @property
    def keys(self) -> set[int]:
        return set(self._sizes)

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes.values())

    def __enter__(self) -> "SavedTensorCounter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def output_tensors(outputs: Any) -> list[torch.Tensor]:
    """Tensors in a model output (HF ModelOutput, dict, tuple or tensor)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, Mapping):
        values = list(outputs.values())
    elif isinstance(outputs, (tuple, list)):
        values = list(outputs)
    else:
        return []
    return [t for value in values for t in output_tensors(value)]


def loss_from_outputs(outputs: Any) -> torch.Tensor:
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            "The model returned no loss for a training batch; the batch must hold the labels "
            "(the task's collate function should add a 'labels' key)."
        )
    return loss


def autocast_context(device: torch.device, mixed_precision: str = "auto") -> contextlib.AbstractContextManager:
    """The autocast a training step uses: bf16 on CUDA when supported under "auto", none on CPU."""
    choice = (mixed_precision or "no").lower()
    if choice == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        choice = "bf16" if use_bf16 else "no"
    if choice in {"no", "none", "fp32", "off"}:
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if choice not in dtypes:
        raise ValueError(f"mixed_precision must be one of auto, no, bf16, fp16; got {mixed_precision!r}")
    return torch.autocast(device_type=device.type, dtype=dtypes[choice])


def move_batch(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def measure_training_step(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    device: str | torch.device = "auto",
    mixed_precision: str = "auto",
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
) -> MemoryBreakdown:
    """Run one real training step on `batch` and account for every byte it holds.

    The optimizer runs with learning rate 0, so the weights are left as they were: the probe
    can run before the timed training without changing its result. Gradients and the
    optimizer are dropped afterwards.
    """
    device = resolve_device(device)
    model.to(device)
    model.train()
    params = trainable_parameters(model)
    if not params:
        raise ValueError("The model has no trainable parameters, so there is no training step to measure.")
    make_optimizer = make_optimizer or (lambda ps: torch.optim.AdamW(ps, lr=0.0, weight_decay=0.0))
    optimizer = make_optimizer(params)
    batch = move_batch(batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    weights = storage_bytes(model_tensors(model))
    try:
        with SavedTensorCounter(exclude=model_tensors(model)) as saved, autocast_context(device, mixed_precision):
            outputs = model(**batch)
        loss = loss_from_outputs(outputs)
        excluded = {storage_key(t) for t in model_tensors(model)} | saved.keys
        held_outputs = storage_bytes(output_tensors(outputs), exclude=excluded)
        loss.backward()
        gradients = storage_bytes(p.grad for p in params if p.grad is not None)
        optimizer.step()
        states = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        optimizer_bytes = storage_bytes(states)
        device_peak = peak_memory_bytes(device) if device.type == "cuda" else None
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
    return MemoryBreakdown(
        weights=weights,
        gradients=gradients,
        optimizer_states=optimizer_bytes,
        activations=saved.total_bytes,
        outputs=held_outputs,
        device_peak=device_peak,
    )


class PeakRssSampler:
    """Samples this process's resident memory in a thread; `.peak` is the largest value seen.

    Only for information on CPU: RSS also holds the interpreter, the data and freed memory the
    allocator kept, so it is no breakdown.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        import psutil

        process = psutil.Process(os.getpid())
        while True:
            rss = process.memory_info().rss
            self.peak = rss if self.peak is None else max(self.peak, rss)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "PeakRssSampler":
        try:
            import psutil  # noqa: F401
        except ImportError:  # psutil is optional: RSS is information only
            return self
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


STEP_TIME_QUANTILE = 0.25


def steady_step_time(step_times: list[float], warmup_steps: int = 3) -> float | None:
    """The lower-quartile step time after the first (warm-up) steps; all steps if there are few.

    Methods are trained one after another, so anything else the machine runs in the meantime
    lands on whichever method is training then. Interference only ever adds time, so a low
    quantile measures the method rather than its neighbours (timeit takes the minimum for the
    same reason); the quartile rather than the minimum keeps one lucky step from deciding.
    The wall-clock total is reported beside it, unfiltered.
    """
    if not step_times:
        return None
    steady = sorted(step_times[warmup_steps:] if len(step_times) > 2 * warmup_steps else step_times)
    position = STEP_TIME_QUANTILE * (len(steady) - 1)
    low = int(position)
    high = min(low + 1, len(steady) - 1)
    return float(steady[low] + (steady[high] - steady[low]) * (position - low))


def directory_bytes(path: str | Path) -> int:
    """Bytes of the files under `path` (a file's own size if it is a file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def tied_duplicate_names(model: nn.Module) -> dict[str, str]:
    """{dropped name: kept name} for tensors registered under several names (tied weights), chosen
    as safetensors' save_model chooses (each group keeps its alphabetically first name), so a file
    written from a gathered state dict holds the keys a single-process save holds."""
    groups: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(tensor), []).append(name)
    return {name: sorted(names)[0] for names in groups.values() if len(names) > 1 for name in sorted(names)[1:]}


def save_full_checkpoint(model: nn.Module, directory: str | Path) -> Path:
    """Write the whole model as one safetensors file (what full fine-tuning must store per task)."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.safetensors"
    tmp = path.with_suffix(".safetensors.tmp")
    # save_model drops duplicates of tied weights, as save_pretrained does.
    save_model(model, str(tmp))
    os.replace(tmp, path)
    return path
