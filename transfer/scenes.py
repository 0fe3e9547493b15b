"""Detection and segmentation scenes composed from held-out Fashion-MNIST items.

No real box- or mask-labelled data set ships offline, so the embedded default
pastes Fashion-MNIST items from the TEST split (pretraining only ever sees the
train split) onto larger RGB canvases and writes them in the real formats, so
the real readers and evaluators (Detectron2, pycocotools, MMSegmentation) run
on them unchanged.

Public API (stable; the detection and segmentation tasks both use it)::

    scenes = compose_scenes(n, seed=0, canvas=128, objects=(2, 4), scale=(1.0, 2.0), name_offset=0,
                            background="gradient")
        # -> list[Scene], deterministic given the arguments. Items are drawn
        #    without replacement across the whole list (so the train and val
        #    scenes of one call never share an item) until the 10k test items
        #    are used up, then a fresh permutation starts. Scene names are
        #    f"{name_offset + i:06d}": compose train and val in one call (or give
        #    the second call an offset) so that file names never collide.
    write_voc(root, {"train": scenes[:n], "val": scenes[n:]})   # -> root
    write_coco(root, {"train": ..., "val": ...})               # -> root
    write_mmseg(root, {"train": ..., "val": ...})              # -> root
    paths = ensure_demo_scenes(root, n_train, n_val, seed, canvas=128, objects=(2, 4),
                               scale=(1.0, 2.0), background="gradient")  # -> dict of Paths
        # {"root", "voc", "coco", "mmseg"}; written once, reused afterwards. Non-default
        # objects / scale / background extend the folder name (the detection demo uses them).

Scene contents (``Scene``): ``image`` H x W x 3 uint8 RGB; ``boxes`` N x 4
float32 XYXY in absolute pixel-edge coordinates (x1, y1 exclusive, so a box
covering pixel columns 3..10 is x0=3, x1=11), the tight extent of the item's
mask; ``labels`` N int64 in 0..9 (``CLASSES`` order, Fashion-MNIST's);
``masks`` N x H x W bool, the item's non-zero pixels (after scaling); ``items``
N indices into the Fashion-MNIST test split. Items never overlap (boxes are at
least ``GAP`` pixels apart), so every mask is fully visible and the box is
exactly the mask's extent.

Layouts written:

- VOC (``write_voc``; root is the devkit year folder, e.g. ``.../VOC2007``):
  ``JPEGImages/<name>.jpg``, ``Annotations/<name>.xml`` (1-based inclusive
  pixel indices as in VOC: xmin = x0 + 1, xmax = x1), ``ImageSets/Main/<split>.txt``
  and ``classes.txt`` (one class name per line; not part of real VOC, where the
  20 VOC classes are implied; our VOC reader uses it when present).
- COCO (``write_coco``): ``<split>/<name>.jpg`` and
  ``annotations/instances_<split>.json`` with category ids 1..10, ``bbox`` as
  [x, y, w, h], ``area`` = mask pixel count, ``iscrowd`` 0 and ``segmentation``
  as polygons: each mask is cut into axis-aligned pixel rectangles, whose union
  rasterises back to the mask exactly with pycocotools (polygons, not RLE,
  because Detectron2's default ``INPUT.MASK_FORMAT: polygon`` refuses RLE).
- MMSegmentation (``write_mmseg``): ``img_dir/<split>/<name>.png`` (PNG, no JPEG
  artefacts) and ``ann_dir/<split>/<name>.png`` single-channel label maps:
  0 background, 1..10 the classes. No 255 "ignore" border is used: masks are
  exact, so there is no ambiguous boundary to ignore.
"""
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image

from mocobench.data import FASHION_MNIST_CLASSES, fashion_mnist
from mocobench.errors import UserError
from mocobench.fileio import cache_root

CLASSES = list(FASHION_MNIST_CLASSES)
GAP = 2  # pixels between items, so masks never touch and boxes never overlap
JPEG_QUALITY = 95
VERSION = 1  # bump when the composition changes; cached scene folders are keyed by it


