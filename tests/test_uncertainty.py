"""The bootstrap (transfer/uncertainty*.py) against the references it must reproduce.

Every metric is recomputed here by the reference itself (scikit-learn, pycocotools' COCOeval,
Detectron2's voc_eval, mmseg's IoUMetric) on the same outcomes, never pasted: the identity
redraw must equal it, and a redraw must equal the reference run on the explicitly redrawn
test set (images repeated as often as drawn).
"""
import contextlib
import copy
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import NEEDS_DETECTRON2

from transfer import outcomes
from transfer.uncertainty import (
    ClassificationOutcomes,
    SegmentationOutcomes,
    align,
    percentile_ci,
    resamples,
    welch_p,
)
from transfer.uncertainty_detection import DetectionOutcomes

GOOD = Path(__file__).parent / "fixtures" / "results" / "good"


def read(folder):
    path = GOOD / folder / "results.json"
    return outcomes.read(path, json.loads(path.read_text()))


def one_redraw(n, seed=3):
    return next(resamples(n, 1, seed))


# ----------------------------------------------------------------------------- statistics

def test_redraws_are_seeded_counts_of_n_draws():
    a, b = list(resamples(50, 7, 1)), list(resamples(50, 7, 1))
    w = np.concatenate(a)
    assert w.shape == (7, 50) and (w.sum(1) == 50).all() and (w >= 0).all()
    assert np.array_equal(w, np.concatenate(b))
    assert not np.array_equal(w, np.concatenate(list(resamples(50, 7, 2))))


def test_ci_covers_the_true_accuracy_at_about_the_nominal_rate():
    """300 test sets of 400 images from a model of known accuracy 0.7: the 95% interval
    holds 70.0 in about 95% of them."""
    rng = np.random.default_rng(0)
    n, true, covered, draws = 400, 0.7, 0, 300
    for d in range(draws):
        labels = rng.integers(0, 10, n)
        right = rng.random(n) < true
        top1 = np.where(right, labels, (labels + rng.integers(1, 10, n)) % 10)
        ev = ClassificationOutcomes(labels, top1[:, None])
        values = np.concatenate([ev.evaluate(w, {"top1": "top1"})["top1"] for w in resamples(n, 400, d)])
        lo, hi = percentile_ci(values)
        covered += lo <= 100 * true <= hi
    assert 0.91 <= covered / draws <= 0.98, covered / draws


def test_paired_ci_is_narrower_than_unpaired_for_correlated_rows():
    rng = np.random.default_rng(1)
    n = 2000
    labels, hardness = rng.integers(0, 10, n), rng.normal(size=n)

    def row(skill):
        right = skill - hardness + 0.3 * rng.normal(size=n) > 0
        return ClassificationOutcomes(labels, np.where(right, labels, (labels + 1) % 10)[:, None])

    a, b = row(0.55), row(0.5)
    names = {"top1": "top1"}
    paired = np.concatenate([a.evaluate(w, names)["top1"] - b.evaluate(w, names)["top1"]
                             for w in resamples(n, 1000, 0)])
    unpaired = np.concatenate([a.evaluate(w, names)["top1"] for w in resamples(n, 1000, 0)]) \
        - np.concatenate([b.evaluate(w, names)["top1"] for w in resamples(n, 1000, 1)])
    (plo, phi), (ulo, uhi) = percentile_ci(paired), percentile_ci(unpaired)
    assert phi - plo < 0.6 * (uhi - ulo)
    assert plo > 0 and ulo < 0  # the paired test sees the small gain; the unpaired one cannot


