"""Training throughput: full fine-tuning vs HF peft LoRA vs deltatune LoRA, in one process, one GPU.

    PYTHONPATH=src python3 benchmarks/train_throughput.py                 # 1.1B with/without checkpointing, 7B with
    PYTHONPATH=src python3 benchmarks/train_throughput.py --runs 1b --modes peft,deltatune
    PYTHONPATH=src python3 benchmarks/train_throughput.py --runs 1b,gemma2-2b,qwen2-1.5b --modes peft,deltatune,deltatune-labels

Modes: "deltatune" calls deltatune.kernels.causal_lm_loss; "deltatune-labels" is the ordinary
`model(input_ids, labels=...)` a Trainer or TRL user runs (the wrapped model takes the chunked
loss itself since the labels= path landed); "deltatune-offload" is that with the activations saved
for backward kept in host memory (TrainConfig.offload_activations); "deltatune-labels-eager-blocks"
is "deltatune-labels" without replaying checkpointed blocks as CUDA graphs (DELTATUNE_BLOCK_GRAPHS=0),
"deltatune-labels-forced-blocks" with every repeating shape captured whether or not replaying was
measured to pay (DELTATUNE_BLOCK_GRAPHS=1; by default a shape is captured where it is >= 1.15x faster),
"deltatune-labels-host-checkpoints" with them and their inputs in host memory (DELTATUNE_OFFLOAD_CHECKPOINTS=1). Every family shape here
(Llama, Gemma-2, Gemma-3, Phi-3, Qwen2.5) has a fused block path.

Peers a user would pick instead, each alone in its own process (both patch transformers for the
whole process), from the wheels ../shared/peer-wheels/fetch.sh unpacks into .peers:
    PYTHONPATH=$PWD/.peers:$PWD/src python3 benchmarks/train_throughput.py --runs 1b --modes peft-liger
    PYTHONPATH=$PWD/.peers:$PWD/src python3 benchmarks/train_throughput.py --runs 1b --modes unsloth
"peft-liger" is peft over a model whose classes Liger patched (RoPE, RMSNorm, SwiGLU/GeGLU, fused
linear cross-entropy); "unsloth" is FastLanguageModel.get_peft_model over the same random-init
model saved to a folder first (its loader reads folders), with its own checkpointing when on.

Random-init Llama-shaped models in bf16 with sdpa attention, fused AdamW (states in bf16, like the
parameters), a fixed batch of random tokens, LoRA r=16 / alpha=32 on all seven projections. Each
mode starts from the same initial weights; LoRA A gets the same random init in peft and deltatune,
B starts at zero. Step time is the median over the steps after warm-up, measured with CUDA events;
peak memory is the most device memory in use (weights, optimizer state, activations and the
CUDA-graph pools' segments) over the warm-up steps, traced as they run from no captured block
graphs, and one replayed step after the timing, under the allocator's trace
(_common.FirstStepsPeak, DeviceMemoryTrace).
"host ms" is the time the host takes to enqueue one step when the GPU is idle: well below the
step time, the GPU sets the pace; close to it, either Python and launch overhead do, or the host
ran far enough ahead to fill CUDA's launch queue and waited there (benchmarks/host_profile.py
shows where the host's time goes; a launch that waits reads as a slow call).
"floor" is every weight frozen, no adapter, gradients flowing to the input embeddings only: what
any adapter pays at least with HF's unfused model code.

The loss check runs peft and deltatune for the same steps on the same data and reports their
largest difference; they differ only by bf16 rounding.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from _common import FirstStepsPeak, settled_warmup, count_graph_nodes, memory_at_peak, peak_of_steps, profile_steps, set_same_lora_init, train_step, unsloth_lora_model
from deltatune.kernels import block_graph_speedups, peak_memory_bytes
from torch import nn

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_TARGET_MODULES = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # the same seven, two of them fused


def lora_targets(model_type: str) -> list[str]:
    return PHI3_TARGET_MODULES if model_type == "phi3" else TARGET_MODULES
LORA_RANK, LORA_ALPHA = 16, 32
LORA_LR, FULL_LR = 1e-3, 1e-5


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    intermediate: int
    batch: int
    seq: int = 2048
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 32000
    family: str = "llama"  # transformers model type
    extra: tuple = ()  # further config fields, (name, value) pairs

    def matmul_params(self) -> int:
        """Weights that multiply every token: the blocks' projections and the LM head (the input
        embedding is a lookup)."""
        head_dim = dict(self.extra).get("head_dim", self.hidden // self.heads)
        attention = self.hidden * head_dim * (2 * self.heads + 2 * self.kv_heads)
        return self.layers * (attention + 3 * self.hidden * self.intermediate) + self.vocab * self.hidden

    def train_flops_per_token(self, frozen_base: bool) -> float:
        """Model FLOPs of one training token: 2N forward, 2N for the input gradients, 2N more for the
        weight gradients unless the base is frozen (LoRA's rank-r products are under 1%), plus causal
        attention (QK^T and AV, half the square) three times over; recomputation is not counted."""
        head_dim = dict(self.extra).get("head_dim", self.hidden // self.heads)
        attention = 3 * 2 * self.seq * self.heads * head_dim * self.layers
        return (4 if frozen_base else 6) * self.matmul_params() + attention


SHAPES = {
    "1b": Shape("1.1B", hidden=2048, layers=16, intermediate=8192, batch=4),
    "7b": Shape("7B", hidden=4096, layers=32, intermediate=14336, batch=2),
    # Gemma-2 2B: GeGLU, 4 norms per block, softcapped attention and final logits, 256k vocabulary.
    "gemma2-2b": Shape("Gemma-2 2B", hidden=2304, layers=26, intermediate=9216, batch=4, heads=8, kv_heads=4,
                       vocab=256000, family="gemma2", extra=(("head_dim", 256),)),
    # Gemma-3 1B: GeGLU, q/k norms, sliding-window layers, 262k vocabulary (no final-logit softcapping).
    "gemma3-1b": Shape("Gemma-3 1B", hidden=1152, layers=26, intermediate=6912, batch=4, heads=4, kv_heads=1,
                       vocab=262144, family="gemma3_text",
                       extra=(("head_dim", 256), ("sliding_window", 512), ("query_pre_attn_scalar", 256))),
    # Phi-3-mini 3.8B: q, k, v in one qkv_proj, gate and up in one gate_up_proj.
    "phi3-mini": Shape("Phi-3-mini 3.8B", hidden=3072, layers=32, intermediate=8192, batch=4, heads=32, kv_heads=32,
                       vocab=32064, family="phi3", extra=(("pad_token_id", 0),)),
    "qwen2-1.5b": Shape("Qwen2.5-1.5B", hidden=1536, layers=28, intermediate=8960, batch=4, heads=12, kv_heads=2,
                        vocab=151936, family="qwen2"),
}
# (shape, gradient checkpointing)
RUNS = {"1b": ("1b", False), "1b-ckpt": ("1b", True), "7b-ckpt": ("7b", True), "gemma2-2b": ("gemma2-2b", False),
        "gemma3-1b": ("gemma3-1b", False), "phi3-mini": ("phi3-mini", False), "qwen2-1.5b": ("qwen2-1.5b", False)}


@dataclass
class Result:
    mode: str
    step_ms: float | None = None
    host_ms: float | None = None
    tokens_per_s: float | None = None
    peak_gib: float | None = None
    losses: list[float] = field(default_factory=list)
    note: str = ""


# ----------------------------------------------------------------------------- model and data
def build_model(shape: Shape, seed: int) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        shape.family, vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.seq, attn_implementation="sdpa", use_cache=False, **dict(shape.extra),
    )
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.train()


def make_batch(shape: Shape, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(0, shape.vocab, (shape.batch, shape.seq), device="cuda", generator=gen)


def enable_checkpointing(model: nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ----------------------------------------------------------------------------- modes
def hf_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, labels=input_ids).loss


def setup_full(model, checkpointing):
    if checkpointing:
        enable_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=FULL_LR, fused=True)
    return model, hf_loss, optimizer, ""


def setup_floor(model, checkpointing):
    model.requires_grad_(False)
    model.enable_input_require_grads()
    if checkpointing:
        enable_checkpointing(model)
    return model, hf_loss, None, "no trainable weights"


def setup_peft(model, checkpointing, seed):
    import peft

    if checkpointing:
        enable_checkpointing(model)
    config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                             target_modules=lora_targets(model.config.model_type))
    wrapped = peft.get_peft_model(model, config)
    set_same_lora_init(wrapped, seed)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LORA_LR, fused=True)
    return wrapped, hf_loss, optimizer, f"peft {peft.__version__}"


PROCESS_ALONE = ("peft-liger", "unsloth")  # modes that patch transformers for the whole process


def apply_liger(family: str) -> str:
    """Patch transformers' classes of `family` with Liger's kernels (before the model is built)."""
    import inspect

    import liger_kernel
    from liger_kernel import transformers as liger

    patch = getattr(liger, f"apply_liger_kernel_to_{family}")
    wanted = dict(rope=True, rms_norm=True, swiglu=True, geglu=True, fused_linear_cross_entropy=True, cross_entropy=False)
    accepted = inspect.signature(patch).parameters
    patch(**{k: v for k, v in wanted.items() if k in accepted})
    return f"peft + liger-kernel {getattr(liger_kernel, '__version__', '')}".strip()


def setup_unsloth(shape: Shape, checkpointing: bool, seed: int):
    """unsloth's LoRA over the random-init model, loaded by its own loader from a saved folder."""
    import unsloth

    model = unsloth_lora_model(lambda: build_model(shape, seed), shape.seq, lora_targets(shape.family), LORA_RANK,
                               LORA_ALPHA, load_in_4bit=False, checkpointing=checkpointing)
    set_same_lora_init(model, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LORA_LR, fused=True)
    return model, hf_loss, optimizer, f"unsloth {unsloth.__version__}"


def setup_deltatune(model, checkpointing, seed, patch=True, fused_loss=True, capturable=False):
    import deltatune as dt
    from deltatune.kernels import causal_lm_loss

    # The ordinary API: on CUDA, dt.wrap with LoRA (fused="auto") dispatches each LoRA layer to one
    # fused node and runs the fused block ops; fused=False is the "lora-only" row: fused LoRA layers
    # without the fused block ops.
    config = dt.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=lora_targets(model.config.model_type))
    wrapped = dt.wrap(model, config, fused="auto" if patch else False)
    if model.config.model_type == "llama":
        assert wrapped.is_fused == patch, "fused='auto' should patch a CUDA Llama model"
    if checkpointing:
        wrapped.gradient_checkpointing_enable()
    set_same_lora_init(wrapped, seed)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LORA_LR, fused=True, capturable=capturable)
    loss_fn = (lambda m, ids: causal_lm_loss(m, ids, ids)) if fused_loss else hf_loss
    return wrapped, loss_fn, optimizer, ""


