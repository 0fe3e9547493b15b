"""Scoring a `transfer segment` run, and the record of what was measured.

The test split is scored by mmseg's own IoUMetric (its mIoU / mAcc / aAcc are the reported
numbers). A subclass registered beside it also keeps one confusion matrix per test image
(rows ground truth, columns prediction, ignore-label pixels excluded), written with
``transfer.outcomes.save_segmentation`` so that `report` can bootstrap over test images;
summed over the images they give the same mIoU (``metrics_from_confusion``).

Imported only after ``mocobench.mmseg_compat.import_mmseg()`` has succeeded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from mocobench.errors import UserError
from mocobench.mmseg_compat import import_mmseg

import_mmseg()
from mmseg.evaluation import IoUMetric  # noqa: E402
from mmseg.registry import METRICS  # noqa: E402

METRIC = "MocoBenchPerImageIoUMetric"


@METRICS.register_module(name=METRIC, force=True)
class PerImageIoUMetric(IoUMetric):
    """IoUMetric that also keeps each test image's confusion matrix. After evaluation, on the
    process that computed the metrics (rank 0), ``per_image`` is (image paths, (N, C, C) int64)."""

    per_image = None

    def process(self, data_batch, data_samples) -> None:
        n = len(self.dataset_meta["classes"])
        for sample in data_samples:
            pred = sample["pred_sem_seg"]["data"].squeeze()
            label = sample["gt_sem_seg"]["data"].squeeze().to(pred)
            keep = label != self.ignore_index
            pairs = label[keep].long() * n + pred[keep].long()
            confusion = torch.bincount(pairs, minlength=n * n).reshape(n, n).cpu()
            self.results.append((*self.intersect_and_union(pred, label, n, self.ignore_index),
                                 confusion, sample["img_path"]))

    def compute_metrics(self, results: list) -> dict:
        self.per_image = ([r[5] for r in results], torch.stack([r[4] for r in results]).numpy())
        return super().compute_metrics([r[:4] for r in results])


def use_per_image_metric(cfg) -> int:
    """Score the test split with PerImageIoUMetric; return its ignore label. Only mmseg's
    IoUMetric with its default definition is accepted: outcomes and report follow it."""
    ev = cfg.get("test_evaluator")
    items = ev if isinstance(ev, (list, tuple)) else [ev]
    kind = str(items[0].get("type", "")).split(".")[-1] if len(items) == 1 and isinstance(items[0], dict) else None
    if kind not in ("IoUMetric", METRIC):
        raise UserError(f"test_evaluator is {ev!r}; transfer segment scores with one mmseg IoUMetric "
                        "(test_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU']))")
    metric = dict(items[0])
    if metric.get("nan_to_num") is not None or metric.get("format_only"):
        raise UserError("test_evaluator sets nan_to_num or format_only; transfer segment reports IoUMetric's "
                        "default definition (classes absent from ground truth and prediction are skipped): "
                        "remove them")
    metric["type"] = METRIC
    cfg.test_evaluator = metric
    return int(metric.get("ignore_index", 255))


def metrics_from_confusion(confusion) -> dict:
    """mIoU / mAcc / aAcc (percent) of a (C, C) confusion matrix, or of (N, C, C) summed over
    images, with IoUMetric's definitions (a class with no pixel in ground truth or prediction
    is left out of the mean)."""
    c = np.asarray(confusion, dtype=np.float64)
    c = c.sum(axis=0) if c.ndim == 3 else c
    inter, label, pred = np.diag(c), c.sum(axis=1), c.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = inter / (label + pred - inter), inter / label
    return {"mIoU": float(np.nanmean(iou) * 100), "mAcc": float(np.nanmean(acc) * 100),
            "aAcc": float(inter.sum() / label.sum() * 100)}


def save_outcomes(runner, folder, classes, image_root) -> dict:
    """Write the per-image confusion matrices (transfer.outcomes) and return their record.
    Image ids are paths relative to the test images' folder."""
    from transfer.outcomes import save_segmentation

    metric = next(m for m in runner.test_loop.evaluator.metrics if isinstance(m, PerImageIoUMetric))
    paths, confusion = metric.per_image
    ids = [os.path.relpath(p, image_root) for p in paths]
    return save_segmentation(folder, confusion, classes, ids=ids)


