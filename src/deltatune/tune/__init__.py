"""`deltatune tune`: a search over methods and their hyper-parameters, on Optuna.

    from deltatune.tune import tune
    study = tune("sentiment", ["lora", "ia3"], trials=20, output_dir="runs/tune")

Each trial picks a method, a learning rate (log scale, a decade either side of the method's
registered rate) and the method's own fields from its `MethodInfo.search_space` (declared beside
the method, not here), trains it with the same job `deltatune train` runs, and scores the
in-domain quality (accuracy, or perplexity for language models). With more objectives ("params":
trainable parameters, "step_time": seconds per step) the study is multi-objective (NSGA-II),
otherwise TPE. The study lives in SQLite in the output folder (or any database URL): a killed
search continues from its finished trials when run again, and several workers (`workers=N`,
processes, or machines pointing at one database) share one study without repeating a trial
(Optuna hands out the trials). Per method, the best trial is written as a YAML file that
`deltatune train --config` accepts unchanged.
"""

from __future__ import annotations

import json
import math
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

OBJECTIVES = ("quality", "params", "step_time")
STUDY_NAME = "deltatune"


@dataclass
class TuneSettings:
    task: str
    methods: list[str]
    trials: int
    objectives: list[str]
    storage: str
    output_dir: str
    task_options: dict[str, Any]
    train: dict[str, Any]
    train_limit: int | None
    eval_limit: int | None
    seed: int


class _Prefixed:
    """A trial seen by one method's search space: its parameter names get the method's prefix, so
    methods with fields of the same name keep separate distributions in one study."""

    def __init__(self, trial: Any, method: str) -> None:
        self._trial, self._method = trial, method

    def __getattr__(self, name: str) -> Any:
        suggest = getattr(self._trial, name)
        if not name.startswith("suggest_"):
            return suggest
        return lambda param, *args, **kwargs: suggest(f"{self._method}.{param}", *args, **kwargs)


def _quality_metric(kind: str) -> tuple[str, str]:
    """(metric name in the in-domain results, optimization direction) by task kind."""
    return ("accuracy", "maximize") if kind == "classification" else ("perplexity", "minimize")


def _spec_for(settings: TuneSettings, method: str, lr: float, fields: dict[str, Any], output: Path) -> dict[str, Any]:
    """The `deltatune train` job of a trial, as the YAML file it is written to."""
    from deltatune.compare.methods import method_settings

    base = method_settings(method)
    train = {"seed": settings.seed, **settings.train, "progress": False}
    return {
        "task": settings.task, "task_options": dict(settings.task_options), "method": method,
        "method_options": {**{k: v for k, v in base.config_fields.items() if k not in fields}, **fields},
        "lr": lr, "train": train, "output": str(output), "train_limit": settings.train_limit,
        "eval_limit": settings.eval_limit, "evaluate": True,
    }


def _objective(settings: TuneSettings, kind: str):
    import deltatune
    from deltatune.compare.jobs import TrainSpec, train_method

    metric, _ = _quality_metric(kind)

    def objective(trial: Any) -> Any:
        import optuna

        # Several workers may start a trial at once: one past the budget steps aside unrun.
        earlier = [t for t in trial.study.get_trials(deepcopy=False, states=(_state("COMPLETE"), _state("RUNNING"))) if t.number < trial.number]
        if len(earlier) >= settings.trials:
            raise optuna.TrialPruned("the study's trial budget is taken by earlier trials")
        method = trial.suggest_categorical("method", settings.methods)
        info = deltatune.method_info(method)
        prior = float(info.compare_defaults.get("lr", 1e-3))
        lr = trial.suggest_float(f"{method}.lr", prior / 10, prior * 10, log=True)
        fields = info.search_space(_Prefixed(trial, method)) if info.search_space else {}
        spec = _spec_for(settings, method, lr, fields, Path(settings.output_dir) / "trials" / f"{trial.number:04d}")
        summary = train_method(TrainSpec.from_dict(spec), progress=False, console=None)
        quality = summary["quality"]["in_domain"][metric]
        trial.set_user_attr("spec", spec)
        trial.set_user_attr("quality", quality)
        values = {"quality": quality, "params": summary["parameters"]["trainable"], "step_time": summary["step_s"]}
        chosen = [values[name] for name in settings.objectives]
        return chosen[0] if len(chosen) == 1 else tuple(chosen)

    return objective


