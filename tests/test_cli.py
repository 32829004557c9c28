"""The `deltatune` command line: argument handling, exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_compare import TinyTask

import deltatune.train
from deltatune.cli import EXIT_USAGE, SUBCOMMANDS, _method_values, build_parser, main


@pytest.fixture
def tiny_task(monkeypatch):
    """`--task tiny` resolves to the tiny test task; other names go to the real registry."""
    real_get_task = deltatune.train.get_task
    task = TinyTask()
    monkeypatch.setattr(deltatune.train, "get_task", lambda name, **options: task if name == "tiny" else real_get_task(name, **options))
    return task


def test_every_subcommand_is_registered_with_help(capsys):
    names = [sub.name for sub in SUBCOMMANDS]
    assert names[:4] == ["compare", "estimate", "train", "eval"]
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in names)


def test_console_script_module_runs():
    done = subprocess.run([sys.executable, "-m", "deltatune.cli", "estimate", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--seq-len" in done.stdout


def test_estimate_prints_a_table(capsys):
    assert main(["estimate", "minilm", "--methods", "full,lora", "--batch-size", "2", "--seq-len", "16", "--num-labels", "3"]) == 0
    out = capsys.readouterr().out
    assert "Estimate for minilm" in out and "full" in out and "lora" in out


def test_estimate_json_and_method_fields(capsys):
    assert main(["estimate", "gpt2", "--methods", "lora", "--set", "lora.r=2", "--batch-size", "1", "--seq-len", "8", "--json"]) == 0
    low_rank = json.loads(capsys.readouterr().out)["rows"][0]["trainable"]
    assert main(["estimate", "gpt2", "--methods", "lora", "--set", "lora.r=4", "--batch-size", "1", "--seq-len", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["trainable"] == 2 * low_rank


def test_unknown_method_is_a_usage_error(capsys, tmp_path):
    code = main(["compare", "--task", "tiny", "--methods", "full,lorra", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "Unknown method 'lorra'" in err and "Available methods: full" in err
    assert not (tmp_path / "out").exists()


def test_unknown_preset_names_the_presets(capsys):
    assert main(["estimate", "llama-9000b"]) == EXIT_USAGE
    assert "Presets: llama-7b" in capsys.readouterr().err


def test_bad_key_value_is_explained():
    with pytest.raises(ValueError, match="METHOD.FIELD=VALUE"):
        _method_values(["r=4"], "--set")
    assert _method_values(["lora.r=4", "lora.target_modules=[query,value]"], "--set") == {
        "lora": {"r": 4, "target_modules": ["query", "value"]}
    }


def test_compare_runs_and_estimate_reads_its_results(tiny_task, tmp_path, capsys):
    out = tmp_path / "run"
    code = main([
        "compare", "--task", "tiny", "--methods", "full,lora", "--steps", "4", "--batch-size", "8",
        "--eval-limit", "16", "--lr", "lora=1e-2", "--set", "lora.r=2", "--output", str(out), "--no-progress",
        "--report-to", "csv",
    ])
    printed = capsys.readouterr().out
    assert code == 0
    assert "W/G/O/A" in printed and "lora" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["method_settings"]["lora"]["lr"] == 1e-2
    assert results["method_settings"]["lora"]["config"]["r"] == 2
    for method in ("full", "lora"):  # --report-to csv: each method's training scalars
        assert "train/loss" in (out / "logs" / method / "metrics.csv").read_text()
    assert main(["estimate", "--results", str(out / "results.json")]) == 0
    assert "Estimate (batch 8 x 12 tokens) vs measured" in capsys.readouterr().out


def test_unwritable_output_is_a_usage_error(tiny_task, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["compare", "--task", "tiny", "--methods", "full", "--output", str(blocker / "run")]) == EXIT_USAGE
    assert "Cannot write to the output folder" in capsys.readouterr().err


def test_train_from_yaml_then_eval(tiny_task, tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(
        "task: tiny\nmethod: lora\nmethod_options: {r: 2}\nlr: 0.01\n"
        f"train: {{max_steps: 3, batch_size: 8, progress: false}}\noutput: {tmp_path / 'adapter'}\neval_limit: 16\n"
    )
    assert main(["train", "--config", str(config), "--set", "r=4", "--no-progress", "--train-option", "log_every=1"]) == 0
    printed = capsys.readouterr()
    assert "step 3/3 loss" in printed.err  # without a progress bar the loss is still reported
    trained = json.loads(printed.out.split("Saved to")[-1].split("\n", 1)[1])
    assert set(trained) == {"in_domain", "out_of_domain", "forgetting"}
    saved = json.loads((tmp_path / "adapter" / "deltatune_run.json").read_text())
    assert saved["method_settings"]["config"]["r"] == 4 and saved["steps"] == 3
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["eval", str(tmp_path / "adapter"), "--splits", "in_domain", "--limit", "16"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["in_domain"]["accuracy"] == trained["in_domain"]["accuracy"]


def test_train_rejects_unknown_yaml_keys(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("task: tiny\nmethods: lora\n")
    assert main(["train", "--config", str(config)]) == EXIT_USAGE
    assert "Unknown key(s) methods" in capsys.readouterr().err


def test_eval_of_missing_folder_is_explained(capsys, tmp_path):
    assert main(["eval", str(tmp_path / "nothing")]) == EXIT_USAGE
    assert "No such folder" in capsys.readouterr().err


def test_train_and_eval_over_a_4bit_base(tiny_task, tmp_path, capsys):
    out = tmp_path / "adapter"
    args = ["train", "--task", "tiny", "--method", "lora", "--quantize", "nf4", "--set", "r=2", "--lr", "0.01",
            "--steps", "3", "--batch-size", "8", "--eval-limit", "16", "--output", str(out), "--no-progress"]
    assert main(args) == 0
    trained = json.loads(capsys.readouterr().out.split("Saved to")[-1].split("\n", 1)[1])
    saved = json.loads((out / "deltatune_run.json").read_text())
    assert saved["quantize"] == "nf4"
    # eval quantizes the base the same way, so it reproduces the accuracy measured after training.
    assert main(["eval", str(out), "--splits", "in_domain", "--limit", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["in_domain"]["accuracy"] == trained["in_domain"]["accuracy"]


def test_full_fine_tuning_of_a_4bit_base_is_refused(tiny_task, tmp_path, capsys):
    args = ["train", "--task", "tiny", "--method", "full", "--quantize", "nf4", "--output", str(tmp_path / "x")]
    assert main(args) == EXIT_USAGE
    assert "cannot train a nf4 (4-bit) base" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unknown_quantize_type_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--quantize", "nf3"])
    assert "nf4" in capsys.readouterr().err


def test_train_help_lists_the_tasks_and_their_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "sentiment:" in text and "classification: model, train_file" in text


def test_train_checkpoints_beside_the_adapter_without_an_output_dir_option(tiny_task, tmp_path, capsys):
    assert main(["train", "--task", "tiny", "--method", "lora", "--train-option", "max_steps=2", "--train-option", "batch_size=8",
                 "--train-option", "checkpoint_every=1", "--output", str(tmp_path / "adapter"), "--no-progress", "--no-eval"]) == 0
    assert any((tmp_path / "adapter" / "checkpoints").iterdir())


def test_compare_with_lr_auto_trains_at_the_range_tests_suggestion(tiny_task, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["compare", "--task", "tiny", "--methods", "full,lora", "--steps", "4", "--batch-size", "8",
                 "--eval-limit", "16", "--lr", "lora=auto", "--output", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    lora = results["methods"]["lora"]
    suggested = lora["lr_range"]["suggested_lr"]
    assert suggested and results["method_settings"]["lora"] == {**results["method_settings"]["lora"], "lr": suggested, "lr_auto": True}
    assert "lr_range" not in results["methods"]["full"] and "lr_auto" not in results["method_settings"]["full"]
    assert main(["compare", "--task", "tiny", "--methods", "lora", "--lr", "lora=fast", "--output", str(out)]) == 2
    assert "numbers or 'auto'" in capsys.readouterr().err
