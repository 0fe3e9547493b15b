"""How long `transfer report` takes with its bootstrap (1000 redraws), against the same report
without it, in one run: on demo-like results and on an ImageNet-size linear result.

demo-like      what `make demo` writes, at its sizes: linear (fast) and kNN on 2,000 test
               images, detection (VOC07 metric) on 64 scenes x 10 classes with 100 detections
               per image, segmentation on 64 scenes x 11 classes; 3 rows with outcomes + 1
               missing row per task
imagenet-size  linear on 50,000 test images, 1,000 classes, top-1 and top-5, 4 rows

Synthetic outcomes (seeded); each run's metric is its outcomes' own (identity), so every
interval is computed, as on real results.

    python -m benchmarks --only report_time
"""
import tempfile
import time
from pathlib import Path

import numpy as np

from transfer import outcomes
from transfer.report import report
from transfer.results import protocol_record, write_results
from transfer.uncertainty import ClassificationOutcomes, SegmentationOutcomes
from transfer.uncertainty_detection import DetectionOutcomes

ROWS = [("random init", None, 0.2), ("supervised (same data)", "5", 2.0), ("MoCo v2 demo", "a", 1.7)]


def _write(folder, task, label, sha, protocol, metrics, saved):
    weights = {"path": None if sha is None else f"/w/{label}.pth",
               "sha256": None if sha is None else sha * 64, "label": label}
    write_results(folder, task=task, dataset={"name": protocol["dataset"]["name"],
                  "splits": protocol["dataset"]["splits"]}, weights=weights, engine=protocol["engine"],
                  protocol=protocol, config={}, seed=0, wall_time_s=1.0, metrics=metrics, outcomes=saved)


def _missing(folder, task):
    write_results(folder, task=task, dataset={"name": "", "splits": {}},
                  weights={"path": None, "sha256": None, "label": "supervised IN-1k (torchvision)"},
                  engine="", protocol={}, config={}, seed=0, wall_time_s=0.0, metrics={},
                  status="missing", reason="weights not on this machine")


def _protocol(name, task, engine, metrics, n_test, classes):
    return protocol_record(name=name, task=task, engine=engine, metric={m: "as computed" for m in metrics},
                           schedule={"synthetic": True}, input={},
                           dataset={"name": f"{task}-bench", "splits": {"train": 10 * n_test, "test": n_test},
                                    "classes": classes})


def classification(root, task, n, classes, rng, top5=True):
    names = ({"top1": "top1", "top5": "top5"} if top5 else {"knn_top1": "top1"})
    protocol = _protocol("bench", task, "sklearn", names, n, classes)
    labels, hardness = rng.integers(0, classes, n), rng.normal(size=n)
    for label, sha, skill in ROWS:
        scores = rng.normal(size=(n, classes)).astype(np.float32)
        scores[np.arange(n), labels] += skill - hardness
        topk = np.argpartition(-scores, 5, axis=1)[:, :5]
        topk = np.take_along_axis(topk, np.argsort(-np.take_along_axis(scores, topk, 1), 1), 1)
        folder = root / task / label.replace(" ", "_")
        saved = outcomes.save_classification(folder, labels, topk, ids=[f"img{i}" for i in range(n)])
        metrics = {m: float(v[0]) for m, v in ClassificationOutcomes(labels, topk).evaluate(
            np.ones((1, n)), names).items()}
        _write(folder, task, label, sha, protocol, metrics, saved)
    _missing(root / task / "missing", task)