@dataclass
class Scene:
    name: str
    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    items: np.ndarray

    def label_map(self) -> np.ndarray:
        """H x W uint8 semantic labels: 0 background, 1..10 the classes."""
        out = np.zeros(self.image.shape[:2], np.uint8)
        for mask, label in zip(self.masks, self.labels):
            out[mask] = label + 1
        return out


BACKGROUNDS = ("gradient", "flat")


def _background(rng, size: int, style: str = "gradient") -> np.ndarray:
    """"gradient": a dim colour gradient with mild noise, so the background is not flat black;
    "flat": one dark grey with the same mild noise (closer to Fashion-MNIST's black)."""
    if style == "flat":
        return rng.uniform(0, 30) + rng.normal(0, 4, (size, size, 3))
    c0, c1 = rng.uniform(0, 70, 3), rng.uniform(0, 70, 3)
    t = np.linspace(0, 1, size)[:, None]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * t + np.sin(angle) * t.T + 1) / 2  # size x size in [0, 1]
    bg = c0 + (c1 - c0) * ramp[..., None]
    return bg + rng.normal(0, 4, (size, size, 3))


def _scale_item(item: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize a 28x28 item: bilinear intensity, nearest-neighbour mask of its non-zero pixels."""
    intensity = np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR), np.float64)
    mask = np.asarray(Image.fromarray((item > 0).astype(np.uint8) * 255).resize((side, side), Image.NEAREST)) > 0
    return intensity * mask / 255.0, mask


def compose_scenes(n: int, seed: int = 0, canvas: int = 128, objects=(2, 4),
                   scale=(1.0, 2.0), name_offset: int = 0, background: str = "gradient") -> list[Scene]:
    """Compose `n` scenes of `canvas` x `canvas` pixels with `objects` = (min, max) items each,
    items scaled by a factor drawn from `scale` (1.0 = 28 px), on a `background` of one of
    BACKGROUNDS. Deterministic given the arguments.

    A scene holds fewer than `objects[0]` items only if no free place was found for them
    (raise `canvas` or lower `scale` if that matters)."""
    lo, hi = int(objects[0]), int(objects[1])
    if not 1 <= lo <= hi:
        raise UserError(f"objects={objects!r} must be (min, max) with 1 <= min <= max")
    if background not in BACKGROUNDS:
        raise UserError(f"background {background!r} is not one of {', '.join(BACKGROUNDS)}")
    if int(round(28 * scale[1])) + 2 * GAP > canvas:
        raise UserError(f"items scaled up to {scale[1]}x (28 px each) do not fit a {canvas}-pixel canvas; "
                        "lower the scale or enlarge the canvas")
    images, labels = fashion_mnist("test")
    rng = np.random.default_rng(seed)
    pool: list[int] = []
    scenes = []
    for i in range(n):
        image = _background(rng, canvas, background)
        boxes, classes, masks, items = [], [], [], []
        for _ in range(int(rng.integers(lo, hi + 1))):
            if not pool:
                pool = list(rng.permutation(len(images)))
            item = int(pool.pop())
            side = int(round(28 * rng.uniform(*scale)))
            alpha, mask = _scale_item(images[item], side)
            ys, xs = np.nonzero(mask)
            extent = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
            placed = None
            for _try in range(50):
                x, y = (int(v) for v in rng.integers(0, canvas - side + 1, 2))
                box = extent + np.array([x, y, x, y], np.float32)
                if all(box[0] >= b[2] + GAP or b[0] >= box[2] + GAP or box[1] >= b[3] + GAP
                       or b[1] >= box[3] + GAP for b in boxes):
                    placed = (x, y, box)
                    break
            if placed is None:
                pool.append(item)  # unused: give it back
                continue
            x, y, box = placed
            colour = rng.uniform(120, 255, 3)
            region = image[y:y + side, x:x + side]
            region[:] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
            full = np.zeros((canvas, canvas), bool)
            full[y:y + side, x:x + side] = mask
            boxes.append(box)
            classes.append(int(labels[item]))
            masks.append(full)
            items.append(item)
        scenes.append(Scene(
            name=f"{name_offset + i:06d}",
            image=np.clip(np.rint(image), 0, 255).astype(np.uint8),
            boxes=np.array(boxes, np.float32).reshape(-1, 4),
            labels=np.array(classes, np.int64),
            masks=np.array(masks, bool).reshape(-1, canvas, canvas),
            items=np.array(items, np.int64),
        ))
    return scenes


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Cover a binary mask with axis-aligned rectangles (runs of equal rows merged) and return
    them as COCO polygons [x0, y0, x1, y0, x1, y1, x0, y1]; their union is the mask exactly."""
    polygons = []
    open_runs: dict[tuple[int, int], int] = {}  # (x0, x1) -> first row
    height = mask.shape[0]
    for y in range(height + 1):
        row = mask[y] if y < height else np.zeros(mask.shape[1], bool)
        padded = np.concatenate([[False], row, [False]]).astype(np.int8)
        edges = np.flatnonzero(np.diff(padded))
        runs = set(zip(edges[0::2].tolist(), edges[1::2].tolist()))
        for run in list(open_runs):
            if run not in runs:
                y0, (x0, x1) = open_runs.pop(run), run
                polygons.append([float(v) for v in (x0, y0, x1, y0, x1, y, x0, y)])
        for run in runs:
            open_runs.setdefault(run, y)
    return polygons


def _splits_arg(splits) -> dict[str, list[Scene]]:
    if not isinstance(splits, dict) or not splits:
        raise UserError("pass the scenes as a mapping of split name to scenes, e.g. {'train': [...]}")
    return splits


def write_voc(root, splits: dict[str, list[Scene]]) -> Path:
    """Write a VOC2007-style devkit folder at `root` (see the module docstring)."""
    root = Path(root)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for split, scenes in _splits_arg(splits).items():
        for s in scenes:
            jpg = root / "JPEGImages" / f"{s.name}.jpg"
            if not jpg.exists():
                Image.fromarray(s.image).save(jpg, quality=JPEG_QUALITY, subsampling=0)
            h, w = s.image.shape[:2]
            objects = "".join(
                f"<object><name>{escape(CLASSES[c])}</name><pose>Unspecified</pose>"
                f"<truncated>0</truncated><difficult>0</difficult><bndbox>"
                f"<xmin>{int(b[0]) + 1}</xmin><ymin>{int(b[1]) + 1}</ymin>"
                f"<xmax>{int(b[2])}</xmax><ymax>{int(b[3])}</ymax></bndbox></object>"
                for b, c in zip(s.boxes, s.labels))
            xml = (f"<annotation><folder>{escape(root.name)}</folder><filename>{s.name}.jpg</filename>"
                   f"<source><database>Fashion-MNIST scenes (moco-bench)</database></source>"
                   f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
                   f"<segmented>0</segmented>{objects}</annotation>\n")
            (root / "Annotations" / f"{s.name}.xml").write_text(xml)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{s.name}\n" for s in scenes))
    return root


def coco_dict(scenes: list[Scene], file_prefix: str = "") -> dict:
    """The COCO instances JSON (as a dict) for `scenes`; category ids are 1..10."""
    images, annotations = [], []
    for image_id, s in enumerate(scenes, start=1):
        h, w = s.image.shape[:2]
        images.append({"id": image_id, "file_name": f"{file_prefix}{s.name}.jpg", "height": h, "width": w})
        for b, c, m in zip(s.boxes, s.labels, s.masks):
            x0, y0, x1, y1 = (float(v) for v in b)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(c) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(m.sum()), "iscrowd": 0,
                "segmentation": mask_to_polygons(m),
            })
    categories = [{"id": i + 1, "name": name, "supercategory": "fashion"} for i, name in enumerate(CLASSES)]
    return {"info": {"description": "Fashion-MNIST scenes (moco-bench)", "version": str(VERSION)},
            "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def write_coco(root, splits: dict[str, list[Scene]]) -> Path:
    """Write ``<root>/<split>/*.jpg`` and ``<root>/annotations/instances_<split>.json``."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, scenes in _splits_arg(splits).items():
        (root / split).mkdir(exist_ok=True)
        for s in scenes:
            Image.fromarray(s.image).save(root / split / f"{s.name}.jpg", quality=JPEG_QUALITY, subsampling=0)
        with open(root / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(coco_dict(scenes), f)
    return root


def write_mmseg(root, splits: dict[str, list[Scene]]) -> Path:
    """Write ``<root>/img_dir/<split>/*.png`` and ``<root>/ann_dir/<split>/*.png`` (0 bg, 1..10)."""
    root = Path(root)
    for split, scenes in _splits_arg(splits).items():
        (root / "img_dir" / split).mkdir(parents=True, exist_ok=True)
        (root / "ann_dir" / split).mkdir(parents=True, exist_ok=True)
        for s in scenes:
            Image.fromarray(s.image).save(root / "img_dir" / split / f"{s.name}.png")
            Image.fromarray(s.label_map()).save(root / "ann_dir" / split / f"{s.name}.png")
    (root / "classes.txt").write_text("\n".join(["background"] + CLASSES) + "\n")
    return root


def default_root() -> Path:
    """Where demo scenes are cached (mocobench.fileio.cache_root()/scenes)."""
    return cache_root() / "scenes"


def _layout(folder: Path) -> dict[str, Path]:
    return {"root": folder, "voc": folder / "voc" / "VOC2007", "coco": folder / "coco",
            "mmseg": folder / "mmseg"}


def _folder_name(n_train, n_val, seed, canvas, objects, scale, background) -> str:
    name = f"fmnist-scenes_v{VERSION}_c{canvas}_n{n_train}-{n_val}_s{seed}"
    # Non-default composition settings extend the name (the default keeps its old name).
    if tuple(objects) != (2, 4):
        name += f"_o{objects[0]}-{objects[1]}"
    if tuple(scale) != (1.0, 2.0):
        name += f"_x{scale[0]:g}-{scale[1]:g}"
    if background != "gradient":
        name += f"_bg{background}"
    return name


def ensure_demo_scenes(root=None, n_train: int = 256, n_val: int = 64, seed: int = 0,
                       canvas: int = 128, objects=(2, 4), scale=(1.0, 2.0),
                       background: str = "gradient") -> dict[str, Path]:
    """Compose n_train + n_val scenes once and write them in all three layouts.

    `objects`, `scale` and `background` are compose_scenes' arguments. The scenes live in a
    sub-folder of `root` (default ``default_root()``) named by the arguments, so different
    sizes never collide and a second call returns at once.
    Splits: ``train`` and ``val`` in every layout; the VOC folder also has ``test``
    (= ``val``, VOC2007's name for its held-out split) and ``trainval``. The folder is
    written under a temporary name and renamed when complete, so a crash or a concurrent
    writer never leaves a half-written folder behind.
    Returns {"root", "voc", "coco", "mmseg"}: the scene folder, the VOC2007 devkit folder,
    the COCO root and the MMSegmentation root.
    """
    if n_train < 1 or n_val < 1:
        raise UserError(f"demo scenes need at least one train and one val image, got {n_train}/{n_val}")
    root = Path(root) if root else default_root()
    objects, scale = tuple(int(v) for v in objects), tuple(float(v) for v in scale)
    folder = root / _folder_name(n_train, n_val, seed, canvas, objects, scale, background)
    paths = _layout(folder)
    if (folder / "DONE").exists():
        return paths
    if folder.exists():
        raise UserError(f"{folder} exists but is incomplete (no DONE file); delete it and run again")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
    try:
        scenes = compose_scenes(n_train + n_val, seed=seed, canvas=canvas, objects=objects, scale=scale,
                                background=background)
        train, val = scenes[:n_train], scenes[n_train:]
        staged = _layout(tmp)
        write_voc(staged["voc"], {"train": train, "val": val, "test": val, "trainval": scenes})
        write_coco(staged["coco"], {"train": train, "val": val})
        write_mmseg(staged["mmseg"], {"train": train, "val": val})
        (tmp / "scenes.json").write_text(json.dumps({
            "version": VERSION, "canvas": canvas, "n_train": n_train, "n_val": n_val, "seed": seed,
            "objects": list(objects), "scale": list(scale), "background": background,
            "source": "Fashion-MNIST test split", "classes": CLASSES}, indent=2) + "\n")
        (tmp / "DONE").write_text("")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "DONE").exists():  # not a concurrent writer that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return paths
