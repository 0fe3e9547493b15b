"""Detection AP under test-image redraws: match once, re-accumulate per redraw.

Whether a detection is a true or a false positive depends only on its own image (the
ground truth there and the higher-scored detections there), so matching is done once per
image; a redraw only re-weights images, and AP is re-accumulated from the weighted ranked
list (``transfer.uncertainty.precision_at_recalls``). Two definitions, as the saved
outcomes name them (``outcomes["metric"]``):

coco   COCOeval (pycocotools) ``evaluate()`` is run ONCE for the per-image matches;
       the re-accumulation is COCOeval.accumulate's: area "all", the last maxDets (100),
       101 recall points, AP over IoU .50:.95 (AP50, AP75 at one IoU); a category without
       non-ignored ground truth in a redraw is left out of the mean, as COCOeval leaves it out.
       Masks ("segm", reported as mask_AP...) when the detections carry segmentations.
voc07  Detectron2's PascalVOCDetectionEvaluator / voc_eval rule: per class, each detection in
       descending score is matched to the ground truth of its image and class with the
       largest IoU (+1 pixel convention on the inclusive 1-based corners x+1..x+w of a COCO
       [x, y, w, h] box, detections rounded to 0.1 pixel and scores to 3 decimals as
       Detectron2 writes them); above the IoU threshold it is a true positive if that ground truth is
       not yet taken, a false positive if it is; a match to a "difficult" box (iscrowd 1)
       counts neither way. VOC07 11-point AP; AP50 at .5, AP75 at .75, AP the mean over
       .50:.95; a class without ground truth scores 0 and stays in the mean, as in Detectron2.

Ties in score are ranked as each reference ranks them: COCOeval's stable sort of its
per-image lists; voc_eval's np.argsort(-score) of a class's detections in file order (so
detections.json must list them in the order the evaluator saw them).
"""
import contextlib
import copy
import functools
import io

import numpy as np

from mocobench.errors import UserError
from transfer.uncertainty import VOC07_RECALLS, _voc_precision, precision_at_recalls

VOC_IOUS = np.arange(50, 100, 5) / 100.0  # Detectron2's thresholds (range(50, 100, 5))
METRICS = {"bbox": ("AP", "AP50", "AP75"), "segm": ("mask_AP", "mask_AP50", "mask_AP75")}
_BLOCK_ELEMENTS = 8_000_000  # redraws x detections of one category weighted at a time


class RankedCategory:
    """One category's detections over the whole test set, best score first: the image each
    came from and, per IoU threshold, whether it is a true positive or counts neither way
    (ignored); every other detection is a false positive. Plus the number of positives
    (non-ignored ground truth) in each image."""

    def __init__(self, image, tp, ignored, positives):
        self.image, self.tp, self.ignored, self.positives = image, tp, ignored, positives

    def interpolated(self, weights, recalls, precision):
        """(b, T, R) interpolated precision at each recall point under each redraw.

        Only the true positives' points of the precision/recall curve are built: recall
        moves only there and precision can only fall between them, so the largest precision
        at or beyond any recall is always found at one of them (or is 0 without any). That is
        b x (true positives) work per threshold instead of b x (detections)."""
        b, (n_t, d) = len(weights), self.tp.shape
        out = np.zeros((b, n_t, len(recalls)))
        if d == 0:
            return out
        npos = np.maximum(weights @ self.positives, 1)
        w = weights[:, self.image]                        # (b, d): each detection's weight
        seen = np.cumsum(w, axis=1)                       # weight ranked so far, all kinds
        for t in range(n_t):
            hits = np.flatnonzero(self.tp[t])
            if not len(hits):
                continue
            tp = np.cumsum(w[:, hits], axis=1)            # (b, hits): true positives so far
            fp = seen[:, hits] - tp - self._ignored_before(w, t, hits)
            out[:, t] = precision_at_recalls(tp, fp, npos, recalls, precision)
        return out

    def _ignored_before(self, w, t, hits):
        """Weight of the ignored detections ranked at or before each true positive."""
        ignored = np.flatnonzero(self.ignored[t])
        if not len(ignored):
            return 0.0
        cum = np.concatenate([np.zeros((len(w), 1)), np.cumsum(w[:, ignored], axis=1)], axis=1)
        return cum[:, np.searchsorted(ignored, hits, side="right")]