def test_welch_matches_scipy_and_needs_two_runs_a_side():
    from scipy import stats

    a, b = [70.1, 70.9, 71.4], [68.0, 68.8]
    assert welch_p(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert welch_p(a, [68.0]) is None and welch_p([1.0, 1.0], [1.0, 1.0]) is None


def test_first_recall_point_reached_is_exactly_searchsorted_on_the_ratio():
    """Where recall tp/npos lands exactly on a threshold (3/10 vs 0.3), the float comparison
    decides: the vectorised search must agree with the references' own np.searchsorted."""
    from pycocotools.cocoeval import Params

    from transfer.uncertainty import VOC07_RECALLS, _first_reaching

    npos = np.arange(1, 301, dtype=np.float64)
    tp = np.minimum(np.arange(0, 320, dtype=np.float64)[None, :], npos[:, None])  # every count 0..npos
    for thresholds in (Params(iouType="bbox").recThrs, VOC07_RECALLS):
        want = np.stack([np.searchsorted(tp[r] / npos[r], thresholds, side="left") for r in range(len(npos))])
        assert np.array_equal(_first_reaching(tp, npos, thresholds), want)


# ----------------------------------------------------------------------------- classification

def test_classification_identity_and_a_redraw_match_scikit_learn():
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        top_k_accuracy_score,
    )

    rng = np.random.default_rng(2)
    n, c = 600, 7
    labels = rng.integers(0, c, n)
    scores = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[labels]
    topk = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    ev = ClassificationOutcomes(labels, topk)
    names = ev.names({"top1": "", "top5": "", "mean_per_class_accuracy": ""})
    assert names == {"top1": "top1", "top5": "top5", "mean_per_class_accuracy": "mean_per_class"}
    w = one_redraw(n)
    idx = np.repeat(np.arange(n), w[0].astype(int))  # the redrawn test set, spelled out
    for weights, keep in ((np.ones((1, n)), np.arange(n)), (w, idx)):
        got = ev.evaluate(weights, names)
        y, s = labels[keep], scores[keep]
        assert got["top1"][0] == pytest.approx(100 * accuracy_score(y, topk[keep, 0]))
        assert got["top5"][0] == pytest.approx(100 * top_k_accuracy_score(y, s, k=5, labels=range(c)))
        want = 100 * balanced_accuracy_score(y, topk[keep, 0])
        assert got["mean_per_class_accuracy"][0] == pytest.approx(want)


@NEEDS_DETECTRON2
def test_multilabel_11_point_map_matches_the_voc_devkit_rule():
    from detectron2.evaluation.pascal_voc_evaluation import voc_ap

    rng = np.random.default_rng(3)
    n, c = 300, 4
    labels = (rng.random((n, c)) < 0.3).astype(np.int64)
    labels[rng.random((n, c)) < 0.05] = -1  # "difficult": neither way
    scores = rng.normal(size=(n, c)) + 1.2 * (labels > 0)
    ev = ClassificationOutcomes(labels, scores=scores)
    assert ev.names({"mAP": "VOC07 11-point mAP"}) == {"mAP": "ap11"}
    aps = []
    for k in range(c):  # the devkit: rank by score, cumulate, VOC07 11-point
        keep = labels[:, k] >= 0
        order = np.argsort(-scores[keep, k], kind="mergesort")
        hit = labels[keep, k][order] == 1
        tp, fp = np.cumsum(hit), np.cumsum(~hit)
        aps.append(voc_ap(tp / hit.sum(), tp / np.maximum(tp + fp, np.finfo(np.float64).eps), True))
    assert ev.evaluate(np.ones((1, n)), {"mAP": "ap11"})["mAP"][0] == pytest.approx(100 * np.mean(aps))


# ----------------------------------------------------------------------------- segmentation

def _mmseg_metrics(labels, preds, classes):
    """mmseg's IoUMetric on label maps (nanmean x 100, before its 2-decimal rounding)."""
    import torch

    from mocobench.mmseg_compat import import_mmseg

    import_mmseg()
    from mmseg.evaluation.metrics import IoUMetric

    parts = [IoUMetric.intersect_and_union(torch.from_numpy(p), torch.from_numpy(g), classes, 255)
             for p, g in zip(preds, labels)]
    got = IoUMetric.total_area_to_metrics(*[sum(x[i] for x in parts) for i in range(4)], ["mIoU"], None, 1)
    value = {k: 100 * float(np.nanmean(np.asarray(v))) for k, v in got.items()}
    return {"mIoU": value["IoU"], "mAcc": value["Acc"], "aAcc": value["aAcc"]}


def test_summed_per_image_confusion_gives_mmseg_metrics():
    rng = np.random.default_rng(4)
    c, n = 6, 30
    labels = [rng.integers(0, c - 1, (16, 16)) for _ in range(n)]  # class 5: predicted, never true
    for lab in labels:
        lab[0] = 255
    preds = [np.where(rng.random(lab.shape) < 0.7, lab, rng.integers(0, c, lab.shape)) for lab in labels]
    confusion = [np.bincount(c * g[g != 255] + p[g != 255], minlength=c * c).reshape(c, c)
                 for g, p in zip(labels, preds)]
    ev = SegmentationOutcomes(np.stack(confusion))
    names = ev.names({"mIoU": "", "mAcc": "", "aAcc": ""})
    w = one_redraw(n)
    idx = np.repeat(np.arange(n), w[0].astype(int))
    for weights, keep in ((np.ones((1, n)), np.arange(n)), (w, idx)):
        got = ev.evaluate(weights, names)
        want = _mmseg_metrics([labels[i] for i in keep], [preds[i].copy() for i in keep], c)
        for m in names:
            assert got[m][0] == pytest.approx(want[m], abs=1e-4), m  # mmseg sums in float32


