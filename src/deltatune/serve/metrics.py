"""Counters the server reports at GET /metrics; updated by the request handlers and the batch worker."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any, Sequence

BASE_KEY = "(base)"  # the metrics key of requests that name no adapter


def adapter_key(adapter: str | None) -> str:
    return BASE_KEY if adapter is None else adapter


@dataclass
class AdapterCounters:
    requests: int = 0
    completed: int = 0
    errors: int = 0
    tokens: int = 0
    loads: int = 0
    load_failures: int = 0
    evictions: int = 0


class Metrics:
    """Thread-safe counters: the worker thread writes while HTTP handlers read and write."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._adapters: dict[str, AdapterCounters] = {}
        self.batches = 0
        self.batched_rows = 0
        self.max_batch_size = 0
        self.mixed_batches = 0
        self.max_adapters_in_batch = 0
        self.decode_steps = 0  # continuous batching: steps, and the rows and adapters in them
        self.stepped_rows = 0
        self.mixed_steps = 0
        self.max_adapters_in_step = 0
        self.prefill_seconds = 0.0  # worker time in prefills (joiners' prompts; whole batches: generate calls)
        self.decode_seconds = 0.0  # continuous batching: worker time in decode steps
        self.graph_captures = 0  # continuous batching: decode steps captured as CUDA graphs
        self.prefill_graph_captures = 0  # and joiners' padded prefill shapes
        self.decode_device_seconds = 0.0  # continuous batching on CUDA: the device's time in decode steps
        self.prefill_device_seconds = 0.0  # and in joiners' prefills

    def _counters(self, adapter: str | None) -> AdapterCounters:
        return self._adapters.setdefault(adapter_key(adapter), AdapterCounters())

    def count(self, adapter: str | None, **increments: int) -> None:
        """Add to one adapter's counters, e.g. count("a", requests=1)."""
        with self._lock:
            counters = self._counters(adapter)
            for name, amount in increments.items():
                setattr(counters, name, getattr(counters, name) + amount)

    def record_batch(self, adapters: Sequence[str | None], seconds: float = 0.0) -> None:
        """One generate() call over rows using `adapters` (base rows count as one kind); under
        continuous batching, the rows that joined the decode together (one prefill). seconds: its time."""
        distinct = len(set(adapters))
        with self._lock:
            self.prefill_seconds += seconds
            self.batches += 1
            self.batched_rows += len(adapters)
            self.max_batch_size = max(self.max_batch_size, len(adapters))
            self.max_adapters_in_batch = max(self.max_adapters_in_batch, distinct)
            self.mixed_batches += distinct > 1

    def record_step(self, adapters: Sequence[str | None], seconds: float, graph_captures: int,
                    prefill_graph_captures: int = 0, device_seconds: tuple[float, float] = (0.0, 0.0)) -> None:
        """One decode step of continuous batching over rows using `adapters`, its time, and the
        decoder's totals so far: CUDA graph captures (of steps, and of prefill shapes) and the
        device's seconds (in steps, and in prefills)."""
        distinct = len(set(adapters))
        with self._lock:
            self.decode_seconds += seconds
            self.graph_captures = graph_captures
            self.prefill_graph_captures = prefill_graph_captures
            self.decode_device_seconds, self.prefill_device_seconds = device_seconds
            self.decode_steps += 1
            self.stepped_rows += len(adapters)
            self.mixed_steps += distinct > 1
            self.max_adapters_in_step = max(self.max_adapters_in_step, distinct)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            adapters = {name: asdict(c) for name, c in sorted(self._adapters.items())}
            batches, rows = self.batches, self.batched_rows
            summary = {
                "batches": batches,
                "mean_batch_size": rows / batches if batches else 0.0,
                "max_batch_size": self.max_batch_size,
                "mixed_batches": self.mixed_batches,
                "max_adapters_in_batch": self.max_adapters_in_batch,
                "decode_steps": self.decode_steps,
                "mean_rows_per_step": self.stepped_rows / self.decode_steps if self.decode_steps else 0.0,
                "mixed_steps": self.mixed_steps,
                "max_adapters_in_step": self.max_adapters_in_step,
                "prefill_seconds": round(self.prefill_seconds, 3),
                "decode_seconds": round(self.decode_seconds, 3),
                "graph_captures": self.graph_captures,
                "prefill_graph_captures": self.prefill_graph_captures,
                "decode_device_seconds": round(self.decode_device_seconds, 3),
                "prefill_device_seconds": round(self.prefill_device_seconds, 3),
            }
        totals = {name: sum(c[name] for c in adapters.values()) for name in AdapterCounters.__dataclass_fields__}
        return {**{f"total_{k}": v for k, v in totals.items()}, **summary, "adapters": adapters}
