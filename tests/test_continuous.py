"""deltatune.continuous.ContinuousDecoder: requests that join a running decode between its steps
end with the tokens each would get alone, whatever joins or leaves beside them."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import CAUSAL_LM_FAMILIES, randomize_adapters, tiny_causal_lm, tiny_llama

import deltatune as dt
from deltatune.continuous import ContinuousDecoder, DecodeRequest, supports_continuous_decode
from deltatune.generation import GenerationError, greedy_generate


def two_adapters() -> dt.DeltaModel:
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"]), adapter_name="a")
    model.add_adapter("b", dt.LoraConfig(r=8, target_modules=["q_proj", "down_proj"]))
    randomize_adapters(model, seed=5, scale=0.5)
    return model.eval()


def alone(model, request: DecodeRequest, eos_ids=()) -> list[int]:
    """The request run by itself through greedy_generate (itself tested against generate())."""
    prompt = torch.tensor([list(request.prompt_ids)])
    names = None if request.adapter is None and not isinstance(model, dt.DeltaModel) else [request.adapter]
    out = greedy_generate(model, prompt, request.max_new_tokens, adapter_names=names)[0, prompt.shape[1]:].tolist()
    for i, token in enumerate(out):
        if token in eos_ids:
            return out[: i + 1]
    return out


def random_requests(count: int, adapters, seed: int, longest_prompt: int = 9, most_new: int = 8,
                    vocab: int = 97) -> list[DecodeRequest]:
    rng = random.Random(seed)
    return [DecodeRequest(rng.choice(adapters), [rng.randrange(3, vocab) for _ in range(rng.randint(1, longest_prompt))],
                          rng.randint(1, most_new), tag=i) for i in range(count)]


def run_arrivals(decoder: ContinuousDecoder, requests: list[DecodeRequest], seed: int) -> dict[int, list[int]]:
    """Requests arrive a few at a time between steps; each joins as soon as it fits."""
    rng = random.Random(seed)
    waiting, pending, results, steps = list(requests), [], {}, 0
    while waiting or pending or decoder.active:
        for _ in range(rng.randint(0, 3)):
            if waiting:
                pending.append(waiting.pop(0))
        joining = []
        while pending and decoder.fits(joining + [pending[0]]):
            joining.append(pending.pop(0))
        for request, tokens in decoder.admit(joining) + decoder.step():
            results[request.tag] = tokens
        steps += 1
        assert steps < 500, "the decoder stopped making progress"
    return results


def test_requests_joining_and_leaving_between_steps_get_their_tokens_alone():
    model = two_adapters()
    requests = random_requests(24, ["a", "b", None], seed=1)
    decoder = ContinuousDecoder(model, rows=4, context=24)
    results = run_arrivals(decoder, requests, seed=2)
    assert len(results) == len(requests)
    for request in requests:
        assert results[request.tag] == alone(model, request), request
    assert all(layer.row_adapters is None for _, layer in model.delta_layers())  # routed within each step only
    # the adapters matter: the base model continues these prompts differently
    assert any(alone(model, r) != alone(model, DecodeRequest(None, r.prompt_ids, r.max_new_tokens)) for r in requests if r.adapter)


def test_the_window_moves_both_ways_and_rows_keep_their_tokens():
    # A small cache makes joiners move the live columns: right when a prompt is longer than the
    # write column, left when the rows would run past the end.
    model = two_adapters()
    decoder = ContinuousDecoder(model, rows=3, context=14)
    short = DecodeRequest("a", [5, 6], 7, tag="short")
    decoder.admit([short])
    assert decoder.t == 2
    results = {}
    for request, tokens in decoder.step():
        results[request.tag] = tokens
    long = DecodeRequest("b", list(range(10, 19)), 3, tag="long")  # 9 prompt tokens > t = 3: moves right
    assert decoder.fits([long])
    decoder.admit([long])
    assert decoder.t == 9
    late = DecodeRequest(None, [40, 41, 42], 8, tag="late")  # 7 more columns after t = 9 would pass 14
    assert not decoder.fits([late])  # not while the long prompt holds columns 0..8
    moves = []
    while decoder.active:
        if late.tag not in results and late not in decoder.active and decoder.fits([late]):
            before = decoder.t
            decoder.admit([late])
            moves.append((before, decoder.t))
        for request, tokens in decoder.step():
            results[request.tag] = tokens
    assert moves == [(11, 5)]  # once the long row left: the short row's 5 columns moved to the front
    for request in (short, long, late):
        assert results[request.tag] == alone(model, request), request.tag


def test_a_request_that_can_never_fit_is_refused_and_others_run():
    model = two_adapters()
    decoder = ContinuousDecoder(model, rows=2, context=10)
    too_long = DecodeRequest("a", list(range(3, 11)), 4)  # 8 prompt + 3 more columns > 10
    assert not decoder.could_ever_fit(too_long) and not decoder.fits([too_long])
    with pytest.raises(GenerationError, match="do not fit"):
        decoder.admit([too_long])
    ok = DecodeRequest("b", [7, 8, 9], 4, tag=0)
    assert run_arrivals(decoder, [ok], seed=0) == {0: alone(model, ok)}
    with pytest.raises(GenerationError, match="positive integer"):
        decoder.admit([DecodeRequest("a", [3], 0)])
    with pytest.raises(GenerationError, match="prompt token"):
        decoder.admit([DecodeRequest("a", [], 2)])
    with pytest.raises(GenerationError, match="rows must be"):
        ContinuousDecoder(model, rows=0, context=10)


def test_requests_end_at_their_eos_token_and_free_their_row():
    model = tiny_llama().eval()
    requests = random_requests(12, [None], seed=3, most_new=10)
    # an end token that these prompts do produce
    eos = {alone(model, requests[0])[2]}
    decoder = ContinuousDecoder(model, rows=3, context=30, eos_ids=eos)
    results = run_arrivals(decoder, requests, seed=4)
    for request in requests:
        assert results[request.tag] == alone(model, request, eos), request
    assert any(len(results[r.tag]) < r.max_new_tokens for r in requests)  # some ended early
    assert decoder.free_rows == 3


@pytest.mark.parametrize("family", CAUSAL_LM_FAMILIES)
def test_every_family_either_decodes_continuously_as_alone_or_says_why_not(family):
    torch.manual_seed(2)
    model = dt.wrap(tiny_causal_lm(family), dt.LoraConfig(r=4, init_lora_weights=False)).eval()
    reason = supports_continuous_decode(model)
    if reason is not None:
        with pytest.raises(GenerationError, match="cannot run"):
            ContinuousDecoder(model, rows=2, context=16)
        return
    requests = random_requests(6, ["default"], seed=5, longest_prompt=5, most_new=5)
    results = run_arrivals(ContinuousDecoder(model, rows=2, context=16), requests, seed=6)
    for request in requests:
        assert results[request.tag] == alone(model, request), request


def test_a_plain_model_decodes_and_refuses_adapter_names():
    model = tiny_llama().eval()
    requests = random_requests(5, [None], seed=7)
    results = run_arrivals(ContinuousDecoder(model, rows=2, context=20), requests, seed=8)
    assert all(results[r.tag] == alone(model, r) for r in requests)
    with pytest.raises(GenerationError, match="DeltaModel"):
        ContinuousDecoder(model, rows=2, context=20).admit([DecodeRequest("a", [3, 4], 2)])


def test_layers_stack_their_adapters_once_while_rows_come_and_go(monkeypatch):
    from deltatune.methods.lora import LoraLinear

    model = two_adapters()
    builds = []
    original = LoraLinear._build_stacks
    monkeypatch.setattr(LoraLinear, "_build_stacks", lambda self, names: builds.append(names) or original(self, names))
    requests = random_requests(20, ["a", "b", None], seed=9)
    results = run_arrivals(ContinuousDecoder(model, rows=3, context=24), requests, seed=10)
    lora_layers = sum(1 for _, layer in model.delta_layers() if isinstance(layer, LoraLinear))
    assert len(builds) == lora_layers  # each layer once, though the rows' adapters changed many times
    assert all(results[r.tag] == alone(model, r) for r in requests)


def test_an_adapter_reloaded_as_another_method_is_routed_as_what_it_is_now():
    # The server may evict an adapter and load a new version under the same name: routing decided
    # for the old one (LoRA, routed by rows) must not be kept for the new one (a soft prompt, which
    # cannot be): requests for the base and the other adapter still decode.
    model = two_adapters()
    decoder = ContinuousDecoder(model, rows=2, context=24)
    first = random_requests(3, ["b", None], seed=11)
    assert run_arrivals(decoder, first, seed=12) == {r.tag: alone(model, r) for r in first}
    model.delete_adapter("b")
    model.add_adapter("b", dt.PromptTuningConfig(num_virtual_tokens=4), activate=False)
    base_only = random_requests(3, [None, "a"], seed=13)
    assert run_arrivals(decoder, base_only, seed=14) == {r.tag: alone(model, r) for r in base_only}


def same_objects(these, those) -> bool:
    return len(these) == len(those) and all(a is b for a, b in zip(these, those))


@pytest.fixture
def fake_graphs(monkeypatch):
    """CUDA graph capture stood in for on the CPU, as strict as a graph: a replay runs the step
    under the routing it was captured with (whose slot tensors the decoder rewrites in place) and
    fails if the layers' stacked adapters are no longer the tensors it was captured over."""
    import deltatune.continuous as continuous

    def capture(step, pool=None):
        captured = {}

        def run():
            if not captured:
                model = captured["model"] = current_model[0]
                captured["rows"] = next(layer.row_adapters for _, layer in model.delta_layers())
                step()
                captured["stacks"] = model.mixed_batch_stacks()
                return
            model = captured["model"]
            assert same_objects(model.mixed_batch_stacks(), captured["stacks"]), "replayed over stale stacks"
            with model.mixed_batch(captured["rows"]):
                step()
            assert same_objects(model.mixed_batch_stacks(), captured["stacks"]), "a replay would have restacked"

        return run

    current_model = []
    monkeypatch.setattr(continuous, "replayed_as_cuda_graph", capture)
    return current_model


