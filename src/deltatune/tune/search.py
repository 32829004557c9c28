"""The search itself: one Optuna study, its trials, learning-rate priors, pruning and workers.

A trial is a `deltatune train` job (the same code path) on the task with `validation` training
examples held out; it is scored on those, never on the test split the report quotes. Per method:
  * the learning rate is searched on a log scale, a decade either side of a prior: the method's
    learning-rate range test (`lr_prior="range"`, run once per study and kept in it) or its
    registered compare rate; the compare preset's own rate always lies in the range;
  * the method's own fields come from its `MethodInfo.search_space` (declared beside the method);
  * the compare preset itself is queued as the method's first trial, so the search can only
    find something at least as good on validation.
Single-objective studies prune a trial whose intermediate validation score falls below the median
of the same method's finished trials at the same step (Optuna's median rule, per method; Optuna
prunes no multi-objective study).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

OBJECTIVES = ("quality", "memory", "step_time", "params")
STUDY_NAME = "deltatune"
LR_PRIORS = ("range", "registered")
LOG = logging.getLogger("deltatune")


@dataclass
class TuneSettings:
    task: str
    methods: list[str]
    trials: int  # finished (complete or pruned) trials the study should hold
    objectives: list[str]
    storage: str
    output_dir: str
    task_options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields of every run
    train_limit: int | None = None
    eval_limit: int | None = None
    seed: int = 0
    validation: int = 400  # training examples held out to score trials on
    prune: bool = True
    lr_prior: str = "registered"
    include_preset: bool = True
    deadline: float | None = None  # time.time() by which the whole run (search, confirmation) should end
    reserve_runs: int = 0  # confirmation and sweep runs to keep time for, at a typical trial's length

    @property
    def quality_every(self) -> int:
        """Optimizer steps between the intermediate scores the pruner reads (three per run)."""
        return max(1, int(self.train.get("max_steps", 200)) // 3)


class OverBudget(Exception):
    """A trial that started after the trial budget was taken elsewhere: failed, never run."""


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


def quality_metric(kind: str) -> tuple[str, str]:
    """(metric name, optimization direction) by task kind."""
    return ("accuracy", "maximize") if kind == "classification" else ("perplexity", "minimize")


def preset_lr(method: str) -> float:
    from deltatune.compare.methods import method_settings

    return method_settings(method).lr


def space_fields(method: str, trial: Any) -> dict[str, Any]:
    """The method's config fields for `trial` (a real trial or an optuna FixedTrial), from its
    registered search space; {} for a method without one."""
    import deltatune

    info = deltatune.method_info(method)
    return info.search_space(_Prefixed(trial, method)) if info.search_space else {}


def trial_spec(settings: TuneSettings, method: str, lr: float, fields: dict[str, Any], output: Path,
               seed: int | None = None) -> dict[str, Any]:
    """A `deltatune train` job as the YAML file it is written to: the compare preset's fields with
    the searched ones over them."""
    from deltatune.compare.methods import method_settings

    base = method_settings(method)
    train = {**settings.train, "seed": settings.seed if seed is None else seed, "progress": False}
    return {
        "task": settings.task, "task_options": dict(settings.task_options), "method": method,
        "method_options": {**{k: v for k, v in base.config_fields.items() if k not in fields}, **fields},
        "lr": lr, "train": train, "output": str(output), "train_limit": settings.train_limit,
        "eval_limit": settings.eval_limit, "evaluate": True,
    }


def lr_bounds(settings: TuneSettings, study: Any, method: str) -> tuple[float, float]:
    prior = study.user_attrs.get(f"lr_prior.{method}") or preset_lr(method)
    preset = preset_lr(method)
    return min(prior / 10, preset), max(prior * 10, preset)


def _objective(settings: TuneSettings, kind: str, task: Any) -> Callable[[Any], Any]:
    from deltatune.compare.jobs import TrainSpec, train_method
    from deltatune.train.tasks import VALIDATION

    metric, direction = quality_metric(kind)

    def objective(trial: Any) -> Any:
        import optuna

        # Several workers may start a trial at once: one past the budget steps aside unrun.
        earlier = [t for t in trial.study.get_trials(deepcopy=False, states=(*finished_states(), _state("RUNNING")))
                   if t.number < trial.number]
        if len(earlier) >= settings.trials:
            raise OverBudget("the study's trial budget is taken by earlier trials")
        trial.set_user_attr("worker", _worker_id())
        method = trial.suggest_categorical("method", settings.methods)
        low, high = lr_bounds(settings, trial.study, method)
        lr = trial.suggest_float(f"{method}.lr", low, high, log=True)
        fields = {} if trial.user_attrs.get("preset") else space_fields(method, trial)
        output = Path(settings.output_dir) / "trials" / f"{trial.number:04d}"
        spec = trial_spec(settings, method, lr, fields, output)
        trial.set_user_attr("spec", spec)

        def report(step: int, results: dict[str, Any]) -> None:
            value = results[VALIDATION][metric]
            trial.report(value, step)
            if settings.prune and len(settings.objectives) == 1 and _below_median(trial, method, step, value, direction):
                raise optuna.TrialPruned(f"validation {metric} {value:.4g} at step {step}")

        run = TrainSpec.from_dict(dict(spec, task=task))
        summary = train_method(run, progress=False, console=None, eval_splits=[VALIDATION],
                               quality_every=settings.quality_every, on_quality=report, measure_memory=True)
        values = {
            "quality": summary["quality"][VALIDATION][metric],
            "memory": summary["memory"]["peak"],
            "step_time": summary["step_s"],
            "params": summary["parameters"]["trainable"],
        }
        trial.set_user_attr("measures", values)
        chosen = [values[name] for name in settings.objectives]
        return chosen[0] if len(chosen) == 1 else tuple(chosen)

    return objective


def _below_median(trial: Any, method: str, step: int, value: float, direction: str, startup: int = 2) -> bool:
    """Optuna's median rule, within one method: prune when `value` at `step` is worse than the
    median of the method's finished trials there (once `startup` of them exist). Across methods
    the rule would be unfair: a method that starts fast (IA3 at a high rate) would prune a slower
    starter (LoRA) that ends ahead."""
    import statistics

    earlier = [t.intermediate_values[step] for t in trial.study.get_trials(deepcopy=False, states=(_state("COMPLETE"),))
               if t.params.get("method") == method and step in t.intermediate_values]
    if len(earlier) < startup:
        return False
    median = statistics.median(earlier)
    return value < median if direction == "maximize" else value > median


def open_study(settings: TuneSettings, kind: str, worker: int = 0) -> Any:
    """The study; `worker` seeds each worker's sampler apart (with one seed, workers would sample
    the same configurations)."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _, quality_direction = quality_metric(kind)
    directions = [quality_direction if name == "quality" else "minimize" for name in settings.objectives]
    # Heartbeats let a rerun fail the trials a killed worker left "running" (after grace_period s).
    storage = optuna.storages.RDBStorage(settings.storage, heartbeat_interval=1, grace_period=5)
    seed = settings.seed * 1000 + worker
    sampler = optuna.samplers.TPESampler(seed=seed) if len(directions) == 1 else optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=directions, sampler=sampler,
                               load_if_exists=True)


