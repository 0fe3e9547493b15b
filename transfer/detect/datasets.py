"""Detection data sets named in DATASETS.TRAIN / DATASETS.TEST: resolved to files, read once
by one reader for both engines, and checked before training starts.

Names (the same for both engines):

- ``voc_<year>_<split>``: ``ROOT/VOC<year>`` with ``ImageSets/Main/<split>.txt``, as in
  Detectron2's builtin names (``voc_2007_trainval``, ``voc_2012_trainval``, ``voc_2007_test``).
- ``coco_<year>_<split>``: ``ROOT/coco/<split><year>/`` images and
  ``ROOT/coco/annotations/instances_<split><year>.json`` (``coco_2017_train``, ``coco_2017_val``).
- ``voc:<devkit folder>:<split>``: any VOC-layout folder (JPEGImages, Annotations,
  ImageSets/Main/<split>.txt).
- ``coco:<instances json>:<image folder>``: any COCO instances file.
- ``scenes_voc_<split>`` / ``scenes_coco_<split>``: the embedded Fashion-MNIST scenes
  (transfer.scenes), composed on first use with DATASETS.SCENES.

ROOT is DATASETS.ROOT, else $DETECTRON2_DATASETS, else ./datasets (Detectron2's rule).

Classes come from the data. VOC: the folder's ``classes.txt`` (one name per line), else the
20 VOC classes. COCO: the JSON's categories, in id order. A background entry (a name in
BACKGROUND_NAMES, or COCO category id 0) is never a foreground class: it is dropped from the
list, and an object labelled with it is refused. VOC "difficult" objects are trained on (as
Detectron2 does) and ignored by evaluation (as the VOC devkit does); COCO "iscrowd" regions
are neither trained on nor counted (as Detectron2 and pycocotools do).
"""
import contextlib
import io
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
# Class-list entries that mean "no object" (labelme / mmseg / torchvision-style lists).
BACKGROUND_NAMES = {"_background_", "__background__", "background"}
EXIF_ORIENTATION = 274  # the EXIF tag; values 5-8 rotate by 90 degrees (width and height swap)


@dataclass
class DatasetSpec:
    name: str
    kind: str  # "voc" or "coco"
    dirname: Path | None = None  # VOC devkit folder
    split: str = ""
    json_file: Path | None = None  # COCO
    image_root: Path | None = None
    classes: list = field(default_factory=list)  # VOC only; COCO reads them from the JSON

    def describe(self) -> dict:
        if self.kind == "voc":
            return {"kind": "voc", "dirname": str(self.dirname), "split": self.split}
        return {"kind": "coco", "json_file": str(self.json_file), "image_root": str(self.image_root)}


def data_root(cfg: dict) -> Path:
    root = cfg["DATASETS"].get("ROOT") or os.environ.get("DETECTRON2_DATASETS") or "datasets"
    return Path(os.path.expanduser(root))


def _scenes(cfg: dict) -> dict:
    from transfer.scenes import ensure_demo_scenes

    s = cfg["DATASETS"]["SCENES"]
    return ensure_demo_scenes(None, n_train=s["N_TRAIN"], n_val=s["N_VAL"], seed=s["SEED"],
                              canvas=s["CANVAS"], objects=tuple(s["OBJECTS"]), scale=tuple(s["SCALE"]),
                              background=s["BACKGROUND"])


def foreground(names: list, where: str) -> list:
    """A class list without its background entry; refuses an empty or repeating list."""
    classes = [n for n in names if n.strip().lower() not in BACKGROUND_NAMES]
    if not classes:
        raise UserError(f"{where} lists no foreground class; list the object classes, one per line")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise UserError(f"{where} lists {repeated[0]!r} twice; each class once")
    return classes


def _voc_classes(dirname: Path) -> list:
    listed = dirname / "classes.txt"
    if listed.is_file():
        return foreground([line.strip() for line in listed.read_text().splitlines() if line.strip()],
                          str(listed))
    return list(VOC_CLASSES)


