"""A learning-rate range test: a short run whose rate rises exponentially, read for a good rate.

    result = lr_range_test(model, train_data, collate_fn=task.collate)
    result.suggested_lr          # the rate where the smoothed loss fell fastest, capped below the minimum
    result.lrs, result.losses    # the curve, for a plot

Smith (2017), as fastai and PyTorch-Lightning use it: one optimizer step per batch from `min_lr` to
`max_lr`; the loss is smoothed (exponential moving average with bias correction) and the run stops
once it climbs past `divergence` times its best. The suggestion is the rate of the steepest
descent of the smoothed loss against log(lr), never above a tenth of the rate at the loss's
minimum (a rate at the minimum is already on the way to diverging). The model's trainable
parameters are put back afterwards: the test trains nothing. Per-method priors (PEFT methods
want rates ten to a hundred times full fine-tuning's) come out of the data, not a table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from deltatune.train.loop import (
    BatchStream,
    TrainConfig,
    _loss_of,
    _to_device,
    autocast_context,
    autocast_dtype,
    build_optimizer,
    resolve_device,
    seed_everything,
)


@dataclass
class LrRangeResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed
    suggested_lr: float | None = None
    stopped: str = "completed"  # "completed" | "diverged"

    def to_dict(self) -> dict[str, Any]:
        return {"lrs": self.lrs, "losses": self.losses, "suggested_lr": self.suggested_lr, "stopped": self.stopped}


def lr_range_test(
    model: nn.Module,
    train_data: Any,
    *,
    collate_fn: Callable[[list], dict] | None = None,
    batch_size: int = 16,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    steps: int = 60,
    smoothing: float = 0.9,
    divergence: float = 4.0,
    seed: int = 0,
    device: str = "auto",
    mixed_precision: str = "auto",
) -> LrRangeResult:
    """Run the test on the parameters of `model` that require grad; they are restored after."""
    if not 0 < min_lr < max_lr:
        raise ValueError(f"need 0 < min_lr < max_lr, got min_lr={min_lr}, max_lr={max_lr}.")
    if steps < 5:
        raise ValueError(f"steps must be at least 5 for a curve to read, got {steps}.")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters to test a learning rate on.")
    where = resolve_device(device)
    model.to(where)
    saved = [p.detach().clone() for p in params]
    precision = autocast_dtype(mixed_precision, where)
    config = TrainConfig(lr=min_lr, batch_size=batch_size, max_steps=steps, seed=seed, progress=False, device=str(where))
    optimizer = build_optimizer(params, config, where)
    growth = (max_lr / min_lr) ** (1.0 / (steps - 1))
    stream = BatchStream(train_data, batch_size, seed, collate_fn or getattr(train_data, "collate_fn", None) or _default_collate())
    seed_everything(seed)
    result = LrRangeResult()
    average, best = 0.0, math.inf
    was_training = model.training
    model.train()
    try:
        for step in range(steps):
            lr = min_lr * growth**step
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = _to_device(stream.batch(step), where)
            with autocast_context(where, precision):
                loss = _loss_of(model(**batch))
            if not torch.isfinite(loss.detach()):
                result.stopped = "diverged"
                break
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            average = smoothing * average + (1 - smoothing) * loss.item()
            smoothed = average / (1 - smoothing ** (step + 1))
            result.lrs.append(lr)
            result.losses.append(smoothed)
            best = min(best, smoothed)
            if step > 2 and smoothed > divergence * best:
                result.stopped = "diverged"
                break
    finally:
        with torch.no_grad():
            for param, value in zip(params, saved):
                param.copy_(value)
        model.train(was_training)
    result.suggested_lr = suggest(result.lrs, result.losses)
    return result


def suggest(lrs: list[float], losses: list[float]) -> float | None:
    """The rate of the steepest fall of the loss against log(lr), at most a tenth of the minimum's."""
    if len(lrs) < 5:
        return None
    minimum = min(range(len(losses)), key=losses.__getitem__)
    logs = [math.log(lr) for lr in lrs]
    slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, minimum)] if minimum > 1 else []
    steepest = lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)] if slopes else lrs[minimum] / 10
    return min(steepest, lrs[minimum] / 10)


def _default_collate() -> Callable[[list], dict]:
    from deltatune.train.data import pad_collate

    return pad_collate
