"""Mixed batches: each row of one forward or generate call uses its own adapter, or none.

The reference for every row is the same row run alone with its adapter active (set_adapter), or
with adapters disabled for a base row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from conftest import (
    randomize_adapters,
    relative_error,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_llama,
    token_batch,
)
from torch.utils._python_dispatch import TorchDispatchMode

import deltatune as dt
from deltatune.methods import lora as lora_module
from deltatune.layer import RowAdapters

ROWS = ["a", "b", None, "a"]  # two adapters, a base row, one adapter on two rows
TOLERANCE = 1e-5
GENERATE = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models run fastest on one thread, and many times faster when other jobs share the cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def with_adapters(base: torch.nn.Module, configs: dict[str, dt.AdapterConfig], seed: int = 3, scale: float = 0.1) -> dt.DeltaModel:
    """base with one adapter per config, each randomised (only the active adapter's tensors train)."""
    model = None
    for offset, (name, config) in enumerate(configs.items()):
        if model is None:
            model = dt.DeltaModel(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config, activate=True)
        randomize_adapters(model, seed=seed + offset, scale=scale)
    return model.eval()


def output_of(result) -> torch.Tensor:
    return result.logits


@contextlib.contextmanager
def alone(model: dt.DeltaModel, name: str | None) -> Iterator[None]:
    """Within the block only `name` is active; for a base row (None) every adapter is off."""
    if name is None:
        with model.disable_adapters():
            yield
    else:
        model.set_adapter(name)
        yield


def assert_rows_match_alone(model: dt.DeltaModel, inputs: torch.Tensor, rows: list[str | None]) -> None:
    with torch.no_grad():
        mixed = output_of(model(input_ids=inputs, adapter_names=rows))
        for i, name in enumerate(rows):
            with alone(model, name):
                single = output_of(model(input_ids=inputs[i : i + 1]))
            error = relative_error(mixed[i : i + 1], single)
            assert error < TOLERANCE, f"row {i} ({name}): relative error {error:.2e}"
            if name is not None:  # the adapter changes the row: a row left unchanged could not pass
                with alone(model, None):
                    base = output_of(model(input_ids=inputs[i : i + 1]))
                assert relative_error(single, base) > 1e-3, f"adapter {name} does not change row {i}"


@pytest.fixture(params=["gathered", "masked"])
def lora_form(request, monkeypatch):
    """Run the LoRA product in each of its two formulations (normally chosen by work size)."""
    monkeypatch.setitem(lora_module.MASKED_MAX_EXCESS, "cpu", -1 if request.param == "gathered" else 10**9)
    return request.param


LORA_CASES = {
    # different ranks in one layer: the stacks are zero-padded to the largest
    "lora": {"a": dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), "b": dt.LoraConfig(r=8, lora_alpha=4)},
    "rslora-and-patterns": {
        "a": dt.LoraConfig(r=4, use_rslora=True, rank_pattern={"k_proj": 2, "c_attn": 2, "query": 2}),
        "b": dt.LoraConfig(r=6, lora_alpha=3, alpha_pattern={"v_proj": 9.0, "c_fc": 9.0, "value": 9.0}),
    },
    # DoRA beside plain LoRA in the same layers
    "dora": {"a": dt.LoraConfig(r=4, use_dora=True), "b": dt.LoraConfig(r=4)},
    "dora-both": {"a": dt.LoraConfig(r=4, use_dora=True), "b": dt.LoraConfig(r=2, lora_alpha=5, use_dora=True)},
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert_classifier])  # Linear, Conv1D (+bias), Linear with bias
def test_lora_rows_equal_each_row_alone(build, case, lora_form):
    model = with_adapters(build(), LORA_CASES[case])
    assert_rows_match_alone(model, token_batch(), ROWS)


