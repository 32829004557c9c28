"""Adapters loaded on demand from a folder of adapter folders, with a bound on how many stay loaded.

Only the batch worker thread changes which adapters are loaded, between generate() calls, so an
adapter is never deleted while a batch runs on it; HTTP handlers only read the lists.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

from ..inspection import is_adapter_folder, summarize_adapter
from ..model import DeltaModel
from .metrics import Metrics

log = logging.getLogger("deltatune.serve")


class UnknownAdapterError(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"No adapter named {name!r}; known adapters: {', '.join(known) or '(none)'}.")
        self.name = name
        self.known = known


class AdapterLoadError(RuntimeError):
    """An adapter folder exists but cannot be loaded (corrupt file, foreign method, other base)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"Adapter {name!r} cannot be loaded: {reason}")
        self.name = name


class AdapterPool:
    """Loads adapters from `adapters_dir/<name>` into `model`, keeping at most `max_resident`.

    The least recently used adapter that the next batch does not need is deleted to make room.
    """

    def __init__(self, model: DeltaModel, adapters_dir: str | Path, max_resident: int, metrics: Metrics) -> None:
        if max_resident < 1:
            raise ValueError(f"max_resident must be at least 1, got {max_resident}.")
        self.model = model
        self.adapters_dir = Path(adapters_dir)
        if not self.adapters_dir.is_dir():
            raise FileNotFoundError(f"Adapters folder {self.adapters_dir} does not exist; pass a folder of adapter folders.")
        self.max_resident = max_resident
        self.metrics = metrics
        self._resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def known(self) -> list[str]:
        """Adapter folders on disk now (re-read each time, so new folders need no restart)."""
        return sorted(p.name for p in self.adapters_dir.iterdir() if not p.name.startswith(".") and is_adapter_folder(p))

    def resident(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        with self._lock:
            return list(self._resident)

    def check_known(self, name: str) -> None:
        """Raise UnknownAdapterError unless `name` is an adapter folder (also stops '../x' names)."""
        known = self.known()
        if name not in known:
            raise UnknownAdapterError(name, known)

    def prepare(self, names: Iterable[str]) -> dict[str, AdapterLoadError]:
        """Make every adapter in `names` resident for the next batch; returns those that failed.

        Called by the batch worker only, with at most max_resident names.
        """
        needed = list(dict.fromkeys(names))
        if len(needed) > self.max_resident:
            raise ValueError(f"A batch may use at most {self.max_resident} adapters, got {len(needed)}.")
        failures: dict[str, AdapterLoadError] = {}
        for name in needed:
            if name in self._resident:
                with self._lock:
                    self._resident.move_to_end(name)
                continue
            try:
                self._check_files(name)
                self._make_room(keep=set(needed))
                self._load(name)
            except AdapterLoadError as err:
                failures[name] = err
        return failures

    def _check_files(self, name: str) -> None:
        """Refuse a broken folder from its headers alone, before evicting anything for it."""
        summary = summarize_adapter(self.adapters_dir / name)
        if not summary.ok:
            self.metrics.count(name, load_failures=1)
            log.warning("cannot load adapter %s: %s", name, summary.error)
            raise AdapterLoadError(name, summary.error or "unreadable adapter folder")

    def _make_room(self, keep: set[str]) -> None:
        while len(self._resident) >= self.max_resident:
            victim = next((n for n in self._resident if n not in keep), None)
            if victim is None:  # cannot happen while batches use at most max_resident adapters
                raise RuntimeError("Every loaded adapter is in use by the next batch; none can be evicted.")
            self._evict(victim)

    def _evict(self, name: str) -> None:
        self.model.delete_adapter(name)
        with self._lock:
            del self._resident[name]
        self.metrics.count(name, evictions=1)
        log.info("evicted adapter %s (max resident %d)", name, self.max_resident)

    def _load(self, name: str) -> None:
        folder = self.adapters_dir / name
        try:
            self.model.load_adapter(folder, adapter_name=name, activate=False)
        except Exception as err:
            # A bad adapter file may fail in many ways (corrupt header, foreign method, another
            # base model's shapes); each must fail only the requests for this adapter.
            self._discard_partial(name)
            self.metrics.count(name, load_failures=1)
            log.warning("cannot load adapter %s: %s", name, err)
            raise AdapterLoadError(name, str(err)) from err
        with self._lock:
            self._resident[name] = None
        self.metrics.count(name, loads=1)
        log.info("loaded adapter %s from %s", name, folder)

    def _discard_partial(self, name: str) -> None:
        if name in self.model.adapter_names:
            self.model.delete_adapter(name)
