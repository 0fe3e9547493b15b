"""Box and mask AP from COCO-format ground truth and detections: the one scoring code of both
engines (and of anything that re-scores saved outcomes).

Inputs are what transfer.outcomes.save_detection stores: ``ground_truth`` a COCO dict
(datasets.ground_truth: ids 1..N, annotations 1..M, VOC difficult as iscrowd 1) and
``detections`` COCO results (image_id, category_id, bbox [x, y, w, h] in pixel-edge
coordinates, score, segmentation for masks).

Two AP definitions, named in results (``protocol.metric`` and ``outcomes.metric``):

- ``voc07`` (VOC-layout data): Detectron2's PascalVOCDetectionEvaluator for VOC2007, i.e.
  the py-faster-rcnn port of the VOC devkit: per class, detections sorted by score, greedy
  matching at IoU > t with VOC's +1 pixel convention (inclusive 1-based boxes), difficult
  objects neither true nor false positives, 11-point interpolated AP; AP50 and AP75 at
  t = .5 / .75, AP the mean over t = .50:.05:.95; each the mean over all classes (a class
  without test objects counts as 0, as there). Scores are rounded to 3 decimals and boxes to
  0.1 pixel first, because Detectron2 writes them to text files that way.
- ``coco`` (COCO-layout data): pycocotools COCOeval, 101-point interpolated AP over IoU
  .50:.05:.95 (AP), at .50 (AP50) and .75 (AP75), areas "all", 100 detections per image;
  crowd regions ignored. Masks (``segm``) only with this metric.

Values are percent; NaN when no detection at all was made (Detectron2 reports NaN then).
"""
import contextlib
import copy
import io
import math
from collections import defaultdict

import numpy as np

DEFINITIONS = {
    "voc07": {
        "AP50": "VOC07 11-point AP at IoU > 0.5, mean over classes (Detectron2 PascalVOCDetectionEvaluator, "
                "difficult ignored, +1 pixel convention)",
        "AP75": "VOC07 11-point AP at IoU > 0.75, mean over classes (same evaluator)",
        "AP": "mean of the VOC07 11-point AP over IoU .50:.05:.95, mean over classes (same evaluator)",
    },
    "coco": {
        "AP": "COCO 101-point AP over IoU .50:.05:.95, area all, 100 dets/image (pycocotools COCOeval)",
        "AP50": "COCO 101-point AP at IoU 0.5 (pycocotools COCOeval)",
        "AP75": "COCO 101-point AP at IoU 0.75 (pycocotools COCOeval)",
    },
}
MASK_DEFINITIONS = {f"mask_{k}": v.replace("AP", "mask AP", 1) for k, v in DEFINITIONS["coco"].items()}
THRESHOLDS = range(50, 100, 5)


def definitions(metric: str, mask_on: bool) -> dict:
    return {**DEFINITIONS[metric], **(MASK_DEFINITIONS if mask_on else {})}