def test_segmentation_fixture_reproduces_its_reported_metrics():
    record = json.loads((GOOD / "segment_demo" / "moco_v2" / "results.json").read_text())
    got = read("segment_demo/moco_v2").evaluate(np.ones((1, 80)), {m: m for m in ("mIoU", "mAcc", "aAcc")})
    for m, v in got.items():
        assert v[0] == pytest.approx(record["metrics"][m], abs=0.005)  # mmseg rounds to 2 decimals


# ----------------------------------------------------------------------------- detection: COCO

def _cocoeval(gt, dets, iou_type):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": 100 * ev.stats[0], "AP50": 100 * ev.stats[1], "AP75": 100 * ev.stats[2]}


def _coco_files():
    z = outcomes.load(GOOD / "detect_coco/moco_v1/results.json",
                      json.loads((GOOD / "detect_coco/moco_v1/results.json").read_text()))
    return z["ground_truth"], z["detections"]


def _repeat_images(gt, dets, counts):
    """The redrawn test set spelled out: image i repeated counts[i] times, fresh ids."""
    images, anns, out = [], [], []
    for i, im in enumerate(gt["images"]):
        for r in range(int(counts[i])):
            new = len(images) + 1
            images.append({**im, "id": new, "file_name": f"{im['file_name']}#{r}"})
            anns += [{**a, "image_id": new, "id": len(anns) + k + 1}
                     for k, a in enumerate(a for a in gt["annotations"] if a["image_id"] == im["id"])]
            out += [{**d, "image_id": new} for d in dets if d["image_id"] == im["id"]]
    return {**gt, "images": images, "annotations": anns}, out


@pytest.mark.parametrize("iou_type, prefix", [("bbox", ""), ("segm", "mask_")])
def test_coco_identity_and_a_redraw_equal_cocoeval(iou_type, prefix):
    gt, dets = _coco_files()
    ev = DetectionOutcomes(gt, dets, "coco")
    names = ev.names({f"{prefix}{m}": "" for m in ("AP", "AP50", "AP75")})
    assert len(names) == 3
    n = len(gt["images"])
    counts = one_redraw(n)
    for weights, (g, d) in ((np.ones((1, n)), (gt, dets)), (counts, _repeat_images(gt, dets, counts[0]))):
        got, want = ev.evaluate(weights, names), _cocoeval(g, d, iou_type)
        for m in ("AP", "AP50", "AP75"):
            assert got[prefix + m][0] == pytest.approx(want[m], abs=1e-9), m


def test_coco_ground_truth_ids_from_zero_are_not_lost():
    """COCOeval records a match by the ground truth id: an id 0 reads as unmatched. The
    ground truth fed back as detections must score 100 whatever the ids."""
    gt, _ = _coco_files()
    gt = copy.deepcopy(gt)
    for i, a in enumerate(gt["annotations"]):
        a["id"], a["iscrowd"] = i, 0  # ids from 0, as some annotation tools export
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]]
    ev = DetectionOutcomes(gt, dets, "coco")
    got = ev.evaluate(np.ones((1, len(gt["images"]))), {"AP": ("bbox", "AP")})
    assert got["AP"][0] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- detection: VOC07

