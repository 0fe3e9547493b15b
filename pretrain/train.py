"""The MoCo training loop: one function, `train(cfg, output_dir)`, top to bottom.

World size 1 (plain ``python``) and N (``torchrun``) run the same code. Every
checkpoint holds what an exact resume needs: both encoders, queue and pointer,
optimizer, grad scaler, epoch, step and RNG state.
"""
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mocobench import dist
from mocobench.config import save_config, to_dict
from mocobench.data import build_dataset, iterate
from mocobench.errors import UserError
from mocobench.fileio import PRETRAIN_CHECKPOINT_FORMAT, atomic_torch_save, ensure_room, git_sha, tensor_digest
from pretrain.builder import Supervised, backbone
from pretrain.config import PretrainConfig, bn_splits, check, method_name
from pretrain.data import EpochSampler, TwoCrops, eval_transform, moco_augmentation
from pretrain.device_augment import WorkerHalf, colour_batch
from pretrain.dictionary import ConsistencyProbe, build_contrastive, key_encoder, max_key_age

CHECKPOINT_FORMAT = PRETRAIN_CHECKPOINT_FORMAT
LAST = "checkpoint_last.pth"


# ============ schedule ============
def learning_rate(cfg: PretrainConfig, epoch: int) -> float:
    """Base LR scaled to the global batch, then the per-epoch schedule (main_moco.py)."""
    t = cfg.train
    lr = t.lr * t.batch_size / 256
    if t.schedule == "cos":
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / t.epochs))
    return lr * 0.1 ** sum(epoch >= s for s in t.lr_steps)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, topk=(1, 5)) -> list[float]:
    top = logits.topk(max(topk), dim=1).indices
    hit = top.eq(labels.view(-1, 1))
    return [100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in topk]


# ============ checkpoints ============
def save_checkpoint(path, model, optimizer, scaler, cfg, epoch, epoch_step, step):
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "arch": cfg.model.arch,
        "method": method_name(cfg),
        "backbone_prefix": "encoder." if cfg.method == "supervised" else "encoder_q.",
        "epoch": epoch,  # completed epochs
        "epoch_step": epoch_step,  # optimizer steps into epoch `epoch` (0 at an epoch end)
        "step": step,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "normalization": {"mean": cfg.data.mean, "std": cfg.data.std, "input_format": "RGB"},
        "image_size": cfg.data.image_size,
        "config": to_dict(cfg),
        "world_size": dist.get_world_size(),
        "git_sha": git_sha(),
    }
    ckpt["checksum"] = tensor_digest(ckpt)
    try:
        atomic_torch_save(ckpt, path)  # temp file + rename: the previous file stays until then
    except OSError as e:
        raise UserError(f"cannot write checkpoint {path} ({e.strerror or e}); the previous checkpoint "
                        "is intact: free disk space or choose another --output, then re-run to resume"
                        ) from None


def load_checkpoint(path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist; pass an existing file to --resume") from None
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is truncated or "
                        "corrupt: resume from an earlier checkpoint_epNNNN.pth") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a pretrain checkpoint (format {CHECKPOINT_FORMAT}); "
                        "--resume takes a checkpoint written by python -m pretrain")
    if ckpt.get("checksum") != tensor_digest({k: v for k, v in ckpt.items() if k != "checksum"}):
        raise UserError(f"checkpoint {path} is corrupt (checksum mismatch); "
                        "resume from an earlier checkpoint_epNNNN.pth")
    return ckpt


def find_resume(out: Path):
    """The newest valid checkpoint in `out` (last, then periodic ones), or (None, None).
    A broken file is reported in one line and skipped, never silently used."""
    periodic = sorted(out.glob("checkpoint_ep*.pth"), reverse=True)
    candidates = [p for p in [out / LAST, *periodic] if p.exists()]
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            if dist.is_main_process():
                print(f"warning: skipping {e}", file=sys.stderr, flush=True)
    if candidates:
        raise UserError(f"no valid checkpoint in {out} ({len(candidates)} found, all broken); "
                        "remove them to start afresh or pass --resume with a good file")
    return None, None


def check_disk_space(out: Path, model: nn.Module, optimizer) -> None:
    """Refuse to start a run whose checkpoints cannot be written: a checkpoint holds the
    model, the optimizer's buffers, and while being replaced exists twice."""
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    n_bytes += sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"])
    ensure_room(out, 2 * n_bytes, "checkpoints")