def test_one_captured_step_serves_rows_coming_and_going_until_the_adapters_change(fake_graphs, tmp_path):
    model = two_adapters()
    fake_graphs.append(model)
    decoder = ContinuousDecoder(model, rows=3, context=24)
    decoder.cuda_graph = decoder.padded_prefill = True  # on the CPU, with the stand-in above
    requests = random_requests(16, ["a", "b", None], seed=21)
    assert run_arrivals(decoder, requests, seed=22) == {r.tag: alone(model, r) for r in requests}
    assert decoder.captures == 1  # rows joined and left many times: their slots were rewritten in place
    # Joiners were prefilled padded to power-of-two shapes, each captured once (when met a second
    # time) and replayed after.
    shapes = decoder.prefill_shapes
    assert 1 < len(shapes) < 16 and all(rows in (1, 2, 3) and width in (8, 16) for rows, width in shapes)
    assert 0 < decoder.prefill_captures <= len(shapes)
    captured_prefills = decoder.prefill_captures

    # A retrained "a" copied into the same tensors: the steps must see it, so the step is captured again.
    retrained = two_adapters()
    randomize_adapters(retrained, seed=77, scale=0.5)
    retrained.save(tmp_path / "a", "a")
    assert model.replace_adapter(tmp_path / "a", "a") == "in_place"
    more = random_requests(8, ["a", "b"], seed=23)
    assert run_arrivals(decoder, more, seed=24) == {r.tag: alone(model, r) for r in more}
    assert decoder.captures == 2
    assert decoder.prefill_captures > captured_prefills  # the prefills read the new stacks too
    assert any(alone(model, r) != alone(two_adapters(), r) for r in more if r.adapter == "a")  # "a" did change

    model.add_adapter("c", dt.IA3Config(), activate=False)  # a new adapter joins the routing
    randomize_adapters(model, seed=78, scale=0.5)
    last = random_requests(8, ["c", "a", None], seed=25)
    assert run_arrivals(decoder, last, seed=26) == {r.tag: alone(model, r) for r in last}
    assert decoder.captures == 3

    model.delete_adapter("b")  # and one leaves it
    after = random_requests(6, ["c", "a", None], seed=27)
    assert run_arrivals(decoder, after, seed=28) == {r.tag: alone(model, r) for r in after}
    assert decoder.captures == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_captured_steps_decode_as_eager_steps_on_cuda():
    model = two_adapters().to("cuda", torch.bfloat16)
    requests = random_requests(24, ["a", "b", None], seed=31)
    graphed = ContinuousDecoder(model, rows=4, context=32)
    eager = ContinuousDecoder(model, rows=4, context=32, cuda_graph=False)
    eager.padded_prefill = True  # the same prefill shapes, run eagerly: bf16 rounding then agrees too
    assert graphed.cuda_graph and graphed.padded_prefill and not eager.cuda_graph
    assert run_arrivals(graphed, requests, seed=32) == run_arrivals(eager, requests, seed=32)
    assert graphed.captures == 1 and eager.captures == 0
    assert 0 < graphed.prefill_captures <= len(graphed.prefill_shapes) and eager.prefill_captures == 0
    assert graphed.step_device_seconds > 0 and graphed.prefill_device_seconds > 0  # CUDA events around them
    model.add_adapter("c", dt.LoraConfig(r=4, target_modules=["k_proj"]), activate=False)
    randomize_adapters(model, seed=33, scale=0.5)
    more = random_requests(12, ["c", "a", None], seed=34)
    assert run_arrivals(graphed, more, seed=35) == run_arrivals(eager, more, seed=35)
    assert graphed.captures == 2


def test_padded_prefill_caches_stay_within_the_decode_cache_size():
    """Prompts of every length meet many padded shapes: their caches are dropped, least recently
    used first, so that together they never hold more than rows x context columns."""
    model = two_adapters()
    decoder = ContinuousDecoder(model, rows=4, context=40)
    decoder.padded_prefill = True
    requests = random_requests(40, ["a", "b", None], seed=41, longest_prompt=30, most_new=6)
    kept = []
    original = decoder._padded_prefill_buffers

    def watched(shape):
        buffers = original(shape)
        kept.append(decoder.prefill_cache_tokens)
        return buffers

    decoder._padded_prefill_buffers = watched
    assert run_arrivals(decoder, requests, seed=42) == {r.tag: alone(model, r) for r in requests}
    assert len(decoder.prefill_shapes) >= 5 and any(width == 32 for _, width in decoder.prefill_shapes)
    assert max(kept) <= 4 * 40 and len(decoder._prefills) < len(decoder.prefill_shapes)  # some were dropped
