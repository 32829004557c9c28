"""The batch worker: gathers waiting requests into one mixed-adapter batch per generate() call.

One thread owns the model. It takes the first waiting request, keeps collecting for up to
`batch_wait_s` or until `max_batch` rows, makes the batch's adapters resident, and runs one
generate() with a per-row adapter name. Requests that would need more adapters than may be
resident at once wait for the next batch (ahead of newer requests).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..generation import greedy_generate, left_pad, supports_static_decode
from ..model import DeltaModel
from .adapters import AdapterPool
from .metrics import Metrics

log = logging.getLogger("deltatune.serve")


class ServerBusyError(RuntimeError):
    """The request queue is full; the client should retry later."""


class ServerStoppingError(RuntimeError):
    """The server shut down before the request ran."""


class GenerationError(RuntimeError):
    """generate() failed for a batch; the message carries the model's error."""


@dataclass
class GenerationJob:
    """One request's work: token ids in, new token ids out (through `future`)."""

    adapter: str | None
    prompt_ids: list[int]
    max_new_tokens: int
    future: Future = field(default_factory=Future)
    passed_over: int = 0  # admission rounds its adapter did not fit (continuous batching)


# generate_rows(jobs) -> new token ids per job, each at most its job's max_new_tokens long.
GenerateRows = Callable[[Sequence[GenerationJob]], list[list[int]]]

_STOP = object()


