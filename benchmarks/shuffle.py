"""Shuffling BN's communication on 2 gloo processes over loopback: the official
all_gather shuffle (every rank receives every image) vs the all_to_all one (each rank
receives only the images it encodes), bytes per rank and time of shuffle + unshuffle.

gloo implements all_to_all_single with uneven splits on CPU (torch 2.x), which is
what pretrain/shuffle.py uses; NCCL does on GPUs.
"""
import os
import socket
import tempfile

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from benchmarks.timing import interleaved
from pretrain import shuffle

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, n, size, dim, repeats, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    images = torch.randn(n, 3, size, size)
    keys = torch.randn(n, dim)

    def all_to_all():
        _, plan = shuffle.shuffle(images)
        shuffle.unshuffle(keys, plan)

    def all_gather():
        _, idx_unshuffle = shuffle.gather_shuffle(images)
        shuffle.gather_unshuffle(keys, idx_unshuffle)

    # Both ranks call the contenders in the same order, so their collectives pair up.
    t = interleaved({"all_gather": all_gather, "all_to_all": all_to_all}, repeats=repeats, warmup=2)
    if rank == 0:
        torch.save(t, out)
    torch_dist.destroy_process_group()


def run(full: bool = False) -> list[dict]:
    n, size, dim, repeats = (32, 224, 128, 30) if full else (32, 224, 128, 10)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.spawn(_worker, args=(_free_port(), n, size, dim, repeats, out), nprocs=WORLD, join=True)
        t = torch.load(out)
    image_bytes, key_bytes = 3 * size * size * 4, dim * 4
    b = {name: shuffle.bytes_received(n, image_bytes, WORLD)[name]
         + shuffle.bytes_received(n, key_bytes, WORLD)[name] for name in ("all_gather", "all_to_all")}
    setting = f"{WORLD} gloo ranks, {n} images/rank at {size} px fp32, keys dim {dim}"
    return [
        {"name": "shuffle bytes received per rank: all_gather", "value": b["all_gather"] / 2**20,
         "unit": "MiB", "note": f"computed; {setting}"},
        {"name": "shuffle bytes received per rank: all_to_all", "value": b["all_to_all"] / 2**20,
         "unit": "MiB", "note": "computed, expected over permutations"},
        {"name": "shuffle bytes: all_to_all / all_gather", "value": b["all_to_all"] / b["all_gather"],
         "unit": "ratio", "note": f"1/world = {1 / WORLD:.2f}"},
        {"name": "shuffle+unshuffle time: all_to_all / all_gather",
         "value": t["all_to_all"] / t["all_gather"], "unit": "ratio",
         "note": f"measured, loopback; <1: all_to_all wins ({t['all_gather'] * 1e3:.1f} ms all_gather)"},
    ]
