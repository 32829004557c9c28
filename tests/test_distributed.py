"""DDP and FSDP2 on 2 CPU processes (gloo, torchrun): the adapter after N steps with global batch B
equals one process's with batch B; saved files are the same files; checkpoints resume across
process counts (2 -> 1 and 1 -> 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import examples, run
from safetensors.torch import load_file

import deltatune as dt
from deltatune import distributed
from deltatune.train import TrainConfig, train

CASES = ["ddp-lora", "fsdp2-lora", "ddp-qlora", "fsdp2-qlora"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One torchrun launch (2 processes) running every case of tests/distributed_worker.py."""
    root = tmp_path_factory.mktemp("distributed")
    single = root / "checkpoints-of-1"
    run("none", "lora", root / "unused", steps=2, output_dir=str(single), checkpoint_every=2, schedule="constant")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(Path(__file__).with_name("distributed_worker.py")), str(root / "out"), str(single)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return root


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def single(tmp_path, method: str, steps: int = 3, **options):
    output = tmp_path / f"single-{method}-{steps}"
    losses = run("none", method, output, steps=steps, **options)
    return load_file(output / "adapter_model.safetensors"), losses


def assert_same_adapter(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(want) > 0
    for key, value in want.items():
        assert got[key].shape == value.shape and got[key].dtype == value.dtype and value.numel() > 0, key
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("case", CASES)
def test_two_processes_train_the_adapter_one_process_trains(two_processes, tmp_path, case):
    method = case.split("-")[1]
    want, want_losses = single(tmp_path, method)
    folder = two_processes / "out" / case
    assert_same_adapter(load_file(folder / "adapter_model.safetensors"), want)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    losses = json.loads((two_processes / "out" / "losses.json").read_text())[case]
    assert losses == pytest.approx(want_losses, rel=1e-4)
    lora_b = [v for k, v in want.items() if "lora_B" in k]
    assert all(v.abs().sum() > 0 for v in lora_b)  # it trained: B left zero


def test_a_checkpoint_of_one_process_resumes_on_two(two_processes, tmp_path):
    for rank in (0, 1):
        assert "at step 2" in (two_processes / "out" / f"log-rank{rank}.txt").read_text()  # resumed, not retrained
    want, _ = single(tmp_path, "lora", steps=4, schedule="constant")
    assert_same_adapter(load_file(two_processes / "out" / "resumed-on-2" / "adapter_model.safetensors"), want)


def test_a_checkpoint_of_two_processes_resumes_on_one(two_processes, tmp_path, caplog):
    checkpoints = tmp_path / "copy"
    shutil.copytree(two_processes / "out" / "checkpoints-of-2", checkpoints)
    written = sorted(p.name for p in next(checkpoints.glob("checkpoint-*")).iterdir())
    one = sorted(p.name for p in next((two_processes / "checkpoints-of-1").glob("checkpoint-*")).iterdir())
    assert written == one
    with caplog.at_level("INFO", logger="deltatune.train"):
        resumed, _ = single(tmp_path, "lora", steps=4, output_dir=str(checkpoints), resume=True, schedule="constant")
    assert "at step 2" in caplog.text
    want, _ = single(tmp_path / "straight", "lora", steps=4, schedule="constant")
    assert_same_adapter(resumed, want)


def test_strategies_outside_a_process_group():
    model = dt.wrap(torch.nn.Sequential(torch.nn.Linear(4, 4)), dt.LoraConfig(r=2, target_modules=["0"]))
    assert distributed.resolve_strategy("auto", model) == "none"
    with pytest.raises(distributed.DistributedError, match="needs a process group: launch with torchrun"):
        distributed.resolve_strategy("fsdp2", model)
    with pytest.raises(ValueError, match="distributed='ddpp' is not one of none, auto, ddp, fsdp2"):
        TrainConfig(distributed="ddpp")
    with pytest.raises(ValueError, match="must divide evenly across 3 processes"):
        from deltatune.train.loop import BatchStream

        BatchStream(examples(), 8, 0, list, rank=0, world_size=3)
    config = TrainConfig(max_steps=1, batch_size=4, progress=False, distributed="ddp", device="cpu")
    with pytest.raises(distributed.DistributedError):
        train(dt.wrap(torch.nn.Sequential(torch.nn.Linear(4, 4)), dt.LoraConfig(r=2, target_modules=["0"])),
              [{"x": torch.ones(4)}] * 4, config)
