"""Full fine-tuning of backbone + a new linear head, and the semi-supervised ImageNet protocol
(1% / 10% of the labels).

    python -m transfer finetune --config configs/classification/finetune_ericsson.yaml \\
        --weights W --data dtd --data-root /datasets --output DIR
    torchrun --nproc_per_node 8 -m transfer finetune \\
        --config configs/classification/imagenet_semisup_1pct.yaml --data /datasets/imagenet \\
        --weights W --output DIR subset.file=/datasets/simclr/1percent.txt

The model trains (BN in training mode; SyncBatchNorm across GPUs under torchrun, as SwAV's
eval_semisup.py) on train + val and is scored once on test; with data.score_split=val it
trains on train and scores val, which is how settings are chosen (ssl-transfer's
finetune.py searches lr x weight decay on val, then refits on train + val). SGD with
momentum; a step schedule per epoch (SwAV) or cosine per iteration over `steps` (ssl-transfer);
the head may take its own learning rate. A checkpoint after every epoch lets a killed run
resume where it stopped (same weights, data and settings only).

Semi-supervised: `subset.fraction` of the training images, class-balanced: the file names
listed in `subset.file` (SimCLR's imagenet_subsets/1percent.txt / 10percent.txt, as SwAV reads
them) or, without a file, round(fraction x n_c) images of each class drawn with `subset.seed`;
the list used is written to DIR/subset.txt and fingerprinted in the protocol.
"""
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from mocobench import dist
from mocobench.config import setting, to_dict
from mocobench.data import ImageDataset, carve, concat, iterate, single_labels
from mocobench.errors import UserError, cli
from mocobench.fileio import atomic_torch_save, atomic_write
from transfer import cls_metrics, frozen
from transfer.features import _ContiguousShard, _gather_shards, feature_dim
from transfer.frozen import DataConfig, ModelConfig

CHECKPOINT = "checkpoint.pth"


@dataclass
class FinetuneSettings:
    epochs: int = setting(20, ge=1)  # when steps is 0
    steps: int = setting(0, ge=0)  # > 0: train this many iterations instead (cosine schedule)
    batch_size: int = setting(256, ge=1)  # global, over all processes
    lr: float = setting(0.01, gt=0)  # backbone
    head_lr: float | None = setting(None, gt=0)  # the new fc (None: lr)
    schedule: str = setting("step", choices=("step", "cosine"))
    lr_steps: list[int] = field(default_factory=lambda: [12, 16])  # epochs where lr x lr_gamma
    lr_gamma: float = setting(0.2, gt=0)
    momentum: float = setting(0.9, ge=0)
    nesterov: bool = False
    weight_decay: float = setting(0.0, ge=0)
    crop_scale: list[float] = setting([0.08, 1.0], length=2, gt=0, le=1)  # RandomResizedCrop area
    sync_bn: bool = True  # SyncBatchNorm under torchrun on GPUs (gloo on CPUs cannot sync BN)
    resume: bool = True  # continue from DIR/checkpoint.pth when it is there


@dataclass
class SubsetSettings:
    fraction: float | None = setting(None, gt=0, le=1)  # of the training images, per class
    file: str | None = None  # image file names to keep, one a line (SimCLR's subset lists)
    seed: int = 0  # of the draw when there is no file


@dataclass
class FinetuneConfig:
    seed: int = 0
    device: str = setting("auto", choices=("auto", "cpu"))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    subset: SubsetSettings = field(default_factory=SubsetSettings)


# ----------------------------------------------------------------------------- labelled subset

def labelled_subset(fit: ImageDataset, s: SubsetSettings) -> tuple[ImageDataset, dict]:
    """The training images the run may use, and how they were chosen."""
    if s.file:
        path = Path(s.file).expanduser()
        if not path.is_file():
            raise UserError(f"subset.file {path} does not exist; pass SimCLR's 1percent.txt / "
                            "10percent.txt or drop subset.file to draw a class-balanced subset")
        # Matched by file name: SimCLR's lists name ImageNet files (n01440764_10026.JPEG).
        wanted = [Path(line.strip()).name for line in path.read_text().splitlines() if line.strip()]
        by_name = {Path(sample.path or sample.name(i)).name: i for i, sample in enumerate(fit.samples)}
        missing = [w for w in wanted if w not in by_name]
        if missing:
            raise UserError(f"{len(missing)} of the {len(wanted)} images in {path} are not in the "
                            f"training split, e.g. {missing[0]}; check --data and the list")
        keep = sorted(by_name[w] for w in wanted)
        how = {"file": str(path), "images": len(keep)}
    elif s.fraction is not None and s.fraction < 1:
        _, keep = carve(single_labels(fit.samples), s.fraction, s.seed)
        how = {"fraction": s.fraction, "seed": s.seed, "per_class": True, "images": len(keep)}
    else:
        return fit, {}
    sub = fit.select(keep)
    sub.split_info = {"labelled subset": how, "of": fit.split_info}
    return sub, how


