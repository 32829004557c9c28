"""`deltatune compare`: full fine-tuning and every PEFT method on one task, measured alike.

Every method gets the same task, data, data order, seed, steps, batch and schedule shape; only
the learning rate and the method's own fields differ, and both are written into the report.
Per method the run records parameters, a measured memory breakdown, step times, bytes on disk,
quality in domain / out of domain, and forgetting. results.json is rewritten atomically after
every phase, so a crash or Ctrl-C keeps everything measured so far; a method that fails is
recorded as failed and the others still run.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import random
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .. import distributed as dist
from ..kernels.cuda_graph import peak_memory_bytes
from .estimate import build_meta_model, estimate_error, estimate_prepared
from .measure import (
    MemoryBreakdown,
    PeakRssSampler,
    base_storage,
    count_parameters,
    directory_bytes,
    measure_training_step,
    resolve_device,
    save_full_checkpoint,
    steady_step_time,
)
from .methods import MethodSettings, apply_method, available_compare_methods, method_settings, validate_methods
from .presets import ALL_METHODS, FULL, RUN_PRESETS, RunPreset

RESULTS_NAME = "results.json"
SCHEMA_VERSION = 1
CALIBRATION_BATCHES = 16  # the most a calibrated method (e.g. a Fisher mask) is offered
WARMUP_STEPS = 3  # steps left out of the reported step time


@dataclass
class CompareSettings:
    """Everything that defines one comparison run (written to results.json)."""

    task: str
    methods: list[str]
    preset: str
    max_steps: int
    batch_size: int
    train_limit: int | None
    eval_limit: int | None
    seed: int
    device: str
    storage_tasks: int
    keep_checkpoints: bool
    task_options: dict[str, Any] = field(default_factory=dict)
    quantize: str | None = None  # 4-bit base under every PEFT method; full FT stays the baseline
    report_to: list[str] = field(default_factory=list)  # "tensorboard" / "csv": per-method logs under logs/
    seeds: int = 1  # training runs per method (seed, seed+1, ...): quality reported as mean +- std
    curve_points: int = 2  # in-domain quality and forgetting evaluated this many times during training
    distributed: str = "none"  # under torchrun: how each method trains over the processes (TrainConfig.distributed)
    processes: int = 1  # the processes that train each method together

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class CompareRun:
    """What `compare()` returns: the results and where the files went."""

    output_dir: Path
    results: dict[str, Any]
    files: list[Path]

    @property
    def methods(self) -> dict[str, dict[str, Any]]:
        return self.results["methods"]


class ResultsFile:
    """results.json, rewritten whole and atomically (temp file + rename) on every save; by one
    process only (`writes`) when several compare together."""

    def __init__(self, path: Path, data: dict[str, Any], writes: bool = True) -> None:
        self.path = path
        self.data = data
        self.writes = writes

    def save(self) -> None:
        if not self.writes:
            return
        text = json.dumps(self.data, indent=2, default=_json_default)
        fd, tmp = tempfile.mkstemp(prefix=".results-", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def default_output_dir() -> Path:
    return Path("runs") / f"compare-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def prepare_output_dir(output_dir: str | os.PathLike | None) -> Path:
    """Create the output folder and prove it is writable, before any training starts."""
    path = Path(output_dir) if output_dir is not None else default_output_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"  # one per process: torchrun starts several
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"Cannot write to the output folder {path} ({err.strerror or err}). "
            f"Choose a writable folder with --output (compare(output_dir=...))."
        ) from None
    return path


def resolve_settings(
    task: Any,
    methods: Sequence[str] | str | None,
    preset: str,
    max_steps: int | None,
    batch_size: int | None,
    train_limit: int | None,
    eval_limit: int | None,
    seed: int,
    device: str,
    storage_tasks: int,
    keep_checkpoints: bool,
    task_options: dict[str, Any] | None,
    seeds: int = 1,
    curve_points: int = 2,
) -> CompareSettings:
    if preset not in RUN_PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(RUN_PRESETS)}.")
    chosen: RunPreset = RUN_PRESETS[preset]
    if isinstance(methods, str):
        methods = methods.split(",")
    registered = available_compare_methods()
    if methods is None:
        # A preset's list names methods that may not be registered yet; keep those that are.
        methods = [m for m in chosen.methods if m in registered]
    elif [m.strip().lower() for m in methods] == [ALL_METHODS]:
        methods = registered
    for name, value in (("max_steps", max_steps), ("batch_size", batch_size), ("storage_tasks", storage_tasks), ("seeds", seeds)):
        _check_whole(name, value, 1)
    _check_whole("curve_points", curve_points, 0)
    return CompareSettings(
        task=task if isinstance(task, str) else getattr(task, "name", type(task).__name__),
        methods=validate_methods(methods),
        preset=preset,
        max_steps=max_steps or chosen.max_steps,
        batch_size=batch_size or chosen.batch_size,
        train_limit=train_limit if train_limit is not None else chosen.train_limit,
        eval_limit=eval_limit if eval_limit is not None else chosen.eval_limit,
        seed=seed,
        device=device,
        storage_tasks=storage_tasks,
        keep_checkpoints=keep_checkpoints,
        task_options=dict(task_options or {}),
        seeds=seeds,
        curve_points=curve_points,
    )


def _check_whole(name: str, value: Any, least: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}.")
    if value < least:
        raise ValueError(f"{name} must be at least {least}, got {value}.")


def environment() -> dict[str, Any]:
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_start": _load_average(),
    }
    return info


def _load_average() -> float | None:
    """1-minute load average: above the CPU count, other programs share the cores and slow steps."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def _say(console: Callable[[str], None] | None, message: str) -> None:
    if console is not None:
        console(message)


