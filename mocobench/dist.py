"""Distributed helpers, correct at world size 1.

Launch with plain ``python`` (one process, no process group) or ``torchrun``
(which sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR). The backend follows the
device: NCCL on GPUs, gloo on CPUs. Model code calls only these functions, so
no code path needs a process group to exist.
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(timeout_minutes: int = 30) -> torch.device:
    """Join the process group torchrun describes (if any) and return this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        # After torchrun restarts the workers (--max-restarts), the store still holds the
        # dead round's addresses; a fresh key prefix per attempt keeps ranks from reading them.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout,
                                store=dist.PrefixStore(f"attempt{attempt}/", store),
                                rank=rank, world_size=world_size)
    return device


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0 (no gradient flows back).
    Every rank must pass the same shape."""
    if get_world_size() == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if get_world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def all_reduce_mean(value: float, device=None) -> float:
    if get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / get_world_size()
