"""The torchvision engine's evaluation, sharded over ranks.

Under torchrun every rank predicts its share of the test images (``records[rank::world]``)
and the detections are gathered on rank 0, which scores them once
(transfer.detect.metrics). The gathered list is put back in image order, so the result is
exactly what one process evaluating every image gets.

NCCL: the gather moves pickled Python objects, which NCCL cannot carry on the CPU; it runs
over a separate gloo group (as Detectron2's comm.gather does), created on every rank, so it
works whatever backend the default group uses. The model's buffers are made equal on every
rank first (all-reduce of CUDA tensors on GPU runs: legal under NCCL), so all shards are
scored with one model.
"""
import torch
import torch.distributed as tdist
from torch import nn

from mocobench import dist
from transfer.detect import metrics
from transfer.detect.tv_data import read_image

_GLOO = []  # the process group for object collectives, created once per process


def _object_group():
    if not _GLOO:
        _GLOO.append(tdist.new_group(backend="gloo") if tdist.get_backend() != "gloo" else None)
    return _GLOO[0]


def gather_to_main(obj) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the others (all ranks must call)."""
    if dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.is_main_process() else None
    tdist.gather_object(obj, out, dst=0, group=_object_group())
    return out


@torch.no_grad()
def same_buffers_on_every_rank(model: nn.Module) -> None:
    """Average floating-point buffers (BN running statistics: per-rank after plain-BN training
    or PreciseBN) over ranks, and give every rank rank 0's integer buffers (BN counters)."""
    if dist.get_world_size() == 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            tdist.all_reduce(buf)
            buf /= dist.get_world_size()
        else:
            tdist.broadcast(buf, src=0)


@torch.no_grad()
def predict(model: nn.Module, records: list, cfg: dict, device, indices) -> list:
    """[(record index, COCO results of that image)] for `indices`, at the config's test size."""
    mask_on = cfg["MODEL"]["MASK_ON"]
    saved = model.transform.min_size, model.transform.max_size
    model.transform.min_size = (cfg["INPUT"]["MIN_SIZE_TEST"],)
    model.transform.max_size = cfg["INPUT"]["MAX_SIZE_TEST"]
    model.eval()
    out = []
    try:
        for i in indices:
            pred = model([read_image(records[i]).to(device)])[0]
            masks = (pred["masks"][:, 0] > 0.5).cpu().numpy() if mask_on else None
            out.append((i, metrics.coco_results(records[i]["image_id"], pred["boxes"].cpu().numpy(),
                                                pred["scores"].cpu().numpy(),
                                                pred["labels"].cpu().numpy() - 1, masks)))
    finally:
        model.transform.min_size, model.transform.max_size = saved
    return out


def evaluate(model: nn.Module, records: list, cfg: dict, device) -> list | None:
    """Every test image's detections (COCO results, in image order) on rank 0; None on the others."""
    rank, world = dist.get_rank(), dist.get_world_size()
    same_buffers_on_every_rank(model)
    mine = predict(model, records, cfg, device, range(rank, len(records), world))
    shards = gather_to_main(mine)
    if shards is None:
        return None
    per_image = sorted((item for shard in shards for item in shard), key=lambda item: item[0])
    return [det for _, dets in per_image for det in dets]