# ============ kNN monitor ============
def knn_monitor(cfg: PretrainConfig, encoder: nn.Module, device) -> float:
    """Weighted kNN top-1 (k=200, T=0.1, cosine) of the query encoder's pooled features."""
    from mocobench.knn import extract_features, weighted_knn

    d, t = cfg.data, cfg.train
    tf = eval_transform(d.image_size, d.mean, d.std)
    train_set = build_dataset(d.source, "train", tf, t.knn_max_train, seed=t.seed)
    val_set = build_dataset(d.source, "val", tf, t.knn_max_val, seed=t.seed)
    features = backbone(encoder).eval()
    loader = lambda ds: DataLoader(ds, batch_size=256, num_workers=d.num_workers)  # noqa: E731
    with torch.no_grad():
        x_train, y_train = extract_features(features, loader(train_set), device, "knn bank")
        x_val, y_val = extract_features(features, loader(val_set), device, "knn val")
    pred = weighted_knn(x_train, y_train, x_val, len(train_set.classes), k=200, temperature=0.1)
    if pred.dim() > 1:  # scores per class
        pred = pred.argmax(dim=1)
    encoder.train()
    return 100.0 * (pred.cpu() == y_val.cpu()).float().mean().item()


# ============ training ============
def train(cfg: PretrainConfig, output_dir, resume: str | None = None) -> Path:
    device = dist.init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    check(cfg, world)
    d, m, t = cfg.data, cfg.moco, cfg.train
    out = Path(output_dir)
    main = dist.is_main_process()
    if main:
        ensure_room(out, 0, "the run's files")  # the size check follows once the model exists
        save_config(cfg, out / "config.yaml")

    torch.manual_seed(t.seed)
    images = build_dataset(d.source, "train", max_images=d.max_images, seed=t.seed,
                           max_unreadable=d.max_unreadable)
    if len(images) < t.batch_size:
        raise UserError(f"{len(images)} training images is fewer than one global batch of "
                        f"{t.batch_size}; lower train.batch_size or add data")
    colour_on = d.colour_on if d.colour_on != "auto" else "device" if device.type == "cuda" else "worker"
    if colour_on == "device":  # workers crop and flip; colour runs batched on the device
        augmentation = WorkerHalf(d.augmentation, d.image_size, d.crop_scale)
    else:
        augmentation = moco_augmentation(d.augmentation, d.image_size, d.mean, d.std, d.crop_scale)

    def to_input(view):
        """A batch of views as the model takes them, on the device."""
        if colour_on == "worker":
            return view.to(device, non_blocking=True)
        pixels, params = view
        return colour_batch(pixels.to(device, non_blocking=True), params, augmentation.recipe,
                            d.mean, d.std)
    dataset = TwoCrops(images, augmentation, t.seed,
                       key_view=cfg.method == "moco" and m.dictionary != "memory_bank")
    steps_per_epoch = len(images) // t.batch_size
    total_steps = steps_per_epoch * t.epochs if t.max_steps <= 0 else min(
        t.max_steps, steps_per_epoch * t.epochs)

    splits = bn_splits(cfg, world)
    supervised = cfg.method == "supervised"
    if supervised:
        model = Supervised(cfg.model.arch, len(images.classes))
    else:
        if m.dictionary == "memory_bank" and m.queue_size > len(images):
            raise UserError(f"moco.queue_size {m.queue_size} is more negatives than the memory bank's "
                            f"{len(images)} images; lower moco.queue_size")
        model = build_contrastive(cfg, len(images), splits)
    query_encoder = model.encoder if supervised else model.encoder_q  # the one that learns
    if m.bn == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr0 = t.lr * t.batch_size / 256
    optimizer = torch.optim.SGD(query_encoder.parameters(), lr0, momentum=t.sgd_momentum,
                                weight_decay=t.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if t.amp == "fp16" else None
    if t.amp == "fp16" and device.type != "cuda":
        raise UserError("train.amp=fp16 needs a GPU; use train.amp=bf16 on CPU")

    # ---- resume: an explicit file, else DIR/checkpoint_last.pth if present ----
    start_epoch, epoch_step, step = 0, 0, 0
    if main:
        check_disk_space(out, model, optimizer)
    resume_path, ckpt = (resume, load_checkpoint(resume)) if resume else find_resume(out)
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if torch.cuda.is_available() and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        start_epoch, epoch_step, step = ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]
        if main:
            print(f"resumed from {resume_path}: epoch {start_epoch}, step {step}", flush=True)

    ddp = model
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    if main:
        per_rank = t.batch_size // world
        if supervised:
            print(f"supervised baseline: {cfg.model.arch}, {len(images.classes)} classes, "
                  f"aug {d.augmentation} (crop area {d.crop_scale[0]:g}-{d.crop_scale[1]:g})", flush=True)
        else:
            print(f"MoCo ({method_name(cfg)}): {cfg.model.arch}, dictionary {m.dictionary}, "
                  f"K={t.batch_size if m.dictionary == 'end_to_end' else m.queue_size}, m={m.momentum}, "
                  f"T={m.temperature}, {'MLP' if m.mlp else 'linear'} head, aug {d.augmentation} "
                  f"(crop area {d.crop_scale[0]:g}-{d.crop_scale[1]:g}, colour on the {colour_on}), "
                  f"BN: {m.bn} ({splits} group(s) per rank)", flush=True)
        print(f"batch: world size {world} x {per_rank} per rank = global {t.batch_size}; "
              f"lr {t.lr} x {t.batch_size}/256 = {lr0:g} ({t.schedule}); device {device.type}", flush=True)
        print(f"scale: {len(images)} images of {d.source} at {d.image_size} px, {t.epochs} epochs "
              f"({steps_per_epoch} steps each), stopping after {total_steps} steps "
              "(paper: 1.28M ImageNet images at 224 px, ResNet-50, 200 epochs)", flush=True)

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if t.amp == "bf16" else torch.float16)
                if t.amp != "none" else nullcontext())
    criterion = nn.CrossEntropyLoss()
    log = open(out / "log.jsonl", "a") if main else None
    bar = tqdm(total=total_steps, initial=step, disable=not main, desc="pretrain", unit="step",
               dynamic_ncols=True, file=sys.stdout,
               mininterval=0.1 if sys.stdout.isatty() else 10.0)  # logs get a line per 10 s
    last_finite_loss = None
    probe = None
    if t.consistency_every and not supervised:
        probe_set = build_dataset(d.source, "train", eval_transform(d.image_size, d.mean, d.std),
                                  t.consistency_images, seed=t.seed + 1)
        probe = ConsistencyProbe(torch.stack([probe_set[i][0] for i in range(len(probe_set))]),
                                 max_key_age(cfg, steps_per_epoch), t.batch_size // world)

    for epoch in range(start_epoch, t.epochs):
        if step >= total_steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, epoch)
        dataset.epoch = epoch
        sampler = EpochSampler(len(images), t.batch_size, rank, world, t.seed, epoch, epoch_step)
        loader = DataLoader(dataset, batch_size=t.batch_size // world, sampler=sampler,
                            num_workers=d.num_workers, pin_memory=device.type == "cuda",
                            drop_last=True, persistent_workers=False,
                            # its own generator: creating a loader must not draw from the global
                            # RNG, which the batch shuffle uses and resume restores
                            generator=torch.Generator().manual_seed(t.seed + epoch))
        tic, done_here = time.perf_counter(), 0
        for im_q, im_k, targets, index in iterate(loader):
            im_q = to_input(im_q)
            im_k = to_input(im_k) if dataset.key_view else im_q
            if t.channels_last:
                im_q = im_q.contiguous(memory_format=torch.channels_last)
                im_k = im_k.contiguous(memory_format=torch.channels_last)
            with autocast:
                if supervised:
                    logits, labels = ddp(im_q), targets.to(device)
                else:
                    logits, labels = ddp(im_q, im_k, index.to(device))
                loss = criterion(logits.float(), labels)
            if not torch.isfinite(loss):
                # Stop before the optimizer writes non-finite weights; the last checkpoint is good.
                raise UserError(
                    f"loss is {loss.item()} at step {step + 1} (last finite loss {last_finite_loss}); "
                    f"resume from {out / LAST} with a lower train.lr or train.amp=none")
            last_finite_loss = round(loss.item(), 4)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            step += 1
            epoch_step += 1
            done_here += 1
            images_per_sec = done_here * t.batch_size / max(time.perf_counter() - tic, 1e-9)
            if step % t.print_freq == 0 or step == total_steps:
                acc1, acc5 = accuracy(logits.float(), labels)
                record = {"epoch": epoch, "step": step, "loss": dist.all_reduce_mean(loss.item()),
                          "acc1": acc1, "acc5": acc5, "lr": optimizer.param_groups[0]["lr"],
                          "images_per_sec": round(images_per_sec, 2)}
                if main:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
            if probe is not None and step % t.consistency_every == 0:
                by_age = probe(key_encoder(model), step)
                if main:
                    log.write(json.dumps({"epoch": epoch, "step": step, "consistency": {
                        str(age): round(cos, 5) for age, cos in by_age.items()}}) + "\n")
                    log.flush()
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{images_per_sec:.0f}", epoch=epoch)
            bar.update(1)
            if t.save_every_steps and step % t.save_every_steps == 0 and main:
                save_checkpoint(out / LAST, model, optimizer, scaler, cfg, epoch, epoch_step, step)
            if step >= total_steps:
                break
        finished_epoch = epoch_step == steps_per_epoch
        done_epochs, epoch_step = (epoch + 1, 0) if finished_epoch else (epoch, epoch_step)
        if main:
            save_checkpoint(out / LAST, model, optimizer, scaler, cfg, done_epochs, epoch_step, step)
            if finished_epoch and t.save_every_epochs and done_epochs % t.save_every_epochs == 0:
                save_checkpoint(out / f"checkpoint_ep{done_epochs:04d}.pth", model, optimizer,
                                scaler, cfg, done_epochs, 0, step)
        if finished_epoch and t.knn_every_epochs and done_epochs % t.knn_every_epochs == 0 and main:
            knn_top1 = knn_monitor(cfg, query_encoder, device)
            bar.write(f"epoch {done_epochs}: kNN top-1 {knn_top1:.2f}")
            log.write(json.dumps({"epoch": done_epochs, "step": step, "knn_top1": knn_top1}) + "\n")
            log.flush()
        dist.barrier()
    bar.close()
    if log:
        log.close()
    dist.barrier()
    return out / LAST