def prepare_study(settings: TuneSettings, kind: str, task: Any) -> Any:
    """Create the study once (workers only load it): learning-rate priors, the preset trials."""
    study = open_study(settings, kind)
    for method in settings.methods:
        key = f"lr_prior.{method}"
        if settings.lr_prior == "range" and key not in study.user_attrs:
            found = range_test_lr(settings, method, task)
            study.set_user_attr(key, found)
            LOG.info("tune: %s learning-rate range test suggests %s", method, f"{found:.3g}" if found else "nothing")
    if settings.include_preset and not study.trials:
        for method in settings.methods:
            study.enqueue_trial({"method": method, f"{method}.lr": preset_lr(method)}, user_attrs={"preset": True})
    return study


def range_test_lr(settings: TuneSettings, method: str, task: Any) -> float | None:
    """The method's learning-rate range test on the trials' training data (None: no clear fall)."""
    from deltatune.compare.jobs import _first_batches
    from deltatune.compare.methods import apply_method, method_settings
    from deltatune.train import seed_everything
    from deltatune.train.lr_range import lr_range_test

    seed_everything(settings.seed)
    base, tokenizer = task.load_model()
    data = task.train_data(tokenizer, limit=settings.train_limit)
    batch_size = int(settings.train.get("batch_size", 16))
    model = apply_method(base, method_settings(method), task.head_modules, _first_batches(task, data, batch_size))
    result = lr_range_test(model, data, collate_fn=task.collate, batch_size=batch_size, steps=30, seed=settings.seed,
                           device=str(settings.train.get("device", "auto")))
    return result.suggested_lr


def finished_states() -> tuple[Any, ...]:
    return (_state("COMPLETE"), _state("PRUNED"))


def _state(name: str) -> Any:
    import optuna

    return optuna.trial.TrialState[name]