# ----------------------------------------------------------------------------- the protocol

# Overrides that cannot change a number (where files are, how fast they load, what is logged):
# left out of the protocol, so that runs differing only in them stay comparable.
NEUTRAL_OVERRIDES = ("embedded_data.root", "data_root", "work_dir", "default_hooks", "log_", "visualizer",
                     "vis_backends", "env_cfg")
NEUTRAL_SUFFIXES = (".data_root", ".num_workers", ".persistent_workers")
WEIGHT_DEPENDENT = ("in_channels", "norm_cfg", "init_cfg", "pretrained", "depth")  # follow the weights


def _plain(x):
    """A config value as plain JSON data (tuples -> lists, ConfigDict -> dict)."""
    return json.loads(json.dumps(x, default=str))


def _strip(d: dict) -> dict:
    return {k: v for k, v in _plain(d).items() if k not in WEIGHT_DEPENDENT}


def protocol_overrides(cfg_options) -> list[str]:
    keep = []
    for pair in cfg_options:
        key = pair.split("=", 1)[0]
        if not (key.startswith(NEUTRAL_OVERRIDES) or key.endswith(NEUTRAL_SUFFIXES)):
            keep.append(pair)
    return keep


def _metric_definitions(n_classes: int, ignore_index: int) -> dict:
    import mmseg

    where = f"pixels summed over all test images, pixels labelled {ignore_index} excluded, percent " \
            f"(mmseg {mmseg.__version__} IoUMetric)"
    return {
        "mIoU": f"mean over the {n_classes} classes of intersection / union; a class absent from both "
                f"ground truth and prediction is left out of the mean; {where}",
        "mAcc": f"mean over the classes of the fraction of each class's pixels predicted as it; {where}",
        "aAcc": f"fraction of all pixels predicted correctly; {where}",
    }


def protocol(cfg, *, name: str, dataset: dict, ignore_index: int, norm: str, world_size: int,
             cfg_options) -> dict:
    """transfer.results.protocol_record of this run, from the resolved config: what decides the
    numbers except the weights (depth, in_channels and normalisation follow the weights)."""
    from transfer.results import protocol_record

    train, test = cfg.train_dataloader, cfg.test_dataloader
    per_process = int(train.get("batch_size"))
    overrides = protocol_overrides(cfg_options)
    model = {"type": cfg.model.get("type"), "backbone": _strip(cfg.model.backbone),
             "test_cfg": _plain(cfg.model.get("test_cfg"))}
    model.update({h: _strip(cfg.model[h]) for h in ("decode_head", "auxiliary_head") if cfg.model.get(h)})
    optim = _plain(cfg.optim_wrapper)
    schedule = {"max_iters": cfg.train_cfg.get("max_iters"), "optimizer": optim.pop("optimizer", None),
                "optim_wrapper": optim, "param_scheduler": _plain(cfg.get("param_scheduler")),
                "batch_per_process": per_process, "world_size": world_size,
                "effective_batch": per_process * world_size, "cfg_options": overrides}
    model["norm"] = norm  # what ran: SyncBN only when distributed on GPUs
    pre = _plain(cfg.model.data_preprocessor)
    inputs = {"crop_size": _plain(cfg.get("crop_size")),
              "train_pipeline": _plain(_first_leaf(train.dataset).get("pipeline")),
              "test_pipeline": _plain(_first_leaf(test.dataset).get("pipeline")),
              "data_preprocessor": {k: v for k, v in pre.items() if k not in ("mean", "std", "bgr_to_rgb")}}
    data = {**{k: dataset[k] for k in ("name", "splits", "classes", "fingerprint")},
            "class_names": dataset["class_names"], "ignore_index": ignore_index}
    full_name = name + (f" + {' '.join(overrides)}" if overrides else "")
    return protocol_record(name=full_name, task="segment", engine="mmseg",
                           metric=_metric_definitions(dataset["classes"], ignore_index),
                           schedule=schedule, input=inputs, dataset=data, model=model)


def _first_leaf(d: dict) -> dict:
    while "datasets" in d or "dataset" in d:
        d = d["datasets"][0] if "datasets" in d else d["dataset"]
    return d


def protocol_name(cfg, config: Path) -> str:
    return str((cfg.get("benchmark") or {}).get("protocol") or Path(config).stem)
