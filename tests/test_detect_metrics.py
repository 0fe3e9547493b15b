"""Detection scoring (transfer.detect.metrics): the VOC07 metric is Detectron2's
PascalVOCDetectionEvaluator to the last bit, and both metrics give 100 for the ground truth
fed back as predictions, whatever ids the data came with."""
import contextlib
import io
import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from helpers import NEEDS_DETECTRON2

from transfer import scenes as sc
from transfer.detect import datasets as ds
from transfer.detect import metrics


def _voc(tmp_path_factory, seed):
    """A VOC folder of 12 scenes in which every fifth object is difficult."""
    root = tmp_path_factory.mktemp("voc") / "VOC2007"
    scenes = sc.compose_scenes(12, seed=seed)
    sc.write_voc(root, {"test": scenes})
    n = 0
    for s in scenes:
        xml = root / "Annotations" / f"{s.name}.xml"
        tree = ET.parse(xml)
        for obj in tree.findall("object"):
            obj.find("difficult").text = "1" if n % 5 == 0 else "0"
            n += 1
        tree.write(xml)
    spec = ds.resolve(f"voc:{root}:test", {"DATASETS": {"ROOT": ""}})
    records, classes = ds.load_voc(spec)
    return root, records, classes


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """Every class has non-difficult objects."""
    return _voc(tmp_path_factory, seed=5)


@pytest.fixture(scope="module")
def voc_gaps(tmp_path_factory):
    """Two classes have only difficult objects (their AP is 0, as in Detectron2)."""
    return _voc(tmp_path_factory, seed=4)


def _noisy_predictions(gt: dict, seed: int) -> list:
    """Jittered copies of the ground truth (some with the wrong class, some twice), plus false
    positives; boxes on a 1/4-pixel grid (exact in float32 and float64, so both evaluators see
    the same numbers) and scores that tie once rounded to 3 decimals, as Detectron2 writes them."""
    rng = np.random.default_rng(seed)
    dets = []
    sizes = {img["id"]: (img["width"], img["height"]) for img in gt["images"]}
    ncls = len(gt["categories"])
    for a in gt["annotations"]:
        for _ in range(int(rng.integers(1, 3))):
            x, y, w, h = (np.array(a["bbox"]) + rng.normal(0, 2.0, 4)).round(0) / 1.0
            x, y, w, h = (np.round(np.array([x, y, max(w, 2), max(h, 2)]) * 4) / 4).tolist()
            cat = a["category_id"] if rng.random() > 0.2 else int(rng.integers(1, ncls + 1))
            dets.append({"image_id": a["image_id"], "category_id": cat, "bbox": [x, y, w, h],
                         "score": _score(rng, 1.0)})
    for img, (width, height) in sizes.items():
        for _ in range(3):
            x, y = rng.uniform(0, width - 20), rng.uniform(0, height - 20)
            dets.append({"image_id": img, "category_id": int(rng.integers(1, ncls + 1)),
                         "bbox": [float(np.round(x * 4) / 4), float(np.round(y * 4) / 4), 16.0, 12.5],
                         "score": _score(rng, 0.5)})
    return dets


def _score(rng, top: float) -> float:
    """A float32 score that Detectron2's 3-decimal rounding often ties with others."""
    return float(np.float32(round(rng.random() * top, 2) + rng.uniform(0, 4e-4)))


def _as_predictions(gt: dict) -> list:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
             "score": 1.0} for a in gt["annotations"]]


def test_ground_truth_as_predictions_scores_100_on_voc(voc):
    _, records, classes = voc
    gt = ds.ground_truth(records, classes)
    assert sum(a["iscrowd"] for a in gt["annotations"]) > 0  # difficult objects are in the test
    scores = metrics.voc07(gt, _as_predictions(gt))
    assert scores == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0}, abs=1e-9)  # 11 x 1/11
    noisy = metrics.voc07(gt, _noisy_predictions(gt, 0))
    assert 5 < noisy["AP75"] < noisy["AP50"] < 100


def test_a_class_without_test_objects_counts_0_as_in_detectron2(voc_gaps):
    _, records, classes = voc_gaps
    gt = ds.ground_truth(records, classes)
    assert metrics.voc07(gt, _as_predictions(gt))["AP50"] == pytest.approx(80.0)  # 2 of 10 classes


