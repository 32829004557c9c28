"""Helpers the GPU benchmarks share (run as scripts, so they import this as `_common`)."""

from __future__ import annotations

import bisect
import re
from typing import Callable, Iterator

import torch
from deltatune.kernels.cuda_graph import graph_pool_segments
from torch import nn

_LORA_PARAM = re.compile(r"(layers\.\d+\.\w+\.\w+)\.lora_([AB])\b")


def set_same_lora_init(model: nn.Module, seed: int) -> int:
    """Give every adapter the same A (seeded by its module path) and B = 0, whatever the wrapper,
    so deltatune and peft start from identical adapters and their losses can be compared."""
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            match = _LORA_PARAM.search(name)
            if not match or not param.requires_grad:
                continue
            if match.group(2) == "B":
                param.zero_()
            else:
                gen = torch.Generator(device="cpu").manual_seed(seed + sum(map(ord, match.group(1))) * 7919)
                bound = param.shape[1] ** -0.5
                param.copy_((torch.rand(param.shape, generator=gen) * 2 - 1) * bound)
            count += 1
    return count


def unsloth_lora_model(build: Callable[[], nn.Module], seq: int, targets: list[str], rank: int, alpha: int,
                       load_in_4bit: bool, checkpointing: bool) -> nn.Module:
    """unsloth's LoRA model over the weights `build()` makes, saved to a folder and loaded by
    unsloth's own loader (what its users do); with load_in_4bit, quantized there as NF4 with double
    quantization. unsloth must have been imported before transformers (the caller's main does it)."""
    import tempfile

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from unsloth import FastLanguageModel

    folder = tempfile.mkdtemp(prefix="unsloth-model-")
    model = build()
    model.save_pretrained(folder)
    vocab, dtype = {f"t{i}": i for i in range(model.config.vocab_size)}, next(model.parameters()).dtype
    del model  # only the folder is read from here on
    torch.cuda.empty_cache()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        unk_token="t0", pad_token="t1", eos_token="t2", bos_token="t3")
    tokenizer.save_pretrained(folder)
    loaded, _ = FastLanguageModel.from_pretrained(model_name=folder, dtype=dtype, load_in_4bit=load_in_4bit,
                                                  max_seq_length=seq, local_files_only=True)
    loaded = FastLanguageModel.get_peft_model(loaded, r=rank, lora_alpha=alpha, lora_dropout=0, target_modules=targets,
                                              bias="none", use_gradient_checkpointing="unsloth" if checkpointing else False)
    return loaded.train()


