"""4-bit base quality and size: NF4 vs FP4 vs int4 on the embedded SmolLM2-135M and MiniLM-L6.

    python benchmarks/quant_error.py                  # everything (several minutes on 2 CPU cores)
    python benchmarks/quant_error.py --parts memory   # only the peak-RSS comparison of the two loaders

1. Round-trip weight error: every linear layer but the output head is quantized (block 64, double
   quantization) and dequantized; the table gives ‖W − deq(q(W))‖_F / ‖W‖_F, averaged over layers.
2. Held-out perplexity of SmolLM2 with each 4-bit base against its float32 base: the "shakespeare"
   task's held-out plays, `--blocks` blocks of `--block-size` tokens.
3. Bytes per quantized weight as stored (codes + every constant, summed from the tensors), with and
   without double quantization, and of the whole model (embeddings, norms and head stay float32).
4. Peak resident memory of getting SmolLM2 ready to compute: transformers' from_pretrained
   (float32), from_pretrained then quantize() in place, and deltatune.quant.load_quantized
   (streaming, layer by layer), each in a fresh process.

SmolLM2 ships as a GGUF Q4_1 file: its "full-precision" weights are already 4-bit values
(dequantized by transformers to float32), so every format here rounds an existing 4-bit grid.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
import time

import torch
from torch import nn

from deltatune.inject import output_head_names, set_submodule
from deltatune.quant import QuantLinear, dequantize, quantize_tensor, relative_error, storage_report
from deltatune.train import get_task
from deltatune.train.models import converted_gguf_dir, minilm_dir, smollm2_gguf

FORMATS = ("nf4", "fp4", "int4")


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    heads = output_head_names(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] not in heads and n not in heads}


def round_trip(layers: dict[str, nn.Linear], quant_type: str, double_quant: bool = True) -> tuple[float, float, dict]:
    """(mean relative error, stored bytes per weight, quantized weights by layer name)."""
    errors, stored, count, quantized = [], 0, 0, {}
    for name, layer in layers.items():
        q = quantize_tensor(layer.weight.detach(), quant_type, double_quant=double_quant)
        errors.append(relative_error(dequantize(q), layer.weight))
        stored += q.nbytes()
        count += layer.weight.numel()
        quantized[name] = q
    return sum(errors) / len(errors), stored / count, quantized


def perplexity(task, model: nn.Module, tokenizer, blocks: int) -> float:
    with torch.no_grad():
        return task.evaluate(model.eval(), tokenizer, "in_domain", limit=blocks)["perplexity"]


def swap_in(model: nn.Module, layers: dict[str, nn.Linear], quantized: dict) -> None:
    for name, q in quantized.items():
        original = layers[name]
        set_submodule(model, name, QuantLinear(original.in_features, original.out_features, q, original.bias))


LOADERS = {
    "plain": "from_pretrained (float32), one forward",
    "plain+quantize": "from_pretrained, then quantize() in place",
    "streaming": "load_quantized nf4 + DQ, one forward",
}


def peak_rss(folder: str, loader: str) -> tuple[float, float, float]:
    """(RSS after imports, peak RSS, bytes of the model's tensors) in MiB, in a fresh process."""
    # VmHWM (not ru_maxrss, which a child inherits from its forking parent) restarts at exec.
    # transformers maps safetensors files lazily, so the plain load only becomes resident when
    # the weights are used: one short forward pass makes every loader hold what it computes with.
    script = textwrap.dedent(f"""
        import re, torch, transformers
        from deltatune.quant import load_quantized, quantize, storage_report
        def peak_kib():
            return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
        base = peak_kib()
        if {loader!r} == "streaming":
            model = load_quantized({folder!r}, "nf4")
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained({folder!r})
        if {loader!r} == "plain+quantize":
            quantize(model, "nf4")
        with torch.no_grad():
            model(input_ids=torch.ones(1, 8, dtype=torch.long))
        print(base, peak_kib(), storage_report(model)["model_bytes"] // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, after, tensors = (int(v) / 1024 for v in out.stdout.split()[-3:])
    return before, after, tensors


def error_tables(models: dict[str, nn.Module]) -> dict[str, dict]:
    """Print the round-trip and size tables; returns SmolLM2's quantized weights by format."""
    print("\n## Round-trip weight error (relative Frobenius, mean over linear layers; block 64, double quant)\n")
    print("| model | layers | nf4 | fp4 | int4 | nf4 without DQ |")
    print("|---|---|---|---|---|---|")
    quantized, sizes = {}, {}
    for label, model in models.items():
        layers = linear_layers(model)
        row = []
        for quant_type in FORMATS:
            error, sizes[(label, quant_type)], q = round_trip(layers, quant_type)
            row.append(error)
            if label.startswith("SmolLM2"):
                quantized[quant_type] = q
        no_dq_error, sizes[(label, "nf4-no-dq")], _ = round_trip(layers, "nf4", double_quant=False)
        print(f"| {label} | {len(layers)} | " + " | ".join(f"{e:.4f}" for e in row) + f" | {no_dq_error:.4f} |")

    print("\n## Stored bytes per quantized weight (codes + constants, from the tensors)\n")
    print("| model | nf4 + DQ | fp4 + DQ | int4 + DQ | nf4 without DQ |")
    print("|---|---|---|---|---|")
    for label in models:
        cells = [sizes[(label, t)] for t in (*FORMATS, "nf4-no-dq")]
        print(f"| {label} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    return quantized


def perplexity_table(task, smollm: nn.Module, tokenizer, quantized: dict[str, dict], blocks: int, block_size: int) -> None:
    print(f"\n## SmolLM2-135M held-out Shakespeare perplexity ({blocks} x {block_size} tokens)\n")
    print("| base | perplexity | Δ vs float32 | linear bytes/weight | model bytes/param |")
    print("|---|---|---|---|---|")
    layers = linear_layers(smollm)
    reference = perplexity(task, smollm, tokenizer, blocks)
    print(f"| float32 | {reference:.3f} | — | 4.0000 | 4.0000 |")
    for quant_type in FORMATS:
        swap_in(smollm, layers, quantized[quant_type])
        value = perplexity(task, smollm, tokenizer, blocks)
        report = storage_report(smollm)
        for name, layer in layers.items():  # back to float32 for the next format
            set_submodule(smollm, name, layer)
        print(f"| {quant_type} + DQ | {value:.3f} | {value - reference:+.3f} | "
              f"{report['quantized_bytes_per_param']:.4f} | {report['model_bytes_per_param']:.4f} |")


def memory_table() -> None:
    folder = str(converted_gguf_dir(smollm2_gguf()))
    print("\n## Peak RSS loading SmolLM2-135M (fresh process each; 'imports': RSS with torch + transformers loaded)\n")
    print("| loader | imports MiB | peak MiB | peak − imports MiB | model tensors MiB |")
    print("|---|---|---|---|---|")
    for loader, label in LOADERS.items():
        before, after, tensors = peak_rss(folder, loader)
        print(f"| {label} | {before:.0f} | {after:.0f} | {after - before:.0f} | {tensors:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=16, help="held-out blocks for perplexity")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per block")
    parser.add_argument("--parts", default="errors,perplexity,memory", help="comma-separated parts to run")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.manual_seed(0)
    started = time.perf_counter()
    if "memory" in parts:
        memory_table()  # first, while this process is small
    if parts & {"errors", "perplexity"}:
        from transformers import AutoModel

        task = get_task("shakespeare", block_size=args.block_size, eval_blocks=args.blocks)
        smollm, tokenizer = task.load_model()
        minilm = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True)
        quantized = error_tables({"SmolLM2-135M": smollm, "MiniLM-L6": minilm})
        if "perplexity" in parts:
            perplexity_table(task, smollm, tokenizer, quantized, args.blocks, args.block_size)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
