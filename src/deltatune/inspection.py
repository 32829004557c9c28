"""`deltatune inspect`: what saved adapters hold and what serving N tasks from them costs on disk.

Everything is read from the files' headers: adapter_config.json and the safetensors header
(tensor names, shapes, dtypes). No tensor data is loaded, so inspecting a folder of many adapters
is fast and a pickle file is never opened.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from safetensors import SafetensorError, safe_open

from .config import CONFIG_NAME, ConfigError, read_config_dict
from .io import WEIGHTS_NAME
from .registry import method_for_peft_type

EXTRA_TASK_COUNTS = (10, 100)
# Bytes per element of the dtypes a base model is stored in (safetensors' names and torch's).
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int8": 1,
}
BASE_DTYPES = ("float32", "bfloat16", "float16", "int8")
ADAPTER_MARKERS = (CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin")


@dataclass
class AdapterSummary:
    """One adapter folder as its files describe it; `error` says why a folder is unusable."""

    name: str
    path: str
    method: str | None = None
    peft_type: str | None = None
    rank: int | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    parameters: int | None = None
    tensor_bytes: int | None = None
    file_bytes: int | None = None
    dtypes: list[str] = field(default_factory=list)
    base_model: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class BaseModelSize:
    """The base model's size on disk and where that number came from."""

    source: str
    bytes: int
    parameters: int | None
    how: str


@dataclass
class StorageEstimate:
    """Disk needed to serve `tasks` tasks: one shared base plus an adapter per task, versus a
    fully fine-tuned copy per task. Byte counts are None when the base size is unknown."""

    tasks: int
    adapter_bytes: int
    base_bytes: int | None
    shared_bytes: int | None
    full_copies_bytes: int | None

    @property
    def saving(self) -> float | None:
        """Share of the full copies' storage that the shared base avoids (0.99 = 99% less)."""
        if not self.full_copies_bytes or self.shared_bytes is None:
            return None
        return 1.0 - self.shared_bytes / self.full_copies_bytes


@dataclass
class InspectReport:
    adapters: list[AdapterSummary]
    base: BaseModelSize | None
    base_note: str
    storage: list[StorageEstimate]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row, estimate in zip(data["storage"], self.storage):
            row["saving"] = estimate.saving
        return data

    def render(self) -> str:
        return render_report(self)


# ---------------------------------------------------------------- finding adapter folders
def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in ADAPTER_MARKERS)


def adapter_folders(path: str | Path) -> list[Path]:
    """`path` itself when it is an adapter folder, else its (non-hidden) subfolders, sorted.

    Subfolders that hold no adapter are still returned so the report can say what is wrong
    with them instead of hiding them.
    """
    path = Path(path)
    if not path.is_dir() or is_adapter_folder(path):
        return [path]
    children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    return children or [path]


# ---------------------------------------------------------------- one adapter
def summarize_adapter(folder: str | Path) -> AdapterSummary:
    """Read one adapter folder's config and safetensors header; problems go into `.error`."""
    folder = Path(folder)
    summary = AdapterSummary(name=folder.name or str(folder), path=str(folder))
    if not folder.is_dir():
        summary.error = f"No such folder: {folder}."
        return summary
    # The weights are read even when the config is wrong, so a foreign adapter still shows its size.
    errors = []
    for read_into in (_read_config_into, _read_weights_into):
        try:
            read_into(summary, folder)
        except (ConfigError, FileNotFoundError, OSError, SafetensorError, ValueError) as err:
            errors.append(str(err))
    summary.error = " ".join(errors) or None
    return summary


def _read_config_into(summary: AdapterSummary, folder: Path) -> None:
    data = read_config_dict(folder)
    summary.peft_type = str(data["peft_type"])
    summary.base_model = data.get("base_model_name_or_path")
    summary.target_modules = data.get("target_modules")
    rank = data.get("r")
    summary.rank = rank if isinstance(rank, int) else None
    summary.rank_pattern = dict(data.get("rank_pattern") or {})
    # The method name as deltatune spells it; a foreign method keeps its file name and is
    # reported, because `load` would refuse it.
    summary.method = summary.peft_type.lower()
    info = method_for_peft_type(summary.peft_type)
    summary.method = info.name
    # The config class checks the values the same way loading would (e.g. features we lack).
    info.config_class.from_dict(data, foreign_ok=True)


def _read_weights_into(summary: AdapterSummary, folder: Path) -> None:
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ValueError(
                "Only adapter_model.bin (a pickle file, never loaded by deltatune) is present; "
                "re-save the adapter with safetensors."
            )
        raise FileNotFoundError(f"No {WEIGHTS_NAME} in {folder}.")
    parameters, dtypes = safetensors_header_counts(weights)
    summary.parameters = parameters
    summary.dtypes = sorted(dtypes)
    summary.tensor_bytes = weights.stat().st_size - 8 - _header_length(weights)
    summary.file_bytes = sum((folder / n).stat().st_size for n in (WEIGHTS_NAME, CONFIG_NAME) if (folder / n).is_file())


