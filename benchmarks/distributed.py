"""Scale-out: tokens/s and peak memory per GPU for 1 -> N GPUs, DDP and FSDP2, LoRA and QLoRA,
with and without activation checkpointing, and full fine-tuning under FSDP2 as the reference.

    PYTHONPATH=src python3 benchmarks/distributed.py --gpus 1,2          # launches torchrun per count
    PYTHONPATH=src python3 benchmarks/distributed.py --gpus 2 --shape 7b --configs lora-fsdp2,full-fsdp2

Each (GPU count) is one torchrun launch; inside it every configuration runs in turn on a fresh
random-init Llama-shaped model (bf16, sdpa), through deltatune's own API: `dt.wrap` (or
`dt.QLoraConfig` for a 4-bit NF4 base), `deltatune.distributed.prepare` (DDP, or FSDP2 per
decoder block + root) and fused AdamW. Per-GPU batch is fixed (`--batch`), so N GPUs process N
times the tokens of one. Step time is the median after warm-up; tokens/s counts all GPUs;
peak memory is the largest over the ranks of torch's peak allocation plus the CUDA-graph pools
(deltatune.kernels.peak_memory_bytes). With --meta-init (on by default for the 70b shape under
FSDP2) each rank builds the model on the meta device and holds only
its shards: `prepare(..., init_weights=random_fill)` shards it, then fills each rank's shards with
random values. Printed: the table, each
configuration's scaling against its own 1-GPU row (when measured in the same call), and the
memory of each PEFT configuration against full fine-tuning's at the same GPU count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from deltatune.kernels.cuda_graph import peak_memory_bytes

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = ("lora-ddp", "lora-fsdp2", "qlora-ddp", "qlora-fsdp2", "full-fsdp2")


def build(shape: str, config: str, checkpointing: bool, device: torch.device):
    """The model, on `device` or, for a meta build, on the meta device (prepare() shards it, then fills it)."""
    import deltatune as dt
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, attn_implementation="sdpa", **SHAPES[shape])
    with device:
        model = LlamaForCausalLM(llama).to(torch.bfloat16)
    method = config.split("-")[0]
    if method == "lora":
        model = dt.wrap(model, dt.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    elif method == "qlora":
        model = dt.wrap(model, dt.QLoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model


def meta_build(args: argparse.Namespace, config: str) -> bool:
    """Whether to build on the meta device: asked for (or the 70B shape, which no GPU holds whole),
    under FSDP2 (DDP keeps a whole copy per GPU)."""
    wanted = args.meta_init == "on" or (args.meta_init == "auto" and args.shape == "70b")
    if wanted and not config.endswith("fsdp2"):
        if args.meta_init == "on":
            raise SystemExit(f"--meta-init on: {config} cannot be built on the meta device (FSDP2 only)")
        return False
    return wanted


def random_fill(model: torch.nn.Module) -> None:
    """init_weights of a meta build: each rank fills its own shards with sane values for timing,
    not the values of a whole build: LoRA B zero, norms one, other weights N(0, 0.02) (seeded by
    rank); 4-bit codes and quantization constants random over their range, scales 1e-3 (the same
    on every rank: those buffers are whole). The rotary tables are left to prepare(), which
    computes them from the config."""
    from deltatune import distributed

    generator = torch.Generator(device=distributed.device()).manual_seed(distributed.rank())
    same = torch.Generator(device=distributed.device()).manual_seed(0)
    for name, param in model.named_parameters():
        local = distributed.local_view(param)
        if not local.is_floating_point():  # 4-bit codes, made parameters to be sharded
            local.random_(torch.iinfo(local.dtype).min, torch.iinfo(local.dtype).max, generator=generator)
        elif ".lora_B." in name:
            local.zero_()
        elif local.dim() >= 2:
            local.normal_(0.0, 0.02, generator=generator)
        else:
            local.fill_(1.0)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name in module._non_persistent_buffers_set:
                continue
            if buffer.is_floating_point():
                buffer.fill_(1e-3)
            else:
                buffer.random_(torch.iinfo(buffer.dtype).min, torch.iinfo(buffer.dtype).max, generator=same)


def measure(args: argparse.Namespace, config: str, checkpointing: bool) -> dict:
    from deltatune import distributed

    device = distributed.device()
    on_meta = meta_build(args, config)
    model = build(args.shape, config, checkpointing, torch.device("meta") if on_meta else device)
    model.train()
    model = distributed.prepare(model, config.split("-")[1], init_weights=random_fill if on_meta else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5 if config.startswith("full") else 1e-4, fused=True)
    generator = torch.Generator(device=device).manual_seed(distributed.rank())
    ids = torch.randint(0, 32000, (args.batch, args.seq), device=device, generator=generator)
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.warmup + args.steps):
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    step = statistics.median(times[args.warmup:])
    peak = torch.tensor([peak_memory_bytes(device)], device=device, dtype=torch.float64)
    if distributed.is_initialized():
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    del model, optimizer, params
    torch.cuda.empty_cache()
    world = distributed.world_size()
    return {"config": config, "checkpointing": checkpointing, "gpus": world, "step_ms": step * 1e3,
            "tokens_per_s": world * args.batch * args.seq / step, "peak_gib": peak.item() / 2**30,
            "loss": float(loss)}


def child(args: argparse.Namespace) -> None:
    from deltatune import distributed

    distributed.init_from_env()
    for config in args.configs.split(","):
        for checkpointing in {"on": [True], "off": [False], "both": [False, True]}[args.checkpointing]:
            try:
                row = measure(args, config, checkpointing)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                row = {"config": config, "checkpointing": checkpointing, "gpus": distributed.world_size(), "oom": True}
            if distributed.is_main():
                print("ROW " + json.dumps(row), flush=True)
    distributed.shutdown()


def table(rows: list[dict]) -> None:
    print(f"{'config':<12} {'ckpt':<5} {'GPUs':>4} {'step ms':>9} {'tokens/s':>11} {'peak GiB/GPU':>13} "
          f"{'scaling':>8} {'mem vs full':>11}")
    for row in rows:
        if row.get("oom"):
            print(f"{row['config']:<12} {str(row['checkpointing']):<5} {row['gpus']:>4}   out of memory")
            continue
        one = next((r for r in rows if r["config"] == row["config"] and r["checkpointing"] == row["checkpointing"]
                    and r["gpus"] == 1 and not r.get("oom")), None)
        full = next((r for r in rows if r["config"] == "full-fsdp2" and r["checkpointing"] == row["checkpointing"]
                     and r["gpus"] == row["gpus"] and not r.get("oom")), None)
        scaling = f"{row['tokens_per_s'] / one['tokens_per_s']:.2f}x" if one else "-"
        memory = f"{row['peak_gib'] / full['peak_gib']:.2f}x" if full else "-"
        print(f"{row['config']:<12} {str(row['checkpointing']):<5} {row['gpus']:>4} {row['step_ms']:>9.1f} "
              f"{row['tokens_per_s']:>11,.0f} {row['peak_gib']:>13.2f} {scaling:>8} {memory:>11}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", default="1,2", help="GPU counts to run, one torchrun launch each")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--checkpointing", choices=["on", "off", "both"], default="both")
    parser.add_argument("--batch", type=int, default=4, help="sequences per GPU")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--meta-init", choices=["auto", "on", "off"], default="auto",
                        help="build on the meta device and fill each rank's shards after sharding (auto: the 70b shape)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, shape {args.shape}, batch {args.batch} x "
          f"{args.seq} per GPU", flush=True)
    rows = []
    forwarded = ["--shape", args.shape, "--configs", args.configs, "--checkpointing", args.checkpointing,
                 "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--meta-init", args.meta_init]
    for count in [int(n) for n in args.gpus.split(",")]:
        if count > torch.cuda.device_count():
            print(f"skipped {count} GPUs: this machine has {torch.cuda.device_count()}")
            continue
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(count),
                   __file__, "--child", *forwarded]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "4"})
        found = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
        rows += found
        if done.returncode:
            print(f"{count} GPUs: torchrun failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    table(rows)


if __name__ == "__main__":
    main()
