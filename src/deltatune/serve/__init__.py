"""`deltatune serve`: an HTTP server over one base model that batches requests across adapters.

    from deltatune.serve import create_app
    app = create_app(base_model, tokenizer, "adapters/")   # then run it with uvicorn

Needs the `serve` extra: pip install 'deltatune[serve]' (FastAPI and uvicorn).
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
except ImportError as err:  # pragma: no cover (depends on the install)
    raise ImportError("deltatune's server needs FastAPI and uvicorn: pip install 'deltatune[serve]'.") from err

from .adapters import AdapterLoadError, AdapterPool, UnknownAdapterError
from .batching import BatchWorker, MixedBatchGenerator
from .metrics import Metrics
from .server import GenerateRequest, create_app, load_base_model, serve, serving_in_background

__all__ = [
    "AdapterLoadError", "AdapterPool", "BatchWorker", "GenerateRequest", "Metrics", "MixedBatchGenerator",
    "UnknownAdapterError", "create_app", "load_base_model", "serve", "serving_in_background",
]
