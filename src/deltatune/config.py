"""The base adapter config: dataclass fields, validation with clear errors, JSON round-trip.

Field names follow Hugging Face peft where peft has the same idea, so an `adapter_config.json`
written here is read by peft and the other way round.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

CONFIG_NAME = "adapter_config.json"


class ConfigError(ValueError):
    """A config field is unknown or has a value that cannot work."""


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` is of the annotated type, strictly: no string for a bool, no bool for a
    number, only finite floats. Annotations this does not know pass."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(_fits(k, key) and _fits(v, item) for k, v in value.items())
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    return True


def _describe(hint: Any) -> str:
    text = hint.__name__ if isinstance(hint, type) else str(hint)
    return text.replace("NoneType", "None").replace("typing.", "")


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name in hints}


def check_types(instance: Any) -> None:
    """Every field of a dataclass instance holds its annotated type, strictly; ConfigError names
    the first that does not."""
    for name, hint in _field_types(type(instance)).items():
        value = getattr(instance, name)
        if not _fits(value, hint):
            problem = "a finite number" if isinstance(value, float) and not math.isfinite(value) else _describe(hint)
            raise ConfigError(f"{type(instance).__name__}.{name} must be {problem}, got {value!r} ({type(value).__name__}).")


def _closest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


@dataclass
class AdapterConfig:
    """Fields every method shares: where to inject, what else to train, and bookkeeping.

    target_modules: a list of module names (exact or as a dotted suffix, e.g. "q_proj"),
        a regex string that must match the whole module name, "all-linear", or None for the
        method's default for the model's architecture.
    target_types: module class names to target (e.g. ["Linear", "Conv1D"]), combined with
        target_modules by "or".
    exclude_modules: names/suffixes (list) or a regex (str) never to touch.
    layers_to_transform: block indices (e.g. [10, 11]) to restrict injection to.
    layers_pattern: the name of the block list (e.g. "layers", "h"); guessed when None.
    modules_to_save: modules trained in full beside the adapter (e.g. a classifier head).
    """

    # Set by each method's subclass; written as "peft_type" so peft can read LoRA files.
    method: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""
    # peft fields we read without complaint when they hold their neutral value.
    tolerated_foreign_fields: ClassVar[frozenset[str]] = frozenset(
        {"peft_version", "auto_mapping", "revision", "megatron_config", "megatron_core"}
    )

    target_modules: list[str] | str | None = None
    target_types: list[str] | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        try:
            self.validate()  # the method's own checks speak first: their messages say more
        except (TypeError, AttributeError, RecursionError):
            self.check_field_types()  # a wrong type got past them: name the field instead
            raise
        self.check_field_types()

    def check_field_types(self) -> None:
        """Every field holds its annotated type (strictly: "false" is no bool, NaN no number)."""
        check_types(self)

    def validate(self) -> None:
        """Raise ConfigError for values that cannot work; methods extend this."""
        if self.layers_to_transform is not None and any(i < 0 for i in self.layers_to_transform):
            raise ConfigError(f"layers_to_transform must hold block indices >= 0, got {self.layers_to_transform}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, foreign_ok: bool = False) -> "AdapterConfig":
        """Build from a dict. Unknown fields are an error naming them and listing valid ones.

        With foreign_ok (reading a file another tool wrote), fields we do not know are
        dropped if they hold a neutral value (None, False, empty) and refused otherwise,
        because silently ignoring a feature that is switched on would change the outputs.
        """
        values = dict(values)
        file_type = values.pop("peft_type", None)
        if file_type is not None and cls.peft_type and str(file_type).upper() != cls.peft_type:
            raise ConfigError(
                f"This config is for method {file_type!r}, not {cls.peft_type!r}; "
                f"load it with the matching config class or dt.load(), which picks it for you."
            )
        known = set(cls.field_names())
        unknown = [k for k in values if k not in known]
        for key in unknown:
            neutral = values[key] in (None, False, {}, [], "") or key in cls.tolerated_foreign_fields
            if foreign_ok and neutral:
                values.pop(key)
                continue
            if foreign_ok:
                raise ConfigError(
                    f"The adapter config sets {key}={values[key]!r}, a feature deltatune's "
                    f"{cls.method!r} method does not implement; loading it would change the outputs."
                )
            raise ConfigError(
                f"Unknown field {key!r} for {cls.__name__}.{_closest(key, sorted(known))} "
                f"Valid fields: {', '.join(sorted(known))}."
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = {"peft_type": self.peft_type or self.method.upper()}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # Our own extension fields stay out of the file at their defaults so peft reads it.
            if f.name in {"target_types"} and value is None:
                continue
            data[f.name] = value
        return data

    def to_json(self) -> str:
        """The adapter_config.json text (peft's field names, sorted keys)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    def replace(self, **changes: Any) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)


def read_config_dict(directory: str | Path) -> dict[str, Any]:
    """Read adapter_config.json with errors that say what is wrong with the file."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No {CONFIG_NAME} in {directory}: point to a folder written by deltatune's or peft's save."
        )
    return parse_config_text(path.read_bytes(), str(path))


def parse_config_text(text: bytes | str, source: str) -> dict[str, Any]:
    """An adapter config's JSON, checked to be one; `source` names it in errors."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ConfigError(f"{source} is not valid JSON ({err}); the file is corrupt or was cut short.") from None
    if not isinstance(data, dict) or "peft_type" not in data:
        raise ConfigError(f"{source} has no 'peft_type' field, so it is not an adapter config.")
    return data


__all__ = ["AdapterConfig", "ConfigError", "CONFIG_NAME", "parse_config_text", "read_config_dict", "field"]