def _voc(name, dirname: Path, split: str, hint: str) -> DatasetSpec:
    if not (dirname / "Annotations").is_dir():
        raise UserError(f"data set {name}: {dirname / 'Annotations'} not found; {hint}")
    split_file = dirname / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise UserError(f"data set {name}: create {split_file} listing the images of split {split!r}, "
                        f"one name per line without .jpg (e.g. 000005 for JPEGImages/000005.jpg)")
    return DatasetSpec(name, "voc", dirname=dirname, split=split, classes=_voc_classes(dirname))


def _coco(name, json_file: Path, image_root: Path, hint: str) -> DatasetSpec:
    if not json_file.is_file():
        raise UserError(f"data set {name}: {json_file} not found; {hint}")
    if not image_root.is_dir():
        raise UserError(f"data set {name}: image folder {image_root} not found")
    return DatasetSpec(name, "coco", json_file=json_file, image_root=image_root)


def resolve(name: str, cfg: dict) -> DatasetSpec:
    """Turn a data set name from the config into files (see the module docstring)."""
    root_hint = ("point DATASETS.ROOT (or $DETECTRON2_DATASETS) at the folder holding {}, or name "
                 "the files as {}")
    if m := re.fullmatch(r"scenes_(voc|coco)_(\w+)", name):
        paths = _scenes(cfg)
        if m[1] == "voc":
            return _voc(name, paths["voc"], m[2], "the scene folder is incomplete; delete it")
        return _coco(name, paths["coco"] / "annotations" / f"instances_{m[2]}.json", paths["coco"] / m[2],
                     "the scenes have the splits train and val")
    if m := re.fullmatch(r"voc_(\d{4})_(\w+)", name):
        return _voc(name, data_root(cfg) / f"VOC{m[1]}", m[2],
                    root_hint.format(f"VOC{m[1]}/", "voc:<devkit folder>:<split>"))
    if m := re.fullmatch(r"coco_(\d{4})_(\w+)", name):
        root = data_root(cfg) / "coco"
        return _coco(name, root / "annotations" / f"instances_{m[2]}{m[1]}.json", root / f"{m[2]}{m[1]}",
                     root_hint.format("coco/", "coco:<instances json>:<image folder>"))
    if name.startswith("voc:"):
        parts = name.split(":")
        if len(parts) != 3:
            raise UserError(f"data set {name!r}: write a VOC folder as voc:<devkit folder>:<split>")
        return _voc(name, Path(os.path.expanduser(parts[1])), parts[2],
                    "a VOC folder holds JPEGImages/, Annotations/ and ImageSets/Main/<split>.txt")
    if name.startswith("coco:"):
        parts = name.split(":")
        if len(parts) != 3:
            raise UserError(f"data set {name!r}: write COCO files as coco:<instances json>:<image folder>")
        return _coco(name, Path(os.path.expanduser(parts[1])), Path(os.path.expanduser(parts[2])),
                     "check the path")
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
# Records are what both engines train and evaluate on:
# {"file_name", "image_id": 1..N in split order (the id evaluation uses), "source_id": the data's
#  own id (VOC file id, COCO image id), "height", "width",
#  "annotations": [{"bbox": [x0, y0, x1, y1] absolute pixel edges, "category": 0..K-1,
#                   "iscrowd": 0|1 (COCO crowd), "difficult": 0|1 (VOC), "area",
#                   "segmentation": polygons | RLE | None}]}

def _voc_int(node, key: str, xml: Path, spec) -> float | None:
    text = node.findtext(key)
    if text is None or not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise UserError(f"data set {spec.name}: {xml}: <{key}> is {text.strip()!r}, not a number; "
                        f"fix the annotation") from None