METHOD_CASES = {
    "ia3": {"a": dt.IA3Config(), "b": dt.IA3Config()},
    # different widths, layer norms and nonlinearities in one layer
    "houlsby": {
        "a": dt.BottleneckConfig(placement="houlsby", reduction_factor=4, layer_norm=True, scaling=2.0),
        "b": dt.BottleneckConfig(placement="houlsby", reduction_factor=8, nonlinearity="gelu"),
    },
    "pfeiffer": {
        "a": dt.BottleneckConfig(placement="pfeiffer", reduction_factor=4, layer_norm=True, nonlinearity="gelu"),
        "b": dt.BottleneckConfig(placement="pfeiffer", reduction_factor=4, layer_norm=True, nonlinearity="tanh", scaling=0.5),
    },
    "parallel": {
        "a": dt.BottleneckConfig(placement="parallel", reduction_factor=4, scaling=4.0),
        "b": dt.BottleneckConfig(placement="parallel", reduction_factor=2, layer_norm=True, nonlinearity="silu"),
    },
}


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert_classifier])
def test_ia3_and_bottleneck_rows_equal_each_row_alone(build, case):
    model = with_adapters(build(), METHOD_CASES[case])
    assert_rows_match_alone(model, token_batch(), ROWS)


def test_ia3_feedforward_and_output_scaling_in_one_layer():
    # "a" scales down_proj's input (feed-forward), "b" its output: the layer stacks both sides.
    model = with_adapters(
        tiny_llama(),
        {
            "a": dt.IA3Config(target_modules=["down_proj", "k_proj"], feedforward_modules=["down_proj"]),
            "b": dt.IA3Config(target_modules=["down_proj", "v_proj"], feedforward_modules=[]),
        },
    )
    assert_rows_match_alone(model, token_batch(), ROWS)


def test_methods_mixed_in_one_batch_leave_rows_without_their_adapter_unchanged(lora_form):
    # LoRA and IA3 share k_proj/v_proj: each layer gives "no delta" to rows of the other method.
    model = with_adapters(
        tiny_llama(),
        {"lora": dt.LoraConfig(r=4, use_dora=True), "ia3": dt.IA3Config(), "adapter": dt.BottleneckConfig(reduction_factor=4)},
    )
    assert_rows_match_alone(model, token_batch(batch=5), ["lora", "ia3", None, "adapter", "lora"])


def test_modules_to_save_heads_are_chosen_per_row():
    configs = {name: dt.LoraConfig(r=4, modules_to_save=["classifier"]) for name in ("a", "b")}
    model = with_adapters(tiny_bert_classifier(), configs)
    heads = [dict(model.named_modules())["model.classifier"].modules_to_save[n].weight for n in ("a", "b")]
    assert relative_error(heads[0], heads[1]) > 1e-2  # the heads differ, so a wrong head would show
    assert_rows_match_alone(model, token_batch(), ROWS)


# -- generate ---------------------------------------------------------------------------------
GENERATE_CASES = {**{k: LORA_CASES[k] for k in ("lora", "dora")}, **{k: METHOD_CASES[k] for k in ("ia3", "houlsby", "parallel")}}


def assert_generation_matches_alone(model: dt.DeltaModel, prompts: torch.Tensor, rows: list[str | None], **options) -> None:
    with torch.no_grad():
        mixed = model.generate(input_ids=prompts, adapter_names=rows, **GENERATE, **options)
        per_row = mixed.shape[0] // len(rows)  # num_return_sequences of each row, one after another
        for i, name in enumerate(rows):
            with alone(model, name):
                single = model.generate(input_ids=prompts[i : i + 1], **GENERATE, **options)
            ours = mixed[i * per_row : (i + 1) * per_row]
            assert torch.equal(ours, single), f"row {i} ({name}): {ours.tolist()} != {single.tolist()}"


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_greedy_generate_gives_each_row_what_it_generates_alone(case, lora_form):
    model = with_adapters(tiny_llama(), GENERATE_CASES[case], seed=5, scale=0.5)
    prompts = token_batch(batch=4, length=6)
    assert_generation_matches_alone(model, prompts, ROWS)
    # the adapters matter: each adapter changes what some prompt generates
    with torch.no_grad():
        base = model.generate(input_ids=prompts, adapter_names=[None] * 4, **GENERATE)
        for name in ("a", "b"):
            assert not torch.equal(model.generate(input_ids=prompts, adapter_names=[name] * 4, **GENERATE), base), name


