"""Training on several processes with PyTorch's own engine: DDP or FSDP2, launched by torchrun.

    torchrun --nproc_per_node 2 my_script.py            # or: deltatune train --distributed ddp
    dt.distributed.init_from_env()                      # a process group from torchrun's variables
    model = dt.distributed.prepare(dt.wrap(base, cfg), "fsdp2")
    ... train ...
    model.save("out")                                   # every rank calls it; rank 0 writes
    dt.distributed.shutdown()                           # every rank: leave together

What is special about PEFT here, and handled:
  * DDP registers only the parameters that train, so a frozen base raises no unused-parameter
    error and only the adapter's gradients cross the network;
  * FSDP2 (`fully_shard`) shards each transformer block and the root by parameter, so frozen and
    trainable tensors may share a block (FSDP1's flat parameters could not mix them);
  * sharded adapter tensors are DTensors: `gather_full` turns them into whole tensors (a
    collective every rank must join), so saves and checkpoints hold the whole adapter, written
    by rank 0 only, in the same files a single process writes;
  * 4-bit base weights are buffers, which FSDP2 does not shard: their codes (nearly all of their
    bytes) become frozen parameters first and are sharded like any weight, gathered for each
    forward and backward; the small block constants stay whole on every rank;
  * LoRA merges in place into sharded weights (a row-sharded B·A adds to the same rows of W), for
    methods whose MethodInfo says merges_sharded; merge_and_unload() hands rank 0 a plain merged
    copy rebuilt from the gathered weights (FSDP2's root is the wrapper: its inner model cannot be
    handed back), leaving the shards as they were.
"""

from __future__ import annotations

import atexit
import gc
import os
from typing import Any, Callable, Mapping

import torch
from torch import nn

STRATEGIES = ("none", "auto", "ddp", "fsdp2")


class DistributedError(ValueError):
    """A distributed setting that cannot work here; the message says which and why."""


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes files and prints: rank 0, or the only process."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        torch.distributed.barrier()


def launched() -> bool:
    """Whether torchrun (or accelerate launch) started this process (one of one counts: a
    single-GPU run of a multi-GPU script keeps the same code path)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def refuse_several_processes(command: str, instead: str) -> None:
    """Raise DistributedError when this process is one of several that torchrun launched: `command`
    starts its own process per job, so each of N launched copies would run all of it and write the
    same files. `instead` says what to run."""
    count = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched() and count > 1:
        raise DistributedError(
            f"{command} runs as one process (it starts a process per job itself), but it was launched as one of "
            f"{count} processes (torchrun / accelerate launch): each would run everything and write the same files. "
            f"{instead}")


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...): NCCL on CUDA,
    gloo on the CPU; each process takes the GPU of its LOCAL_RANK. False when not launched so."""
    if is_initialized():
        return True
    if not launched():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
        torch.distributed.init_process_group(backend or "nccl", device_id=device())
    else:
        torch.distributed.init_process_group(backend or "gloo")
    atexit.register(_destroy)  # a script that never calls shutdown() still leaves before teardown
    return True


def shutdown() -> None:
    """Leave the process group, every rank together: a barrier, then the group destroyed while the
    interpreter is whole. Without it, a rank that exits while gloo's threads still serve another,
    or whose group is freed during interpreter teardown, can abort ("terminate called without an
    active exception"). Call it on every rank once no more collectives follow."""
    if is_initialized():
        torch.distributed.barrier()
        _destroy()


def _destroy() -> None:
    # Sharded parameters keep the group alive through their device mesh: collect what is already
    # unreachable so the group's last references go now rather than in interpreter teardown.
    if is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


