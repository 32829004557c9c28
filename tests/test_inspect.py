"""`deltatune inspect`: adapter summaries from file headers, broken folders, storage for N tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_llama

import deltatune as dt
from deltatune.cli import EXIT_FAILED, EXIT_OK, main
from deltatune.inspection import (
    adapters_dtype,
    inspect_adapters,
    inspect_report,
    summarize_adapter,
)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def folder_bytes(folder: Path) -> int:
    return sum((folder / name).stat().st_size for name in ADAPTER_FILES)


@pytest.fixture
def saved(tmp_path) -> dict[str, dt.DeltaModel]:
    """Three adapters of two methods under tmp_path/adapters, with the models that wrote them."""
    models = {
        "lora-r2": dt.wrap(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])),
        "lora-r8": dt.wrap(tiny_llama(), dt.LoraConfig(r=8, target_modules="all-linear")),
        "ia3": dt.wrap(tiny_llama(), dt.make_config("ia3")),
    }
    for name, model in models.items():
        model.save(tmp_path / "adapters" / name)
    return models


def test_summaries_match_the_files_and_the_models(saved, tmp_path):
    summaries = {s.name: s for s in inspect_adapters([tmp_path / "adapters"])}
    assert sorted(summaries) == sorted(saved)
    for name, model in saved.items():
        summary, report = summaries[name], model.trainable_parameters()
        assert summary.ok, summary.error
        assert summary.parameters == report.trainable
        assert summary.tensor_bytes == report.trainable_bytes  # float32 tensors, nothing else in the data
        assert summary.file_bytes == folder_bytes(tmp_path / "adapters" / name)
        assert summary.dtypes == ["F32"]
    assert summaries["lora-r2"].method == "lora" and summaries["lora-r2"].rank == 2
    assert summaries["lora-r2"].target_modules == ["q_proj", "v_proj"]
    # "all-linear" is written out as the modules it wrapped, so every reader loads the same adapter.
    assert summaries["lora-r8"].rank == 8
    assert summaries["lora-r8"].target_modules == saved["lora-r8"].adapter_module_names("default")
    assert len(summaries["lora-r8"].target_modules) == 2 * 7
    assert summaries["ia3"].method == "ia3" and summaries["ia3"].rank is None


def test_one_adapter_folder_is_inspected_by_itself(saved, tmp_path):
    [summary] = inspect_adapters([tmp_path / "adapters" / "lora-r2"])
    assert summary.name == "lora-r2" and summary.ok


def test_broken_and_foreign_folders_are_listed_with_their_error(saved, tmp_path):
    root = tmp_path / "adapters"
    (root / "lora-r2" / "adapter_model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    (root / "notes").mkdir()
    (root / "notes" / "README.txt").write_text("not an adapter")
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA", "r": 4}))
    (foreign / "adapter_model.safetensors").write_bytes((root / "ia3" / "adapter_model.safetensors").read_bytes())
    summaries = {s.name: s for s in inspect_adapters([root, tmp_path / "missing"])}
    assert "truncated or corrupt" in summaries["lora-r2"].error
    assert "No adapter_config.json" in summaries["notes"].error
    assert "VERA" in summaries["foreign"].error and summaries["foreign"].parameters == saved["ia3"].trainable_parameters().trainable
    assert "No such folder" in summaries["missing"].error
    assert summaries["ia3"].ok and summaries["lora-r8"].ok


def test_a_pickle_only_adapter_is_reported_not_loaded(tmp_path):
    folder = tmp_path / "old"
    dt.wrap(tiny_llama(), dt.LoraConfig(r=2)).save(folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    assert "pickle" in summarize_adapter(folder).error


def test_storage_for_n_tasks_from_a_parameter_count(saved, tmp_path):
    report = inspect_report([tmp_path / "adapters"], base_params=1_000_000)
    sizes = [folder_bytes(tmp_path / "adapters" / name) for name in saved]
    mean = sum(sizes) / len(sizes)
    assert report.base.bytes == 4_000_000  # the adapters' dtype, float32
    assert [s.tasks for s in report.storage] == [3, 10, 100]
    for estimate in report.storage:
        assert estimate.adapter_bytes == round(mean * estimate.tasks)
        assert estimate.shared_bytes == 4_000_000 + estimate.adapter_bytes
        assert estimate.full_copies_bytes == 4_000_000 * estimate.tasks
    assert report.storage[0].adapter_bytes == sum(sizes)  # N = the adapters listed: their real sizes
    bf16 = inspect_report([tmp_path / "adapters"], base_params=1_000_000, base_dtype="bfloat16", tasks=7)
    assert bf16.base.bytes == 2_000_000 and [s.tasks for s in bf16.storage] == [7, 10, 100]


def test_base_size_from_a_model_folder_and_from_the_adapters_config(tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    weights = sum(p.stat().st_size for p in base_dir.glob("*.safetensors"))
    # Loaded from the folder, the model records its path, and the adapter's config names it.
    dt.wrap(type(tiny_llama()).from_pretrained(base_dir), dt.LoraConfig(r=2)).save(tmp_path / "adapters" / "x")
    explicit = inspect_report([tmp_path / "adapters"], base_dir=base_dir)
    implied = inspect_report([tmp_path / "adapters"])
    assert explicit.base.bytes == implied.base.bytes == weights
    assert explicit.base.parameters == sum(p.numel() for p in tiny_llama().parameters())
    assert "named by the adapters' configs" in implied.base_note
    assert implied.storage[0].full_copies_bytes == weights  # N = 1 adapter listed


def test_base_size_from_a_config_only_folder(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "config-only")  # config.json names the architecture, as usual
    for weights in (tmp_path / "config-only").glob("*.safetensors"):
        weights.unlink()
    report = inspect_report([tmp_path / "none"], base_dir=tmp_path / "config-only")
    assert report.base.parameters == sum(p.numel() for p in model.parameters())
    assert report.base.bytes == 4 * report.base.parameters


def test_unknown_base_shows_adapters_only(saved, tmp_path, capsys):
    report = inspect_report([tmp_path / "adapters"])
    assert report.base is None and "unknown" in report.base_note
    assert all(s.shared_bytes is None and s.full_copies_bytes is None for s in report.storage)
    assert main(["inspect", str(tmp_path / "adapters")]) == EXIT_OK
    out = capsys.readouterr().out
    assert "Base model size unknown" in out and "adapters only" in out and "lora-r8" in out


def test_cli_table_and_json(saved, tmp_path, capsys):
    (tmp_path / "adapters" / "ia3" / "adapter_model.safetensors").write_bytes(b"garbage")
    assert main(["inspect", str(tmp_path / "adapters"), "--base-params", "500000", "--tasks", "4"]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert "base once + adapters" in out and "N full copies" in out
    assert "lora-r2" in out and "! " + str(tmp_path / "adapters" / "ia3") in out
    assert main(["inspect", str(tmp_path / "adapters"), "--base-params", "500000", "--tasks", "4", "--json"]) == EXIT_FAILED
    data = json.loads(capsys.readouterr().out)
    assert [s["tasks"] for s in data["storage"]] == [4, 10, 100]
    assert data["base"]["bytes"] == 2_000_000 and 0 < data["storage"][0]["saving"] < 1
    assert {a["name"]: a["error"] is None for a in data["adapters"]} == {"ia3": False, "lora-r2": True, "lora-r8": True}


def test_cli_rejects_two_base_sources(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path), "--base", str(tmp_path), "--base-params", "10"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_adapters_dtype_defaults_to_float32():
    assert adapters_dtype([]) == "float32"
