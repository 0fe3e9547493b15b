"""The MoCo training run: `train(cfg, output_dir)`, in the order it happens.

    own the output folder -> find the checkpoint to resume -> data -> model and optimizer
    -> restore -> the epochs (steps, logs, checkpoints, kNN monitor)

World size 1 (plain ``python``) and N (``torchrun``) run the same code. Checkpoints
(pretrain/checkpoint.py) hold what an exact resume needs.
"""
import inspect
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mocobench import dist
from mocobench.config import save_config
from mocobench.data import build_dataset, iterate
from mocobench.errors import UserError
from mocobench.fileio import prepare_output, remove_stale_temporaries
from pretrain.builder import Supervised, backbone
from pretrain.checkpoint import (LAST, LOG, Progress, check_disk_space, check_resumable, find_resume,
                                 load_checkpoint, make_checkpoint, periodic_name, restore, rng_states,
                                 save_checkpoint, truncate_log)
from pretrain.config import PretrainConfig, bn_splits, check, method_name
from pretrain.data import EpochSampler, TwoCrops, eval_transform, moco_augmentation
from pretrain.device_augment import WorkerHalf, colour_batch
from pretrain.dictionary import ConsistencyProbe, build_contrastive, key_encoder, max_key_age


# ============ schedule ============
def scaled_lr(cfg: PretrainConfig) -> float:
    """The base LR scaled linearly to the global batch (main_moco.py's lr is per 256)."""
    return cfg.train.lr * cfg.train.batch_size / 256


def learning_rate(cfg: PretrainConfig, epoch: int) -> float:
    """The scaled LR under the per-epoch schedule (main_moco.py)."""
    t = cfg.train
    if t.schedule == "cos":
        return scaled_lr(cfg) * 0.5 * (1.0 + math.cos(math.pi * epoch / t.epochs))
    return scaled_lr(cfg) * 0.1 ** sum(epoch >= s for s in t.lr_steps)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, topk=(1, 5)) -> list[float]:
    top = logits.topk(max(topk), dim=1).indices
    hit = top.eq(labels.view(-1, 1))
    return [100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in topk]


# ============ the parts of a run ============
@dataclass
class Run:
    """What the epochs need, built once."""
    cfg: PretrainConfig
    device: torch.device
    out: Path
    images: object  # the training ImageDataset
    loader: DataLoader
    sampler: EpochSampler
    to_input: object  # a loader view -> the model's input on the device
    key_view: bool  # whether the model encodes a second view
    model: nn.Module
    ddp: nn.Module  # the model as the step calls it (DDP-wrapped when distributed)
    query_encoder: nn.Module  # the encoder that learns
    optimizer: torch.optim.Optimizer
    scaler: object
    steps_per_epoch: int
    total_steps: int
    colour_on: str  # where the colour half of the augmentation runs: worker or device


def build_data(cfg: PretrainConfig, images, device: torch.device):
    """(loader, sampler, to_input, key_view, colour_on): the two-crop views of `images`."""
    d, t = cfg.data, cfg.train
    colour_on = d.colour_on if d.colour_on != "auto" else "device" if device.type == "cuda" else "worker"
    if colour_on == "device":  # workers crop and flip; colour runs batched on the device
        augmentation = WorkerHalf(d.augmentation, d.image_size, d.crop_scale)
    else:
        augmentation = moco_augmentation(d.augmentation, d.image_size, d.mean, d.std, d.crop_scale)

    def to_input(view):
        if colour_on == "worker":
            x = view.to(device, non_blocking=True)
        else:  # the parameter rows stay on the CPU: colour_batch plans from them without a sync
            pixels, params = view
            x = colour_batch(pixels.to(device, non_blocking=True), params, augmentation.recipe,
                             d.mean, d.std)
        return x.contiguous(memory_format=torch.channels_last) if t.channels_last else x

    key_view = cfg.method == "moco" and cfg.moco.dictionary != "memory_bank"
    dataset = TwoCrops(images, augmentation, t.seed, key_view=key_view)
    world = dist.get_world_size()
    sampler = EpochSampler(len(images), t.batch_size, dist.get_rank(), world, t.seed)
    # Built once, its workers kept between epochs (the sampler tells them the epoch); its own
    # generator: creating a loader iterator must not draw from the global RNG, which the
    # batch shuffle uses and resume restores.
    loader = DataLoader(dataset, batch_size=t.batch_size // world, sampler=sampler,
                        num_workers=d.num_workers, pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=d.num_workers > 0,
                        generator=torch.Generator().manual_seed(t.seed))
    return loader, sampler, to_input, key_view, colour_on


