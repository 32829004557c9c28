"""Put a model's linear layers into 4 bits: in place (`quantize`) or while loading (`load_quantized`).

`load_quantized` never holds the full-precision model: it builds the model with its parameters on
the meta device (no memory), then reads the safetensors files one tensor at a time with plain file
reads (no mmap, so the file's pages are not counted against the process either), quantizing each
linear weight as it arrives and dropping the float copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..config import AdapterConfig, ConfigError
from ..hf_compat import is_conv1d
from ..inject import find_targets, is_linear_like, set_submodule
from ..layer import DeltaLayer
from .formats import DEFAULT_BLOCK_SIZE, check_quant_type
from .linear import QuantLinear, quantized_layers

logger = logging.getLogger("deltatune.quant")


def _linear_targets(model: nn.Module, target_modules: list[str] | str | None, exclude_modules: list[str] | str | None) -> list[str]:
    """Names of the plain linear layers to quantize ("all-linear" leaves the output head out)."""
    selector = AdapterConfig(target_modules=target_modules or "all-linear", exclude_modules=exclude_modules)
    try:
        names = find_targets(model, selector)
    except ConfigError:
        if quantized_layers(model) and target_modules in (None, "all-linear"):
            return []  # already quantized: nothing left to do
        raise
    names = [n for n in names if not isinstance(model.get_submodule(n), QuantLinear)]
    wrong = [n for n in names if isinstance(model.get_submodule(n), DeltaLayer) or not is_linear_like(model.get_submodule(n))]
    if wrong:
        raise ConfigError(
            f"Only plain nn.Linear / Conv1D layers can be quantized; {wrong[:3]} are "
            f"{sorted({type(model.get_submodule(n)).__name__ for n in wrong})}. Quantize the base model before wrapping it."
        )
    return names


def quantize(
    model: nn.Module,
    quant_type: str = "nf4",
    target_modules: list[str] | str | None = None,
    *,
    exclude_modules: list[str] | str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace linear layers of `model` by 4-bit QuantLinear layers, in place; returns `model`.

    target_modules: names / dotted suffixes / a regex, as in adapter configs; None quantizes every
        linear layer but the output head (lm_head, classifier, ...).
    quant_type: "nf4" (QLoRA's type), "fp4" (E2M1) or "int4".
    """
    from ..model import DeltaModel

    if isinstance(model, DeltaModel):
        raise TypeError("Quantize the base model before wrapping it (dt.wrap / dt.load), or use the qlora method.")
    quant_type = check_quant_type(quant_type)
    for name in _linear_targets(model, target_modules, exclude_modules):
        layer = QuantLinear.from_linear(model.get_submodule(name), quant_type, block_size, double_quant, compute_dtype)
        set_submodule(model, name, layer.train(model.get_submodule(name).training))
    return model


# -- loading straight into 4 bits -------------------------------------------------------------------
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _read_safetensors(path: Path, transient: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one .safetensors file in file order.

    Tensors for which `transient(name)` is true are read into one reused scratch buffer and are
    valid only until the next pair (they are quantized and dropped); the others get their own
    memory. Reusing the buffer keeps the allocator from scattering freed holes over the heap,
    which otherwise raised the peak RSS of loading SmolLM2 by ~200 MB.
    """
    scratch = torch.empty(0, dtype=torch.uint8)
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
        header.pop("__metadata__", None)
        data_start = 8 + header_size
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{path.name}: tensor {name} has dtype {info['dtype']}, which this loader does not read.")
            start, stop = info["data_offsets"]
            if transient(name):
                if scratch.numel() < stop - start:
                    scratch = torch.empty(stop - start, dtype=torch.uint8)
                raw = scratch[: stop - start]
            else:
                raw = torch.empty(stop - start, dtype=torch.uint8)
            handle.seek(data_start + start)
            handle.readinto(memoryview(raw.numpy()))
            yield name, raw.view(_SAFETENSORS_DTYPES[info["dtype"]]).view(info["shape"])


def _release_freed_memory() -> None:
    """Hand memory freed by quantization's temporaries back to the OS (glibc only; else a no-op).

    glibc keeps freed blocks in per-thread heaps; left alone, they raised the peak RSS of
    loading SmolLM2 by 200-400 MB, varying from run to run, although live tensors stayed ~160 MB.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise FileNotFoundError(
            f"{folder} holds only pickle weights (.bin/.pt), which deltatune never loads because they can execute code. "
            f"Convert them to safetensors once in a trusted setting (save_pretrained(safe_serialization=True))."
        )
    raise FileNotFoundError(f"No .safetensors weights in {folder}; point to a Hugging Face model folder.")


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory) while buffers (e.g. RoPE tables) stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _model_class(config: Any, model_class: Any) -> Any:
    if model_class is not None:
        return model_class
    import transformers

    for name in getattr(config, "architectures", None) or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def _build_empty(folder: Path, model_class: Any, config_overrides: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, **config_overrides)
    cls = _model_class(config, model_class)
    with _parameters_on_meta():
        model = cls.from_config(config) if hasattr(cls, "from_config") and cls.__name__.startswith("Auto") else cls(config)
    return model.eval()


