"""Image data sources shared by pretraining and evaluation.

A data set is named either by a registered name (``fashion-mnist``, the embedded
demo data, or a standard benchmark read with torchvision: ``cifar10``, ``dtd``, ...;
see mocobench/datasets.py) or by a folder in the ImageNet layout
(``ROOT/train/<class>/*.jpg``, ``ROOT/val/<class>/*.jpg``, optionally ``ROOT/test/``).
Adding a source means adding one entry to ``mocobench.datasets.REGISTRY``; nothing
downstream changes.

Every registered source has the splits ``train``, ``val`` and ``test``: where a data set
publishes no validation split, ``val`` is carved from its training split (seeded, per
class) and ``train`` is the rest, so settings chosen on ``val`` never saw ``test``.
"""
import gzip
import multiprocessing
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from mocobench.errors import UserError
from mocobench.fileio import cache_root

FASHION_MNIST_DIRS = [
    os.environ.get("FASHION_MNIST_DIR", ""),
    "/usr/share/datasets/fashion-mnist",  # Debian package dataset-fashion-mnist
    str(cache_root() / "FashionMNIST" / "raw"),  # torchvision download
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
]


def read_idx(path) -> np.ndarray:
    """Read a (gzipped) idx file, the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist_dir() -> Path:
    for d in FASHION_MNIST_DIRS:
        if d and all((Path(d) / f).exists() for pair in FASHION_MNIST_FILES.values() for f in pair):
            return Path(d)
    # Not installed: on a connected machine torchvision downloads the same files.
    root = Path(FASHION_MNIST_DIRS[2]).parents[1]
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception as e:  # offline: URLError, timeouts, ...
        raise UserError(
            "Fashion-MNIST not found in /usr/share/datasets/fashion-mnist and the download failed "
            f"({type(e).__name__}); install it with `apt-get install dataset-fashion-mnist` "
            "or set FASHION_MNIST_DIR to a folder holding the four idx .gz files"
        ) from None
    return Path(FASHION_MNIST_DIRS[2])


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as (uint8 images N x 28 x 28, int64 labels N); split 'train' or 'test'."""
    if split not in FASHION_MNIST_FILES:
        raise UserError(f"Fashion-MNIST split {split!r} does not exist; use 'train' or 'test'")
    root = _fashion_mnist_dir()
    images_file, labels_file = FASHION_MNIST_FILES[split]
    images = read_idx(root / images_file)
    labels = read_idx(root / labels_file).astype(np.int64)
    return images, labels


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Sample:
    """Where one image comes from: an array in memory or a file on disk.

    `label` is a class index, or for multi-label data (VOC07 classification) a tuple with
    one entry per class: 1 present, 0 absent, -1 ignored ("difficult" only)."""
    label: int | tuple
    path: str | None = None
    array: np.ndarray | None = None
    id: str | None = None  # a stable name (the path's tail, or split/index for arrays)

    def name(self, index: int) -> str:
        return self.id or self.path or str(index)


