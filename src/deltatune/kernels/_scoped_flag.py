"""A per-thread boolean raised for the length of a `with` block (kernels/recompute.py and
kernels/cuda_graph.py mark what the code running inside is for)."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class ScopedFlag:
    """True on a thread inside `with flag.raised():`; a nested scope restores the outer value."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __bool__(self) -> bool:
        return getattr(self._local, "on", False)

    @contextlib.contextmanager
    def raised(self) -> Iterator[None]:
        previous = bool(self)
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = previous