def offloaded(loss_fn):
    def with_host_storage(model, input_ids):
        with torch.autograd.graph.save_on_cpu(pin_memory=True):
            return loss_fn(model, input_ids)

    return with_host_storage


# ----------------------------------------------------------------------------- timing
def timed_steps(model, loss_fn, optimizer, input_ids, steps, warmup, graphed=False,
                first_peak: FirstStepsPeak | None = None) -> tuple[float, float, list[float], dict]:
    """Median step time (CUDA events), median host time to enqueue one step from an idle GPU, losses;
    `first_peak` traces the first steps' memory as they run."""

    def step():
        return train_step(model, loss_fn, optimizer, input_ids)

    if graphed:
        from deltatune.kernels.cuda_graph import GraphedTrainStep

        def captured(batch):
            loss = loss_fn(model, batch["input_ids"])
            loss.backward()
            optimizer.step()
            return loss

        graph = GraphedTrainStep(captured, {"input_ids": input_ids}, optimizer)

        def step():
            return graph({"input_ids": input_ids})

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    losses, graph_nodes = [], {}
    for i in range(steps):
        if first_peak is not None:
            first_peak.started(i)
        starts[i].record()
        loss = step()
        if i == min(2, steps - 1) and not graphed:  # block graphs are captured on the second step
            graph_nodes = {name: count_graph_nodes(loss, name) for name in ("LoraLinearFunction", "LoraMLPFunction", "ReplayBlock")}
        ends[i].record()
        losses.append(loss.detach())
        if first_peak is not None:
            first_peak.done(i)
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)][warmup:]
    host_times = []
    for _ in range(3):
        torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        host_times.append((time.perf_counter() - started) * 1000)
    torch.cuda.synchronize()
    return statistics.median(times), statistics.median(host_times), [float(v) for v in losses], graph_nodes


