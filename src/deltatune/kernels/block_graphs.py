"""Checkpointed decoder blocks replayed as CUDA graphs while training.

A LoRA or QLoRA step on a GPU launches a few hundred kernels per decoder block, and with gradient
checkpointing each block runs forward twice. Launching them from Python takes longer than running
them on most hosts (benchmarks/qlora_throughput.py prints "host ms" next to the step time), so the
GPU waits on the CPU and the speed follows the host. Here each block, under checkpointing, becomes
two CUDA graphs:

- forward graph:  the block under no_grad (nothing kept but its inputs, as checkpointing keeps);
- backward graph: the block again under autograd, then torch.autograd.grad of its output.

Outside, the block is one autograd node (`_ReplayBlock`) whose forward copies the inputs into the
graph's input buffers and replays the forward graph, and whose backward copies the saved inputs
and the output's gradient in and replays the backward graph: the same arithmetic as the eager
checkpointed block, with ~10 launches per block instead of hundreds.

Every buffer a graph reads or writes outside its own temporaries is shared by all blocks of the
model and refilled before each replay (the saved inputs come from the node, as checkpointing keeps
them), so graphs may replay in any order: two forward passes before one backward and gradient
accumulation stay exact. Temporaries live in one memory pool for the whole model, and are kept
small for it: the recomputation writes gradients over the activations it no longer needs
(kernels/recompute.py), 4-bit weights are dequantized in row chunks while capturing
(quant/linear.py), and only the first block of each kind and shape is warmed up eagerly before
its capture (a warm-up beside a filled pool was a capturing step's peak). The node
keeps its big input (the hidden states) in pinned host memory until backward (_HostCheckpoints;
DELTATUNE_OFFLOAD_CHECKPOINTS=0 keeps it on the GPU). With DELTATUNE_OFFLOAD_CHECKPOINTS=1 the
blocks that are not replayed do the same through an eager node (_CheckpointedBlock); by default
so do the blocks of a shape waiting for its capture or measured not to pay for one.

A block replays only where that is known to give the eager result, and runs its own code
otherwise (DeltaModel's fused path decides which blocks get this, see kernels/patch.py):
training, grad enabled, checkpointing on, CUDA, no module hooks in the block (FSDP2's are
hooks) and no global ones, no saved-tensor hooks, no dropout with p > 0, not inside a capture or
torch.compile, every adapter layer in the block able to say what its forward depends on
(DeltaLayer.graph_key; a mixed batch says it cannot), and every argument a tensor, a tuple of
tensors or a plain constant. Shapes must repeat: a signature (shapes, dtypes, constants, adapter
state, which tensors train, where every parameter lives) is captured the second time it is seen,
at most MAX_SIGNATURES per model; others run eagerly. The graphs' temporaries stay reserved in
their pool for the whole run, so a signature is captured only where replaying was measured to be
at least MIN_SPEEDUP faster (replay_speedup, once per signature): where the GPU already sets the
pace, the graphs would cost memory and buy nothing. DELTATUNE_BLOCK_GRAPHS=1 captures without
measuring, DELTATUNE_BLOCK_GRAPHS=0 turns it off.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
import weakref
from typing import Any, Callable, Hashable

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .. import hf_compat
from .cuda_graph import warming_up_for_capture
from .recompute import differentiated_once

logger = logging.getLogger(__name__)

__all__ = ["BlockGraphError", "BlockGraphs", "block_graphs_allowed", "block_graphs_forced", "replay_speedup"]

# Distinct signatures captured per model: a run whose shapes keep changing (dynamic padding)
# stays eager after this many, instead of capturing (and holding) a graph pair per shape.
MAX_SIGNATURES = 8
# Captures kept per block and signature for different adapter states (set_adapter back and forth).
STATES_PER_SIGNATURE = 4
# A signature is captured the second time it is seen: the first call runs eagerly, compiling
# Triton kernels and initialising cuBLAS before anything is recorded.
CAPTURE_ON_SIGHTING = 2

_CONSTANT_TYPES = (type(None), bool, int, float, str)


# A shape is captured only where replaying it is expected to make the block at least this much
# faster: where the GPU outruns the host. Where the GPU already sets the pace (big batches), the
# graphs' memory pool would cost memory and buy nothing: on the lent H200 the 7.2B QLoRA step at
# batch 4 took 695.3 ms eager (inputs in host memory) and 748.7 ms graphed, at 5.95 against
# 7.37 GiB (2026-12-03).
MIN_SPEEDUP = 1.15
# A reading against capturing is taken again as the same block comes round in the next steps, up to
# this many readings, and the best decides: on the lent H200 one 1.1B QLoRA process read 1.08x where
# three others read 1.27-1.59x (2026-12-03), and a wrong "no" costs that step a quarter of its speed
# (161.5 against 129.9 ms), a wrong "yes" only the graphs' pool.
MEASUREMENTS = 3


def block_graphs_allowed() -> bool:
    """False when DELTATUNE_BLOCK_GRAPHS=0 (A/B timing, or ruling the graphs out)."""
    return os.environ.get("DELTATUNE_BLOCK_GRAPHS", "auto").strip() != "0"


def block_graphs_forced() -> bool:
    """True when DELTATUNE_BLOCK_GRAPHS=1: capture every repeating shape without timing it first."""
    return os.environ.get("DELTATUNE_BLOCK_GRAPHS", "auto").strip() == "1"


def replay_speedup(run: Callable[[], None], repeats: int = 5) -> float:
    """How much faster `run` (CUDA work launched from Python) would go replayed as a graph.

    In a stream of such calls (the blocks of a step) each costs whichever is longer of the host's
    launching and the GPU's running; a replay leaves only the GPU's part. Both are measured at
    once by holding the stream in a spin kernel while the host queues the work: the host's time
    is its launching alone, and the GPU then runs the queue back to back. Of `repeats` readings,
    the GPU's best (its own time is steady) against the host's median: the host's best reading was
    seen to swing a 1.1B QLoRA block's verdict between 1.03x and 1.48x from one process to the
    next on the same machine, while the step it stands for meets the host's usual pace.
    Synchronises the device; inf where the host could not queue the work within the spin kernel
    (a host that slow is what graphs are for).
    """
    sleep = getattr(torch.cuda, "_sleep", None)
    run()  # lazy initialisation (cuBLAS handles, autotuning) is not what a replay would save
    torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    torch.cuda.synchronize()
    if sleep is None:
        return math.inf
    cycles = int((time.perf_counter() - started) * 4e9)  # ~2x the call at H100/H200 clocks (~2 GHz)
    host_readings: list[float] = []
    gpu_s = math.inf
    for _ in range(repeats + 3):  # a few tries more, for spin kernels found too short
        if len(host_readings) == repeats:
            break
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sleep(cycles)
        begin.record()
        queued = time.perf_counter()
        run()
        queued = time.perf_counter() - queued
        end.record()
        held = not begin.query()  # still spinning when the host finished queueing: back to back
        torch.cuda.synchronize()
        if not held:
            cycles *= 4
            continue
        host_readings.append(queued)
        gpu_s = min(gpu_s, begin.elapsed_time(end) / 1e3)
    if not host_readings:
        return math.inf
    return max(statistics.median(host_readings), gpu_s) / max(gpu_s, 1e-9)


class BlockGraphError(RuntimeError):
    """A block passed every check and its warm-up, yet CUDA refused to capture it."""


# ----------------------------------------------------------------------------- arguments
def _kind(signature: tuple) -> tuple:
    """A signature without which of its tensors require grad. The first block's hidden states come
    from a frozen embedding and need no gradient, the next blocks' do: one kind of block, measured
    and warmed up once (_widened), since a second measurement or warm-up would run eagerly beside
    the pool the first block's graphs filled, and be the run's peak."""
    layout, *rest = signature
    return (tuple(entry[:5] if entry[1] == "t" else entry for entry in layout), *rest)


def _widened(tensors: list[torch.Tensor], differentiable: list[int], output_like: torch.Tensor) -> list[int]:
    """The inputs a block's warm-up and measurement differentiate: those that require grad, and any
    shaped like its output (the hidden states), so that they stand for every block of the kind."""
    return [i for i, t in enumerate(tensors)
            if i in differentiable or (t.shape == output_like.shape and t.dtype == output_like.dtype)]


def _flatten(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], tuple] | None:
    """The tensors among a block's arguments and a hashable description of the rest, or None
    where an argument is neither a tensor, a tuple/list of tensors nor a constant."""
    tensors: list[torch.Tensor] = []
    layout: list[Hashable] = []

    def add_tensor(name: Hashable, value: torch.Tensor) -> None:
        tensors.append(value)
        layout.append((name, "t", tuple(value.shape), value.dtype, value.device, value.requires_grad))

    def add(name: Hashable, value: Any) -> bool:
        if isinstance(value, torch.Tensor):
            add_tensor(name, value)
        elif isinstance(value, _CONSTANT_TYPES):
            layout.append((name, "c", value))
        elif isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
            layout.append((name, type(value).__name__, len(value)))
            for v in value:
                add_tensor(name, v)
        else:
            return False
        return True

    for index, value in enumerate(args):
        if not add(index, value):
            return None
    for name, value in kwargs.items():
        if not add(name, value):
            return None
    return tensors, tuple(layout)


class _Slot:
    """Where a tensor argument was, in a call's skeleton (which keeps no tensor alive)."""