@pytest.mark.parametrize("case", ["lora", "dora", "houlsby"])
def test_beam_search_keeps_each_row_on_its_adapter(case):
    model = with_adapters(tiny_llama(), GENERATE_CASES[case], seed=5, scale=0.5)
    assert_generation_matches_alone(model, token_batch(batch=3, length=6), ["a", None, "b"], num_beams=2)


def test_generate_with_several_sequences_per_row():
    model = with_adapters(tiny_llama(), LORA_CASES["lora"], seed=5)
    assert_generation_matches_alone(model, token_batch(batch=3, length=6), ["b", "a", None], num_beams=2, num_return_sequences=2)


# -- the batched formulation --------------------------------------------------------------------
class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(model: dt.DeltaModel, inputs: torch.Tensor, rows: list[str | None]) -> int:
    with torch.no_grad(), OpCounter() as counter:
        model(input_ids=inputs, adapter_names=rows)
    return counter.count


def test_64_rows_over_two_adapters_match_alone_with_the_work_of_4_rows(lora_form):
    model = with_adapters(tiny_llama(), {"a": dt.LoraConfig(r=4, use_dora=True), "b": dt.LoraConfig(r=8)})
    rows = [["a", "b", None, "b"][i % 4] for i in range(64)]
    inputs = token_batch(batch=64, length=3)
    with torch.no_grad():
        mixed = model(input_ids=inputs, adapter_names=rows).logits
        # each adapter's rows as one ordinary batch: the same rows alone, in 3 calls, not 64
        for name in ("a", "b", None):
            index = [i for i, r in enumerate(rows) if r == name]
            with alone(model, name):
                single = model(input_ids=inputs[index]).logits
            assert relative_error(mixed[index], single) < TOLERANCE, name
    # No Python loop over rows: 64 rows dispatch exactly the operators 4 rows do.
    assert count_ops(model, inputs, rows) == count_ops(model, inputs[:4], rows[:4])


def test_without_autograd_the_products_are_added_into_the_base_output_in_place():
    model = with_adapters(tiny_llama(), LORA_CASES["lora"])
    layer = dict(model.named_modules())["model.model.layers.0.self_attn.q_proj"]
    base_outputs = []
    layer.base_layer.register_forward_hook(lambda module, args, output: base_outputs.append(output))
    returned = []
    layer.register_forward_hook(lambda module, args, output: returned.append(output))
    with torch.no_grad():
        model(input_ids=token_batch(), adapter_names=ROWS)
    assert returned[-1] is base_outputs[-1]  # no product tensor, no new sum
    model(input_ids=token_batch(), adapter_names=ROWS)  # with autograd: a new tensor, gradients flow
    assert returned[-1] is not base_outputs[-1]
    assert_rows_match_alone(model, token_batch(), ROWS)


@pytest.mark.parametrize("change", ["forward hook", "replaced forward"])
def test_a_base_layer_with_hooks_is_still_called_as_a_module(change):
    # A bias-free nn.Linear base at inference has its matmul run inside the LoRA layer, onto the
    # rows' products (the other tests here check those rows); one with hooks or a replaced forward
    # (accelerate's offloading does either) must still be called.
    model = with_adapters(tiny_llama(), LORA_CASES["lora"])
    inputs = token_batch()
    layer = dict(model.named_modules())["model.model.layers.0.self_attn.q_proj"]
    base = layer.base_layer
    calls = []

    def shift(output):
        calls.append(1)
        return output + 0.25

    if change == "forward hook":
        handle = base.register_forward_hook(lambda module, args, output: shift(output))
        undo = handle.remove
    else:
        plain_forward = base.forward
        base.forward = lambda x: shift(plain_forward(x))
        undo = lambda: delattr(base, "forward")
    with torch.no_grad():
        hooked = model(input_ids=inputs, adapter_names=ROWS).logits
    assert calls, f"the base layer's {change} did not run"
    assert_rows_match_alone(model, inputs, ROWS)  # each row alone runs it too
    undo()
    with torch.no_grad():
        plain = model(input_ids=inputs, adapter_names=ROWS).logits
    assert relative_error(hooked, plain) > 1e-3