def device() -> torch.device:
    """This process's device: its GPU under torchrun with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_strategy(strategy: str, model: nn.Module) -> str:
    """ "auto": FSDP2 when the frozen weights would take more than 40% of one GPU, else DDP (the
    adapter is small, so DDP's copy of the whole model per GPU is the only cost, and it is the
    faster of the two); "none" outside a process group."""
    if strategy not in STRATEGIES:
        raise DistributedError(f"distributed must be one of {', '.join(STRATEGIES)}, got {strategy!r}.")
    if strategy == "none" or not is_initialized():
        if strategy not in ("none", "auto"):
            raise DistributedError(
                f"distributed={strategy!r} needs a process group: launch with torchrun (e.g. `torchrun "
                f"--nproc_per_node 2 -m deltatune.cli train ...`) or call deltatune.distributed.init_from_env().")
        return "none"
    if strategy != "auto":
        return strategy
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if torch.cuda.is_available():
        return "fsdp2" if weights > 0.4 * torch.cuda.get_device_properties(device()).total_memory else "ddp"
    return "ddp"


def prepare(model: nn.Module, strategy: str = "auto",
            init_weights: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """`model` ready for the process group: wrapped in DDP, or sharded in place with FSDP2 (each
    transformer block, then the root). Returns the module to call; `unwrap_parallel` gives back
    the model itself (under FSDP2 that is the same object).

    A model too big for one device whole is built on the meta device (``with torch.device("meta"):``
    the model, then ``dt.wrap``) and prepared with FSDP2 and `init_weights`: it is sharded while it
    holds no memory, each rank then allocates only its shards (``to_empty``), the buffers computed
    from the config (rotary tables) are computed again, and ``init_weights(model)`` fills the
    weights under no_grad, e.g. ``lambda m: fill_from_full(m, tensors)`` with the whole tensors by
    name, or any initialisation that writes each rank's shards.
    """
    strategy = resolve_strategy(strategy, model)
    on_meta = any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    if on_meta and (strategy != "fsdp2" or init_weights is None):
        raise DistributedError(
            "a model on the meta device is sharded, then filled: it needs distributed='fsdp2' under torchrun and "
            "init_weights (a function that fills its weights once each rank holds its shards); got distributed="
            f"{strategy!r}{'' if init_weights else ' and no init_weights'}.")
    if init_weights is not None and not on_meta:
        raise DistributedError("init_weights is for a model built on the meta device; this one holds its weights already.")
    if strategy == "none":
        return model
    if not any(p.requires_grad for p in model.parameters()):
        raise DistributedError("the model has no parameters that train: nothing to synchronise.")
    if on_meta:
        return _shard_and_fill(model, init_weights)
    model.to(device())
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device().index] if device().type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    _shard(model)
    return model


def _shard_and_fill(model: nn.Module, init_weights: Callable[[nn.Module], None]) -> nn.Module:
    from deltatune import hf_compat

    _shard(model)
    model.to_empty(device=device())
    try:
        hf_compat.rebuild_computed_buffers(model)
    except ValueError as error:
        raise DistributedError(str(error)) from error
    with torch.no_grad():
        init_weights(model)
    return model


def _shard(model: nn.Module) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from deltatune import hf_compat

    mesh = init_device_mesh(device().type, (world_size(),))
    _shardable_buffers_as_parameters(model)
    for block in hf_compat.checkpointable_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _shardable_buffers_as_parameters(model: nn.Module) -> None:
    """Buffers a module lists in `shardable_buffers` (4-bit codes) become frozen parameters, which
    fully_shard shards; it leaves buffers whole on every rank. Parameters that are not floating
    point are not counted as weights (their module reports what they pack)."""
    for module in model.modules():
        for name in getattr(module, "shardable_buffers", ()):
            tensor = module._buffers.get(name)
            if tensor is not None:
                del module._buffers[name]
                module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of an FSDP2-sharded model, on rank 0's CPU ({} on the other ranks);
    every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_class(module: nn.Module) -> type:
    """The class `fully_shard` gave `module` a subclass of (the class itself when not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def is_sharded(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def gather_full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a sharded one (every rank must call this for the same tensors, in
    the same order); a plain tensor as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_view(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor; a plain tensor as it is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` split the way `like` is (a sharded parameter): the shard this rank holds."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements).to_local()


def fill_from_full(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Every parameter and buffer of `model` (names as `model.named_parameters()` gives them, the
    frozen base's included) set from the whole tensor of that name, each rank copying its own shard
    (the `init_weights` of a model built on the meta device). Every rank must call it with the same
    names; a name missing from `tensors` is an error that lists them."""
    named = [*model.named_parameters(), *model.named_buffers()]
    missing = [name for name, _ in named if name not in tensors]
    if missing:
        raise DistributedError(f"fill_from_full: no tensor for {len(missing)} of the model's names, e.g. "
                               f"{', '.join(missing[:5])}.")
    with torch.no_grad():
        for name, tensor in named:
            local_view(tensor).copy_(shard_like(tensors[name], tensor))


def from_main(value: Any) -> Any:
    """Rank 0's `value` on every process (a collective every rank joins; `value` itself outside a
    process group): for what one rank must decide for all, such as a folder named after the clock
    or a learning rate suggested from measured losses, which must not differ between ranks."""
    if not is_initialized():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(value: float | int) -> float:
    """The sum of one number over all processes (itself outside a process group)."""
    if not is_initialized():
        return float(value)
    where = device() if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=where)
    torch.distributed.all_reduce(tensor)
    return float(tensor.item())


__all__ = [
    "STRATEGIES", "DistributedError", "all_sum", "barrier", "device", "from_main", "gather_full", "gather_state_dict",
    "init_from_env",
    "is_main", "unsharded_class",
    "refuse_several_processes",
    "is_sharded", "launched", "local_view", "prepare", "rank", "resolve_strategy", "shard_like", "shutdown",
    "unwrap_parallel",
    "world_size",
]
