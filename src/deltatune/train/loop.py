"""One training loop for every method and for full fine-tuning alike.

The comparison between methods is only fair when they share everything but
the method: the optimizer (AdamW over exactly the parameters that require
grad), schedule, precision, batching, clipping and data order all live here.

Reproducibility: the data order is a pure function of ``(seed, position)``
(one fixed permutation of the dataset per epoch, consumed as an endless
stream of batches), and a checkpoint stores the position together with the
trainable weights, optimizer, scheduler and RNG states. A run killed and
resumed therefore ends with the same weights, bit for bit on CPU, as one
that was never interrupted.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from deltatune import distributed as dist
from deltatune import hf_compat
from deltatune.config import check_types
from deltatune.train.checkpoint import (
    CheckpointError,
    checkpoints_newest_first,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    trainable_parameters,
)
from deltatune.train.data import pad_collate
from deltatune.train.reporting import check_report_to, make_reporters, numeric_leaves

logger = logging.getLogger("deltatune.train")

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp16", "no")
RESUME_MUST_MATCH = ("batch_size", "grad_accum", "seed")  # they decide the data order: never overridable
# Hyper-parameters a resumed run keeps unless the user says resume_override=True (then recorded).
# (max_steps may grow: training longer is what a resume is often for.)
RESUME_SHOULD_MATCH = ("lr", "weight_decay", "warmup_ratio", "schedule", "max_grad_norm", "mixed_precision")

StepCallback = Callable[[int, nn.Module, torch.optim.Optimizer], Any]


@dataclass
class TrainConfig:
    max_steps: int = 200
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    schedule: str = "linear"  # "linear" | "cosine" | "constant" (after warm-up)
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"  # "auto" (bf16 on CUDA if supported, else fp32) | "bf16" | "fp16" | "no"
    gradient_checkpointing: bool = False
    # Keep the tensors saved for backward in host memory (pinned on CUDA) until backward needs them
    # (torch.autograd.graph.save_on_cpu). With gradient_checkpointing that is each block's input,
    # so a long context's activations no longer grow GPU memory with depth; each costs a copy out
    # and back per step.
    offload_activations: bool = False
    eval_every: int = 0  # optimizer steps between evaluations; 0 = only at the end (if eval_fn given)
    log_every: int = 10
    seed: int = 0
    output_dir: str | None = None
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = none
    resume: bool = False  # continue from output_dir's latest checkpoint when there is one
    progress: bool = True
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" ...
    report_to: list[str] | str = field(default_factory=list)  # "tensorboard" and/or "csv" (train/reporting.py)
    logging_dir: str | None = None  # where they write; default: output_dir/logs
    keep_checkpoints: int = 2  # the newest ones kept: a damaged newest one falls back to the one before
    resume_override: bool = False  # resume even if RESUME_SHOULD_MATCH values changed (recorded in the state)
    # Under torchrun: "ddp", "fsdp2", "auto" (DDP unless the weights crowd a GPU; see
    # deltatune.distributed) or "none" (each process trains alone). batch_size is the global batch,
    # split across the processes, so a run on N processes takes the same steps as one on one.
    distributed: str = "auto"

    def __post_init__(self) -> None:
        check_types(self)  # "false" is no bool, NaN no number: before any comparison below
        self.validate()

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "log_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(
                f"TrainConfig.mixed_precision={self.mixed_precision!r} is not one of {', '.join(PRECISIONS)}"
            )
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"TrainConfig.max_grad_norm must be > 0 (or None for no clipping), got {self.max_grad_norm}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"TrainConfig.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if (self.checkpoint_every or self.resume) and not self.output_dir:
            raise ValueError("TrainConfig.output_dir is required when checkpoint_every > 0 or resume=True")
        self.report_to = check_report_to(self.report_to)
        if self.distributed not in dist.STRATEGIES:
            raise ValueError(f"TrainConfig.distributed={self.distributed!r} is not one of {', '.join(dist.STRATEGIES)}")
        if self.report_to and not (self.logging_dir or self.output_dir):
            raise ValueError("TrainConfig.report_to needs logging_dir (or output_dir) to write into")


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # mean training loss of each optimizer step
    step_times: list[float]  # seconds per optimizer step (evaluation and checkpoints excluded)
    total_time: float  # seconds of this call, all included
    tokens_seen: int  # non-padding tokens consumed (whole run, across resumes)
    eval_history: list[dict] = field(default_factory=list)  # {"step": s, **eval_fn(model)}
    stopped_reason: str = "completed"  # "completed" | "nan_loss"
    checkpoint: str | None = None  # latest checkpoint directory written, if any


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights) turned NaN/inf; training stopped before saving that state."""

    def __init__(self, step: int, what: str, last_checkpoint: str | None, result: TrainResult):
        where = (
            f"the last good checkpoint is kept at {last_checkpoint}"
            if last_checkpoint
            else "no checkpoint was written (set output_dir and checkpoint_every to keep one)"
        )
        super().__init__(
            f"{what} became NaN/inf at optimizer step {step}; training stopped and {where}. "
            f"Try a lower lr, max_grad_norm=1.0, or mixed_precision='no'."
        )
        self.step = step
        self.last_checkpoint = last_checkpoint
        self.result = result


