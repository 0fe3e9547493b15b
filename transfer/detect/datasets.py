"""Detection data sets named in DATASETS.TRAIN / DATASETS.TEST, resolved to files.

Names (the same for both engines):

- ``voc_<year>_<split>``: ``ROOT/VOC<year>`` with ``ImageSets/Main/<split>.txt``, as in
  Detectron2's builtin names (``voc_2007_trainval``, ``voc_2012_trainval``, ``voc_2007_test``).
- ``coco_<year>_<split>``: ``ROOT/coco/<split><year>/`` images and
  ``ROOT/coco/annotations/instances_<split><year>.json`` (``coco_2017_train``, ``coco_2017_val``).
- ``voc:<devkit folder>:<split>``: any VOC-layout folder (JPEGImages, Annotations,
  ImageSets/Main); year 2012 if the folder's name ends in 2012, else 2007 (the year picks
  VOC's 11-point AP for 2007, as Detectron2's evaluator does).
- ``coco:<instances json>:<image folder>``: any COCO instances file.
- ``scenes_voc_<split>`` / ``scenes_coco_<split>``: the embedded Fashion-MNIST scenes
  (transfer.scenes), composed on first use with the sizes in DATASETS.SCENES.

ROOT is DATASETS.ROOT, else $DETECTRON2_DATASETS, else ./datasets (Detectron2's rule).
VOC class names are the 20 VOC classes unless the devkit folder holds a ``classes.txt``
(one name per line, as transfer.scenes writes). COCO classes come from the JSON.
"""
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mocobench.errors import UserError

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]


@dataclass
class DatasetSpec:
    name: str
    kind: str  # "voc" or "coco"
    dirname: Path | None = None  # VOC devkit folder
    split: str = ""
    year: int = 2007
    json_file: Path | None = None  # COCO
    image_root: Path | None = None
    classes: list = field(default_factory=list)  # VOC only; COCO reads them from the JSON

    def describe(self) -> dict:
        if self.kind == "voc":
            return {"kind": "voc", "dirname": str(self.dirname), "split": self.split, "year": self.year}
        return {"kind": "coco", "json_file": str(self.json_file), "image_root": str(self.image_root)}


def data_root(cfg: dict) -> Path:
    root = cfg["DATASETS"].get("ROOT") or os.environ.get("DETECTRON2_DATASETS") or "datasets"
    return Path(os.path.expanduser(root))


def _scenes(cfg: dict) -> dict:
    from transfer.scenes import ensure_demo_scenes

    s = cfg["DATASETS"]["SCENES"]
    return ensure_demo_scenes(None, n_train=s["N_TRAIN"], n_val=s["N_VAL"], seed=s["SEED"],
                              canvas=s["CANVAS"])


def _voc_classes(dirname: Path) -> list:
    listed = dirname / "classes.txt"
    if listed.is_file():
        return [line.strip() for line in listed.read_text().splitlines() if line.strip()]
    return list(VOC_CLASSES)


def _voc(name, dirname: Path, split: str, year: int) -> DatasetSpec:
    split_file = dirname / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise UserError(f"data set {name}: {split_file} not found; point DATASETS.ROOT (or "
                        f"$DETECTRON2_DATASETS) at the folder holding VOC{year}/, or name a VOC folder "
                        f"as voc:<folder>:<split>")
    return DatasetSpec(name, "voc", dirname=dirname, split=split, year=year, classes=_voc_classes(dirname))


def _coco(name, json_file: Path, image_root: Path) -> DatasetSpec:
    if not json_file.is_file():
        raise UserError(f"data set {name}: {json_file} not found; point DATASETS.ROOT (or "
                        f"$DETECTRON2_DATASETS) at the folder holding coco/, or name the files as "
                        f"coco:<instances json>:<image folder>")
    if not image_root.is_dir():
        raise UserError(f"data set {name}: image folder {image_root} not found")
    return DatasetSpec(name, "coco", json_file=json_file, image_root=image_root)


def resolve(name: str, cfg: dict) -> DatasetSpec:
    """Turn a data set name from the config into files (see the module docstring)."""
    if m := re.fullmatch(r"scenes_(voc|coco)_(\w+)", name):
        paths = _scenes(cfg)
        if m[1] == "voc":
            return _voc(name, paths["voc"], m[2], 2007)
        return _coco(name, paths["coco"] / "annotations" / f"instances_{m[2]}.json", paths["coco"] / m[2])
    if m := re.fullmatch(r"voc_(\d{4})_(\w+)", name):
        return _voc(name, data_root(cfg) / f"VOC{m[1]}", m[2], int(m[1]))
    if m := re.fullmatch(r"coco_(\d{4})_(\w+)", name):
        root = data_root(cfg) / "coco"
        return _coco(name, root / "annotations" / f"instances_{m[2]}{m[1]}.json", root / f"{m[2]}{m[1]}")
    if name.startswith("voc:"):
        parts = name.split(":")
        if len(parts) != 3:
            raise UserError(f"data set {name!r}: write a VOC folder as voc:<devkit folder>:<split>")
        dirname = Path(os.path.expanduser(parts[1]))
        return _voc(name, dirname, parts[2], 2012 if dirname.name.endswith("2012") else 2007)
    if name.startswith("coco:"):
        parts = name.split(":")
        if len(parts) != 3:
            raise UserError(f"data set {name!r}: write COCO files as coco:<instances json>:<image folder>")
        return _coco(name, Path(os.path.expanduser(parts[1])), Path(os.path.expanduser(parts[2])))
    raise UserError(f"unknown data set {name!r}; use voc_<year>_<split>, coco_<year>_<split>, "
                    f"voc:<folder>:<split>, coco:<json>:<images> or scenes_{{voc,coco}}_<split>")


