"""The paper's linear classification protocol: MoCo main_lincls.py (moco@7397dfe).

Frozen backbone in eval mode (BN statistics stay fixed: "it is not legitimate to
change any part of the pre-trained model"), a fresh fc (N(0, 0.01), bias 0) is
the only trained layer; SGD momentum 0.9, weight decay 0, lr 30 per 256 images
scaled linearly to the global batch (printed), x0.1 at epochs 60 and 80 of 100;
RandomResizedCrop + flip for training, Resize(size*256/224) + CenterCrop to
evaluate. Afterwards `sanity_check` proves every backbone tensor (BN running
statistics included) is bit-identical to the loaded weights.

Trained on train + val (the recipe chooses nothing), scored on test. Runs as one process
or under torchrun (DistributedDataParallel over the fc; the global batch is split over the
processes; the test split is sharded in order and its predictions gathered on rank 0, so
each image is scored exactly once and its outcome kept).
"""
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from mocobench import dist
from mocobench.data import concat, iterate
from mocobench.errors import UserError
from mocobench.fileio import atomic_torch_save
from transfer import cls_metrics, frozen
from transfer.features import _ContiguousShard, _gather_shards, feature_dim

CHECKPOINT = "checkpoint.pth"


def lr_at(base_lr: float, epoch: int, steps: list[int]) -> float:
    """Step schedule of main_lincls.adjust_learning_rate: x0.1 at each milestone passed."""
    return base_lr * 0.1 ** sum(epoch >= s for s in steps)


def sanity_check(model: nn.Module, reference: dict) -> None:
    """Every non-fc tensor of `model` equals `reference` exactly (MoCo's sanity_check)."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    if set(state) != set(reference):
        raise RuntimeError(f"backbone keys changed: {sorted(set(state) ^ set(reference))[:5]}")
    for k, v in state.items():
        if not torch.equal(v.cpu(), reference[k].cpu()):
            raise RuntimeError(f"{k} changed during linear classification; the backbone must stay frozen")


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    for name, p in model.named_parameters():
        p.requires_grad = name in ("fc.weight", "fc.bias")
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2, "only fc.weight and fc.bias may train"
    return params


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, headline: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(metrics, top-5 class ids, labels) of the whole sharded test split, on rank 0
    (other ranks: ({}, empty, empty))."""
    model.eval()
    tops, labels, num_classes = [], [], model.fc.out_features
    for images, target, _ in tqdm(iterate(loader), total=len(loader), desc="test", leave=False,
                                  dynamic_ncols=True, disable=not dist.is_main_process()):
        logits = model(images.to(device, non_blocking=True))
        tops.append(logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu())
        labels.append(torch.as_tensor(target))
    top, label = _gather_shards(torch.cat(tops), device), _gather_shards(torch.cat(labels), device)
    if not dist.is_main_process():
        return {}, top, label
    return cls_metrics.metrics_from_topk(top.numpy(), label.numpy(), headline, num_classes), top, label


def _check(p, world: int) -> None:
    if p.batch_size % world:
        raise UserError(f"paper.batch_size={p.batch_size} is not divisible by the {world} "
                        "processes; choose a multiple of the process count")
    if not p.crop_scale[0] <= p.crop_scale[1]:
        raise UserError(f"paper.crop_scale must be [min, max] with min <= max, got {p.crop_scale}")


def _new_fc(model: nn.Module, num_classes: int, seed: int) -> list[nn.Parameter]:
    """main_lincls' fc: N(0, 0.01) weights, zero bias; the only parameters that train."""
    model.fc = nn.Linear(feature_dim(model), num_classes)
    torch.manual_seed(seed)
    model.fc.weight.data.normal_(mean=0.0, std=0.01)
    model.fc.bias.data.zero_()
    return _trainable(model)


def _run_id(run) -> dict:
    """What a checkpoint must match to be continued: same weights, data and recipe."""
    data = asdict(run.cfg.data)
    data.pop("num_workers")
    return {"weights": run.backbone.identity, "seed": run.cfg.seed, "data": data,
            "paper": {k: v for k, v in asdict(run.cfg.paper).items() if k != "resume"}}


def _resume(path: Path, run_id: dict, model: nn.Module, optimizer, log) -> tuple[int, float | None, list]:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if ck.get("run") != run_id:
        raise UserError(f"{path} is from other weights, data or paper.* settings; use a "
                        "new --output folder, delete it, or pass paper.resume=false")
    model.fc.load_state_dict(ck["fc"])
    optimizer.load_state_dict(ck["optimizer"])
    log(f"resumed from {path} at epoch {ck['epoch']}")
    return ck["epoch"], ck.get("best_top1"), ck.get("history", [])


def _loaders(run, train_ds, test_ds, per_rank: int):
    world, rank, workers = dist.get_world_size(), dist.get_rank(), run.cfg.data.num_workers
    train_ds.transform = run.pre.train_transform(run.cfg.paper.crop_scale)
    test_ds.transform = run.pre.eval_transform()
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                 seed=run.cfg.seed)
    pin = run.device.type == "cuda"
    train = DataLoader(train_ds, batch_size=per_rank, sampler=sampler, num_workers=workers,
                       pin_memory=pin, persistent_workers=workers > 0)
    test = DataLoader(test_ds, batch_size=per_rank, num_workers=workers, pin_memory=pin,
                      sampler=_ContiguousShard(len(test_ds), rank, world))
    return train, test