def _voc_object(obj, xml: Path, spec, number: int) -> dict:
    cls = (obj.findtext("name") or "").strip()
    if cls.lower() in BACKGROUND_NAMES:
        raise UserError(f"data set {spec.name}: {xml} labels an object {cls!r}, the background; "
                        f"remove that object or give it its class")
    if cls not in spec.classes:
        raise UserError(f"data set {spec.name}: {xml} has class {cls!r}, not one of the "
                        f"{len(spec.classes)} classes; list them in {spec.dirname}/classes.txt")
    box = obj.find("bndbox")
    coords = [_voc_int(box, k, xml, spec) if box is not None else None for k in ("xmin", "ymin", "xmax", "ymax")]
    if None in coords:
        raise UserError(f"data set {spec.name}: {xml} has an object {cls!r} without a complete <bndbox>; "
                        f"fix the annotation")
    x0, y0, x1, y1 = coords
    where = f"{xml} object {number} ({cls})"
    if x1 < x0 or y1 < y0:
        raise UserError(f"data set {spec.name}: {where} has xmin..xmax {x0:g}..{x1:g}, ymin..ymax {y0:g}..{y1:g}: "
                        f"a max below its min; fix the annotation")
    difficult = _voc_int(obj, "difficult", xml, spec)  # <difficult/> (empty) means 0
    return {
        # VOC stores 1-based inclusive pixel indices; (xmin=1, xmax=W) spans [0, W].
        "bbox": [x0 - 1.0, y0 - 1.0, x1, y1],
        "category": spec.classes.index(cls),
        "iscrowd": 0,
        "difficult": int(bool(difficult)),
        "area": (x1 - x0 + 1.0) * (y1 - y0 + 1.0),
        "segmentation": None,
        "where": where,
    }


