"""What the classification tasks share (linear, knn, svm, lowshot, fewshot, finetune):
the data / model / feature config sections, the start of a run (device, the output
folder's lock, the weights, their preprocessing, the train / val / test splits), pooled
features per split, and the end of a run (results.json with a full protocol record and
the per-example outcomes beside it).

Splits (mocobench.datasets.evaluation_splits): settings are chosen on ``val``, the final
model is fit on ``train`` (+ ``val`` where the protocol refits) and ``test`` is scored
once, for the headline.
"""
import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mocobench import dist
from mocobench.config import load_config, setting
from mocobench.data import ImageDataset
from mocobench.datasets import METRICS, REGISTRY, evaluation_splits
from mocobench.errors import UserError
from mocobench.fileio import prepare_output
from transfer import cls_metrics
from transfer.features import (FrozenBackbone, Preprocessing, cached_features, load_frozen_backbone,
                               resolve_preprocessing)
from transfer.outcomes import save_classification
from transfer.results import dataset_fingerprint, protocol_record, start_run, write_results


@dataclass
class DataConfig:
    source: str = "fashion-mnist"  # --data: a registered name (mocobench/datasets.py) or a folder
    root: str | None = None  # --data-root: where registered data sets live (None: $MOCO_BENCH_DATA)
    download: bool = False  # --download: let torchvision fetch a missing registered data set
    # Data sets without a validation split get one carved from train: this share of each class.
    val_fraction: float = setting(0.2, gt=0, lt=1)
    split_seed: int = 0  # seed of that carve
    # test: the headline. val: score the validation split (to choose pretraining settings by
    # it, e.g. in a sweep), choosing this task's own settings on a part carved from train.
    score_split: str = setting("test", choices=("test", "val"))
    max_train_images: int = setting(0, ge=0)  # random subset of each split (0 = all); smoke runs
    max_val_images: int = setting(0, ge=0)
    max_test_images: int = setting(0, ge=0)
    subsample_seed: int = 0
    # Preprocessing travels with the weights: None takes the checkpoint's image_size
    # and normalization when it records them, else default_image_size and ImageNet's mean/std.
    image_size: int | None = setting(None, ge=1)  # crop size
    default_image_size: int = setting(224, ge=1)  # for weights that record none (torchvision, random)
    resize_size: int | None = setting(None, ge=1)  # eval Resize before CenterCrop; None: size*256/224
    mean: list[float] | None = None  # RGB, for ToTensor's [0, 1] range
    std: list[float] | None = None
    num_workers: int = setting(4, ge=0)  # data loader workers per process


@dataclass
class ModelConfig:
    arch: str | None = None  # required with --weights random; else checked against the weights
    init_seed: int = 0  # seed of the random-init baseline's weights


@dataclass
class FeatureConfig:
    batch_size: int = setting(256, ge=1)  # images per extraction batch, per process
    cache: bool = True  # reuse features of identical (weights, data, transform) runs
    cache_dir: str | None = None  # None: $MOCO_BENCH_CACHE/features or ~/.cache/moco-bench/features
    dtype: str = setting("float32", choices=("float32", "float16"))  # float16 halves the cache


@dataclass
class Run:
    """One task's run, from start() to finish()."""
    task: str
    cfg: Any
    output: Path
    device: torch.device
    backbone: FrozenBackbone
    pre: Preprocessing
    splits: dict[str, ImageDataset]
    headline: str  # the metric the data set is reported with (mocobench.datasets.METRICS)
    log: Callable[[str], None]
    t0: float = field(default_factory=time.time)
    derived: dict = field(default_factory=dict)  # values found while running, for results.json


def logger(task: str) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if dist.is_main_process():
            print(f"[{task}] {msg}", flush=True)
    return log


def resolve_device(choice: str) -> torch.device:
    device = dist.init_distributed()
    if choice == "cpu":
        if dist.get_world_size() > 1 and device.type == "cuda":
            raise UserError("device=cpu under torchrun on a GPU machine would mix NCCL and CPU "
                            "tensors; hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on CPUs")
        return torch.device("cpu")
    if choice != "auto":
        raise UserError(f"device={choice!r} is not one of auto, cpu")
    return device


def prepare(output, task: str) -> None:
    """Create, prove writable and lock the output folder before any work (rank 0 only);
    a results.json of an earlier run there is moved aside so that a failure of this run
    cannot leave it for `report` to read as this run's."""
    if not dist.is_main_process():
        return
    prepare_output(output, f"transfer {task}")  # held until this process ends
    start_run(output)


