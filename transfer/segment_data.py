"""The data of a `transfer segment` run: which folder it reads, every image and label map
checked before training starts, and the identity (name, split sizes, classes, fingerprint)
written into results.json.

Which data is read, in order (the first that applies):
1. ``--data-root ROOT``: every dataset of the config reads ROOT;
2. the config's own ``data_root`` (top level, or every dataset's): that folder. A top-level
   value reaches the datasets that set none; one that contradicts a dataset's own value is
   refused (a child config's ``data_root`` does not reach the dataloaders its ``_base_`` built);
3. the config's ``embedded_data`` block (the demo): Fashion-MNIST scenes (transfer.scenes).

What is refused before any training (one line each): listed images or label maps that do not
exist, images that are not 8 bits per channel (mmseg's decoders silently turn 16-bit images
into something else: OpenCV keeps the top 8 bits, Pillow clips to white), colour label maps,
label values the heads cannot predict (>= the number of classes, other than the ignore label,
after ``reduce_zero_label`` / ``label_map`` exactly as mmseg's LoadAnnotations applies them),
image / label size mismatches, classes whose palette has another length, datasets whose
class lists differ.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mocobench.errors import UserError

LOADERS = (("train_dataloader", "train"), ("val_dataloader", "val"), ("test_dataloader", "test"))
EMBEDDED_NAME = "fmnist-scenes"
EIGHT_BIT_MODES = {"1", "L", "P", "LA", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}
ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass
class Split:
    """One dataset of the config as mmseg will read it."""
    where: str  # e.g. "train_dataloader.dataset.datasets[1]"
    role: str  # train | val | test
    data_root: str | None
    classes: tuple
    images: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    reduce_zero_label: bool = False
    label_map: dict | None = None
    image_flag: str = "color"  # LoadImageFromFile's color_type
    label_backend: str = "pillow"  # LoadAnnotations' imdecode_backend

    def members(self) -> list[str]:
        """The images, relative to the data root (so a moved copy has the same fingerprint)."""
        root = self.data_root
        return [os.path.relpath(p, root) if root else str(p) for p in self.images]


# ----------------------------------------------------------------------------- which folder

def dataset_leaves(cfg) -> list[tuple[str, str, dict]]:
    """(config path, role, dataset dict) of every dataset the dataloaders read
    (children of ConcatDataset / RepeatDataset too)."""
    found = []
    for loader_name, role in LOADERS:
        loader = cfg.get(loader_name)
        if not loader:
            continue
        stack = [(f"{loader_name}.dataset", loader["dataset"])]
        while stack:
            where, d = stack.pop(0)
            if "datasets" in d:
                stack.extend((f"{where}.datasets[{i}]", c) for i, c in enumerate(d["datasets"]))
            elif "dataset" in d:  # RepeatDataset / ClassBalancedDataset
                stack.append((f"{where}.dataset", d["dataset"]))
            else:
                found.append((where, role, d))
    if not any(role == "train" for _, role, _ in found) or not any(role == "test" for _, role, _ in found):
        raise UserError("the config needs a train_dataloader and a test_dataloader (the one evaluation "
                        "is the test after training); start from a file in configs/segmentation/")
    return found


def _set_root(cfg, root: str) -> None:
    for _, _, d in dataset_leaves(cfg):
        d["data_root"] = str(root)
    cfg.data_root = str(root)


def resolve_data_root(cfg, data_root: str | None = None) -> dict:
    """Point every dataset at the data this run reads (module docstring); return where it came
    from: {"from": "--data-root" | "config" | "embedded", "root": str, ...}."""
    leaves = dataset_leaves(cfg)
    if data_root is not None:
        _set_root(cfg, data_root)
        return {"from": "--data-root", "root": str(data_root)}
    top = cfg.get("data_root")
    if top is not None:
        for where, _, d in leaves:
            own = d.get("data_root")
            if own is None:
                d["data_root"] = top
            elif str(own) != str(top):
                raise UserError(f"the config's data_root is {str(top)!r} but {where}.data_root is {str(own)!r} "
                                "(a data_root set in a child config does not reach the datasets its _base_ "
                                f"built); set {where}.data_root too, or pass --data-root")
        return {"from": "config", "root": str(top)}
    roots = sorted({str(d["data_root"]) for _, _, d in leaves if d.get("data_root") is not None})
    if roots:
        unset = [where for where, _, d in leaves if d.get("data_root") is None]
        if unset:
            raise UserError(f"{unset[0]} has no data_root while other datasets have one; set it, or pass "
                            "--data-root")
        return {"from": "config", "root": roots[0], **({"roots": roots} if len(roots) > 1 else {})}
    if cfg.get("embedded_data"):
        return _prepare_embedded(cfg)
    raise UserError("the config names no data (no data_root, no embedded_data); pass --data-root with the "
                    "dataset folder (layout: docs/segmentation.md)")


def _prepare_embedded(cfg) -> dict:
    """The demo's scenes from held-out Fashion-MNIST items (transfer.scenes), written once in
    mmseg's img_dir/ann_dir layout and cached (``root`` None = transfer.scenes.default_root()).
    Safe on every rank: the scene writer renames a finished folder into place."""
    from transfer import scenes

    spec = dict(cfg.embedded_data)
    paths = scenes.ensure_demo_scenes(spec.pop("root", None), **spec)
    _set_root(cfg, paths["mmseg"])
    return {"from": "embedded", "root": str(paths["mmseg"]),
            "source": "Fashion-MNIST test split (transfer.scenes)", **spec}


def dataset_name(cfg, source: dict) -> str:
    """The name results.json gives the data actually read: the demo scenes' own name, else the
    config's ``benchmark.dataset``, else the data folder's name."""
    if source["from"] == "embedded":
        return EMBEDDED_NAME
    declared = (cfg.get("benchmark") or {}).get("dataset")
    return str(declared) if declared else Path(source["root"]).resolve().name


CLASS_LIST = "classes.txt"


def apply_class_list(cfg, source: dict) -> tuple | None:
    """A ``classes.txt`` in the data root (one class name per line; line i names label value i)
    is the class list of every dataset. A config's own metainfo.classes that says otherwise is
    refused; without the file, the config's (or the dataset type's) classes are used."""
    path = Path(source["root"]) / CLASS_LIST
    if not path.is_file():
        return None
    try:
        classes = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the class list {path} ({e}); write one class name per line") from None
    for where, _, d in dataset_leaves(cfg):
        meta = dict(d.get("metainfo") or {})
        given = meta.get("classes")
        if given is not None and tuple(given) != classes:
            raise UserError(f"{where}.metainfo.classes ({len(given)}: {', '.join(map(str, given[:3]))}, ...) "
                            f"contradicts {path} ({len(classes)}: {', '.join(classes[:3])}, ...); remove "
                            "metainfo.classes from the config (the data's list is used) or fix the file")
        meta["classes"] = classes
        d["metainfo"] = meta
    return classes


# ----------------------------------------------------------------------------- the file lists

def _loader_settings(pipeline) -> tuple[str, str]:
    """(LoadImageFromFile color_type, LoadAnnotations imdecode_backend) of a pipeline."""
    flag, backend = "color", "pillow"
    for t in pipeline or []:
        kind = str(t.get("type", "")).split(".")[-1] if isinstance(t, dict) else ""
        if kind == "LoadImageFromFile":
            flag = t.get("color_type", flag)
        elif kind == "LoadAnnotations":
            backend = t.get("imdecode_backend", backend)
    return flag, backend


def _check_listed_folders(where: str, d: dict) -> None:
    """One line naming the missing folder or list file, instead of mmseg's traceback."""
    root = Path(d.get("data_root") or ".")
    prefix = d.get("data_prefix") or {}
    needed = [("images", prefix.get("img_path"))]
    if prefix.get("seg_map_path") is None:
        raise UserError(f"{where} has no data_prefix.seg_map_path: without label maps it can be neither "
                        "trained nor scored; set it to the label folder")
    needed.append(("label maps", prefix["seg_map_path"]))
    if d.get("ann_file"):
        needed.append(("split list", d["ann_file"]))
    for what, rel in needed:
        path = root / (rel or "")
        if not path.exists():
            raise UserError(f"{path} does not exist: {where} reads its {what} there (data_root {str(root)!r}); "
                            "pass --data-root with the dataset folder (layout: docs/segmentation.md)")


