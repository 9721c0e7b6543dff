"""One code path for 1 process (CPU or GPU) and torchrun (N GPUs with NCCL, or CPU processes with gloo).

    info = init()                 # reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun; no-op otherwise
    shard_student(wrapper, info)  # FSDP2: fully_shard every decoder layer, then the root (wrapper)
    shard_teacher(teacher, info)  # FSDP2 on the decoder layers; embeddings / lm_head stay replicated
    full_state(module, optimizer, info) / load_full_state(...)  # rank-0 full state dicts for checkpoints

Why the teacher's root is not sharded: the loss reads the teacher's lm_head weight outside the teacher's
own forward; a replicated (frozen) head is simpler and costs V*H parameters per rank.
Data-parallel sharding of the data is data.BatchStream(rank=, world=).
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_mean",
    "barrier",
    "close",
    "full_state",
    "init",
    "load_full_state",
    "shard_student",
    "shard_teacher",
]


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> DistInfo:
    """Device choice and, under torchrun (WORLD_SIZE > 1), the process group (NCCL on CUDA, gloo on CPU)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev)


def _mesh(info: DistInfo):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(info.device.type, (info.world,))


def _layers(model):
    inner = getattr(model, "student", model)
    return inner.model.layers


def shard_student(wrapper, info: DistInfo, mixed_bf16: bool = False):
    """FSDP2 over the student (inside its loss wrapper): each decoder layer a unit, the rest the root."""
    if not info.enabled:
        return wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = _mesh(info)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else None
    kwargs = {"mesh": mesh} | ({"mp_policy": mp} if mp is not None else {})
    for layer in _layers(wrapper):
        fully_shard(layer, **kwargs)
    fully_shard(wrapper, **kwargs)
    return wrapper


def shard_teacher(teacher, info: DistInfo):
    """Idempotent: every stage of a staged run shares one (already sharded) teacher."""
    if not info.enabled or getattr(teacher, "_distill_sharded", False):
        return teacher
    teacher._distill_sharded = True
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(info)
    for layer in teacher.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    return teacher


def full_state(module, optimizer, info: DistInfo):
    """(model state, optimiser state) as full, CPU tensors (identical on every rank's view; rank 0 saves)."""
    if not info.enabled:
        return module.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(module, optimizer, options=opts)


def load_full_state(module, optimizer, model_state, optim_state, info: DistInfo) -> None:
    if not info.enabled:
        module.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))


def all_mean(values: list[float], info: DistInfo) -> list[float]:
    """Mean over ranks of a few scalars (sums are divided by the world size)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return (t / info.world).tolist()


def all_sum(values: list[float], info: DistInfo) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def close() -> None:
    """After a clean run: wait for every rank, then tear the process group down (a no-op without one).

    Why: a process that exits with its gloo group alive leaves the group's C++ worker threads to interpreter
    finalisation, which aborts now and then ("terminate called without an active exception", SIGABRT:
    pytorch/pytorch#190489) and fails a run whose work all finished. Not called after an error: the peers may be
    inside a collective and never reach the barrier, and a collective teardown can hang too (torchtitan#1342);
    torchrun must see the failed rank exit.
    The garbage collection first: FSDP2 modules and their device mesh sit in reference cycles (hooks) that still hold
    the group after destroy_process_group() drops the registry's reference; collected here, the group's threads stop
    while the interpreter is alive (session 29: the abort came back in CI with the barrier and destroy in place).
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()