def count_graph_nodes(tensor: torch.Tensor, name_prefix: str) -> int:
    """Autograd nodes behind `tensor` whose class name (leading underscores dropped) starts with
    `name_prefix`: proof of which fused paths a step really took."""
    seen, stack, count = set(), [tensor.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__.lstrip("_").startswith(name_prefix)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return count


def profile_steps(model, loss_fn, optimizer, input_ids, path: str, title: str, rows: int = 45) -> None:
    """Append a CUDA-time table of two training steps to `path` (optimizer None: no update)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            loss = loss_fn(model, input_ids)
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    with open(path, "a") as f:
        f.write(f"\n===== {title} (2 steps)\n")
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90))


def train_step(model, loss_fn, optimizer, input_ids: torch.Tensor) -> torch.Tensor:
    """One training step: loss, backward, and the optimizer's step (optimizer None: no update)."""
    loss = loss_fn(model, input_ids)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss


def _allocation_site(frames: list[dict]) -> str:
    """The innermost Python frame outside torch itself: the code that asked for the memory."""
    for frame in frames:
        name = frame.get("filename", "")
        if name and "/torch/" not in name and not name.startswith("??"):
            return f"{'/'.join(name.split('/')[-2:])}:{frame.get('line')} {frame.get('name')}"
    return "(inside torch: autograd engine or optimizer)"


class DeviceMemoryTrace:
    """The allocator's trace of a stretch of CUDA work (torch.cuda.memory._record_memory_history),
    and from it the exact peak of device memory in use: the ordinary pool's allocated bytes plus
    every segment CUDA-graph pools hold, free or not (a graph replay writes its temporaries there
    without asking the allocator, so max_memory_allocated never sees them)."""

    def __init__(self, stacks: bool = False) -> None:
        self.stacks = stacks

    def __enter__(self) -> "DeviceMemoryTrace":
        torch.cuda.synchronize()
        self.private_before = graph_pool_segments()
        allocated_private = sum(allocated for _, allocated in self.private_before.values())
        self.allocated_before = torch.cuda.memory_allocated() - allocated_private
        options = {"context": "all", "stacks": "python"} if self.stacks else {"context": None}
        torch.cuda.memory._record_memory_history(max_entries=4_000_000, **options)
        return self

    def __exit__(self, *exc) -> None:
        try:
            torch.cuda.synchronize()
            self.trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        self.private = {**self.private_before, **graph_pool_segments()}

    def _in_private(self) -> Callable[[int], bool]:
        starts = sorted(self.private)
        ends = [start + self.private[start][0] for start in starts]

        def inside(address: int) -> bool:
            i = bisect.bisect_right(starts, address) - 1
            return i >= 0 and address < ends[i]

        return inside

    def usage(self) -> Iterator[tuple[int, int, dict]]:
        """(event index, bytes in use after it, the event) through the trace."""
        inside = self._in_private()
        in_use = self.allocated_before + sum(size for size, _ in self.private_before.values())
        for index, event in enumerate(self.trace):
            action, address, size = event["action"], event.get("addr", -1), event.get("size", 0)
            if action in ("segment_alloc", "segment_free") and address in self.private:
                in_use += size if action == "segment_alloc" else -size
            elif action in ("alloc", "free_completed") and not inside(address):
                in_use += size if action == "alloc" else -size
            yield index, in_use, event

    def peak(self) -> tuple[int, int]:
        """(bytes in use at the peak, index of the event that reached it; -1: before the trace)."""
        best, best_at = self.allocated_before + sum(size for size, _ in self.private_before.values()), -1
        for index, in_use, _ in self.usage():
            if in_use > best:
                best, best_at = in_use, index
        return best, best_at


def memory_at_peak(model, loss_fn, optimizer, input_ids, path: str, title: str, rows: int = 25, steps: int = 1) -> None:
    """Append to `path` what is in use at the peak of `steps` training steps, by allocation site.

    Memory held before the step is one line, CUDA-graph pools one line, everything else allocated
    during the step is grouped by the innermost Python frame outside torch.
    """
    try:
        with DeviceMemoryTrace(stacks=True) as recorded:
            for _ in range(steps):
                train_step(model, loss_fn, optimizer, input_ids)
    except SystemError as error:
        # seen on torch 2.11 in an eager checkpointed QLoRA step: recording Python stacks while
        # autograd's thread recomputes a block; the diagnostic is lost, not the benchmark
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        with open(path, "a") as f:
            f.write(f"\n===== {title}: not recorded ({type(error).__name__}: {error})\n")
        return
    peak, peak_at = recorded.peak()
    inside = recorded._in_private()
    live: dict[int, dict] = {}
    held_before = recorded.allocated_before
    for index, _, event in recorded.usage():
        if index > peak_at:
            break
        if event["action"] == "alloc" and not inside(event["addr"]):
            live[event["addr"]] = event
        elif event["action"] == "free_completed" and not inside(event["addr"]):
            if live.pop(event["addr"], None) is None:
                held_before -= event["size"]
    sites: dict[str, list[int]] = {}
    for event in live.values():
        entry = sites.setdefault(_allocation_site(event.get("frames", [])), [0, 0])
        entry[0] += event["size"]
        entry[1] += 1
    mib = 2**20
    pools = peak - held_before - sum(size for size, _ in sites.values())
    lines = [f"\n===== {title}: {peak / mib:,.0f} MiB in use at the step's peak (event {peak_at} of {len(recorded.trace)})",
             f"{held_before / mib:>10,.1f} MiB  held since before the step (weights, optimizer state, graph buffers), of which:",
             *(f"{'':>10}  {size / mib:>10,.1f} MiB  {what}" for what, size in held_parts(model, optimizer, held_before)),
             f"{pools / mib:>10,.1f} MiB  CUDA-graph pools (graph temporaries)"]
    for site, (size, count) in sorted(sites.items(), key=lambda item: -item[1][0])[:rows]:
        lines.append(f"{size / mib:>10,.1f} MiB  {count:>5} x  {site}")
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


def held_parts(model, optimizer, held: int) -> list[tuple[str, int]]:
    """What a training step finds allocated on the device, by kind (each storage counted once):
    the model's trainable and frozen parameters and its buffers (4-bit codes live there), the
    optimizer's state, gradients, the shared buffers of captured block graphs, and the rest."""
    from deltatune.kernels.patch import _model_graphs

    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.is_cuda and tensor.untyped_storage().data_ptr() not in seen:
                seen.add(tensor.untyped_storage().data_ptr())
                total += tensor.untyped_storage().nbytes()
        return total

    parameters = list(model.parameters())
    graphs = _model_graphs(model)
    parts = [
        ("trainable parameters", size(p for p in parameters if p.requires_grad)),
        ("frozen parameters", size(p for p in parameters if not p.requires_grad)),
        ("buffers", size(model.buffers())),
        ("optimizer state", size(v for state in (optimizer.state.values() if optimizer is not None else ())
                                 for v in state.values())),
        ("gradients", size(p.grad for p in parameters if p.grad is not None)),
        ("block-graph buffers", size(t for g in graphs for t in (*g.buffers.values(), *g.warmed.values()))),
    ]
    return parts + [("other (workspaces, caches, allocator rounding)", held - sum(n for _, n in parts))]


def settled_warmup(steps: int, warmup: int) -> tuple[int, int]:
    """(steps, warmup) with the warm-up covering the steps in which deltatune's block graphs may
    still measure and capture (a reading against capturing is taken again in the next steps:
    kernels.block_graphs.MEASUREMENTS), the timed steps as many as asked."""
    from deltatune.kernels import block_graphs

    floor = block_graphs.CAPTURE_ON_SIGHTING + block_graphs.MEASUREMENTS - 1
    if warmup >= floor:
        return steps, warmup
    print(f"(warm-up raised from {warmup} to {floor} steps: the block graphs' measurement steps)")
    return steps + floor - warmup, floor


class FirstStepsPeak:
    """The exact peak (DeviceMemoryTrace) over a row's first `count` training steps, traced as they
    run: what a fresh run of that shape needs, the block graphs' measurement, warm-up and capture
    included. (Releasing the graphs after the timing and capturing again, as this script did
    before, read 2,631 MiB for the 1.1B QLoRA step at batch 4 where a fresh run's first four steps
    peak at 2,138: lent H200, 2026-12-03, benchmarks/graph_memory_census.py 1b 4 peak.) Call
    `started(i)` before and `done(i)` after step i; `peak` is None until the last traced step is done."""

    def __init__(self, count: int, enabled: bool = True) -> None:
        self.count, self.enabled = count, enabled and count > 0 and torch.cuda.is_available()
        self.trace: DeviceMemoryTrace | None = None
        self.peak: int | None = None

    def started(self, index: int) -> None:
        if self.enabled and index == 0:
            self.trace = DeviceMemoryTrace().__enter__()

    def done(self, index: int) -> None:
        if self.trace is not None and index == self.count - 1:
            self.trace.__exit__(None, None, None)
            self.peak, self.trace = self.trace.peak()[0], None


def peak_of_steps(model, loss_fn, optimizer, input_ids, steps: int) -> int:
    """Exact peak device memory (DeviceMemoryTrace, graph pools included) over `steps` more training
    steps as the model stands (captured graphs replayed)."""
    with DeviceMemoryTrace() as recorded:
        for _ in range(steps):
            train_step(model, loss_fn, optimizer, input_ids)
    return recorded.peak()[0]
