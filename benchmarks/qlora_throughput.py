"""QLoRA training throughput and memory: deltatune vs HF peft + bitsandbytes, in one process, one GPU.

    PYTHONPATH=src python3 benchmarks/qlora_throughput.py                       # 1.1B batch 4, 7.2B batch 1 and 2
    PYTHONPATH=src python3 benchmarks/qlora_throughput.py --runs 1b --modes peft,deltatune
    PYTHONPATH=src python3 benchmarks/qlora_throughput.py --repeats 2 --batches-7b 1,2,4   # each row twice, spread flagged
    PYTHONPATH=src python3 benchmarks/qlora_throughput.py --device cpu --tiny   # logic check on a CPU, no GPU
    PYTHONPATH=src python3 benchmarks/qlora_throughput.py --device cpu --dequant-bench --runs none   # CPU dequantize only

Random-init Llama-shaped models built from their config in bf16 (the same seed, so the same
weights, for every mode), every linear layer but the output head stored as NF4 with double
quantization and bf16 compute, LoRA r=16 / alpha=32 on all linear layers, gradient checkpointing
(non-reentrant) in train mode, sdpa attention, fused AdamW on the LoRA parameters, a fixed batch
of random tokens of 2048.

  peft       HF peft over bitsandbytes' Linear4bit, as BitsAndBytesConfig(load_in_4bit=True,
             bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
             bnb_4bit_compute_dtype=torch.bfloat16) builds it: each nn.Linear but lm_head becomes
             bnb.nn.Linear4bit(compute_dtype=bf16, compress_statistics=True, quant_type="nf4")
             quantized by Params4bit (blocksize 64), the model is flagged is_loaded_in_4bit (what
             peft dispatches on), and the loss is the model's own (labels=input_ids). No
             prepare_model_for_kbit_training: its float32 upcasts would only slow peft down.
  deltatune  the ordinary API: deltatune.quant.quantize(model, "nf4", double_quant=True,
             compute_dtype=torch.bfloat16), dt.wrap(model, dt.LoraConfig(r=16, lora_alpha=32,
             target_modules="all-linear")), wrapped.gradient_checkpointing_enable(), the loss
             through deltatune.kernels.causal_lm_loss (chunked cross-entropy, no float32 logits).
             LoraLinear over a QuantLinear base runs as one autograd node per layer
             (QuantLinear.lora_forward), as kernels.lora_linear does over an nn.Linear base.
Diagnostics (not in the default list):
  deltatune-bnb-dequant / deltatune-torch-dequant   as deltatune, dequantizing through
                       bitsandbytes' kernel / plain PyTorch (DELTATUNE_QUANT_BACKEND).
  deltatune-hf-loss    as deltatune, with the model's own loss.
  deltatune-eager-blocks  as deltatune, without replaying the checkpointed blocks as CUDA graphs
                       (DELTATUNE_BLOCK_GRAPHS=0): what the ordinary API ran before they existed.
  deltatune-forced-blocks  as deltatune, every repeating shape captured (DELTATUNE_BLOCK_GRAPHS=1)
                       instead of only where replaying was measured to be >= 1.15x faster.
  deltatune-offload    as deltatune, the checkpointed inputs of every block in pinned host memory,
                       replayed or eager (DELTATUNE_OFFLOAD_CHECKPOINTS=1); by default only the
                       replayed blocks' inputs wait there.
  deltatune-on-device  as deltatune, every checkpointed input on the GPU (DELTATUNE_OFFLOAD_CHECKPOINTS=0).
  deltatune-offload-eager-blocks  no graphs, every checkpointed input in host memory.
  deltatune-whole-weights  as deltatune, with the weights dequantized whole inside the captured
                       graphs instead of in row chunks of quant.linear.CAPTURE_CHUNK_ELEMENTS.
  unsloth              unsloth's QLoRA (FastLanguageModel, load_in_4bit=True, its "unsloth"
                       checkpointing, the model's loss); patches transformers, so it runs alone:
                       --modes unsloth, compared with the rows of another run.
  deltatune-graphed    as deltatune, the whole step (forward, backward, AdamW with
                       capturable=True) captured once as a CUDA graph by deltatune.kernels.
                       GraphedTrainStep and replayed; checkpointing without preserve_rng_state.

Step time is the median over the steps after warm-up, measured with CUDA events; "host ms" is the
time the host takes to enqueue one step when the GPU is idle (close to the step time: the step is
bound by Python and launches). Peak memory is the most device memory in use (the model,
adapters, optimizer state, activations, and every segment of the CUDA-graph pools, where graph
temporaries live unseen by torch.cuda.max_memory_allocated) over the row's warm-up steps, traced
as they run from no captured block graphs (measurement, warm-up and capture included), and one
replayed step after the timing, under the allocator's trace (_common.FirstStepsPeak,
DeviceMemoryTrace).
"resident" is what stays allocated between steps. --memory-peak lists what is in use at one
step's peak, by allocation site. Both libraries quantize the
same bf16 weights to the same NF4 format and start LoRA B at zero with the same A, so their step-0
losses differ only by quantization rounding ties and bf16 arithmetic.

--dequant-bench times the dequantization kernels alone (torch / native / triton / bitsandbytes) and
checks them bit for bit against the reference. On the CPU (2 cores, torch 2.13, bitsandbytes 0.50.2,
2026-12-01), a 4096x4096 NF4 weight with double quantization to bf16:

  4096x4096 torch          53881.0 us        1 GB/s host 53508.8 us  exact True (float32 max rel. diff 0.0e+00)
  4096x4096 native         10781.0 us        4 GB/s host 10766.1 us  exact True (float32 max rel. diff 0.0e+00)
  4096x4096 bitsandbytes   14244.1 us        3 GB/s host 14194.7 us  exact False (float32 max rel. diff 2.2e-07)
  4096x4096 speed against bitsandbytes: torch 0.26x, native 1.32x

("native": deltatune.quant.cpu_kernel, the C kernel built on first use; to float32 it took 14.6 ms
against bitsandbytes' 23.8 ms in a separate timing.)

Last measured 2026-11-23 on the lent H100 (torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0,
peft 0.21.2, bitsandbytes 0.50.2), all rows from one run (--modes peft,deltatune,deltatune-graphed
--steps 12 --warmup 3 --big-steps 8 --big-warmup 3). The steps are bound by host time, which
varied by up to ~1.5x from one machine to the next (peft 1.1B: 321-369 ms/step over five runs):
compare rows of one run only. Its peaks are torch.cuda.max_memory_allocated, as this script read
them then: exact for the eager rows, understated for the deltatune-graphed rows (the graph's pool
is not in them). The H200 rows of 2026-12-02 are in README.md's QLoRA section.

    model  batch  mode                     ours tok/s peft tok/s  ratio ours peak GiB peft peak GiB  ratio
    1.1B       4  deltatune                    36,689     23,941  1.53x          2.34          4.46  0.52x
    1.1B       4  deltatune-graphed            50,900     23,941  2.13x          2.41          4.46  0.54x
    7.2B       1  deltatune                     4,107      2,882  1.43x          5.49          5.67  0.97x
    7.2B       2  deltatune                     8,131      6,138  1.32x          6.35          6.97  0.91x
    7.2B       1  deltatune-graphed             9,249      2,882  3.21x          5.48          5.67  0.97x
    7.2B       2  deltatune-graphed             9,671      6,138  1.58x          6.34          6.97  0.91x

Step-0 losses agree within 8.3e-4 relative (e.g. 11.1581 vs 11.1674 at 7.2B). At 7.2B both
libraries hold 4.37 GiB between steps (NF4 weights, bf16 embeddings and head, float32 LoRA
weights with AdamW state), so peak memory differs only in the ~1.1-1.3 GiB of activations.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from _common import (FirstStepsPeak, settled_warmup, count_graph_nodes, memory_at_peak, peak_of_steps, profile_steps, set_same_lora_init, train_step,
                     unsloth_lora_model)
from deltatune.kernels import block_graph_speedups, peak_memory_bytes, release_block_graphs
from torch import nn

LORA_RANK, LORA_ALPHA, LORA_LR = 16, 32, 1e-3
COMPUTE_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    intermediate: int
    batches: tuple[int, ...]
    seq: int = 2048
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 32000


SHAPES = {
    "1b": Shape("1.1B", hidden=2048, layers=16, intermediate=8192, batches=(4,)),
    "7b": Shape("7.2B", hidden=4096, layers=32, intermediate=14336, batches=(1, 2)),
    "tiny": Shape("tiny", hidden=64, layers=2, intermediate=128, batches=(2,), seq=32, heads=4, kv_heads=2, vocab=256),
}
# peft + bitsandbytes measured on an H100 before this benchmark existed (tokens/s, peak GiB), for reference
REFERENCE_PEFT = {("1b", 4): (23_200, 4.39), ("7b", 1): (2_980, 5.64), ("7b", 2): (5_800, 6.91)}
DEFAULT_MODES = "peft,deltatune,deltatune-graphed"
DEQUANT_SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (2048, 8192), (512, 2048)]


@dataclass
class Result:
    mode: str
    batch: int
    step_ms: float | None = None
    host_ms: float | None = None
    tokens_per_s: float | None = None
    peak_gib: float | None = None
    resident_gib: float | None = None
    losses: list[float] = field(default_factory=list)
    note: str = ""
    spread: float | None = None  # with --repeats: (slowest - fastest) / median step over the repeats


SPREAD_LIMIT = 0.05  # a row whose repeats differ more than this is flagged: read it again before quoting it


def median_of_repeats(repeats: list[Result]) -> Result:
    """The repeat with the median step time (the lower middle one for an even count), carrying the
    spread of all of them."""
    timed = sorted((r for r in repeats if r.step_ms is not None), key=lambda r: r.step_ms)
    if not timed:
        return repeats[0]
    middle = timed[(len(timed) - 1) // 2]
    if len(timed) > 1:
        middle.spread = (timed[-1].step_ms - timed[0].step_ms) / middle.step_ms
    return middle


# ----------------------------------------------------------------------------- device helpers
class Clock:
    """CUDA events on a GPU, the host clock (after the work is done) on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1000


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        # cuBLAS keeps a workspace per stream, allocated through torch's allocator and counted by
        # memory_allocated; a graphed mode's side and capture streams would otherwise leave theirs
        # (~0.13 GiB, seen) in every later mode's resident and peak numbers.
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        torch.cuda.empty_cache()


