"""Linear probe and weighted kNN on a frozen backbone.

    python -m transfer linear --weights W --data fashion-mnist --output DIR \\
        [--protocol fast|paper] [--config configs/linear/X.yaml] [--label L] [key=value ...]
    python -m transfer knn    --weights W --data DATA --output DIR [...]
    torchrun --nproc_per_node 8 -m transfer linear --protocol paper ...

Protocols:
- ``paper``: MoCo's main_lincls recipe (transfer.linear_paper): frozen backbone
  in eval mode, only fc trains with SGD, lr 30 per 256 images, 100 epochs.
- ``fast``: pooled features extracted once with the eval transform and cached
  (transfer.features), then multinomial logistic regression with the L2
  strength chosen on held-out training images (transfer.logreg).
- ``knn`` (its own task): weighted kNN, k=200, T=0.1, cosine, on the same
  cached features (mocobench.knn).

W is a checkpoint `converters.load_backbone` reads, or ``random`` with
``--arch`` for the random-init baseline. Each run writes DIR/results.json.
"""
import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mocobench import dist
from mocobench.config import load_config, to_dict
from mocobench.data import build_dataset
from mocobench.errors import UserError, cli
from mocobench.knn import topk_accuracy, weighted_knn
from transfer import logreg
from transfer.features import cached_features, load_frozen_backbone, resolve_preprocessing
from transfer.results import write_results

PROTOCOLS = ("fast", "paper")


@dataclass
class DataConfig:
    source: str = "fashion-mnist"  # --data: a registered name or an ImageNet-layout folder
    max_train_images: int = 0  # random subset of the train split (0 = all); for smoke runs
    max_val_images: int = 0  # random subset of the val split (0 = all)
    subsample_seed: int = 0
    # Preprocessing travels with the weights: None takes the checkpoint's image_size
    # and normalization when it records them, else default_image_size and ImageNet's mean/std.
    image_size: int | None = None  # crop size
    default_image_size: int = 224  # for weights that record none (torchvision files, random init)
    resize_size: int | None = None  # eval Resize before CenterCrop; None = image_size * 256/224
    mean: list[float] | None = None  # RGB, for ToTensor's [0, 1] range
    std: list[float] | None = None
    num_workers: int = 4  # data loader workers per process


@dataclass
class ModelConfig:
    arch: str | None = None  # required with --weights random; else checked against the weights
    init_seed: int = 0  # seed of the random-init baseline's weights


@dataclass
class FeatureConfig:
    batch_size: int = 256  # images per extraction batch, per process
    cache: bool = True  # reuse features of identical (weights, data, transform) runs
    cache_dir: str | None = None  # None: $MOCO_BENCH_CACHE/features or ~/.cache/moco-bench/features
    dtype: str = "float32"  # float16 halves the cache (ImageNet train: 5 GB instead of 10)


@dataclass
class FastConfig:
    solver: str = "auto"  # sklearn | torch | auto (sklearn up to sklearn_max_elements values)
    sklearn_max_elements: int = 20_000_000  # ~40k x 512 or ~10k x 2048 features
    # L2 strengths (of the mean loss, on standardised features) tried on the held-out part.
    l2_grid: list[float] = field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    holdout_fraction: float = 0.2  # of the training split, for choosing l2; then refit on all
    select_max_images: int = 0  # fit the l2 search on at most this many of the rest (0 = all)
    max_iter: int = 1000  # L-BFGS iterations per fit
    tol: float = 1e-4


@dataclass
class PaperConfig:
    # MoCo main_lincls.py defaults (moco@7397dfe, README "Linear Classification").
    epochs: int = 100
    batch_size: int = 256  # global, over all processes
    lr: float = 30.0  # per 256 images, scaled linearly to the global batch
    lr_steps: list[int] = field(default_factory=lambda: [60, 80])  # epochs where lr x 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area
    eval_every: int = 1  # evaluate every N epochs (0 = only after the last); the last always is
    resume: bool = True  # continue from DIR/checkpoint.pth when it is there


@dataclass
class KnnConfig:
    k: int = 200  # neighbours (Wu et al. 2018; MoCo's CIFAR demo)
    temperature: float = 0.1


@dataclass
class LinearConfig:
    protocol: str = "fast"  # --protocol: fast | paper
    seed: int = 0
    device: str = "auto"  # auto (the GPU torchrun assigns, else CPU) | cpu
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    fast: FastConfig = field(default_factory=FastConfig)
    paper: PaperConfig = field(default_factory=PaperConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)


def _log(msg: str) -> None:
    if dist.is_main_process():
        print(f"[linear] {msg}", flush=True)