class _Comparison:
    """The state of one compare() call; each phase is one short method."""

    def __init__(self, settings: CompareSettings, task: Any, output_dir: Path, methods: dict[str, MethodSettings],
                 progress: bool, console: Callable[[str], None] | None) -> None:
        self.settings = settings
        self.task_source = task
        self.output_dir = output_dir
        self.progress = progress
        self.console = console
        # under torchrun each process works on its own GPU (its LOCAL_RANK), or on the CPU
        self.device = dist.device() if dist.is_initialized() else resolve_device(settings.device)
        self.method_settings = methods
        self.trained: dict[str, nn.Module] = {}  # kept for the interleaved timing rounds at the end
        self.results = ResultsFile(
            output_dir / RESULTS_NAME,
            {
                "schema": SCHEMA_VERSION,
                "status": "running",
                "started": datetime.now().isoformat(timespec="seconds"),
                "settings": settings.to_dict(),
                "environment": environment(),
                "method_settings": {n: s.to_dict() for n, s in self.method_settings.items()},
                "methods": {},
            },
            writes=dist.is_main(),
        )

    # ------------------------------------------------------------------ setup
    def load_task(self) -> None:
        from deltatune.train import get_task

        if isinstance(self.task_source, str):
            self.task = get_task(self.task_source, **self.settings.task_options)
        else:
            self.task = self.task_source
        self._seed()
        model, self.tokenizer = self.task.load_model()
        self.train_data = self.task.train_data(self.tokenizer, limit=self.settings.train_limit)
        if len(self.train_data) == 0:
            raise ValueError(f"Task {self.settings.task!r} produced no training examples.")
        self.eval_splits = list(self.task.eval_splits())
        self.probe_batch = self._longest_batch()
        data = self.results.data
        data["task"] = {
            "name": self.task.name,
            "kind": self.task.kind,
            "train_examples": len(self.train_data),
            "eval_splits": self.task.eval_splits(),
            "head_modules": list(self.task.head_modules),
            "sequence_length": int(self.probe_batch["input_ids"].shape[-1]) if "input_ids" in self.probe_batch else None,
        }
        data["base_model_bytes"] = self._checkpoint_bytes_of(model) if dist.is_main() else None
        self._estimate_all(model)
        self._evaluate_base(model)
        self.results.save()

    def _longest_batch(self) -> dict[str, Any]:
        """The batch of the longest examples: memory peaks on it, so it is the one to measure."""
        data = self.train_data

        def length(index: int) -> int:
            ids = data[index].get("input_ids") if isinstance(data[index], dict) else None
            return len(ids) if ids is not None else 0

        longest = sorted(range(len(data)), key=length, reverse=True)[: self.settings.batch_size]
        return self.task.collate([data[i] for i in sorted(longest)])

    def _seed(self, seed: int | None = None) -> None:
        from deltatune.train import seed_everything

        seed_everything(self.settings.seed if seed is None else seed)

    def _checkpoint_bytes_of(self, model: nn.Module) -> int:
        with tempfile.TemporaryDirectory(dir=self.output_dir) as tmp:
            return directory_bytes(save_full_checkpoint(model, tmp))

    def _estimate_all(self, model: nn.Module) -> None:
        """Predict every method's memory before any training, from the model's config alone."""
        batch, seq = self.probe_batch["input_ids"].shape[0], self.probe_batch["input_ids"].shape[-1]
        estimates = {}
        for name, settings in self.method_settings.items():
            try:
                meta_model, _, _ = build_meta_model(model, self.task.kind, getattr(self.task, "num_labels", 2) or 2)
                calibration = [self._meta_probe()] if settings.needs_calibration_data else None
                with torch.device("meta"):
                    prepared = apply_method(meta_model, settings, self.task.head_modules, calibration)
                trainable, total, memory = estimate_prepared(
                    prepared, self.task.kind, batch, seq, device=self.device.type, compute_dtype=self._compute_dtype()
                )
                estimates[name] = {"trainable": trainable, "total": total, "memory": memory.to_dict()}
            except Exception as err:  # an estimate that cannot be made must not stop the comparison
                estimates[name] = {"error": f"{type(err).__name__}: {err}"}
        self.results.data["estimates"] = {"batch_size": int(batch), "seq_len": int(seq), "methods": estimates}

    def _compute_dtype(self) -> torch.dtype | None:
        # What TrainConfig(mixed_precision="auto") trains in: bf16 autocast on CUDA, fp32 on CPU.
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None

    def _meta_probe(self) -> dict[str, Any]:
        return {k: torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v for k, v in self.probe_batch.items()}

    def _evaluate_base(self, model: nn.Module) -> None:
        """Quality of the untouched base on the forgetting split: the 'before' of forgetting, and
        (for the forgetting curves) in domain, where its fresh head stands at chance."""
        if "forgetting" not in self.eval_splits:
            return
        _say(self.console, "Evaluating the base model on the forgetting split ...")
        self.results.data["base_quality"] = self._evaluate(model, self._curve_splits() or ["forgetting"])

    def _curve_splits(self) -> list[str]:
        """The splits of a forgetting curve, or none when the run has no curves."""
        wanted = ["in_domain", "forgetting"]
        return wanted if self.settings.curve_points and all(s in self.eval_splits for s in wanted) else []

    def _curve_callback(self, record: dict[str, Any]) -> Callable[[int, nn.Module, Any], None] | None:
        """A step callback that evaluates in-domain quality and forgetting at `curve_points` evenly
        spaced steps, so the report can compare forgetting where methods reach the same quality."""
        splits, points, steps = self._curve_splits(), self.settings.curve_points, self.settings.max_steps
        if not splits:
            return None
        at = {round(steps * k / (points + 1)) for k in range(1, points + 1)} - {0, steps}
        base = self.results.data.get("base_quality", {})
        record["forgetting_curve"] = [_curve_point(0, base)]
        record["time"]["curve_eval_s"] = 0.0

        def evaluate(step: int, model: nn.Module, optimizer: Any) -> None:
            if step not in at:
                return
            started = time.perf_counter()
            # Evaluating may build a reference model (which draws random numbers) or leave the model
            # in eval mode: both are put back, so a run with curves trains exactly as one without.
            python_state, training = random.getstate(), model.training
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                record["forgetting_curve"].append(_curve_point(step, self._evaluate(model, splits)))
            random.setstate(python_state)
            model.train(training)
            record["time"]["curve_eval_s"] += time.perf_counter() - started

        return evaluate

    def _evaluate(self, model: nn.Module, splits: list[str]) -> dict[str, Any]:
        from deltatune.train import evaluate_task

        model.to(self.device)
        return evaluate_task(self.task, model, self.tokenizer, splits=splits, limit=self.settings.eval_limit)

    # ------------------------------------------------------------------ one method
    def run_method(self, index: int, name: str) -> None:
        record: dict[str, Any] = {"method": name, "status": "running", "settings": self.method_settings[name].to_dict()}
        self.results.data["methods"][name] = record
        self.results.save()
        total = len(self.settings.methods)
        _say(self.console, f"[{index}/{total}] {name}: lr {self.method_settings[name].lr:g}, {self.settings.max_steps} steps")
        started = time.perf_counter()
        try:
            self._run_phases(name, record)
            record["status"] = "ok"
        except KeyboardInterrupt:
            record.update(status="interrupted", error="stopped by the user (Ctrl-C)")
            raise
        except Exception as err:
            record.update(status="failed", error=_describe_failure(err), traceback=traceback.format_exc(limit=6))
            partial = getattr(err, "result", None)
            if partial is not None:  # NonFiniteLossError keeps the losses up to the failure
                record.setdefault("losses", list(partial.losses))
            _say(self.console, f"  {name} failed: {record['error']}")
        finally:
            record["wall_s"] = time.perf_counter() - started
            self.results.save()
            gc.collect()  # drop this method's model before the next one is built

    def _run_phases(self, name: str, record: dict[str, Any]) -> None:
        settings = self.method_settings[name]
        self._seed()
        base, _ = self.task.load_model()
        model = apply_method(base, settings, self.task.head_modules, self._calibration_batches())
        trainable, total = count_parameters(model)
        record["parameters"] = {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total}
        record["base_storage"] = base_storage(model)
        self.results.save()

        memory = measure_training_step(model, self.probe_batch, device=self.device)
        record["memory"] = memory.to_dict()
        self._compare_with_estimate(name, memory, record)
        self.results.save()

        train_result, rss_peak = self._train(model, settings, record)
        record["memory"]["process_rss_peak"] = rss_peak
        self.results.save()

        record["quality"] = self._evaluate(model, self.eval_splits)
        self._record_forgetting(record)
        if "forgetting_curve" in record:
            record["forgetting_curve"].append(_curve_point(self.settings.max_steps, record["quality"]))
        self.results.save()

        record["storage"] = self._store(name, model)
        if not dist.is_initialized():  # the interleaved timing rounds run in one process (time_interleaved)
            self.trained[name] = model
        if self.settings.seeds > 1:
            self._other_seeds(name, record)

    def _other_seeds(self, name: str, record: dict[str, Any]) -> None:
        """Train and evaluate the method again with seeds seed+1 ... (initialisation and data order
        change; steps, batch and learning rate stay): quality and forgetting per seed, so the report
        can give mean +- std. Memory, storage and step time do not depend on the seed."""
        first = self.settings.seed
        record["seed_runs"] = [_seed_run(first, record)]
        for seed in range(first + 1, first + self.settings.seeds):
            _say(self.console, f"    {name}: seed {seed} ({seed - first + 1}/{self.settings.seeds})")
            self._seed(seed)
            base, _ = self.task.load_model()
            model = apply_method(base, self.method_settings[name], self.task.head_modules, self._calibration_batches())
            run: dict[str, Any] = {"time": {}}
            self._train(model, self.method_settings[name], run, seed=seed, find_lr=False)
            run["quality"] = self._evaluate(model, self.eval_splits)
            self._record_forgetting(run)
            record["seed_runs"].append(_seed_run(seed, run))
            self.results.save()
            del model, base
            gc.collect()

    def time_interleaved(self) -> None:
        """Every trained method's step time in interleaved rounds (compare/timing.py), so that a
        change of load during the run hits all methods alike; the ratios' spread is recorded."""
        from .timing import DEFAULT_ROUNDS, clock_name, interleaved_step_times, ratios_to

        if dist.is_initialized():
            self.results.data["timing"] = {"skipped": "the methods trained over several processes: each method's "
                                                      "step time is its own training run's"}
            self.results.save()
            return
        if len(self.trained) < 2:
            return
        _say(self.console, f"Timing the {len(self.trained)} trained methods in {DEFAULT_ROUNDS} interleaved rounds ...")
        load_before = _load_average()
        size = self.settings.batch_size
        batches = [self.task.collate([self.train_data[i] for i in range(start, min(start + size, len(self.train_data)))])
                   for start in range(0, min(len(self.train_data), 2 * size), size)]
        try:
            per_round = interleaved_step_times(self.trained, batches, self.device, rounds=DEFAULT_ROUNDS)
        except Exception as err:  # the comparison stands without it; say why it is missing
            self.results.data["timing"] = {"error": _describe_failure(err)}
            return
        finally:
            self.trained.clear()
        for name, entry in ratios_to(per_round, FULL).items():
            self.results.data["methods"][name]["time"]["interleaved"] = entry
        self.results.data["timing"] = {"rounds": DEFAULT_ROUNDS, "batches": len(batches), "clock": clock_name(self.device),
                                       "load_before": load_before, "load_after": _load_average()}
        self.results.save()

    def _calibration_batches(self) -> Iterator[dict[str, Any]]:
        loader = torch.utils.data.DataLoader(self.train_data, batch_size=self.settings.batch_size, shuffle=False, collate_fn=self.task.collate)
        for index, batch in enumerate(loader):
            if index >= CALIBRATION_BATCHES:
                return
            yield batch

    def _compare_with_estimate(self, name: str, measured: MemoryBreakdown, record: dict[str, Any]) -> None:
        estimate = self.results.data.get("estimates", {}).get("methods", {}).get(name, {})
        if "memory" in estimate:
            predicted = MemoryBreakdown.from_dict(estimate["memory"])
            record["estimate_error_percent"] = estimate_error(predicted, measured)

    def _train(self, model: nn.Module, settings: MethodSettings, record: dict[str, Any], *, seed: int | None = None,
               find_lr: bool = True) -> tuple[Any, int | None]:
        from deltatune.train import TrainConfig, train

        if settings.lr_auto and find_lr:
            self._find_learning_rate(model, settings, record)
        self._seed(seed)  # dropout draws from here on: the same whatever was measured before
        config = TrainConfig(
            max_steps=self.settings.max_steps,
            batch_size=self.settings.batch_size,
            lr=settings.lr,
            seed=self.settings.seed if seed is None else seed,
            progress=self.progress,
            device=self.settings.device,
            report_to=self.settings.report_to,
            distributed=self.settings.distributed,
            logging_dir=str(self.output_dir / "logs" / (settings.name if seed is None else f"{settings.name}-seed{seed}")),
        )
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        load_before = _load_average()
        record.setdefault("time", {})
        curve = self._curve_callback(record) if seed is None else None  # the first seed's curve only
        with PeakRssSampler() as rss:
            result = train(model, self.train_data, config, collate_fn=self.task.collate,
                           step_callbacks=[curve] if curve else ())
        if self.device.type == "cuda" and "memory" in record:
            record["memory"]["device_peak_training"] = peak_memory_bytes(self.device)
        record["losses"] = list(result.losses)
        curve_s = record["time"].get("curve_eval_s", 0.0)
        record["time"].update({
            "steps": result.steps,
            "step_s": steady_step_time(result.step_times, WARMUP_STEPS),
            "train_s": result.total_time - curve_s,  # the curve's evaluations are not training
            "tokens_seen": result.tokens_seen,
            "step_times": list(result.step_times),
            "load_average": [load_before, _load_average()],  # a change between methods flags the report
        })
        return result, rss.peak

    def _find_learning_rate(self, model: nn.Module, settings: MethodSettings, record: dict[str, Any]) -> None:
        from deltatune.train.lr_range import lr_range_test

        _say(self.console, f"    learning-rate range test for {settings.name} ...")
        result = lr_range_test(model, self.train_data, collate_fn=self.task.collate, batch_size=self.settings.batch_size,
                               seed=self.settings.seed, device=self.settings.device)
        record["lr_range"] = result.to_dict()
        suggested = dist.from_main(result.suggested_lr)  # every process trains at rank 0's suggestion
        if suggested is not None:
            settings.lr = suggested
        self.results.data["method_settings"][settings.name] = settings.to_dict()
        _say(self.console, f"    {settings.name}: lr {settings.lr:.3g} ({'suggested' if suggested else 'no suggestion: default'})")

    def _record_forgetting(self, record: dict[str, Any]) -> None:
        before = self.results.data.get("base_quality", {}).get("forgetting")
        after = record["quality"].get("forgetting")
        if not before or not after:
            return
        metric = after.get("metric") or before.get("metric")
        if metric in before and metric in after:
            record["forgetting"] = {
                "metric": metric,
                "before": before[metric],
                "after": after[metric],
                "change": after[metric] - before[metric],
            }

    def _store(self, name: str, model: nn.Module) -> dict[str, Any]:
        """Write what this task needs stored and measure it on disk. Under torchrun every process
        calls it (the save gathers sharded tensors) and rank 0 writes and measures."""
        from .jobs import save_full_model

        directory = self.output_dir / "checkpoints" / name
        main = dist.is_main()
        if main and directory.exists():
            shutil.rmtree(directory)
        if name == FULL:
            save_full_model(model, directory)  # the whole model, gathered from the shards where sharded
            stored = {"kind": "full model copy", "bytes": directory_bytes(directory) if main else None,
                      "path": str(directory)}
            if main and not self.settings.keep_checkpoints:
                shutil.rmtree(directory)
                stored["path"] = None
            return stored
        model.save(directory)
        return {"kind": "adapter", "bytes": directory_bytes(directory) if main else None, "path": str(directory)}

    def finish(self, status: str) -> None:
        self.results.data["status"] = status
        self.results.data["finished"] = datetime.now().isoformat(timespec="seconds")
        self.results.data["environment"]["load_average_end"] = _load_average()
        self.results.save()


