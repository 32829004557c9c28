"""Where the training loop reports its scalars: TensorBoard (its own writer) and/or a CSV file.

    TrainConfig(report_to=["tensorboard", "csv"], logging_dir="runs/x/logs")

Each report is {name: value} at one optimizer step: train/loss, train/lr, train/tokens_per_second
every `log_every` steps, and every numeric result of an evaluation as eval/<name>.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Protocol

REPORT_TARGETS = ("tensorboard", "csv")
CSV_NAME = "metrics.csv"


class Reporter(Protocol):
    def report(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class CsvReporter:
    """One row per value (step, name, value): new names may appear at any step."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CSV_NAME
        fresh = not path.exists()
        self._file = path.open("a", newline="", encoding="utf-8")  # a resumed run appends
        self._writer = csv.writer(self._file)
        if fresh:
            self._writer.writerow(["step", "name", "value"])

    def report(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self._writer.writerow([step, name, repr(float(value))])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardReporter:
    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch's writer needs the tensorboard package
            raise ImportError(
                "report_to='tensorboard' needs the tensorboard package: pip install tensorboard "
                "(or use report_to='csv')."
            ) from err
        self._writer = SummaryWriter(log_dir=str(folder))

    def report(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def check_report_to(report_to: Any) -> list[str]:
    """The targets as a list; an unknown one is an error naming the valid ones."""
    targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
    unknown = [t for t in targets if t not in REPORT_TARGETS]
    if unknown:
        raise ValueError(f"report_to has unknown target(s) {unknown}; choose from {', '.join(REPORT_TARGETS)}.")
    return targets


def make_reporters(report_to: Any, folder: str | Path | None) -> list[Reporter]:
    targets = check_report_to(report_to)
    if targets and folder is None:
        raise ValueError("report_to needs a folder: set TrainConfig.logging_dir (or output_dir).")
    builders = {"csv": CsvReporter, "tensorboard": TensorBoardReporter}
    return [builders[target](Path(folder)) for target in targets]


def numeric_leaves(values: dict[str, Any], prefix: str = "", sep: str = "/") -> dict[str, float]:
    """Finite numbers of nested results, named by their path: prefix/a/b (or a.b with sep=".")."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(numeric_leaves(value, name, sep))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[name] = float(value)
    return flat
