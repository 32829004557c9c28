"""The HTTP server: one base causal LM, many adapters, requests batched across adapters.

Waiting requests are gathered into one generate() call at a time (serve/batching.py); with
batching="continuous" they join the running decode between its steps and leave as they end
(serve/continuous.py), where the model allows it (a static cache without sliding-window layers).

    POST /generate  {"adapter": "name" | null, "prompt": "...", "max_new_tokens": n}
                    -> {"adapter": ..., "text": ..., "tokens": n}
    GET  /adapters  adapters on disk and the ones loaded now
    GET  /metrics   request, token, batch and adapter load/eviction counters
    GET  /health    {"status": "ok"}

Errors are JSON {"error": message, ...}: 400 for a malformed request, 401 without the API key
(when the server has one), 404 for an unknown adapter (with the known ones), 413 for a body or
prompt over the limits, 422 for an adapter folder that cannot be loaded, 503 when the queue is
full, 500 when generation itself fails. A failing adapter fails only its own requests.
Tokenising runs off the event loop, so /health answers while a long prompt is encoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.datastructures import Headers
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..continuous import ContinuousDecoder, supports_continuous_decode
from ..model import DeltaModel
from .adapters import AdapterLoadError, AdapterPool, UnknownAdapterError
from .batching import (
    BatchWorker,
    GenerationError,
    MixedBatchGenerator,
    ServerBusyError,
    ServerStoppingError,
)
from .continuous import ContinuousWorker
from .metrics import Metrics

log = logging.getLogger("deltatune.serve")


class GenerateRequest(BaseModel):
    # strict: "5" is not a number of tokens; extra fields are more likely typos than intent.
    model_config = ConfigDict(extra="forbid", strict=True)

    adapter: str | None = None
    prompt: str
    max_new_tokens: int | None = None


BATCHING_MODES = ("continuous", "whole")


@dataclass(frozen=True)
class ServeLimits:
    max_resident: int = 4
    max_batch: int = 16
    batch_wait_ms: float = 10.0
    max_new_tokens: int = 64
    max_queue: int = 1024
    max_prompt_chars: int = 100_000
    max_body_bytes: int = 1_000_000
    batching: str = "whole"  # one generate() per gathered batch, or "continuous"
    context_tokens: int = 2048  # continuous batching: cache columns per row (prompt + new tokens must fit)

    def validate(self) -> None:
        for name in ("max_resident", "max_batch", "max_new_tokens", "max_queue", "max_prompt_chars", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}.")
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {list(BATCHING_MODES)}, got {self.batching!r}.")
        if self.context_tokens < self.max_new_tokens + 1:
            raise ValueError(f"context_tokens ({self.context_tokens}) must exceed max_new_tokens ({self.max_new_tokens}): "
                             f"a prompt and its new tokens share the context.")


class ApiError(Exception):
    """An error answered as JSON {"error": message, **extra} with an HTTP status."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


