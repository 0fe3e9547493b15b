"""Shuffling BN's batch shuffle: send each key image to the rank that encodes it.

Rank 0 draws one permutation of the global batch (world x n images); rank r
encodes the images at positions idx_shuffle[r*n:(r+1)*n], then every key goes
back to the rank that owns its image. The official code does both moves with
all_gather, so every rank receives all world x n images and keeps n of them.
`shuffle`/`unshuffle` do the same moves with one all_to_all_single each: a rank
receives only the n images it encodes (1/world of the all_gather bytes) and the
results are identical. Both are differentiable (mocobench.dist.all_to_all sends the
gradients back the way the rows came), so end-to-end training, whose keys carry gradients,
shuffles BN across ranks too. `gather_shuffle`/`gather_unshuffle` are the official
all_gather form, kept as the reference for tests and benchmarks.

The permutation is drawn and the exchange planned on the CPU (a few hundred integers),
so no step waits for the GPU: all_to_all_single needs its row counts on the host, and
reading them from a GPU tensor would stall the step until the query forward is done.
Only the row indices travel to the device, without a sync.

At world size 1 the shuffle is a local permutation (it still matters when the
batch is split into BN groups, see SplitBatchNorm).
"""
from dataclasses import dataclass

import torch

from mocobench import dist


@dataclass
class ShufflePlan:
    """What `unshuffle` needs: the global permutation and this rank's exchange sizes."""
    idx_shuffle: torch.Tensor  # world*n global positions, rank r encodes [r*n:(r+1)*n]
    send_index: torch.Tensor  # local rows this rank sent, grouped by destination rank
    send_counts: list[int]  # rows sent to each rank
    recv_order: torch.Tensor  # where each received row goes in this rank's shuffled batch
    recv_counts: list[int]  # rows received from each rank


def _permutation(n_global: int) -> torch.Tensor:
    # Drawn on every rank (so every rank's RNG advances alike), then rank 0's wins; on the
    # CPU, a bookkeeping collective (mocobench/dist.py: gloo beside NCCL on GPUs).
    idx = torch.randperm(n_global)
    return dist.broadcast(idx, src=0)


def shuffle(x: torch.Tensor):
    """This rank's n images of the shuffled global batch, and the plan to undo it.
    Every rank must pass the same number of images. Gradients flow back through it."""
    world, rank, n = dist.get_world_size(), dist.get_rank(), x.shape[0]
    idx_shuffle = _permutation(world * n)
    if world == 1:
        idx = _to(x.device, idx_shuffle)
        return x[idx], ShufflePlan(idx, idx, [n], idx, [n])
    owner = idx_shuffle // n  # the rank that holds each global image
    encoder = torch.arange(world).repeat_interleave(n)  # who encodes position i
    # To each rank r, in r's order, the images of mine it encodes.
    mine = owner == rank
    send_index = idx_shuffle[mine] - rank * n  # ordered by position, hence grouped by encoder
    send_counts = torch.bincount(encoder[mine], minlength=world).tolist()
    # From each rank s, in my order, the images of s I encode; they arrive grouped by s.
    wanted = owner[rank * n:(rank + 1) * n]
    recv_order = torch.argsort(wanted, stable=True)
    recv_counts = torch.bincount(wanted, minlength=world).tolist()
    send_index, recv_order = _to(x.device, send_index, recv_order)
    received = dist.all_to_all(x[send_index], send_counts, recv_counts)
    out = torch.empty_like(x)  # n rows too, and keeps x's memory format (channels_last)
    out[recv_order] = received
    return out, ShufflePlan(idx_shuffle, send_index, send_counts, recv_order, recv_counts)


def _to(device, *indices: torch.Tensor):
    """CPU index tensors on `device`, without waiting for it (an asynchronous copy)."""
    moved = [t.to(device, non_blocking=True) for t in indices]
    return moved[0] if len(moved) == 1 else moved


def unshuffle(x: torch.Tensor, plan: ShufflePlan) -> torch.Tensor:
    """Rows of the shuffled batch (e.g. keys) back to the rank and order of their images.
    Gradients flow back through it."""
    if dist.get_world_size() == 1:
        return x[torch.argsort(plan.idx_shuffle)]
    # The shuffle's exchange run backwards: what I received goes back to its sender.
    back = dist.all_to_all(x[plan.recv_order], plan.recv_counts, plan.send_counts)
    out = torch.empty_like(x)
    out[plan.send_index] = back
    return out


@torch.no_grad()
def gather_shuffle(x: torch.Tensor):
    """The official all_gather shuffle (moco/builder.py `_batch_shuffle_ddp`), same permutation."""
    x_all = dist.all_gather_no_grad(x)
    world, rank = dist.get_world_size(), dist.get_rank()
    idx_shuffle = _to(x.device, _permutation(x_all.shape[0]))
    return x_all[idx_shuffle.view(world, -1)[rank]], torch.argsort(idx_shuffle)


@torch.no_grad()
def gather_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    x_all = dist.all_gather_no_grad(x)
    world, rank = dist.get_world_size(), dist.get_rank()
    return x_all[idx_unshuffle.view(world, -1)[rank]]


def bytes_received(n: int, row_bytes: int, world: int, idx_shuffle: torch.Tensor | None = None) -> dict:
    """Bytes one rank receives from other ranks per shuffle (n images of row_bytes each):
    all_gather gets every other rank's n; all_to_all gets only the images it encodes that
    live elsewhere, (world-1)/world of n on average, exactly counted for a given permutation."""
    gather = (world - 1) * n * row_bytes
    if idx_shuffle is None:
        a2a = (world - 1) * n * row_bytes / world
    else:  # rank 0's view
        a2a = int((idx_shuffle[:n] // n != 0).sum()) * row_bytes
    return {"all_gather": gather, "all_to_all": a2a}