class BatchWorker:
    def __init__(
        self,
        generate_rows: GenerateRows,
        pool: AdapterPool,
        metrics: Metrics,
        *,
        max_batch: int,
        batch_wait_s: float,
        max_queue: int = 1024,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}.")
        if batch_wait_s < 0:
            raise ValueError(f"batch wait must be >= 0 ms, got {batch_wait_s * 1000:g}.")
        self.generate_rows = generate_rows
        self.pool = pool
        self.metrics = metrics
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._held: deque[GenerationJob] = deque()  # taken from the queue, run in a later batch
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("The batch worker is already running.")
        self._thread = threading.Thread(target=self._run, name="deltatune-batch-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the running batch, then fail what still waits with ServerStoppingError."""
        if self._thread is None:
            return
        self._queue.put(_STOP)  # blocks only while the queue is full, which the worker drains
        self._thread.join(timeout_s)
        self._thread = None
        self._fail_waiting()

    def submit(self, adapter: str | None, prompt_ids: list[int], max_new_tokens: int) -> Future:
        job = GenerationJob(adapter, prompt_ids, max_new_tokens)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ServerBusyError(f"{self._queue.maxsize} requests are already waiting; retry later.") from None
        return job.future

    # -- the worker thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch, stopping = self._next_batch()
            if batch:
                try:
                    self._process(batch)
                except Exception as err:
                    # This thread must survive anything, or every later request would wait forever.
                    log.exception("batch of %d failed before generation", len(batch))
                    self._fail_unfinished(batch, GenerationError(f"The batch could not run: {err}"))
            if stopping:
                return

    def _next_batch(self) -> tuple[list[GenerationJob], bool]:
        first = self._held.popleft() if self._held else self._queue.get()
        if first is _STOP:
            return [], True
        batch, held, stopping = [first], [], False
        adapters = {first.adapter}
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch:
            job = self._take(deadline)
            if job is None:
                break
            if job is _STOP:
                stopping = True
                break
            if job.adapter not in adapters and self._adapter_count(adapters | {job.adapter}) > self.pool.max_resident:
                held.append(job)  # its adapter would not fit beside this batch's
                continue
            adapters.add(job.adapter)
            batch.append(job)
        # Held jobs were taken before anything still held from earlier rounds: keep that order.
        self._held = deque(held + list(self._held))
        return batch, stopping

    def _take(self, deadline: float) -> GenerationJob | object | None:
        if self._held:
            return self._held.popleft()
        remaining = deadline - time.monotonic()
        try:
            # After the wait, still take requests that already arrived: they cost no waiting.
            return self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    @staticmethod
    def _adapter_count(adapters: set[str | None]) -> int:
        return len(adapters - {None})  # base rows need no resident adapter

    def _process(self, batch: list[GenerationJob]) -> None:
        # A request whose client went away was cancelled: leave it out of the batch.
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
        failures = self.pool.prepare(job.adapter for job in batch if job.adapter is not None)
        ready = []
        for job in batch:
            if job.adapter in failures:
                self.metrics.count(job.adapter, errors=1)
                job.future.set_exception(failures[job.adapter])
            else:
                ready.append(job)
        if ready:
            self._generate(ready)

    def _generate(self, jobs: list[GenerationJob]) -> None:
        started = time.perf_counter()
        try:
            outputs = self.generate_rows(jobs)
        except Exception as err:
            # The failure belongs to this batch: report it to its requests, keep serving others.
            log.exception("batch of %d failed", len(jobs))
            for job in jobs:
                self.metrics.count(job.adapter, errors=1)
                job.future.set_exception(GenerationError(f"Generation failed: {err}"))
            return
        self.metrics.record_batch([job.adapter for job in jobs], time.perf_counter() - started)
        for job, tokens in zip(jobs, outputs):
            self.metrics.count(job.adapter, completed=1, tokens=len(tokens))
            job.future.set_result(tokens)
        names = sorted({job.adapter or "(base)" for job in jobs})
        log.info("batch: %d rows, adapters %s, %.2f s", len(jobs), ",".join(names), time.perf_counter() - started)

    def _fail_unfinished(self, jobs: list[GenerationJob], error: Exception) -> None:
        for job in jobs:
            if not job.future.done():
                self.metrics.count(job.adapter, errors=1)
                job.future.set_exception(error)

    def _fail_waiting(self) -> None:
        waiting = list(self._held)
        self._held.clear()
        while True:
            try:
                waiting.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in waiting:
            if job is not _STOP and job.future.set_running_or_notify_cancel():
                job.future.set_exception(ServerStoppingError("The server is shutting down; the request did not run."))


# ---------------------------------------------------------------- generation
def trim_at_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """Tokens up to and including the first end-of-sequence token (the rest is padding)."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens


class MixedBatchGenerator:
    """Greedy generation of a batch whose rows name their own adapter, in one generate() call.

    Adapters of a method that cannot route rows in one pass are run one adapter group at a
    time instead (set_adapter / disable_adapters), so every method can be served.
    """

    def __init__(self, model: DeltaModel, pad_id: int, eos_ids: set[int]) -> None:
        self.model = model
        self.pad_id = pad_id
        self.eos_ids = eos_ids

    def __call__(self, jobs: Sequence[GenerationJob]) -> list[list[int]]:
        try:
            return self._generate(jobs, [job.adapter for job in jobs])
        except ValueError as err:
            if len({job.adapter for job in jobs}) == 1 and jobs[0].adapter is None:
                raise
            log.info("mixed batch refused (%s); running one adapter at a time", err)
        return self._generate_by_adapter(jobs)

    def _generate_by_adapter(self, jobs: Sequence[GenerationJob]) -> list[list[int]]:
        outputs: list[list[int] | None] = [None] * len(jobs)
        for adapter in dict.fromkeys(job.adapter for job in jobs):
            rows = [i for i, job in enumerate(jobs) if job.adapter == adapter]
            group = [jobs[i] for i in rows]
            if adapter is None:
                with self.model.disable_adapters():
                    results = self._generate(group, None)
            else:
                self.model.set_adapter(adapter)
                results = self._generate(group, None)
            for i, tokens in zip(rows, results):
                outputs[i] = tokens
        return outputs  # type: ignore[return-value]

    def _generate(self, jobs: Sequence[GenerationJob], adapter_names: list[str | None] | None) -> list[list[int]]:
        device = next(self.model.parameters()).device
        input_ids, attention_mask = left_pad([job.prompt_ids for job in jobs], self.pad_id, device)
        # Every row runs as long as the longest request; each is cut to its own limit after.
        longest = max(job.max_new_tokens for job in jobs)
        if supports_static_decode(self.model) is None:
            # A static cache and, on CUDA, each decode step replayed as a CUDA graph.
            output = greedy_generate(self.model, input_ids, longest, attention_mask=attention_mask, adapter_names=adapter_names,
                                     eos_token_id=sorted(self.eos_ids) or None, pad_token_id=self.pad_id)
        else:
            with torch.inference_mode():
                output = self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, adapter_names=adapter_names,
                    max_new_tokens=longest, do_sample=False, num_beams=1, num_return_sequences=1, pad_token_id=self.pad_id,
                )
        new_tokens = output[:, input_ids.shape[1]:].tolist()
        return [trim_at_eos(tokens[: job.max_new_tokens], self.eos_ids) for tokens, job in zip(new_tokens, jobs)]
