"""`estimate`: predictions from configs on the meta device, checked against real measured steps."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert_classifier, tiny_gpt2, tiny_llama

from deltatune.compare import estimate
from deltatune.compare.estimate import build_meta_model, estimate_error
from deltatune.compare.measure import MemoryBreakdown, measure_training_step
from deltatune.compare.methods import apply_method, method_settings


def measured_step(model, method: str, batch: dict, head_modules=()) -> MemoryBreakdown:
    torch.manual_seed(0)
    prepared = apply_method(model, method_settings(method), head_modules)
    return measure_training_step(prepared, batch, device="cpu")


CASES = {
    "bert": (lambda: tiny_bert_classifier(layers=2, hidden=32), "classification", ["classifier"],
             {"input_ids": torch.randint(0, 101, (4, 16)), "labels": torch.tensor([0, 1, 2, 0])}),
    "llama": (lambda: tiny_llama(layers=2, hidden=32), "causal_lm", [],
              {"input_ids": torch.randint(0, 101, (4, 16)), "labels": torch.randint(0, 101, (4, 16))}),
    "gpt2": (lambda: tiny_gpt2(layers=2, hidden=32), "causal_lm", [],
             {"input_ids": torch.randint(0, 101, (4, 16)), "labels": torch.randint(0, 101, (4, 16))}),
}


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.parametrize("method", ["full", "lora"])
def test_estimate_matches_measured_step_on_tiny_models(family, method):
    make, kind, heads, batch = CASES[family]
    model = make()
    report = estimate(model, [method], batch_size=4, seq_len=16, task_kind=kind, num_labels=3, device="cpu")
    predicted = report.row(method)
    assert predicted.error is None
    measured = measured_step(make(), method, batch, heads)
    assert predicted.memory.weights == measured.weights
    assert predicted.memory.gradients == measured.gradients
    assert predicted.memory.optimizer_states == measured.optimizer_states
    errors = estimate_error(predicted.memory, measured)
    assert abs(errors["peak"]) < 5.0, errors
    assert abs(errors["activations"]) < 10.0, errors


def test_seven_billion_llama_preset_counts_parameters_exactly():
    report = estimate("llama-7b", ["full", "lora"], batch_size=1, seq_len=128)
    full, lora = report.row("full"), report.row("lora")
    assert full.trainable == full.total == 6_738_415_616  # Llama-2-7B
    assert 4 * full.total <= full.memory.weights < 4 * full.total + 2**20  # + rotary buffers
    assert full.memory.optimizer_states == 8 * full.total + 4 * (32 * 9 + 3)  # 2 fp32 states + step per tensor
    assert 0 < lora.percent < 1.0
    assert lora.memory.optimizer_states < full.memory.optimizer_states / 100
    # Llama has no attention dropout, so the fused kernel runs and activations grow linearly.
    longer = estimate("llama-7b", ["lora"], batch_size=1, seq_len=512).row("lora")
    assert 3.9 < longer.memory.activations / lora.memory.activations < 4.1


def test_cuda_estimate_uses_fused_attention_and_bf16():
    cpu = estimate("minilm", ["full"], batch_size=8, seq_len=256, device="cpu").row("full")
    cuda_fp32 = estimate("minilm", ["full"], batch_size=8, seq_len=256, device="cuda", mixed_precision="no").row("full")
    cuda_bf16 = estimate("minilm", ["full"], batch_size=8, seq_len=256, device="cuda").row("full")
    # The math path keeps heads x s^2 probabilities per layer; fused kernels keep q, k, v, out.
    assert cuda_fp32.memory.activations < 0.6 * cpu.memory.activations
    assert cuda_bf16.memory.activations < cuda_fp32.memory.activations
    assert cuda_bf16.memory.weights == cpu.memory.weights  # master weights stay fp32


def test_local_model_folder_and_errors(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    report = estimate(str(tmp_path), ["full"], batch_size=2, seq_len=8)
    assert report.task_kind == "causal_lm"
    assert report.row("full").trainable == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="neither a model folder nor a preset. Presets: llama-7b"):
        estimate("llama-70000b", ["full"])
    with pytest.raises(ValueError, match="Unknown method"):
        estimate("minilm", ["full", "nope"])
    assert "lora" in estimate("gpt2", "full,lora", batch_size=1, seq_len=8).render()


def test_meta_model_takes_no_memory():
    model, name, kind = build_meta_model("llama-7b")
    assert kind == "causal_lm" and name == "llama-7b"
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.integration
def test_estimate_within_15_percent_on_the_default_task_model():
    """The acceptance check on the real MiniLM classifier, batch 32 x 64 tokens."""
    from deltatune.train import get_task

    task = get_task("sentiment")
    batch = {"input_ids": torch.randint(1000, 2000, (32, 64)), "attention_mask": torch.ones(32, 64, dtype=torch.long),
             "labels": torch.randint(0, 3, (32,))}
    for method in ("full", "lora"):
        model, _ = task.load_model()
        predicted = estimate(model, [method], batch_size=32, seq_len=64, task_kind="classification", num_labels=3).row(method)
        fresh, _ = task.load_model()
        measured = measured_step(fresh, method, batch, task.head_modules)
        error = estimate_error(predicted.memory, measured)["peak"]
        assert abs(error) <= 15.0, (method, error)


# Llama-7B: 32 blocks of q, k, v, o (4096 x 4096) and gate, up, down (4096 x 11008) projections.
LLAMA_7B_LINEAR = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)


def close(estimated: int, expected: float, tolerance: float = 0.10) -> bool:
    return abs(estimated - expected) <= tolerance * expected


@pytest.mark.parametrize("checkpointing", [False, True])
def test_seven_billion_figures_agree_with_the_usual_arithmetic(checkpointing):
    """Mixed-precision AdamW full fine-tuning: 4 + 4 + 8 = 16 bytes per parameter (float32 weights,
    gradients, two states); LoRA over a bf16 base: 2 bytes per base parameter plus a float32 adapter
    with its gradients and two states; QLoRA: about 0.52 bytes per linear weight (NF4 with double
    quantization), the embeddings and head in bf16."""
    common = dict(batch_size=1, seq_len=256, device="cuda", gradient_checkpointing=checkpointing)
    full = estimate("llama-7b", ["full"], **common).row("full")
    n = full.total
    assert close(full.memory.weights, 4 * n) and close(full.memory.gradients, 4 * n)
    assert close(full.memory.optimizer_states, 8 * n)
    half = estimate("llama-7b", ["lora", "qlora"], weights_dtype="bfloat16", **common)
    lora, qlora = half.row("lora"), half.row("qlora")
    t = lora.trainable
    assert close(lora.memory.weights, 2 * n + 4 * t) and close(lora.memory.gradients, 4 * t)
    assert close(lora.memory.optimizer_states, 8 * t)
    assert close(qlora.memory.weights, 0.516 * LLAMA_7B_LINEAR + 2 * (n - LLAMA_7B_LINEAR) + 4 * t)
    assert qlora.trainable == t and close(qlora.memory.optimizer_states, 8 * t)


def test_checkpointing_keeps_block_inputs_and_one_block():
    common = dict(batch_size=2, seq_len=256, device="cuda", weights_dtype="bfloat16")
    plain = estimate("llama-7b", ["lora"], **common).row("lora").memory.activations
    checkpointed = estimate("llama-7b", ["lora"], gradient_checkpointing=True, **common).row("lora").memory.activations
    block_inputs = 32 * 2 * 256 * 4096 * 2  # bf16 hidden states entering each block
    assert block_inputs < checkpointed < plain / 5


def test_the_readmes_estimate_command_runs(capsys):
    from deltatune.cli import main

    assert main(["estimate", "--model", "llama-7b", "--methods", "full,lora"]) == 0
    table = capsys.readouterr().out
    assert "full" in table and "lora" in table and "failed" not in table


def test_the_fsdp2_estimate_divides_what_shards_and_keeps_the_rest(capsys):
    from deltatune.cli import main

    one = estimate("llama-1b", ["full", "lora"], batch_size=1, seq_len=256, weights_dtype="bfloat16")
    eight = estimate("llama-1b", ["full", "lora"], batch_size=1, seq_len=256, weights_dtype="bfloat16", fsdp2_gpus=8)
    for method in ("full", "lora"):
        whole, shard = one.row(method).memory, eight.row(method).memory
        assert shard.activations == whole.activations  # the batch is per GPU
        assert whole.weights / 8 < shard.weights < whole.weights / 2  # an eighth, plus two gathered blocks
        # an eighth of every tensor's rows, rounded up: LoRA's A (4 rows here) is padded to one row per GPU
        assert whole.optimizer_states / 8 <= shard.optimizer_states <= whole.optimizer_states / (8 if method == "full" else 4) * 1.01
    with pytest.raises(ValueError, match="fsdp2_gpus"):
        estimate("llama-1b", ["lora"], fsdp2_gpus=0)
    assert main(["estimate", "llama-1b", "--methods", "lora", "--fsdp2-gpus", "4"]) == 0
    assert "per GPU of 4 under FSDP2" in capsys.readouterr().out