@NEEDS_DETECTRON2
@pytest.mark.parametrize("data, seed", [("voc", 0), ("voc", 1), ("voc_gaps", 2)])
def test_voc07_is_detectron2s_pascal_voc_evaluator(data, seed, request):
    import torch
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import PascalVOCDetectionEvaluator
    from detectron2.structures import Boxes, Instances

    root, records, classes = request.getfixturevalue(data)
    gt = ds.ground_truth(records, classes)
    # In image order, as both engines list them: ties in score are broken by position.
    dets = sorted(_noisy_predictions(gt, seed), key=lambda d: d["image_id"])
    name = f"voc07_metric_test_{data}_{seed}"
    MetadataCatalog.get(name).set(dirname=str(root), split="test", year=2007, thing_classes=classes)
    evaluator = PascalVOCDetectionEvaluator(name)
    evaluator.reset()
    source = {r["image_id"]: r["source_id"] for r in records}
    for r in records:
        mine = [d for d in dets if d["image_id"] == r["image_id"]]
        inst = Instances((r["height"], r["width"]))
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)]
        inst.pred_boxes = Boxes(torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.tensor([d["score"] for d in mine], dtype=torch.float32)
        inst.pred_classes = torch.tensor([d["category_id"] - 1 for d in mine], dtype=torch.int64)
        evaluator.process([{"image_id": source[r["image_id"]]}], [{"instances": inst}])
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = evaluator.evaluate()["bbox"]
    ours = metrics.voc07(gt, dets)
    assert ours == {k: float(v) for k, v in theirs.items()}, (ours, theirs)


def _coco_file(tmp_path, first_ann_id: int):
    """A COCO file from scenes with annotation ids starting at `first_ann_id`, a background
    category 0 without objects (as some tools export), and image ids that are not 1..N."""
    data = sc.coco_dict(sc.compose_scenes(10, seed=2))
    for i, a in enumerate(data["annotations"]):
        a["id"] = first_ann_id + i
        a["image_id"] = a["image_id"] * 7
    for img in data["images"]:
        img["id"] *= 7
    data["categories"].insert(0, {"id": 0, "name": "background", "supercategory": "none"})
    (tmp_path / "images").mkdir(exist_ok=True)
    path = tmp_path / f"instances_from{first_ann_id}.json"
    path.write_text(json.dumps(data))
    return path, data


def test_coco_annotation_ids_from_0_score_100_on_their_own_ground_truth(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    path, raw = _coco_file(tmp_path, first_ann_id=0)
    spec = ds.resolve(f"coco:{path}:{tmp_path / 'images'}", {"DATASETS": {"ROOT": ""}})
    records, classes = ds.load_coco(spec)
    assert classes == sc.CLASSES  # category 0 is background, not a class
    gt = ds.ground_truth(records, classes)
    assert min(a["id"] for a in gt["annotations"]) == 1
    assert metrics.coco(gt, _as_predictions(gt)) == {"AP": 100.0, "AP50": 100.0, "AP75": 100.0}

    # Why they are renumbered: pycocotools scores the same file, as it is, below 100.
    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO(str(path))
        preds = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                 for a in raw["annotations"]]
        e = COCOeval(api, api.loadRes(preds), "bbox")
        e.evaluate(), e.accumulate(), e.summarize()
    assert e.stats[0] < 0.999


def test_masks_score_100_and_no_detection_is_nan(tmp_path):
    path, _ = _coco_file(tmp_path, first_ann_id=1)
    spec = ds.resolve(f"coco:{path}:{tmp_path / 'images'}", {"DATASETS": {"ROOT": ""}})
    records, classes = ds.load_coco(spec)
    gt = ds.ground_truth(records, classes, with_masks=True)
    preds = []
    for r in records:
        h, w = r["height"], r["width"]
        for a in r["annotations"]:
            mask = ds.segmentation_to_mask(a["segmentation"], h, w)[None].astype(bool)
            preds += metrics.coco_results(r["image_id"], np.array([a["bbox"]]), np.array([1.0]),
                                          np.array([a["category"]]), mask)
    scores = metrics.score(gt, preds, "coco", mask_on=True)
    assert scores["mask_AP"] == 100.0 and scores["AP"] == 100.0
    assert all(math.isnan(v) for v in metrics.score(gt, [], "coco").values())
    assert all(math.isnan(v) for v in metrics.score(gt, [], "voc07").values())


@pytest.mark.parametrize("seed", [0, 1])
def test_reports_bootstrap_redrawing_nothing_gives_the_scored_numbers(voc, seed):
    """`report` re-scores the saved outcomes (transfer.uncertainty_detection) to put intervals on
    them, and shows none when it does not get the number results.json holds: its VOC07 rule must
    round scores and boxes as Detectron2 (and metrics.voc07) do."""
    from transfer.uncertainty_detection import DetectionOutcomes

    _, records, classes = voc
    gt = ds.ground_truth(records, classes)
    dets = sorted(_noisy_predictions(gt, seed), key=lambda d: d["image_id"])
    ev = DetectionOutcomes(gt, dets, "voc07")
    ours = metrics.voc07(gt, dets)
    identity = ev.evaluate(np.ones((1, len(records))), ev.names(ours))
    assert {k: float(v[0]) for k, v in identity.items()} == pytest.approx(ours, abs=1e-9)
