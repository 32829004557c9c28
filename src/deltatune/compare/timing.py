"""Step times that a change of load cannot bias: every method timed in interleaved rounds.

Each method trains in its own stretch of time, so a neighbour's program starting halfway through
a comparison slows the methods that come after it and flips their ratio to full fine-tuning.
Here, after training, the trained models take turns: round r times `steps` optimizer steps of
each method on the same batches (the order rotated every round, so no method is always first),
and a ratio is taken within each round. A change of load hits every method of a round alike; the
median of the rounds' ratios is the reported one, their range its spread.

The optimizer is AdamW at learning rate 0 and no weight decay: the step costs what a training
step costs and leaves the trained weights as they were.

The clock. On a GPU it is wall time around a synchronized step. On the CPU it is the process's CPU
time with one intra-op thread: wall time on shared cores does not only stretch, it changes the
ratio, because every parallel region waits for its slowest thread and a neighbour's processes
deschedule threads at random; a method with more, smaller operations (LoRA's rank-wide products)
pays more waits than full fine-tuning's few large ones. Measured with benchmarks/compare_timing.py's
hog (two busy processes on two cores): two threads, wall time, LoRA/full 0.65x idle -> 0.70x busy
and BitFit 0.57x -> 0.48x; one thread, CPU time, 0.61x -> 0.59x and 0.55x -> 0.53x.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .measure import autocast_context, loss_from_outputs, move_batch, trainable_parameters

DEFAULT_ROUNDS = 5
SPREAD_LIMIT = 0.10  # relative range of a ratio over rounds beyond which the table is flagged


def interleaved_step_times(models: dict[str, nn.Module], batches: list[dict[str, Any]], device: torch.device, *,
                           rounds: int = 5, mixed_precision: str = "auto") -> dict[str, list[float]]:
    """Per method, the median seconds of one optimizer step in each round (one entry per round)."""
    if rounds < 1 or not batches or not models:
        raise ValueError(f"need at least one round, batch and model; got {rounds} rounds, {len(batches)} batches, "
                         f"{len(models)} models.")
    batches = [move_batch(batch, device) for batch in batches]
    optimizers = {name: torch.optim.AdamW(trainable_parameters(model), lr=0.0, weight_decay=0.0)
                  for name, model in models.items()}
    names = list(models)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    with _step_clock(device) as clock:
        for name, model in models.items():  # warm-up: allocator, optimizer state, first-call caches
            model.to(device).train()
            _step(model, optimizers[name], batches[0], device, mixed_precision, clock)
        for index in range(rounds):
            for name in names[index % len(names):] + names[: index % len(names)]:
                times = [_step(models[name], optimizers[name], batch, device, mixed_precision, clock) for batch in batches]
                per_round[name].append(statistics.median(times))
    for optimizer in optimizers.values():
        optimizer.state.clear()
    return per_round


def clock_name(device: torch.device) -> str:
    """What the rounds' seconds are, in words (for results.json and the report)."""
    return "wall time, synchronized" if device.type == "cuda" else "process CPU time, one thread"


@contextmanager
def _step_clock(device: torch.device) -> Iterator[Callable[[], float]]:
    """The clock the module docstring explains; on the CPU, one intra-op thread while it runs."""
    if device.type == "cuda":
        yield time.perf_counter
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield time.process_time
    finally:
        torch.set_num_threads(threads)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Any], device: torch.device,
          mixed_precision: str, clock: Callable[[], float]) -> float:
    _sync(device)
    started = clock()
    with autocast_context(device, mixed_precision):
        loss = loss_from_outputs(model(**batch))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return clock() - started


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ratios_to(per_round: dict[str, list[float]], reference: str) -> dict[str, dict[str, Any]]:
    """Per method: its median step time over rounds and, against `reference`, the median of the
    rounds' ratios with their range, and whether the range is wide (> SPREAD_LIMIT of the median)."""
    summary = {}
    for name, times in per_round.items():
        entry: dict[str, Any] = {"step_s": statistics.median(times), "rounds": len(times), "round_step_s": times}
        if reference in per_round:
            ratios = [mine / theirs for mine, theirs in zip(times, per_round[reference])]
            median = statistics.median(ratios)
            entry.update(ratio=median, ratio_low=min(ratios), ratio_high=max(ratios),
                         wide=(max(ratios) - min(ratios)) > SPREAD_LIMIT * median)
        summary[name] = entry
    return summary
