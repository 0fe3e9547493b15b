"""Per-example outcomes, written beside results.json, so `report` can say how sure a number is.

A metric computed on a test set of N images is one draw: another N images from the same
distribution would give another number. `report` resamples test images (bootstrap) to put
a confidence interval on every metric and on every difference between two rows evaluated
on the same images. For that each task keeps, per test image, what its metric needs:

classification (linear, knn, the classification suite)
    ``outcomes.npz``: ``labels`` int64 (N,) class ids, or (N, C) 0/1 for multi-label data
    (VOC07 classification); ``topk`` int64 (N, k) predicted class ids best first (k <= 5),
    when the metric is (top-k / mean per-class) accuracy; ``scores`` float32 (N, C) when the
    metric needs scores (average precision); ``ids`` str (N,) the test images' names.
detection
    ``ground_truth.json``: the evaluated ground truth in COCO format (images, annotations with
    ``iscrowd`` 1 for VOC "difficult" boxes, categories), ids as evaluated;
    ``detections.json``: every detection in COCO results format
    (``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``, ``segmentation`` for masks).
    results.json's ``outcomes["metric"]`` names the AP definition ("coco" 101-point over
    IoU .50:.95, or "voc07" 11-point as Detectron2's VOC evaluator).
segmentation
    ``outcomes.npz``: ``confusion`` int64 (N, C, C), one confusion matrix per test image
    (rows ground truth, columns prediction, ignore-label pixels excluded); summed over
    images it gives the run's mIoU. ``classes`` str (C,); ``ids`` str (N,).

Each saver writes its files atomically and returns the ``outcomes`` record for
``write_results``; ``load`` reads them back for `report`, and ``read`` checks them and
gives the object `report` resamples (transfer/uncertainty.py).

What `report` relies on (its intervals are shown only when the outcomes, scored once with
no redraw, give back the run's reported metric):
- ``ids`` name the same test image the same way in every run of a protocol; two rows are
  paired by them (by position when a run has none) and only when their ground truth agrees.
- multi-label ``labels``: 1 positive, 0 negative, negative values ignored (VOC "difficult").
- detection: ``bbox`` [x, y, w, h] with w = x2 - x1 of the evaluated XYXY box (Detectron2's
  BoxMode conversion), ground truth and detections in the same frame. For ``voc07``, list the
  detections in the order the evaluator received them, with the values it scored (Detectron2's
  PascalVOCDetectionEvaluator rounds scores to 3 decimals and boxes to 0.1 pixel before
  voc_eval): ties in score are then ranked as voc_eval ranks them.
"""
import io
import json
from pathlib import Path

import numpy as np

from mocobench.errors import UserError
from mocobench.fileio import atomic_write


def _save_npz(path: Path, **arrays) -> None:
    def write(tmp):
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        Path(tmp).write_bytes(buf.getvalue())

    atomic_write(path, write)


def _save_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, allow_nan=False)

    atomic_write(path, write)


def save_classification(folder, labels, topk=None, scores=None, ids=None) -> dict:
    """labels (N,) or (N, C); topk (N, k) class ids best first; scores (N, C); ids (N,)."""
    labels = np.asarray(labels, dtype=np.int64)
    arrays = {"labels": labels}
    if topk is not None:
        arrays["topk"] = np.asarray(topk, dtype=np.int64)
    if scores is not None:
        arrays["scores"] = np.asarray(scores, dtype=np.float32)
    if ids is not None:
        arrays["ids"] = np.asarray([str(i) for i in ids])
    if "topk" not in arrays and "scores" not in arrays:
        raise ValueError("save_classification needs topk or scores")
    for name, a in arrays.items():
        if len(a) != len(labels):
            raise ValueError(f"outcomes: {name} has {len(a)} rows, labels {len(labels)}")
    _save_npz(Path(folder) / "outcomes.npz", **arrays)
    return {"kind": "classification", "files": ["outcomes.npz"]}


def save_detection(folder, ground_truth: dict, detections: list, metric: str) -> dict:
    """ground_truth: a COCO dict; detections: COCO results; metric "coco" or "voc07"."""
    if metric not in ("coco", "voc07"):
        raise ValueError(f"detection outcome metric must be coco or voc07, not {metric!r}")
    folder = Path(folder)
    _save_json(folder / "ground_truth.json", ground_truth)
    _save_json(folder / "detections.json", list(detections))
    return {"kind": "detection", "files": ["ground_truth.json", "detections.json"], "metric": metric}