_SLOT = _Slot()


def _unflatten(args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> tuple[tuple, dict]:
    """args and kwargs (or their skeleton) with their tensors replaced, in _flatten's order, by `tensors`."""
    supply = iter(tensors)

    def swap(value: Any) -> Any:
        if isinstance(value, (torch.Tensor, _Slot)):
            return next(supply)
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], (torch.Tensor, _Slot)):
            return type(value)(next(supply) for _ in value)
        return value

    new_args = tuple(swap(v) for v in args)
    return new_args, {name: swap(v) for name, v in kwargs.items()}


def _skeleton(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """args and kwargs with every tensor replaced by _SLOT: the call's constants, for a later _unflatten."""
    n = len(_flatten(args, kwargs)[0])
    return _unflatten(args, kwargs, [_SLOT] * n)


# ----------------------------------------------------------------------------- the block's state
def _hooks_present(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def _global_hooks_present() -> bool:
    from torch.nn.modules import module as module_file

    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")
    return any(getattr(module_file, name, None) for name in names)


def _dropout_active(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0 and module.training
    return module.training and hf_compat.attention_dropout(module) > 0  # attention keeps a float


def _block_state(block: nn.Module) -> tuple[Hashable, list[nn.Parameter]] | None:
    """What the block's forward depends on besides its arguments, and its trainable parameters;
    None where it cannot be replayed (hooks, dropout, an adapter layer that cannot say)."""
    from ..layer import DeltaLayer

    adapter_keys: list[Hashable] = []
    for module in block.modules():
        if _hooks_present(module) or _dropout_active(module):
            return None
        if isinstance(module, DeltaLayer):
            key = module.graph_key()
            if key is None:
                return None
            adapter_keys.append(key)
    trainable: list[nn.Parameter] = []
    places: list[Hashable] = []
    for tensor in [*block.parameters(), *block.buffers()]:
        places.append((tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)))
        if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
            trainable.append(tensor)
    if len({p.dtype for p in trainable}) > 1:
        return None  # the graphs hand back all gradients in one buffer of one dtype
    # where every tensor lives: a replaced or moved parameter needs a new capture
    state = (tuple(adapter_keys), tuple(places), tuple(id(p) for p in trainable))
    return state, trainable


# ----------------------------------------------------------------------------- one captured pair
class _Captured:
    """The forward and backward graphs of one block for one signature, and where they read and write."""

    def __init__(self, owner: "BlockGraphs", block: nn.Module, call_args: tuple, call_kwargs: dict,
                 tensors: list[torch.Tensor], trainable: list[nn.Parameter],
                 warmed: tuple[torch.Tensor, frozenset[int]] | None) -> None:
        # weak: the model's BlockGraphs owns this capture, and a capture must not keep it (and
        # its graphs' memory) alive after the model is gone
        self.owner = weakref.proxy(owner)
        self.trainable = trainable
        self.differentiable = [i for i, t in enumerate(tensors) if t.requires_grad]
        self.output_slot: int | None = None  # the input whose buffer the output is written into (_shape_buffers)
        # shared by every block and signature of the model (filled before each replay)
        self.inputs = [owner.buffer(("in", i), t) for i, t in enumerate(tensors)]
        self.fill(tuple(tensors))
        self.param_dtype = trainable[0].dtype if trainable else torch.float32
        self.grad_sizes = [p.numel() for p in trainable]
        if warmed is not None and not set(self.differentiable) <= warmed[1]:
            warmed = None  # that warm-up did not differentiate an input this block does
        self.warmed_for = warmed[1] if warmed is not None else frozenset()
        self._capture(block, call_args, call_kwargs, warmed[0] if warmed is not None else None)

    def _forward_body(self, block, call_args, call_kwargs) -> None:
        with torch.no_grad():
            out = _run_block(block, call_args, call_kwargs, self.inputs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{type(block).__name__} returns {type(out).__name__}, not one tensor")
        self.output.copy_(out)

    def _backward_body(self, block, call_args, call_kwargs, differentiable: list[int] | None = None) -> None:
        differentiable = self.differentiable if differentiable is None else differentiable
        grads = _block_gradients(block, call_args, call_kwargs, self.inputs, differentiable, self.trainable,
                                 self.grad_output)
        # the output's gradient buffer last: another input's gradient may still be a view of it
        for index, grad in sorted(zip(differentiable, grads), key=lambda pair: pair[0] == self.output_slot):
            target = self.input_grads.get(index)
            if target is not None:  # (a warm-up differentiates more inputs than the capture keeps)
                target.zero_() if grad is None else target.copy_(grad)
        param_grads = grads[len(differentiable):]
        if param_grads:
            flat = [torch.zeros_like(p).view(-1) if g is None else g.reshape(-1).to(self.param_dtype)
                    for g, p in zip(param_grads, self.trainable)]
            torch.cat(flat, out=self.flat_grads)

    def _capture(self, block: nn.Module, call_args: tuple, call_kwargs: dict, output_like: torch.Tensor | None) -> None:
        """Warm up (unless a block of the same kind was: output_like is its output) and record."""
        stream = self.owner.stream
        stream.wait_stream(torch.cuda.current_stream())
        if output_like is not None:
            # An eager run here would hold a block's temporaries on top of the pool the earlier
            # captures filled: the capturing step's peak, 0.6 GiB above a replayed step's on a 1.1B
            # QLoRA step at 8k tokens. What the warm-up prepares is shared with that block.
            self._shape_buffers(output_like)
        else:
            # The warm-up refuses host synchronisation (.item(), data-dependent shapes), which would
            # break the capture: a block that does it is refused here, before anything is recorded.
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                self._warm_up(block, call_args, call_kwargs, stream)
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        torch.cuda.current_stream().wait_stream(stream)
        self.forward_graph = self._record(stream, self._forward_body, block, call_args, call_kwargs)
        self.backward_graph = self._record(stream, self._backward_body, block, call_args, call_kwargs)

    def _record(self, stream, body, block, call_args, call_kwargs) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.owner.pool, stream=stream):
                body(block, call_args, call_kwargs)
        except Exception as error:
            # A capture that failed half-way can leave CUDA's random-number state mid-capture:
            # carrying on eagerly is not known to be safe, so stop with the way out.
            raise BlockGraphError(
                f"Capturing {type(block).__name__} as a CUDA graph failed ({type(error).__name__}: {error}). "
                f"Set DELTATUNE_BLOCK_GRAPHS=0 to train with the blocks' own code."
            ) from error
        return graph

    def _warm_up(self, block: nn.Module, call_args: tuple, call_kwargs: dict, stream: torch.cuda.Stream) -> None:
        """One eager run of both bodies on the capture stream (lazy initialisation, Triton's
        compilation, cuBLAS's workspace for that stream), which also shapes the output buffers."""
        with torch.cuda.stream(stream), warming_up_for_capture():
            with torch.no_grad():
                probe = _run_block(block, call_args, call_kwargs, self.inputs)
            if not isinstance(probe, torch.Tensor):
                raise TypeError(f"{type(block).__name__} returns {type(probe).__name__}, not one tensor")
            self._shape_buffers(probe)
            wide = _widened(self.inputs, self.differentiable, probe)
            del probe
            self._forward_body(block, call_args, call_kwargs)
            self._backward_body(block, call_args, call_kwargs, wide)
        self.warmed_for = frozenset(wide)

    def _shape_buffers(self, output_like: torch.Tensor) -> None:
        """The shared buffers the graphs write: the output, its gradient, the inputs' and the
        parameters' gradients."""
        owner = self.owner
        # The forward writes its output last, when the block has read its input for good, and the
        # backward the input's gradient once it has read the output's: so the output goes into the
        # input's buffer where they have one shape (the hidden states), and that input's gradient
        # over the output's gradient. Two hidden-state-sized buffers fewer held for the whole run.
        self.output_slot = next((i for i, t in enumerate(self.inputs)
                                 if t.shape == output_like.shape and t.dtype == output_like.dtype), None)
        if self.output_slot is None:
            self.output = owner.buffer(("out",), output_like)
        else:
            self.output = self.inputs[self.output_slot]
            owner.last_copied.pop(id(self.output), None)  # the warm-up's forward writes over it
        self.grad_output = owner.buffer(("grad_out",), output_like)
        self.grad_output.zero_()
        self.input_grads = {i: self.grad_output if i == self.output_slot else owner.buffer(("grad_in", i), self.inputs[i])
                            for i in self.differentiable}
        total = sum(self.grad_sizes)
        self.flat_grads = owner.buffer(("grads",), torch.empty(total, dtype=self.param_dtype, device=output_like.device))

    # -- replay ---------------------------------------------------------------------------------
    def fill(self, tensors: tuple[torch.Tensor, ...]) -> None:
        for index, (buffer, tensor) in enumerate(zip(self.inputs, tensors)):
            if index == self.output_slot:
                # the forward replay writes its output over this buffer: never "already holds it"
                buffer.copy_(tensor)
                self.owner.last_copied.pop(id(buffer), None)
            else:
                self.owner.copy_in(buffer, tensor)

    def forward(self, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        self.fill(tensors)
        self.forward_graph.replay()
        return self.output.clone()

    def backward(self, tensors: tuple, grad_output: torch.Tensor, filled: bool = False) -> tuple:
        """The gradients of `tensors` (one per input, None where not differentiable) and of the
        trainable parameters; `filled`: the input buffers hold them already (fill)."""
        if not filled:
            self.fill(tensors)
        self.grad_output.copy_(grad_output)
        self.backward_graph.replay()
        input_grads = [self.input_grads[i].clone() if i in self.input_grads else None for i in range(len(tensors))]
        if not self.trainable:
            return (*input_grads,)
        # one fresh tensor for all the parameters' gradients, handed out as views (autograd keeps
        # them as .grad or adds them in); the shared buffer is refilled by the next replay
        flat = self.flat_grads.clone()
        param_grads, start = [], 0
        for size, param in zip(self.grad_sizes, self.trainable):
            param_grads.append(flat[start : start + size].view_as(param))
            start += size
        return (*input_grads, *param_grads)


@contextlib.contextmanager
def _parameters_replaced(block: nn.Module, names: list[str], tensors: list[torch.Tensor]):
    """The block's parameters `names` read as `tensors` inside the context (restored after)."""
    places = []
    for name, tensor in zip(names, tensors):
        owner_name, _, leaf = name.rpartition(".")
        owner = block.get_submodule(owner_name)
        places.append((owner, leaf, owner._parameters[leaf]))
        owner._parameters[leaf] = tensor
    try:
        yield
    finally:
        for owner, leaf, original in places:
            owner._parameters[leaf] = original


def _run_block(block: nn.Module, call_args: tuple, call_kwargs: dict, tensors: list[torch.Tensor]) -> Any:
    args, kwargs = _unflatten(call_args, call_kwargs, tensors)
    return _call_unchecked(block, args, kwargs)


def _block_gradients(block: nn.Module, call_args: tuple, call_kwargs: dict, inputs: list[torch.Tensor],
                     differentiable: list[int], trainable: list[nn.Parameter], grad_output: torch.Tensor) -> tuple:
    """The block recomputed under autograd and differentiated: the gradients of the inputs at
    `differentiable`, then of the trainable parameters (None where unused)."""
    with torch.enable_grad():
        tensors = [t.detach().requires_grad_(i in differentiable) for i, t in enumerate(inputs)]
        # Differentiate with respect to stand-ins of the parameters (same storage, new leaves):
        # the parameters' own gradient accumulators were made on the training stream, and
        # autograd would wait on that stream from inside the capture, which breaks it.
        stand_ins = [p.detach().requires_grad_() for p in trainable]
        names = {id(p): name for name, p in block.named_parameters()}
        # this graph is differentiated once, just below: its nodes may reuse their saved activations
        with _parameters_replaced(block, [names[id(p)] for p in trainable], stand_ins), differentiated_once():
            out = _run_block(block, call_args, call_kwargs, tensors)
        wrt = [tensors[i] for i in differentiable] + stand_ins
        return torch.autograd.grad(out, wrt, grad_output, allow_unused=True)


def _eager_checkpointed_step(block: nn.Module, call_args: tuple, call_kwargs: dict, tensors: list[torch.Tensor],
                             trainable: list[nn.Parameter]) -> None:
    """What a checkpointed block of this kind costs eagerly: its forward under no_grad, then its
    recompute and backward, its hidden states differentiated as any but the first block's are
    (_widened; gradients thrown away; nothing in the model changes)."""
    with torch.no_grad():
        out = _run_block(block, call_args, call_kwargs, tensors)
    differentiable = _widened(tensors, [i for i, t in enumerate(tensors) if t.requires_grad], out)
    _block_gradients(block, call_args, call_kwargs, tensors, differentiable, trainable, torch.ones_like(out))


def _call_unchecked(block: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The block's own forward with transformers' checkpointing off (the graphs do the recomputing)."""
    with hf_compat.block_checkpointing_off(block):
        return block.forward(*args, **kwargs)


# ----------------------------------------------------------------------------- inputs kept on the host
# A block input at least this big (bytes) waits for backward in pinned host memory (the hidden
# states; the rotary tables and position ids stay on the GPU).
OFFLOAD_MIN_BYTES = 1 << 20


def offload_setting() -> str:
    """DELTATUNE_OFFLOAD_CHECKPOINTS: "auto" (default: the blocks replayed as CUDA graphs keep
    their big input in pinned host memory, and so do the eager blocks of a shape that waits for its
    capture or was measured not to pay for one: BlockGraphs._offloads_eagerly), "1" (every
    checkpointed block that the graphs could take, replayed or run eagerly by _CheckpointedBlock)
    or "0" (none)."""
    value = os.environ.get("DELTATUNE_OFFLOAD_CHECKPOINTS", "auto").strip().lower()
    return value if value in ("0", "1") else "auto"


def offload_allowed(replaying: bool = False) -> bool:
    """Whether a block's checkpointed input waits in host memory as a rule: a replayed block's
    unless the setting is "0", an eager one's where it is "1".

    Eager blocks are not offloaded as a rule because _CheckpointedBlock's Python recomputation
    costs host time that transformers' checkpointing does not, and a block runs eagerly where the
    host may be short of time; with graphs on, the blocks whose pace was measured to be the GPU's
    are offloaded all the same (BlockGraphs._offloads_eagerly)."""
    setting = offload_setting()
    return setting == "1" or (replaying and setting == "auto")


class _PinnedSlot:
    """One reusable pinned host buffer: taken by one block input from its forward until its copy
    back to the GPU is queued, free again once that copy has run (`done`)."""

    __slots__ = ("tensor", "owner", "done")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.owner: weakref.ref | None = None  # the _HostCopy holding it
        self.done: torch.cuda.Event | None = None  # the last copy that reads or writes it

    def free(self) -> bool:
        return (self.owner is None or self.owner() is None) and (self.done is None or self.done.query())


class _HostCopy:
    """One block input between forward and backward: in pinned host memory, and on the GPU again
    once fetched (ahead of its backward, by the backward of the block after it)."""

    __slots__ = ("slot", "device", "on_gpu", "ready", "written", "source", "version", "previous", "__weakref__")

    def __init__(self, slot: _PinnedSlot, source: torch.Tensor, written: torch.cuda.Event) -> None:
        self.slot, self.device, self.written = slot, source.device, written
        self.on_gpu: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        self.previous: weakref.ref | None = None  # the copy forward made before this one, once fetched
        # the original, to catch an in-place change after the copy was queued (autograd would)
        self.source, self.version = weakref.ref(source), source._version


class _HostCheckpoints:
    """Moves checkpointed block inputs to the host during the block's forward and back during the
    backward of the block after it, on a side stream, so the copies overlap the blocks' compute:
    what unsloth's checkpointing does with the hidden states, here for the inputs the blocks'
    autograd nodes would keep.

    No memory crosses streams: the GPU copy of a fetched input is allocated on the training
    stream, and the training stream waits for each copy to the host before the block's input
    can be freed. (Memory handed between streams with record_stream is only reusable once the
    host has seen the other stream's work finish; with the host a whole backward ahead of the GPU,
    as under CUDA graphs, every fetched input stayed allocated: 32 x 16 MiB at the 7.2B step's
    peak.) The pinned buffers are this object's own and reused from step to step, since pinning
    new memory takes milliseconds and torch's host allocator pinned anew whenever the host was
    ahead (66 buffers in eight 7.2B steps, 458 ms)."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device=device)
        self.order: list[weakref.ref] = []  # host copies in forward order: backward fetches the one before
        self.pinned: dict[tuple, list[_PinnedSlot]] = {}
        self.copies = 0

    def _slot(self, like: torch.Tensor) -> _PinnedSlot:
        slots = self.pinned.setdefault((tuple(like.shape), like.dtype), [])
        for slot in slots:
            if slot.free():
                return slot
        slots.append(_PinnedSlot(torch.empty(like.shape, dtype=like.dtype, pin_memory=True)))
        return slots[-1]

    @property
    def pinned_bytes(self) -> int:
        return sum(s.tensor.numel() * s.tensor.element_size() for slots in self.pinned.values() for s in slots)

    def offload(self, tensor: torch.Tensor) -> _HostCopy:
        """Queue `tensor`'s copy to the host beside the work queued next; settle() before the
        tensor may be freed."""
        slot = self._slot(tensor)
        self.stream.wait_stream(torch.cuda.current_stream())  # the tensor is written by then
        written = torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            slot.tensor.copy_(tensor, non_blocking=True)
            written.record(self.stream)
        copy = _HostCopy(slot, tensor, written)
        slot.owner, slot.done = weakref.ref(copy), written
        self.copies += 1
        self.order = [r for r in self.order if r() is not None]
        self.order.append(weakref.ref(copy))
        return copy

    @staticmethod
    def settle(copy: _HostCopy) -> None:
        """The training stream waits for the copy to the host (queued before the block's work),
        so the input's memory is reused only after it was read."""
        torch.cuda.current_stream().wait_event(copy.written)

    def _prefetch(self, copy: _HostCopy) -> None:
        slot = copy.slot
        if slot is None:
            raise BlockGraphError("A block's input kept in host memory was fetched back twice (a second backward "
                                  "through the same graph, retain_graph=True): set DELTATUNE_OFFLOAD_CHECKPOINTS=0.")
        current = torch.cuda.current_stream()
        # allocated on the training stream, which reads and frees it: nothing crosses streams
        copy.on_gpu = torch.empty(slot.tensor.shape, dtype=slot.tensor.dtype, device=copy.device)
        self.stream.wait_stream(current)  # the memory is free in the training stream's order by then
        copy.ready = torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            copy.on_gpu.copy_(slot.tensor, non_blocking=True)
            copy.ready.record(self.stream)
        # the pinned buffer is free for another input once this copy has run
        slot.owner, slot.done, copy.slot = None, copy.ready, None

    def fetch(self, copy: _HostCopy, then_prefetch: bool = True) -> torch.Tensor:
        """The input on the GPU, ready on the current stream; starts fetching the input forward ran
        before it (with `then_prefetch`; else prefetch_previous(copy) does, later)."""
        source = copy.source()
        if source is not None and source._version != copy.version:
            raise BlockGraphError("A block's input was modified in place after the block's forward; "
                                  "its backward needs the value it had (set DELTATUNE_OFFLOAD_CHECKPOINTS=0 and "
                                  "autograd will name the operation).")
        if copy.on_gpu is None:
            self._prefetch(copy)
        torch.cuda.current_stream().wait_event(copy.ready)
        tensor, copy.on_gpu = copy.on_gpu, None
        position = next((i for i, r in enumerate(self.order) if r() is copy), None)
        if position is not None:
            previous = self.order[position - 1]() if position > 0 else None
            del self.order[position]
            copy.previous = weakref.ref(previous) if previous is not None else None
        if then_prefetch:
            self.prefetch_previous(copy)
        return tensor

    def prefetch_previous(self, copy: _HostCopy) -> None:
        """Start fetching the input forward offloaded just before `copy`'s (the next backward's)."""
        previous = copy.previous() if copy.previous is not None else None
        copy.previous = None
        if previous is not None and previous.on_gpu is None and previous.slot is not None:
            self._prefetch(previous)


class _ReplayBlock(torch.autograd.Function):
    """One checkpointed block as one autograd node: forward and backward are graph replays."""

    @staticmethod
    def forward(ctx, captured: _Captured, n_inputs: int, *tensors_and_params):
        inputs = tensors_and_params[:n_inputs]
        # weak: autograd may keep this node (not its tensors) after backward; it must not keep the graphs
        ctx.captured = weakref.ref(captured)
        # What checkpointing keeps: the block's inputs, the big one in host memory (its copy is
        # queued first, so it runs beside this block's forward).
        ctx.host = captured.owner.host_checkpoints(inputs) if offload_allowed(replaying=True) else None
        ctx.host_copy, ctx.host_index = _offload_biggest(ctx.host, inputs)
        out = captured.forward(inputs)
        if ctx.host_copy is not None:
            _HostCheckpoints.settle(ctx.host_copy)
            inputs = tuple(None if i == ctx.host_index else t for i, t in enumerate(inputs))
        ctx.save_for_backward(*inputs)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        inputs = ctx.saved_tensors
        captured = ctx.captured()
        if captured is None:
            raise BlockGraphError("This block's CUDA graphs were released (the model was unpatched or deleted) "
                                  "between its forward and its backward; run the forward again.")
        if ctx.host_copy is not None:
            fetched = ctx.host.fetch(ctx.host_copy, then_prefetch=False)
            captured.fill(tuple(fetched if i == ctx.host_index else t for i, t in enumerate(inputs)))
            # The graph reads its own copy from here: the fetched input's memory goes to the next
            # fetch, queued after that copy (one fetched input on the GPU at a time, not two).
            del fetched
            ctx.host.prefetch_previous(ctx.host_copy)
            # one gradient per input, then per trainable parameter: apply's tensor arguments in order
            return (None, None, *captured.backward(inputs, grad_output, filled=True))
        return (None, None, *captured.backward(inputs, grad_output))


class _NotOneTensor(TypeError):
    """The block returned something other than one tensor: the eager node cannot stand in for it."""


class _EagerCall:
    """What _CheckpointedBlock needs to run one block again in backward (the call's constants,
    the trainable parameters, the forward's autocast state)."""

    __slots__ = ("owner", "block", "args", "kwargs", "trainable", "autocast")

    def __init__(self, owner: "BlockGraphs", block: nn.Module, args: tuple, kwargs: dict,
                 trainable: list[nn.Parameter], autocast: tuple[bool, torch.dtype]) -> None:
        self.owner, self.block, self.args, self.kwargs = owner, block, args, kwargs
        self.trainable, self.autocast = trainable, autocast


class _CheckpointedBlock(torch.autograd.Function):
    """One checkpointed block run eagerly, as one autograd node: forward under no_grad, and in
    backward the recomputation and its gradients, as torch.utils.checkpoint does, except that
    the big input waits in pinned host memory in between (where _ReplayBlock would replay)."""

    @staticmethod
    def forward(ctx, call: _EagerCall, n_inputs: int, *tensors_and_params):
        inputs = tensors_and_params[:n_inputs]
        # the big input's copy to the host is queued first, so it runs beside this block's forward
        ctx.host = call.owner.host_checkpoints(inputs)
        ctx.host_copy, ctx.host_index = _offload_biggest(ctx.host, inputs)
        try:
            with torch.no_grad():
                out = _run_block(call.block, call.args, call.kwargs, list(inputs))
        finally:
            if ctx.host_copy is not None:
                _HostCheckpoints.settle(ctx.host_copy)
        if not isinstance(out, torch.Tensor):
            raise _NotOneTensor(type(out).__name__)
        ctx.call, ctx.n_inputs = call, n_inputs
        if ctx.host_copy is not None:
            inputs = tuple(None if i == ctx.host_index else t for i, t in enumerate(inputs))
        ctx.differentiable = [i for i, t in enumerate(tensors_and_params[:n_inputs]) if t.requires_grad]
        ctx.save_for_backward(*inputs)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        call, inputs = ctx.call, list(ctx.saved_tensors)
        if ctx.host_copy is not None:
            inputs[ctx.host_index] = ctx.host.fetch(ctx.host_copy)
        with torch.autocast("cuda", dtype=call.autocast[1], enabled=call.autocast[0]):
            grads = _block_gradients(call.block, call.args, call.kwargs, inputs, ctx.differentiable, call.trainable,
                                     grad_output)
        input_grads = [None] * ctx.n_inputs
        for index, grad in zip(ctx.differentiable, grads):
            input_grads[index] = grad
        return (None, None, *input_grads, *grads[len(ctx.differentiable):])


def _offload_biggest(host: "_HostCheckpoints | None", inputs: tuple) -> tuple["_HostCopy | None", int | None]:
    """Queue the biggest input's copy to host memory (from OFFLOAD_MIN_BYTES up): (its copy, its index)."""
    if host is None:
        return None, None
    index = max(range(len(inputs)), key=lambda i: inputs[i].numel() * inputs[i].element_size())
    if inputs[index].numel() * inputs[index].element_size() < OFFLOAD_MIN_BYTES:
        return None, None
    return host.offload(inputs[index]), index


# ----------------------------------------------------------------------------- the model's graphs
class BlockGraphs:
    """Every captured block of one model: the memory pool, the capture stream, the shared buffers
    and, per block, its captured signatures. Held by the model (kernels/patch.py)."""

    def __init__(self) -> None:
        self.pool = None
        self.stream: torch.cuda.Stream | None = None
        self.buffers: dict[Hashable, torch.Tensor] = {}
        self.captured: dict[tuple[int, Hashable], _Captured] = {}
        self.sightings: dict[tuple[int, Hashable], int] = {}
        self.signatures: set[Hashable] = set()
        self.refused: set[Hashable] = set()
        # per kind of signature (_kind) and block variant: the output buffer of the capture that
        # warmed up for it, and which inputs that warm-up differentiated
        self.warmed: dict[Hashable, tuple[torch.Tensor, frozenset[int]]] = {}
        # per kind of signature: how much faster replaying was measured to be (replay_speedup), and
        # whether that pays for a capture (MIN_SPEEDUP)
        self.speedups: dict[Hashable, float] = {}
        self.readings: dict[Hashable, int] = {}  # per kind: how many measurements (MEASUREMENTS)
        self.last_copied: dict[int, tuple[weakref.ref, int]] = {}
        self.host: _HostCheckpoints | None = None
        self.replays = 0  # blocks run through their graphs (forward passes)
        self.eager_calls = 0  # blocks run through _CheckpointedBlock (forward passes)
        self.captures = 0  # graph pairs recorded

    # a copied or pickled model starts without captures (graphs belong to one set of tensors)
    def __deepcopy__(self, memo: dict) -> "BlockGraphs":
        return BlockGraphs()

    def __reduce__(self) -> tuple:
        return (BlockGraphs, ())

    # -- shared buffers ------------------------------------------------------------------------
    def buffer(self, role: Hashable, like: torch.Tensor) -> torch.Tensor:
        """The model-wide buffer for `role` shaped like `like` (made outside any graph's pool)."""
        key = (role, tuple(like.shape), like.dtype, like.device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        return self.buffers[key]

    def copy_in(self, buffer: torch.Tensor, tensor: torch.Tensor) -> None:
        """buffer <- tensor, skipped when the buffer already holds this very tensor unchanged
        (the rotary tables every block of a step receives)."""
        last = self.last_copied.get(id(buffer))
        if last is not None and last[0]() is tensor and last[1] == tensor._version:
            return
        buffer.copy_(tensor)
        self.last_copied[id(buffer)] = (weakref.ref(tensor), tensor._version)

    def host_checkpoints(self, inputs: tuple[torch.Tensor, ...]) -> _HostCheckpoints:
        """Where block inputs wait in host memory."""
        if self.host is None:
            self.host = _HostCheckpoints(inputs[0].device)
        return self.host

    def _pays(self, signature, block, args, kwargs, tensors, trainable, autocast, seen: int) -> bool:
        """Whether capturing this signature is worth its memory: measured once per kind (_kind), and
        where that reading says no, again in the next steps (MEASUREMENTS) when the block that is
        `seen` for the n-th time comes round, the best reading kept."""
        kind = _kind(signature)
        readings, best = self.readings.get(kind, 0), self.speedups.get(kind)
        if best is None or (best < MIN_SPEEDUP and readings < MEASUREMENTS and seen == CAPTURE_ON_SIGHTING + readings):
            with torch.autocast("cuda", dtype=autocast[1], enabled=autocast[0], cache_enabled=False):
                speedup = replay_speedup(lambda: _eager_checkpointed_step(block, args, kwargs, tensors, trainable))
            self.readings[kind] = readings + 1
            self.speedups[kind] = speedup = max(speedup, best or 0.0)
            logger.info("deltatune: %s with inputs %s would run %.2fx faster replayed: %s", type(block).__name__,
                        [tuple(t.shape) for t in tensors], speedup,
                        "capturing it" if speedup >= MIN_SPEEDUP else "it runs eagerly (the GPU sets the pace)")
        return self.speedups[kind] >= MIN_SPEEDUP

    def clear(self, keep_measurements: bool = False) -> None:
        self.captured.clear()
        self.sightings.clear()
        self.signatures.clear()
        if not keep_measurements:
            self.speedups.clear()
            self.readings.clear()
        self.buffers.clear()
        self.warmed.clear()
        self.last_copied.clear()
        # (the capture stream stays: cuBLAS keeps a workspace per stream for good, so a new stream
        # per release would leave one behind each time)
        self.pool = None
        self.host = None  # its pinned buffers go with the last input waiting in them

    # -- a block's call -------------------------------------------------------------------------
    def call(self, block: nn.Module, args: tuple, kwargs: dict) -> Any:
        """The block's output through its graphs, or, where it is not captured and checkpointed
        inputs wait in host memory, through the eager checkpointed node; NotImplemented where it
        must run its own code (transformers' checkpointing)."""
        if not (block.training and hf_compat.block_checkpoints(block) and torch.is_grad_enabled()):
            return NotImplemented
        graphs_on = block_graphs_allowed()
        if not (graphs_on or offload_allowed(replaying=False)) or torch.compiler.is_compiling() or _global_hooks_present():
            return NotImplemented
        flat = _flatten(args, kwargs)
        if flat is None or not flat[0] or not all(t.is_cuda for t in flat[0]):
            return NotImplemented
        if torch.cuda.is_current_stream_capturing() or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
            return NotImplemented
        tensors, layout = flat
        state = _block_state(block)
        if state is None:
            return NotImplemented
        block_key, trainable = state
        if not trainable and not any(t.requires_grad for t in tensors):
            return NotImplemented  # nothing to differentiate: eager is as cheap
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        signature = (layout, autocast, type(block))
        key = (id(block), (signature, block_key))
        captured = self.captured.get(key) if graphs_on else None
        if captured is None and graphs_on:
            captured = self._maybe_capture(key, signature, block, args, kwargs, tensors, trainable, autocast)
        if captured is not None:
            self.replays += 1
            return _ReplayBlock.apply(captured, len(tensors), *tensors, *trainable)
        if not self._offloads_eagerly(signature, graphs_on):
            return NotImplemented
        call = _EagerCall(self, block, *_skeleton(args, kwargs), trainable, autocast)
        try:
            out = _CheckpointedBlock.apply(call, len(tensors), *tensors, *trainable)
        except _NotOneTensor:  # nothing changed yet: the block's own checkpointing takes it from here
            self.refused.add(signature)
            return NotImplemented
        self.eager_calls += 1
        return out

    def _offloads_eagerly(self, signature: Hashable, graphs_on: bool) -> bool:
        """Whether a block that runs eagerly keeps its input in host memory (through
        _CheckpointedBlock): always with DELTATUNE_OFFLOAD_CHECKPOINTS=1; by default while its shape
        waits to be captured (before the second sighting), since that step would otherwise hold
        every block's input on the GPU and need more memory than the replayed steps after it, and
        for good where replaying it was measured not to pay: there the GPU sets the pace, so the
        node's Python recomputation hides behind it (7.2B QLoRA at batch 4 on the lent H200,
        2026-12-03: 695.3 against 689.7 ms a step, 5.95 against 7.96 GiB)."""
        if signature in self.refused:
            return False
        if offload_allowed(replaying=False):
            return True
        if not (graphs_on and offload_allowed(replaying=True)):
            return False
        # never to be captured, nor measured: the host may be what sets its pace
        return signature in self.signatures or len(self.signatures) < MAX_SIGNATURES

    def _maybe_capture(self, key, signature, block, args, kwargs, tensors, trainable, autocast) -> _Captured | None:
        if signature in self.refused:
            return None
        if len(self.sightings) > 64 * MAX_SIGNATURES:  # keys of moved parameters, never seen again
            self.sightings.clear()
        seen = self.sightings.get(key, 0) + 1
        self.sightings[key] = seen
        if seen < CAPTURE_ON_SIGHTING:
            return None
        if signature not in self.signatures and len(self.signatures) >= MAX_SIGNATURES:
            return None
        if not (block_graphs_forced() or self._pays(signature, block, args, kwargs, tensors, trainable, autocast, seen)):
            return None
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        if self.stream is None or self.stream.device != tensors[0].device:
            self.stream = torch.cuda.Stream(device=tensors[0].device)
        warm_key = (_kind(signature), hf_compat.block_variant(block))
        try:
            with torch.autocast("cuda", dtype=autocast[1], enabled=autocast[0], cache_enabled=False):
                captured = _Captured(self, block, args, kwargs, tensors, trainable, self.warmed.get(warm_key))
        except BlockGraphError:
            raise
        except Exception as error:  # found in the warm-up: a block that syncs or returns a tuple
            self.refused.add(signature)
            logger.warning("deltatune: %s runs without CUDA graphs: capturing it failed (%s: %s)",
                           type(block).__name__, type(error).__name__, error)
            return None
        self.signatures.add(signature)
        self.warmed[warm_key] = (captured.output, captured.warmed_for)
        self.captured[key] = captured
        self.captures += 1
        # Keep a few states per block and signature (adapters switched back and forth replay without
        # a new capture); drop the oldest beyond that (parameters that moved never come back).
        same = [k for k in self.captured if k[0] == key[0] and k[1][0] == signature]
        for old in same[:-STATES_PER_SIGNATURE]:
            del self.captured[old]
        return captured