def test_repeated_calls_reuse_the_stacks_and_parameter_updates_rebuild_them():
    model = with_adapters(tiny_llama(), LORA_CASES["dora"])
    layer = dict(model.named_modules())["model.model.layers.0.self_attn.q_proj"]
    inputs = token_batch()
    with torch.no_grad():
        model(input_ids=inputs, adapter_names=ROWS)
        first = layer._mixed_stacks._stacks
        model(input_ids=inputs, adapter_names=ROWS)
        assert layer._mixed_stacks._stacks is first  # a second call with the same adapters restacks nothing
        layer.lora_B["b"].weight.mul_(3.0)  # an in-place update, as an optimizer step makes
        layer.lora_magnitude_vector["a"].add_(0.5)
    assert_rows_match_alone(model, inputs, ROWS)
    assert layer._mixed_stacks._stacks is not first


def test_training_through_a_mixed_batch_reaches_each_rows_adapter():
    model = with_adapters(tiny_llama(), {"a": dt.LoraConfig(r=4), "b": dt.LoraConfig(r=4)})
    model.set_adapter(["a", "b"])  # both trainable
    model.train()
    inputs = token_batch(batch=2)
    for _ in range(2):  # twice: nothing of the first call's graph may be reused
        model.zero_grad()
        model(input_ids=inputs, adapter_names=["a", None], labels=inputs).loss.backward()
    layer = dict(model.named_modules())["model.model.layers.0.self_attn.q_proj"]
    assert layer.lora_A["a"].weight.grad.abs().sum() > 0
    assert layer.lora_A["b"].weight.grad is None  # no row used "b"


# -- errors -------------------------------------------------------------------------------------
def test_unknown_adapter_is_a_value_error_listing_the_known_ones():
    model = with_adapters(tiny_llama(), {"a": dt.LoraConfig(r=4), "b": dt.LoraConfig(r=4)})
    with pytest.raises(ValueError, match=r"unknown adapters \['c'\]; this model has \['a', 'b'\]"):
        model(input_ids=token_batch(batch=2), adapter_names=["a", "c"])


def test_a_merged_adapter_is_refused_even_when_no_row_names_it():
    model = with_adapters(tiny_llama(), {"a": dt.LoraConfig(r=4), "b": dt.LoraConfig(r=4)})
    model.merge(["a"])
    # "a" sits in the base weights, so base rows and "b" rows would read it too.
    for rows in (["a", None], ["b", None]):
        with pytest.raises(RuntimeError, match=r"Adapters \['a'\] are merged into the base; unmerge\(\)"):
            model(input_ids=token_batch(batch=2), adapter_names=rows)
    model.unmerge()
    assert_rows_match_alone(model, token_batch(batch=2), ["b", None])


def test_batch_size_mismatch_is_a_clear_error():
    model = with_adapters(tiny_llama(), {"a": dt.LoraConfig(r=4)})
    message = r"adapter_names has 3 entries for an input of 4 rows; give one adapter name"
    with pytest.raises(ValueError, match=message):
        model(input_ids=token_batch(batch=4), adapter_names=["a", None, "a"])
    # generate: counted before each row is repeated for its beams
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=token_batch(batch=4), adapter_names=["a", None, "a"], num_beams=2, **GENERATE)
    # an input the wrapper cannot see is caught by the first layer
    layer_message = r"adapter_names has 3 entries but LoRA layer Linear\(32 -> 32\) got a batch of 4 rows"
    with pytest.raises(ValueError, match=layer_message), model.mixed_batch(["a", None, "a"]):
        model.model(token_batch(batch=4))


def test_batch_not_in_the_first_dimension_is_refused_by_the_layers():
    model = with_adapters(tiny_llama(), {"a": dt.LoraConfig(r=4)})
    layer = dict(model.named_modules())["model.model.layers.0.self_attn.q_proj"]
    with model.mixed_batch(["a", None]), pytest.raises(ValueError, match="got a batch of 5 rows"):
        layer(torch.randn(5, 2, 32))  # (tokens, batch, features)


def test_lora_dropout_in_training_mode_is_refused_and_eval_mode_serves():
    model = with_adapters(tiny_llama(), {"a": dt.LoraConfig(r=4, lora_dropout=0.1), "b": dt.LoraConfig(r=4)})
    model.train()
    with pytest.raises(RuntimeError, match=r"Adapters \['a'\] use lora_dropout.*model.eval\(\)"):
        model(input_ids=token_batch(batch=2), adapter_names=["a", "b"])
    model.eval()
    assert_rows_match_alone(model, token_batch(batch=2), ["a", "b"])