def _voc_eval(tmp_path, gt, dets, decimals=3):
    """Detectron2's PascalVOCDetectionEvaluator.evaluate on XML annotations and per-class
    detection files built from the COCO-format outcomes (inverse of its conversion)."""
    from detectron2.evaluation.pascal_voc_evaluation import voc_eval

    (tmp_path / "Annotations").mkdir(exist_ok=True)
    names = {im["id"]: re.sub(r"\W", "_", im["file_name"]) for im in gt["images"]}
    cats = {c["id"]: c["name"] for c in gt["categories"]}
    for image_id, stem in names.items():
        objs = "".join(
            f"<object><name>{cats[a['category_id']]}</name><pose>x</pose><truncated>0</truncated>"
            f"<difficult>{a['iscrowd']}</difficult><bndbox><xmin>{int(a['bbox'][0]) + 1}</xmin>"
            f"<ymin>{int(a['bbox'][1]) + 1}</ymin><xmax>{int(a['bbox'][0] + a['bbox'][2])}</xmax>"
            f"<ymax>{int(a['bbox'][1] + a['bbox'][3])}</ymax></bndbox></object>"
            for a in gt["annotations"] if a["image_id"] == image_id)
        (tmp_path / "Annotations" / f"{stem}.xml").write_text(f"<annotation>{objs}</annotation>")
    (tmp_path / "set.txt").write_text("\n".join(names.values()) + "\n")
    aps = {t: [] for t in range(50, 100, 5)}
    for cat_id, cat in cats.items():
        (tmp_path / f"{cat}.txt").write_text("\n".join(
            f"{names[d['image_id']]} {d['score']:.{decimals}f} {d['bbox'][0] + 1:.1f} {d['bbox'][1] + 1:.1f} "
            f"{d['bbox'][0] + d['bbox'][2]:.1f} {d['bbox'][1] + d['bbox'][3]:.1f}"
            for d in dets if d["category_id"] == cat_id))
        for t in aps:
            aps[t].append(100 * voc_eval(str(tmp_path / "{}.txt"), str(tmp_path / "Annotations" / "{}.xml"),
                                         str(tmp_path / "set.txt"), cat, t / 100.0, True)[2])
    means = {t: np.mean(v) for t, v in aps.items()}
    return {"AP": np.mean(list(means.values())), "AP50": means[50], "AP75": means[75]}


@NEEDS_DETECTRON2
def test_voc07_identity_equals_detectron2_voc_eval(tmp_path):
    z = outcomes.load(GOOD / "detect_voc/supervised/results.json",
                      json.loads((GOOD / "detect_voc/supervised/results.json").read_text()))
    gt, dets = z["ground_truth"], z["detections"]
    assert any(a["iscrowd"] for a in gt["annotations"])  # difficult boxes are exercised
    ev = DetectionOutcomes(gt, dets, "voc07")
    got = ev.evaluate(np.ones((1, len(gt["images"]))), ev.names({"AP": "", "AP50": "", "AP75": ""}))
    want = _voc_eval(tmp_path, gt, dets)
    for m in ("AP", "AP50", "AP75"):
        assert got[m][0] == pytest.approx(want[m], abs=1e-6), m


@NEEDS_DETECTRON2
def test_voc07_redraw_equals_voc_eval_on_the_redrawn_set(tmp_path):
    z = outcomes.load(GOOD / "detect_voc/moco_v1_s0/results.json",
                      json.loads((GOOD / "detect_voc/moco_v1_s0/results.json").read_text()))
    gt, dets = z["ground_truth"], copy.deepcopy(z["detections"])
    rng = np.random.default_rng(5)
    # distinct scores (at the 3 decimals Detectron2 writes): a repeated image's copies are the only ties
    for d, score in zip(dets, rng.choice(1000, len(dets), replace=False) / 1000):
        d["score"] = float(score)
    n = len(gt["images"])
    counts = one_redraw(n)
    ev = DetectionOutcomes(gt, dets, "voc07")
    got = ev.evaluate(counts, ev.names({"AP": "", "AP50": "", "AP75": ""}))
    want = _voc_eval(tmp_path, *_repeat_images(gt, dets, counts[0]))
    for m in ("AP", "AP50", "AP75"):
        assert got[m][0] == pytest.approx(want[m], abs=1e-6), m


def test_voc07_class_without_ground_truth_scores_zero_as_detectron2():
    gt = {"images": [{"id": 1, "file_name": "a.png"}],
          "categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 0}]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
            {"image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.8}]
    got = DetectionOutcomes(gt, dets, "voc07").evaluate(np.ones((1, 1)), {"AP50": ("bbox", "AP50")})
    assert got["AP50"][0] == pytest.approx(50.0)  # class x: 100, class y (no truth): 0


# ----------------------------------------------------------------------------- pairing

def test_runs_pair_by_image_id_and_only_on_the_same_ground_truth():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 3, 20)
    ids = [f"im{i}" for i in range(20)]
    a = ClassificationOutcomes(labels, labels[:, None], ids=ids)
    perm = rng.permutation(20)
    b = ClassificationOutcomes(labels[perm], labels[perm][:, None], ids=[ids[i] for i in perm])
    assert np.array_equal(align(a, b), perm)
    other = labels[perm].copy()
    other[0] = (other[0] + 1) % 3
    assert align(a, ClassificationOutcomes(other, other[:, None], ids=[ids[i] for i in perm])) is None
    assert align(a, ClassificationOutcomes(labels[:19], labels[:19, None], ids=ids[:19])) is None
    renamed = ClassificationOutcomes(labels, labels[:, None], ids=[f"x{i}" for i in range(20)])
    assert align(a, renamed) is None
