"""Named data sets: one registry entry each, read from disk by torchvision.datasets.

    build_dataset("cifar10", "test", root="/datasets")          # mocobench.data
    evaluation_splits("dtd", root="/datasets")                  # train / val / test

Each entry (``Spec``) says which folder under the data root torchvision's class reads,
which splits the data set publishes, the metric the transfer literature reports on it and
where that protocol comes from. The data root is ``--data-root``, else ``$MOCO_BENCH_DATA``,
else ``<cache root>/datasets``; files are read with ``download=False`` unless the user
passes ``--download`` (then torchvision fetches what it can, into the same root).

Splits are always ``train``, ``val`` and ``test``. A data set without a published
validation split gets one carved from its training split (``val_fraction`` of each class,
seeded; the rest stays ``train``), as ssl-transfer's linear.py does with 20% (seed 0).
A folder in the ImageNet layout without ``test/`` is scored on ``val/`` (ImageNet's
convention) and its validation split is carved from ``train/``.
"""
import functools
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from mocobench.data import (FASHION_MNIST_CLASSES, ImageDataset, Sample, carve, fashion_mnist_samples,
                            single_labels)
from mocobench.errors import UserError
from mocobench.fileio import cache_root

SPLITS = ("train", "val", "test")

# What each metric name means; results' protocol records quote these definitions.
METRICS = {
    "top1": "top-1 accuracy (%) over test images",
    "mean_per_class": "mean over classes of each class's top-1 accuracy (%)",
    "mAP": "mean over classes of the VOC07 11-point average precision (%) of per-class "
           "scores; 'difficult'-only images ignored for that class",
}


@dataclass(frozen=True)
class Spec:
    folder: str | None  # under the data root: what torchvision's class reads (None: not read there)
    read: Callable  # (root: Path, split: one of `splits`, download: bool) -> (samples, classes)
    splits: tuple  # the data set's own splits among train / val / test; no "val": carved from train
    metric: str  # a METRICS key
    source: str  # where the splits and metric come from
    val_fraction: float = 0.2  # of each class of train, when the data set has no validation split


def data_root(root=None) -> Path:
    return Path(root or os.environ.get("MOCO_BENCH_DATA") or cache_root() / "datasets").expanduser()


def _relative(path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _files(cls_name: str, files: str = "_image_files", labels: str = "_labels",
           names: dict | None = None, **fixed) -> Callable:
    """A reader for torchvision classes that keep file paths and labels in two lists."""
    def read(root: Path, split: str, download: bool):
        import torchvision.datasets as tvd

        ds = getattr(tvd, cls_name)(str(root), split=(names or {}).get(split, split),
                                    download=download, **fixed)
        samples = [Sample(int(y), path=str(p), id=_relative(p, root))
                   for p, y in zip(getattr(ds, files), getattr(ds, labels))]
        return samples, [str(c) for c in ds.classes]
    return read


def _arrays(cls_name: str, hwc: bool = True) -> Callable:
    """A reader for torchvision classes that hold uint8 image arrays in memory."""
    def read(root: Path, split: str, download: bool):
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        if cls_name.startswith("CIFAR"):
            ds = cls(str(root), train=split == "train", download=download)
            data, labels = ds.data, ds.targets
        else:  # STL10: N x 3 x 96 x 96
            ds = cls(str(root), split=split, download=download)
            data, labels = np.transpose(ds.data, (0, 2, 3, 1)), ds.labels
        samples = [Sample(int(y), array=np.ascontiguousarray(x), id=f"{split}/{i}")
                   for i, (x, y) in enumerate(zip(data, labels))]
        return samples, [str(c) for c in ds.classes]
    return read


def _read_cars(root: Path, split: str, download: bool):
    import torchvision.datasets as tvd

    ds = tvd.StanfordCars(str(root), split=split, download=download)
    return ([Sample(int(y), path=p, id=_relative(p, root)) for p, y in ds._samples],
            [str(c) for c in ds.classes])


def _read_sun397(root: Path, split: str, download: bool):
    """SUN397's first official partition (Partitions/Training_01.txt / Testing_01.txt, 50 + 50
    images per class); torchvision reads the images and classes but not the partitions."""
    import torchvision.datasets as tvd

    ds = tvd.SUN397(str(root), download=download)
    base = Path(ds._data_dir)
    lists = base / "Partitions" / f"{'Training' if split == 'train' else 'Testing'}_01.txt"
    if not lists.is_file():
        raise FileNotFoundError(f"no partition file {lists} (from SUN397's Partitions.zip)")
    names = [line.strip() for line in lists.read_text().splitlines() if line.strip()]
    label = {str(p.relative_to(base)): y for p, y in zip(ds._image_files, ds._labels)}
    missing = [n for n in names if n.lstrip("/") not in label]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {lists.name} are not in {base}, e.g. {missing[0]}")
    samples = [Sample(label[n.lstrip("/")], path=str(base / n.lstrip("/")), id=n.lstrip("/"))
               for n in names]
    return samples, [str(c) for c in ds.classes]


CALTECH_TRAIN_PER_CLASS = 30  # Kornblith et al. 2019 / ssl-transfer: 30 per class train, rest test


def _read_caltech101(root: Path, split: str, download: bool):
    """Caltech-101 publishes no split: 30 random images per class train, the rest test
    (seed 0, Kornblith et al. 2019). torchvision drops BACKGROUND_Google: 101 classes."""
    import torchvision.datasets as tvd

    ds = tvd.Caltech101(str(root), download=download)
    folder = Path(ds.root) / "101_ObjectCategories"
    samples = [Sample(int(y), path=str(folder / ds.categories[y] / f"image_{i:04d}.jpg"),
                      id=f"{ds.categories[y]}/image_{i:04d}.jpg") for i, y in zip(ds.index, ds.y)]
    rng = np.random.default_rng(0)
    labels = np.asarray(ds.y)
    train = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:CALTECH_TRAIN_PER_CLASS]
                                    for c in np.unique(labels)]))
    keep = train if split == "train" else np.setdiff1d(np.arange(len(samples)), train)
    return [samples[i] for i in keep], list(ds.categories)


VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")


def _read_voc2007(root: Path, split: str, download: bool):
    """Multi-label VOC07 classification from the detection annotations, as VOC's own
    <class>_<split>.txt files: 1 = a non-difficult object of the class, -1 = only
    difficult ones (ignored for that class), 0 = none."""
    import torchvision.datasets as tvd

    ds = tvd.VOCDetection(str(root), year="2007", image_set=split, download=download)
    samples = []
    for image, annotation in zip(ds.images, ds.annotations):
        objects = ds.parse_voc_xml(ET.parse(annotation).getroot())["annotation"].get("object", [])
        label = [0] * len(VOC_CLASSES)
        for obj in objects:
            c = VOC_CLASSES.index(obj["name"].strip())
            difficult = str(obj.get("difficult") or "0").strip() == "1"  # <difficult/> empty: 0
            label[c] = 1 if not difficult else (label[c] or -1)
        samples.append(Sample(tuple(label), path=image, id=Path(image).stem))
    return samples, list(VOC_CLASSES)


def _read_fashion_mnist(root: Path, split: str, download: bool):
    return fashion_mnist_samples(split), list(FASHION_MNIST_CLASSES)


REGISTRY: dict[str, Spec] = {
    "fashion-mnist": Spec(None, _read_fashion_mnist, ("train", "test"), "top1",
                          "Xiao et al. 2017 (the Debian package dataset-fashion-mnist)"),
    "cifar10": Spec("cifar-10-batches-py", _arrays("CIFAR10"), ("train", "test"), "top1",
                    "Krizhevsky 2009; ssl-transfer linear.py"),
    "cifar100": Spec("cifar-100-python", _arrays("CIFAR100"), ("train", "test"), "top1",
                     "Krizhevsky 2009; ssl-transfer linear.py"),
    "stl10": Spec("stl10_binary", _arrays("STL10"), ("train", "test"), "top1", "Coates et al. 2011"),
    "dtd": Spec("dtd/dtd", _files("DTD", partition=1), ("train", "val", "test"), "top1",
                "Cimpoi et al. 2014, partition 1; ssl-transfer linear.py"),
    "flowers102": Spec("flowers-102", _files("Flowers102"), ("train", "val", "test"), "mean_per_class",
                       "Nilsback & Zisserman 2008; ssl-transfer linear.py"),
    "pets": Spec("oxford-iiit-pet", _files("OxfordIIITPet", files="_images", names={"train": "trainval"}),
                 ("train", "test"), "mean_per_class",
                 "Parkhi et al. 2012 (trainval / test); ssl-transfer linear.py"),
    "aircraft": Spec("fgvc-aircraft-2013b", _files("FGVCAircraft", annotation_level="variant"),
                     ("train", "val", "test"), "mean_per_class",
                     "Maji et al. 2013, 100 variants; ssl-transfer linear.py"),
    "cars": Spec("stanford_cars", _read_cars, ("train", "test"), "top1",
                 "Krause et al. 2013; ssl-transfer linear.py"),
    "food101": Spec("food-101", _files("Food101"), ("train", "test"), "top1",
                    "Bossard et al. 2014; ssl-transfer linear.py"),
    "sun397": Spec("SUN397", _read_sun397, ("train", "test"), "top1",
                   "Xiao et al. 2010, partition 1; ssl-transfer linear.py"),
    "caltech101": Spec("caltech101", _read_caltech101, ("train", "test"), "mean_per_class",
                       "Fei-Fei et al. 2004, 30 train images per class (Kornblith et al. 2019)"),
    "voc2007": Spec("VOCdevkit/VOC2007", _read_voc2007, ("train", "val", "test"), "mAP",
                    "Everingham et al. 2007 classification; ssl-transfer linear.py (11-point mAP), "
                    "Goyal et al. 2019 (SVM)"),
}


