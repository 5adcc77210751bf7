"""torch.distributed setup: one code path from one CPU process to many GPUs under torchrun.

Single process: the plain module. Several processes: FSDP2 (`fully_shard`) per decoder layer, then the root (the
embedding, final norm and head, tied or not), on an explicit 1-D device mesh.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1


def rank_from_env() -> int:
    """This process's rank before the process group exists (torchrun sets RANK)."""
    return int(os.environ.get("RANK", "0"))


def world_size_from_env() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


CPU_OFFLOAD_NEEDS_CUDA = "--cpu-offload moves accelerator memory to the CPU; it needs CUDA (this run is on CPU)"


def check_cpu_offload(cpu_offload: bool) -> None:
    """Refuse `--cpu-offload` before any work without CUDA (`init` picks CUDA exactly when it is available) or
    without torchrun (FSDP2 shards over a process group, which torchrun sets up, even for one GPU)."""
    if cpu_offload and not torch.cuda.is_available():
        raise ValueError(CPU_OFFLOAD_NEEDS_CUDA)
    if cpu_offload and "WORLD_SIZE" not in os.environ:
        raise ValueError("--cpu-offload shards the model with FSDP2 over a process group: launch with torchrun, "
                         "one GPU too (torchrun --standalone --nproc_per_node 1 SCRIPT ...)")


def init() -> Dist:
    """Join the torchrun process group if there is one (NCCL on CUDA with gloo beside it for CPU tensors; gloo on
    CPU)."""
    world = world_size_from_env()
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():  # under torchrun, even with one process
        # on CUDA also gloo for CPU tensors: --cpu-offload clips and reports gradients that live in CPU memory
        dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo", device_id=device if cuda else None)
    return Dist(dist.get_rank() if dist.is_initialized() else 0, world, device)


def parallelize(model: nn.Module, d: Dist, activation_checkpointing: bool = False, compile: bool = False,
                cpu_offload: bool = False, bf16: bool | None = None) -> nn.Module:
    """Per decoder layer: activation checkpointing, `torch.compile`, then FSDP2 (`fully_shard`); then the root (the
    embedding, final norm and head, tied or not). In place, on a model still on the meta device or not.

    FSDP2 applies with several processes, or with `cpu_offload` (parameters, gradients and optimizer state live in
    CPU memory). On CUDA parameters are gathered in bf16 and gradients reduced in fp32; on CPU everything stays
    fp32 (bf16 is emulated on CPUs without AVX512-BF16/AMX and runs ~50x slower). `bf16` True / False forces that
    policy either way (tests run the CUDA policy on gloo); None: by device, as above.
    """
    for layer in model.model.layers.values():
        if activation_checkpointing:
            checkpoint(layer)
        if compile:
            layer.compile()
    if not (d.sharded or cpu_offload):
        return model
    if cpu_offload and d.device.type != "cuda":
        raise ValueError(CPU_OFFLOAD_NEEDS_CUDA)
    # an explicit mesh: on a host with GPUs the default mesh goes to CUDA while gloo runs on CPU (pytorch #132471)
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    if bf16 is None:
        bf16 = d.device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in model.model.layers.values():
        fully_shard(layer, mesh=mesh, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
    return model


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of `t` over ranks, on `t`'s device (the collective runs on the process group's device: NCCL has no CPU)."""
    if not d.sharded:
        return t
    on_device = t.to(d.device)
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
    return on_device.to(t.device)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: an FSDP2 DTensor's own rows, or the plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def barrier(d: Dist) -> None:
    if d.sharded:
        dist.barrier()


def close(d: Dist) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