def free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def run_mode(mode: str, shape: Shape, checkpointing: bool, args) -> Result:
    free_cuda()
    torch.cuda.reset_peak_memory_stats()
    result = Result(mode)
    model = wrapped = optimizer = None
    try:
        if mode == "unsloth":
            wrapped, loss_fn, optimizer, result.note = setup_unsloth(shape, checkpointing, args.seed)
        else:
            if mode == "peft-liger":
                liger_note = apply_liger(shape.family)
            model = build_model(shape, args.seed)
        if mode == "unsloth":
            pass
        elif mode == "peft-liger":
            wrapped, loss_fn, optimizer, _ = setup_peft(model, checkpointing, args.seed)
            result.note = liger_note
        elif mode == "full":
            wrapped, loss_fn, optimizer, result.note = setup_full(model, checkpointing)
        elif mode == "floor":
            wrapped, loss_fn, optimizer, result.note = setup_floor(model, checkpointing)
        elif mode == "peft":
            wrapped, loss_fn, optimizer, result.note = setup_peft(model, checkpointing, args.seed)
        elif mode.startswith("deltatune"):
            os.environ["DELTATUNE_DISABLE_TRITON"] = "1" if mode == "deltatune-no-triton" else "0"
            # the checkpointed blocks' CUDA graphs (kernels/block_graphs.py): off, at every shape, or where they pay
            os.environ["DELTATUNE_BLOCK_GRAPHS"] = {"deltatune-labels-eager-blocks": "0",
                                                   "deltatune-labels-forced-blocks": "1"}.get(mode, "auto")
            os.environ["DELTATUNE_OFFLOAD_CHECKPOINTS"] = "1" if mode == "deltatune-labels-host-checkpoints" else "0"
            patch = mode not in ("deltatune-lora-only",)
            wrapped, loss_fn, optimizer, result.note = setup_deltatune(
                model, checkpointing, args.seed, patch=patch,
                fused_loss=patch and mode not in ("deltatune-labels", "deltatune-offload", "deltatune-labels-eager-blocks",
                                                  "deltatune-labels-forced-blocks",
                                                  "deltatune-labels-host-checkpoints"),
                capturable=mode == "deltatune-graphed"
            )
            if mode == "deltatune-offload":  # what TrainConfig(offload_activations=True) does around the forward
                loss_fn = offloaded(loss_fn)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        input_ids = make_batch(shape, args.seed + 1)
        steps, warmup = (args.steps, args.warmup) if shape.layers <= 16 else (args.big_steps, args.big_warmup)
        steps, warmup = settled_warmup(steps, warmup)
        first_peak = FirstStepsPeak(warmup, enabled=mode != "deltatune-graphed")
        median_ms, result.host_ms, result.losses, nodes = timed_steps(
            wrapped, loss_fn, optimizer, input_ids, steps, warmup, graphed=mode == "deltatune-graphed", first_peak=first_peak
        )
        result.step_ms = median_ms
        result.tokens_per_s = shape.batch * shape.seq / (median_ms / 1000)
        # the allocator's trace of the first steps (capture included) and of one more replayed step:
        # the exact peak, graph pools included
        result.peak_gib = (peak_memory_bytes() if mode == "deltatune-graphed" else
                           max(first_peak.peak or 0, peak_of_steps(wrapped, loss_fn, optimizer, input_ids, 1))) / 2**30
        if mode == "deltatune-graphed":
            result.note = "whole step replayed as one CUDA graph (kernels.GraphedTrainStep)"
        elif mode.startswith("deltatune"):
            result.note = (f"fused autograd nodes: {nodes['LoraLinearFunction']} LoRA linear, {nodes['LoraMLPFunction']} LoRA MLP, "
                           f"{nodes['ReplayBlock']} blocks replayed as CUDA graphs")
            measured = ", ".join(f"{speedup:.2f}x" for speedup in block_graph_speedups(wrapped).values())
            result.note += f" (replaying measured {measured} faster)" if measured else ""
        if args.memory_peak and mode != "deltatune-graphed":
            memory_at_peak(wrapped, loss_fn, optimizer, input_ids, os.path.join(args.out_dir, "memory_peak.txt"), f"{shape.name} {mode}")
        if args.profile and not checkpointing and mode != "deltatune-graphed":
            profile_steps(wrapped, loss_fn, optimizer, input_ids, os.path.join(args.out_dir, "profile.txt"), f"{shape.name} {mode}")
    except torch.cuda.OutOfMemoryError:
        result.note = "does not fit (CUDA out of memory)"
    except Exception as error:  # a diagnostic mode failing must not cost the other measurements
        if mode in ("full", "peft", "deltatune", "deltatune-labels"):
            raise
        result.note = f"failed: {type(error).__name__}: {str(error)[:120]}"
    finally:
        del model, wrapped, optimizer
        if mode.startswith("deltatune"):
            os.environ.pop("DELTATUNE_DISABLE_TRITON", None)
            os.environ.pop("DELTATUNE_BLOCK_GRAPHS", None)
            os.environ.pop("DELTATUNE_OFFLOAD_CHECKPOINTS", None)
        free_cuda()
    return result


