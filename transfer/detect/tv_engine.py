"""The torchvision engine: Faster/Mask R-CNN from torchvision on the converted ResNet.

Always installable, and deliberately a *different protocol* from Detectron2's (results say
engine "torchvision"): the model follows the same Detectron2 config keys (the model:
tv_model; the implemented subset: config), trained with SGD, Detectron2's warmup multi-step
schedule and parameter groups (no weight decay on norm layers), shortest-edge resize sampled
from MIN_SIZE_TRAIN, horizontal flip, and PreciseBN before evaluation when
TEST.PRECISE_BN.ENABLED (tv_solver). Evaluation scores the same detections the same way as
the Detectron2 engine (transfer.detect.metrics): VOC data with Detectron2's VOC07 evaluator,
COCO data with pycocotools' COCOeval.

Multi-GPU: run under ``torchrun --nproc_per_node N``; SyncBN/naiveSyncBN become torch's
SyncBatchNorm there and plain BN at world size 1 (said in the log). Every rank evaluates its
share of the test set (tv_eval).
"""
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from mocobench import dist
from mocobench.errors import UserError
from mocobench.fileio import atomic_torch_save, atomic_write
from transfer.detect import config as dcfg
from transfer.detect import datasets as ds
from transfer.detect import record, tv_eval
from transfer.detect.tv_data import train_loader
from transfer.detect.tv_model import build_model, check_config, sync_norms
from transfer.detect.tv_solver import lr_factor, param_groups, precise_bn

CHECKPOINT = "last_checkpoint.pth"
METRICS_LOG = "metrics.jsonl"


def log(msg: str) -> None:
    if dist.is_main_process():
        print(f"[detect] {msg}", flush=True)


def _seed(cfg: dict, world: int) -> int:
    """SEED, or one drawn once and shared by all ranks (the sampler needs one seed); recorded."""
    if cfg["SEED"] < 0:
        pick = [random.SystemRandom().randrange(2 ** 31)]
        if world > 1:
            torch.distributed.broadcast_object_list(pick, src=0, group=tv_eval._object_group())
        cfg["SEED"] = pick[0]
    return cfg["SEED"]


def load_data(cfg: dict, explicit: set) -> dict:
    """Read and check every data set before training; fills MODEL.ROI_HEADS.NUM_CLASSES.
    Rank 0 checks every image; the others only read the sizes an annotation lacks."""
    train_specs, (test_spec,) = ds.resolve_all(cfg)
    train, classes, counts = ds.load_sets(train_specs)
    test, test_classes = ds.load(test_spec)
    if test_classes != classes:
        raise UserError(f"{test_spec.name} and {train_specs[0].name} have different class lists; "
                        f"test on the classes trained on")
    if cfg["MODEL"]["MASK_ON"] and test_spec.kind == "voc":
        raise UserError("MODEL.MASK_ON needs masks, which the VOC layout does not have; use COCO data "
                        "or MODEL.MASK_ON False")
    for records, name in ((train, "+".join(counts)), (test, test_spec.name)):
        ds.check_images(records, name, every_image=dist.is_main_process())
    cfg["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] = ds.check_num_classes(
        cfg, classes, train_specs[0].name, "MODEL.ROI_HEADS.NUM_CLASSES" in explicit)
    identity = record.dataset(counts, test_spec.name, test, train, classes)  # as read, as the Detectron2 engine
    if cfg["DATALOADER"]["FILTER_EMPTY_ANNOTATIONS"]:
        train = [r for r in train if any(not a["iscrowd"] for a in r["annotations"])]
    if not train:
        raise UserError(f"{train_specs[0].name} has no image with a (non-crowd) object to train on")
    return {"train": train, "test": test, "classes": classes, "test_spec": test_spec, "identity": identity}


def _resume(model, optimizer, scheduler, out: Path, resume: bool) -> int:
    """The iteration to start at; metrics.jsonl keeps only the iterations before it."""
    start = 0
    path = out / CHECKPOINT
    if resume and path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["iter"]
        log(f"resumed from {path} at iteration {start}")
    if dist.is_main_process():
        lines = (out / METRICS_LOG).read_text().splitlines() if (out / METRICS_LOG).exists() else []
        kept = "".join(line + "\n" for line in lines if line.strip() and json.loads(line)["iter"] <= start)
        atomic_write(out / METRICS_LOG, lambda tmp: Path(tmp).write_text(kept))
    return start


def _step(train_model, optimizer, scheduler, images, targets, device, it: int) -> tuple:
    losses = train_model([i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets])
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        raise UserError(f"loss became {loss.item()} at iteration {it} "
                        f"({', '.join(f'{k}={v.item():.3g}' for k, v in losses.items())}); "
                        f"lower SOLVER.BASE_LR or raise SOLVER.WARMUP_ITERS")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss, losses