def pinned_host_allocations(device: torch.device) -> tuple[int, float]:
    """(pinned host blocks torch's host allocator has made so far, ms spent making them)."""
    stats = torch.cuda.host_memory_stats() if device.type == "cuda" and hasattr(torch.cuda, "host_memory_stats") else {}
    return stats.get("num_host_alloc", 0), stats.get("host_alloc_time.total", 0) / 1000


def gib(n: float) -> float:
    return n / 2**30


# ----------------------------------------------------------------------------- model and data
def build_model(shape: Shape, seed: int, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.seq, attn_implementation="sdpa", use_cache=False,
    )
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=COMPUTE_DTYPE)
    return model.train()


def make_batch(shape: Shape, batch: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(0, shape.vocab, (batch, shape.seq), device=device, generator=gen)


def bnb_quantize_(model: nn.Module) -> int:
    """What from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4, double
    quant, bf16 compute)) builds, done in place on an already built model: returns layers converted."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    converted = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child is head:
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=COMPUTE_DTYPE,
                compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta",
            )
            weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, blocksize=64, compress_statistics=True, quant_type="nf4",
                quant_storage=torch.uint8, module=layer,
            )
            layer.weight = weight._quantize(child.weight.device)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, layer.train(child.training))
            converted += 1
    model.is_loaded_in_4bit = True  # peft dispatches its bnb LoRA layers on this flag
    return converted


def checkpointing_on(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


# ----------------------------------------------------------------------------- modes
def hf_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, labels=input_ids).loss


def setup_peft(model: nn.Module, seed: int):
    import bitsandbytes as bnb
    import peft

    converted = bnb_quantize_(model)
    if hasattr(model, "activation_checkpointing_enable"):  # the transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear")
    wrapped = peft.get_peft_model(model, config)
    adapters = set_same_lora_init(wrapped, seed)
    wrapped.train()
    note = f"peft {peft.__version__}, bitsandbytes {bnb.__version__}: {converted} Linear4bit, {adapters // 2} adapters"
    return wrapped, hf_loss, note


def setup_deltatune(model: nn.Module, seed: int, fused_loss: bool = True, graphed: bool = False):
    import deltatune as dt
    from deltatune.kernels import causal_lm_loss
    from deltatune.quant import backend_name, quantize, quantized_layers

    quantize(model, "nf4", double_quant=True, compute_dtype=COMPUTE_DTYPE)
    wrapped = dt.wrap(model, dt.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules="all-linear"))
    # A CUDA graph cannot read or set the RNG state, which checkpointing saves by default; nothing
    # here draws random numbers in forward (no dropout), so there is nothing to preserve.
    wrapped.gradient_checkpointing_enable({"preserve_rng_state": False} if graphed else None)
    adapters = set_same_lora_init(wrapped, seed)
    wrapped.train()
    loss_fn = (lambda m, ids: causal_lm_loss(m, ids, ids)) if fused_loss else hf_loss
    device_type = next(wrapped.parameters()).device.type
    note = f"{len(quantized_layers(wrapped))} QuantLinear, {adapters // 2} adapters, dequantize: {backend_name(device_type)}"
    return wrapped, loss_fn, note


def setup_unsloth(shape: Shape, seed: int, device: torch.device):
    """unsloth's QLoRA: its loader quantizes the saved random-init model (load_in_4bit=True: NF4,
    double quantization, bf16 compute), LoRA on the seven projections (every linear layer but the
    head), its own checkpointing ("unsloth": the hidden states wait in host memory), the model's loss."""
    import unsloth

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = unsloth_lora_model(lambda: build_model(shape, seed, device), shape.seq, targets, LORA_RANK, LORA_ALPHA,
                               load_in_4bit=True, checkpointing=True)
    adapters = set_same_lora_init(model, seed)
    return model, hf_loss, f"unsloth {unsloth.__version__}, {adapters // 2} adapters"