def resolve_all(cfg: dict) -> tuple[list, list]:
    """(train specs, test specs); exactly one test set, since results.json holds one set of metrics."""
    train = [resolve(n, cfg) for n in cfg["DATASETS"]["TRAIN"]]
    test = [resolve(n, cfg) for n in cfg["DATASETS"]["TEST"]]
    if not train:
        raise UserError("DATASETS.TRAIN is empty; name at least one training set")
    if len(test) != 1:
        raise UserError(f"DATASETS.TEST names {len(test)} sets; name exactly one (results.json holds "
                        f"one set of metrics), e.g. DATASETS.TEST \"('voc_2007_test',)\"")
    kinds = {s.kind for s in train + test}
    if len(kinds) > 1:
        raise UserError("DATASETS.TRAIN and DATASETS.TEST mix VOC and COCO sets; their class lists differ")
    return train, test


# ----------------------------------------------------------------------------- reading records
# Records are Detectron2-style dicts, so both engines see the same data:
# {"file_name", "image_id", "height", "width",
#  "annotations": [{"bbox": [x0, y0, x1, y1] absolute, "category": 0..K-1, "iscrowd": 0|1,
#                   "segmentation": polygons | RLE | None}]}

def load_voc(spec: DatasetSpec) -> tuple[list, list]:
    """Read a VOC split as Detectron2's load_voc_instances does (difficult objects kept, with
    iscrowd=1 so that evaluation ignores them as VOC's devkit does)."""
    ids = [line.strip() for line in (spec.dirname / "ImageSets" / "Main" / f"{spec.split}.txt")
           .read_text().splitlines() if line.strip()]
    records = []
    for fileid in ids:
        xml = spec.dirname / "Annotations" / f"{fileid}.xml"
        try:
            tree = ET.parse(xml)
        except (OSError, ET.ParseError) as e:
            raise UserError(f"data set {spec.name}: cannot read {xml} ({type(e).__name__}); "
                            f"every id in {spec.split}.txt needs an annotation file") from None
        annotations = []
        for obj in tree.findall("object"):
            cls = obj.find("name").text.strip()
            if cls not in spec.classes:
                raise UserError(f"data set {spec.name}: {xml} has class {cls!r}, not one of the "
                                f"{len(spec.classes)} classes; list them in {spec.dirname}/classes.txt")
            box = obj.find("bndbox")
            x0, y0, x1, y1 = (float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
            difficult = obj.find("difficult")
            annotations.append({
                # VOC stores 1-based inclusive pixel indices; (xmin=1, xmax=W) spans [0, W].
                "bbox": [x0 - 1.0, y0 - 1.0, x1, y1],
                "category": spec.classes.index(cls),
                "iscrowd": int(difficult is not None and difficult.text.strip() == "1"),
                "segmentation": None,
            })
        records.append({
            "file_name": str(spec.dirname / "JPEGImages" / f"{fileid}.jpg"),
            "image_id": fileid,
            "height": int(tree.findtext("./size/height")),
            "width": int(tree.findtext("./size/width")),
            "annotations": annotations,
        })
    return records, list(spec.classes)


def load_coco(spec: DatasetSpec):
    """Read a COCO instances file with pycocotools; returns (records, classes, COCO object)."""
    from pycocotools.coco import COCO

    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        try:
            coco = COCO(str(spec.json_file))
        except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
            raise UserError(f"data set {spec.name}: {spec.json_file} is not a COCO instances file "
                            f"({type(e).__name__}: {e})") from None
    cat_ids = sorted(coco.getCatIds())
    classes = [c["name"] for c in coco.loadCats(cat_ids)]
    contiguous = {cid: i for i, cid in enumerate(cat_ids)}
    records = []
    for img in coco.loadImgs(sorted(coco.getImgIds())):
        annotations = []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            x, y, w, h = ann["bbox"]
            annotations.append({
                "bbox": [x, y, x + w, y + h],
                "category": contiguous[ann["category_id"]],
                "iscrowd": int(ann.get("iscrowd", 0)),
                "segmentation": ann.get("segmentation"),
            })
        records.append({
            "file_name": str(spec.image_root / img["file_name"]),
            "image_id": img["id"],
            "height": img["height"],
            "width": img["width"],
            "annotations": annotations,
        })
    return records, classes, coco, cat_ids


def voc_as_coco(records: list, classes: list):
    """A pycocotools COCO ground truth built from VOC records (difficult -> iscrowd, ignored)."""
    from pycocotools.coco import COCO

    import contextlib
    import io

    images, anns = [], []
    for i, r in enumerate(records, start=1):
        images.append({"id": i, "file_name": r["file_name"], "height": r["height"], "width": r["width"]})
        for a in r["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": a["category"] + 1,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                         "iscrowd": a["iscrowd"]})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def segmentation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
    """COCO polygons or RLE -> H x W uint8 mask (pycocotools, as COCO's own annToMask)."""
    import pycocotools.mask as mask_util

    if isinstance(segmentation, list):
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_util.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_util.decode(rle)


# ----------------------------------------------------------------------------- Detectron2

def register_detectron2(spec: DatasetSpec) -> None:
    """Register `spec` in Detectron2's catalogs under its config name (replacing Detectron2's
    builtin registration of names such as voc_2007_trainval, whose root is fixed at import)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances, register_pascal_voc

    if spec.name in DatasetCatalog.list():
        DatasetCatalog.remove(spec.name)
        MetadataCatalog.remove(spec.name)
    if spec.kind == "voc":
        register_pascal_voc(spec.name, str(spec.dirname), spec.split, spec.year, spec.classes)
    else:
        register_coco_instances(spec.name, {}, str(spec.json_file), str(spec.image_root))