# ----------------------------------------------------------------------------- report
def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b is not None and b > 0 else "-"


# Dense bf16 tensor-core peak per GPU (NVIDIA's data sheets), for the MFU column.
PEAK_BF16_FLOPS = {"H200": 989.5e12, "H100": 989.5e12, "A100": 312e12}


def peak_flops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def mfu(result: Result, shape: Shape, peak: float | None) -> str:
    """Model FLOPs utilisation: the step's model FLOPs (Shape.train_flops_per_token) over the peak."""
    if peak is None or result.tokens_per_s is None:
        return "-"
    flops = result.tokens_per_s * shape.train_flops_per_token(frozen_base=result.mode != "full")
    return f"{100 * flops / peak:.1f}%"


def format_table(title: str, results: dict[str, Result], shape: Shape | None = None) -> str:
    full, peft_ = results.get("full"), results.get("peft")
    peak = peak_flops() if shape is not None else None
    lines = [title, f"{'mode':<22}{'tokens/s':>10}{'step ms':>10}{'peak GiB':>10}{'MFU':>7}{'tok/s vs peft':>15}{'step vs full':>14}{'mem vs full':>13}{'mem vs peft':>13}{'host ms':>9}  note"]
    for mode, r in results.items():
        if r.step_ms is None:
            lines.append(f"{mode:<22}{'-':>10}{'-':>10}{'-':>10}{'-':>7}{'-':>15}{'-':>14}{'-':>13}{'-':>13}{'-':>9}  {r.note}")
            continue
        lines.append(
            f"{mode:<22}{r.tokens_per_s:>10,.0f}{r.step_ms:>10.1f}{r.peak_gib:>10.1f}{mfu(r, shape, peak) if shape else '-':>7}"
            f"{ratio(r.tokens_per_s, peft_ and peft_.tokens_per_s):>15}{ratio(r.step_ms, full and full.step_ms):>14}"
            f"{ratio(r.peak_gib, full and full.peak_gib):>13}{ratio(r.peak_gib, peft_ and peft_.peak_gib):>13}{r.host_ms:>9.1f}  {r.note}"
        )
    return "\n".join(lines)


