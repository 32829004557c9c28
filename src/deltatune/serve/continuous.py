"""The continuous worker: requests join the running decode between its steps and leave as they end.

With the batch worker a request that arrives while a batch generates waits for the whole batch,
and a short answer waits for the longest one beside it. Here one thread owns a ContinuousDecoder:
before each decode step it admits waiting requests into free rows (making their adapters
resident, never evicting one a running row uses), then runs one step for every row and answers
the requests that ended with it.

Adapters whose method cannot route batch rows (soft prompts, partial fine-tuning) are run the
batch worker's way, one group at a time, between steps.
"""

from __future__ import annotations

import logging
import time

from ..continuous import ContinuousDecoder, DecodeRequest
from .adapters import AdapterPool
from .batching import _STOP, BatchWorker, GenerateRows, GenerationError, GenerationJob
from .metrics import Metrics

log = logging.getLogger("deltatune.serve")

JOIN_EVERY_STEPS = 4
MAX_PASSED_OVER = 8  # admission rounds a job may be passed over for its adapter before it blocks the rest


def free_rows_to_join(rows: int) -> int:
    """While rows decode, joiners are let in once this many rows are free (or every JOIN_EVERY_STEPS
    steps): a prefill costs about a decode step's forward, however few rows join."""
    return max(1, rows // 4)


class ContinuousWorker(BatchWorker):
    def __init__(
        self,
        decoder: ContinuousDecoder,
        grouped: GenerateRows,
        pool: AdapterPool,
        metrics: Metrics,
        *,
        batch_wait_s: float,
        max_queue: int = 1024,
    ) -> None:
        """decoder: runs the rows; grouped: generates a group of requests whose adapters cannot
        route rows (MixedBatchGenerator); batch_wait_s: how long the first request of an idle
        server waits for company (later ones join running steps at once)."""
        super().__init__(grouped, pool, metrics, max_batch=decoder.rows, batch_wait_s=batch_wait_s, max_queue=max_queue)
        self.decoder = decoder
        self._stopping = False
        self._join_rows = free_rows_to_join(decoder.rows)
        self._steps_since_join = 0

    def _run(self) -> None:
        while True:
            candidates: list[GenerationJob] = []
            try:
                candidates = self._candidates()
                self._admit(candidates)
                self._step()
            except Exception as err:
                # This thread must survive anything, or every later request would wait for ever;
                # the cache may be half written: the running rows and the joiners fail, the rest
                # (held for later) stay queued, and decoding starts over.
                log.exception("continuous decoding failed")
                failed = [request.tag for request in self.decoder.active] + [job for job in candidates if job.future.running()]
                self._fail_unfinished(failed, GenerationError(f"Generation failed: {err}"))
                self.decoder.reset()
            if self._stopping and not self.decoder.active:
                return

    # -- admission --------------------------------------------------------------------------
    def _candidates(self) -> list[GenerationJob]:
        """Requests that might join before the next step, oldest first: held ones, then new ones,
        up to the free rows. An idle decoder waits for the first one (then batch_wait_s for more)."""
        if self._stopping:
            return []
        free = self.decoder.free_rows
        if self.decoder.active and (free == 0 or free < self._join_rows and self._steps_since_join < JOIN_EVERY_STEPS):
            return []
        # Look past the free rows: jobs whose adapter cannot join now may stand before ones that can.
        wanted = free + self.max_batch
        candidates: list[GenerationJob] = []
        if not self.decoder.active and not self._held:
            first = self._queue.get()
            if first is _STOP:
                self._stopping = True
                return []
            candidates.append(first)
        deadline = time.monotonic() + (self.batch_wait_s if candidates else 0.0)
        while len(candidates) < wanted:
            job = self._take(deadline)
            if job is None:
                break
            if job is _STOP:
                self._stopping = True
                break
            candidates.append(job)
        return candidates

    def _admit(self, candidates: list[GenerationJob]) -> None:
        joining, held = self._choose(candidates)
        self._held.extendleft(reversed(held))  # ahead of anything newer
        if not joining:
            return
        running = [request.tag.adapter for request in self.decoder.active]
        failures = self.pool.prepare([name for name in running + [r.adapter for r in joining] if name is not None])
        requests, grouped = [], []
        for request in joining:
            job: GenerationJob = request.tag
            if job.adapter in failures:
                self.metrics.count(job.adapter, errors=1)
                job.future.set_exception(failures[job.adapter])
            elif self.decoder.routes_rows(job.adapter):
                requests.append(request)
            else:
                grouped.append(job)
        if grouped:
            self._generate(grouped)  # the batch worker's way: one adapter group at a time
        if not requests:
            return
        routable = [request.tag for request in requests]
        self._steps_since_join = 0
        started = time.perf_counter()
        try:
            finished = self.decoder.admit(requests)
        except Exception as err:
            log.exception("prefill of %d requests failed", len(requests))
            self._fail_unfinished(routable, GenerationError(f"Generation failed: {err}"))
            if any(request.tag in routable for request in self.decoder.active):
                raise  # some were placed before the failure: the running rows cannot be trusted
            return
        self.metrics.record_batch([job.adapter for job in routable], time.perf_counter() - started)
        self._answer(finished)

    def _choose(self, candidates: list[GenerationJob]) -> tuple[list[DecodeRequest], list[GenerationJob]]:
        """(requests that join now, each tagged with its job; jobs held for a later step). Jobs
        join in order; one whose adapter would not fit beside the running ones is passed over
        (MAX_PASSED_OVER times at most), and the first that finds no room in the cache holds
        everything after it (so a long request is not overtaken for ever)."""
        running = {request.tag.adapter for request in self.decoder.active}
        held: list[GenerationJob] = []
        requests: list[DecodeRequest] = []
        for index, job in enumerate(candidates):
            if job.future.done():
                continue  # its client went away (cancelled), or it failed in an earlier round
            request = DecodeRequest(job.adapter, job.prompt_ids, job.max_new_tokens, tag=job)
            if not self.decoder.could_ever_fit(request):
                self.metrics.count(job.adapter, errors=1)
                job.future.set_exception(GenerationError(
                    f"The prompt ({len(job.prompt_ids)} tokens) and max_new_tokens={job.max_new_tokens} exceed the "
                    f"server's context of {self.decoder.context} tokens."))
                continue
            adapters = running | {r.adapter for r in requests} | {job.adapter}
            if self._adapter_count(adapters) > self.pool.max_resident:
                job.passed_over += 1
                if job.passed_over > MAX_PASSED_OVER:
                    # Nothing after it joins until it can: the running rows drain until one adapter
                    # has none left, so a busy adapter cannot keep a rare one out for ever.
                    held.extend(candidates[index:])
                    break
                held.append(job)
                continue
            if not self.decoder.fits(requests + [request]):
                held.extend(candidates[index:])
                break
            if not job.future.set_running_or_notify_cancel():
                continue
            requests.append(request)
        return requests, held

    # -- decoding ---------------------------------------------------------------------------
    def _step(self) -> None:
        adapters = [request.tag.adapter for request in self.decoder.active]
        if not adapters:
            return
        started = time.perf_counter()
        finished = self.decoder.step()
        self._steps_since_join += 1
        self.metrics.record_step(adapters, time.perf_counter() - started, self.decoder.captures, self.decoder.prefill_captures,
                                 (self.decoder.step_device_seconds, self.decoder.prefill_device_seconds))
        self._answer(finished)

    def _answer(self, finished: list[tuple[DecodeRequest, list[int]]]) -> None:
        for request, tokens in finished:
            job: GenerationJob = request.tag
            self.metrics.count(job.adapter, completed=1, tokens=len(tokens))
            job.future.set_result(list(tokens))