def _train_epoch(net, loader, optimizer, device, desc: str) -> float:
    """One epoch in eval mode (frozen BN, as main_lincls); the mean training loss."""
    net.eval()
    criterion = nn.CrossEntropyLoss()
    bar = tqdm(iterate(loader), total=len(loader), desc=desc, leave=False, dynamic_ncols=True,
               disable=not dist.is_main_process())
    total, seen = 0.0, 0
    for images, target, _ in bar:
        images, target = images.to(device, non_blocking=True), target.to(device)
        loss = criterion(net(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, seen = total + loss.item() * len(target), seen + len(target)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:g}",
                        refresh=False)
    return total / max(seen, 1)


def _schedule(p, lr: float, world: int) -> dict:
    return {"protocol": "paper", "epochs": p.epochs, "global_batch": p.batch_size, "lr_per_256": p.lr,
            "lr": lr, "lr_steps": list(p.lr_steps), "momentum": p.momentum,
            "weight_decay": p.weight_decay, "fit_on": "train + val", "processes": world,
            "bn": "frozen (eval mode)"}


def train_linear_paper(run) -> dict:
    """The protocol on run.splits; returns the task result for transfer.frozen.finish."""
    p, device, log = run.cfg.paper, run.device, run.log
    world = dist.get_world_size()
    _check(p, world)
    per_rank, lr = p.batch_size // world, p.lr * p.batch_size / 256
    log(f"paper protocol: lr {lr:g} = {p.lr:g} x {p.batch_size}/256 (global batch {p.batch_size} "
        f"= {world} x {per_rank}); momentum {p.momentum}, weight decay {p.weight_decay}, "
        f"{p.epochs} epochs, lr x0.1 at {p.lr_steps}, RandomResizedCrop scale {p.crop_scale}")
    model = run.backbone.model
    params = _new_fc(model, len(run.splits["train"].classes), run.cfg.seed)
    model.to(device)
    fc_init = {k: v.detach().clone() for k, v in model.fc.state_dict().items()}
    net = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None,
        broadcast_buffers=False)  # BN buffers are frozen and identical on every rank
    optimizer = torch.optim.SGD(params, lr, momentum=p.momentum, weight_decay=p.weight_decay)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    start, best, history = 0, None, []
    ckpt, run_id = run.output / CHECKPOINT, _run_id(run)
    if p.resume and ckpt.is_file():
        start, best, history = _resume(ckpt, run_id, model, optimizer, log)
    train_loader, test_loader = _loaders(run, concat(run.splits["train"], run.splits["val"]),
                                         run.splits["test"], per_rank)
    metrics, top, labels = {}, None, None
    for epoch in range(start, p.epochs):
        train_loader.sampler.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(lr, epoch, p.lr_steps)
        loss = _train_epoch(net, train_loader, optimizer, device, f"epoch {epoch + 1}/{p.epochs}")
        line = f"epoch {epoch + 1}/{p.epochs}: lr {optimizer.param_groups[0]['lr']:g}, train loss {loss:.4f}"
        if epoch + 1 == p.epochs or (p.eval_every > 0 and (epoch + 1) % p.eval_every == 0):
            metrics, top, labels = evaluate(model, test_loader, device, run.headline)
            if dist.is_main_process():
                best = metrics["top1"] if best is None else max(best, metrics["top1"])
                history.append({"epoch": epoch + 1, **metrics})
                line += ", " + ", ".join(f"test {k} {v:.2f}" for k, v in metrics.items())
        log(line)
        if dist.is_main_process():
            atomic_torch_save({"epoch": epoch + 1, "run": run_id, "fc": model.fc.state_dict(),
                               "optimizer": optimizer.state_dict(), "best_top1": best,
                               "history": history}, ckpt)
    if top is None:  # resumed after the last epoch: score the saved fc
        metrics, top, labels = evaluate(model, test_loader, device, run.headline)
    _prove_frozen(model, run.backbone.reference, fc_init, trained=start < p.epochs, log=log)
    run.derived.update(lr=lr, global_batch=p.batch_size, per_process_batch=per_rank,
                       sanity_check="passed", history=history)
    if not dist.is_main_process():
        return {}
    if len(history) > 1:  # main_lincls reports the best epoch (chosen on the scored split)
        metrics = {**metrics, "best_top1": best}
    return {"metrics": metrics, "engine": "torch", "name": "paper", "schedule": _schedule(p, lr, world),
            "outcomes": frozen.save_outcomes(run, labels.numpy(), topk=top.numpy()),
            "train_transform": {"transform": "RandomResizedCrop + flip", "crop": run.pre.image_size,
                                "scale": list(p.crop_scale)}}


def _prove_frozen(model: nn.Module, reference: dict, fc_init: dict, trained: bool, log) -> None:
    sanity_check(model, reference)
    if trained and all(torch.equal(v, fc_init[k].to(v.device)) for k, v in model.fc.state_dict().items()):
        raise RuntimeError("fc did not change during training")
    log("sanity check passed: backbone bit-identical to the loaded weights, only fc trained")
