"""4-bit bases (deltatune.quant) and the qlora method: formats, QuantLinear, loading, adapters, merging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters, relative_error, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch
from torch import nn

import deltatune as dt
from deltatune.quant import (
    QuantLinear, dequantize, load_quantized, merge_quantized, quantize, quantize_tensor, quantized_layers, storage_report,
)
from deltatune.quant import backends, linear as quant_linear


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _gaussian(rows: int = 256, cols: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


# -- formats ----------------------------------------------------------------------------------------
def test_round_trip_error_is_lowest_for_nf4_then_fp4_then_int4():
    weight = _gaussian()
    errors = {t: relative_error(dequantize(quantize_tensor(weight, t)), weight) for t in ("nf4", "fp4", "int4")}
    assert errors["nf4"] < errors["fp4"] < errors["int4"] < 0.12, errors


def test_values_on_the_grid_round_trip_exactly_and_zero_blocks_stay_zero():
    codes = torch.randint(0, 16, (4, 64), generator=torch.Generator().manual_seed(0))
    grid = dt.quant.codebook("nf4")[codes] * torch.tensor([[0.5], [1.0], [2.0], [3.0]])
    grid[:, 0] = grid.abs().amax(dim=1)  # every block reaches its absmax exactly
    back = dequantize(quantize_tensor(grid, "nf4", double_quant=False))
    assert torch.equal(back, grid)
    zeros = torch.zeros(3, 64)
    assert torch.equal(dequantize(quantize_tensor(zeros, "nf4")), zeros)


def test_double_quantization_saves_0_373_bits_per_weight_measured_from_tensors():
    layer = QuantLinear.from_linear(nn.Linear(512, 256, bias=False))
    plain = QuantLinear.from_linear(nn.Linear(512, 256, bias=False), double_quant=False)
    for q in (layer, plain):
        stored = sum(b.numel() * b.element_size() for b in q.buffers())
        assert stored == q.weight_nbytes()
    # 4 bits + 32/64 bits of fp32 absmax = 4.5 bits; with DQ 4 + 8/64 + 32/(64·256) ≈ 4.127 (+ one offset).
    assert plain.bytes_per_param() == pytest.approx(4.5 / 8)
    assert layer.bytes_per_param() == pytest.approx((4 + 8 / 64 + 32 / (64 * 256)) / 8, abs=1e-4)
    assert layer.bytes_per_param() <= 0.52
    saved_bits = 8 * (plain.bytes_per_param() - layer.bytes_per_param())
    assert saved_bits == pytest.approx(0.5 - 0.127, abs=2e-3)


def test_odd_sizes_are_padded_to_whole_blocks():
    weight = torch.randn(7, 13)
    q = quantize_tensor(weight, "int4")
    assert dequantize(q).shape == (7, 13)
    assert relative_error(dequantize(q), weight) < 0.2


def test_bitsandbytes_backend_gives_the_reference_values(monkeypatch):
    if backends._bitsandbytes() is None:
        pytest.skip("bitsandbytes is not installed")
    weight = _gaussian(96, 320)
    for double_quant in (True, False):
        q = quantize_tensor(weight, "nf4", double_quant=double_quant)
        monkeypatch.setenv("DELTATUNE_QUANT_BACKEND", "bitsandbytes")
        fast = backends.dequantize(q)
        monkeypatch.setenv("DELTATUNE_QUANT_BACKEND", "torch")
        assert torch.allclose(fast, backends.dequantize(q), rtol=0, atol=1e-7)


def test_cpu_kernel_gives_the_reference_values_bit_for_bit(monkeypatch):
    from deltatune.quant import cpu_kernel, formats

    if cpu_kernel.load() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("DELTATUNE_QUANT_BACKEND", "native")
    weight = torch.randn(37, 100)
    for quant_type in formats.QUANT_TYPES:
        for double_quant in (True, False):
            for block_size in (64, 32, 128):
                q = formats.quantize(weight, quant_type, block_size=block_size, double_quant=double_quant)
                for dtype in (torch.float32, torch.bfloat16, torch.float16):  # float16: the reference's path
                    fast, ref = backends.dequantize(q, dtype), formats.dequantize(q, dtype)
                    assert fast.shape == ref.shape == (37, 100)
                    assert fast.dtype == dtype and torch.equal(fast, ref), (quant_type, double_quant, block_size, dtype)
    monkeypatch.delenv("DELTATUNE_QUANT_BACKEND")
    assert backends.backend_name("cpu") == "native" and backends.backend_name("cuda") != "native"


def test_cpu_kernel_is_built_once_into_the_cache_and_missing_compilers_fall_back(monkeypatch, tmp_path):
    from deltatune.quant import cpu_kernel

    if cpu_kernel._compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_kernel.load.cache_clear()
    try:
        assert cpu_kernel.load() is not None
        built = list((tmp_path / "deltatune").glob("dequantize_4bit_*.so"))
        assert len(built) == 1 and not list((tmp_path / "deltatune").glob("tmp*"))  # no temporary left behind
        stamp = built[0].stat().st_mtime_ns
        cpu_kernel.load.cache_clear()
        assert cpu_kernel.load() is not None and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
        # a broken compiler: no kernel, no exception, the PyTorch path serves
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
        cpu_kernel.load.cache_clear()
        assert cpu_kernel.load() is None
        assert backends.backend_name("cpu") == "torch"
        q = quantize_tensor(torch.randn(8, 64), "nf4")
        assert torch.equal(backends.dequantize(q), dequantize(q))
        monkeypatch.setenv("DELTATUNE_QUANT_BACKEND", "native")
        with pytest.raises(ImportError, match="C compiler"):
            backends.backend_name("cpu")
    finally:
        cpu_kernel.load.cache_clear()


def test_triton_kernel_gives_the_reference_values_under_the_interpreter():
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from deltatune.quant import backends, formats
        for quant_type in formats.QUANT_TYPES:
            for double_quant in (True, False):
                q = formats.quantize(torch.randn(37, 100), quant_type, double_quant=double_quant)
                assert torch.equal(backends.dequantize(q), formats.dequantize(q)), (quant_type, double_quant)
                fast, ref = backends.dequantize(q, torch.bfloat16), formats.dequantize(q, torch.bfloat16)
                assert torch.allclose(fast.float(), ref.float(), rtol=2**-7, atol=0), (quant_type, double_quant)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "DELTATUNE_QUANT_BACKEND": "triton"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_unknown_quant_type_and_backend_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="nf4, fp4, int4"):
        quantize_tensor(torch.randn(4, 64), "nf3")
    monkeypatch.setenv("DELTATUNE_QUANT_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="torch, native, triton, bitsandbytes"):
        backends.backend_name()


# -- QuantLinear ------------------------------------------------------------------------------------
def test_quant_linear_matches_its_dequantized_weight_and_gives_input_grads_only(monkeypatch):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(128, 384))
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    expected = F.linear(x, layer.dequantized_weight(), layer.bias)
    assert torch.allclose(y, expected, atol=1e-6)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, layer.dequantized_weight(), layer.bias).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())
    # Big layers dequantize in row chunks; the result must not change.
    monkeypatch.setattr(quant_linear, "CHUNK_ELEMENTS", 64 * 32)
    assert len(layer.row_chunks()) > 1
    x.grad = None
    chunked = layer(x)
    chunked.square().sum().backward()
    assert torch.allclose(chunked, y, atol=1e-6) and torch.allclose(x.grad, x_ref.grad, atol=1e-5)


def test_quant_linear_under_bf16_autocast_computes_in_bf16():
    layer = QuantLinear.from_linear(nn.Linear(64, 32))
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert relative_error(y.float(), layer(x)) < 2e-2
    # Casting the model must not round the block constants.
    weight = layer.dequantized_weight()
    layer.to(torch.bfloat16)
    assert layer.nested_scale.dtype == torch.float32 and torch.equal(layer.dequantized_weight(), weight)
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_quantize_model_replaces_every_linear_but_the_head():
    tokens = token_batch()
    base = tiny_llama()
    reference = _logits(base, tokens)
    quantize(base, "nf4")
    names = {n for n, _ in quantized_layers(base)}
    assert len(names) == 14 and "lm_head" not in names and isinstance(base.lm_head, nn.Linear)
    assert relative_error(_logits(base, tokens), reference) < 0.15
    report = storage_report(base)
    assert report["quantized_bytes_per_param"] <= 0.53


def test_gpt2_conv1d_quantizes_with_its_transposed_weight():
    tokens = token_batch()
    base = tiny_gpt2()
    conv = base.transformer.h[0].attn.c_attn
    layer = QuantLinear.from_linear(conv)
    x = torch.randn(2, 3, conv.weight.shape[0])
    assert relative_error(layer(x), conv(x)) < 0.15
    reference = _logits(base, tokens)
    quantize(base)
    assert relative_error(_logits(base, tokens), reference) < 0.15


def test_meta_device_gives_4bit_sizes_for_memory_estimates():
    with torch.device("meta"):
        model = dt.wrap(tiny_llama(), dt.QLoraConfig(r=4))
        out = model(input_ids=torch.zeros(2, 8, dtype=torch.long)).logits
    assert out.is_meta
    layer = model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, QuantLinear) and layer.bytes_per_param() < 0.53


# -- the qlora method and adapter files -------------------------------------------------------------
def _train(model, steps: int = 3, lr: float = 1e-2) -> list[float]:
    tokens = token_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("chunked", [False, True])
def test_one_node_lora_mlp_over_4bit_projections_equals_the_composed_layers(monkeypatch, chunked, device):
    """kernels.lora_mlp takes QuantLinear layers in place of weights: output and every gradient
    equal the three one-node QLoRA linears around the gated activation (also with row chunks)."""
    from deltatune.kernels import LoraParams, lora_mlp
    from deltatune.kernels.fused_ops import gated_activation_reference
    from deltatune.quant.linear import quant_lora_linear

    if chunked:
        for limit in ("CHUNK_ELEMENTS", "CUDA_CHUNK_ELEMENTS"):
            monkeypatch.setattr(quant_linear, limit, 128 * 128)
    torch.manual_seed(3)
    hidden, inner = 128, 512
    layers = [QuantLinear.from_linear(nn.Linear(i, o, bias=bias)).to(device) for i, o, bias in
              ((hidden, inner, True), (hidden, inner, False), (inner, hidden, True))]
    assert all((len(layer.compute_chunks(device)) > 1) == chunked for layer in layers)
    adapters = [(torch.randn(4, layer.in_features, device=device) * 0.1,
                 torch.randn(layer.out_features, 4, device=device) * 0.1) for layer in layers]
    scalings = (2.0, 0.5, 1.5)
    x = torch.randn(2, 7, hidden, device=device)

    def run(fused: bool):
        inp = x.clone().requires_grad_(True)
        leaves = [t.clone().requires_grad_(True) for pair in adapters for t in pair]
        pairs = [leaves[0:2], leaves[2:4], leaves[4:6]]
        if fused:
            params = [LoraParams(layer, layer.bias, a, b, s) for layer, (a, b), s in zip(layers, pairs, scalings)]
            out = lora_mlp(inp, *params)
        else:
            gate, up = (quant_lora_linear(inp, layer, a, b, s) for layer, (a, b), s in zip(layers[:2], pairs[:2], scalings[:2]))
            out = quant_lora_linear(gated_activation_reference(gate, up, "silu"), layers[2], *pairs[2], scalings[2])
        out.square().sum().backward()
        return out.detach(), [inp.grad, *(t.grad for t in leaves)]

    out, grads = run(fused=True)
    ref_out, ref_grads = run(fused=False)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_qlora_model_runs_one_mlp_node_per_block_and_equals_the_plain_path(checkpointing):
    """wrap(..., fused=True) over a 4-bit base: each block's MLP is one autograd node (x, gate and
    up saved, nothing of the weights) with the loss and LoRA gradients of the unfused model, also
    where checkpointing recomputes it (and backward writes over the recomputed gate and up)."""
    tokens = token_batch()

    def loss_and_grads(fused: bool):
        model = dt.wrap(tiny_llama(), dt.QLoraConfig(r=4, lora_alpha=8, init_lora_weights=False), fused=fused)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        loss = model(input_ids=tokens, labels=tokens).loss
        nodes, stack, seen = [], [loss.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            nodes.append(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, nodes

    loss, grads, nodes = loss_and_grads(fused=True)
    ref_loss, ref_grads, ref_nodes = loss_and_grads(fused=False)
    if not checkpointing:  # checkpointed blocks hide their nodes until backward recomputes them
        blocks = tiny_llama().config.num_hidden_layers
        assert nodes.count("_LoraMLPFunctionBackward") == blocks and "_LoraMLPFunctionBackward" not in ref_nodes
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_qlora_trains_only_lora_over_a_frozen_4bit_base():
    model = dt.wrap(tiny_llama(), dt.QLoraConfig(r=4, lora_alpha=8))
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    losses = _train(model)
    assert losses[-1] < losses[0]
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(quantized_layers(model)) == 14


def test_qlora_saves_a_plain_lora_file_that_loads_on_both_bases(tmp_path):
    tokens = token_batch()
    qlora = dt.wrap(tiny_llama(), dt.QLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_adapters(qlora)
    qlora.save(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and "quant_type" not in saved and saved["r"] == 4
    # On a 4-bit base quantized the same way: the very same model.
    on_quantized = dt.load(quantize(tiny_llama()), tmp_path / "a")
    assert torch.equal(_logits(on_quantized, tokens), _logits(qlora, tokens))
    # On the full-precision base: same adapter tensors; outputs differ by the quantization only.
    on_full = dt.load(tiny_llama(), tmp_path / "a")
    ours, theirs = qlora.adapter_state_dict(), on_full.adapter_state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert relative_error(_logits(on_full, tokens), _logits(qlora, tokens)) < 0.15


def test_full_precision_lora_adapter_loads_on_a_4bit_base(tmp_path):
    tokens = token_batch()
    lora = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "up_proj"], use_dora=True))
    randomize_adapters(lora)
    lora.save(tmp_path / "a")
    on_quantized = dt.load(quantize(tiny_llama()), tmp_path / "a")
    assert isinstance(on_quantized.model.model.layers[0].mlp.up_proj.base_layer, QuantLinear)
    assert relative_error(_logits(on_quantized, tokens), _logits(lora, tokens)) < 0.15


def test_qlora_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    qlora = dt.wrap(tiny_llama(), dt.QLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(qlora)
    qlora.save(tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    ours = dt.load(tiny_llama(), tmp_path / "a")
    assert relative_error(_logits(theirs, token_batch()), _logits(ours, token_batch())) < 1e-5


def test_dora_over_a_4bit_base_starts_at_the_base_output():
    tokens = token_batch()
    base = quantize(tiny_llama())
    reference = _logits(base, tokens)
    model = dt.wrap(base, dt.LoraConfig(r=4, use_dora=True))
    assert relative_error(_logits(model, tokens), reference) < 1e-5
    assert _train(model, steps=2)[-1] < 10


def test_qlora_keeps_modules_to_save_in_full_precision_and_trains_them():
    model = dt.wrap(tiny_bert_classifier(), dt.QLoraConfig(r=4, modules_to_save=["classifier"]))
    assert isinstance(model.model.classifier.original_module, nn.Linear)
    assert isinstance(model.model.bert.pooler.dense, QuantLinear)
    labels = torch.tensor([0, 1, 2, 1])
    loss = model(input_ids=token_batch(), labels=labels).loss
    loss.backward()
    assert model.model.classifier.modules_to_save["default"].weight.grad is not None


def test_bad_qlora_settings_are_refused_before_touching_the_model():
    with pytest.raises(dt.ConfigError, match="quant_type"):
        dt.QLoraConfig(quant_type="nf5")
    with pytest.raises(dt.ConfigError, match="PiSSA"):
        dt.QLoraConfig(init_lora_weights="pissa")
    assert dt.method_info("qlora").compare_defaults["lr"] == 1e-3


# -- merging ----------------------------------------------------------------------------------------
def test_plain_merge_on_a_4bit_base_is_an_error_naming_merge_quantized():
    model = dt.wrap(tiny_llama(), dt.QLoraConfig(r=4))
    with pytest.raises(TypeError, match="merge_quantized"):
        model.merge()
    with pytest.raises(TypeError, match="merge_quantized"):
        model.merge_and_unload()


def test_merge_dequantize_is_exact_and_full_precision():
    tokens = token_batch()
    model = dt.wrap(tiny_llama(), dt.QLoraConfig(r=4))
    randomize_adapters(model)
    before = _logits(model, tokens)
    with pytest.raises(ValueError, match="dequantize"):
        merge_quantized(model)
    merged, report = merge_quantized(model, "dequantize", sample_inputs={"input_ids": tokens})
    assert not quantized_layers(merged) and not isinstance(merged, dt.DeltaModel)
    assert report.output_error < 1e-5 and report.layers == 14
    assert relative_error(_logits(merged, tokens), before) < 1e-5


def test_merge_requantize_reports_the_error_it_introduces():
    tokens = token_batch()
    model = dt.wrap(tiny_llama(), dt.QLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    untouched = model.model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    before = _logits(model, tokens)
    with pytest.raises(ValueError, match="sample_inputs"):
        merge_quantized(model, "requantize")
    merged, report = merge_quantized(model, "requantize", sample_inputs=[{"input_ids": tokens}])
    assert len(quantized_layers(merged)) == 14 and report.layers == 4  # q_proj, v_proj in 2 blocks
    assert merged.model.layers[0].mlp.up_proj is untouched  # no adapter there: kept bit for bit
    measured = relative_error(_logits(merged, tokens), before)
    assert 0 < report.output_error == pytest.approx(measured, rel=1e-4)
    assert 0 < report.weight_error < 0.15
    assert "relative output error" in str(report)


# -- loading straight into 4 bits -------------------------------------------------------------------
def test_load_quantized_equals_quantizing_the_loaded_model(tmp_path):
    tokens = token_batch()
    tiny_llama().save_pretrained(tmp_path / "llama")
    loaded = load_quantized(tmp_path / "llama", "nf4")
    assert len(quantized_layers(loaded)) == 14
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert torch.equal(_logits(loaded, tokens), _logits(quantize(tiny_llama()), tokens))


def test_load_quantized_builds_a_classifier_from_an_encoder_folder(tmp_path):
    from transformers import BertForSequenceClassification

    source = tiny_bert_classifier()
    source.bert.save_pretrained(tmp_path / "encoder")  # keys without the "bert." prefix, no head
    model = load_quantized(tmp_path / "encoder", model_class=BertForSequenceClassification, num_labels=3)
    assert isinstance(model.classifier, nn.Linear) and not model.classifier.weight.is_meta
    expected = quantize(source).bert(input_ids=token_batch()).last_hidden_state
    assert torch.equal(model.bert(input_ids=token_batch()).last_hidden_state, expected)


def test_load_quantized_refuses_pickle_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_quantized(tmp_path)


# -- real models ------------------------------------------------------------------------------------
def _linear_weights(folder, limit: int) -> list[torch.Tensor]:
    """The first `limit` 2-D linear weights of a model folder, read straight from its file."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        names = [k for k in sorted(handle.keys()) if k.endswith(".weight") and "embed" not in k and "norm" not in k.lower()]
        weights = [handle.get_tensor(k) for k in names[: 4 * limit]]
    return [w.float() for w in weights if w.dim() == 2][:limit]


@pytest.mark.integration
def test_real_weights_round_trip_order_nf4_fp4_int4():
    from deltatune.train.models import converted_gguf_dir, minilm_dir, smollm2_gguf

    for folder in (minilm_dir(), converted_gguf_dir(smollm2_gguf())):
        weights = _linear_weights(folder, limit=14)
        errors = {
            t: sum(relative_error(dequantize(quantize_tensor(w, t)), w) for w in weights) / len(weights)
            for t in ("nf4", "fp4", "int4")
        }
        assert errors["nf4"] < errors["fp4"] < errors["int4"], (folder.name, errors)