def coco_results(image_id: int, boxes, scores, classes, masks=None) -> list:
    """One image's detections in COCO results format: `boxes` N x 4 XYXY pixel edges,
    `scores` N, `classes` N contiguous 0..K-1 (category id = class + 1, as in
    datasets.ground_truth), `masks` N x H x W bool or None (RLE, as Detectron2 encodes them)."""
    import pycocotools.mask as mask_util

    out = []
    for j in range(len(scores)):
        x0, y0, x1, y1 = (float(v) for v in boxes[j])
        det = {"image_id": int(image_id), "category_id": int(classes[j]) + 1,
               "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(scores[j])}
        if masks is not None:
            rle = mask_util.encode(np.asfortranarray(masks[j].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            det["segmentation"] = rle
        out.append(det)
    return out


def score(ground_truth: dict, detections: list, metric: str, mask_on: bool = False) -> dict:
    """{"AP", "AP50", "AP75"} (+ "mask_*" with mask_on), in percent."""
    if metric == "voc07":
        return voc07(ground_truth, detections)
    out = coco(ground_truth, detections, "bbox")
    if mask_on:
        out.update({f"mask_{k}": v for k, v in coco(ground_truth, detections, "segm").items()})
    return out


# ----------------------------------------------------------------------------- VOC07

def _voc_box(x, y, w, h):
    """COCO [x, y, w, h] (pixel edges) -> VOC's inclusive 1-based [xmin, ymin, xmax, ymax]."""
    return [x + 1.0, y + 1.0, x + w, y + h]


def _voc_ap(rec, prec) -> float:
    """The 11-point interpolated AP of Detectron2's voc_ap(use_07_metric=True)."""
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
        ap = ap + p / 11.0
    return ap


def _class_matches(gt: dict, dets: list):
    """For one class: (sorted detections' best IoU, matched gt key (image, index), whether that
    gt is difficult, number of non-difficult gt). The best match does not depend on the IoU
    threshold, so it is computed once for all ten thresholds."""
    npos = sum(int(not d) for boxes, diff in gt.values() for d in diff)
    if not dets:
        return np.zeros(0), [], np.zeros(0, bool), npos
    confidence = np.array([float(f"{d['score']:.3f}") for d in dets])
    boxes = np.array([[float(f"{v:.1f}") for v in _voc_box(*d["bbox"])] for d in dets]).reshape(-1, 4)
    order = np.argsort(-confidence)  # the same (unstable) sort Detectron2 runs: the same ties order
    ovmax, keys, difficult = np.full(len(dets), -np.inf), [None] * len(dets), np.zeros(len(dets), bool)
    for rank, i in enumerate(order):
        g_boxes, g_diff = gt.get(dets[i]["image_id"], (np.zeros((0, 4)), np.zeros(0, bool)))
        if not len(g_boxes):
            continue
        bb = boxes[i]
        iw = np.maximum(np.minimum(g_boxes[:, 2], bb[2]) - np.maximum(g_boxes[:, 0], bb[0]) + 1.0, 0.0)
        ih = np.maximum(np.minimum(g_boxes[:, 3], bb[3]) - np.maximum(g_boxes[:, 1], bb[1]) + 1.0, 0.0)
        inters = iw * ih
        uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
               + (g_boxes[:, 2] - g_boxes[:, 0] + 1.0) * (g_boxes[:, 3] - g_boxes[:, 1] + 1.0) - inters)
        overlaps = inters / uni
        j = int(np.argmax(overlaps))
        ovmax[rank], keys[rank], difficult[rank] = overlaps[j], (dets[i]["image_id"], j), g_diff[j]
    return ovmax, keys, difficult, npos


def _class_ap(ovmax, keys, difficult, npos, thresh: float) -> float:
    """Detectron2's voc_eval after its matching loop, given each detection's best match."""
    tp, fp = np.zeros(len(keys)), np.zeros(len(keys))
    taken = set()
    for d, key in enumerate(keys):
        if ovmax[d] > thresh:
            if not difficult[d]:
                if key not in taken:
                    tp[d] = 1.0
                    taken.add(key)
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    with np.errstate(divide="ignore", invalid="ignore"):  # a class without test objects: AP 0 there too
        rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return _voc_ap(rec, prec)


def voc07(ground_truth: dict, detections: list) -> dict:
    """Detectron2's PascalVOCDetectionEvaluator (VOC2007, 11-point) on COCO-format inputs."""
    if not detections:
        return {"AP": math.nan, "AP50": math.nan, "AP75": math.nan}
    per_class = defaultdict(lambda: defaultdict(lambda: ([], [])))
    for a in ground_truth["annotations"]:
        boxes, diff = per_class[a["category_id"]][a["image_id"]]
        boxes.append(_voc_box(*a["bbox"]))
        diff.append(bool(a["iscrowd"]))
    dets_by_class = defaultdict(list)
    for d in detections:
        dets_by_class[d["category_id"]].append(d)
    aps = defaultdict(list)  # threshold -> AP (percent) per class
    for cat in (c["id"] for c in ground_truth["categories"]):
        gt = {img: (np.array(b, float).reshape(-1, 4), np.array(f, bool))
              for img, (b, f) in per_class[cat].items()}
        matches = _class_matches(gt, dets_by_class[cat])
        for thresh in THRESHOLDS:
            aps[thresh].append(_class_ap(*matches, thresh / 100.0) * 100)
    mean_ap = {iou: np.mean(x) for iou, x in aps.items()}
    return {"AP": float(np.mean(list(mean_ap.values()))), "AP50": float(mean_ap[50]),
            "AP75": float(mean_ap[75])}


# ----------------------------------------------------------------------------- COCO

def coco_api(ground_truth: dict):
    from pycocotools.coco import COCO

    api = COCO()
    api.dataset = copy.deepcopy(ground_truth)  # COCOeval turns polygons into RLE in place
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def coco(ground_truth: dict, detections: list, iou_type: str = "bbox") -> dict:
    """pycocotools COCOeval AP / AP50 / AP75 (percent) for `iou_type` "bbox" or "segm"."""
    from pycocotools.cocoeval import COCOeval

    nan = {"AP": math.nan, "AP50": math.nan, "AP75": math.nan}
    if iou_type == "segm":  # as Detectron2's COCOEvaluator: mask areas, not box areas
        dets = [{k: v for k, v in d.items() if k != "bbox"} for d in detections if "segmentation" in d]
    else:  # loadRes adds area/id to the dicts it is given: pass copies
        dets = [dict(d) for d in detections]
    if not dets:
        return nan
    gt = coco_api(ground_truth)
    with contextlib.redirect_stdout(io.StringIO()):
        e = COCOeval(gt, gt.loadRes(dets), iou_type)
        e.params.imgIds = sorted(img["id"] for img in ground_truth["images"])
        e.evaluate()
        e.accumulate()
        e.summarize()
    stats = [100.0 * v if v >= 0 else math.nan for v in e.stats[:3]]
    return {"AP": stats[0], "AP50": stats[1], "AP75": stats[2]}