def test_unsupported_layers_are_named_in_the_error():
    model = with_adapters(tiny_llama(), {"a": dt.LoraConfig(r=4), "emb": dt.LoraConfig(r=4, target_modules=["embed_tokens"])})
    with pytest.raises(ValueError, match=r"not supported by lora \(LoraEmbedding layers\)"):
        model(input_ids=token_batch(batch=2), adapter_names=["emb", "a"])
    # an adapter no row names stays out of the call
    assert_rows_match_alone(model, token_batch(batch=2), ["a", None])


def test_a_whole_block_copy_no_row_names_stays_out_of_the_batch():
    # Partial fine-tuning's block copies cannot route rows (a block takes per-row masks and
    # rotary tables beside its input); a batch of other adapters must run past them, not through.
    model = with_adapters(tiny_llama(), {"a": dt.LoraConfig(r=4, layers_to_transform=[0]),
                                         "whole": dt.make_config("partial", last_k_layers=1)})
    assert_rows_match_alone(model, token_batch(batch=3), ["a", None, "a"])
    with pytest.raises(ValueError, match="not supported by partial"):
        model(input_ids=token_batch(batch=2), adapter_names=["whole", "a"])


# -- rows given new slots in place (a decoder whose rows change between graph replays) ---------
ASSIGN_CASES = {
    # "b" on fewer layers than "a": those layers map the batch's slots onto their own
    "lora-different-targets": {"a": dt.LoraConfig(r=4), "b": dt.LoraConfig(r=8, target_modules=["q_proj", "down_proj"])},
    "ia3": METHOD_CASES["ia3"],
    "parallel": METHOD_CASES["parallel"],
}


@pytest.mark.parametrize("case", sorted(ASSIGN_CASES))
@pytest.mark.parametrize("length", [1, 12])  # a decoding step (LoRA's masked form) and a prefill (gathered)
def test_rows_given_new_slots_in_place_compute_what_a_fresh_routing_computes(case, length):
    model = with_adapters(tiny_llama(), ASSIGN_CASES[case])
    inputs = token_batch(length=length)
    rows = RowAdapters(("a", "b"), (0, 1, 2, 0))
    with torch.no_grad():
        with model.mixed_batch(rows):
            before = output_of(model(input_ids=inputs))
        for slots in [(1, 2, 0, 1), (2, 2, 2, 2), (0, 1, 2, 0)]:
            assert rows.assignable
            rows.assign(slots)
            with model.mixed_batch(rows):  # the layers reuse what they derived from `rows`
                reassigned = output_of(model(input_ids=inputs))
            with model.mixed_batch(RowAdapters(("a", "b"), slots)):
                fresh = output_of(model(input_ids=inputs))
            assert torch.equal(reassigned, fresh), slots
    assert torch.equal(reassigned, before)  # back to the first slots
    assert relative_error(fresh[0], fresh[1]) > 1e-4  # rows on different adapters differ: a stale routing would show


def test_assign_refuses_bad_slots_and_rows_split_into_groups():
    rows = RowAdapters(("a", "b"), (0, 1, 2))
    with pytest.raises(ValueError, match="3 slots in 0..2"):
        rows.assign((0, 3, 1))
    with pytest.raises(ValueError, match="3 slots"):
        rows.assign((0, 1))
    # A modules_to_save copy groups rows on the host, which no in-place write could update.
    configs = {name: dt.LoraConfig(r=4, modules_to_save=["classifier"]) for name in ("a", "b")}
    model = with_adapters(tiny_bert_classifier(), configs)
    rows = RowAdapters(("a", "b"), (0, 1, 2, 0))
    with torch.no_grad(), model.mixed_batch(rows):
        model(input_ids=token_batch())
    assert not rows.assignable
    with pytest.raises(ValueError, match="route them anew"):
        rows.assign((1, 0, 2, 1))
    assert rows.slots == (0, 1, 2, 0)


