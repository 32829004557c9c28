"""Checkpointed blocks replayed as CUDA graphs (kernels/block_graphs.py): training through the
graphs gives the eager checkpointed result, and every case the graphs cannot reproduce runs eagerly.

The CUDA tests run on a GPU machine only; on a CPU the same models must run their own code."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from conftest import tiny_causal_lm
from torch import nn

import deltatune as dt
from deltatune.kernels import block_graphs
from deltatune.kernels.patch import _BLOCK_GRAPHS

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def graphs_of(model: dt.DeltaModel) -> block_graphs.BlockGraphs:
    found = {id(m.__dict__[_BLOCK_GRAPHS]): m.__dict__[_BLOCK_GRAPHS] for m in model.modules() if _BLOCK_GRAPHS in m.__dict__}
    assert len(found) == 1, "every block of one model shares one BlockGraphs"
    return next(iter(found.values()))


def wrapped(base: nn.Module, config: dt.AdapterConfig, device: str = "cpu") -> dt.DeltaModel:
    model = dt.wrap(copy.deepcopy(base).to(device), config, fused=True)
    model.gradient_checkpointing_enable()
    return model.train()


# ----------------------------------------------------------------------------- CPU: the rules
def test_arguments_flatten_and_refill_in_order():
    a, b, c = torch.ones(2), torch.zeros(3), torch.full((1,), 5.0)
    args, kwargs = (a,), {"position_embeddings": (b, c), "use_cache": False, "mask": None}
    tensors, layout = block_graphs._flatten(args, kwargs)
    assert [t is x for t, x in zip(tensors, (a, b, c))] == [True] * 3
    new = [t + 1 for t in tensors]
    new_args, new_kwargs = block_graphs._unflatten(args, kwargs, new)
    assert new_args[0] is new[0] and new_kwargs["position_embeddings"] == (new[1], new[2])
    assert new_kwargs["use_cache"] is False and new_kwargs["mask"] is None
    # the layout tells shapes and constants apart
    _, other = block_graphs._flatten((torch.ones(3),), kwargs)
    assert other != layout
    # anything else (a cache object, say) cannot be replayed
    assert block_graphs._flatten((a,), {"past_key_values": object()}) is None


def test_blocks_that_differ_only_in_which_inputs_need_grad_are_one_kind():
    """The first block's hidden states come from a frozen embedding, the next ones' need grad: one
    kind, measured and warmed up once, the warm-up differentiating the hidden states for both."""
    autocast = (False, torch.bfloat16)
    hidden, rotary = torch.ones(2, 16, 64), torch.ones(16, 8)
    first = (block_graphs._flatten((hidden,), {"cos": rotary})[1], autocast, nn.Linear)
    later = (block_graphs._flatten((hidden.clone().requires_grad_(),), {"cos": rotary})[1], autocast, nn.Linear)
    longer = (block_graphs._flatten((torch.ones(2, 32, 64),), {"cos": rotary})[1], autocast, nn.Linear)
    assert first != later and block_graphs._kind(first) == block_graphs._kind(later) != block_graphs._kind(longer)
    assert block_graphs._widened([hidden, rotary], [], torch.empty(2, 16, 64)) == [0]
    assert block_graphs._widened([hidden, rotary], [1], torch.empty(2, 16, 64)) == [0, 1]
    assert block_graphs._widened([hidden, rotary], [], torch.empty(2, 16, 64, dtype=torch.float16)) == []


def test_a_reading_against_capturing_is_taken_again_in_the_next_steps(monkeypatch):
    """The first reading may be low by chance (one process of four read 1.08x, the others
    1.27-1.59x): a "no" is measured again when the first block comes round in the next steps, up to
    MEASUREMENTS readings; the best decides, and a "yes" is never measured again."""
    readings = iter([1.0, 1.3, 2.0])
    taken = []
    monkeypatch.setattr(block_graphs, "replay_speedup", lambda run: taken.append(1) or next(readings))
    graphs = block_graphs.BlockGraphs()
    signature = (block_graphs._flatten((torch.ones(2, 16, 64),), {})[1], (False, torch.bfloat16), nn.Linear)

    def pays(seen: int) -> bool:
        return graphs._pays(signature, None, (), {}, [], [], (False, torch.bfloat16), seen)

    first = block_graphs.CAPTURE_ON_SIGHTING
    assert not pays(first) and len(taken) == 1
    assert not pays(first) and len(taken) == 1  # the next block of the same step: not measured again
    assert pays(first + 1) and len(taken) == 2  # the first block in the next step: 1.3x, captured
    assert pays(first + 2) and len(taken) == 2
    assert graphs.speedups[block_graphs._kind(signature)] == 1.3
    always_low = iter([1.0] * 10)
    monkeypatch.setattr(block_graphs, "replay_speedup", lambda run: taken.append(1) or next(always_low))
    graphs.clear()
    assert not any(pays(first + i) for i in range(6)) and len(taken) == 2 + block_graphs.MEASUREMENTS


def test_releasing_the_graphs_keeps_the_capture_stream():
    # cuBLAS keeps a workspace per stream for good: a new capture stream per release would leak them
    graphs = block_graphs.BlockGraphs()
    stream = object()  # stands in for the torch.cuda.Stream a capture made
    graphs.stream = stream
    graphs.clear()
    assert graphs.stream is stream and graphs.pool is None


def test_a_calls_skeleton_keeps_its_constants_and_no_tensor():
    a, b, c = torch.ones(2), torch.zeros(3), torch.full((1,), 5.0)
    args, kwargs = (a,), {"position_embeddings": (b, c), "use_cache": False}
    skeleton_args, skeleton_kwargs = block_graphs._skeleton(args, kwargs)
    held = [*skeleton_args, *skeleton_kwargs["position_embeddings"]]
    assert not any(isinstance(v, torch.Tensor) for v in held) and skeleton_kwargs["use_cache"] is False
    # the eager node rebuilds the call from it in backward, as from the call itself
    new = [a + 1, b + 1, c + 1]
    assert block_graphs._unflatten(skeleton_args, skeleton_kwargs, new) == block_graphs._unflatten(args, kwargs, new)


def test_block_state_refuses_hooks_dropout_and_layers_that_cannot_say():
    base = tiny_causal_lm("llama")
    model = wrapped(base, dt.LoraConfig(r=4))
    block = model.model.model.layers[0]
    state = block_graphs._block_state(block)
    assert state is not None and len(state[1]) == 2 * 7  # A and B of the seven projections
    handle = block.mlp.register_forward_hook(lambda *a: None)
    assert block_graphs._block_state(block) is None
    handle.remove()
    assert block_graphs._block_state(block) is not None
    # LoRA dropout in training draws random numbers: not replayable
    dropped = wrapped(base, dt.LoraConfig(r=4, lora_dropout=0.1))
    assert block_graphs._block_state(dropped.model.model.layers[0]) is None
    dropped.eval()
    assert block_graphs._block_state(dropped.model.model.layers[0]) is not None
    # IA3 layers do not say what their forward depends on
    ia3 = wrapped(base, dt.IA3Config())
    assert block_graphs._block_state(ia3.model.model.layers[0]) is None
    # trainable tensors of two dtypes: the gradients would share one buffer of one dtype
    norm = block.input_layernorm
    norm.weight.data = norm.weight.data.to(torch.bfloat16)
    norm.weight.requires_grad_(True)
    assert block_graphs._block_state(block) is None
    norm.weight.data = norm.weight.data.float()
    norm.weight.requires_grad_(False)
    assert block_graphs._block_state(block) is not None
    # in a mixed batch rows are routed per call: not replayable
    model.add_adapter("mixed", dt.LoraConfig(r=4))
    with model.mixed_batch(["default", "mixed"]):
        assert block_graphs._block_state(block) is None
    assert block_graphs._block_state(block) is not None
    # the adapter state is part of the key: switching adapters changes it
    model.add_adapter("other", dt.LoraConfig(r=4))
    before = block_graphs._block_state(block)[0]
    model.set_adapter("other")
    assert block_graphs._block_state(block)[0] != before


def test_on_a_cpu_the_blocks_run_their_own_code_and_copies_start_clean():
    base = tiny_causal_lm("llama")
    model = wrapped(base, dt.LoraConfig(r=4, init_lora_weights=False))
    ids = torch.randint(0, 97, (2, 9))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
    graphs = graphs_of(model)
    assert graphs.replays == 0 and not graphs.captured
    clone = copy.deepcopy(model)
    assert graphs_of(clone) is not graphs
    model.set_fused(False)  # unpatching removes the graphs with the fused classes
    assert not any(_BLOCK_GRAPHS in m.__dict__ for m in model.modules())


# ----------------------------------------------------------------------------- CUDA: the replays
def _steps(model, batches, optimizer, monkeypatch, graphs_on: bool, accumulate: int = 1):
    monkeypatch.setenv("DELTATUNE_BLOCK_GRAPHS", "1" if graphs_on else "0")
    losses = []
    for i, ids in enumerate(batches):
        loss = model(input_ids=ids, labels=ids).loss
        (loss / accumulate).backward()
        losses.append(loss.detach())
        if (i + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return torch.stack(losses)


def _pair(config, dtype=torch.float32):
    base = tiny_causal_lm("llama").to(dtype)
    eager, graphed = wrapped(base, config, "cuda"), wrapped(base, config, "cuda")
    graphed.load_state_dict(eager.state_dict())
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (eager, graphed)]
    return eager, graphed, opts


def _assert_same_adapters(a, b, tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if p.requires_grad:
            assert torch.allclose(p, q, rtol=tol, atol=tol), name


@cuda
@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_through_the_graphs_equals_eager_checkpointing(monkeypatch, accumulate, offload):
    # offload: every block input waits in host memory, however small (DELTATUNE_OFFLOAD_CHECKPOINTS=1
    # keeps them from 1 MiB up)
    monkeypatch.setattr(block_graphs, "OFFLOAD_MIN_BYTES", 0)
    monkeypatch.setattr(block_graphs, "offload_allowed", lambda replaying=False: offload)
    warm_ups = []
    warm_up = block_graphs._Captured._warm_up
    monkeypatch.setattr(block_graphs._Captured, "_warm_up", lambda self, *args: (warm_ups.append(1), warm_up(self, *args))[1])
    torch.manual_seed(0)
    eager, graphed, (opt_e, opt_g) = _pair(dt.LoraConfig(r=4, init_lora_weights=False))
    batches = [torch.randint(0, 97, (2, 16), device="cuda") for _ in range(6)]
    ref = _steps(eager, batches, opt_e, monkeypatch, graphs_on=False, accumulate=accumulate)
    got = _steps(graphed, batches, opt_g, monkeypatch, graphs_on=True, accumulate=accumulate)
    graphs = graphs_of(graphed)
    assert graphs_of(eager).replays == 0 and graphs.replays > 0
    # the first block's input (frozen embeddings) needs no gradient, the second's does: two
    # signatures of one kind, warmed up once
    assert len(graphs.signatures) == 2 and len({block_graphs._kind(s) for s in graphs.signatures}) == 1
    assert not graphs.speedups  # DELTATUNE_BLOCK_GRAPHS=1: captured without measuring
    assert graphs.captures == 2 and len(warm_ups) == 1  # the second block of the same kind and shape: no warm-up
    # the output is written into the input's buffer and the input's gradient over the output's
    roles = [key[0][0] for key in graphs.buffers]
    assert "out" not in roles and "grad_in" not in roles and "in" in roles and "grad_out" in roles
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    _assert_same_adapters(eager, graphed, 1e-5)
    assert (graphs.host is not None and graphs.host.copies > 0) == offload


@cuda
def test_new_shapes_adapter_switches_and_two_forwards_before_backward(monkeypatch):
    monkeypatch.setattr(block_graphs, "OFFLOAD_MIN_BYTES", 0)  # inputs fetched back out of forward order
    monkeypatch.setattr(block_graphs, "offload_allowed", lambda replaying=False: True)
    torch.manual_seed(1)
    config = dt.LoraConfig(r=4, init_lora_weights=False)
    eager, graphed, (opt_e, opt_g) = _pair(config)
    for m in (eager, graphed):
        torch.manual_seed(2)
        m.add_adapter("other", dt.LoraConfig(r=4, init_lora_weights=False))
    graphed.load_state_dict(eager.state_dict())

    def run(model, graphs_on):
        monkeypatch.setenv("DELTATUNE_BLOCK_GRAPHS", "1" if graphs_on else "0")
        losses, grads = [], []
        plan = [((2, 16), "default")] * 3 + [((3, 8), "default")] * 3 + [((2, 16), "other")] * 3 + [((2, 16), "default")] * 2
        for step, (shape, adapter) in enumerate(plan):
            model.set_adapter(adapter)
            torch.manual_seed(step)
            first, second = (torch.randint(0, 97, shape, device="cuda") for _ in range(2))
            # two forward passes, then one backward through both
            loss = model(input_ids=first, labels=first).loss + model(input_ids=second, labels=second).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
            model.zero_grad(set_to_none=True)
        return torch.stack(losses), grads

    ref_losses, ref_grads = run(eager, False)
    losses, grads = run(graphed, True)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6)
    graphs = graphs_of(graphed)
    # two shapes, each met by the first block (its input needs no gradient) and the second: two kinds
    assert len(graphs.signatures) == 4 and len({block_graphs._kind(s) for s in graphs.signatures}) == 2
    assert graphs.replays > 0
    # two shapes and the other adapter, two blocks each; switching back replayed the kept capture
    assert graphs.captures == 3 * 2


@cuda
def test_under_autocast_the_graphs_equal_eager(monkeypatch):
    """What a Trainer with bf16=True runs: a float32 model under bf16 autocast."""
    torch.manual_seed(5)
    eager, graphed, (opt_e, opt_g) = _pair(dt.LoraConfig(r=4, init_lora_weights=False))
    batches = [torch.randint(0, 97, (2, 16), device="cuda") for _ in range(4)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = _steps(eager, batches, opt_e, monkeypatch, graphs_on=False)
        got = _steps(graphed, batches, opt_g, monkeypatch, graphs_on=True)
    assert graphs_of(graphed).replays > 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    _assert_same_adapters(eager, graphed, 1e-5)


@cuda
@pytest.mark.parametrize("capture_chunks", [False, True])
def test_qlora_through_the_graphs_equals_eager(monkeypatch, capture_chunks):
    """Also with the weights dequantized in row chunks inside the captured graphs (as a 7B
    model's are), and the MLP's gradients written over its saved activations."""
    from deltatune.quant import linear as quant_linear
    from deltatune.quant import quantize

    if capture_chunks:
        monkeypatch.setattr(quant_linear, "CAPTURE_CHUNK_ELEMENTS", 64 * 16)
    torch.manual_seed(3)
    base = tiny_causal_lm("llama").to(torch.bfloat16)
    quantize(base, "nf4", double_quant=True, compute_dtype=torch.bfloat16)
    config = dt.LoraConfig(r=4, init_lora_weights=False)
    eager, graphed = wrapped(base, config, "cuda"), wrapped(base, config, "cuda")
    graphed.load_state_dict(eager.state_dict())
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (eager, graphed)]
    batches = [torch.randint(0, 97, (2, 16), device="cuda") for _ in range(5)]
    ref = _steps(eager, batches, opts[0], monkeypatch, graphs_on=False)
    got = _steps(graphed, batches, opts[1], monkeypatch, graphs_on=True)
    assert graphs_of(graphed).replays > 0
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    _assert_same_adapters(eager, graphed, 1e-3)


@cuda
def test_offloaded_inputs_leave_the_gpu_and_an_in_place_change_is_caught(monkeypatch):
    monkeypatch.setattr(block_graphs, "OFFLOAD_MIN_BYTES", 0)
    monkeypatch.setattr(block_graphs, "offload_allowed", lambda replaying=False: True)
    model = wrapped(tiny_causal_lm("llama"), dt.LoraConfig(r=4), "cuda")
    ids = torch.randint(0, 97, (2, 16), device="cuda")
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    block = model.model.model.layers[1]
    hidden = torch.randn(2, 16, 64, device="cuda", requires_grad=True)
    position = torch.arange(16, device="cuda")[None].expand(2, -1)
    cos_sin = model.model.model.rotary_emb(hidden, position)
    for _ in range(2):  # seen once (eagerly), then captured and replayed
        x = hidden * 1
        out = block(x, position_embeddings=cos_sin)
    assert type(out.grad_fn).__name__ == "_ReplayBlockBackward" and out.grad_fn.host_copy.source() is x
    # on its own, the block would have failed autograd's version check; the host copy fails as plainly
    with torch.no_grad():
        x.add_(1)
    with pytest.raises(block_graphs.BlockGraphError, match="modified in place"):
        out.sum().backward()


@cuda
def test_host_checkpoints_hold_two_inputs_on_the_gpu_however_far_the_host_runs_ahead():
    # Under CUDA graphs the host queues a whole backward before the GPU has run much of it. The
    # fetched inputs must not pile up then (memory handed between streams would stay allocated
    # until the host saw the GPU finish with it), and the pinned buffers are reused step to step.
    host = block_graphs._HostCheckpoints(torch.device("cuda"))
    n, numel = 12, 1 << 18  # 1 MiB of float32 each
    for _ in range(2):
        sources = [torch.full((numel,), float(i), device="cuda") for i in range(n)]
        copies = []
        torch.cuda.synchronize()
        torch.cuda._sleep(int(5e8))  # holds the GPU for a good fraction of a second
        for source in sources:
            copies.append(host.offload(source))
            host.settle(copies[-1])
        del source
        sources.clear()
        base, extra, sums = torch.cuda.memory_allocated(), 0, []
        for waiting in reversed(copies):
            fetched = host.fetch(waiting)
            sums.append(fetched.sum())
            del fetched
            extra = max(extra, torch.cuda.memory_allocated() - base)
        assert not torch.cuda.current_stream().query(), "the GPU was to be still busy: the host ran ahead"
        assert extra <= 2 * 4 * numel + (1 << 16)  # the input in use and the one being fetched
        torch.cuda.synchronize()
        assert [s.item() for s in sums] == [float(i) * numel for i in reversed(range(n))]
    assert [len(slots) for slots in host.pinned.values()] == [n]  # the second step reused the first's
    with pytest.raises(block_graphs.BlockGraphError, match="fetched back twice"):
        host.fetch(copies[0])


@cuda
def test_a_replayed_block_frees_its_fetched_input_before_the_next_fetch():
    # _ReplayBlock.backward copies the fetched input into the graph's own buffer, drops it, and only
    # then starts fetching the next block's input: one fetched input on the GPU at a time, not two
    host = block_graphs._HostCheckpoints(torch.device("cuda"))
    n, numel = 6, 1 << 18  # 1 MiB of float32 each
    copies = []
    for i in range(n):
        source = torch.full((numel,), float(i), device="cuda")
        copies.append(host.offload(source))
        host.settle(copies[-1])
    del source
    graph_buffer = torch.empty(numel, device="cuda")
    base, extra, sums = torch.cuda.memory_allocated(), 0, []
    for waiting in reversed(copies):
        fetched = host.fetch(waiting, then_prefetch=False)
        graph_buffer.copy_(fetched)
        del fetched
        host.prefetch_previous(waiting)
        extra = max(extra, torch.cuda.memory_allocated() - base)
        sums.append(graph_buffer.sum())
    assert extra <= 4 * numel + (1 << 16)  # only the input being fetched
    torch.cuda.synchronize()
    assert [s.item() for s in sums] == [float(i) * numel for i in reversed(range(n))]


@cuda
@pytest.mark.parametrize("autocast", [False, True])
def test_eager_blocks_keep_their_inputs_on_the_host_and_train_the_same(monkeypatch, autocast):
    # graphs off, host checkpoints on: every block runs through the eager node (_CheckpointedBlock)
    # with its input in host memory; the result is transformers' own checkpointing's
    monkeypatch.setattr(block_graphs, "OFFLOAD_MIN_BYTES", 0)
    torch.manual_seed(2)
    plain, offloaded, (opt_p, opt_o) = _pair(dt.LoraConfig(r=4, init_lora_weights=False))
    batches = [torch.randint(0, 97, (2, 16), device="cuda") for _ in range(4)]

    def run(model, optimizer, offload):
        monkeypatch.setattr(block_graphs, "offload_allowed", lambda replaying=False: offload)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return _steps(model, batches, optimizer, monkeypatch, graphs_on=False)

    ref, got = run(plain, opt_p, False), run(offloaded, opt_o, True)
    graphs = graphs_of(offloaded)
    assert graphs.replays == 0 and graphs.eager_calls == 2 * len(batches) and graphs.host.copies == graphs.eager_calls
    assert graphs_of(plain).eager_calls == 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    _assert_same_adapters(plain, offloaded, 1e-5)


@cuda
def test_a_block_that_returns_more_than_a_tensor_keeps_its_own_checkpointing(monkeypatch):
    monkeypatch.setattr(block_graphs, "offload_allowed", lambda replaying=False: True)
    monkeypatch.setenv("DELTATUNE_BLOCK_GRAPHS", "0")
    model = wrapped(tiny_causal_lm("llama"), dt.LoraConfig(r=4), "cuda")
    real = block_graphs._run_block
    monkeypatch.setattr(block_graphs, "_run_block", lambda *a: (real(*a), None))
    ids = torch.randint(0, 97, (2, 16), device="cuda")
    model(input_ids=ids, labels=ids).loss.backward()
    graphs = graphs_of(model)
    # refused for the first block's signature and the next one's (its input needs a gradient)
    assert graphs.eager_calls == 0 and len(graphs.refused) == 2
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@cuda
def test_hooks_dropout_and_the_signature_limit_fall_back_to_eager(monkeypatch):
    torch.manual_seed(4)
    model = wrapped(tiny_causal_lm("llama"), dt.LoraConfig(r=4), "cuda")
    graphs = graphs_of(model)
    ids = torch.randint(0, 97, (2, 16), device="cuda")
    handle = model.model.model.layers[0].register_forward_hook(lambda *a: None)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
    # the hooked block ran its own code; the other ran eagerly once, then was captured and replayed
    assert graphs.replays == 2 and len(graphs.captured) == 1
    handle.remove()
    # no_grad, eval mode, saved-tensor hooks (activation offloading) and no checkpointing: own code
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    model.eval()
    model(input_ids=ids, labels=ids).loss.backward()
    model.train()
    with torch.autograd.graph.save_on_cpu():
        model(input_ids=ids, labels=ids).loss.backward()
    blocks = model.model.model.layers
    for block in blocks:
        block.gradient_checkpointing = False
    model(input_ids=ids, labels=ids).loss.backward()
    assert graphs.replays == 2
    for block in blocks:
        block.gradient_checkpointing = True
    monkeypatch.setattr(block_graphs, "MAX_SIGNATURES", 1)
    other = torch.randint(0, 97, (1, 8), device="cuda")
    before = graphs.replays
    for _ in range(3):
        model(input_ids=other, labels=other).loss.backward()
    assert graphs.replays == before and len(graphs.signatures) == 1


@cuda
def test_a_deleted_model_gives_its_graphs_memory_back():
    def allocated() -> int:
        gc.collect()
        torch.cuda.synchronize()
        # cuBLAS keeps a workspace per stream through torch's allocator, the capture stream's too
        getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()
        return torch.cuda.memory_allocated()

    before = allocated()
    model = wrapped(tiny_causal_lm("llama"), dt.LoraConfig(r=4), "cuda")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, 97, (2, 16), device="cuda")
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    graphs = weakref.ref(graphs_of(model))
    assert graphs().captures == 2
    del model, optimizer, ids
    gc.collect()
    assert graphs() is None
    assert allocated() == before


def test_measured_speedups_are_reported_per_shape_and_released_with_the_graphs():
    from deltatune.kernels import block_graph_speedups, release_block_graphs

    model = wrapped(tiny_causal_lm("llama"), dt.LoraConfig(r=4))
    graphs = graphs_of(model)
    block_type = type(model.model.model.layers[0])
    autocast = (False, torch.bfloat16)
    for length, speedup in ((16, 1.02), (32, 1.4)):
        _, layout = block_graphs._flatten((torch.ones(2, length, 64),), {"use_cache": False})
        graphs.speedups[block_graphs._kind((layout, autocast, block_type))] = speedup
    name = block_type.__name__
    assert block_graph_speedups(model) == {f"{name} (2, 16, 64)": 1.02, f"{name} (2, 32, 64)": 1.4}
    assert release_block_graphs(model, keep_measurements=True) == 0  # nothing was captured on a CPU
    assert len(block_graph_speedups(model)) == 2  # the same shapes would be captured again unmeasured
    assert release_block_graphs(model) == 0
    assert block_graph_speedups(model) == {}


def test_replayed_blocks_keep_their_inputs_on_the_host_by_default_eager_ones_when_asked(monkeypatch):
    monkeypatch.delenv("DELTATUNE_OFFLOAD_CHECKPOINTS", raising=False)
    assert block_graphs.offload_allowed(replaying=True) and not block_graphs.offload_allowed(replaying=False)
    monkeypatch.setenv("DELTATUNE_OFFLOAD_CHECKPOINTS", "1")
    assert block_graphs.offload_allowed(replaying=True) and block_graphs.offload_allowed(replaying=False)
    monkeypatch.setenv("DELTATUNE_OFFLOAD_CHECKPOINTS", "0")
    assert not block_graphs.offload_allowed(replaying=True) and not block_graphs.offload_allowed(replaying=False)
    monkeypatch.setenv("DELTATUNE_OFFLOAD_CHECKPOINTS", "maybe")  # anything else reads as the default
    assert block_graphs.offload_setting() == "auto"


def test_a_shape_waiting_for_its_capture_or_not_worth_one_runs_eagerly_with_its_inputs_on_the_host(monkeypatch):
    """By default the steps before a shape is captured (first sighting, measurement) would hold every
    block's input on the GPU, more than the replayed steps after them: those blocks offload too, and
    so do the blocks of a shape measured not to pay for a capture (the GPU sets their pace, so the
    eager node's host time is hidden); not a refused shape, one beyond the signature limit (never
    measured), or any with offloading off."""
    monkeypatch.delenv("DELTATUNE_OFFLOAD_CHECKPOINTS", raising=False)
    monkeypatch.delenv("DELTATUNE_BLOCK_GRAPHS", raising=False)
    graphs = block_graphs.BlockGraphs()
    assert graphs._offloads_eagerly("new shape", graphs_on=True)  # not measured yet: waits for its capture
    graphs.speedups["pays"], graphs.speedups["does not pay"] = 1.5, 1.0
    assert graphs._offloads_eagerly("pays", graphs_on=True)
    assert graphs._offloads_eagerly("does not pay", graphs_on=True)  # eager for good, its input on the host
    assert not graphs._offloads_eagerly("new shape", graphs_on=False)  # graphs off: nothing waits for a capture
    graphs.refused.add("refused")
    assert not graphs._offloads_eagerly("refused", graphs_on=True)
    graphs.signatures.update(f"captured {i}" for i in range(block_graphs.MAX_SIGNATURES))
    assert not graphs._offloads_eagerly("one too many", graphs_on=True)  # never to be captured
    monkeypatch.setenv("DELTATUNE_OFFLOAD_CHECKPOINTS", "1")  # every eager block offloads, graphs or not
    assert graphs._offloads_eagerly("does not pay", graphs_on=True) and graphs._offloads_eagerly("x", graphs_on=False)
    assert not graphs._offloads_eagerly("refused", graphs_on=True)  # a refused block keeps its own code
    monkeypatch.setenv("DELTATUNE_OFFLOAD_CHECKPOINTS", "0")
    assert not graphs._offloads_eagerly("pays", graphs_on=True)


@cuda
def test_the_peak_counts_what_graph_temporaries_hold():
    from deltatune.kernels import graph_pool_bytes, peak_memory_bytes

    x = torch.randn(1 << 20, device="cuda")  # 4 MiB
    torch.cuda.synchronize()
    pool_before = graph_pool_bytes()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        (x * 2).sin()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = (x * 2).sin()  # x * 2 is a temporary: freed inside the capture, written by every replay
    torch.cuda.reset_peak_memory_stats()
    graph.replay()
    torch.cuda.synchronize()
    hidden = graph_pool_bytes() - pool_before
    assert hidden >= x.nbytes
    assert peak_memory_bytes() - torch.cuda.max_memory_allocated() == graph_pool_bytes()
    del graph, y


@cuda
def test_replay_speedup_tells_a_host_bound_block_from_a_gpu_bound_one():
    small = torch.randn(1024, device="cuda")
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def many_tiny_kernels():  # launching takes longer than running
        x = small
        for _ in range(300):
            x = x + 1

    def few_big_kernels():  # the GPU sets the pace
        for _ in range(4):
            big @ big

    assert block_graphs.replay_speedup(many_tiny_kernels) > 1.5
    assert block_graphs.replay_speedup(few_big_kernels) < block_graphs.MIN_SPEEDUP


@cuda
@pytest.mark.parametrize("speedup", [1.0, 3.0])
def test_a_shape_is_captured_only_where_replaying_pays(monkeypatch, speedup):
    monkeypatch.setenv("DELTATUNE_BLOCK_GRAPHS", "auto")
    measured = []
    monkeypatch.setattr(block_graphs, "replay_speedup", lambda run: measured.append(run) or speedup)
    torch.manual_seed(7)
    eager, graphed, (opt_e, opt_g) = _pair(dt.LoraConfig(r=4, init_lora_weights=False))
    batches = [torch.randint(0, 97, (2, 16), device="cuda") for _ in range(4)]
    ref = _steps(eager, batches, opt_e, monkeypatch, graphs_on=False)
    monkeypatch.setenv("DELTATUNE_BLOCK_GRAPHS", "auto")
    got = []
    for ids in batches:
        loss = graphed(input_ids=ids, labels=ids).loss
        loss.backward()
        got.append(loss.detach())
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
    torch.testing.assert_close(torch.stack(got), ref, rtol=1e-5, atol=1e-5)
    graphs = graphs_of(graphed)
    # once per shape, not per block or step; a "no" read again in the next steps, the best kept
    pays = speedup > block_graphs.MIN_SPEEDUP
    assert len(measured) == (1 if pays else block_graphs.MEASUREMENTS)
    assert (graphs.captures, graphs.replays > 0) == ((2, True) if speedup > block_graphs.MIN_SPEEDUP else (0, False))
    from deltatune.kernels import release_block_graphs

    assert release_block_graphs(graphed) == graphs.captures and not graphs.captured