PROCESS_ALONE = ("unsloth",)  # patches transformers for the whole process: run alone (--modes unsloth)


# ----------------------------------------------------------------------------- timing
def timed_steps(model, loss_fn, optimizer, input_ids, steps: int, warmup: int, clock: Clock, graphed: bool = False,
                first_peak: FirstStepsPeak | None = None):
    """(median step ms, median host ms to enqueue a step from an idle device, losses, graph nodes);
    `first_peak` traces the first steps' memory as they run."""

    def step():
        return train_step(model, loss_fn, optimizer, input_ids)

    graph, losses, nodes = None, [], {}
    if graphed:  # deltatune.kernels.GraphedTrainStep: the whole step, captured once, replayed
        from deltatune.kernels import GraphedTrainStep

        def captured(batch):
            loss = loss_fn(model, batch["input_ids"])
            loss.backward()
            optimizer.step()
            return loss

        # its warm-up steps train too: their losses come first (the step-0 loss is the model's own)
        first = {}

        def record_first_loss(batch):
            loss = captured(batch)
            first.setdefault("loss", loss.detach().clone())
            return loss

        graph = GraphedTrainStep(record_first_loss, {"input_ids": input_ids}, optimizer)
        losses.append(first["loss"])

        def step():
            return graph({"input_ids": input_ids})

    marks = []
    for i in range(steps):
        if first_peak is not None:
            first_peak.started(i)
        start = clock.mark()
        if graph is not None:
            loss = step()
        else:
            loss = loss_fn(model, input_ids)
            if i == min(2, steps - 1):  # the autograd nodes of interest, once block graphs are captured
                nodes = {name: count_graph_nodes(loss, name)
                         for name in ("ReplayBlock", "QuantLoraLinear", "LoraMLPFunction", "LoraLinearFunction", "DequantizedMatmul", "MatMul4Bit")}
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        marks.append((start, clock.mark()))
        if first_peak is not None:
            first_peak.done(i)
        losses.append(loss.detach().clone() if graph is not None else loss.detach())
    clock.sync()
    times = [clock.elapsed_ms(s, e) for s, e in marks][warmup:]
    host = []
    for _ in range(2):
        clock.sync()
        started = time.perf_counter()
        step()
        host.append((time.perf_counter() - started) * 1000)
    clock.sync()
    if graph is not None:
        nodes = {"whole step as one CUDA graph": 1}
        del graph
    return statistics.median(times), statistics.median(host), [float(v) for v in losses], nodes