def read_split(where: str, role: str, d: dict) -> Split:
    """Build the dataset the way the Runner will (mmseg's registry, lazily) and list its files."""
    from mmseg.registry import DATASETS

    _check_listed_folders(where, d)
    meta = d.get("metainfo") or {}
    if meta.get("palette") is not None and len(meta["palette"]) < len(meta.get("classes") or ()):
        raise UserError(f"{where}: metainfo has {len(meta['classes'])} classes but {len(meta['palette'])} "
                        "palette colours; give one colour per class (or none)")
    try:
        # No pipeline: only the file lists are needed (and mmseg's transforms need its default scope).
        ds = DATASETS.build({**d, "lazy_init": True, "pipeline": []})
        ds.full_init()
    except Exception as e:  # mmseg raises ValueError/AssertionError/KeyError on bad metainfo or lists
        text = " ".join(str(e).split())[:300]
        raise UserError(f"{where} ({d.get('type')}) cannot be read: {type(e).__name__}: {text}") from None
    classes = tuple(ds.metainfo.get("classes") or ())
    infos = [ds.get_data_info(i) for i in range(len(ds))]
    if not infos:
        raise UserError(f"{where} lists no images (looked in {ds.data_prefix.get('img_path')!r} for "
                        f"*{ds.img_suffix}{' via ' + ds.ann_file if ds.ann_file else ''}); check data_root, "
                        "data_prefix and img_suffix")
    flag, backend = _loader_settings(d.get("pipeline"))
    return Split(where, role, d.get("data_root"), classes, [i["img_path"] for i in infos],
                 [i["seg_map_path"] for i in infos], bool(ds.reduce_zero_label), ds.label_map, flag, backend)