def load_splits(d: DataConfig) -> dict[str, ImageDataset]:
    parts = evaluation_splits(d.source, root=d.root, download=d.download, val_fraction=d.val_fraction,
                              split_seed=d.split_seed, score_split=d.score_split)
    limits = {"train": d.max_train_images, "val": d.max_val_images, "test": d.max_test_images}
    parts = {s: ds.subset(limits[s], d.subsample_seed) for s, ds in parts.items()}
    if len(parts["train"].classes) < 2:
        raise UserError(f"{d.source} has {len(parts['train'].classes)} class; a classifier needs "
                        "at least 2")
    return parts


def headline_metric(source: str, splits: dict) -> str:
    if source in REGISTRY:
        return REGISTRY[source].metric
    return "mAP" if splits["train"].multilabel else "top1"


def start(task: str, cfg, weights: str, output, label: str | None = None, allow_pickle: bool = False,
          device_choice: str = "auto") -> Run:
    """Everything before the task's own work; fills cfg.data's preprocessing fields and
    cfg.model.arch with the values used, so that results.json records them."""
    t0, log = time.time(), logger(task)
    device = resolve_device(device_choice)
    prepare(output, task)
    torch.manual_seed(cfg.seed)
    backbone = load_frozen_backbone(weights, cfg.model.arch, cfg.model.init_seed, label, allow_pickle)
    cfg.model.arch = backbone.arch
    d = cfg.data
    pre = resolve_preprocessing(backbone.meta, d.image_size, d.resize_size, d.mean, d.std,
                                d.default_image_size)
    d.image_size, d.resize_size, d.mean, d.std = pre.image_size, pre.resize_size, pre.mean, pre.std
    splits = load_splits(d)
    run = Run(task, cfg, Path(output), device, backbone, pre, splits,
              headline_metric(d.source, splits), log, t0)
    sizes = " / ".join(f"{len(ds)} {s}" for s, ds in splits.items())
    log(f"{backbone.record['label']} [{backbone.arch}] on {splits['train'].name}: {sizes} images, "
        f"{len(splits['train'].classes)} classes, metric {run.headline}; crop {pre.image_size}, "
        f"resize {pre.resize_size} ({pre.source}); device {device}, {dist.get_world_size()} process(es)")
    backbone.model.to(device).eval()
    run.derived.update(preprocessing_source=pre.source, world_size=dist.get_world_size())
    return run


def split_features(run: Run, names=("train", "val", "test")) -> dict[str, tuple]:
    """{split: (features N x D, labels)} on rank 0 (other ranks: empty tensors), extracted
    with the eval transform or read from the feature cache."""
    f, d = run.cfg.features, run.cfg.data
    out, cache = {}, {}
    limits = {"train": d.max_train_images, "val": d.max_val_images, "test": d.max_test_images}
    for name in names:
        x, y, info = cached_features(
            run.backbone, run.splits[name], name, run.pre, device=run.device, batch_size=f.batch_size,
            num_workers=d.num_workers, cache=f.cache, cache_dir=f.cache_dir, dtype=f.dtype,
            log=run.log, subsample={"max_images": limits[name], "seed": d.subsample_seed,
                                    "split": run.splits[name].split_info})
        out[name], cache[name] = (x, y), info["cache"]
    run.derived["feature_cache"] = cache
    return out


def dataset_record(run: Run) -> dict:
    """results.json's "dataset": what was read, split by split."""
    d, train = run.cfg.data, run.splits["train"]
    splits = run.splits
    return {"name": train.name, "splits": {s: len(ds) for s, ds in splits.items()},
            "num_classes": len(train.classes), "classes": list(train.classes),
            "multilabel": train.multilabel,
            "split_info": {s: ds.split_info for s, ds in splits.items()},
            "subsample": {"max_train_images": d.max_train_images, "max_val_images": d.max_val_images,
                          "max_test_images": d.max_test_images, "seed": d.subsample_seed}}


def protocol_dataset(run: Run) -> dict:
    """The protocol's "dataset": name, split sizes, classes, and a fingerprint of the split
    lists and class names (two runs on other images differ there)."""
    train = run.splits["train"]
    return {"name": train.name, "splits": {s: len(ds) for s, ds in run.splits.items()},
            "classes": len(train.classes),
            "fingerprint": dataset_fingerprint(train.classes,
                                               {s: ds.ids() for s, ds in run.splits.items()})}


def input_record(pre: Preprocessing, train_transform: dict | None = None) -> dict:
    return {"test": {"transform": "Resize + CenterCrop", **pre.describe()},
            **({"train": train_transform} if train_transform else {})}


