"""Image data sources shared by pretraining and evaluation.

A data set is named either by a registered name (``fashion-mnist``, the embedded
demo data) or by a folder in the ImageNet layout (``ROOT/train/<class>/*.jpg``,
``ROOT/val/<class>/*.jpg``). Adding a source means adding one entry to
``REGISTRY``; nothing downstream changes.
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
    """Where one image comes from: an array in memory or a file on disk."""
    label: int
    path: str | None = None
    array: np.ndarray | None = None


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
        # Shared with the DataLoader workers (created before them, inherited by them): which
        # files were found unreadable, their count, and which sample each worker is loading,
        # so that a worker that dies can be reported with the sample it died on (`iterate`).
        self.unreadable_flags = multiprocessing.RawArray("b", len(samples))
        self.status = multiprocessing.RawArray("q", 1 + 2 * _MAX_TRACKED_WORKERS)

    @property
    def targets(self) -> list[int]:
        return [s.label for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, index: int) -> Image.Image:
        s = self.samples[index]
        if s.array is not None:
            return Image.fromarray(s.array).convert("RGB")
        with Image.open(s.path) as im:
            return im.convert("RGB")

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
        return image, self.samples[index].label, index

    def subset(self, max_images: int, seed: int = 0) -> "ImageDataset":
        """A class-balanced-in-expectation random subset (all if max_images <= 0)."""
        if max_images <= 0 or max_images >= len(self):
            return self
        keep = np.sort(np.random.default_rng(seed).permutation(len(self))[:max_images])
        return ImageDataset(self.name, [self.samples[i] for i in keep], self.classes, self.transform,
                            self.max_unreadable)


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


def _fashion_mnist_dataset(split: str) -> ImageDataset:
    images, labels = fashion_mnist("train" if split == "train" else "test")
    samples = [Sample(int(y), array=x) for x, y in zip(images, labels)]
    return ImageDataset("fashion-mnist", samples, list(FASHION_MNIST_CLASSES))


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
    samples = []
    for label, cls in enumerate(classes):
        for dirpath, _, files in os.walk(split_dir / cls, followlinks=True):
            samples += [Sample(label, path=os.path.join(dirpath, f))
                        for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not samples:
        raise UserError(f"{split_dir} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    return ImageDataset(str(root), samples, classes)


# Registered data sets: name -> builder(split). Splits are "train" and "val".
REGISTRY = {"fashion-mnist": _fashion_mnist_dataset}


def build_dataset(source: str, split: str, transform=None, max_images: int = 0,
                  seed: int = 0, max_unreadable: int = 0) -> ImageDataset:
    """A registered data set by name, or an ImageNet-layout folder by path; up to
    `max_unreadable` unreadable files are skipped (see ImageDataset)."""
    if source in REGISTRY:
        ds = REGISTRY[source](split)
    else:
        root = Path(source).expanduser()
        if not root.exists():
            raise UserError(
                f"data {source!r} is neither a registered data set ({', '.join(REGISTRY)}) "
                "nor an existing folder; pass one of those names or an ImageNet-layout folder"
            )
        ds = _image_folder(root, split)
    ds = ds.subset(max_images, seed)
    ds.transform, ds.max_unreadable = transform, max_unreadable
    return ds