def build_model(cfg: PretrainConfig, images, device: torch.device):
    """(model, query_encoder, optimizer, scaler) on `device`."""
    m, t = cfg.moco, cfg.train
    if cfg.method == "supervised":
        model = Supervised(cfg.model.arch, len(images.classes))
        query_encoder = model.encoder
    else:
        if m.dictionary == "memory_bank" and m.queue_size > len(images):
            raise UserError(f"moco.queue_size {m.queue_size} is more negatives than the memory bank's "
                            f"{len(images)} images; lower moco.queue_size")
        model = build_contrastive(cfg, len(images), bn_splits(cfg, dist.get_world_size()))
        query_encoder = model.encoder_q
        if m.bn == "sync":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(query_encoder.parameters(), learning_rate(cfg, 0),
                                momentum=t.sgd_momentum, weight_decay=t.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if t.amp == "fp16" else None
    return model, query_encoder, optimizer, scaler


def wrap_ddp(cfg: PretrainConfig, model: nn.Module, device: torch.device) -> nn.Module:
    if dist.get_world_size() == 1:
        return model
    # broadcast_buffers off for MoCo: every rank writes every rank's keys, so the queue or
    # memory bank is the same everywhere by construction, and re-sending rank 0's each step
    # costs its size (a 1.28M-image bank is 655 MB a step). BN running statistics then stay
    # each rank's own, as its BN saw its own sub-batch; checkpoints hold rank 0's, exactly
    # what the broadcast would have left there.
    ddp = nn.parallel.DistributedDataParallel
    sync = cfg.method == "supervised"  # torch >= 2.14 names it forward_sync_buffers
    buffers = ({"forward_sync_buffers": sync} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": sync})
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **buffers)


def build_run(cfg: PretrainConfig, images, device: torch.device, out: Path) -> Run:
    t = cfg.train
    if len(images) < t.batch_size:
        raise UserError(f"{len(images)} training images is fewer than one global batch of "
                        f"{t.batch_size}; lower train.batch_size or add data")
    loader, sampler, to_input, key_view, colour_on = build_data(cfg, images, device)
    model, query_encoder, optimizer, scaler = build_model(cfg, images, device)
    steps_per_epoch = len(images) // t.batch_size
    total_steps = steps_per_epoch * t.epochs
    if t.max_steps > 0:
        total_steps = min(t.max_steps, total_steps)
    return Run(cfg, device, out, images, loader, sampler, to_input, key_view, model, model,
               query_encoder, optimizer, scaler, steps_per_epoch, total_steps, colour_on)


def print_banner(run: Run) -> None:
    cfg, d, m, t = run.cfg, run.cfg.data, run.cfg.moco, run.cfg.train
    world = dist.get_world_size()
    crops = f"aug {d.augmentation} (crop area {d.crop_scale[0]:g}-{d.crop_scale[1]:g}"
    if cfg.method == "supervised":
        print(f"supervised baseline: {cfg.model.arch}, {len(run.images.classes)} classes, {crops})",
              flush=True)
    else:
        k = t.batch_size if m.dictionary == "end_to_end" else m.queue_size
        print(f"MoCo ({method_name(cfg)}): {cfg.model.arch}, dictionary {m.dictionary}, K={k}, "
              f"m={m.momentum}, T={m.temperature}, {'MLP' if m.mlp else 'linear'} head, {crops}, "
              f"colour on the {run.colour_on}), BN: {m.bn} ({bn_splits(cfg, world)} group(s) per rank)",
              flush=True)
    print(f"batch: world size {world} x {t.batch_size // world} per rank = global {t.batch_size}; "
          f"lr {t.lr} x {t.batch_size}/256 = {scaled_lr(cfg):g} ({t.schedule}); device "
          f"{run.device.type}", flush=True)
    precision = "fp32" if t.amp == "none" else f"{t.amp} autocast (logits and loss in fp32)"
    cudnn = f", cudnn.benchmark {'on' if torch.backends.cudnn.benchmark else 'off'}" \
        if run.device.type == "cuda" else ""
    print(f"precision: {precision}, channels_last {'on' if t.channels_last else 'off'}{cudnn}",
          flush=True)
    print(f"scale: {len(run.images)} images of {d.source} at {d.image_size} px, {t.epochs} epochs "
          f"({run.steps_per_epoch} steps each), stopping after {run.total_steps} steps "
          "(paper: 1.28M ImageNet images at 224 px, ResNet-50, 200 epochs)", flush=True)


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
    scores = weighted_knn(x_train, y_train, x_val, len(train_set.classes), k=200, temperature=0.1)
    encoder.train()
    return 100.0 * (scores.argmax(dim=1) == y_val.cpu()).float().mean().item()


# ============ the epochs ============
class Epochs:
    """The training loop and what it writes: log.jsonl, the progress bar, checkpoints."""

    def __init__(self, run: Run, progress: Progress):
        self.run, self.progress = run, progress
        cfg, t = run.cfg, run.cfg.train
        self.main = dist.is_main_process()
        self.log = open(run.out / LOG, "a") if self.main else None
        # Logs that are not a terminal (SLURM, bench stage logs) get a line per 10 s, not per step.
        self.bar = tqdm(total=run.total_steps, initial=progress.step, disable=not self.main,
                        desc="pretrain", unit="step", dynamic_ncols=True, file=sys.stdout,
                        mininterval=0.1 if sys.stdout.isatty() else 10.0)
        self.autocast = (torch.autocast(run.device.type, dtype=getattr(torch, {"bf16": "bfloat16",
                         "fp16": "float16"}[t.amp])) if t.amp != "none" else nullcontext())
        self.criterion = nn.CrossEntropyLoss()
        self.last_loss = None  # the last finite loss, for the message if one is not
        self.probe = None
        if t.consistency_every and cfg.method == "moco":
            d = cfg.data
            probe_set = build_dataset(d.source, "train", eval_transform(d.image_size, d.mean, d.std),
                                      t.consistency_images, seed=t.seed + 1)
            self.probe = ConsistencyProbe(torch.stack([probe_set[i][0] for i in range(len(probe_set))]),
                                          max_key_age(cfg, run.steps_per_epoch),
                                          t.batch_size // dist.get_world_size())

    def write(self, record: dict) -> None:
        if self.main:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()

    def save(self, path: Path) -> None:
        """Every rank's RNG states are gathered (a collective), rank 0 writes."""
        r = self.run
        rng = rng_states()
        if self.main:
            save_checkpoint(path, make_checkpoint(r.cfg, r.model, r.optimizer, r.scaler, self.progress,
                                                  rng, len(r.images)))

    def step(self, im_q, im_k, targets, index) -> tuple[float, torch.Tensor, torch.Tensor]:
        r = self.run
        im_q = r.to_input(im_q)
        im_k = r.to_input(im_k) if r.key_view else im_q
        with self.autocast:
            if r.cfg.method == "supervised":
                logits, labels = r.ddp(im_q), targets.to(r.device, non_blocking=True)
            else:
                logits, labels = r.ddp(im_q, im_k, index.to(r.device, non_blocking=True))
            loss = self.criterion(logits.float(), labels)
        loss_value = loss.item()  # the step's one wait for the device: the check below needs it
        if not math.isfinite(loss_value):
            # Stop before the optimizer writes non-finite weights; the last checkpoint is good.
            raise UserError(
                f"loss is {loss_value} at step {self.progress.step + 1} (last finite loss "
                f"{self.last_loss}); resume from {r.out / LAST} with train.amp=none, or start a new "
                "run (another --output) with a lower train.lr")
        self.last_loss = round(loss_value, 4)
        r.optimizer.zero_grad(set_to_none=True)
        if r.scaler is not None:
            r.scaler.scale(loss).backward()
            r.scaler.step(r.optimizer)
            r.scaler.update()
        else:
            loss.backward()
            r.optimizer.step()
        return loss_value, logits, labels

    def after_step(self, epoch: int, loss_value: float, logits, labels, images_per_sec: float) -> None:
        r, t, p = self.run, self.run.cfg.train, self.progress
        if p.step % t.print_freq == 0 or p.step == r.total_steps:
            acc1, acc5 = accuracy(logits.float(), labels)
            self.write({"epoch": epoch, "step": p.step, "loss": dist.all_reduce_mean(loss_value, r.device),
                        "acc1": acc1, "acc5": acc5, "lr": r.optimizer.param_groups[0]["lr"],
                        "images_per_sec": round(images_per_sec, 2)})
        if self.probe is not None and p.step % t.consistency_every == 0:
            by_age = self.probe(key_encoder(r.model), p.step)
            self.write({"epoch": epoch, "step": p.step,
                        "consistency": {str(age): round(cos, 5) for age, cos in by_age.items()}})
        # refresh=False: set_postfix would otherwise redraw the bar (a log line) every step
        self.bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{images_per_sec:.0f}", epoch=epoch,
                             refresh=False)
        self.bar.update(1)
        if t.save_every_steps and p.step % t.save_every_steps == 0:
            self.save(r.out / LAST)

    def epoch(self, epoch: int) -> None:
        r, t, p = self.run, self.run.cfg.train, self.progress
        for group in r.optimizer.param_groups:
            group["lr"] = learning_rate(r.cfg, epoch)
        r.sampler.set_epoch(epoch, p.epoch_step)
        tic, done_here = time.perf_counter(), 0
        for im_q, im_k, targets, index in iterate(r.loader):
            loss_value, logits, labels = self.step(im_q, im_k, targets, index)
            p.step, p.epoch_step, done_here = p.step + 1, p.epoch_step + 1, done_here + 1
            images_per_sec = done_here * t.batch_size / max(time.perf_counter() - tic, 1e-9)
            self.after_step(epoch, loss_value, logits, labels, images_per_sec)
            if p.step >= r.total_steps:
                break
        finished = p.epoch_step == r.steps_per_epoch
        if finished:
            p.epoch, p.epoch_step = epoch + 1, 0
        self.save(r.out / LAST)
        if finished and t.save_every_epochs and p.epoch % t.save_every_epochs == 0:
            self.save(r.out / periodic_name(p.epoch))
        if finished and t.knn_every_epochs and p.epoch % t.knn_every_epochs == 0 and self.main:
            knn_top1 = knn_monitor(r.cfg, r.query_encoder, r.device)
            self.bar.write(f"epoch {p.epoch}: kNN top-1 {knn_top1:.2f}")
            self.write({"epoch": p.epoch, "step": p.step, "knn_top1": knn_top1})
        dist.barrier()  # the other ranks wait for rank 0's checkpoint and kNN

    def run_all(self) -> None:
        try:
            for epoch in range(self.progress.epoch, self.run.cfg.train.epochs):
                if self.progress.step >= self.run.total_steps:
                    break
                self.epoch(epoch)
        finally:
            self.bar.close()
            if self.log:
                self.log.close()


# ============ the run ============
def _own_output(out: Path):
    """Rank 0 locks the output folder for the whole run (a second run into it is refused in
    one line) and removes what killed saves left; the other ranks write nothing there."""
    if not dist.is_main_process():
        return nullcontext()
    lock = prepare_output(out, "pretraining")
    for name in ("checkpoint_*.pth", "config.yaml", LOG):
        remove_stale_temporaries(out, name)
    return lock


def train(cfg: PretrainConfig, output_dir, resume: str | None = None) -> Path:
    device = dist.init_distributed()
    check(cfg, dist.get_world_size(), device.type)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: autotune once (main_moco.py)
    out = Path(output_dir)
    with _own_output(out):
        resume_path, ckpt = (resume, load_checkpoint(resume)) if resume else find_resume(out)
        torch.manual_seed(cfg.train.seed)
        d = cfg.data
        images = build_dataset(d.source, "train", max_images=d.max_images, seed=cfg.train.seed,
                               max_unreadable=d.max_unreadable)
        if ckpt is not None:
            check_resumable(ckpt, cfg, resume_path, len(images))
        if dist.is_main_process():  # only now: a refused resume leaves the folder as it was
            save_config(cfg, out / "config.yaml")
            truncate_log(out / LOG, ckpt["step"] if ckpt is not None else 0)
        run = build_run(cfg, images, device, out)
        if dist.is_main_process():
            check_disk_space(out, run.model, run.optimizer)
        progress = Progress()
        if ckpt is not None:
            progress = restore(ckpt, resume_path, run.model, run.optimizer, run.scaler)
            if dist.is_main_process():
                print(f"resumed from {resume_path}: epoch {progress.epoch}, step {progress.step}", flush=True)
        del ckpt  # the weights live in the model now
        run.ddp = wrap_ddp(cfg, run.model, device)
        if dist.is_main_process():
            print_banner(run)
        Epochs(run, progress).run_all()
        dist.barrier()
    return out / LAST