def _study(settings: TuneSettings, kind: str, worker: int = 0) -> Any:
    """The study; `worker` seeds each worker's sampler apart (with one seed, workers would sample
    the same configurations)."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    _, quality_direction = _quality_metric(kind)
    directions = [quality_direction if name == "quality" else "minimize" for name in settings.objectives]
    # Heartbeats let a rerun fail the trials a killed worker left "running" (after grace_period s).
    storage = optuna.storages.RDBStorage(settings.storage, heartbeat_interval=1, grace_period=5)
    seed = settings.seed * 1000 + worker
    sampler = optuna.samplers.TPESampler(seed=seed) if len(directions) == 1 else optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=directions, sampler=sampler,
                               load_if_exists=True)


def _state(name: str) -> Any:
    import optuna

    return optuna.trial.TrialState[name]


def _work(settings: TuneSettings, kind: str, worker: int = 0) -> None:
    """One worker: run trials until the study holds `settings.trials` finished ones."""
    import time

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _study(settings, kind, worker)
    objective = _objective(settings, kind)
    while True:
        optuna.storages.fail_stale_trials(study)  # a killed worker's trial: failed, so it is run again
        finished = len(study.get_trials(deepcopy=False, states=(_state("COMPLETE"),)))
        running = len(study.get_trials(deepcopy=False, states=(_state("RUNNING"),)))
        if finished >= settings.trials:
            return
        if finished + running >= settings.trials:
            time.sleep(0.5)  # the rest of the budget is running elsewhere; it may still fail
            continue
        study.optimize(objective, n_trials=1, catch=(ValueError, RuntimeError))


def tune(
    task: str = "sentiment",
    methods: Sequence[str] | str = ("lora",),
    *,
    trials: int = 20,
    objectives: Sequence[str] = ("quality",),
    output_dir: str | Path = "runs/tune",
    storage: str | None = None,
    workers: int = 1,
    task_options: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    train_limit: int | None = None,
    eval_limit: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Search `methods` on `task` until the study holds `trials` finished trials; returns the
    summary written to output_dir/results.json (best trial per method, every trial's values)."""
    from deltatune.compare.methods import validate_methods
    from deltatune.train import get_task

    methods = validate_methods(methods.split(",") if isinstance(methods, str) else methods)
    if "full" in methods:
        raise ValueError("tune searches PEFT methods; leave 'full' out (compare trains it as the baseline).")
    unknown = [name for name in objectives if name not in OBJECTIVES]
    if unknown or not objectives or objectives[0] != "quality":
        raise ValueError(f"objectives must start with 'quality' and come from {', '.join(OBJECTIVES)}; got {list(objectives)}.")
    if trials < 1 or workers < 1:
        raise ValueError(f"trials and workers must be at least 1, got {trials} and {workers}.")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    settings = TuneSettings(task, list(methods), trials, list(objectives), storage or f"sqlite:///{(output / 'study.db').resolve()}",
                            str(output), dict(task_options or {}), dict(train or {}), train_limit, eval_limit, seed)
    kind = getattr(get_task(task, **settings.task_options), "kind", "classification")
    _study(settings, kind)  # created once here, so that workers only load it
    if workers == 1:
        _work(settings, kind)
    else:
        context = multiprocessing.get_context("spawn")
        processes = [context.Process(target=_work, args=(settings, kind, index)) for index in range(workers)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
    return _write_results(_study(settings, kind), settings, kind)


def _write_results(study: Any, settings: TuneSettings, kind: str) -> dict[str, Any]:
    import optuna
    import yaml

    metric, direction = _quality_metric(kind)
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    rows = [{"number": t.number, "method": t.params["method"], "values": t.values, "params": t.params,
             "quality": t.user_attrs.get("quality")} for t in finished]
    best: dict[str, Any] = {}
    for method in settings.methods:
        own = [t for t in finished if t.params["method"] == method]
        if not own:
            continue
        pick = (max if direction == "maximize" else min)(own, key=lambda t: t.user_attrs["quality"])
        spec = dict(pick.user_attrs["spec"], output=str(Path(settings.output_dir) / f"best-{method}"))
        path = Path(settings.output_dir) / f"best-{method}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        best[method] = {"trial": pick.number, metric: pick.user_attrs["quality"], "config": str(path), "params": pick.params}
    results = {"task": settings.task, "metric": metric, "direction": direction, "objectives": settings.objectives,
               "trials": rows, "best": best, "storage": settings.storage}
    (Path(settings.output_dir) / "results.json").write_text(json.dumps(results, indent=2, default=_jsonable))
    return results


def _jsonable(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


__all__ = ["OBJECTIVES", "tune"]