def cprofile_step(model, loss_fn, optimizer, input_ids, path: str, title: str) -> None:
    """Where the host's time goes in one step (Python functions by own time)."""
    import cProfile
    import io
    import pstats

    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    train_step(model, loss_fn, optimizer, input_ids)
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(35)
    with open(path, "a") as f:
        f.write(f"\n===== {title} (1 step, cProfile, by own time)\n{text.getvalue()}")


_DEQUANT_BACKENDS = {"deltatune-bnb-dequant": "bitsandbytes", "deltatune-torch-dequant": "torch"}
# the ordinary API without its CUDA graphs of checkpointed blocks (kernels/block_graphs.py)
_ENVIRONMENT = {"deltatune-eager-blocks": {"DELTATUNE_BLOCK_GRAPHS": "0"},
                # ...or captured at every shape, whether or not replaying was measured to pay
                "deltatune-forced-blocks": {"DELTATUNE_BLOCK_GRAPHS": "1"},
                # the checkpointed inputs in host memory instead of on the GPU, or on the GPU
                "deltatune-offload": {"DELTATUNE_OFFLOAD_CHECKPOINTS": "1"},
                "deltatune-on-device": {"DELTATUNE_OFFLOAD_CHECKPOINTS": "0"},
                "deltatune-offload-eager-blocks": {"DELTATUNE_OFFLOAD_CHECKPOINTS": "1", "DELTATUNE_BLOCK_GRAPHS": "0"}}


