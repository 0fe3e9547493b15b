"""Distributed helpers, correct at world size 1.

Launch with plain ``python`` (one process, no process group) or ``torchrun``
(which sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR). Model code calls only these
functions, so no code path needs a process group to exist.

The process group has a backend for every device type a collective may see. On GPUs it is
created as ``cuda:nccl,cpu:gloo`` (`backend_for`): NCCL takes CUDA tensors only (torch binds
it to the cuda device type), while bookkeeping lives on the CPU (a logged loss, RNG states for
a checkpoint, counts, barrier). With gloo beside NCCL those collectives are legal on a GPU node
by construction; the alternative, every helper taking the device, leaves each call site one
forgotten argument away from a crash that CI (gloo on CPU) never sees, which is how
multi-GPU pretraining used to die at its first logged step. The model's tensors (keys,
gradients, SyncBN) stay on the GPU and go through NCCL; gloo costs one more set of TCP
connections at start-up and nothing per step unless a CPU tensor is reduced.
"""
import os
import signal
import sys
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


def backend_for(device_type: str) -> str:
    """The process group's backends when the model runs on `device_type` (see above)."""
    return "cuda:nccl,cpu:gloo" if device_type == "cuda" else "gloo"


def exit_with_launcher() -> None:
    """Under torchrun, have the kernel end this rank (SIGTERM) when torchrun dies.

    torchrun stops its workers when it is stopped politely, but a SIGKILLed or OOM-killed
    torchrun cannot: its ranks trained on as orphans, holding the GPUs and the output folder's
    lock, with nobody to restart or stop them. Linux only (prctl); elsewhere nothing changes."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the launcher died before the call: nobody would send the signal
        os._exit(1)


def init_distributed(timeout_minutes: int = 30) -> torch.device:
    """Join the process group torchrun describes (if any) and return this rank's device."""
    exit_with_launcher()
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
        dist.init_process_group(backend=backend_for(device.type), timeout=timeout,
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


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows: each rank's
    loss depends on every rank's rows, so d(sum of losses)/d(my rows) needs them all."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // get_world_size()
        return grad[get_rank() * n:(get_rank() + 1) * n]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0, with gradients flowing back to each
    rank's own rows from every rank's loss (same shape on every rank)."""
    return tensor if get_world_size() == 1 else _GatherWithGrad.apply(tensor)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single; its backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x, send_counts, recv_counts):
        ctx.counts = send_counts, recv_counts
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        back = grad.new_empty((sum(send_counts), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), send_counts, recv_counts)
        return back, None, None


def all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """Send send_counts[r] consecutive rows of `x` to rank r; receive recv_counts[r] rows from
    each rank r, in rank order. Differentiable (the backward is the reverse exchange)."""
    return _AllToAll.apply(x, send_counts, recv_counts)


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if get_world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def all_reduce_mean(value: float, device=None) -> float:
    """The mean over ranks of a Python number (a CPU collective unless `device` is given)."""
    if get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / get_world_size()
