"""deltatune: parameter-efficient fine-tuning for PyTorch, measured against full fine-tuning.

    import deltatune as dt
    model = dt.wrap(base_model, dt.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model.save("out/adapter")
    model = dt.load(fresh_base_model, "out/adapter")
"""

from __future__ import annotations

from typing import Any

from . import methods as _methods  # noqa: F401  (registers every method)
from .config import AdapterConfig, ConfigError
from .io import AdapterFileError
from .layer import DeltaLayer
from .methods.lora import LoraConfig
from .model import DeltaModel, ParameterReport, load, wrap
from .registry import available_methods, make_config, method_info

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Config classes of every registered method (e.g. dt.BitFitConfig) without the core naming them.
    for method in available_methods():
        config_class = method_info(method).config_class
        if config_class.__name__ == name:
            return config_class
    if name in ("compare", "estimate"):
        from . import compare as _compare

        return getattr(_compare, name)
    if name in ("quantize", "load_quantized", "merge_quantized"):
        from . import quant as _quant

        return getattr(_quant, name)
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")


__all__ = [
    "AdapterConfig", "AdapterFileError", "ConfigError", "DeltaLayer", "DeltaModel", "LoraConfig",
    "ParameterReport", "available_methods", "load", "make_config", "method_info", "wrap",
]
