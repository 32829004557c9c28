"""Training checkpoints without pickle: safetensors for tensors, JSON for the rest.

A checkpoint directory holds

* ``trainable.safetensors`` - the parameters that require grad, by name
* ``optimizer.safetensors`` - the optimizer's per-parameter tensors
* ``rng.safetensors``       - torch CPU/CUDA generator states
* ``state.json``            - step, data position, history, optimizer
  hyper-parameters, scheduler state, Python/NumPy RNG states

It is written into a temporary directory and renamed into place; only then
does ``latest.json`` (itself replaced atomically) point at it, and only
after that are older checkpoints removed beyond the newest ``keep``. A process
killed at any moment therefore leaves the previous good checkpoint readable;
a damaged newest one is reported by file and the one before it is used.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltatune import distributed as dist

LATEST_POINTER = "latest.json"
CHECKPOINT_PREFIX = "checkpoint-"
FORMAT_VERSION = 1


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters the optimizer updates, by name, in a stable order."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


# --------------------------------------------------------------------------- writing


def save_checkpoint(
    output_dir: str | os.PathLike,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write a checkpoint for ``step`` atomically and make it the latest one; keep the newest `keep`.

    Under a process group every process calls this: sharded tensors are gathered whole (a
    collective), rank 0 writes, and all return once the checkpoint is in place. The files are
    those one process writes, so a run resumes on any number of processes."""
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    tensors = _checkpoint_tensors(model, optimizer)
    if dist.is_main():
        _write_checkpoint(output_dir, final, step, tensors, scheduler, trainer_state, keep)
    dist.barrier()
    return final


def _checkpoint_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    params = {name: dist.gather_full(param.detach()) for name, param in trainable_parameters(model).items()}
    optimizer_state = optimizer.state_dict()
    # New dicts: the per-parameter ones of state_dict() are the optimizer's live state.
    optimizer_state["state"] = {
        index: {key: dist.gather_full(value) if isinstance(value, torch.Tensor) else value for key, value in values.items()}
        for index, values in optimizer_state["state"].items()
    }
    return {"params": params, "optimizer": optimizer_state}


def _write_checkpoint(output_dir: Path, final: Path, step: int, tensors: dict[str, Any], scheduler: Any,
                      trainer_state: dict[str, Any], keep: int) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=output_dir))
    try:
        _write_checkpoint_files(temporary, step, tensors, scheduler, trainer_state)
        if final.exists():
            # Left by an earlier run that died before pointing at it: not trusted.
            shutil.rmtree(final)
        os.replace(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _write_json_atomically(output_dir / LATEST_POINTER, {"checkpoint": final.name, "step": step})
    _fsync_directory(output_dir)
    _remove_old_checkpoints(output_dir, keep)


def _write_checkpoint_files(
    directory: Path,
    step: int,
    tensors: dict[str, Any],
    scheduler: Any,
    trainer_state: dict[str, Any],
) -> None:
    params = tensors["params"]
    _save_tensors(params, directory / "trainable.safetensors")
    optimizer_tensors, optimizer_meta = _flatten_optimizer_state(tensors["optimizer"])
    _save_tensors(optimizer_tensors, directory / "optimizer.safetensors")
    _save_tensors(_torch_rng_tensors(), directory / "rng.safetensors")
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "trainable_names": list(params),
        "optimizer": optimizer_meta,
        "scheduler": _jsonable(scheduler.state_dict()) if scheduler is not None else None,
        "python_rng": _python_rng_state(),
        "numpy_rng": _numpy_rng_state(),
        "trainer": trainer_state,
    }
    _write_json(directory / "state.json", state)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # clone(): safetensors refuses tensors that share storage (views, tied weights).
    save_file({name: tensor.detach().cpu().contiguous().clone() for name, tensor in tensors.items()}, str(path))
    _fsync_file(path)