def metric_definition(key: str, headline: str, how: str) -> dict:
    """protocol["metric"]: the headline metric's name in results (`key`, e.g. "knn_top1")
    and its definition (the data set's metric `headline`, and how the scores were made)."""
    return {key: f"{METRICS[headline]}; {how}"}


def save_outcomes(run: Run, labels, scores=None, topk=None, ids=None) -> dict:
    """Per-example outcomes of the scored split: top-5 class ids for accuracies, full
    scores for average precision (multi-label labels: 1 / 0 / -1 ignored)."""
    labels = np.asarray(labels)
    if scores is not None and labels.ndim == 1:
        topk, scores = cls_metrics.topk_ids(scores, 5), None
    return save_classification(run.output, labels, topk=topk, scores=scores,
                               ids=ids if ids is not None else run.splits["test"].ids())


def finish(run: Run, *, metrics: dict, engine: str, name: str, metric: dict, schedule: dict,
           config: dict, outcomes: dict | None, train_transform: dict | None = None) -> Path | None:
    """Write results.json (rank 0); returns its path (None on other ranks)."""
    if not dist.is_main_process():
        return None
    protocol = protocol_record(name=name, task=run.task, engine=engine, metric=metric,
                               schedule=schedule, input=input_record(run.pre, train_transform),
                               dataset=protocol_dataset(run))
    wall = time.time() - run.t0
    path = write_results(run.output, task=run.task, dataset=dataset_record(run),
                         weights=run.backbone.record, engine=engine, protocol=protocol,
                         config={**config, "derived": run.derived}, seed=run.cfg.seed,
                         wall_time_s=wall, metrics=metrics, outcomes=outcomes)
    shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if v is not None)
    run.log(f"{shown}  ({wall:.1f} s) -> {path}")
    return path


def run_task(task: str, cfg, weights: str, output, label: str | None, allow_pickle: bool,
             body: Callable[[Run], dict], config: Callable[[Any], dict]) -> dict:
    """start(), the task's `body` (returns finish()'s keyword arguments on rank 0, {} on the
    others), finish() with the config record `config(cfg)`. Returns {"metrics", "derived",
    "path": results.json or None on ranks other than 0}."""
    run = start(task, cfg, weights, output, label, allow_pickle, cfg.device)
    result = body(run)
    path = finish(run, config=config(cfg), **result) if dist.is_main_process() else None
    dist.barrier()
    return {"metrics": result.get("metrics", {}), "derived": run.derived, "path": path}


# ----------------------------------------------------------------------------- command line

def parser(task: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m transfer {task}", description=description)
    p.add_argument("--weights", required=True,
                   help="checkpoint (any layout converters reads) or 'random' with --arch")
    p.add_argument("--data", help=f"registered data set ({', '.join(REGISTRY)}) or ImageNet-layout "
                                  "folder (train/<class>/, val/<class>/[, test/<class>/]); sets data.source")
    p.add_argument("--data-root", help="folder holding the registered data sets (default "
                                       "$MOCO_BENCH_DATA); sets data.root")
    p.add_argument("--download", action="store_true",
                   help="let torchvision download a missing registered data set (connected machines)")
    p.add_argument("--output", required=True, help="folder for results.json and the outcomes")
    p.add_argument("--config", help="YAML config, e.g. configs/classification/*.yaml")
    p.add_argument("--label", help="human label of the weights in results and tables")
    p.add_argument("--arch", help="sets model.arch (required with --weights random)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read checkpoints holding pickled Python objects (only trusted files)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. data.max_train_images=2000")
    return p


def main(task: str, description: str, config_cls, run: Callable, argv, extra=None) -> dict:
    """The command line of a task: parse (`extra(parser)` adds the task's own flags and
    returns a function applying them to the config), load the config, `run(task, cfg,
    weights, output, label, allow_pickle)`, always leave the process group."""
    p = parser(task, description)
    apply = extra(p) if extra else None
    args = p.parse_args(argv)
    cfg = load_cli_config(config_cls, args)
    if apply:
        apply(cfg, args)
    try:
        return run(task, cfg, args.weights, args.output, args.label, args.allow_pickle)
    finally:
        dist.destroy()


def load_cli_config(config_cls, args):
    """The config from --config and key=value overrides, then the flags (which win; set
    directly so that paths need no YAML quoting)."""
    cfg = load_config(config_cls, args.config, args.overrides)
    if args.data:
        cfg.data.source = args.data
    if args.data_root:
        cfg.data.root = args.data_root
    if args.download:
        cfg.data.download = True
    if args.arch:
        cfg.model.arch = args.arch
    return cfg