def safetensors_header_counts(path: str | Path) -> tuple[int, Counter]:
    """(number of elements, elements per dtype) of a safetensors file, from its header only."""
    parameters, dtypes = 0, Counter()
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                tensor = handle.get_slice(key)
                count = 1
                for size in tensor.get_shape():
                    count *= size
                parameters += count
                dtypes[tensor.get_dtype()] += count
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is truncated or corrupt ({err}); re-save it.") from None
    return parameters, dtypes


def _header_length(path: Path) -> int:
    # The safetensors layout: an 8-byte little-endian header length, the JSON header, then data.
    with path.open("rb") as handle:
        return struct.unpack("<Q", handle.read(8))[0]


def inspect_adapters(paths: Iterable[str | Path]) -> list[AdapterSummary]:
    """Summaries of every adapter folder under `paths` (each an adapter or a folder of them)."""
    return [summarize_adapter(folder) for path in paths for folder in adapter_folders(path)]


# ---------------------------------------------------------------- the base model's size
def base_size_from_parameters(parameters: int, dtype: str) -> BaseModelSize:
    if parameters <= 0:
        raise ValueError(f"The base model's parameter count must be positive, got {parameters}.")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"Unknown base dtype {dtype!r}; use one of {', '.join(BASE_DTYPES)}.")
    return BaseModelSize(f"{parameters:,} parameters", parameters * DTYPE_BYTES[dtype], parameters, f"--base-params in {dtype}")


def base_size_from_folder(folder: str | Path) -> BaseModelSize:
    """A local Hugging Face model folder's size: its safetensors files, or (a folder with only
    config.json) the parameters the config describes, counted on the meta device."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Base model folder {folder} does not exist; pass a local model folder.")
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        parameters = sum(safetensors_header_counts(shard)[0] for shard in shards)
        size = sum(shard.stat().st_size for shard in shards)
        return BaseModelSize(str(folder), size, parameters, f"{len(shards)} safetensors file(s)")
    if (folder / "config.json").is_file():
        parameters, dtype = _parameters_from_config(folder)
        return BaseModelSize(str(folder), parameters * DTYPE_BYTES[dtype], parameters, f"config.json ({dtype})")
    raise ValueError(f"{folder} has neither *.safetensors files nor a config.json, so its size is unknown.")


def _parameters_from_config(folder: Path) -> tuple[int, str]:
    """Parameters of the architecture in config.json, built on the meta device (no memory)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(folder))
    architecture = next(iter(getattr(config, "architectures", None) or []), None)
    model_class = getattr(transformers, architecture, None) if architecture else None
    with torch.device("meta"):
        model = model_class(config) if model_class is not None else AutoModel.from_config(config)
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32").replace("torch.", "")
    # Tied weights (e.g. input and output embeddings) are stored once: count distinct tensors.
    distinct = {id(p): p.numel() for p in model.parameters()}
    return sum(distinct.values()), dtype if dtype in DTYPE_BYTES else "float32"


def adapters_dtype(adapters: Sequence[AdapterSummary]) -> str:
    """The dtype most adapter elements are stored in (float32 when nothing was readable)."""
    counts: Counter = Counter()
    for adapter in adapters:
        counts.update({dtype: 1 for dtype in adapter.dtypes})
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8"}
    common = [names[d] for d, _ in counts.most_common() if d in names]
    return common[0] if common else "float32"


def resolve_base_size(
    adapters: Sequence[AdapterSummary],
    base_dir: str | Path | None = None,
    base_params: int | None = None,
    base_dtype: str | None = None,
) -> tuple[BaseModelSize | None, str]:
    """(size or None, a sentence on where it came from or why it is unknown)."""
    if base_dir is not None and base_params is not None:
        raise ValueError("Pass either --base DIR or --base-params COUNT, not both.")
    if base_params is not None:
        size = base_size_from_parameters(base_params, base_dtype or adapters_dtype(adapters))
        return size, f"base: {size.source} ({size.how})"
    if base_dir is not None:
        size = base_size_from_folder(base_dir)
        return size, f"base: {size.source} ({size.how})"
    return _base_size_from_adapters(adapters)