# --------------------------------------------------------------------------- public helpers


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so model init and training repeat exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available; use device='cpu' or 'auto'")
    return resolved


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this device, or None for full fp32."""
    if mixed_precision == "no":
        return None
    if mixed_precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None  # CPU autocast is slower than fp32 on most CPUs, and less exact
    if mixed_precision == "fp16":
        if device.type != "cuda":
            raise ValueError("mixed_precision='fp16' needs a CUDA device; use 'bf16' or 'no' on CPU")
        return torch.float16
    return torch.bfloat16


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation checkpointing on the (possibly wrapped) Hugging Face base.

    Non-reentrant checkpointing recomputes correctly even when every input
    of a checkpointed block is frozen (the PEFT case), so no
    ``enable_input_require_grads`` hook is needed.
    """
    base = getattr(model, "model", model)
    checkpoint_kwargs = {"use_reentrant": False}
    if hf_compat.supports_checkpointing(base):
        hf_compat.enable_checkpointing(base, checkpoint_kwargs)
    else:
        raise ValueError(
            f"gradient_checkpointing=True needs a model that can recompute its activations "
            f"(a Hugging Face PreTrainedModel); {type(base).__name__} cannot. "
            f"Set gradient_checkpointing=False"
        )
    config = getattr(base, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False  # the KV cache is useless in training and conflicts with recomputation


def lr_multiplier(step: int, max_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warm-up to 1, then linear/cosine decay to 0 at ``max_steps`` (or constant)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_optimizer(params: Sequence[nn.Parameter], config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable params; biases and norm weights (1-D) get no weight decay."""
    if config.weight_decay > 0:
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        groups = [group for group in groups if group["params"]]
    else:
        groups = [{"params": list(params), "weight_decay": 0.0}]
    # The fused kernel is one pass over memory: ~5x faster than foreach for a CPU full
    # fine-tune of MiniLM. Older torch builds or other devices lack it: use foreach there.
    try:
        return torch.optim.AdamW(groups, lr=config.lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=config.lr, foreach=True)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warmup_steps = math.ceil(config.warmup_ratio * config.max_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, config.max_steps, warmup_steps, config.schedule)
    )


class BatchStream:
    """Endless, seed-determined stream of batches: epoch ``e`` is one fixed permutation.

    Batch ``k`` is a pure function of ``(seed, k)``, so a resumed run picks up
    at the exact batch it would have seen, without replaying earlier ones.
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int, collate_fn: Callable[[list], dict],
                 rank: int = 0, world_size: int = 1):
        if len(dataset) == 0:
            raise ValueError("train_data is empty")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} (the global batch) must divide evenly across {world_size} "
                             f"processes; use a multiple of {world_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        # Every process draws the same global batch and keeps its own contiguous slice of it.
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.collate_fn = collate_fn
        self._epoch = -1
        self._order: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(len(self.dataset), generator=generator).tolist()
            self._epoch = epoch
        return self._order

    def batch(self, position: int) -> dict:
        size = len(self.dataset)
        start = position * self.batch_size
        indices = [
            self._permutation(flat // size)[flat % size] for flat in range(start, start + self.batch_size)
        ]
        share = self.batch_size // self.world_size
        indices = indices[self.rank * share : (self.rank + 1) * share]
        return self.collate_fn([self.dataset[index] for index in indices])


# --------------------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    train_data: Any,
    config: TrainConfig,
    *,
    collate_fn: Callable[[list], dict] | None = None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    step_callbacks: Iterable[StepCallback] = (),
) -> TrainResult:
    """Train the parameters of ``model`` that require grad on ``train_data``.

    ``train_data`` is any map-style dataset of dicts of tensors; batches are
    made with ``collate_fn`` (default: the dataset's own ``collate_fn``
    attribute, else padding collate). The model must return a loss for a
    batch that contains ``labels`` (as Hugging Face models do).
    ``eval_fn(model)`` runs every ``eval_every`` steps and at the end, in eval
    mode without grad. ``step_callbacks(step, model, optimizer)`` run after
    each optimizer step (``step`` counts from 1), while gradients still exist,
    before any checkpoint. A model that has ``auxiliary_loss()`` (added to the
    loss when not None) or ``after_optimizer_step(step)`` (called before the
    callbacks), as a DeltaModel does, gets those called too.

    Raises NonFiniteLossError (with ``.result``) when the loss turns NaN/inf.
    """
    config.validate()
    started = time.perf_counter()
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no parameters with requires_grad=True: nothing to train")
    if collate_fn is None:
        collate_fn = getattr(train_data, "collate_fn", None) or pad_collate
    if config.distributed != "none" and dist.launched():
        dist.init_from_env()
    strategy = dist.resolve_strategy(config.distributed, model)
    device = dist.device() if strategy != "none" else resolve_device(config.device)

    model.to(device)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    forward_model = dist.prepare(model, strategy)  # DDP's wrapper, or the model sharded in place
    params = list(trainable_parameters(model).values())  # after sharding: FSDP2 makes new ones
    precision = autocast_dtype(config.mixed_precision, device)
    scaler = torch.amp.GradScaler("cuda") if precision == torch.float16 else None
    optimizer = build_optimizer(params, config, device)
    scheduler = build_scheduler(optimizer, config)
    parts = (dist.rank(), dist.world_size()) if strategy != "none" else (0, 1)
    stream = BatchStream(train_data, config.batch_size, config.seed, collate_fn, *parts)

    state = _fresh_state(config, len(train_data))
    found = _readable_checkpoint(config.output_dir) if config.resume else None
    checkpoint = found[0] if found else None
    if found is not None:
        state = _resume(*found, config, len(train_data), model, optimizer, scheduler, scaler)
    else:
        seed_everything(config.seed)

    runner = _Runner(model, config, device, precision, scaler, optimizer, scheduler, stream, eval_fn,
                     list(step_callbacks), state, str(checkpoint) if checkpoint else None,
                     forward_model if strategy != "none" else None)
    result = runner.run()
    result.total_time = time.perf_counter() - started
    return result


def _fresh_state(config: TrainConfig, dataset_size: int) -> dict[str, Any]:
    return {
        "step": 0,
        "dataset_size": dataset_size,
        "data_position": 0,
        "tokens_seen": 0,
        "losses": [],
        "step_times": [],
        "eval_history": [],
        "config": asdict(config),
    }


def _readable_checkpoint(output_dir: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint whose files all read back (latest.json's first), with its data."""
    candidates: list[Path] = []
    try:
        pointed = latest_checkpoint(output_dir)
        candidates += [pointed] if pointed else []
    except (OSError, ValueError) as err:  # a missing target or a damaged pointer
        logger.warning("%s/latest.json is unusable (%s); looking at the checkpoints themselves", output_dir, err)
    if Path(output_dir).is_dir():
        candidates += [c for c in checkpoints_newest_first(output_dir) if c not in candidates]
    problems = []
    for checkpoint in candidates:
        try:
            return checkpoint, read_checkpoint(checkpoint)
        except CheckpointError as err:
            problems.append(str(err))
            logger.warning("%s Trying the checkpoint before it.", err)
    if problems:
        raise CheckpointError("No readable checkpoint to resume from: " + " ".join(problems))
    return None


def _resume(checkpoint, data, config, dataset_size, model, optimizer, scheduler, scaler) -> dict[str, Any]:
    saved = data["state.json"]["trainer"]
    # Checked before any weight is overwritten: each would silently change the data order.
    for name in RESUME_MUST_MATCH:
        if saved["config"].get(name) != getattr(config, name):
            raise ValueError(
                f"cannot resume from {checkpoint}: it was trained with {name}={saved['config'].get(name)}, "
                f"now {name}={getattr(config, name)}; use the same value or a new output_dir"
            )
    if saved.get("dataset_size", dataset_size) != dataset_size:
        raise ValueError(
            f"cannot resume from {checkpoint}: it was trained on {saved['dataset_size']} examples, "
            f"now train_data has {dataset_size}; resume with the same data or use a new output_dir"
        )
    changed = {name: (saved["config"].get(name), getattr(config, name)) for name in RESUME_SHOULD_MATCH
               if name in saved["config"] and saved["config"][name] != getattr(config, name)}
    if changed and not config.resume_override:
        listed = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changed.items())
        raise ValueError(
            f"cannot resume from {checkpoint} with changed hyper-parameters ({listed}); use the checkpoint's "
            f"values, or resume_override=True (--train-option resume_override=true) to continue with the new ones"
        )
    state = load_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, data=data)
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    if changed:  # the optimizer came back with the old values: the new ones take effect from here
        for group, multiplier in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"] = config.lr
            group["lr"] = config.lr * multiplier(scheduler.last_epoch)
            group["weight_decay"] = config.weight_decay
        scheduler.base_lrs = [config.lr for _ in optimizer.param_groups]
        overrides = state.setdefault("overrides", [])
        overrides.append({"step": state["step"], **{name: {"was": old, "now": new} for name, (old, new) in changed.items()}})
        logger.warning("resuming with changed hyper-parameters: %s", changed)
    state["config"] = asdict(config)
    logger.info("resumed from %s at step %d", checkpoint, state["step"])
    return state


class _Runner:
    """State of one train() call; split out so each phase stays a short method."""

    def __init__(self, model, config, device, precision, scaler, optimizer, scheduler, stream, eval_fn,
                 callbacks, state, last_checkpoint, parallel=None):
        self.model, self.config, self.device = model, config, device
        # Distributed: `parallel` is what runs the forward (DDP's wrapper, or the FSDP2-sharded model);
        # each process's loss is weighted by its share of the global batch's targets.
        self.parallel = parallel
        self.forward_model = parallel if parallel is not None else model
        self.shifted = parallel is not None and hf_compat.shifts_labels(model)
        self.precision, self.scaler = precision, scaler
        self.optimizer, self.scheduler, self.stream = optimizer, scheduler, stream
        self.eval_fn, self.callbacks, self.state = eval_fn, callbacks, state
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.last_checkpoint = last_checkpoint
        self.checkpoint_step = state["step"] if last_checkpoint else None
        # Hooks a DeltaModel offers for methods that need them (e.g. a rank budget, a penalty term),
        # so the loop stays method-agnostic. Plain models have neither.
        self.after_optimizer_step = _optional_method(model, "after_optimizer_step")
        self.auxiliary_loss = _optional_method(model, "auxiliary_loss")

    def run(self) -> TrainResult:
        config, state = self.config, self.state
        self.model.train()
        bar = _progress_bar(config, initial=state["step"])
        window_tokens, window_time = 0, 0.0
        logging_dir = config.logging_dir or (str(Path(config.output_dir) / "logs") if config.output_dir else None)
        self.reporters = make_reporters(config.report_to if dist.is_main() else [], logging_dir)
        try:
            while state["step"] < config.max_steps:
                step_started = time.perf_counter()
                loss, tokens = self._optimizer_step()
                elapsed = time.perf_counter() - step_started
                state["step"] += 1
                state["losses"].append(loss)
                state["step_times"].append(elapsed)
                state["tokens_seen"] += tokens
                window_tokens, window_time = window_tokens + tokens, window_time + elapsed
                bar.update(1)
                if self.after_optimizer_step is not None:
                    self.after_optimizer_step(state["step"])
                for callback in self.callbacks:
                    callback(state["step"], self.model, self.optimizer)
                self.optimizer.zero_grad(set_to_none=True)
                if config.log_every and (state["step"] % config.log_every == 0 or state["step"] == config.max_steps):
                    self._log(bar, window_tokens / max(window_time, 1e-9))
                    window_tokens, window_time = 0, 0.0
                self._maybe_evaluate()
                self._maybe_checkpoint()
            self._maybe_evaluate(final=True)
            self._maybe_checkpoint(final=True)
        finally:
            bar.close()
            self.optimizer.zero_grad(set_to_none=True)
            for reporter in self.reporters:
                reporter.close()
        return self._result("completed")

    def _optimizer_step(self) -> tuple[float, int]:
        config, state = self.config, self.state
        total_loss, tokens, weights, finite = 0.0, 0, 0.0, True
        for micro in range(config.grad_accum):
            batch = _to_device(self.stream.batch(state["data_position"]), self.device)
            state["data_position"] += 1
            tokens += _count_tokens(batch)
            with self._no_sync(micro < config.grad_accum - 1):
                with autocast_context(self.device, self.precision), self._activation_storage():
                    loss = _loss_of(self.forward_model(**batch))
                    if self.auxiliary_loss is not None:
                        extra = self.auxiliary_loss()
                        if extra is not None:
                            loss = loss + extra
                finite = finite and bool(torch.isfinite(loss.detach()))
                # One process alone stops at once; under a process group all must reach the same
                # decision, so the step completes and the verdict is shared below.
                if not finite and self.parallel is None:
                    self._stop(state["step"] + 1, "the training loss")
                weight = self._batch_weight(batch)
                scaled = loss * weight / config.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total_loss += loss.item() * weight
            weights += weight
        if self.parallel is not None:
            total_loss, tokens, failed = self._shared_totals(total_loss, tokens, not finite)
            if failed:
                self._stop(state["step"] + 1, "the training loss")
            return total_loss / config.grad_accum, tokens
        self._clip_and_step()
        return total_loss / weights, tokens

    def _activation_storage(self) -> Any:
        """Where the forward's saved tensors wait for backward: host memory with offload_activations."""
        if not self.config.offload_activations:
            return nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")

    def _no_sync(self, skip: bool) -> Any:
        """DDP all-reduces gradients on the last micro-batch only."""
        if skip and hasattr(self.parallel, "no_sync"):
            return self.parallel.no_sync()
        return nullcontext()

    def _batch_weight(self, batch: dict) -> float:
        """1 alone. Under a process group, world x this process's share of the global batch's
        targets: DDP and FSDP2 average gradients over processes, and a mean over each process's
        targets weighted so equals the mean over the whole batch, as one process computes it."""
        if self.parallel is None:
            return 1.0
        mine = _target_count(batch, self.shifted)
        total = dist.all_sum(mine)
        return dist.world_size() * mine / total if total else 1.0

    def _shared_totals(self, loss_sum: float, tokens: int, failed: bool) -> tuple[float, int, bool]:
        """Loss (whole-batch mean), tokens and the non-finite verdict over all processes, then the
        optimizer step when all is well."""
        loss_sum = dist.all_sum(loss_sum if math.isfinite(loss_sum) else 0.0) / dist.world_size()
        tokens = int(dist.all_sum(tokens))
        failed = dist.all_sum(1.0 if failed else 0.0) > 0
        if not failed:
            self._clip_and_step()
        return loss_sum, tokens, failed

    def _clip_and_step(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm is not None:
            norm = dist.gather_full(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
            # With fp16 the scaler skips overflowing steps itself; elsewhere inf grads are fatal.
            if self.scaler is None and not torch.isfinite(norm):
                self._stop(self.state["step"] + 1, "the gradient norm")
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()

    def _maybe_evaluate(self, final: bool = False) -> None:
        if self.eval_fn is None:
            return
        step, history = self.state["step"], self.state["eval_history"]
        if history and history[-1]["step"] == step:
            return
        due = self.config.eval_every and step % self.config.eval_every == 0
        if final or due:
            history.append({"step": step, **run_eval(self.eval_fn, self.model)})
            self._report(step, numeric_leaves({k: v for k, v in history[-1].items() if k != "step"}, "eval"))

    def _report(self, step: int, values: dict[str, float]) -> None:
        for reporter in self.reporters:
            reporter.report(step, values)

    def _maybe_checkpoint(self, final: bool = False) -> None:
        every, step = self.config.checkpoint_every, self.state["step"]
        if not every or step == self.checkpoint_step:
            return
        if not final and step % every != 0:
            return
        if not all(torch.isfinite(p.detach()).all() for p in self.params):
            self._stop(step, "a trainable weight")
        if self.scaler is not None:
            self.state["grad_scaler"] = self.scaler.state_dict()
        path = save_checkpoint(
            self.config.output_dir,
            step=step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state=self.state,
            keep=self.config.keep_checkpoints,
        )
        self.last_checkpoint, self.checkpoint_step = str(path), step

    def _stop(self, step: int, what: str) -> None:
        raise NonFiniteLossError(step, what, self.last_checkpoint, self._result("nan_loss"))

    def _log(self, bar, tokens_per_second: float) -> None:
        recent = self.state["losses"][-self.config.log_every :]
        loss = sum(recent) / len(recent)
        lr = self.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:,.0f}", lr=f"{lr:.2e}", refresh=False)
        self._report(self.state["step"], {"train/loss": loss, "train/lr": lr, "train/tokens_per_second": tokens_per_second})
        if not self.config.progress and dist.is_main():
            logger.info("step %d/%d loss %.4f %.0f tok/s lr %.2e", self.state["step"],
                        self.config.max_steps, loss, tokens_per_second, lr)

    def _result(self, reason: str) -> TrainResult:
        state = self.state
        return TrainResult(
            steps=state["step"],
            losses=list(state["losses"]),
            step_times=list(state["step_times"]),
            total_time=0.0,
            tokens_seen=state["tokens_seen"],
            eval_history=list(state["eval_history"]),
            stopped_reason=reason,
            checkpoint=self.last_checkpoint,
        )


def run_eval(eval_fn: Callable[[nn.Module], dict], model: nn.Module) -> dict:
    """Call ``eval_fn`` in eval mode without grad, then restore the previous mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return dict(eval_fn(model))
    finally:
        model.train(was_training)


def _optional_method(model: nn.Module, name: str) -> Callable | None:
    try:
        method = getattr(model, name)
    except AttributeError:
        return None
    return method if callable(method) else None


def _progress_bar(config: TrainConfig, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=config.max_steps, initial=initial, disable=not config.progress or not dist.is_main(), unit="step",
                desc="train", dynamic_ncols=True)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def _count_tokens(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "input_ids" in batch:
        return batch["input_ids"].numel()
    return 0


def _target_count(batch: dict, shifted: bool) -> int:
    """How many targets the batch's loss averages over: labelled positions (-100 is ignored; a
    causal LM never predicts a row's first label), or its rows when it has no labels tensor."""
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor):
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        return int(first.shape[0]) if first is not None and first.dim() else 1
    if shifted and labels.dim() >= 2:
        labels = labels[..., 1:]
    return int((labels != -100).sum())


def _loss_of(output: Any) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None and isinstance(output, torch.Tensor) and output.dim() == 0:
        loss = output
    if loss is None:
        raise ValueError(
            "the model returned no loss: pass batches that contain 'labels' to a Hugging Face model, "
            "or make the model's forward return a dict/object with a 'loss' field"
        )
    return loss
