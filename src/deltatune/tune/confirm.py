"""After the search: the winners retrained with several seeds and scored on the test split.

The search picks on validation; a claim about the test split needs fresh runs there, and a claim
that tuning helped needs the seed noise beside the difference. So, per method, the compare
preset and the best trial's configuration are trained `seeds` times each (the whole training
data, seeds settings.seed, +1, ...), and a sweep varies one search-space field around the best
configuration the same way. Each run is a `deltatune train` job whose folder keeps its spec and
summary: a rerun after a kill reuses the runs already done.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .search import LOG, TuneSettings, preset_lr, quality_metric, quiet_training, space_fields, trial_spec

TEST_SPLIT = "in_domain"
RUN_RECORD = "tune_run.json"


def seeded_values(settings: TuneSettings, method: str, lr: float, fields: dict[str, Any], folder: Path,
                  seeds: int, metric: str) -> dict[str, Any]:
    """Train the configuration `seeds` times; the test metric of each run, mean and std."""
    values = []
    for offset in range(seeds):
        output = folder if offset == 0 else folder.with_name(f"{folder.name}-seed{settings.seed + offset}")
        spec = trial_spec(settings, method, lr, fields, output, seed=settings.seed + offset)
        values.append(_run_once(spec)["quality"][TEST_SPLIT][metric])
        LOG.info("tune: %s seed %d (lr %.3g%s): test %s %.4g", method, settings.seed + offset, lr,
                 "".join(f", {k}={v:.3g}" if isinstance(v, float) else f", {k}={v}" for k, v in fields.items()),
                 metric, values[-1])
    return {"values": values, "mean": statistics.fmean(values), "std": statistics.stdev(values) if seeds > 1 else None,
            "lr": lr, "fields": fields}


def _run_once(spec: dict[str, Any]) -> dict[str, Any]:
    """The run's summary, from its folder when the same spec already ran there."""
    from deltatune.compare.jobs import TrainSpec, train_method

    record = Path(spec["output"]) / RUN_RECORD
    if record.exists():
        done = json.loads(record.read_text())
        if done.get("spec") == spec:
            return done["summary"]
    with quiet_training():
        summary = train_method(TrainSpec.from_dict(spec), progress=False, console=None, eval_splits=[TEST_SPLIT])
    record.write_text(json.dumps({"spec": spec, "summary": summary}, default=str))
    return summary


def best_trial(study: Any, method: str, direction: str) -> Any | None:
    """The method's finished trial with the best validation quality (None: none finished)."""
    import optuna

    own = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
           if t.params.get("method") == method]
    if not own:
        return None
    return (max if direction == "maximize" else min)(own, key=lambda t: t.user_attrs["measures"]["quality"])


def confirm(settings: TuneSettings, study: Any, kind: str, seeds: int) -> dict[str, Any]:
    """Per method: preset vs tuned on the test split, `seeds` runs each, and their difference."""
    from deltatune.compare.methods import method_settings

    metric, direction = quality_metric(kind)
    sign = 1 if direction == "maximize" else -1
    output = Path(settings.output_dir)
    confirmed: dict[str, Any] = {}
    for method in settings.methods:
        best = best_trial(study, method, direction)
        if best is None:
            continue
        spec = best.user_attrs["spec"]
        preset = seeded_values(settings, method, preset_lr(method), {}, output / "confirm" / f"{method}-preset",
                               seeds, metric)
        tuned_fields = {k: v for k, v in spec["method_options"].items()
                        if method_settings(method).config_fields.get(k, object()) != v}
        if spec["lr"] == preset["lr"] and not tuned_fields:
            tuned = dict(preset)  # the preset won the search: the same runs, not trained twice
        else:
            tuned = seeded_values(settings, method, spec["lr"], tuned_fields, output / f"best-{method}", seeds, metric)
        noise = [s for s in (preset["std"], tuned["std"]) if s is not None]
        confirmed[method] = {
            "trial": best.number, "validation": best.user_attrs["measures"]["quality"],
            "preset": preset, "tuned": tuned,
            # Positive: the tuned configuration is better (higher accuracy or lower perplexity).
            "gain": sign * (tuned["mean"] - preset["mean"]),
            "noise": max(noise) if noise else None,
            "spec": trial_spec(settings, method, spec["lr"], tuned_fields, output / f"best-{method}"),
        }
    return confirmed


def sweep(settings: TuneSettings, study: Any, kind: str, method: str, name: str, values: list[Any],
          seeds: int) -> dict[str, Any]:
    """Vary one field of the method's best configuration (a search-space parameter such as LoRA's
    `r`, a config field, or `lr`), `seeds` runs per value, scored on the test split."""
    metric, direction = quality_metric(kind)
    best = best_trial(study, method, direction)
    lr = best.params[f"{method}.lr"] if best else preset_lr(method)
    searched = {k.split(".", 1)[1]: v for k, v in (best.params if best else {}).items() if k.startswith(f"{method}.")}
    rows = []
    for value in values:
        point_lr, fields = (value, {}) if name == "lr" else (lr, {})
        if name != "lr":
            try:  # through the method's own space, so that derived fields follow (LoRA's alpha = r x ratio)
                fields = space_fields(method, _Fixed({f"{method}.{k}": v for k, v in {**searched, name: value}.items()}))
            except KeyError:  # the best trial was the preset, or `name` is a plain config field
                fields = {name: value}
        folder = Path(settings.output_dir) / "sweep" / f"{method}-{name}-{value}"
        rows.append({"value": value, **seeded_values(settings, method, point_lr, fields, folder, seeds, metric)})
    return {"method": method, "field": name, "metric": metric, "seeds": seeds, "lr": lr, "rows": rows}


class _Fixed:
    """A trial that answers every suggest_* with a given value, in or out of the space's choices
    (a sweep goes past them: LoRA's rank 32); KeyError for a parameter it was not given."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("suggest_"):
            raise AttributeError(name)
        return lambda param, *args, **kwargs: self._values[param]
