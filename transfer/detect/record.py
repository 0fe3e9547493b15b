"""What a detection run writes beside its model: results.json with the protocol it was
measured under (derived from the resolved run, never from the config's file name) and the
per-image outcomes (transfer.outcomes) that `report` bootstraps. Shared by both engines."""
import os

from transfer.detect import metrics
from transfer.detect.config import get, items
from transfer.outcomes import save_detection
from transfer.results import dataset_fingerprint, protocol_record, write_results

# Config keys that do not change what is measured (where and how fast it runs), or that are
# recorded in their own protocol field (data sets, input sizes), or that follow from the
# evaluated weights (converters.detectron2_settings: the backbone is what is compared, not
# part of the protocol), so a random-init R18 and a MoCo R18 share one protocol.
NOT_PROTOCOL = {
    "OUTPUT_DIR", "SEED", "VERSION", "CUDNN_BENCHMARK", "MODEL.WEIGHTS", "MODEL.DEVICE",
    "DATALOADER.NUM_WORKERS", "SOLVER.CHECKPOINT_PERIOD", "TEST.EVAL_PERIOD", "DATASETS.ROOT",
    "DATASETS.TRAIN", "DATASETS.TEST", "INPUT.MIN_SIZE_TRAIN", "INPUT.MAX_SIZE_TRAIN",
    "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST", "INPUT.FORMAT", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD",
    "MODEL.RESNETS.DEPTH", "MODEL.RESNETS.STRIDE_IN_1X1", "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "MODEL.RESNETS.NUM_GROUPS", "MODEL.RESNETS.WIDTH_PER_GROUP", "RUN",
}


# Shown by name in the schedule record.
SCHEDULE_KEYS = {"SOLVER.MAX_ITER", "SOLVER.BASE_LR", "SOLVER.IMS_PER_BATCH", "SOLVER.WARMUP_ITERS",
                 "SOLVER.WARMUP_FACTOR", "SOLVER.WARMUP_METHOD", "SOLVER.STEPS", "SOLVER.GAMMA",
                 "SOLVER.MOMENTUM", "SOLVER.WEIGHT_DECAY", "TEST.PRECISE_BN.ENABLED", "TEST.PRECISE_BN.NUM_ITER"}


def _relevant(key: str) -> bool:
    return not any(key == k or key.startswith(k + ".") for k in NOT_PROTOCOL) and key not in SCHEDULE_KEYS \
        and not key.startswith("DATASETS.SCENES.")  # the scenes are identified by the data fingerprint


def _changed(cfg: dict, defaults: dict, model: bool) -> dict:
    """Protocol keys of the resolved config (overrides included) that differ from the engine's
    defaults: the MODEL section's (model=True) or the others'."""
    base = dict(items(defaults))
    return {k: v for k, v in items(cfg) if _relevant(k) and k.startswith("MODEL.") == model
            and (k not in base or base[k] != v)}


def model(cfg: dict, defaults: dict) -> dict:
    """What is built around the backbone (C4 and FPN, Faster and Mask R-CNN are different
    protocols): readable, plus every other MODEL key that differs from the defaults."""
    m = cfg["MODEL"]
    return {"detector": "Mask R-CNN" if m["MASK_ON"] else "Faster R-CNN", "backbone": m["BACKBONE"]["NAME"],
            "roi_heads": m["ROI_HEADS"]["NAME"], "mask_on": m["MASK_ON"], "norm": m["RESNETS"]["NORM"],
            "fpn_norm": m["FPN"]["NORM"], "freeze_at": m["BACKBONE"]["FREEZE_AT"],
            "config": _changed(cfg, defaults, model=True)}


def schedule(cfg: dict, defaults: dict) -> dict:
    """The training values, readable (cfg["RUN"] says the images per process), plus every other
    (non-MODEL) protocol key that differs from the engine's defaults."""
    s, pbn = cfg["SOLVER"], cfg["TEST"]["PRECISE_BN"]
    return {
        "iterations": s["MAX_ITER"], "lr": s["BASE_LR"], "batch": s["IMS_PER_BATCH"],
        # BN (and PreciseBN) normalise over one process's images: 16 on 8 GPUs is not 16 on 1.
        "images_per_process": cfg["RUN"]["ims_per_batch_per_rank"],
        "warmup_iters": s["WARMUP_ITERS"], "warmup_factor": s["WARMUP_FACTOR"],
        "warmup_method": s["WARMUP_METHOD"], "steps": list(s["STEPS"]), "gamma": s["GAMMA"],
        "momentum": s["MOMENTUM"], "weight_decay": s["WEIGHT_DECAY"],
        "precise_bn_iters": pbn["NUM_ITER"] if pbn["ENABLED"] else 0,
        "config": _changed(cfg, defaults, model=False),
    }


def input_sizes(cfg: dict) -> dict:
    i = cfg["INPUT"]
    return {"min_size_train": list(i["MIN_SIZE_TRAIN"]), "max_size_train": i["MAX_SIZE_TRAIN"],
            "min_size_test": i["MIN_SIZE_TEST"], "max_size_test": i["MAX_SIZE_TEST"],
            "format": i["FORMAT"], "random_flip": i["RANDOM_FLIP"]}


def dataset(train_counts: dict, test_name: str, test_records: list, train_records: list, classes: list) -> dict:
    members = {"train": [os.path.basename(r["file_name"]) for r in train_records],
               "test": [os.path.basename(r["file_name"]) for r in test_records]}
    return {"name": f"{'+'.join(train_counts)} -> {test_name}",
            "splits": {**train_counts, test_name: len(test_records)},
            "classes": len(classes), "class_names": list(classes),
            "fingerprint": dataset_fingerprint(classes, members)}


def metric_name(test_kind: str) -> str:
    """VOC-layout test sets are scored like Detectron2's VOC evaluator, COCO ones with COCOeval."""
    return "voc07" if test_kind == "voc" else "coco"


def write(out, *, engine: str, name: str, cfg: dict, defaults: dict, data: dict, metric: str,
          ground_truth: dict, detections: list, weights: dict, seed: int, wall_time_s: float) -> tuple:
    """Score, save the outcomes, and write results.json; returns (its path, the metrics)."""
    mask_on = get(cfg, "MODEL.MASK_ON")
    scores = metrics.score(ground_truth, detections, metric, mask_on)
    outcomes = save_detection(out, ground_truth, detections, metric)
    protocol = protocol_record(name=name, task="detect", engine=engine,
                               metric=metrics.definitions(metric, mask_on), schedule=schedule(cfg, defaults),
                               input=input_sizes(cfg), dataset=data, model=model(cfg, defaults))
    path = write_results(out, task="detect", dataset={k: data[k] for k in ("name", "splits", "classes")},
                         weights=weights, engine=engine, protocol=protocol, config=cfg, seed=seed,
                         wall_time_s=wall_time_s, metrics=scores, outcomes=outcomes)
    return path, scores