def _voc_ids(spec: DatasetSpec) -> list:
    """The split file's image ids; one listed twice would be scored twice: refused."""
    split_file = spec.dirname / "ImageSets" / "Main" / f"{spec.split}.txt"
    ids, first = [], {}
    for number, line in enumerate(split_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fileid = line.strip().split()[0]
        if fileid in first:
            raise UserError(f"data set {spec.name}: {split_file} lists {fileid!r} twice (lines {first[fileid]} "
                            f"and {number}); list each image once")
        first[fileid] = number
        ids.append(fileid)
    if not ids:
        raise UserError(f"data set {spec.name}: ImageSets/Main/{spec.split}.txt lists no image")
    return ids


def load_voc(spec: DatasetSpec) -> tuple[list, list]:
    """Read a VOC split; sizes missing from an XML are filled from the image by check_images."""
    ids = _voc_ids(spec)
    records = []
    for image_id, fileid in enumerate(ids, start=1):
        xml = spec.dirname / "Annotations" / f"{fileid}.xml"
        try:
            tree = ET.parse(xml)
        except (OSError, ET.ParseError) as e:
            raise UserError(f"data set {spec.name}: cannot read {xml} ({type(e).__name__}); "
                            f"every id in {spec.split}.txt needs an annotation file") from None
        height, width = (_voc_int(tree, f"./size/{k}", xml, spec) for k in ("height", "width"))
        records.append({
            "file_name": str(spec.dirname / "JPEGImages" / f"{fileid}.jpg"),
            "image_id": image_id, "source_id": fileid,
            "height": int(height) if height else None, "width": int(width) if width else None,
            "annotations": [_voc_object(obj, xml, spec, k) for k, obj in enumerate(tree.findall("object"), 1)],
        })
    return records, list(spec.classes)


def _coco_api(spec: DatasetSpec):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        try:
            return COCO(str(spec.json_file))
        except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
            raise UserError(f"data set {spec.name}: {spec.json_file} is not a COCO instances file "
                            f"({type(e).__name__}: {e})") from None


def _coco_categories(coco, spec) -> tuple[list, list]:
    """(foreground category ids in id order, their names); category 0 is background."""
    cats = coco.loadCats(sorted(coco.getCatIds()))
    fg = [c for c in cats if c["id"] != 0 and str(c["name"]).strip().lower() not in BACKGROUND_NAMES]
    foreground([c["name"] for c in fg], f"data set {spec.name}: {spec.json_file}")
    return [c["id"] for c in fg], [c["name"] for c in fg]


def _coco_unique_images(coco, spec) -> None:
    """pycocotools keeps the last of two images with one id (and reads one file twice under
    two ids): both are refused."""
    for key in ("id", "file_name"):
        seen = set()
        for img in coco.dataset.get("images", []):
            if img.get(key) in seen:
                raise UserError(f"data set {spec.name}: {spec.json_file} lists two images with {key} "
                                f"{img.get(key)!r}; each image once, under its own id")
            seen.add(img.get(key))


def _coco_box(ann: dict, img: dict, spec) -> tuple[list, str]:
    where = f"{spec.json_file} annotation {ann.get('id')} (image {img['id']})"
    x, y, w, h = ann["bbox"]
    # A negative size is a wrong box; a zero one is kept, as Detectron2 does (COCO train2017 has two
    # of height 0, e.g. annotation 918): both engines train only on boxes of positive size.
    if not (w >= 0 and h >= 0):
        raise UserError(f"data set {spec.name}: {where} has bbox width {w:g} and height {h:g}; a box "
                        f"needs both at least 0: fix or remove the annotation")
    return [x, y, x + w, y + h], where


def load_coco(spec: DatasetSpec) -> tuple[list, list]:
    """Read a COCO instances file with pycocotools; returns (records, classes)."""
    coco = _coco_api(spec)
    _coco_unique_images(coco, spec)
    cat_ids, classes = _coco_categories(coco, spec)
    contiguous = {cid: i for i, cid in enumerate(cat_ids)}
    records = []
    for image_id, img in enumerate(coco.loadImgs(sorted(coco.getImgIds())), start=1):
        annotations = []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            if ann["category_id"] not in contiguous:
                what = "the background (category 0)" if ann["category_id"] in coco.cats else "no category"
                raise UserError(f"data set {spec.name}: annotation {ann.get('id')} of image {img['id']} has "
                                f"category_id {ann['category_id']}, {what}; give it a foreground category")
            box, where = _coco_box(ann, img, spec)
            annotations.append({
                "bbox": box, "where": where,
                "category": contiguous[ann["category_id"]],
                "iscrowd": int(ann.get("iscrowd", 0)),
                "difficult": 0,
                "area": float(ann.get("area") or (box[2] - box[0]) * (box[3] - box[1])),
                "segmentation": ann.get("segmentation"),
            })
        records.append({
            "file_name": str(spec.image_root / img["file_name"]),
            "image_id": image_id, "source_id": img["id"],
            "height": img.get("height"), "width": img.get("width"),
            "annotations": annotations,
        })
    return records, classes


def load(spec: DatasetSpec) -> tuple[list, list]:
    return load_voc(spec) if spec.kind == "voc" else load_coco(spec)


def load_sets(specs) -> tuple[list, list, dict]:
    """Records of several sets that share one class list (e.g. VOC07+12 trainval), their
    classes, and {set name: number of images}."""
    records, classes, counts = [], None, {}
    for spec in specs:
        r, c = load(spec)
        if classes is not None and c != classes:
            raise UserError(f"data sets {specs[0].name} and {spec.name} have different class lists; "
                            f"train and test on one class list")
        records, classes = records + r, c
        counts[spec.name] = len(r)
    return records, classes, counts


# ----------------------------------------------------------------------------- checks

def _image_size(path: str) -> tuple[int, int, str]:
    """(width, height, mode) as read (EXIF rotation applied, like both engines' readers);
    only the header is read."""
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
        orientation = im.getexif().get(EXIF_ORIENTATION, 1) if hasattr(im, "getexif") else 1
        mode = im.mode
    return (height, width, mode) if orientation in (5, 6, 7, 8) else (width, height, mode)


def check_images(records: list, name: str, every_image: bool = True) -> None:
    """Before training: every image exists, is 8-bit, and has the size its annotation says
    (a missing size is filled from the image). every_image=False only fills missing sizes
    (for the processes that run beside the one that checks)."""
    missing, bad = [], None
    for r in records:
        if not every_image and r["width"] and r["height"]:
            continue
        try:
            width, height, mode = _image_size(r["file_name"])
        except FileNotFoundError:
            missing.append(r["file_name"])
            continue
        except OSError as e:
            raise UserError(f"data set {name}: cannot read image {r['file_name']} ({e}); replace the file") from None
        if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise UserError(f"data set {name}: {r['file_name']} is a {mode} (16/32-bit) image; both engines "
                            f"read 8-bit images: convert it to 8-bit RGB first")
        r["width"] = r["width"] or width
        r["height"] = r["height"] or height
        if bad is None and (width, height) != (r["width"], r["height"]):
            bad = (r["file_name"], width, height, r["width"], r["height"])
    if missing:
        raise UserError(f"data set {name}: {len(missing)} of {len(records)} images are missing, e.g. "
                        f"{missing[0]}; restore them or remove them from the split")
    if bad:
        raise UserError(f"data set {name}: {bad[0]} is {bad[1]}x{bad[2]} but its annotation says "
                        f"{bad[3]}x{bad[4]}; fix the annotation's width/height")
    check_boxes(records, name)


OUTSIDE_PX = 1.0  # how far a box edge may lie outside its image (rounding of hand-drawn boxes)


def check_boxes(records: list, name: str) -> None:
    """Every box lies inside its image (within OUTSIDE_PX): one outside it is a wrong
    annotation (or one of another image size) that would be trained on and scored."""
    for r in records:
        width, height = r["width"], r["height"]
        for a in r["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            if x0 < -OUTSIDE_PX or y0 < -OUTSIDE_PX or x1 > width + OUTSIDE_PX or y1 > height + OUTSIDE_PX:
                raise UserError(f"data set {name}: {a.get('where', r['file_name'])} spans x {x0:g}..{x1:g}, "
                                f"y {y0:g}..{y1:g}, outside its {width}x{height} image; fix the annotation")


def check_num_classes(cfg: dict, classes: list, train_name: str, explicit: bool) -> int:
    """NUM_CLASSES follows the data; an explicit value that contradicts it is refused."""
    have = cfg["MODEL"]["ROI_HEADS"]["NUM_CLASSES"]
    if explicit and have != len(classes):
        raise UserError(f"MODEL.ROI_HEADS.NUM_CLASSES is {have} but {train_name} has {len(classes)} classes "
                        f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}); pass "
                        f"MODEL.ROI_HEADS.NUM_CLASSES {len(classes)}")
    return len(classes)