# ...and one library setting: the weights dequantized whole inside captured graphs, as before the
# captures dequantized them in row chunks (quant.linear.CAPTURE_CHUNK_ELEMENTS)
_LIBRARY_SETTINGS = {"deltatune-whole-weights": ("CAPTURE_CHUNK_ELEMENTS", "CUDA_CHUNK_ELEMENTS")}


def run_mode(mode: str, shape_key: str, shape: Shape, args, device: torch.device) -> list[Result]:
    clock = Clock(device)
    free_memory(device)
    left_over = gib(torch.cuda.memory_allocated()) if device.type == "cuda" else 0.0
    results = [Result(mode, batch) for batch in shape.batches]
    model = wrapped = optimizer = None
    graphed = mode.endswith("-graphed") and device.type == "cuda"
    settings = _ENVIRONMENT.get(mode) or ({"DELTATUNE_QUANT_BACKEND": _DEQUANT_BACKENDS[mode]} if mode in _DEQUANT_BACKENDS else {})
    settings_before = {variable: os.environ.get(variable) for variable in settings}
    from deltatune.quant import linear as quant_linear

    library_setting = _LIBRARY_SETTINGS.get(mode)
    library_before = getattr(quant_linear, library_setting[0]) if library_setting else None
    try:
        os.environ.update(settings)
        if library_setting:
            setattr(quant_linear, library_setting[0], getattr(quant_linear, library_setting[1]))
        if mode == "unsloth":
            wrapped, loss_fn, note = setup_unsloth(shape, args.seed, device)
        elif mode == "peft":
            wrapped, loss_fn, note = setup_peft(build_model(shape, args.seed, device), args.seed)
        elif mode.startswith("deltatune"):
            wrapped, loss_fn, note = setup_deltatune(build_model(shape, args.seed, device), args.seed,
                                                     fused_loss=mode != "deltatune-hf-loss", graphed=graphed)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        # unsloth's checkpointing is its own (it sets no gradient_checkpointing flag to check)
        if not (wrapped.training and (mode == "unsloth" or checkpointing_on(wrapped))):
            raise RuntimeError(f"{mode}: the model must be in train mode with gradient checkpointing on")
        params = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LORA_LR, fused=device.type == "cuda", capturable=graphed)
        trainable = sum(p.numel() for p in params)
        for result in results:
            if mode.startswith("deltatune"):
                release_block_graphs(wrapped)  # each row captures afresh, as a run of one batch shape would
            free_memory(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            input_ids = make_batch(shape, result.batch, args.seed + 1, device)
            steps, warmup = (args.steps, args.warmup) if shape.layers <= 16 else (args.big_steps, args.big_warmup)
            steps, warmup = settled_warmup(steps, warmup)
            pinned_before = pinned_host_allocations(device)
            first_peak = FirstStepsPeak(warmup, enabled=device.type == "cuda" and not graphed)
            median_ms, result.host_ms, result.losses, nodes = timed_steps(
                wrapped, loss_fn, optimizer, input_ids, steps, warmup, clock, graphed=graphed, first_peak=first_peak)
            pinned = pinned_host_allocations(device)
            pinned = (pinned[0] - pinned_before[0], pinned[1] - pinned_before[1])
            result.step_ms = median_ms
            result.tokens_per_s = result.batch * shape.seq / (median_ms / 1000)
            if device.type == "cuda":
                result.resident_gib = gib(torch.cuda.memory_allocated())
                # the allocator's trace of the first steps (capture included) and of one more replayed
                # step: the exact peak, graph pools included
                result.peak_gib = gib(peak_memory_bytes() if graphed else
                                      max(first_peak.peak or 0, peak_of_steps(wrapped, loss_fn, optimizer, input_ids, 1)))
            counted = ", ".join(f"{v} {k}" for k, v in nodes.items() if v)
            measured = ", ".join(f"{speedup:.2f}x" for speedup in block_graph_speedups(wrapped).values())
            counted += f" (replaying measured {measured} faster)" if measured else ""
            result.note = (f"{note}; {trainable / 1e6:.1f}M trainable; graph nodes: {counted or 'none counted'}; "
                           f"{left_over:.2f} GiB allocated before the model was built")
            if pinned[0]:  # pinned host memory made while timing: slow (the pages are locked one by one)
                result.note += f"; {pinned[0]} pinned host blocks made while timing ({pinned[1]:.1f} ms)"
            if graphed:
                free_memory(device)
                continue
            if args.profile and device.type == "cuda" and shape_key in args.profile.split(","):
                profile_steps(wrapped, loss_fn, optimizer, input_ids, os.path.join(args.out_dir, "profile.txt"),
                              f"{shape.name} batch {result.batch} {mode}")
            if args.memory_peak and device.type == "cuda" and shape_key in args.memory_peak.split(","):
                memory_at_peak(wrapped, loss_fn, optimizer, input_ids, os.path.join(args.out_dir, "memory_peak.txt"),
                               f"{shape.name} batch {result.batch} {mode}")
            if args.cprofile and device.type == "cuda" and shape_key in args.cprofile.split(","):
                cprofile_step(wrapped, loss_fn, optimizer, input_ids, os.path.join(args.out_dir, "cprofile.txt"),
                              f"{shape.name} batch {result.batch} {mode}")
    except torch.cuda.OutOfMemoryError:
        for result in results:
            result.note = result.note or "does not fit (CUDA out of memory)"
    except Exception as error:  # a diagnostic failing must not cost the other measurements
        if mode in ("peft", "deltatune"):
            raise
        for result in results:
            result.note = f"failed: {type(error).__name__}: {str(error)[:160]}"
    finally:
        for variable, value in settings_before.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
        if library_setting:
            setattr(quant_linear, library_setting[0], library_before)
        del model, wrapped, optimizer
        free_memory(device)
    return results


# ----------------------------------------------------------------------------- dequantization alone
def dequant_bench(device: torch.device, out_dir: str) -> str:
    """Each backend's dequantization of 7.2B / 1.1B weights: bit-exact vs the reference, GPU and host time."""
    from deltatune.quant import backends, formats

    lines = ["dequantize NF4 (double quant) to bf16: us per call back to back (median; the GPU's time where it exceeds the host's), "
             "GB/s moved, host us per call, bit-exact vs formats.dequantize"]
    shapes = DEQUANT_SHAPES if device.type == "cuda" else [(4096, 4096)]
    host_calls = 50 if device.type == "cuda" else 10
    per_call: dict[tuple[int, int], dict[str, float]] = {}
    before = os.environ.get("DELTATUNE_QUANT_BACKEND")
    try:
        for rows, cols in shapes:
            torch.manual_seed(0)
            q = formats.quantize(torch.randn(rows, cols, device=device, dtype=COMPUTE_DTYPE), "nf4", double_quant=True)
            ref32 = formats.dequantize(q, torch.float32)
            ref16 = formats.dequantize(q, COMPUTE_DTYPE)
            moved = q.nbytes() + rows * cols * 2
            for name in backends.BACKENDS:
                os.environ["DELTATUNE_QUANT_BACKEND"] = name
                try:
                    out32 = backends.dequantize(q, torch.float32)
                    exact = torch.equal(out32, ref32) and torch.equal(backends.dequantize(q, COMPUTE_DTYPE), ref16)
                    worst = ((out32 - ref32).abs() / ref32.abs().clamp_min(1e-30)).max().item()
                except Exception as error:  # bitsandbytes missing, say
                    lines.append(f"  {rows}x{cols} {name:<13} unavailable: {type(error).__name__}: {str(error)[:80]}")
                    continue
                clock = Clock(device)
                for _ in range(3):
                    backends.dequantize(q, COMPUTE_DTYPE)
                clock.sync()
                # 10 calls back to back between two events, 5 times: the GPU's time per call where the
                # host enqueues faster than the kernel runs (one call between two events would also
                # count the host's time to launch it)
                pairs = []
                for _ in range(5):
                    start = clock.mark()
                    for _ in range(10):
                        backends.dequantize(q, COMPUTE_DTYPE)
                    pairs.append((start, clock.mark()))
                clock.sync()
                gpu = [clock.elapsed_ms(*pair) / 10 for pair in pairs]
                started = time.perf_counter()
                for _ in range(host_calls):
                    backends.dequantize(q, COMPUTE_DTYPE)
                host_us = (time.perf_counter() - started) / host_calls * 1e6
                clock.sync()
                median_ms = statistics.median(gpu)
                per_call.setdefault((rows, cols), {})[name] = median_ms
                lines.append(
                    f"  {rows}x{cols} {name:<13} {median_ms * 1000:>8.1f} us {moved / (median_ms / 1000) / 1e9:>8.0f} GB/s "
                    f"host {host_us:>6.1f} us  exact {exact} (float32 max rel. diff {worst:.1e})"
                )
    finally:
        if before is None:
            os.environ.pop("DELTATUNE_QUANT_BACKEND", None)
        else:
            os.environ["DELTATUNE_QUANT_BACKEND"] = before
    for (rows, cols), times in per_call.items():
        if "bitsandbytes" in times:
            lines.append(f"  {rows}x{cols} speed against bitsandbytes: " + ", ".join(
                f"{name} {times['bitsandbytes'] / ms:.2f}x" for name, ms in times.items() if name != "bitsandbytes"))
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "dequant.txt"), "w") as f:
        f.write(text + "\n")
    return text