class DetectionOutcomes:
    def __init__(self, ground_truth: dict, detections: list, metric: str):
        ground_truth = _clean_ground_truth(ground_truth)
        images = ground_truth["images"]
        names = [im.get("file_name") for im in images]
        self.keyed = all(isinstance(n, str) for n in names) and len(set(names)) == len(names)
        self.keys = names if self.keyed else [str(im["id"]) for im in images]
        self.image_ids = [im["id"] for im in images]
        self.metric = metric
        self.truth = _truth_per_image(ground_truth)
        if metric == "voc07":
            self.ranked = {"bbox": voc07_ranked(ground_truth, detections, self.image_ids)}
        else:
            types = ["bbox"] + (["segm"] if detections and all("segmentation" in d for d in detections)
                                else [])
            self.ranked = {t: coco_ranked(ground_truth, detections, t, self.image_ids) for t in types}

    def same_truth(self, reference, pos) -> bool:
        return (isinstance(reference, DetectionOutcomes) and reference.metric == self.metric
                and all(reference.truth[p] == t for p, t in zip(pos, self.truth)))

    def names(self, metrics: dict) -> dict:
        return {m: (t, m) for t in self.ranked for m in METRICS[t] if m in metrics}

    def evaluate(self, weights, names: dict) -> dict:
        out = {}
        for iou_type in {t for t, _ in names.values()}:
            per_iou = self._ap_per_iou(weights, self.ranked[iou_type])  # (b, T)
            values = {"AP": per_iou.mean(1), "AP50": per_iou[:, 0], "AP75": per_iou[:, 5]}
            for m, (t, name) in names.items():
                if t == iou_type:
                    out[m] = 100 * values[name.removeprefix("mask_")]
        return out

    def _ap_per_iou(self, weights, ranked):
        """(b, T): AP at each IoU threshold, averaged over categories as each definition does."""
        recalls = VOC07_RECALLS if self.metric == "voc07" else _coco_recalls()
        precision = _voc_precision if self.metric == "voc07" else _coco_precision
        b, aps, counted = len(weights), [], []
        for cat in ranked:
            npos = weights @ cat.positives
            step = max(1, _BLOCK_ELEMENTS // max(1, len(cat.image)))
            q = np.concatenate([cat.interpolated(weights[s:s + step], recalls, precision)
                                for s in range(0, b, step)])  # (b, T, R)
            if self.metric == "voc07":
                aps.append(np.where(npos[:, None] > 0, q.sum(2) / 11.0, 0.0))
                counted.append(np.ones(b, bool))
            else:
                aps.append(q.mean(2))
                counted.append(npos > 0)
        if not aps:
            return np.full((b, len(VOC_IOUS)), np.nan)
        aps, counted = np.stack(aps, 1), np.stack(counted, 1)[:, :, None]  # (b, K, T), (b, K, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (aps * counted).sum(1) / counted.sum(1)


def _coco_precision(tp, fp):
    return tp / (fp + tp + np.spacing(1))


@functools.lru_cache(maxsize=1)
def _coco_recalls():
    from pycocotools.cocoeval import Params

    return Params(iouType="bbox").recThrs  # COCOeval's own 101 points, with its rounding


def _clean_ground_truth(gt: dict) -> dict:
    """A copy with the fields COCOeval needs, and annotation ids 1..n: COCOeval records a
    match by the ground truth's id, so an id 0 (some tools start there) reads as unmatched."""
    if not all(isinstance(gt.get(k), list) for k in ("images", "annotations", "categories")):
        raise UserError("ground_truth.json should be a COCO dict with images, annotations and "
                        "categories lists; re-run that task")
    gt = copy.deepcopy(gt)
    for i, a in enumerate(gt["annotations"], 1):
        a["id"] = i
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
    return gt


def _truth_per_image(gt: dict) -> list:
    """Per image (in gt["images"] order): its boxes, classes and difficult flags, to check
    that two runs were scored against the same ground truth."""
    by_image = {im["id"]: [] for im in gt["images"]}
    for a in gt["annotations"]:
        by_image[a["image_id"]].append((a["category_id"], tuple(round(float(v), 2) for v in a["bbox"]),
                                        int(a["iscrowd"])))
    return [sorted(by_image[im["id"]]) for im in gt["images"]]


# ----------------------------------------------------------------------------- COCO

def coco_ranked(gt: dict, detections: list, iou_type: str, image_ids: list) -> list:
    """Run COCOeval.evaluate() once; return each category's ranked list (RankedCategory)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if detections:
            coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
        else:  # loadRes refuses an empty list: an empty result set scores 0 where there is truth
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "annotations": [], "categories": gt["categories"]}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
    p = ev.params
    n_img, n_area, max_det = len(p.imgIds), len(p.areaRng), p.maxDets[-1]
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    ranked = []
    for k in range(len(p.catIds)):
        # evalImgs is ordered category, area range, image: area "all" is range 0
        entries = [e for e in ev.evalImgs[k * n_area * n_img:(k * n_area + 1) * n_img] if e is not None]
        if not entries:
            continue
        scores = np.concatenate([e["dtScores"][:max_det] for e in entries])
        order = np.argsort(-scores, kind="mergesort")
        matched = np.concatenate([e["dtMatches"][:, :max_det] for e in entries], axis=1)[:, order]
        ignored = np.concatenate([e["dtIgnore"][:, :max_det] for e in entries], axis=1)[:, order]
        image = np.concatenate([np.full(len(e["dtScores"][:max_det]), position[e["image_id"]])
                                for e in entries])[order]
        positives = np.zeros(len(image_ids))
        for e in entries:
            positives[position[e["image_id"]]] += np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
        ignored = ignored.astype(bool)
        ranked.append(RankedCategory(image.astype(np.int64), matched.astype(bool) & ~ignored, ignored,
                                     positives))
    return ranked


# ----------------------------------------------------------------------------- VOC07

def _corners(boxes, written: bool = False):
    """COCO [x, y, w, h] -> voc_eval's inclusive 1-based corners [x + 1, y + 1, x + w, y + h];
    written: rounded to 0.1 pixel, as Detectron2 writes detections to voc_eval's text files
    (transfer.detect.metrics.voc07 does the same: the outcomes then re-score exactly)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    c = np.stack([b[:, 0] + 1, b[:, 1] + 1, b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], 1)
    return np.array([[float(f"{v:.1f}") for v in row] for row in c]).reshape(-1, 4) if written else c


def _voc_iou(box, gts):
    """voc_eval's overlaps of one box with the ground truth boxes (+1 pixel convention)."""
    iw = np.maximum(np.minimum(gts[:, 2], box[2]) - np.maximum(gts[:, 0], box[0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(gts[:, 3], box[3]) - np.maximum(gts[:, 1], box[1]) + 1.0, 0.0)
    inter = iw * ih
    union = ((box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
             + (gts[:, 2] - gts[:, 0] + 1.0) * (gts[:, 3] - gts[:, 1] + 1.0) - inter)
    return inter / union


def voc07_ranked(gt: dict, detections: list, image_ids: list) -> list:
    """Per class (gt["categories"] order): voc_eval's ranking and matching. As voc_eval reads
    a class's detections in the order they were written and ranks them with
    np.argsort(-score), so do we: detections.json in the evaluator's order gives its ranking,
    ties included."""
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    truth = {}
    for a in gt["annotations"]:
        truth.setdefault((a["category_id"], a["image_id"]), []).append(a)
    ranked = []
    for cat in gt["categories"]:
        mine = [d for d in detections if d["category_id"] == cat["id"]]
        # scores as Detectron2 writes them (3 decimals): its ties are ranked as it ranks them
        order = np.argsort(-np.array([float(f"{d['score']:.3f}") for d in mine], dtype=np.float64))
        mine = [mine[i] for i in order]
        positives = np.zeros(len(image_ids))
        boxes = {}
        for (c, image_id), anns in truth.items():
            if c == cat["id"]:
                difficult = np.array([bool(a["iscrowd"]) for a in anns], bool)
                boxes[image_id] = (_corners([a["bbox"] for a in anns]), difficult)
                positives[position[image_id]] = np.count_nonzero(~difficult)
        tp, fp = _voc_match(mine, boxes)
        image = np.array([position[d["image_id"]] for d in mine], dtype=np.int64)
        ranked.append(RankedCategory(image, tp, ~tp & ~fp, positives))
    return ranked


def _voc_match(ranked_dets: list, boxes: dict):
    """(T, d) true / false positives of a class's ranked detections at each IoU threshold:
    voc_eval's loop, all thresholds at once (each has its own 'taken' flags)."""
    tp = np.zeros((len(VOC_IOUS), len(ranked_dets)), bool)
    fp = np.zeros_like(tp)
    taken = {image_id: np.zeros((len(VOC_IOUS), len(g)), bool) for image_id, (g, _) in boxes.items()}
    corners = _corners([d["bbox"] for d in ranked_dets], written=True)
    for k, d in enumerate(ranked_dets):
        gts, difficult = boxes.get(d["image_id"], (np.zeros((0, 4)), np.zeros(0, bool)))
        if not len(gts):
            fp[:, k] = True
            continue
        overlaps = _voc_iou(corners[k], gts)
        j = int(overlaps.argmax())
        above = overlaps[j] > VOC_IOUS
        if difficult[j]:
            fp[~above, k] = True
            continue
        was = taken[d["image_id"]][:, j]
        tp[:, k], fp[:, k] = above & ~was, ~above | was
        taken[d["image_id"]][:, j] = was | above
    return tp, fp