def save_segmentation(folder, confusion, classes, ids=None) -> dict:
    """confusion (N, C, C): per-image counts, rows ground truth, columns prediction."""
    confusion = np.asarray(confusion, dtype=np.int64)
    if confusion.ndim != 3 or confusion.shape[1:] != (len(classes), len(classes)):
        raise ValueError(f"confusion must be (N, C, C) with C = {len(classes)} classes, "
                         f"got {confusion.shape}")
    arrays = {"confusion": confusion, "classes": np.asarray([str(c) for c in classes])}
    if ids is not None:
        arrays["ids"] = np.asarray([str(i) for i in ids])
    _save_npz(Path(folder) / "outcomes.npz", **arrays)
    return {"kind": "segmentation", "files": ["outcomes.npz"]}


def load(results_path, record: dict) -> dict:
    """The outcome arrays (or, for detection, the two COCO objects) a results.json names."""
    outcomes = record.get("outcomes")
    if not outcomes:
        return {}
    folder = Path(results_path).parent
    try:
        if outcomes["kind"] == "detection":
            return {"ground_truth": json.loads((folder / "ground_truth.json").read_text()),
                    "detections": json.loads((folder / "detections.json").read_text()),
                    "metric": outcomes.get("metric", "coco")}
        with np.load(folder / "outcomes.npz", allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"per-example outcomes of {results_path} cannot be read "
                        f"({type(e).__name__}: {e}); re-run that task, or pass --bootstrap 0") from None


def read(results_path, record: dict):
    """The checked outcomes of one result as the object `report` resamples, or None when the
    run kept none. A file that is unreadable or malformed is one line naming it."""
    arrays = load(results_path, record)
    if not arrays:
        return None
    where = f"per-example outcomes of {results_path}"
    try:
        kind = record["outcomes"]["kind"]
        if kind == "detection":
            return _detection(arrays, record)
        if kind == "segmentation":
            return _segmentation(arrays)
        return _classification(arrays)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{where} do not have the documented format ({e}); re-run that task, "
                        "or pass --bootstrap 0") from None


def _rows(name, a, n):
    if len(a) != n:
        raise ValueError(f"{name} has {len(a)} rows, labels {n}")


def _classification(z):
    from transfer.uncertainty import ClassificationOutcomes

    labels = np.asarray(z["labels"])
    if labels.ndim not in (1, 2) or labels.dtype.kind not in "iu":
        raise ValueError("labels must be (N,) or (N, C) integers")
    topk = np.asarray(z["topk"]) if "topk" in z else None
    scores = np.asarray(z["scores"], dtype=np.float64) if "scores" in z else None
    ids = z.get("ids")
    if topk is None and scores is None:
        raise ValueError("neither topk nor scores")
    for name, a in (("topk", topk), ("scores", scores), ("ids", ids)):
        if a is not None:
            _rows(name, a, len(labels))
    if topk is not None and (topk.ndim != 2 or topk.dtype.kind not in "iu"):
        raise ValueError("topk must be (N, k) integers")
    if scores is not None and (scores.ndim != 2 or (labels.ndim == 2 and scores.shape != labels.shape)):
        raise ValueError("scores must be (N, C), the shape of multi-label labels")
    return ClassificationOutcomes(labels, topk, scores, ids)


def _segmentation(z):
    from transfer.uncertainty import SegmentationOutcomes

    confusion = np.asarray(z["confusion"])
    if confusion.ndim != 3 or confusion.shape[1] != confusion.shape[2] or confusion.dtype.kind not in "iu":
        raise ValueError(f"confusion must be (N, C, C) integers, got {confusion.shape}")
    if (confusion < 0).any():
        raise ValueError("confusion has negative counts")
    if "ids" in z:
        _rows("ids", z["ids"], len(confusion))
    return SegmentationOutcomes(confusion, z.get("classes"), z.get("ids"))


def _detection(z, record):
    from transfer.uncertainty_detection import DetectionOutcomes

    metric = z["metric"]
    if metric not in ("coco", "voc07"):
        raise ValueError(f"metric {metric!r} is not coco or voc07")
    dets = z["detections"]
    if not isinstance(dets, list) or not all(
            isinstance(d, dict) and {"image_id", "category_id", "bbox", "score"} <= set(d) for d in dets):
        raise ValueError("detections.json must be a list of COCO results "
                         "(image_id, category_id, bbox, score)")
    images = {im["id"] for im in z["ground_truth"].get("images", [])}
    stray = {d["image_id"] for d in dets} - images
    if stray:
        raise ValueError(f"detections on images the ground truth lacks: {sorted(stray)[:3]}")
    return DetectionOutcomes(z["ground_truth"], dets, metric)