def detection(root, rng, n=64, classes=10, per_image=100):
    cats = [{"id": c + 1, "name": f"c{c}"} for c in range(classes)]
    images = [{"id": i + 1, "file_name": f"{i}.png", "height": 128, "width": 128} for i in range(n)]
    anns = []
    for im in images:
        for _ in range(rng.integers(2, 5)):
            x, y, w, h = *rng.integers(0, 90, 2), *rng.integers(10, 38, 2)
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": int(rng.integers(1, classes + 1)),
                         "bbox": [int(x), int(y), int(w), int(h)], "iscrowd": int(rng.random() < 0.1)})
    gt = {"images": images, "annotations": anns, "categories": cats}
    protocol = _protocol("bench", "detect", "detectron2", ["AP", "AP50", "AP75"], n, classes)
    for label, sha, skill in ROWS:
        dets = []
        for a in anns:
            jitter = rng.normal(scale=4 / (1 + skill), size=4)
            dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.random()),
                         "bbox": [float(v) for v in np.maximum(np.array(a["bbox"]) + jitter, 1)]})
        for im in images:  # fill up to per_image detections with background boxes
            for _ in range(per_image - sum(d["image_id"] == im["id"] for d in dets)):
                dets.append({"image_id": im["id"], "category_id": int(rng.integers(1, classes + 1)),
                             "score": float(rng.random() * 0.5),
                             "bbox": [float(v) for v in rng.uniform(1, 60, 4)]})
        folder = root / "detect" / label.replace(" ", "_")
        saved = outcomes.save_detection(folder, gt, dets, "voc07")
        metrics = {m: float(v[0]) for m, v in DetectionOutcomes(gt, dets, "voc07").evaluate(
            np.ones((1, n)), {m: ("bbox", m) for m in ("AP", "AP50", "AP75")}).items()}
        _write(folder, "detect", label, sha, protocol, metrics, saved)
    _missing(root / "detect" / "missing", "detect")


def segmentation(root, rng, n=64, classes=11, pixels=128 * 128):
    protocol = _protocol("bench", "segment", "mmseg", ["mIoU", "mAcc", "aAcc"], n, classes)
    truth = rng.dirichlet(np.ones(classes) * 0.3, n) * pixels
    for label, sha, skill in ROWS:
        keep = 1 / (1 + np.exp(-skill))
        confusion = np.stack([np.diag(t * keep) + np.outer(t * (1 - keep), np.ones(classes) / classes)
                              for t in truth]).round().astype(np.int64)
        folder = root / "segment" / label.replace(" ", "_")
        saved = outcomes.save_segmentation(folder, confusion, [f"c{c}" for c in range(classes)])
        metrics = {m: float(v[0]) for m, v in SegmentationOutcomes(confusion).evaluate(
            np.ones((1, n)), {m: m for m in ("mIoU", "mAcc", "aAcc")}).items()}
        _write(folder, "segment", label, sha, protocol, metrics, saved)
    _missing(root / "segment" / "missing", "segment")


def _seconds(folder, out, bootstrap, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        report([folder], fmt="github", output=out, bootstrap=bootstrap)
        times.append(time.perf_counter() - tic)
    return float(np.median(times))


def run(full: bool = False) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="report_time_") as tmp:
        demo, big = Path(tmp) / "demo", Path(tmp) / "imagenet"
        classification(demo, "linear", 2000, 10, rng)
        classification(demo, "knn", 2000, 10, rng, top5=False)
        detection(demo, rng)
        segmentation(demo, rng)
        classification(big, "linear", 50000, 1000, rng)
        for name, folder, note in [("demo-like", demo, "linear+kNN 2k images, detect 64x100 dets, segment 64"),
                                   ("imagenet-size linear", big, "50k test images, 1000 classes, 4 rows")]:
            off = _seconds(folder, Path(tmp) / "out", 0)
            on = _seconds(folder, Path(tmp) / "out", 1000)
            rows += [{"name": f"{name}: report, bootstrap 1000", "value": on, "unit": "s", "note": note},
                     {"name": f"{name}: report, no bootstrap", "value": off, "unit": "s", "note": note},
                     {"name": f"{name}: bootstrap / none", "value": on / off, "unit": "x",
                      "note": "median of 3, side by side"}]
    return rows


if __name__ == "__main__":
    for r in run():
        print(f"{r['name']:45s} {r['value']:8.2f} {r['unit']}  ({r['note']})")