def loss_agreement(results: dict[str, Result]) -> str | None:
    peft_, ours = results.get("peft"), results.get("deltatune")
    if not (peft_ and ours and peft_.losses and ours.losses):
        return None
    diffs = [abs(a - b) / abs(b) for a, b in zip(ours.losses, peft_.losses)]
    verdict = "agree (bf16 noise)" if max(diffs) < 1e-2 else "DISAGREE"
    return (
        f"loss check over {len(diffs)} steps: peft {peft_.losses[0]:.4f} -> {peft_.losses[-1]:.4f}, "
        f"deltatune {ours.losses[0]:.4f} -> {ours.losses[-1]:.4f}, max relative difference {max(diffs):.2e}: {verdict}"
    )


def environment_line() -> str:
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "missing"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    return (
        f"{datetime.date.today().isoformat()}, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton_version}, transformers {transformers.__version__}, peft {peft_version}, "
        f"bf16, sdpa, fused AdamW, LoRA r={LORA_RANK} alpha={LORA_ALPHA} on {len(TARGET_MODULES)} projections"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="1b,1b-ckpt,7b-ckpt", help=f"comma list of {sorted(RUNS)}")
    parser.add_argument("--modes", default="full,floor,peft,deltatune",
                        help="comma list of full, floor, peft, deltatune, and diagnostics: deltatune-lora-only (no fused block ops, "
                        "HF loss), deltatune-no-triton (fused ops on their PyTorch path), deltatune-graphed (CUDA graph)")
    parser.add_argument("--big-modes", default="full,peft,deltatune", help="modes for the 7B run")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--big-steps", type=int, default=10)
    parser.add_argument("--big-warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-peak", action="store_true", help="write what is allocated at one step's peak per mode to memory_peak.txt")
    parser.add_argument("--profile", action="store_true", help="write a CUDA kernel profile per mode (runs without checkpointing) to profile.txt")
    parser.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    parser.add_argument("--json", default=None, help="also write every number here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    all_modes = set(args.modes.split(",")) | set(args.big_modes.split(","))
    alone = all_modes & set(PROCESS_ALONE)
    if alone and len(set(args.modes.split(","))) > 1:
        print(f"{', '.join(sorted(alone))} patch transformers for the whole process: run each alone (--modes {min(alone)})",
              file=sys.stderr)
        return 2
    if "unsloth" in all_modes:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        importlib.import_module("unsloth")  # before transformers, as unsloth requires

    print(environment_line(), flush=True)

    tables, report = [], {}
    for run_name in args.runs.split(","):
        shape_key, checkpointing = RUNS[run_name]
        shape = SHAPES[shape_key]
        modes = (args.big_modes if shape_key == "7b" else args.modes).split(",")
        results = {}
        for mode in modes:
            started = time.time()
            results[mode] = run_mode(mode, shape, checkpointing, args)
            r = results[mode]
            print(f"[{run_name}] {mode}: {r.step_ms and round(r.step_ms, 1)} ms, {r.peak_gib and round(r.peak_gib, 2)} GiB, "
                  f"{r.note} ({time.time() - started:.0f} s)", flush=True)
        title = (f"{shape.name}: hidden {shape.hidden}, {shape.layers} layers, MLP {shape.intermediate}, "
                 f"batch {shape.batch} x {shape.seq} tokens, checkpointing {'on' if checkpointing else 'off'}")
        table = format_table(title, results, shape)
        agreement = loss_agreement(results)
        tables.append(table + ("\n" + agreement if agreement else ""))
        report[run_name] = {mode: r.__dict__ for mode, r in results.items()}

    print("\n" + environment_line())
    print("\n\n".join(tables))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment_line(), "runs": report}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