# ----------------------------------------------------------------------------- for evaluation

def ground_truth(records: list, classes: list, with_masks: bool = False) -> dict:
    """The evaluated ground truth as a COCO dict: image ids 1..N (records' image_id),
    annotation ids 1..M (never 0: pycocotools would treat a match to id 0 as no match),
    category ids 1..K in class order; VOC difficult and COCO crowd objects are iscrowd 1."""
    images, anns = [], []
    for r in records:
        images.append({"id": r["image_id"], "file_name": os.path.basename(r["file_name"]),
                       "source_id": r["source_id"], "height": r["height"], "width": r["width"]})
        for a in r["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            ann = {"id": len(anns) + 1, "image_id": r["image_id"], "category_id": a["category"] + 1,
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "area": a["area"],
                   "iscrowd": int(a["iscrowd"] or a["difficult"])}
            if with_masks and a["segmentation"] is not None:
                ann["segmentation"] = a["segmentation"]
            anns.append(ann)
    return {"images": images, "annotations": anns,
            "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}


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

def detectron2_dicts(records: list) -> list:
    """Records as Detectron2 dataset dicts (XYXY_ABS boxes, contiguous category_id). VOC
    difficult objects stay in training, as Detectron2's own VOC loader keeps them."""
    from detectron2.structures import BoxMode

    out = []
    for r in records:
        anns = []
        for a in r["annotations"]:
            ann = {"bbox": list(a["bbox"]), "bbox_mode": BoxMode.XYXY_ABS, "category_id": a["category"],
                   "iscrowd": a["iscrowd"]}
            if a["segmentation"] is not None:
                ann["segmentation"] = a["segmentation"]
            anns.append(ann)
        out.append({"file_name": r["file_name"], "image_id": r["image_id"], "height": r["height"],
                    "width": r["width"], "annotations": anns})
    return out


def register_detectron2(spec: DatasetSpec, classes: list) -> None:
    """Register `spec` in Detectron2's catalogs under its config name, read by our reader
    (replacing Detectron2's builtin registration of names such as voc_2007_trainval, whose
    root is fixed at import)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if spec.name in DatasetCatalog.list():
        DatasetCatalog.remove(spec.name)
        MetadataCatalog.remove(spec.name)

    def read(spec=spec):
        records, _ = load(spec)
        check_images(records, spec.name, every_image=False)  # the parent checked; fills missing sizes
        return detectron2_dicts(records)

    DatasetCatalog.register(spec.name, read)
    MetadataCatalog.get(spec.name).set(thing_classes=list(classes), evaluator_type="moco-bench")