def _curve_point(step: int, quality: dict[str, Any]) -> dict[str, Any]:
    """One point of a forgetting curve: the step and the primary numbers of both splits."""
    from .report import primary_metric

    point: dict[str, Any] = {"step": step}
    for split in ("in_domain", "forgetting"):
        metrics = quality.get(split) or {}
        declared = metrics.get("metric")  # forgetting's own measure (e.g. perplexity_ratio), as _record_forgetting reads it
        metric = (declared, metrics[declared]) if declared in metrics else primary_metric(metrics)
        point[split] = None if metric is None else {"metric": metric[0], "value": metric[1]}
    return point


def _seed_run(seed: int, record: dict[str, Any]) -> dict[str, Any]:
    """What one seed's run keeps in results.json: its quality, forgetting, losses and times."""
    return {"seed": seed, "quality": record.get("quality"), "forgetting": record.get("forgetting"),
            "losses": record.get("losses"), "train_s": _get_time(record, "train_s"), "step_s": _get_time(record, "step_s")}


def _get_time(record: dict[str, Any], key: str) -> Any:
    return (record.get("time") or {}).get(key)


def _describe_failure(err: BaseException) -> str:
    message = str(err) or type(err).__name__
    return message if type(err).__name__ in message else f"{type(err).__name__}: {message}"


