"""`deltatune tune` on a tiny task: best configs that train the same, resume after a kill, workers."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import pytest
from test_cli import tiny_task  # noqa: F401  (the fixture: --task tiny)

from deltatune.cli import main

optuna = pytest.importorskip("optuna")

TRAIN = ["--train-option", "max_steps=4", "--train-option", "batch_size=8", "--eval-limit", "16"]


def complete_trials(folder) -> list[tuple[int, str]]:
    try:
        with sqlite3.connect(folder / "study.db") as db:
            return db.execute("SELECT number, state FROM trials WHERE state = 'COMPLETE' ORDER BY number").fetchall()
    except sqlite3.OperationalError:  # the study's tables are being created
        return []


def test_tune_writes_a_best_config_that_trains_to_the_same_result(tiny_task, tmp_path, capsys):
    out = tmp_path / "tune"
    assert main(["tune", "--task", "tiny", "--methods", "lora,ia3", "--trials", "4", "--output", str(out), *TRAIN]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["trials"]) == 4 and results["metric"] == "accuracy"
    best = results["best"]["lora"] if "lora" in results["best"] else next(iter(results["best"].values()))
    capsys.readouterr()
    assert main(["train", "--config", best["config"], "--no-progress"]) == 0
    trained = json.loads(capsys.readouterr().out.split("Saved to")[-1].split("\n", 1)[1])
    assert trained["in_domain"]["accuracy"] == best["accuracy"]


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
from deltatune.tune import TuneSettings, _work
_work(TuneSettings("tiny", ["lora"], 4, ["quality"], sys.argv[2], sys.argv[3], {{}}, {{"max_steps": 3, "batch_size": 8}}, None, 16, 0),
      "classification", int(sys.argv[4]))
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
    command = [*runner(tmp_path), "tune", "--task", "tiny", "--trials", "3", "--output", str(out), *TRAIN]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None and (not (out / "study.db").exists() or not complete_trials(out)):
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    first = complete_trials(out)
    assert 1 <= len(first) < 3
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0  # the same command again
    done = complete_trials(out)
    assert len(done) == 3 and done[: len(first)] == first  # the finished trials were kept, not rerun


def test_two_workers_share_one_study_without_duplicates(tiny_task, tmp_path):
    import subprocess

    from deltatune.tune import TuneSettings, _study

    out = tmp_path / "tune"
    out.mkdir()
    storage = f"sqlite:///{out / 'study.db'}"
    settings = TuneSettings("tiny", ["lora"], 4, ["quality"], storage, str(out), {}, {"max_steps": 3, "batch_size": 8}, None, 16, 0)
    _study(settings, "classification")
    workers = [subprocess.Popen([*runner(tmp_path), "work", storage, str(out), str(index)]) for index in range(2)]
    assert [worker.wait(timeout=300) for worker in workers] == [0, 0]
    numbers = [number for number, _ in complete_trials(out)]
    assert len(numbers) == 4 and len(set(numbers)) == 4
    params = [t.params for t in _study(settings, "classification").get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    assert len({json.dumps(p, sort_keys=True) for p in params}) == 4  # four different configurations
