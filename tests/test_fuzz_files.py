"""Property tests: whatever adapter_config.json or safetensors header a folder holds, loading it
either gives the adapter or raises deltatune's own error (ConfigError, AdapterFileError), fast."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from conftest import tiny_llama

import deltatune as dt
from deltatune.io import CONFIG_NAME, WEIGHTS_NAME

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DELTATUNE_ERRORS = (dt.ConfigError, dt.AdapterFileError)
FIELDS = ["r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights", "target_modules",
          "rank_pattern", "alpha_pattern", "bias", "layers_to_transform", "modules_to_save", "fan_in_fan_out", "task_type"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
FAST = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "adapter"
    dt.wrap(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save(folder)
    return folder


def copy_of(saved, tmp_path_factory):
    folder = tmp_path_factory.mktemp("case") / "adapter"
    shutil.copytree(saved, folder)
    return folder


def load_or_refuse(folder) -> None:
    try:
        model = dt.load(tiny_llama(), folder)
    except DELTATUNE_ERRORS:
        return
    assert model.adapter_names == ["default"]


@FAST
@given(changes=st.dictionaries(st.sampled_from(FIELDS), json_values, min_size=1, max_size=4))
def test_any_config_field_values_load_or_give_a_deltatune_error(saved, tmp_path_factory, changes):
    folder = copy_of(saved, tmp_path_factory)
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(config))  # NaN and Infinity as Python's json writes them
    # The weights bring their own config when adapter_config.json was changed after the save;
    # reading the edited file alone must be as safe.
    (folder / WEIGHTS_NAME).write_bytes(_without_embedded_config((folder / WEIGHTS_NAME).read_bytes()))
    load_or_refuse(folder)


@FAST
@given(header=st.dictionaries(st.text(max_size=40), json_values, max_size=6), tail=st.binary(max_size=64),
       declared=st.none() | st.integers(0, 2**40))
def test_any_safetensors_header_loads_or_gives_a_deltatune_error(saved, tmp_path_factory, header, tail, declared):
    folder = copy_of(saved, tmp_path_factory)
    text = json.dumps(header).encode()
    length = len(text) if declared is None else declared
    (folder / WEIGHTS_NAME).write_bytes(struct.pack("<Q", length) + text + tail)
    load_or_refuse(folder)


@FAST
@given(key=st.sampled_from(["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]),
       dtype=st.sampled_from(["F32", "F16", "BF16", "I64", "I32", "BOOL", "U8", "F64"]),
       shape=st.lists(st.integers(0, 40), max_size=3))
def test_tensors_of_any_dtype_and_shape_load_or_give_a_deltatune_error(saved, tmp_path_factory, key, dtype, shape):
    from safetensors.torch import load_file, save_file

    folder = copy_of(saved, tmp_path_factory)
    tensors = load_file(str(folder / WEIGHTS_NAME))
    torch_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
                   "I32": torch.int32, "BOOL": torch.bool, "U8": torch.uint8, "F64": torch.float64}[dtype]
    tensors[key] = torch.zeros(shape, dtype=torch_dtype)
    save_file(tensors, str(folder / WEIGHTS_NAME))
    load_or_refuse(folder)


def _without_embedded_config(data: bytes) -> bytes:
    """The same safetensors file without deltatune's header fields (as a foreign writer makes it)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def test_pattern_keys_that_are_not_regular_expressions_are_refused_by_name():
    # Found by the fuzz test above: a saved alpha_pattern key "[" reached re.match.
    from deltatune.config import ConfigError

    for field_name, value in (("alpha_pattern", {"[": 2}), ("rank_pattern", {"(q": 2}), ("alpha_pattern", {"q": "8"})):
        with pytest.raises(ConfigError, match=field_name):
            dt.LoraConfig(r=2, **{field_name: value})