# Pillow modes that hold more than 8 bits in one channel: convert("RGB") clips them
# (a 16-bit PNG turns white), so they are scaled here; 32-bit ones are refused.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(im: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `im`. 16-bit grey images keep their high byte, as Pillow
    itself reduces 16-bit colour PNGs and TIFFs to RGB; 32-bit integer and float images
    have no agreed 8-bit meaning and are refused."""
    if im.mode in _SIXTEEN_BIT_MODES:
        high = (np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(high).convert("RGB")
    if im.mode in ("I", "F"):
        kind = "32-bit integer" if im.mode == "I" else "floating-point"
        raise ValueError(f"a {kind} image (Pillow mode {im.mode}) has no agreed 8-bit reading; "
                         "convert it to an 8- or 16-bit PNG")
    return im.convert("RGB")


# Slots of ImageDataset's shared status array: [unreadable count, then (pid, index) per worker].
_MAX_TRACKED_WORKERS = 64


class ImageDataset(Dataset):
    """Labelled RGB images, decoded lazily; `transform` gets a PIL image.

    ``__getitem__`` returns ``(transform(image), label, index)``: the index lets
    per-image state (memory banks, per-sample seeds) follow the image.

    An unreadable file is skipped and counted (the next readable image stands in for
    it, a warning names the file once) until more than `max_unreadable` distinct files
    have been skipped by this process and its loader workers (under torchrun: per rank);
    then the run stops with one line. The default 0 stops at the first: evaluation must
    not silently drop images.
    """

    def __init__(self, name: str, samples: list[Sample], classes: list[str], transform=None,
                 max_unreadable: int = 0):
        self.name, self.samples, self.classes, self.transform = name, samples, classes, transform
        self.max_unreadable = max_unreadable
        self.split_info: dict = {}  # how this split was made (e.g. carved from train), recorded
        # Shared with the DataLoader workers (created before them, inherited by them): which
        # files were found unreadable, their count, and which sample each worker is loading,
        # so that a worker that dies can be reported with the sample it died on (`iterate`).
        self.unreadable_flags = multiprocessing.RawArray("b", len(samples))
        self.status = multiprocessing.RawArray("q", 1 + 2 * _MAX_TRACKED_WORKERS)

    @property
    def targets(self) -> list:
        return [s.label for s in self.samples]

    @property
    def multilabel(self) -> bool:
        return bool(self.samples) and isinstance(self.samples[0].label, tuple)

    def ids(self) -> list[str]:
        """A stable name per image, in order (for per-example outcomes and fingerprints)."""
        return [s.name(i) for i, s in enumerate(self.samples)]

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, index: int) -> Image.Image:
        s = self.samples[index]
        if s.array is not None:
            return to_rgb(Image.fromarray(s.array))
        with Image.open(s.path) as im:
            return to_rgb(im)

    def load_image(self, index: int) -> tuple[Image.Image, int]:
        """(image, index of the image actually returned): `index`, or the next readable
        one when `index` is skipped as unreadable."""
        worker = get_worker_info()
        if worker is not None and worker.id < _MAX_TRACKED_WORKERS:
            self.status[1 + 2 * worker.id], self.status[2 + 2 * worker.id] = os.getpid(), index
        for i in range(index, index + len(self)):
            i %= len(self)
            if self.unreadable_flags[i]:
                continue
            try:
                return self._decode(i), i
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
                self.unreadable_flags[i] = 1
                self.status[0] += 1  # workers may race on this count: off by one at worst
                reason = f"{type(e).__name__}: {e}"
                if self.status[0] > self.max_unreadable:
                    raise UserError(
                        f"cannot read image {self.samples[i].path} ({reason}); {self.status[0]} "
                        f"unreadable file(s), more than the limit of {self.max_unreadable} "
                        "(data.max_unreadable): remove or replace them, or raise the limit"
                    ) from None
                print(f"warning: skipped unreadable image {self.samples[i].path} ({reason}); "
                      f"{self.status[0]} of at most {self.max_unreadable} skipped",
                      file=sys.stderr, flush=True)
        raise UserError(f"no readable image in {self.name}")  # unreachable with a limit < len

    def __getitem__(self, index: int):
        image, index = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        label = self.samples[index].label
        if isinstance(label, tuple):  # multi-label: the loader stacks these into N x C
            label = np.asarray(label, dtype=np.int64)
        return image, label, index

    def subset(self, max_images: int, seed: int = 0) -> "ImageDataset":
        """A class-balanced-in-expectation random subset (all if max_images <= 0)."""
        if max_images <= 0 or max_images >= len(self):
            return self
        keep = np.sort(np.random.default_rng(seed).permutation(len(self))[:max_images])
        return self.select(keep)

    def select(self, indices, name: str | None = None) -> "ImageDataset":
        """The images at `indices` (in that order), same classes and settings."""
        ds = ImageDataset(name or self.name, [self.samples[i] for i in indices], self.classes,
                          self.transform, self.max_unreadable)
        ds.split_info = dict(self.split_info)
        return ds


def concat(first: ImageDataset, second: ImageDataset) -> ImageDataset:
    """`first`'s images then `second`'s (same classes), e.g. train + val for a final fit."""
    if first.classes != second.classes:
        raise UserError(f"{first.name}: the splits to join have different classes")
    ds = ImageDataset(first.name, first.samples + second.samples, first.classes, first.transform,
                      first.max_unreadable)
    ds.split_info = {"joined": [first.split_info, second.split_info]}
    return ds


def single_labels(samples: list[Sample]) -> np.ndarray:
    """The class index of each sample; for multi-label samples the first present class
    (what a per-class draw stratifies on)."""
    if samples and isinstance(samples[0].label, tuple):
        return np.asarray([next((c for c, v in enumerate(s.label) if v == 1), 0) for s in samples])
    return np.asarray([s.label for s in samples], dtype=np.int64)


def carve(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the indices of `labels` into (kept, carved): `fraction` of each class, drawn
    with `seed` (round(fraction * n_c) of a class's n_c images, at least one and at most
    n_c - 1 where it has two). Per class, so no class is left out of either part."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    carved = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = int(round(fraction * len(members)))
        n = min(max(n, 1 if len(members) >= 2 else 0), len(members) - 1 if len(members) >= 2 else 0)
        carved.append(rng.permutation(members)[:n])
    carved = np.sort(np.concatenate(carved)) if carved else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), carved)
    return kept, carved


def iterate(loader):
    """Iterate a DataLoader over an ImageDataset (or a wrapper holding one as `.images`);
    a worker that dies (killed, out of memory, a crash in native decoding code) surfaces
    as one line naming the worker and the sample it was loading, instead of a traceback."""
    try:
        yield from loader
    except RuntimeError as e:
        pids = re.search(r"DataLoader worker \(pids?\(?s?\)? ([\d, ]+)\)", str(e))
        if not pids:
            raise
        images = getattr(loader.dataset, "images", loader.dataset)
        status = getattr(images, "status", None)
        dead = [int(p) for p in pids.group(1).replace(" ", "").split(",") if p]
        what = []
        for w in range(min(loader.num_workers, _MAX_TRACKED_WORKERS)):
            if status is not None and status[1 + 2 * w] in dead:
                index = status[2 + 2 * w]
                sample = images.samples[index]
                where = sample.path or f"{images.name} image {index}"
                what.append(f"worker {w} (pid {status[1 + 2 * w]}) while loading sample {index} ({where})")
        what = "; ".join(what) or f"worker pid(s) {', '.join(map(str, dead))}"
        raise UserError(f"a data loader worker died ({str(e).splitlines()[0].rstrip('. ')}): {what}; "
                        "check that file, or lower data.num_workers if memory ran out") from None


def fashion_mnist_samples(split: str) -> list[Sample]:
    """Fashion-MNIST's published split ('train' or 'test') as in-memory samples."""
    images, labels = fashion_mnist(split)
    return [Sample(int(y), array=x, id=f"{split}/{i}") for i, (x, y) in enumerate(zip(images, labels))]