def _build_data(cfg: LinearConfig):
    d = cfg.data
    train = build_dataset(d.source, "train", None, d.max_train_images, d.subsample_seed)
    val = build_dataset(d.source, "val", None, d.max_val_images, d.subsample_seed)
    if train.classes != val.classes:
        raise UserError(f"{d.source}: train/ and val/ have different class folders "
                        f"({len(train.classes)} vs {len(val.classes)}); make them the same")
    if len(train.classes) < 2:
        raise UserError(f"{d.source} has {len(train.classes)} class; a classifier needs at least 2")
    return train, val


def _dataset_record(cfg: LinearConfig, train, val) -> dict:
    d = cfg.data
    return {"name": train.name,
            "splits": {"train": len(train), "val": len(val)},
            "num_classes": len(train.classes),
            "subsample": {"max_train_images": d.max_train_images,
                          "max_val_images": d.max_val_images, "seed": d.subsample_seed}}


def _device(cfg: LinearConfig) -> torch.device:
    device = dist.init_distributed()
    if cfg.device == "cpu":
        if dist.get_world_size() > 1 and device.type == "cuda":
            raise UserError("device=cpu under torchrun on a GPU machine would mix NCCL and CPU "
                            "tensors; hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on CPUs")
        return torch.device("cpu")
    if cfg.device != "auto":
        raise UserError(f"device={cfg.device!r} is not one of auto, cpu")
    return device


def _features(cfg, backbone, pre, train, val, device):
    common = dict(device=device, batch_size=cfg.features.batch_size,
                  num_workers=cfg.data.num_workers, cache=cfg.features.cache,
                  cache_dir=cfg.features.cache_dir, dtype=cfg.features.dtype, log=_log)
    sub = lambda n: {"max_images": n, "seed": cfg.data.subsample_seed}  # noqa: E731
    xtr, ytr, itr = cached_features(backbone, train, "train", pre,
                                    subsample=sub(cfg.data.max_train_images), **common)
    xva, yva, iva = cached_features(backbone, val, "val", pre,
                                    subsample=sub(cfg.data.max_val_images), **common)
    return xtr, ytr, xva, yva, {"train": itr["cache"], "val": iva["cache"]}


def _config_record(cfg: LinearConfig, task: str, derived: dict) -> dict:
    """The resolved config with only the sections this task used, plus derived values."""
    out = to_dict(cfg)
    keep = {"knn": {"knn"}, "fast": {"fast"}, "paper": {"paper"}}[
        "knn" if task == "knn" else cfg.protocol]
    for section in ("fast", "paper", "knn"):
        if section not in keep:
            out.pop(section)
    if task == "knn":
        out.pop("protocol")
    if task == "linear" and cfg.protocol == "paper":
        out.pop("features")
    out["derived"] = derived
    return out


def run(task: str, cfg: LinearConfig, weights: str, output, label: str | None = None,
        allow_pickle: bool = False) -> dict:
    """Evaluate `weights` with `task` ("linear" or "knn"); write output/results.json.

    Returns {"metrics": ..., "derived": ..., "path": results.json or None (non-main ranks)}."""
    t0 = time.time()
    if task == "linear" and cfg.protocol not in PROTOCOLS:
        raise UserError(f"protocol {cfg.protocol!r} is not one of {', '.join(PROTOCOLS)}")
    device = _device(cfg)
    if dist.is_main_process():
        _check_output(Path(output))
    torch.manual_seed(cfg.seed)
    backbone = load_frozen_backbone(weights, cfg.model.arch, cfg.model.init_seed, label,
                                    allow_pickle)
    cfg.model.arch = backbone.arch
    pre = resolve_preprocessing(backbone.meta, cfg.data.image_size, cfg.data.resize_size,
                                cfg.data.mean, cfg.data.std, cfg.data.default_image_size)
    cfg.data.image_size, cfg.data.resize_size = pre.image_size, pre.resize_size
    cfg.data.mean, cfg.data.std = pre.mean, pre.std
    train, val = _build_data(cfg)
    num_classes = len(train.classes)
    what = "knn" if task == "knn" else f"linear ({cfg.protocol} protocol)"
    _log(f"{what}: {backbone.record['label']} [{backbone.arch}] on {train.name}: "
         f"{len(train)} train / {len(val)} val images, {num_classes} classes; "
         f"crop {pre.image_size}, resize {pre.resize_size} ({pre.source}); device {device}, "
         f"{dist.get_world_size()} process(es)")
    backbone.model.to(device).eval()
    derived = {"preprocessing_source": pre.source, "world_size": dist.get_world_size()}

    if task == "linear" and cfg.protocol == "paper":
        from transfer.linear_paper import train_linear_paper

        metrics, more = train_linear_paper(cfg, backbone, pre, train, val, device, output, _log)
        derived.update(more)
        engine = "torch"
    else:
        xtr, ytr, xva, yva, cache = _features(cfg, backbone, pre, train, val, device)
        derived["feature_cache"] = cache
        metrics, engine = {}, "torch"
        if dist.is_main_process():
            if task == "knn":
                metrics, more = _knn(cfg, xtr, ytr, xva, yva, num_classes, device)
            else:
                metrics, more = _fast(cfg, xtr, ytr, xva, yva, num_classes, device)
                engine = more["solver"]
            derived.update(more)

    path = None
    if dist.is_main_process():
        wall = time.time() - t0
        path = write_results(
            output, task=task, dataset=_dataset_record(cfg, train, val), weights=backbone.record,
            engine=engine, protocol=_protocol_name(task, cfg), config=_config_record(cfg, task, derived),
            seed=cfg.seed, wall_time_s=wall, metrics=metrics)
        shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
        _log(f"{shown}  ({wall:.1f} s) -> {path}")
    dist.barrier()
    return {"metrics": metrics, "derived": derived, "path": path}