# ----------------------------------------------------------------------------- training

def _model(run: frozen.Run, num_classes: int, device) -> nn.Module:
    model = run.backbone.model
    model.fc = nn.Linear(feature_dim(model), num_classes)
    torch.manual_seed(run.cfg.seed)
    model.fc.weight.data.normal_(mean=0.0, std=0.01)
    model.fc.bias.data.zero_()
    for p in model.parameters():
        p.requires_grad = True
    if dist.get_world_size() > 1 and device.type == "cuda" and run.cfg.finetune.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device)


def _optimizer(model: nn.Module, s: FinetuneSettings) -> torch.optim.Optimizer:
    head = [p for n, p in model.named_parameters() if n.startswith("fc.")]
    trunk = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    groups = [{"params": trunk, "lr": s.lr, "base_lr": s.lr},
              {"params": head, "lr": s.head_lr or s.lr, "base_lr": s.head_lr or s.lr}]
    return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, nesterov=s.nesterov,
                           weight_decay=s.weight_decay)


def lr_factor(s: FinetuneSettings, epoch: int, step: int, total_steps: int) -> float:
    """Step: x lr_gamma at each epoch of lr_steps passed (SwAV). Cosine: per iteration to 0."""
    if s.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / max(total_steps, 1)))
    return s.lr_gamma ** sum(epoch >= m for m in s.lr_steps)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if target.ndim == 1:
        return F.cross_entropy(logits, target)
    keep = (target != -1).float()  # multi-label: "difficult" entries ignored
    return F.binary_cross_entropy_with_logits(logits, (target == 1).float(), weight=keep)


def _run_id(run: frozen.Run) -> dict:
    data = asdict(run.cfg.data)
    data.pop("num_workers")
    return {"weights": run.backbone.identity, "seed": run.cfg.seed, "data": data,
            "finetune": {k: v for k, v in asdict(run.cfg.finetune).items() if k != "resume"},
            "subset": asdict(run.cfg.subset)}


def _resume(run, model, optimizer) -> tuple[int, int, list]:
    path = run.output / CHECKPOINT
    if not (run.cfg.finetune.resume and path.is_file()):
        return 0, 0, []
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if ck.get("run") != _run_id(run):
        raise UserError(f"{path} is from other weights, data or finetune settings; use a new "
                        "--output folder, delete it, or pass finetune.resume=false")
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["rng"])  # the augmentation draws continue as if never stopped
    run.log(f"resumed from {path} at epoch {ck['epoch']} (step {ck['step']})")
    return ck["epoch"], ck["step"], ck["history"]