@functools.lru_cache(maxsize=8)
def _read(name: str, root: Path, split: str, download: bool):
    spec = REGISTRY[name]
    try:
        samples, classes = spec.read(root, split, download)
    except (RuntimeError, OSError, ValueError, KeyError, ET.ParseError) as e:
        where = root / spec.folder if spec.folder else root
        raise UserError(
            f"{name} {split} split cannot be read from {where} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'missing'}); put {name} there in torchvision's "
            "layout (docs/classification.md), point --data-root or MOCO_BENCH_DATA at the folder "
            f"holding {spec.folder}/, or add --download on a connected machine") from None
    if not samples:
        raise UserError(f"{name} {split} split in {root} has no images; check the data set's files")
    return tuple(samples), tuple(classes)


def _dataset(name: str, samples, classes, info: dict) -> ImageDataset:
    ds = ImageDataset(name, list(samples), list(classes))
    ds.split_info = info
    return ds


def carve_validation(train: ImageDataset, fraction: float, seed: int, what: str
                     ) -> tuple[ImageDataset, ImageDataset]:
    """(train minus the carved part, the carved part): `fraction` of each class, `seed`."""
    if not 0 < fraction < 1:
        raise UserError(f"data.val_fraction must be in (0, 1), got {fraction}")
    kept, carved = carve(single_labels(train.samples), fraction, seed)
    if len(carved) == 0:
        raise UserError(f"{train.name}: too few training images to carve a validation split from")
    how = {"from": what, "fraction": fraction, "seed": seed, "per_class": True}
    rest = train.select(kept)
    rest.split_info = {**how, "part": "rest"}
    val = train.select(carved)
    val.split_info = {**how, "part": "carved"}
    return rest, val


def build_registered(name: str, split: str, root=None, download: bool = False,
                     val_fraction: float | None = None, split_seed: int = 0) -> ImageDataset:
    """Split train / val / test of registered data set `name` (see the module docstring)."""
    if split not in SPLITS:
        raise UserError(f"{name} has the splits {', '.join(SPLITS)}, not {split!r}")
    spec = REGISTRY[name]
    root = data_root(root)
    if split in spec.splits and (split == "test" or "val" in spec.splits):
        samples, classes = _read(name, root, split, download)
        return _dataset(name, samples, classes, {"from": f"{name}'s own {split} split"})
    samples, classes = _read(name, root, "train", download)
    train = _dataset(name, samples, classes, {})
    fraction = spec.val_fraction if val_fraction is None else val_fraction
    rest, val = carve_validation(train, fraction, split_seed, f"{name}'s own train split")
    return rest if split == "train" else val


def _folder_splits(root: Path, val_fraction: float, split_seed: int) -> dict[str, ImageDataset]:
    from mocobench.data import build_dataset

    has = {s: (root / s).is_dir() for s in SPLITS}
    train = build_dataset(str(root), "train")
    if has["test"]:
        test = build_dataset(str(root), "test")
        val = build_dataset(str(root), "val") if has["val"] else None
    else:
        test = build_dataset(str(root), "val")  # ImageNet: val/ is what papers report on
        test.split_info = {"from": "val/ (the folder has no test/: ImageNet's convention)"}
        val = None
    if val is None:
        train, val = carve_validation(train, val_fraction, split_seed, "train/")
    for ds in (val, test):
        if ds.classes != train.classes:
            raise UserError(f"{root}: train/ and the other split folders have different class "
                            f"folders ({len(train.classes)} vs {len(ds.classes)}); make them the same")
    return {"train": train, "val": val, "test": test}


def evaluation_splits(source: str, *, root=None, download: bool = False, val_fraction: float = 0.2,
                      split_seed: int = 0, score_split: str = "test") -> dict[str, ImageDataset]:
    """{"train", "val", "test"} of `source` (a registered name or an ImageNet-layout folder)
    for a transfer task that fits on train, chooses settings on val and scores test once.

    score_split "val" scores the validation split instead (for choosing pretraining settings:
    sweeps), with settings of the task itself chosen on a part carved from train."""
    if score_split not in ("test", "val"):
        raise UserError(f"data.score_split must be test or val, got {score_split!r}")
    if source in REGISTRY:
        parts = {s: build_registered(source, s, root, download, val_fraction, split_seed)
                 for s in SPLITS}
    else:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise UserError(f"data {source!r} is neither a registered data set ({', '.join(REGISTRY)}) "
                            "nor an existing folder; pass one of those names or an ImageNet-layout folder")
        parts = _folder_splits(path, val_fraction, split_seed)
    if score_split == "val":
        train, val = carve_validation(parts["train"], val_fraction, split_seed + 1, "train")
        test = parts["val"]
        test.split_info = {"from": "val (data.score_split=val)", "val": test.split_info}
        parts = {"train": train, "val": val, "test": test}
    return parts