def _base_size_from_adapters(adapters: Sequence[AdapterSummary]) -> tuple[BaseModelSize | None, str]:
    names = sorted({a.base_model for a in adapters if a.ok and a.base_model})
    hint = "pass --base DIR or --base-params COUNT"
    if not names:
        return None, f"Base model size unknown: the adapters do not name their base model ({hint})."
    if len(names) > 1:
        return None, f"Base model size unknown: the adapters name {len(names)} different base models ({hint})."
    if not Path(names[0]).is_dir():
        return None, f"Base model size unknown: {names[0]!r} is not a local folder ({hint})."
    try:
        size = base_size_from_folder(names[0])
    except (ValueError, OSError) as err:
        return None, f"Base model size unknown: {err} ({hint})."
    return size, f"base: {size.source} ({size.how}, named by the adapters' configs)"


# ---------------------------------------------------------------- storage for N tasks
def task_counts(adapters: Sequence[AdapterSummary], tasks: int | None = None) -> list[int]:
    """N = `tasks` (default: the number of readable adapters), plus 10 and 100."""
    if tasks is not None and tasks < 1:
        raise ValueError(f"--tasks must be a positive number of tasks, got {tasks}.")
    first = tasks if tasks is not None else sum(a.ok for a in adapters)
    return sorted({n for n in (first, *EXTRA_TASK_COUNTS) if n > 0})


def storage_for_tasks(adapters: Sequence[AdapterSummary], base: BaseModelSize | None, counts: Sequence[int]) -> list[StorageEstimate]:
    """Storage for each N in `counts`, with every task's adapter the mean size of those listed."""
    sizes = [a.file_bytes for a in adapters if a.ok and a.file_bytes is not None]
    if not sizes:
        return []
    mean_adapter = sum(sizes) / len(sizes)
    estimates = []
    for tasks in counts:
        adapter_bytes = round(mean_adapter * tasks)
        estimates.append(StorageEstimate(
            tasks=tasks,
            adapter_bytes=adapter_bytes,
            base_bytes=base.bytes if base else None,
            shared_bytes=base.bytes + adapter_bytes if base else None,
            full_copies_bytes=base.bytes * tasks if base else None,
        ))
    return estimates


def inspect_report(
    paths: Sequence[str | Path],
    *,
    tasks: int | None = None,
    base_dir: str | Path | None = None,
    base_params: int | None = None,
    base_dtype: str | None = None,
) -> InspectReport:
    """Summaries of the adapters under `paths` and the storage to serve N tasks with them."""
    if not paths:
        raise ValueError("Name at least one adapter folder (or a folder of adapter folders) to inspect.")
    adapters = inspect_adapters(paths)
    base, note = resolve_base_size(adapters, base_dir, base_params, base_dtype)
    return InspectReport(adapters, base, note, storage_for_tasks(adapters, base, task_counts(adapters, tasks)))


# ---------------------------------------------------------------- text output
def format_bytes(count: float | None) -> str:
    if count is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1024
    return f"{count:,.1f} TiB"  # pragma: no cover (the loop returns at GiB)


def _rank_text(adapter: AdapterSummary) -> str:
    if adapter.rank is None:
        return "-"
    return f"{adapter.rank}+pattern" if adapter.rank_pattern else str(adapter.rank)


def _targets_text(targets: list[str] | str | None) -> str:
    if targets is None:
        return "(default)"
    return ",".join(targets) if isinstance(targets, list) else str(targets)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def render_report(report: InspectReport) -> str:
    header = ["adapter", "method", "rank", "targets", "params", "size", "base model"]
    rows = [
        [a.name, a.method or "-", _rank_text(a), _targets_text(a.target_modules), f"{a.parameters:,}", format_bytes(a.file_bytes), a.base_model or "-"]
        for a in report.adapters if a.ok
    ]
    lines = _table(header, rows) if rows else ["No readable adapters."]
    for adapter in report.adapters:
        if not adapter.ok:
            lines.append(f"! {adapter.path}: {adapter.error}")
    lines += ["", report.base_note]
    lines += _storage_lines(report)
    return "\n".join(lines)


def _percent(share: float | None) -> str:
    # "+ 0.0" turns a rounded -0.0 (one task: the adapter costs a little extra) into 0.0.
    return "-" if share is None else f"{round(100 * share, 1) + 0.0:.1f}%"


def _storage_lines(report: InspectReport) -> list[str]:
    if not report.storage:
        return []
    if report.base is None:
        rows = [[str(s.tasks), format_bytes(s.adapter_bytes)] for s in report.storage]
        return ["Storage for N tasks (adapters only):", *_table(["tasks", "adapters"], rows)]
    rows = [
        [str(s.tasks), format_bytes(s.shared_bytes), format_bytes(s.full_copies_bytes), _percent(s.saving)]
        for s in report.storage
    ]
    return [
        f"Storage for N tasks (base {format_bytes(report.base.bytes)}):",
        *_table(["tasks", "base once + adapters", "N full copies", "saved"], rows),
    ]


def report_json(report: InspectReport) -> str:
    return json.dumps(report.to_dict(), indent=2)
