"""`deltatune tune` on a tiny task: scored on held-out training examples, pruning, budgets, best
configs that train the same, confirmation with seeds, sweeps, reports; resume after a kill, workers."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import statistics
import time

import pytest
from test_cli import tiny_task  # noqa: F401  (the fixture: --task tiny)

from deltatune.cli import main

optuna = pytest.importorskip("optuna")

TRAIN = ["--train-option", "max_steps=6", "--train-option", "batch_size=8", "--eval-limit", "16", "--validation", "16"]
SMALL = {"train": {"max_steps": 6, "batch_size": 8}, "eval_limit": 16, "validation": 16}


def trials_in(folder, states=("COMPLETE", "PRUNED")) -> list[tuple[int, str]]:
    try:
        with sqlite3.connect(folder / "study.db") as db:
            marks = ",".join("?" * len(states))
            return db.execute(f"SELECT number, state FROM trials WHERE state IN ({marks}) ORDER BY number", states).fetchall()
    except sqlite3.OperationalError:  # the study's tables are being created
        return []


def test_tune_writes_a_best_config_that_trains_to_the_same_result(tiny_task, tmp_path, capsys):
    out = tmp_path / "tune"
    assert main(["tune", "--task", "tiny", "--methods", "lora,ia3", "--trials", "4", "--seeds", "1",
                 "--output", str(out), *TRAIN]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["trials"]) == 4 and results["metric"] == "accuracy"
    assert set(results["best"]) == {"lora", "ia3"}
    best = results["best"]["lora"]
    capsys.readouterr()
    assert main(["train", "--config", best["config"], "--no-progress"]) == 0
    trained = json.loads(capsys.readouterr().out.split("Saved to")[-1].split("\n", 1)[1])
    assert trained["in_domain"]["accuracy"] == best["accuracy"]
    report = (out / "report.md").read_text()
    assert "| lora |" in report and "| ia3 |" in report and "pareto.png" in report
    assert (out / "pareto.png").stat().st_size > 0 and (out / "lr_sensitivity.png").stat().st_size > 0


def test_trials_are_scored_on_held_out_training_examples_never_on_the_test_split(tiny_task):
    from deltatune.train.tasks import VALIDATION, ValidationHoldout

    held = ValidationHoldout(tiny_task, 16)
    kept = held.train_data(None)
    _, validation = held._split(None)
    everything = tiny_task.train_data(None)
    assert len(kept) == len(everything) - 16 and len(validation) == 16
    kept_ids = {tuple(e["input_ids"].tolist()) for e in kept.examples}
    assert not kept_ids & {tuple(e["input_ids"].tolist()) for e in validation}  # never trained on
    model, _ = tiny_task.load_model()
    score = held.evaluate(model, None, VALIDATION)
    from deltatune.train.tasks import predict_labels

    predicted = predict_labels(model, validation, tiny_task.collate, 8)
    assert score["accuracy"] == sum(p == int(e["labels"]) for p, e in zip(predicted, validation)) / 16
    assert held.eval_splits()["in_domain"] == tiny_task.eval_splits()["in_domain"]
    with pytest.raises(ValueError, match="too few to hold out 500"):
        ValidationHoldout(tiny_task, 500).train_data(None)


def test_presets_come_first_and_weak_trials_are_pruned_before_they_save(tiny_task, tmp_path):
    from deltatune.tune import tune

    out = tmp_path / "tune"
    results = tune("tiny", ["lora", "ia3"], trials=12, seeds=0, output_dir=out, **SMALL)
    rows = results["trials"]
    assert [(r["method"], r["preset"]) for r in rows[:2]] == [("lora", True), ("ia3", True)]
    assert rows[0]["params"]["lora.lr"] == 1e-3  # the registered compare rate, inside the searched range
    pruned = [r for r in rows if r["state"] == "PRUNED"]
    assert pruned, "no trial was pruned"
    study = optuna.load_study(study_name="deltatune", storage=f"sqlite:///{out / 'study.db'}")
    for row in pruned:
        trial = study.trials[row["number"]]
        step = max(trial.intermediate_values)
        earlier = [t.intermediate_values[step] for t in study.trials[: row["number"]] if t.state.name == "COMPLETE"
                   and t.params["method"] == row["method"] and step in t.intermediate_values]
        assert len(earlier) >= 2 and trial.intermediate_values[step] < statistics.median(earlier)  # its method's median
        assert not (out / "trials" / f"{row['number']:04d}" / "adapter_model.safetensors").exists()
    assert all(r["measures"]["memory"] > 0 and r["measures"]["params"] > 0 for r in rows if r["state"] == "COMPLETE")


def test_a_spent_time_budget_stops_the_search_and_says_so(tiny_task, tmp_path):
    from deltatune.tune import tune

    results = tune("tiny", ["lora"], trials=50, seeds=0, budget_minutes=0.02, output_dir=tmp_path / "tune",
                   lr_prior="registered", **SMALL)
    finished = [r for r in results["trials"] if r["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) < 50 and "budget" in results["stopped"]
    assert "Stopped early" in (tmp_path / "tune" / "report.md").read_text()


def test_a_rank_sweep_with_seeds_is_one_command(tiny_task, tmp_path, capsys):
    out = tmp_path / "tune"
    assert main(["tune", "--task", "tiny", "--methods", "lora", "--trials", "0", "--seeds", "2", "--sweep", "r=1,4",
                 "--output", str(out), *TRAIN]) == 0
    printed = capsys.readouterr().out
    assert "lora r sweep: 1:" in printed
    results = json.loads((out / "results.json").read_text())
    (sweep,) = results["sweeps"]
    assert [row["value"] for row in sweep["rows"]] == [1, 4]
    for row in sweep["rows"]:
        assert len(row["values"]) == 2 and row["std"] is not None
        config = json.loads((out / "sweep" / f"lora-r-{row['value']}" / "adapter_config.json").read_text())
        assert config["r"] == row["value"]
    assert (out / "sweep-lora-r.png").stat().st_size > 0


def test_a_sweep_keeps_the_derived_fields_of_the_method_space():
    from deltatune.tune.confirm import _Fixed
    from deltatune.tune.search import space_fields

    tuned = {"lora.r": 32, "lora.alpha_over_r": 2, "lora.use_rslora": True, "lora.lora_dropout": 0.1}
    assert space_fields("lora", _Fixed(tuned)) == {"r": 32, "lora_alpha": 64, "use_rslora": True, "lora_dropout": 0.1}
    with pytest.raises(KeyError):
        space_fields("lora", _Fixed({"lora.r": 8}))


def test_pareto_front_and_the_reading_of_gains():
    from deltatune.tune.report import _reading, pareto_front

    points = [(0.9, 10.0), (0.8, 5.0), (0.85, 20.0), (0.7, 5.0), (0.95, 30.0)]
    assert pareto_front(points, maximize=True) == [0, 1, 4]
    assert pareto_front([(2.0, 1.0), (1.5, 2.0), (3.0, 0.5), (2.5, 1.5)], maximize=False) == [0, 1, 2]
    text = _reading({"a": {"gain": 0.05, "noise": 0.01}, "b": {"gain": 0.005, "noise": 0.01},
                     "c": {"gain": -0.05, "noise": 0.01}}, "accuracy")
    assert "a: +0.0500 accuracy, a gain well beyond" in text and "b: +0.0050 accuracy, within" in text
    assert "c: -0.0500 accuracy, worse than the preset" in text


@pytest.mark.parametrize("argv, message", [
    (["--sweep", "r"], "--sweep takes FIELD=V1"),
    (["--methods", "lora,ia3", "--sweep", "r=1,2"], "a sweep varies one field of one method"),
    (["--objectives", "memory"], "objectives must start with 'quality'"),
    (["--methods", "full"], "leave 'full' out"),
    (["--budget-minutes", "nan"], "budget_minutes must be a positive number"),
])
def test_bad_tune_options_name_themselves(tiny_task, tmp_path, capsys, argv, message):
    assert main(["tune", "--task", "tiny", "--output", str(tmp_path / "t"), *argv]) != 0
    assert message in capsys.readouterr().err


RUNNER = """
import sys
sys.path[:0] = {paths!r}
import deltatune.train
from test_compare import TinyTask
task = TinyTask()
deltatune.train.get_task = lambda name, **options: task
if sys.argv[1] == "tune":
    from deltatune.cli import main
    sys.exit(main(sys.argv[1:]))