def _image_folder(root: Path, split: str) -> ImageDataset:
    split_dir = root / split
    if not split_dir.is_dir():
        raise UserError(
            f"data folder {root} has no {split}/ subfolder; expected the ImageNet layout "
            f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg"
        )
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{split_dir} has no class folders; put each class's images in {split_dir}/<class>/")
    samples, empty = [], []
    for label, cls in enumerate(classes):
        found = []
        for dirpath, _, files in os.walk(split_dir / cls, followlinks=True):
            found += [Sample(label, path=os.path.join(dirpath, f),
                             id=os.path.relpath(os.path.join(dirpath, f), split_dir))
                      for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        empty += [cls] if not found else []
        samples += found
    if not samples:
        raise UserError(f"{split_dir} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    if empty:
        # Refused rather than ignored: an image-less class would still be a class id (the
        # classifier's chance level and per-class means change), and ignoring it in one
        # split but not another would shift every later class index.
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise UserError(f"{split_dir} has class folder(s) without images: {shown}; add images "
                        "or remove the folder(s), in every split")
    return ImageDataset(str(root), samples, classes)


def build_dataset(source: str, split: str, transform=None, max_images: int = 0,
                  seed: int = 0, max_unreadable: int = 0, *, root=None, download: bool = False,
                  val_fraction: float | None = None, split_seed: int = 0) -> ImageDataset:
    """A registered data set by name (split train / val / test; see mocobench.datasets),
    or an ImageNet-layout folder by path (split = its subfolder); up to `max_unreadable`
    unreadable files are skipped (see ImageDataset). `root`: where registered data sets
    live (else $MOCO_BENCH_DATA); `download`: let torchvision fetch a missing one;
    `val_fraction` / `split_seed`: the carved validation split of data sets without one."""
    from mocobench.datasets import REGISTRY, build_registered

    if source in REGISTRY:
        ds = build_registered(source, split, root, download, val_fraction, split_seed)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(
                f"data {source!r} is neither a registered data set ({', '.join(REGISTRY)}) "
                "nor an existing folder; pass one of those names or an ImageNet-layout folder"
            )
        ds = _image_folder(path, split)
        ds.split_info = {"from": f"{split}/"}
    ds = ds.subset(max_images, seed)
    ds.transform, ds.max_unreadable = transform, max_unreadable
    return ds