def _epoch(net, loader, optimizer, run, epoch: int, step: int, total: int) -> tuple[int, float]:
    """One pass over the training images (or up to `total` steps); (steps done, mean loss)."""
    s, device = run.cfg.finetune, run.device
    net.train()
    losses = []
    bar = tqdm(iterate(loader), total=len(loader), desc=f"epoch {epoch + 1}", leave=False,
               dynamic_ncols=True, disable=not dist.is_main_process())
    for images, target, _ in bar:
        if step >= total:
            break
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(s, epoch, step, total)
        loss = _loss(net(images.to(device, non_blocking=True)), target.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return step, float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def evaluate(model, loader, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores N x C, labels) of the sharded test split, gathered on rank 0."""
    model.eval()
    scores, labels = [], []
    for images, target, _ in tqdm(iterate(loader), total=len(loader), desc="test", leave=False,
                                  dynamic_ncols=True, disable=not dist.is_main_process()):
        scores.append(model(images.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(target))
    return _gather_shards(torch.cat(scores), device), _gather_shards(torch.cat(labels), device)


def _loaders(run, fit: ImageDataset, test: ImageDataset, per_rank: int):
    world, rank, workers = dist.get_world_size(), dist.get_rank(), run.cfg.data.num_workers
    fit.transform = run.pre.train_transform(run.cfg.finetune.crop_scale)
    test.transform = run.pre.eval_transform()
    pin = run.device.type == "cuda"
    sampler = DistributedSampler(fit, num_replicas=world, rank=rank, shuffle=True, seed=run.cfg.seed,
                                 drop_last=len(fit) >= per_rank * world)
    return (DataLoader(fit, batch_size=per_rank, sampler=sampler, num_workers=workers, pin_memory=pin,
                       drop_last=len(fit) >= per_rank * world, persistent_workers=workers > 0),
            DataLoader(test, batch_size=per_rank, num_workers=workers, pin_memory=pin,
                       sampler=_ContiguousShard(len(test), rank, world)))


def train(run: frozen.Run, fit: ImageDataset) -> tuple[nn.Module, DataLoader]:
    """The fine-tuned model (resumed where a checkpoint says), and the test split's loader."""
    s, device, world = run.cfg.finetune, run.device, dist.get_world_size()
    if s.batch_size % world:
        raise UserError(f"finetune.batch_size={s.batch_size} is not divisible by the {world} "
                        "processes; choose a multiple of the process count")
    per_rank = s.batch_size // world
    model = _model(run, len(fit.classes), device)
    net = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = _optimizer(model, s)
    epoch, step, history = _resume(run, model, optimizer)
    train_loader, test_loader = _loaders(run, fit, run.splits["test"], per_rank)
    total = s.steps or s.epochs * len(train_loader)
    run.log(f"fine-tuning {len(fit)} images for {total} steps of {s.batch_size} ({world} x {per_rank}): "
            f"lr {s.lr:g} (head {s.head_lr or s.lr:g}), {s.schedule} schedule, momentum {s.momentum}, "
            f"weight decay {s.weight_decay}")
    while step < total:
        train_loader.sampler.set_epoch(epoch)
        step, loss = _epoch(net, train_loader, optimizer, run, epoch, step, total)
        epoch += 1
        history.append({"epoch": epoch, "step": step, "train_loss": loss})
        run.log(f"epoch {epoch}: step {step}/{total}, train loss {loss:.4f}")
        if dist.is_main_process():
            atomic_torch_save({"epoch": epoch, "step": step, "run": _run_id(run), "history": history,
                               "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "rng": torch.get_rng_state()}, run.output / CHECKPOINT)
    run.derived.update(steps=total, per_process_batch=per_rank, history=history)
    return model, test_loader


def backbone_change(model: nn.Module, reference: dict) -> float:
    """||theta - theta_0|| / ||theta_0|| over the loaded backbone's float tensors."""
    state = {k.replace("module.", ""): v for k, v in model.state_dict().items()}
    num = den = 0.0
    for k, v in reference.items():
        if v.is_floating_point():
            num += (state[k].float().cpu() - v.float()).pow(2).sum().item()
            den += v.float().pow(2).sum().item()
    return math.sqrt(num / max(den, 1e-30))


def _finetune(run: frozen.Run) -> dict:
    fit, how = labelled_subset(concat(run.splits["train"], run.splits["val"]), run.cfg.subset)
    if dist.is_main_process() and how:
        atomic_write(run.output / "subset.txt",
                     lambda tmp: Path(tmp).write_text("\n".join(fit.ids()) + "\n"))
    run.splits = {"train": fit, "val": fit.select([]), "test": run.splits["test"]}
    model, test_loader = train(run, fit)
    scores, labels = evaluate(model, test_loader, run.device)
    run.derived["backbone_change"] = backbone_change(model, run.backbone.reference)
    if not dist.is_main_process():
        return {}
    s = run.cfg.finetune
    schedule = {k: v for k, v in asdict(s).items() if k != "resume"}
    schedule.update(fit_on="train + val" + (" (labelled subset)" if how else ""), subset=how,
                    processes=dist.get_world_size(), bn="trained" + (", synchronised" if s.sync_bn else ""))
    return {"metrics": cls_metrics.classification_metrics(scores, labels.numpy(), run.headline),
            "engine": "torch", "name": "semisup" if how else "finetune",
            "schedule": schedule,
            "metric": frozen.metric_definition(run.headline, run.headline, "fine-tuned backbone + fc"),
            "outcomes": frozen.save_outcomes(run, labels.numpy(), scores=scores.numpy()),
            "train_transform": {"transform": "RandomResizedCrop + flip", "crop": run.pre.image_size,
                                "scale": list(s.crop_scale)}}


def run(task: str, cfg: FinetuneConfig, weights: str, output, label: str | None = None,
        allow_pickle: bool = False) -> dict:
    return frozen.run_task(task, cfg, weights, output, label, allow_pickle, _finetune, to_dict)


@cli
def main_finetune(argv=None) -> dict:
    return frozen.main("finetune", "Full fine-tuning (and semi-supervised 1% / 10% subsets)",
                       FinetuneConfig, run, argv)