from deltatune.tune import TuneSettings, work
work(TuneSettings("tiny", ["lora"], 4, ["quality"], sys.argv[2], sys.argv[3], {{}}, {{"max_steps": 3, "batch_size": 8}},
                  None, 16, 0, validation=16, prune=False), "classification", int(sys.argv[4]))
"""


def runner(tmp_path) -> list[str]:
    """A Python process with the tiny task registered (a fresh interpreter: no fork of this one)."""
    import sys
    from pathlib import Path

    script = tmp_path / "runner.py"
    tests = str(Path(__file__).parent)
    script.write_text(RUNNER.format(paths=[tests, *sys.path]))
    return [sys.executable, str(script)]


def test_a_killed_study_continues_from_its_finished_trials(tmp_path):
    import subprocess

    out = tmp_path / "tune"
    command = [*runner(tmp_path), "tune", "--task", "tiny", "--trials", "3", "--seeds", "1", "--no-prune",
               "--output", str(out), *TRAIN]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None and (not (out / "study.db").exists() or not trials_in(out)):
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    first = trials_in(out)
    assert 1 <= len(first) < 3
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0  # the same command again
    done = trials_in(out)
    assert len(done) == 3 and done[: len(first)] == first  # the finished trials were kept, not rerun


def test_two_workers_share_one_study_without_duplicates(tiny_task, tmp_path):
    import subprocess

    from deltatune.tune import TuneSettings
    from deltatune.tune.search import open_study

    out = tmp_path / "tune"
    out.mkdir()
    storage = f"sqlite:///{out / 'study.db'}"
    settings = TuneSettings("tiny", ["lora"], 4, ["quality"], storage, str(out), {}, {"max_steps": 3, "batch_size": 8},
                            None, 16, 0, validation=16, prune=False)
    open_study(settings, "classification")
    workers = [subprocess.Popen([*runner(tmp_path), "work", storage, str(out), str(index)]) for index in range(2)]
    assert [worker.wait(timeout=300) for worker in workers] == [0, 0]
    numbers = [number for number, _ in trials_in(out, ("COMPLETE",))]
    assert len(numbers) == 4 and len(set(numbers)) == 4
    params = [t.params for t in open_study(settings, "classification").get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    assert len({json.dumps(p, sort_keys=True) for p in params}) == 4  # four different configurations


def test_a_trial_left_running_by_a_dead_worker_is_failed_and_rerun(tiny_task, tmp_path):
    """A worker killed between creating a trial and its first heartbeat leaves the trial running:
    Optuna never fails it, and a resumed study would wait for it forever."""
    import socket
    import subprocess
    import sys

    from deltatune.tune import TuneSettings
    from deltatune.tune.search import open_study, work

    out = tmp_path / "tune"
    out.mkdir()
    settings = TuneSettings("tiny", ["lora"], 2, ["quality"], f"sqlite:///{out / 'study.db'}", str(out), {},
                            {"max_steps": 3, "batch_size": 8}, None, 16, 0, validation=16, prune=False)
    study = open_study(settings, "classification")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for claimed_by in (f"{socket.gethostname()}:{dead.pid}", None):
        orphan = study.ask()
        if claimed_by:
            orphan.set_user_attr("worker", claimed_by)
    started = time.monotonic()
    work(settings, "classification")
    states = [t.state.name for t in open_study(settings, "classification").trials]
    assert states[:2] == ["FAIL", "FAIL"] and states.count("COMPLETE") == 2
    assert time.monotonic() - started < 120