class GenerationService:
    """What the routes call: validates a request, queues it, and turns token ids into text."""

    def __init__(self, model: DeltaModel, tokenizer: Any, adapters_dir: str | Path, limits: ServeLimits) -> None:
        limits.validate()
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits
        self.metrics = Metrics()
        self.pool = AdapterPool(model, adapters_dir, limits.max_resident, self.metrics)
        pad_id, eos_ids = special_token_ids(model, tokenizer)
        grouped = MixedBatchGenerator(model, pad_id, eos_ids)
        self.max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.context: int | None = None  # prompt + new tokens fit this many columns (continuous batching)
        reason = supports_continuous_decode(model) if limits.batching == "continuous" else "asked for whole batches"
        if reason is None:
            self.context = limits.context_tokens
            decoder = ContinuousDecoder(model, rows=limits.max_batch, context=self.context, eos_ids=eos_ids)
            self.worker: BatchWorker = ContinuousWorker(decoder, grouped, self.pool, self.metrics,
                                                        batch_wait_s=limits.batch_wait_ms / 1000, max_queue=limits.max_queue)
        else:
            log.info("whole-batch generation: %s", reason)
            self.worker = BatchWorker(grouped, self.pool, self.metrics, max_batch=limits.max_batch,
                                      batch_wait_s=limits.batch_wait_ms / 1000, max_queue=limits.max_queue)
        self.batching = "continuous" if self.context is not None else "whole"

    async def generate(self, request: GenerateRequest) -> dict[str, Any]:
        max_new_tokens = self._max_new_tokens(request)
        if request.adapter is not None:
            self._check_adapter(request.adapter)
        if len(request.prompt) > self.limits.max_prompt_chars:
            raise ApiError(413, f"The prompt has {len(request.prompt):,} characters, more than the server's limit of "
                                f"{self.limits.max_prompt_chars:,}.")
        # In a worker thread: a long prompt must not hold up other requests or /health.
        prompt_ids = await asyncio.to_thread(self._encode, request.prompt, max_new_tokens)
        # Counted before it is queued, so a snapshot never shows more completed than received.
        # Unknown names are not counted: a client could otherwise grow the metrics without bound.
        self.metrics.count(request.adapter, requests=1)
        try:
            future = self.worker.submit(request.adapter, prompt_ids, max_new_tokens)
        except ServerBusyError as err:
            self.metrics.count(request.adapter, errors=1)
            raise ApiError(503, str(err)) from None
        try:
            tokens = await asyncio.wrap_future(future)
        except AdapterLoadError as err:
            raise ApiError(422, str(err), adapter=request.adapter) from None
        except ServerStoppingError as err:
            raise ApiError(503, str(err)) from None
        except GenerationError as err:
            raise ApiError(500, str(err), adapter=request.adapter) from None
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return {"adapter": request.adapter, "text": text, "tokens": len(tokens)}

    def _max_new_tokens(self, request: GenerateRequest) -> int:
        limit = self.limits.max_new_tokens
        value = limit if request.max_new_tokens is None else request.max_new_tokens
        if not 1 <= value <= limit:
            raise ApiError(400, f"max_new_tokens must be between 1 and {limit} (the server's --max-new-tokens), got {value}.")
        return value

    def _check_adapter(self, name: str) -> None:
        try:
            self.pool.check_known(name)
        except UnknownAdapterError as err:
            raise ApiError(404, str(err), known=err.known) from None

    def _encode(self, prompt: str, max_new_tokens: int) -> list[int]:
        ids = list(self.tokenizer(prompt)["input_ids"])
        if not ids:
            raise ApiError(400, "prompt is empty (it encodes to no tokens); send some text.")
        if self.max_positions is not None and len(ids) + max_new_tokens > self.max_positions:
            raise ApiError(
                400,
                f"The prompt has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                f"model's {self.max_positions} positions. Shorten the prompt or ask for fewer tokens.",
            )
        if self.context is not None and len(ids) + max_new_tokens - 1 > self.context:
            raise ApiError(
                400,
                f"The prompt has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the server's "
                f"context of {self.context} tokens (--context-tokens). Shorten the prompt or ask for fewer tokens.",
            )
        return ids

    def adapters(self) -> dict[str, Any]:
        return {"known": self.pool.known(), "resident": self.pool.resident(), "max_resident": self.pool.max_resident}


def special_token_ids(model: nn.Module, tokenizer: Any) -> tuple[int, set[int]]:
    """(pad id, end-of-sequence ids): padding needs an id; the tokenizer's eos stands in for a
    missing pad token, as is usual for decoder-only models."""
    eos_ids: set[int] = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if source is not None:
            eos_ids.update(source if isinstance(source, (list, tuple)) else [source])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token before serving.")
    return int(pad_id), eos_ids