def _check_output(out: Path) -> None:
    """Fail before any work, not after an hour of training, when results cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out} ({e.strerror}); choose another --output") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"output folder {out} is not writable; choose another --output")


def _protocol_name(task: str, cfg: LinearConfig) -> str:
    if task == "knn":
        return f"k{cfg.knn.k}_T{cfg.knn.temperature:g}"
    return cfg.protocol


def _fast(cfg, xtr, ytr, xva, yva, num_classes, device):
    f = cfg.fast
    solver = logreg.choose_solver(f.solver, xtr, f.sklearn_max_elements)
    _log(f"logistic regression ({solver}) on {tuple(xtr.shape)} features, "
         f"l2 grid {f.l2_grid} chosen on {f.holdout_fraction:.0%} held out")
    clf, record = logreg.select_and_fit(xtr, ytr, num_classes, f.l2_grid, f.holdout_fraction,
                                        solver, f.max_iter, f.tol, device, cfg.seed,
                                        f.select_max_images, log=_log)
    acc = topk_accuracy(clf.scores(xva, device), yva)
    metrics = {"top1": acc[1]}
    if 5 in acc:
        metrics["top5"] = acc[5]
    return metrics, record


def _knn(cfg, xtr, ytr, xva, yva, num_classes, device):
    k, t = cfg.knn.k, cfg.knn.temperature
    _log(f"weighted kNN (k={k}, T={t:g}, cosine) of {len(xva)} val on {len(xtr)} train features")
    scores = weighted_knn(xtr, ytr, xva, num_classes, k=k, temperature=t, device=device)
    acc = topk_accuracy(scores, yva)
    metrics = {"knn_top1": acc[1]}
    if 5 in acc:
        metrics["knn_top5"] = acc[5]
    return metrics, {"k_used": min(k, len(xtr))}


def _parser(task: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m transfer {task}",
        description=("Linear probe of a frozen backbone" if task == "linear"
                     else "Weighted kNN (cosine) on frozen features"))
    p.add_argument("--weights", required=True,
                   help="checkpoint (any layout converters reads) or 'random' with --arch")
    p.add_argument("--data", help="registered data set (fashion-mnist) or ImageNet-layout folder "
                                  "(train/<class>/, val/<class>/); sets data.source")
    p.add_argument("--output", required=True, help="folder for results.json")
    if task == "linear":
        p.add_argument("--protocol", choices=PROTOCOLS, help="sets protocol (default: fast)")
    p.add_argument("--config", help="YAML config, e.g. configs/linear/fashion_mnist_demo.yaml")
    p.add_argument("--label", help="human label of the weights in results and tables")
    p.add_argument("--arch", help="sets model.arch (required with --weights random)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read checkpoints holding pickled Python objects (only trusted files)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. data.max_train_images=2000 paper.epochs=10")
    return p


def _main(task: str, argv) -> dict:
    args = _parser(task).parse_args(argv)
    cfg = load_config(LinearConfig, args.config, args.overrides)
    # Flags win over the YAML; set directly so paths need no YAML quoting.
    if args.data:
        cfg.data.source = args.data
    if args.arch:
        cfg.model.arch = args.arch
    if task == "linear" and args.protocol:
        cfg.protocol = args.protocol
    try:
        return run(task, cfg, args.weights, args.output, args.label, args.allow_pickle)
    finally:
        dist.destroy()


@cli
def main_linear(argv=None) -> dict:
    return _main("linear", argv)


@cli
def main_knn(argv=None) -> dict:
    return _main("knn", argv)


def main(argv=None) -> dict:
    return main_linear(argv)
