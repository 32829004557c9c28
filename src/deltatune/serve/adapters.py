"""Adapters loaded on demand from a folder of adapter folders, with a bound on how many stay loaded.

Only the batch worker thread changes which adapters are loaded, between generate() calls, so an
adapter is never deleted while a batch runs on it; HTTP handlers only read the lists.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

import torch

from ..config import CONFIG_NAME
from ..inspection import is_adapter_folder, summarize_adapter
from ..model import DeltaModel
from .metrics import Metrics

log = logging.getLogger("deltatune.serve")

# Names with a meaning in a request: "__base__" is the plain base model in adapter_names.
RESERVED_NAMES = frozenset({"__base__"})
PATTERN_FIELDS = ("target_modules", "exclude_modules", "layers_pattern")
PATTERN_SECONDS = 2.0
# Matches the patterns against the module names in a child process, which a pattern that
# backtracks for ever cannot freeze: Python's re holds the interpreter while it matches.
_MATCH_PATTERNS = "import json, re, sys; p, names = json.load(sys.stdin); [re.fullmatch(x, n) for x in p for n in names]"


def patterns_finish(patterns: list[str], names: list[str], seconds: float = PATTERN_SECONDS) -> bool:
    """Whether matching every pattern against every name ends within `seconds`."""
    try:
        subprocess.run([sys.executable, "-c", _MATCH_PATTERNS], input=json.dumps([patterns, names]), text=True,
                       timeout=seconds, check=True, capture_output=True)
    except subprocess.TimeoutExpired:
        return False
    except subprocess.CalledProcessError:  # an invalid pattern: the config check reports it
        return True
    return True


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


def compute_dtype(model: DeltaModel) -> torch.dtype | None:
    """The dtype the base model computes in: its input embeddings' (a 4-bit base keeps them in its
    compute dtype), else its first floating-point weight's."""
    embeddings = getattr(model.model, "get_input_embeddings", lambda: None)()
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return next((p.dtype for p in model.model.parameters() if p.is_floating_point()), None)


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
        self._module_names: list[str] | None = None
        # Adapters are held in the base's dtype: mixed batches of a bf16 base then add each row's
        # product in bf16, in place (float32 adapters would cast every layer's input up and back).
        self.dtype = compute_dtype(model)

    def known(self) -> list[str]:
        """Adapter folders on disk now (re-read each time, so new folders need no restart); a
        folder with a reserved name (__base__) is never an adapter."""
        return sorted(p.name for p in self.adapters_dir.iterdir()
                      if not p.name.startswith(".") and p.name not in RESERVED_NAMES and is_adapter_folder(p))

    def resident(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        with self._lock:
            return list(self._resident)

    def check_known(self, name: str) -> None:
        """Raise UnknownAdapterError unless `name` is an adapter folder (also stops '../x' names).
        Looks at that one folder: every request asks, and listing them all costs as many folders."""
        folder = self.adapters_dir / name
        one_folder_down = folder.parent == self.adapters_dir and folder.name == name and "\0" not in name
        if not (one_folder_down and not name.startswith(".") and name not in RESERVED_NAMES and is_adapter_folder(folder)):
            raise UnknownAdapterError(name, self.known())

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
            except Exception as err:  # whatever a file does, it fails its own requests only
                self.metrics.count(name, load_failures=1)
                log.warning("cannot load adapter %s: %s", name, err)
                failures[name] = AdapterLoadError(name, f"{type(err).__name__}: {err}")
        return failures

    def _check_files(self, name: str) -> None:
        """Refuse a broken folder from its headers alone, before evicting anything for it."""
        summary = summarize_adapter(self.adapters_dir / name)
        reason = summary.error if not summary.ok else self._slow_pattern(name)
        if reason:
            self.metrics.count(name, load_failures=1)
            log.warning("cannot load adapter %s: %s", name, reason)
            raise AdapterLoadError(name, reason)

    def _slow_pattern(self, name: str) -> str | None:
        """A regex in the config that would not finish matching this model's module names."""
        config = json.loads((self.adapters_dir / name / CONFIG_NAME).read_text())
        patterns = [config[f] for f in PATTERN_FIELDS if isinstance(config.get(f), str)]
        if not patterns:
            return None
        if self._module_names is None:
            self._module_names = [n for n, _ in self.model.model.named_modules() if n]
        if patterns_finish(patterns, self._module_names):
            return None
        return (f"its pattern {patterns} did not finish matching the model's module names within "
                f"{PATTERN_SECONDS:g} s (catastrophic backtracking?); list the module names instead.")

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
            self.model.load_adapter(folder, adapter_name=name, activate=False, dtype=self.dtype)
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