def _key_resolver(model: nn.Module, expected: set[str]):
    """Map a file's tensor name to the model's, allowing for the base-model prefix (e.g. 'bert.')."""
    prefix = getattr(model, "base_model_prefix", "") or ""

    def resolve(key: str) -> str | None:
        if key in expected:
            return key
        if prefix and f"{prefix}.{key}" in expected:
            return f"{prefix}.{key}"
        if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in expected:
            return key[len(prefix) + 1 :]
        return None

    return resolve


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else False)
    else:
        owner._buffers[attr] = tensor


def _materialize_missing(model: nn.Module) -> list[str]:
    """Give parameters no file provided (a new classification head) their usual random init."""
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    owners = {n.rpartition(".")[0] for n in missing}
    for owner_name in sorted(owners):
        module = model.get_submodule(owner_name) if owner_name else model
        module.to_empty(device="cpu", recurse=False)
        if hasattr(model, "_init_weights"):
            model._init_weights(module)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return missing


def _stream_weights(
    model: nn.Module, files: list[Path], targets: dict[str, str], resolve: Callable[[str], str | None],
    quant_args: dict[str, Any], dtype: torch.dtype | None,
) -> list[str]:
    """Read every tensor into place; `targets` (file key -> layer name) become QuantLinear layers.
    Returns the file keys the model has no place for."""
    conv1d = {name for name in targets.values() if is_conv1d(model.get_submodule(name))}
    unexpected, done = [], 0
    for path in files:
        for key, tensor in _read_safetensors(path, lambda key: resolve(key) in targets):
            name = resolve(key)
            if name is None:
                unexpected.append(key)
            elif name in targets:
                layer_name = targets[name]
                weight = tensor.T if layer_name in conv1d else tensor
                bias = getattr(model.get_submodule(layer_name), "bias", None)
                layer = QuantLinear.from_weight(weight, bias, **quant_args)
                layer.weight_dtype = dtype or tensor.dtype
                set_submodule(model, layer_name, layer)
                done += 1
                if done % 16 == 0:
                    _release_freed_memory()
            else:
                _assign(model, name, tensor, dtype)
    return unexpected


def load_quantized(
    folder: str | Path,
    quant_type: str = "nf4",
    *,
    model_class: Any = None,
    target_modules: list[str] | str | None = None,
    exclude_modules: list[str] | str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    **config_overrides: Any,
) -> nn.Module:
    """Load a Hugging Face model folder (safetensors) with its linear layers straight into 4 bits.

    Peak memory is the 4-bit model plus one full-precision tensor at a time, never the whole model.
    model_class: e.g. transformers.AutoModelForSequenceClassification (default: the folder's
        `architectures`); config_overrides go to its config (e.g. num_labels=3).
    dtype: dtype of the tensors left in full precision (default: as stored).
    Other arguments as for `quantize`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a model folder; pass the folder holding config.json and *.safetensors.")
    quant_type = check_quant_type(quant_type)
    files = _weight_files(folder)
    model = _build_empty(folder, model_class, config_overrides)
    expected = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    targets = {f"{name}.weight": name for name in _linear_targets(model, target_modules, exclude_modules)}
    quant_args = {"quant_type": quant_type, "block_size": block_size, "double_quant": double_quant, "compute_dtype": compute_dtype}
    unexpected = _stream_weights(model, files, targets, _key_resolver(model, expected), quant_args, dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = _materialize_missing(model)
    if missing:
        logger.warning("%d tensors were not in %s and were initialized: %s", len(missing), folder, ", ".join(missing[:8]))
    if unexpected:
        logger.info("%d tensors of %s have no place in %s and were skipped: %s", len(unexpected), folder, type(model).__name__, unexpected[:5])
    _check_complete(model, folder)
    return model


def _check_complete(model: nn.Module, folder: Path) -> None:
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"Loading {folder} left {len(leftovers)} tensors unset (e.g. {leftovers[:3]}); is it the right model class?")