def _write_json(path: Path, payload: Any) -> None:
    with path.open("w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def _write_json_atomically(path: Path, payload: Any) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _write_json(temporary, payload)
    os.replace(temporary, path)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(path: Path) -> None:
    # Makes the renames durable; not every platform can open a directory.
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _remove_old_checkpoints(output_dir: Path, keep: int) -> None:
    for entry in output_dir.iterdir():
        if entry.is_dir() and entry.name.startswith(f".tmp-{CHECKPOINT_PREFIX}"):
            shutil.rmtree(entry, ignore_errors=True)
    for entry in checkpoints_newest_first(output_dir)[keep:]:
        shutil.rmtree(entry, ignore_errors=True)


def checkpoints_newest_first(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoint folders (renamed into place), newest step first."""
    folders = [e for e in Path(output_dir).iterdir() if e.is_dir() and e.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(folders, key=lambda e: e.name, reverse=True)  # zero-padded steps sort as numbers


# --------------------------------------------------------------------------- reading


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest.json`` points at, or None when there is none yet."""
    pointer = Path(output_dir) / LATEST_POINTER
    if not pointer.is_file():
        return None
    target = Path(output_dir) / json.loads(pointer.read_text(encoding="utf-8"))["checkpoint"]
    if not (target / "state.json").is_file():
        raise FileNotFoundError(
            f"{pointer} points at {target}, which is missing or incomplete; "
            f"delete {pointer} to start from scratch"
        )
    return target


def read_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The trainer's JSON state (step, data position, config...) without loading any tensor."""
    state = json.loads((Path(checkpoint) / "state.json").read_text(encoding="utf-8"))
    return state["trainer"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or damaged; the message names it."""


def read_checkpoint(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Every file of a checkpoint, read and checked before anything is restored from it."""
    checkpoint = Path(checkpoint)
    data: dict[str, Any] = {}
    for name in ("state.json", "trainable.safetensors", "optimizer.safetensors", "rng.safetensors"):
        path = checkpoint / name
        try:
            data[name] = json.loads(path.read_text(encoding="utf-8")) if name.endswith(".json") else load_file(str(path))
        except (OSError, ValueError, SafetensorError) as err:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{path} cannot be read ({err}).") from None
    for key in ("trainer", "trainable_names", "optimizer", "scheduler", "python_rng", "numpy_rng"):
        if key not in data["state.json"]:
            raise CheckpointError(f"{checkpoint / 'state.json'} has no {key!r}: the file is damaged.")
    return data


def load_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore trainable weights, optimizer, scheduler and RNG states; return the trainer state.
    `data`: what read_checkpoint returned, when the caller read it already."""
    checkpoint = Path(checkpoint)
    data = data if data is not None else read_checkpoint(checkpoint)
    state = data["state.json"]
    _load_trainable(checkpoint, model, state["trainable_names"], data["trainable.safetensors"])
    optimizer_state = _unflatten_optimizer_state(data["optimizer.safetensors"], state["optimizer"])
    optimizer.load_state_dict(_sharded_like_params(optimizer_state, optimizer))
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    _restore_torch_rng(data["rng.safetensors"])
    _restore_python_rng(state["python_rng"])
    _restore_numpy_rng(state["numpy_rng"])
    return state["trainer"]


def _load_trainable(checkpoint: Path, model: torch.nn.Module, saved_names: list[str], saved: dict[str, torch.Tensor]) -> None:
    params = trainable_parameters(model)
    if list(params) != saved_names:
        missing = sorted(set(saved_names) - set(params))
        unexpected = sorted(set(params) - set(saved_names))
        raise ValueError(
            f"checkpoint {checkpoint} was written for other trainable parameters: "
            f"in checkpoint only: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            f"in model only: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. "
            f"Resume with the same model and method configuration, or use a new output_dir"
        )
    with torch.no_grad():
        for name, param in params.items():
            dist.local_view(param).copy_(dist.shard_like(saved[name], param))


def _sharded_like_params(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Whole saved optimizer tensors split like the (FSDP2-sharded) parameters they belong to."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in state["state"].items():
        param = params[int(index)]
        if not dist.is_sharded(param):
            continue
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                values[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return state


# --------------------------------------------------------------------------- optimizer state


def _flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into named tensors and JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{key}"] = value
            else:
                scalars.setdefault(str(param_id), {})[key] = _jsonable(value)
    return tensors, {"param_groups": _jsonable(state_dict["param_groups"]), "scalars": scalars}


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = tensor
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    groups = [dict(group) for group in meta["param_groups"]]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if callable(value):
        return None  # e.g. LambdaLR's lambdas: rebuilt by the caller, not stored
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's JSON state")


# --------------------------------------------------------------------------- RNG states


def _torch_rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    return tensors


def _restore_torch_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[key] for key in sorted(tensors) if key.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])


def _python_rng_state() -> list:
    version, internal, gauss_next = random.getstate()
    return [version, list(internal), gauss_next]


def _restore_python_rng(state: list) -> None:
    version, internal, gauss_next = state
    random.setstate((version, tuple(internal), gauss_next))


def _numpy_rng_state() -> list:
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return [kind, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)]


def _restore_numpy_rng(state: list) -> None:
    kind, keys, position, has_gauss, cached_gaussian = state
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
