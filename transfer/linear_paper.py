"""The paper's linear classification protocol: MoCo main_lincls.py (moco@7397dfe).

Frozen backbone in eval mode (BN statistics stay fixed: "it is not legitimate to
change any part of the pre-trained model"), a fresh fc (N(0, 0.01), bias 0) is
the only trained layer; SGD momentum 0.9, weight decay 0, lr 30 per 256 images
scaled linearly to the global batch (printed), x0.1 at epochs 60 and 80 of 100;
RandomResizedCrop + flip for training, Resize(size*256/224) + CenterCrop to
evaluate. Afterwards `sanity_check` proves every backbone tensor (BN running
statistics included) is bit-identical to the loaded weights.

Runs as one process or under torchrun (DistributedDataParallel over the fc;
the global batch is split over the processes; validation is sharded and the
counts summed, so each image is scored exactly once).
"""
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from mocobench import dist
from mocobench.data import iterate
from mocobench.errors import UserError
from mocobench.fileio import atomic_torch_save
from transfer.features import _ContiguousShard, feature_dim

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
def evaluate(model: nn.Module, loader, device, num_classes: int) -> dict[str, float]:
    """Top-1/top-5 over the whole (sharded) validation set."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)  # images, top-1 hits, top-5 hits
    k5 = min(5, num_classes)
    for images, target, _ in tqdm(iterate(loader), total=len(loader), desc="val", leave=False,
                                  dynamic_ncols=True, disable=not dist.is_main_process()):
        target = target.to(device)
        top = model(images.to(device, non_blocking=True)).topk(k5, dim=1).indices
        hit = top == target[:, None]
        counts += torch.tensor([len(target), hit[:, 0].sum().item(), hit.any(1).sum().item()],
                               dtype=torch.float64)
    world = dist.get_world_size()
    # all_reduce_mean of a count times the world size is the sum over ranks.
    total = [dist.all_reduce_mean(c, device) * world for c in counts.tolist()]
    out = {"top1": 100.0 * total[1] / max(total[0], 1)}
    if num_classes > 5:
        out["top5"] = 100.0 * total[2] / max(total[0], 1)
    return out


def train_linear_paper(cfg, backbone, pre, train_ds, val_ds, device, output, log
                       ) -> tuple[dict, dict]:
    p = cfg.paper
    world, rank = dist.get_world_size(), dist.get_rank()
    if p.batch_size % world:
        raise UserError(f"paper.batch_size={p.batch_size} is not divisible by the {world} "
                        "processes; choose a multiple of the process count")
    if p.epochs < 1:
        raise UserError(f"paper.epochs must be >= 1, got {p.epochs}")
    if len(p.crop_scale) != 2 or not 0 < p.crop_scale[0] <= p.crop_scale[1] <= 1:
        raise UserError(f"paper.crop_scale must be [min, max] with 0 < min <= max <= 1, "
                        f"got {p.crop_scale}")
    per_rank = p.batch_size // world
    lr = p.lr * p.batch_size / 256
    log(f"paper protocol: lr {lr:g} = {p.lr:g} x {p.batch_size}/256 (global batch {p.batch_size} "
        f"= {world} x {per_rank}); momentum {p.momentum}, weight decay {p.weight_decay}, "
        f"{p.epochs} epochs, lr x0.1 at {p.lr_steps}, RandomResizedCrop scale {p.crop_scale}")

    num_classes = len(train_ds.classes)
    model = backbone.model
    model.fc = nn.Linear(feature_dim(model), num_classes)
    torch.manual_seed(cfg.seed)
    model.fc.weight.data.normal_(mean=0.0, std=0.01)
    model.fc.bias.data.zero_()
    params = _trainable(model)
    model.to(device)
    fc_init = {k: v.detach().clone() for k, v in model.fc.state_dict().items()}
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None,
            broadcast_buffers=False)  # BN buffers are frozen and identical on every rank
    optimizer = torch.optim.SGD(params, lr, momentum=p.momentum, weight_decay=p.weight_decay)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    start_epoch, best, history = 0, None, []
    ckpt_path = Path(output) / CHECKPOINT if output else None
    # A checkpoint continues only the run it came from: same weights, data and recipe.
    run_id = {"weights": backbone.identity, "seed": cfg.seed, "data": asdict(cfg.data),
              "paper": {k: v for k, v in asdict(p).items() if k != "resume"}}
    run_id["data"].pop("num_workers")
    if p.resume and ckpt_path and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck.get("run") != run_id:
            raise UserError(f"{ckpt_path} is from other weights, data or paper.* settings; use a "
                            "new --output folder, delete it, or pass paper.resume=false")
        model.fc.load_state_dict(ck["fc"])
        optimizer.load_state_dict(ck["optimizer"])
        start_epoch, best, history = ck["epoch"], ck.get("best_top1"), ck.get("history", [])
        log(f"resumed from {ckpt_path} at epoch {start_epoch}")

    train_ds.transform = pre.train_transform(p.crop_scale)
    val_ds.transform = pre.eval_transform()
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.seed)
    pin = device.type == "cuda"
    workers = cfg.data.num_workers
    train_loader = DataLoader(train_ds, batch_size=per_rank, sampler=sampler, num_workers=workers,
                              pin_memory=pin, persistent_workers=workers > 0)
    val_loader = DataLoader(val_ds, batch_size=per_rank, num_workers=workers, pin_memory=pin,
                            sampler=_ContiguousShard(len(val_ds), rank, world))
    criterion = nn.CrossEntropyLoss()

    metrics = {}
    for epoch in range(start_epoch, p.epochs):
        sampler.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(lr, epoch, p.lr_steps)
        net.eval()  # frozen BN: main_lincls trains in eval mode
        bar = tqdm(iterate(train_loader), total=len(train_loader), desc=f"epoch {epoch + 1}/{p.epochs}", leave=False,
                   dynamic_ncols=True, disable=not dist.is_main_process())
        total_loss, seen = 0.0, 0
        for images, target, _ in bar:
            images, target = images.to(device, non_blocking=True), target.to(device)
            loss = criterion(net(images), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(target)
            seen += len(target)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:g}")
        last = epoch + 1 == p.epochs
        line = f"epoch {epoch + 1}/{p.epochs}: lr {optimizer.param_groups[0]['lr']:g}, " \
               f"train loss {total_loss / max(seen, 1):.4f}"
        if last or (p.eval_every > 0 and (epoch + 1) % p.eval_every == 0):
            metrics = evaluate(model, val_loader, device, num_classes)
            best = metrics["top1"] if best is None else max(best, metrics["top1"])
            history.append({"epoch": epoch + 1, **metrics})
            line += ", " + ", ".join(f"val {k} {v:.2f}" for k, v in metrics.items())
        log(line)
        if output and dist.is_main_process():
            atomic_torch_save({"epoch": epoch + 1, "run": run_id,
                               "fc": model.fc.state_dict(), "optimizer": optimizer.state_dict(),
                               "best_top1": best, "history": history}, ckpt_path)
    if not metrics:  # resumed after the last epoch: score the saved fc
        metrics = evaluate(model, val_loader, device, num_classes)

    sanity_check(model, backbone.reference)
    if all(torch.equal(v, fc_init[k].to(v.device)) for k, v in model.fc.state_dict().items()) \
            and start_epoch < p.epochs:
        raise RuntimeError("fc did not change during training")
    log("sanity check passed: backbone bit-identical to the loaded weights, only fc trained")
    if len(history) > 1:
        metrics = {**metrics, "best_top1": best}
    derived = {"lr": lr, "global_batch": p.batch_size, "per_process_batch": per_rank,
               "sanity_check": "passed", "history": history}
    return metrics, derived