def train(model, train_model, optimizer, scheduler, batches, cfg, out: Path, start: int, device) -> float:
    """The training loop; returns its wall time."""
    from tqdm import tqdm

    s = cfg["SOLVER"]
    model.train()
    t0 = time.time()
    bar = tqdm(range(start, s["MAX_ITER"]), desc="train", disable=not dist.is_main_process(),
               initial=start, total=s["MAX_ITER"], mininterval=10)
    for it in bar:
        images, targets = next(batches)
        loss, losses = _step(train_model, optimizer, scheduler, images, targets, device, it)
        done, lr = it + 1, optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2g}", refresh=False)
        if not dist.is_main_process():
            continue
        if done % 20 == 0 or done == s["MAX_ITER"]:
            with open(out / METRICS_LOG, "a") as f:
                f.write(json.dumps({"iter": done, "loss": loss.item(), "lr": lr,
                                    **{k: v.item() for k, v in losses.items()}}) + "\n")
        if s["CHECKPOINT_PERIOD"] > 0 and done % s["CHECKPOINT_PERIOD"] == 0 and done < s["MAX_ITER"]:
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "iter": done}, out / CHECKPOINT)
    return time.time() - t0


def _prepare(cfg: dict, bb, classes: list, device, world: int):
    from converters import build_resnet

    s = cfg["SOLVER"]
    model = build_model(cfg, build_resnet(bb), len(classes))
    notes, model = sync_norms(model, cfg, world, device)
    for n in notes:
        log(n)
    model.to(device)
    optimizer = torch.optim.SGD(param_groups(model, s), lr=s["BASE_LR"], momentum=s["MOMENTUM"],
                                nesterov=s["NESTEROV"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, s))
    return model, optimizer, scheduler, notes


def run(cfg: dict, bb, weights: dict, out: Path, *, name: str, explicit: set, resume: bool = False):
    """Train, evaluate on every rank, and (rank 0) write results.json; returns its path on rank 0."""
    t0 = time.time()
    device = dist.init_distributed()
    if cfg["MODEL"]["DEVICE"].startswith("cuda") and device.type == "cpu":
        log("MODEL.DEVICE asks for CUDA but none is available: running on the CPU")
    rank, world = dist.get_rank(), dist.get_world_size()
    s = cfg["SOLVER"]
    if s["IMS_PER_BATCH"] % world:
        raise UserError(f"SOLVER.IMS_PER_BATCH {s['IMS_PER_BATCH']} is not divisible by the world size "
                        f"{world}; choose a multiple of {world}")
    seed = _seed(cfg, world)
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    data = load_data(cfg, explicit)
    if dist.is_main_process():
        text = yaml.safe_dump(cfg, sort_keys=False)
        atomic_write(out / "config.yaml", lambda tmp: Path(tmp).write_text(text))

    model, optimizer, scheduler, notes = _prepare(cfg, bb, data["classes"], device, world)
    start = _resume(model, optimizer, scheduler, out, resume)
    train_model = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    log(f"torchvision {'Mask' if cfg['MODEL']['MASK_ON'] else 'Faster'} R-CNN ({check_config(cfg).upper()}, "
        f"{bb.arch}) on {len(data['train'])} training images, {len(data['classes'])} classes; batch {world} x "
        f"{s['IMS_PER_BATCH'] // world} = {s['IMS_PER_BATCH']}, base lr {s['BASE_LR']}, {s['MAX_ITER']} "
        f"iterations (steps {s['STEPS']}, warmup {s['WARMUP_ITERS']}), device {device}")
    batches = iter(train_loader(data["train"], cfg, seed, rank, world))
    train_time = train(model, train_model, optimizer, scheduler, batches, cfg, out, start, device)
    n_bn = 0
    if cfg["TEST"]["PRECISE_BN"]["ENABLED"]:
        n_bn = precise_bn(model, batches, cfg["TEST"]["PRECISE_BN"]["NUM_ITER"], device)
        log(f"PreciseBN: {n_bn} BN layers re-estimated over {cfg['TEST']['PRECISE_BN']['NUM_ITER']} batches")
    detections = tv_eval.evaluate(model, data["test"], cfg, device)  # makes every rank's model equal first
    path = None
    if dist.is_main_process():
        atomic_torch_save(model.state_dict(), out / "model_final.pth")
        cfg["RUN"] = {"world_size": world, "ims_per_batch_per_rank": s["IMS_PER_BATCH"] // world,
                      "device": str(device), "norm": notes, "precise_bn_layers": n_bn,
                      "train_time_s": round(train_time, 1), "train_images": len(data["train"]),
                      "weights_layout": bb.layout, "arch": bb.arch,
                      "datasets": {sp.name: sp.describe() for sp in sum(ds.resolve_all(cfg), [])}}
        path = _write(cfg, data, detections, weights, out, name, time.time() - t0)
    dist.barrier()
    return path


def _write(cfg, data, detections, weights, out: Path, name: str, wall: float) -> Path:
    test = data["test_spec"]
    metric = record.metric_name(test.kind)
    gt = ds.ground_truth(data["test"], data["classes"], with_masks=cfg["MODEL"]["MASK_ON"])
    path, metrics = record.write(
        out, engine="torchvision", name=name, cfg=cfg, defaults=dcfg.defaults(), metric=metric,
        data=data["identity"],
        ground_truth=gt, detections=detections, weights=weights, seed=cfg["SEED"], wall_time_s=wall)
    log(f"{metric} metrics: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    return path