def read_splits(cfg) -> list[Split]:
    splits = [read_split(where, role, d) for where, role, d in dataset_leaves(cfg)]
    first = splits[0]
    for s in splits[1:]:
        if s.classes != first.classes:
            raise UserError(f"{s.where} has classes {list(s.classes)[:4]}... but {first.where} has "
                            f"{list(first.classes)[:4]}...; train and test must use one class list")
    return splits


# ----------------------------------------------------------------------------- every file

def _image_size(path: str, flag: str) -> tuple[int, int]:
    """(height, width) the image loader will produce; UserError for what it would misread."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode, (w, h) = im.mode, im.size
            raw = im.tile[0][3] if im.tile and len(im.tile[0]) > 3 else None
            raw = raw[0] if isinstance(raw, tuple) and raw else raw
            bits = im.tag_v2.get(258) if hasattr(im, "tag_v2") else None  # TIFF BitsPerSample
            orientation = im.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path} cannot be read as an image ({e}); replace or remove it") from None
    deep = (mode not in EIGHT_BIT_MODES or (isinstance(raw, str) and any(t in raw for t in (";12", ";16", ";32")))
            or (bits is not None and max(bits if isinstance(bits, tuple) else (bits,)) > 8))
    if deep:
        raise UserError(f"{path} is not an 8-bit image (PIL mode {mode}{', ' + raw if raw else ''}): MMSegmentation "
                        "would read it wrongly (OpenCV keeps the top 8 bits, Pillow clips to white); convert "
                        "the images to 8-bit PNG or JPEG with the intensity scaling you intend")
    if flag in ("color", "grayscale") and orientation in ROTATED:
        w, h = h, w  # the loaders apply the EXIF rotation
    return h, w


def _label_values(path: str, split: Split, n_classes: int, ignore_index: int) -> tuple[int, int]:
    """(height, width) of a label map; UserError unless every value is a class id or the ignore
    label after mmseg's own reading (LoadAnnotations: decode 'unchanged', reduce_zero_label, label_map)."""
    import mmcv

    try:
        raw = mmcv.imfrombytes(Path(path).read_bytes(), flag="unchanged", backend=split.label_backend)
    except Exception as e:  # decoders raise many types on a broken file
        raise UserError(f"label map {path} cannot be read ({type(e).__name__}: {e}); replace it") from None
    if raw is None:
        raise UserError(f"label map {path} cannot be decoded; replace it")
    raw = raw.squeeze()
    if raw.ndim != 2:
        raise UserError(f"label map {path} has {raw.shape[-1]} channels; label maps hold one class id per "
                        "pixel (single-channel or palette PNG), not colours: convert colour-coded labels "
                        "to class ids first")
    values = np.unique(raw).astype(np.int64)
    if values.max() > 255:
        raise UserError(f"label map {path} holds values up to {values.max()}, but MMSegmentation reads label "
                        "maps as 8-bit (larger values wrap around); store class ids 0..254 and 255 for ignore")
    mapped = values.copy()
    if split.reduce_zero_label:  # 0 -> ignore, v -> v - 1, 255 stays 255
        mapped = np.where(values == 0, 255, np.where(values == 255, 255, values - 1))
    if split.label_map:
        mapped = np.array([split.label_map.get(int(v), int(v)) for v in mapped])
    bad = sorted({int(r) for r, m in zip(values, mapped) if m >= n_classes and m != ignore_index})
    if bad:
        raise UserError(f"label map {path} holds value(s) {bad[:5]} that are not class ids 0..{n_classes - 1} "
                        f"nor the ignore label {ignore_index}"
                        f"{' (after reduce_zero_label)' if split.reduce_zero_label else ''}; fix the labels, "
                        f"or the class list ({n_classes} classes)")
    return raw.shape