# ----------------------------------------------------------------------------- report
def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b is not None and b > 0 else "-"


def num(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None else "-"


def loss_line(ours: Result, peft_: Result) -> str:
    a, b = (ours.losses[0] if ours.losses else None), (peft_.losses[0] if peft_.losses else None)
    if a is None or b is None:
        return "-"
    ok = math.isfinite(a) and math.isfinite(b) and abs(a - b) / abs(b) < 1e-2
    return f"{a:.4f} / {b:.4f} ({abs(a - b) / abs(b):.1e}{'' if ok else ' DISAGREE'})"


def spread_text(r: Result) -> str:
    return "-" if r.spread is None else f"{r.spread:.1%}"


def format_table(shape_key: str, shape: Shape, results: dict[str, list[Result]]) -> str:
    header = (f"{'model':<6}{'batch':>6}  {'mode':<24}{'ours tok/s':>11}{'peft tok/s':>11}{'ratio':>7}"
              f"{'ours peak GiB':>14}{'peft peak GiB':>14}{'ratio':>7}{'step ms':>9}{'host ms':>9}{'resident':>9}{'spread':>8}"
              f"  step-0 loss ours / peft")
    lines = [header]
    peft_by_batch = {r.batch: r for r in results.get("peft", [])}
    for mode, mode_results in results.items():
        if mode == "peft":
            continue
        for r in mode_results:
            p = peft_by_batch.get(r.batch, Result("peft", r.batch))
            lines.append(
                f"{shape.name:<6}{r.batch:>6}  {mode:<24}{num(r.tokens_per_s, ',.0f'):>11}{num(p.tokens_per_s, ',.0f'):>11}"
                f"{ratio(r.tokens_per_s, p.tokens_per_s):>7}{num(r.peak_gib, '.2f'):>14}{num(p.peak_gib, '.2f'):>14}"
                f"{ratio(r.peak_gib, p.peak_gib):>7}{num(r.step_ms, '.1f'):>9}{num(r.host_ms, '.1f'):>9}{num(r.resident_gib, '.2f'):>9}"
                f"{spread_text(r):>8}  {loss_line(r, p)}"
            )
    unsteady = [f"{mode} batch {r.batch} ({r.spread:.0%})" for mode, rs in results.items() for r in rs
                if r.spread is not None and r.spread > SPREAD_LIMIT]
    if unsteady:
        lines.append(f"spread over {SPREAD_LIMIT:.0%} between repeats, read again before quoting: {', '.join(unsteady)}")
    for r in results.get("peft", []):
        ref = REFERENCE_PEFT.get((shape_key, r.batch))
        if ref:
            lines.append(f"{'':<6}{r.batch:>6}  peft here: {num(r.step_ms, '.1f')} ms/step, host {num(r.host_ms, '.1f')} ms, "
                         f"resident {num(r.resident_gib, '.2f')} GiB; reference H100: {ref[0]:,} tok/s, {ref[1]} GiB")
    return "\n".join(lines)


def environment_line(device: torch.device) -> str:
    import transformers

    versions = {}
    for name in ("peft", "bitsandbytes", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = "missing"
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    return (
        f"{datetime.date.today().isoformat()}, {where}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {versions['peft']}, bitsandbytes {versions['bitsandbytes']}, triton {versions['triton']}; NF4 + double quant, "
        f"bf16 compute, LoRA r={LORA_RANK} alpha={LORA_ALPHA} on all linear layers, gradient checkpointing, sdpa, AdamW"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=None, help="comma list of 1b, 7b (default 1b,7b; tiny with --tiny)")
    parser.add_argument("--modes", default=DEFAULT_MODES,
                        help="comma list of peft, deltatune and diagnostics: deltatune-graphed, "
                        "deltatune-bnb-dequant, deltatune-torch-dequant, deltatune-hf-loss")
    parser.add_argument("--big-modes", default=None, help="modes for the 7.2B run (default: --modes)")
    parser.add_argument("--batches-7b", default="1,2")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--big-steps", type=int, default=8)
    parser.add_argument("--big-warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every mode this many times, the modes taking turns; a row reports the median "
                             f"step and the spread of the repeats, flagged over {SPREAD_LIMIT:.0%}".replace("%", "%%"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer toy model: checks the script's logic in seconds")
    parser.add_argument("--dequant-bench", action="store_true", help="time the dequantization backends first")
    parser.add_argument("--profile", default="", help="comma list of runs to write a CUDA kernel profile of (profile.txt)")
    parser.add_argument("--memory-peak", default="",
                        help="comma list of runs to write what is allocated at one step's peak of (memory_peak.txt)")
    parser.add_argument("--cprofile", default="", help="comma list of runs to write a host-side cProfile of one step of (cprofile.txt)")
    parser.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    parser.add_argument("--json", default=None, help="also write every number here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu --tiny)", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    runs = [run for run in (args.runs or ("tiny" if args.tiny else "1b,7b")).split(",") if run != "none"]
    all_modes = set(args.modes.split(",")) | set((args.big_modes or args.modes).split(","))
    if all_modes & set(PROCESS_ALONE):
        if len(all_modes) > 1:
            print(f"{', '.join(sorted(all_modes & set(PROCESS_ALONE)))} patches transformers for the whole process: "
                  "run it alone (--modes unsloth) and compare the rows of the two runs", file=sys.stderr)
            return 2
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        importlib.import_module("unsloth")  # before transformers, as unsloth requires
    print(environment_line(device), flush=True)
    dequant_text = dequant_bench(device, args.out_dir) if args.dequant_bench else None
    if dequant_text:
        print(dequant_text, flush=True)

    tables, report = [], {}
    for shape_key in runs:
        shape = SHAPES[shape_key]
        if shape_key == "7b":
            shape = Shape(**{**shape.__dict__, "batches": tuple(int(b) for b in args.batches_7b.split(","))})
        modes = (args.big_modes if shape_key == "7b" and args.big_modes else args.modes).split(",")
        repeats: dict[str, list[list[Result]]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):  # the modes take turns, so a slow spell of the machine hits all of them
            for mode in modes:
                started = time.time()
                repeats[mode].append(run_mode(mode, shape_key, shape, args, device))
                for r in repeats[mode][-1]:
                    print(f"[{shape.name} batch {r.batch}] {mode}: {num(r.step_ms, '.1f')} ms/step, host {num(r.host_ms, '.1f')} ms, "
                          f"peak {num(r.peak_gib, '.2f')} GiB, losses {[round(v, 4) for v in r.losses[:3]]}..{r.losses[-1:] and round(r.losses[-1], 4)}; "
                          f"{r.note} ({time.time() - started:.0f} s)", flush=True)
        # one Result per batch size of each mode: the median repeat
        results = {mode: [median_of_repeats(list(by_batch)) for by_batch in zip(*runs)] for mode, runs in repeats.items()}
        tables.append(format_table(shape_key, shape, results))
        report[shape_key] = {mode: [r.__dict__ for r in rs] for mode, rs in results.items()}

    print("\n" + environment_line(device))
    if dequant_text:
        print(dequant_text)
    print("\n\n".join(tables))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment_line(device), "runs": report}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