# -- siblings that read one input (q/k/v, gate/up) ---------------------------------------------
def test_layers_reading_one_input_are_linked_per_block_and_relinked_when_the_tree_changes():
    from deltatune.mixed_batch import InputGroup

    model = with_adapters(tiny_llama(), {"a": dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "o_proj"])})
    with model.mixed_batch(["a"]):
        pass
    attention = model.model.model.layers[0].self_attn
    mlp = model.model.model.layers[0].mlp
    assert isinstance(attention.q_proj.input_group, InputGroup)
    assert attention.q_proj.input_group.layers == (attention.q_proj, attention.v_proj)  # k_proj has no adapter
    assert mlp.gate_proj.input_group.layers == (mlp.gate_proj, mlp.up_proj)
    assert attention.o_proj.input_group is None  # its input is the attention's output
    assert model.model.model.layers[1].self_attn.q_proj.input_group is not attention.q_proj.input_group
    model.add_adapter("b", dt.LoraConfig(r=4, target_modules=["k_proj"]))
    with model.mixed_batch(["a", "b"]):
        pass
    assert attention.q_proj.input_group.layers == (attention.q_proj, attention.k_proj, attention.v_proj)
    # a model the table knows nothing of links nothing
    gpt2 = with_adapters(tiny_gpt2(), {"a": dt.LoraConfig(r=4, target_modules=["c_attn", "c_fc"])})
    with gpt2.mixed_batch(["a"]):
        pass
    assert all(layer.input_group is None for _, layer in gpt2.delta_layers())


def test_an_input_group_computes_once_per_input_object_and_each_layer_takes_its_part_once():
    from deltatune.mixed_batch import InputGroup

    q, k, v = object(), object(), object()
    group = InputGroup([q, k, v])
    calls = []

    def compute(tag):
        calls.append(tag)
        return [f"{tag}-q", f"{tag}-k", f"{tag}-v"]

    x, same_values = torch.ones(3), torch.ones(3)
    assert group.part(q, x, lambda: compute("x")) == "x-q"
    assert group.part(k, x, lambda: compute("x")) == "x-k"
    # equal values in another tensor object are another input: computed anew
    assert group.part(v, same_values, lambda: compute("y")) == "y-v"
    assert calls == ["x", "y"]
    # a layer called twice on one input takes a fresh part the second time
    assert group.part(q, same_values, lambda: compute("y")) == "y-q"
    assert group.part(q, same_values, lambda: compute("z")) == "z-q"
    assert calls == ["x", "y", "z"]
    assert group.part(k, same_values, lambda: None) == "z-k"
    assert group.part(v, same_values, lambda: None) == "z-v"
    assert group._input is None  # every part taken: nothing held
    assert group.part(q, x, lambda: None) is None  # siblings that cannot share: each runs its own


def test_siblings_share_a_shrink_only_when_every_one_is_plain_lora_on_the_same_slots(monkeypatch):
    # What _shrink_for_siblings hands the kernel (a launch needs CUDA; the rule is decided before it).
    launched = []
    def shrink(x, downs, row_slot, base_slot):
        launched.append(len(downs))
        return ["part"] * len(downs)

    monkeypatch.setattr(lora_module, "shrink_for_siblings", shrink)
    model = with_adapters(tiny_llama(), {"a": dt.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]),
                                         "b": dt.LoraConfig(r=8, target_modules=["q_proj"]),
                                         "d": dt.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], use_dora=True)})
    attention = model.model.model.layers[0].self_attn
    x = torch.randn(4, 1, model.config.hidden_size)

    def shared(row_names):
        with model.mixed_batch(row_names) as rows:
            stacks, plan = attention.q_proj._mixed_stacks.get(rows, attention.q_proj.lora_A.keys(), x.device,
                                                              attention.q_proj._stack_key, attention.q_proj._build_stacks)
            return lora_module._shrink_for_siblings(attention.q_proj.input_group.layers, rows, x, plan)

    assert shared(["a", None, "a", "a"]) == ["part"] * 3 and launched == [3]
    assert shared(["a", "b", None, "a"]) is None  # q_proj holds a and b, k_proj and v_proj only a: other slots
    assert shared(["d", "a", None, "a"]) is None  # DoRA scales each output by its own norm
    assert launched == [3]
