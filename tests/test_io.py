"""Adapter folders are written as one unit and read as one unit; damaged values are refused."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch
from conftest import randomize_adapters, tiny_llama

import deltatune as dt
from deltatune.io import CONFIG_NAME, WEIGHTS_NAME, read_adapter, save_adapter_files


def version(index: int, size: int = 1_000_000) -> tuple[dt.LoraConfig, dict[str, torch.Tensor]]:
    """A large adapter whose config and tensors both say which version it is."""
    generator = torch.Generator().manual_seed(index)
    config = dt.LoraConfig(r=4 + index, target_modules=["q_proj"])
    tensors = {f"base_model.model.layer{i}.lora_A.weight": torch.randn(size, generator=generator) for i in range(4)}
    return config, tensors


def fingerprint(config: dict, tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode() + tensors[key].numpy().tobytes())
    return config["r"], digest.hexdigest()


def _save_forever(directory: str, saves_done, last_save_seconds) -> None:
    torch.set_num_threads(1)
    index = 2
    while True:  # until killed: versions 2, 1, 2, 1, ... over a folder holding the previous child's last
        started = time.perf_counter()
        save_adapter_files(directory, *version(index))
        last_save_seconds.value = time.perf_counter() - started
        saves_done.value += 1
        index = 3 - index


def _wait_for_saves(saves_done, count: int, child, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while saves_done.value < count:
        assert child.is_alive(), "the saving process died on its own"
        assert time.monotonic() < deadline, f"the saving process finished {saves_done.value} of {count} saves in {timeout} s"
        time.sleep(0.001)


def test_a_save_killed_at_any_point_leaves_exactly_the_old_or_the_new_adapter(tmp_path):
    folder = tmp_path / "adapter"
    save_adapter_files(folder, *version(1))
    expected = {fingerprint(c.to_dict(), t) for c, t in (version(1), version(2))}
    context = multiprocessing.get_context("fork")
    rng = random.Random(0)
    torch.set_num_threads(1)
    seen = set()
    for attempt in range(50):
        saves_done, last_save_seconds = context.Value("i", 0), context.Value("d", 0.0)
        child = context.Process(target=_save_forever, args=(str(folder), saves_done, last_save_seconds))
        child.start()
        # The kill lands at a random point of the save after the first or the second completed one,
        # timed by the child's own saves (timing them from outside missed every save on a busy disk).
        completed = 1 + attempt % 2
        _wait_for_saves(saves_done, completed, child)
        time.sleep(rng.uniform(0.0, 1.25 * last_save_seconds.value))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        files = read_adapter(folder)
        found = fingerprint(files.config, files.tensors)
        assert found in expected, "a mixed or damaged adapter loaded"
        seen.add((found, files.config_from_weights))
    assert len({found for found, _ in seen}) == 2  # the kills landed at different points of the saves


def test_weights_committed_before_their_config_bring_their_own(tmp_path):
    """The state a kill between the two renames leaves: new weights, old adapter_config.json."""
    old, new = tmp_path / "old", tmp_path / "new"
    save_adapter_files(old, *version(1, size=10))
    save_adapter_files(new, *version(2, size=10))
    (old / WEIGHTS_NAME).write_bytes((new / WEIGHTS_NAME).read_bytes())
    files = read_adapter(old)
    assert files.config_from_weights and files.config["r"] == 6
    assert fingerprint(files.config, files.tensors) == fingerprint(version(2, size=10)[0].to_dict(), version(2, size=10)[1])


def test_a_save_in_the_model_api_loads_back_bit_exact_and_leaves_readable_files(tmp_path):
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4))
    randomize_adapters(model)
    old_umask = os.umask(0o022)
    try:
        path = model.save(tmp_path / "a")
    finally:
        os.umask(old_umask)
    for name in (CONFIG_NAME, WEIGHTS_NAME, "README.md"):
        assert (path / name).stat().st_mode & 0o777 == 0o644, name  # not 0600: others may read what the user shares
    loaded = dt.load(tiny_llama(), path)
    assert all(torch.equal(a, b) for a, b in zip(model.adapter_state_dict().values(), loaded.adapter_state_dict().values()))


def _rewrite(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / WEIGHTS_NAME))
    key = sorted(tensors)[0]
    tensors[key] = change(tensors[key])
    save_file(tensors, str(path / WEIGHTS_NAME))  # a foreign writer: no config hash in the header


@pytest.mark.parametrize("change, message", [
    (lambda t: t.to(torch.int64), "torch.int64 where the method stores torch.float32"),
    (lambda t: t.bool(), "torch.bool where the method stores torch.float32"),
    (lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), "NaN or infinite"),
    (lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), "NaN or infinite"),
])
def test_integer_boolean_and_non_finite_tensors_are_refused_not_cast(tmp_path, change, message):
    path = dt.wrap(tiny_llama(), dt.LoraConfig(r=4)).save(tmp_path / "a")
    _rewrite(path, change)
    with pytest.raises(dt.AdapterFileError, match=message):
        dt.load(tiny_llama(), path)


def test_half_precision_files_still_load(tmp_path):
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4))
    path = model.save(tmp_path / "a")
    _rewrite(path, lambda t: t.to(torch.bfloat16))
    dt.load(tiny_llama(), path)