def _validation_message(err: RequestValidationError) -> str:
    """FastAPI's validation errors as one sentence a client can act on."""
    parts = []
    for item in err.errors():
        if item.get("type") == "json_invalid":
            return f"The request body is not valid JSON ({item.get('ctx', {}).get('error', 'parse error')})."
        location = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        parts.append(f"{location}: {item.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts) + ' (expected {"adapter": str or null, "prompt": str, "max_new_tokens": int}).'


def _as_delta_model(model: nn.Module) -> DeltaModel:
    if isinstance(model, DeltaModel):
        if model.adapter_names:
            raise ValueError(
                f"The model already holds adapters {model.adapter_names}; the server loads adapters from "
                f"adapters_dir itself. Pass the base model (or a DeltaModel without adapters)."
            )
        return model.eval()
    return DeltaModel(model).eval()


def create_app(
    model: nn.Module,
    tokenizer: Any,
    adapters_dir: str | Path,
    *,
    max_resident: int = 4,
    max_batch: int = 16,
    batch_wait_ms: float = 10.0,
    max_new_tokens: int = 64,
    max_queue: int = 1024,
    max_prompt_chars: int = 100_000,
    max_body_bytes: int = 1_000_000,
    batching: str = "whole",
    context_tokens: int = 2048,
    api_key: str | None = None,
) -> FastAPI:
    """A FastAPI app serving `model` (a causal LM, plain or a DeltaModel without adapters) with
    the adapters in `adapters_dir/<name>`. Its batch worker runs while the app is started.
    api_key: when set, every route but /health needs `Authorization: Bearer <api_key>`.
    batching: "whole" (one generate() per gathered batch, its decode steps replayed as CUDA graphs
    on a GPU) or "continuous" (requests join and leave the running decode between steps, where
    the model allows it, with `context_tokens` cache columns per row; on a GPU its steps and the
    joiners' padded prefills are replayed as CUDA graphs)."""
    limits = ServeLimits(max_resident, max_batch, batch_wait_ms, max_new_tokens, max_queue, max_prompt_chars, max_body_bytes,
                         batching, context_tokens)
    service = GenerationService(_as_delta_model(model), tokenizer, adapters_dir, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.worker.start()
        log.info("serving %d adapter folder(s) from %s", len(service.pool.known()), service.pool.adapters_dir)
        try:
            yield
        finally:
            await asyncio.to_thread(service.worker.stop)

    app = FastAPI(title="deltatune serve", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(_Guards, limits=limits, api_key=api_key)
    _add_routes(app, service)
    _add_error_handlers(app)
    return app


class _Guards:
    """The API key and the body-size limit, checked from the headers before a request body is read
    or parsed. Plain ASGI rather than @app.middleware: Starlette's BaseHTTPMiddleware runs every
    request through a task group and memory streams, on the event loop thread that shares the
    interpreter with the decoding thread."""

    def __init__(self, app: Any, limits: ServeLimits, api_key: str | None) -> None:
        self.app = app
        self.limits = limits
        self.api_key = api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: dict) -> JSONResponse | None:
        headers = Headers(scope=scope)
        if self.api_key and scope["path"] != "/health":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return JSONResponse({"error": "Missing or wrong API key: send 'Authorization: Bearer <key>'."}, status_code=401)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limits.max_body_bytes):
            return JSONResponse({"error": f"The request body is larger than the server's limit of {self.limits.max_body_bytes:,} bytes."},
                                status_code=413)
        return None


def _add_routes(app: FastAPI, service: GenerationService) -> None:
    @app.post("/generate")
    async def generate(request: GenerateRequest) -> dict[str, Any]:
        return await service.generate(request)

    @app.get("/adapters")
    async def adapters() -> dict[str, Any]:
        return service.adapters()

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return {**service.metrics.snapshot(), "resident": service.pool.resident(), "batching": service.batching}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse({"error": err.message, **err.extra}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 by default; a malformed request is a client error we call 400.
        return JSONResponse({"error": _validation_message(err)}, status_code=400)


# ---------------------------------------------------------------- running from the command line
def load_base_model(model_dir: str | Path, device: str = "auto") -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer from a local folder; weights only from safetensors files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass a local Hugging Face model folder with --base.")
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{folder} has no *.safetensors weights; deltatune does not load pickle (.bin) checkpoints. "
            f"Convert the model with save_pretrained(safe_serialization=True)."
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto", use_safetensors=True)
    return model.to(device).eval(), tokenizer


def serve(
    base_dir: str | Path,
    adapters_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    log_level: str = "info",
    api_key: str | None = None,
    **limits: Any,
) -> None:
    """Load the base model from `base_dir` and serve it until interrupted (Ctrl-C / SIGTERM).
    api_key: None reads DELTATUNE_API_KEY; binding beyond loopback without one is warned about."""
    import uvicorn

    api_key = api_key or os.environ.get("DELTATUNE_API_KEY") or None
    warn_if_exposed(host, api_key)
    model, tokenizer = load_base_model(base_dir, device)
    app = create_app(model, tokenizer, adapters_dir, api_key=api_key, **limits)
    log.info("base model loaded from %s", base_dir)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


@contextlib.contextmanager
def serving_in_background(app: FastAPI, host: str = "127.0.0.1", start_timeout: float = 60) -> Any:
    """Run `app` with uvicorn in a background thread on a free port of `host`; yields the port and
    stops the server on exit (tests, load benchmarks, notebooks)."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("The server did not start.")
        time.sleep(0.02)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def warn_if_exposed(host: str, api_key: str | None) -> None:
    if not api_key and not is_loopback(host):
        log.warning("serving on %s without an API key: anyone who reaches this port can use the model. "
                    "Pass --api-key (or set DELTATUNE_API_KEY), or bind to 127.0.0.1.", host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only the machine's resolver knows; assume it reaches out
        return False
