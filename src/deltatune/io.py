"""Adapter files: adapter_config.json + adapter_model.safetensors, in Hugging Face peft's layout.

Keys are `base_model.model.<module path>.<tensor>` with the adapter name left out, exactly as
peft writes them, so files move both ways. Nothing here can execute code from a file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import CONFIG_NAME, AdapterConfig

WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


class AdapterFileError(ValueError):
    """An adapter file is missing, corrupt, or does not fit the model."""


CARD_NAME = "README.md"


def save_adapter_files(directory: str | Path, config: AdapterConfig, tensors: dict[str, torch.Tensor],
                       model_card: str | None = None) -> Path:
    """Write both files atomically: a failed save leaves any earlier adapter in `directory` intact.
    `model_card`: a README.md written beside them (it does not take part in loading)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"Cannot create adapter folder {directory}: {err.strerror}. Choose a writable path.") from None
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"Adapter folder {directory} is not writable; choose another output path.")
    # safetensors refuses shared or non-contiguous storage; adapters are small, copies are cheap.
    payload = {key: t.detach().contiguous().clone() for key, t in tensors.items()}
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=directory))
    try:
        save_file(payload, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        config.to_json_file(staging / CONFIG_NAME)
        names = [WEIGHTS_NAME, CONFIG_NAME]
        if model_card is not None:
            (staging / CARD_NAME).write_text(model_card, encoding="utf-8")
            names.append(CARD_NAME)
        for name in names:
            os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def read_adapter_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        if (Path(directory) / "adapter_model.bin").is_file():
            raise AdapterFileError(
                f"{directory} holds adapter_model.bin, a pickle file, which deltatune never loads because "
                f"it can execute code. Convert it once with peft (safe_serialization=True) in a trusted setting."
            )
        raise AdapterFileError(f"No {WEIGHTS_NAME} in {directory}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path} is truncated or corrupt ({err}); re-save the adapter.") from None


def file_size(directory: str | Path) -> int:
    """Bytes on disk of an adapter folder's two files."""
    return sum((Path(directory) / n).stat().st_size for n in (WEIGHTS_NAME, CONFIG_NAME) if (Path(directory) / n).exists())
