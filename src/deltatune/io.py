"""Adapter files: adapter_config.json + adapter_model.safetensors, in Hugging Face peft's layout.

Keys are `base_model.model.<module path>.<tensor>` with the adapter name left out, exactly as
peft writes them, so files move both ways. Nothing here can execute code from a file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .config import CONFIG_NAME, AdapterConfig, parse_config_text

WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


class AdapterFileError(ValueError):
    """An adapter file is missing, corrupt, or does not fit the model."""


CARD_NAME = "README.md"
# Safetensors header fields that bind the weights to their config (see save_adapter_files).
CONFIG_IN_WEIGHTS = "deltatune_config"
CONFIG_HASH_IN_WEIGHTS = "deltatune_config_sha256"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory descriptors: the renames are still atomic
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_adapter_files(directory: str | Path, config: AdapterConfig, tensors: dict[str, torch.Tensor],
                       model_card: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors as one unit.

    The weights file carries its config (and that config's hash) in its header, and its rename
    into place is the single moment the new adapter takes over: a process killed before it leaves
    the old pair, one killed after it leaves the new weights, which bring their own config if
    adapter_config.json is still the old one (read_adapter uses it then). Files are fsync'd before
    the renames, the folder after. A failed save leaves any earlier adapter in `directory` intact.
    `model_card`: a README.md written beside them (it takes no part in loading)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"Cannot create adapter folder {directory}: {err.strerror}. Choose a writable path.") from None
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"Adapter folder {directory} is not writable; choose another output path.")
    # safetensors refuses shared or non-contiguous storage; adapters are small, copies are cheap.
    payload = {key: t.detach().contiguous().clone() for key, t in tensors.items()}
    config_text = config.to_json().encode()
    metadata = {"format": "pt", CONFIG_IN_WEIGHTS: config_text.decode(), CONFIG_HASH_IN_WEIGHTS: _sha256(config_text)}
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=directory))
    try:
        _write_synced(staging / WEIGHTS_NAME, save(payload, metadata=metadata))
        _write_synced(staging / CONFIG_NAME, config_text)
        names = [WEIGHTS_NAME, CONFIG_NAME]  # the weights first: their rename is the commit
        if model_card is not None:
            _write_synced(staging / CARD_NAME, model_card.encode())
            names.append(CARD_NAME)
        mode = 0o666 & ~_umask()  # as any file the user writes, readable by whom they allow
        for name in names:
            os.chmod(staging / name, mode)
            os.replace(staging / name, directory / name)
        _fsync_folder(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@dataclass
class AdapterFiles:
    """One consistent reading of an adapter folder: its config and the tensors saved with it."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    config_from_weights: bool = False  # adapter_config.json was stale (a save cut short after its commit)


def read_adapter(directory: str | Path, attempts: int = 3) -> AdapterFiles:
    """Read config and weights as one unit (both files of the same save).

    Weights written by deltatune carry their config's hash: when adapter_config.json does not
    match it (a save in progress, or one killed between its two renames), the folder is read
    again, then the config the weights carry is used. Files from peft carry none and are read as
    they are. Tensors must be floating point and finite."""
    directory = Path(directory)
    for attempt in range(attempts):
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}: point to a folder written by deltatune's or peft's save.")
        config_text = config_path.read_bytes()
        config = parse_config_text(config_text, str(config_path))  # renamed into place whole: never half-written
        tensors, metadata = _read_weights(directory)
        recorded = metadata.get(CONFIG_HASH_IN_WEIGHTS)
        if recorded is None or recorded == _sha256(config_text):
            return AdapterFiles(config, tensors)
        if attempt + 1 < attempts:
            time.sleep(0.05)  # another process may be saving this folder right now
    embedded = metadata.get(CONFIG_IN_WEIGHTS, "")
    if _sha256(embedded.encode()) != recorded:
        raise AdapterFileError(f"{directory / WEIGHTS_NAME} carries a config that does not match its own hash; re-save the adapter.")
    return AdapterFiles(parse_config_text(embedded, f"the config inside {directory / WEIGHTS_NAME}"), tensors, True)


def read_adapter_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    return _read_weights(Path(directory))[0]


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise AdapterFileError(
                f"{directory} holds adapter_model.bin, a pickle file, which deltatune never loads because "
                f"it can execute code. Convert it once with peft (safe_serialization=True) in a trusted setting."
            )
        raise AdapterFileError(f"No {WEIGHTS_NAME} in {directory}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path} is truncated or corrupt ({err}); re-save the adapter.") from None
    return tensors, metadata


def check_tensor_fits(key: str, source: torch.Tensor, target: torch.Tensor, directory: str | Path) -> None:
    """A saved tensor may take the place of the model's: same shape, a floating-point value where
    the method stores one (any float width: adapters move between precisions), exactly the
    method's dtype where it stores integers (a Fisher mask's indices), and finite values."""
    if source.shape != target.shape:
        raise AdapterFileError(
            f"Tensor {key} has shape {tuple(source.shape)} in {directory} but the model needs "
            f"{tuple(target.shape)}; the adapter was made for a model of another size."
        )
    if target.is_floating_point() != source.is_floating_point() or (not target.is_floating_point() and source.dtype != target.dtype):
        raise AdapterFileError(
            f"Tensor {key} in {directory} is {source.dtype} where the method stores {target.dtype}; "
            f"the file is foreign or damaged, and deltatune does not cast it."
        )
    if source.is_floating_point() and not bool(torch.isfinite(source).all()):
        raise AdapterFileError(f"Tensor {key} in {directory} holds NaN or infinite values; the adapter is damaged (re-train or re-save it).")


def file_size(directory: str | Path) -> int:
    """Bytes on disk of an adapter folder's two files."""
    return sum((Path(directory) / n).stat().st_size for n in (WEIGHTS_NAME, CONFIG_NAME) if (Path(directory) / n).exists())