def _run_length_fields(name: str, max_steps: int, options: dict[str, Any] | None) -> dict[str, Any] | None:
    """Methods with a schedule over the run (MethodInfo.run_length_field, e.g. AdaLoRA's
    total_step) follow the run's length."""
    if name == FULL:
        return options
    import deltatune

    field = deltatune.method_info(name).run_length_field
    if field and field not in (options or {}):
        return {**(options or {}), field: max_steps}
    return options


def compare(
    task: Any = "sentiment",
    methods: Sequence[str] | str | None = None,
    *,
    quick: bool = False,
    output_dir: str | os.PathLike | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    train_limit: int | None = None,
    eval_limit: int | None = None,
    seed: int = 0,
    lrs: dict[str, float | str] | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    task_options: dict[str, Any] | None = None,
    device: str = "auto",
    storage_tasks: int = 100,
    keep_checkpoints: bool = False,
    quantize: str | None = None,
    progress: bool = True,
    console: Callable[[str], None] | None = print,
    report: bool = True,
    report_to: Sequence[str] | str | None = None,
    seeds: int = 1,
    curve_points: int = 2,
    distributed: str = "auto",
) -> CompareRun:
    """Train full fine-tuning and PEFT methods on one task alike and report how they compare.

    task: a task name (see `deltatune.train.available_tasks()`) or a Task object.
    methods: names or a comma-separated string ("full,lora,bitfit"), or "all" for full
        fine-tuning and every registered method; default: the preset's list (see RUN_PRESETS).
    quick: the short preset (about 3 minutes on 2 CPU cores) instead of the default one.
    lrs / method_options: per-method learning rates and config fields over the defaults; a rate of
        "auto" (key "*" for every method) runs a learning-rate range test on the prepared model
        just before training it and trains at its suggestion (recorded as lr_range in results.json).
    quantize: "nf4", "fp4" or "int4" stores the frozen base of every PEFT method in 4 bits (the
        qlora method takes it as its quant_type); full fine-tuning stays in full precision.
    report_to: "tensorboard" and/or "csv": each method's training scalars under output_dir/logs/<method>.
    seeds: train every method this many times (seeds seed, seed+1, ...); quality and forgetting are
        reported as mean +- sample std, the plots get error bars. Memory, storage and the interleaved
        step times come from the first seed's model.
    curve_points: times in-domain quality and forgetting are evaluated during training (evenly
        spaced; the first seed): the report compares forgetting where the methods reach the same
        in-domain quality. 0: no curves.
    distributed: under torchrun (or accelerate launch), how each method trains over the launched
        processes: "ddp", "fsdp2" or "auto" (deltatune.distributed.resolve_strategy); batch_size is
        the global batch. Every process runs every phase together; rank 0 alone prints and writes.
        "none" refuses a launch of several processes (each would run everything). Outside a launch
        it changes nothing.
    Writes results.json (after every phase), report.md and PNG plots into `output_dir`.
    """
    if distributed not in dist.STRATEGIES:
        raise ValueError(f"distributed must be one of {', '.join(dist.STRATEGIES)}, got {distributed!r}.")
    if distributed == "none":
        dist.refuse_several_processes(
            "deltatune compare --distributed none", "Run it without torchrun, or let the processes train each "
            "method together: --distributed ddp, fsdp2 or auto.")
    elif dist.launched():
        dist.init_from_env()  # before anything is written: rank 0 alone writes and prints
    elif distributed != "auto" and not dist.is_initialized():
        raise dist.DistributedError(
            f"distributed={distributed!r} needs several processes: launch with torchrun (`torchrun --nproc_per_node 2 "
            f"-m deltatune.cli compare --distributed {distributed} ...`), or leave it at auto to compare in this process.")
    if not dist.is_main():
        console, progress, report = None, False, False
    settings = resolve_settings(
        task, methods, "quick" if quick else "default", max_steps, batch_size, train_limit, eval_limit,
        seed, device, storage_tasks, keep_checkpoints, task_options, seeds, curve_points,
    )
    lrs = dict(lrs or {})
    every = lrs.pop("*", None)
    if every is not None:
        lrs = {**{name: every for name in settings.methods}, **lrs}
    auto = {name for name, value in lrs.items() if value == "auto"}
    bad = {name: value for name, value in lrs.items() if name not in auto and not isinstance(value, (int, float))}
    if bad:
        raise ValueError(f"Learning rates must be numbers or 'auto', got {bad}.")
    unknown = set(lrs) | set(method_options or {})
    unknown -= set(settings.methods)
    if unknown:
        raise ValueError(f"Options given for methods that are not run: {', '.join(sorted(unknown))}. Run: {', '.join(settings.methods)}.")
    # Every method's config is built here, so a bad field fails before anything is written.
    methods_used = {
        name: method_settings(
            name, _run_length_fields(name, settings.max_steps, (method_options or {}).get(name)),
            None if name in auto else lrs.get(name), quantize=quantize, quantize_full="keep",
        )
        for name in settings.methods
    }
    for name in auto:
        methods_used[name].lr_auto = True
    settings.quantize = next((m.quantize for m in methods_used.values() if m.quantize), None)
    from deltatune.train.reporting import check_report_to

    settings.report_to = check_report_to(report_to)
    if dist.is_initialized():
        settings.distributed, settings.processes = distributed, dist.world_size()
    # one folder for all processes: a default one is named after rank 0's clock
    path = prepare_output_dir(dist.from_main(str(output_dir if output_dir is not None else default_output_dir())))
    comparison = _Comparison(settings, task, path, methods_used, progress, console)
    comparison.results.save()
    status = "interrupted"
    try:
        _say(console, f"Loading task {settings.task!r} ...")
        comparison.load_task()
        for index, name in enumerate(settings.methods, start=1):
            comparison.run_method(index, name)
        comparison.time_interleaved()
        status = "completed"
    except Exception as err:
        comparison.results.data["error"] = _describe_failure(err)
        status = "failed"
        raise
    finally:
        comparison.finish(status)
        files = [comparison.results.path]
        if report and comparison.results.data.get("methods"):
            files += _write_reports(comparison.results.data, path, console)
    return CompareRun(path, comparison.results.data, files)


def _write_reports(results: dict[str, Any], output_dir: Path, console: Callable[[str], None] | None) -> list[Path]:
    from .plots import write_plots
    from .report import render_table, write_markdown

    files: list[Path] = []
    try:
        files += write_plots(results, output_dir)
    except Exception as err:  # a plotting problem must not hide the measured results
        _say(console, f"Plots were not written: {_describe_failure(err)}")
    files.insert(0, write_markdown(results, output_dir / "report.md"))
    if console is not None:
        console(render_table(results))
        console(f"Results: {output_dir / RESULTS_NAME}\nReport: {output_dir / 'report.md'}")
    return files
