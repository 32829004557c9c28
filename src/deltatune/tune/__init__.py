"""`deltatune tune`: a search over methods and their hyper-parameters, on Optuna.

    from deltatune.tune import tune
    results = tune("sentiment", ["lora", "ia3"], trials=20, output_dir="runs/tune")

Three stages, all resumable (run the same call again after a kill):
  1. search (tune/search.py): trials trained like `deltatune train` and scored on training
     examples held out as validation; TPE for quality alone, NSGA-II with more objectives
     (peak memory, step time, trainable parameters); weak trials pruned; the study in SQLite
     in the output folder or any database URL, shared by `workers` processes or machines;
  2. confirmation (tune/confirm.py): per method, the compare preset and the best trial retrained
     with `seeds` seeds on the whole training data and scored on the test split; the difference
     and the seed noise side by side; optionally a sweep of one field (LoRA's rank) at the tuned rate;
  3. outputs (tune/report.py): best-METHOD.yaml (`deltatune train --config` trains it unchanged),
     results.json, report.md, pareto.png, lr_sensitivity.png, sweep plots.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from pathlib import Path
from typing import Any, Sequence

from .search import LR_PRIORS, OBJECTIVES, TuneSettings, open_study, prepare_study, quality_metric, work

# Measured on 2 CPU cores: ~0.6 min of range tests, ~35 s a trial, ~37 s a confirmation run (12
# at most): 12 trials and a fixed 7.5-minute search took 14.7 min. The budget covers the whole run:
# no trial starts unless it and the confirmation runs fit in it.
QUICK = {"methods": ("lora", "ia3", "bitfit"), "trials": 12, "seeds": 2, "budget_minutes": 13.0, "validation": 320}


def tune(
    task: str = "sentiment",
    methods: Sequence[str] | str | None = None,
    *,
    trials: int | None = None,
    objectives: Sequence[str] = ("quality",),
    output_dir: str | Path = "runs/tune",
    storage: str | None = None,
    workers: int = 1,
    task_options: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    train_limit: int | None = None,
    eval_limit: int | None = None,
    seed: int = 0,
    quick: bool = False,
    budget_minutes: float | None = None,
    seeds: int | None = None,
    validation: int | None = None,
    prune: bool = True,
    lr_prior: str = "range",
    sweep: dict[str, list[Any]] | None = None,
) -> dict[str, Any]:
    """Search, confirm and report; returns the summary written to output_dir/results.json.

    methods: PEFT methods to search (default lora; with quick: lora, ia3, bitfit). trials: finished
    trials (complete or pruned) the study should hold; 0 skips the search (a sweep at the registered
    or earlier-tuned rate). quick: the compare --quick run (60 steps of 32, 1,920 examples, 400 per
    evaluation) with up to 12 trials, 2 seeds and a 13-minute budget. budget_minutes: the whole
    run's time; no trial starts unless it and the confirmation and sweep runs still fit (each at a
    typical trial's length). seeds: runs per configuration in confirmation and sweep (0: none).
    validation: training examples held out to score trials. lr_prior: "range" (a learning-rate range
    test per method centres the search) or "registered" (the method's compare rate). sweep:
    {field: values} for the one method searched, e.g. {"r": [1, 2, 4, 8, 16, 32]}.
    """
    from deltatune import distributed
    from deltatune.compare.methods import validate_methods

    distributed.refuse_several_processes(
        "deltatune tune", "Run it without torchrun (several searches share a study through --storage and --workers).")
    from deltatune.compare.presets import RUN_PRESETS
    from deltatune.train import get_task
    from deltatune.train.tasks import ValidationHoldout

    preset = RUN_PRESETS["quick" if quick else "default"]
    methods = methods or (QUICK["methods"] if quick else ("lora",))
    methods = validate_methods(methods.split(",") if isinstance(methods, str) else methods)
    trials = trials if trials is not None else (QUICK["trials"] if quick else 20)
    seeds = seeds if seeds is not None else (QUICK["seeds"] if quick else 3)
    budget_minutes = budget_minutes if budget_minutes is not None else (QUICK["budget_minutes"] if quick else None)
    _check(methods, objectives, trials, workers, seeds, lr_prior, sweep, budget_minutes)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.time()
    settings = TuneSettings(
        task, list(methods), trials, list(objectives), storage or f"sqlite:///{(output / 'study.db').resolve()}",
        str(output), dict(task_options or {}),
        {"max_steps": preset.max_steps, "batch_size": preset.batch_size, **(train or {})},
        train_limit if train_limit is not None else preset.train_limit,
        eval_limit if eval_limit is not None else preset.eval_limit,
        seed, validation or (QUICK["validation"] if quick else 400), prune, lr_prior,
        deadline=started + budget_minutes * 60 if budget_minutes else None,
        reserve_runs=seeds * (2 * len(methods) + sum(len(v) for v in (sweep or {}).values())),
    )
    base_task = get_task(task, **settings.task_options)
    kind = getattr(base_task, "kind", "classification")
    study = prepare_study(settings, kind, ValidationHoldout(base_task, settings.validation)) if trials else open_study(settings, kind)
    if trials:
        _search(settings, kind, workers)
    search_s = time.time() - started
    return _finish(settings, open_study(settings, kind) if trials else study, kind, seeds, sweep or {}, search_s)


def _check(methods: Sequence[str], objectives: Sequence[str], trials: int, workers: int, seeds: int, lr_prior: str,
           sweep: dict[str, list[Any]] | None, budget_minutes: float | None) -> None:
    if "full" in methods:
        raise ValueError("tune searches PEFT methods; leave 'full' out (compare trains it as the baseline).")
    unknown = [name for name in objectives if name not in OBJECTIVES]
    if unknown or not objectives or objectives[0] != "quality" or len(set(objectives)) != len(objectives):
        raise ValueError(f"objectives must start with 'quality' and come from {', '.join(OBJECTIVES)} "
                         f"(each once); got {list(objectives)}.")
    if trials < 0 or workers < 1 or seeds < 0:
        raise ValueError(f"trials and seeds must be at least 0 and workers at least 1; got trials={trials}, "
                         f"seeds={seeds}, workers={workers}.")
    if lr_prior not in LR_PRIORS:
        raise ValueError(f"lr_prior must be one of {', '.join(LR_PRIORS)}, got {lr_prior!r}.")
    if budget_minutes is not None and not (budget_minutes > 0 and math.isfinite(budget_minutes)):
        raise ValueError(f"budget_minutes must be a positive number of minutes, got {budget_minutes!r}.")
    if sweep:
        if len(methods) != 1 or len(sweep) != 1:
            raise ValueError(f"a sweep varies one field of one method; got methods {list(methods)} and fields "
                             f"{sorted(sweep)}.")
        if not seeds:
            raise ValueError("a sweep needs at least one seed per value (seeds >= 1).")


def _search(settings: TuneSettings, kind: str, workers: int) -> None:
    if workers == 1:
        work(settings, kind)
        return
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each: no forked torch threads
    processes = [context.Process(target=_worker, args=(settings, kind, index)) for index in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [index for index, process in enumerate(processes) if process.exitcode]
    if failed:
        raise RuntimeError(f"tune: worker(s) {failed} exited with an error (see their messages above).")


def _worker(settings: TuneSettings, kind: str, index: int) -> None:
    """A spawned worker: its progress lines on stderr like the parent's, then its trials."""
    import logging

    log = logging.getLogger("deltatune")
    log.addHandler(logging.StreamHandler())
    log.setLevel(logging.INFO)
    work(settings, kind, index)


def _finish(settings: TuneSettings, study: Any, kind: str, seeds: int, sweep: dict[str, list[Any]],
            search_s: float) -> dict[str, Any]:
    import yaml

    from .confirm import confirm, sweep as run_sweep
    from .report import plot_lr, plot_pareto, plot_sweep, report_markdown, trial_rows

    metric, direction = quality_metric(kind)
    output = Path(settings.output_dir)
    confirmed = confirm(settings, study, kind, seeds) if seeds else {}
    best = {}
    for method, entry in confirmed.items():
        path = output / f"best-{method}.yaml"
        path.write_text(yaml.safe_dump(entry["spec"], sort_keys=False))
        best[method] = {"trial": entry["trial"], "config": str(path), metric: entry["tuned"]["values"][0]}
    sweeps = [run_sweep(settings, study, kind, settings.methods[0], name, list(values), seeds)
              for name, values in sweep.items()]
    rows = trial_rows(study)
    finished = sum(row["state"] in ("COMPLETE", "PRUNED") for row in rows)
    stopped = (f"the time budget ended the search after {finished} of {settings.trials} trials"
               if settings.deadline and finished < settings.trials else "")
    results = {
        "task": settings.task, "methods": settings.methods, "metric": metric, "direction": direction,
        "objectives": settings.objectives, "validation": settings.validation, "seeds": seeds,
        "storage": settings.storage, "search_s": search_s, "stopped": stopped,
        "lr_priors": {k.split(".", 1)[1]: v for k, v in study.user_attrs.items() if k.startswith("lr_prior.")},
        "trials": rows, "best": best, "confirmed": confirmed, "sweeps": sweeps,
    }
    plots = [Path(path).name for path in (
        plot_pareto(rows, metric, direction == "maximize", output / "pareto.png"),
        plot_lr(rows, metric, output / "lr_sensitivity.png"),
        *(plot_sweep(s, confirmed.get(s["method"], {}).get("preset"), output / f"sweep-{s['method']}-{s['field']}.png")
          for s in sweeps),
    ) if path]
    results["plots"] = plots
    (output / "results.json").write_text(json.dumps(results, indent=2, default=_jsonable))
    (output / "report.md").write_text(report_markdown(results, plots))
    return results


def _jsonable(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


__all__ = ["OBJECTIVES", "TuneSettings", "tune"]