def work(settings: TuneSettings, kind: str, worker: int = 0) -> None:
    """One worker: run trials until the study holds `settings.trials` finished ones or the
    deadline passes."""
    import optuna

    from deltatune.train import get_task
    from deltatune.train.tasks import ValidationHoldout

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(settings, kind, worker)
    task = ValidationHoldout(get_task(settings.task, **settings.task_options), settings.validation)
    objective = _objective(settings, kind, task)
    started, failures = time.time(), 0
    while True:
        optuna.storages.fail_stale_trials(study)  # a killed worker's trial: failed, so it is run again
        _fail_orphans(study)
        finished = len(study.get_trials(deepcopy=False, states=finished_states()))
        running = len(study.get_trials(deepcopy=False, states=(_state("RUNNING"),)))
        if finished >= settings.trials or _out_of_time(study, settings):
            return
        if finished + running >= settings.trials:
            time.sleep(0.5)  # the rest of the budget is running elsewhere; it may still fail
            continue
        ran: list[Any] = []
        with quiet_training():
            study.optimize(objective, n_trials=1, catch=(ValueError, RuntimeError, OverBudget),
                           callbacks=[lambda _, trial: ran.append(trial)])
        if ran:
            _log_progress(study, ran[0], settings, kind, started)
            failures = _count_failure(ran[0], failures)


def _worker_id() -> str:
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _fail_orphans(study: Any, unclaimed_after_s: float = 20.0) -> None:
    """Fail running trials whose worker is gone, which Optuna's heartbeats miss: a worker killed
    between creating a trial and its first heartbeat leaves it running forever. A trial whose worker
    on this host is no longer a process, or that no worker claimed within `unclaimed_after_s`
    (claiming takes milliseconds), is failed so that its place in the budget is run again."""
    import datetime
    import os
    import socket

    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(_state("RUNNING"),)):
        worker = trial.user_attrs.get("worker")
        if worker is None:
            orphaned = trial.datetime_start is not None and (now - trial.datetime_start).total_seconds() > unclaimed_after_s
        else:
            host, _, pid = worker.rpartition(":")
            orphaned = host == socket.gethostname() and not _alive(int(pid)) and int(pid) != os.getpid()
        if orphaned:
            try:
                study.tell(trial.number, state=_state("FAIL"))
            except (ValueError, RuntimeError):  # another worker got there first
                pass


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _out_of_time(study: Any, settings: TuneSettings) -> bool:
    """Whether one more trial and the runs kept in reserve would end past the deadline (a typical
    run: the median finished trial of this study)."""
    import statistics

    if not settings.deadline:
        return False
    lengths = [(t.datetime_complete - t.datetime_start).total_seconds()
               for t in study.get_trials(deepcopy=False, states=(_state("COMPLETE"),))]
    typical = statistics.median(lengths) if lengths else 0.0
    return time.time() + typical * (1 + settings.reserve_runs) >= settings.deadline


@contextlib.contextmanager
def quiet_training():
    """The training loop's per-step loss lines off while runs train: one line per run is enough."""
    loop_log = logging.getLogger("deltatune.train")
    level = loop_log.level
    loop_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        loop_log.setLevel(level)


def _count_failure(trial: Any, failures: int, limit: int = 3) -> int:
    """Consecutive failed trials of this worker; raise once `limit` in a row failed (a method or
    option that cannot train would otherwise be retried forever)."""
    reason = trial.system_attrs.get("fail_reason", "")
    if trial.state != _state("FAIL") or "OverBudget" in reason:
        return 0
    if failures + 1 >= limit:
        raise RuntimeError(f"tune: {limit} trials in a row failed; the last one: {reason}")
    return failures + 1


def _log_progress(study: Any, last: Any, settings: TuneSettings, kind: str, started: float) -> None:
    """One line per trial: how many are finished, this one, the best so far, the time left."""
    metric, direction = quality_metric(kind)
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in finished_states()]
    scored = [t for t in finished if t.state == _state("COMPLETE")]
    mine = [t for t in finished if t.datetime_start and t.datetime_start.timestamp() >= started]
    best = ""
    if scored:
        pick = (max if direction == "maximize" else min)(scored, key=lambda t: t.user_attrs["measures"]["quality"])
        best = f"; best {pick.params['method']} {pick.user_attrs['measures']['quality']:.4g} (trial {pick.number})"
    elapsed = time.time() - started
    left = ""
    if mine and len(finished) < settings.trials:
        left = f", about {elapsed / len(mine) * (settings.trials - len(finished)) / 60:.1f} min left in this worker"
    outcome = {"COMPLETE": "validation " + metric + " " + (f"{last.values[0]:.4g}" if last.values else "?"),
               "PRUNED": "pruned", "FAIL": "failed"}.get(last.state.name, last.state.name.lower())
    LOG.info("tune: trial %d/%d %s: %s%s (%.1f min%s)", len(finished), settings.trials,
             last.params.get("method", "?"), outcome, best, elapsed / 60, left)