def _check_pair(args) -> None:
    image, label, split, n_classes, ignore_index = args
    size = _image_size(image, split.image_flag)
    label_size = _label_values(label, split, n_classes, ignore_index)
    if tuple(label_size) != tuple(size):
        raise UserError(f"label map {label} is {label_size[1]}x{label_size[0]} but its image {image} is "
                        f"{size[1]}x{size[0]} (width x height as the loader reads it); each label map must "
                        "cover its image pixel for pixel")


def check_files(splits: list[Split], ignore_index: int = 255, workers: int | None = None) -> int:
    """Check every listed image and label map (module docstring) before training; return how
    many pairs were checked. Reads headers of images and decodes label maps, in threads."""
    seen, jobs = set(), []
    for s in splits:
        for kind, paths in (("images", s.images), ("label maps", s.labels)):
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise UserError(f"{len(missing)} of the {len(paths)} {kind} {s.where} lists do not exist "
                                f"(e.g. {missing[0]}); add them, or remove them from the split")
        for image, label in zip(s.images, s.labels):
            if (image, label) not in seen:
                seen.add((image, label))
                jobs.append((image, label, s, len(s.classes), ignore_index))
    pool = ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1))
    try:
        for _ in pool.map(_check_pair, jobs):  # re-raises the first UserError, in list order
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a refusal, do not check the rest
    return len(jobs)


# ----------------------------------------------------------------------------- identity

def dataset_identity(name: str, splits: list[Split]) -> dict:
    """{"name", "splits": {role: size}, "classes": n, "class_names", "fingerprint"} of the data read."""
    from transfer.results import dataset_fingerprint

    members: dict[str, list] = {}
    for s in splits:
        members.setdefault(s.role, []).extend(s.members())
    classes = list(splits[0].classes)
    return {"name": name, "splits": {role: len(m) for role, m in members.items()}, "classes": len(classes),
            "class_names": classes, "fingerprint": dataset_fingerprint(classes, members)}
