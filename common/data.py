"""Image data sources shared by pretraining and evaluation.

A data set is named either by a registered name (``fashion-mnist``, the embedded
demo data) or by a folder in the ImageNet layout (``ROOT/train/<class>/*.jpg``,
``ROOT/val/<class>/*.jpg``). Adding a source means adding one entry to
``REGISTRY``; nothing downstream changes.
"""
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from common.errors import UserError

FASHION_MNIST_DIRS = [
    os.environ.get("FASHION_MNIST_DIR", ""),
    "/usr/share/datasets/fashion-mnist",  # Debian package dataset-fashion-mnist
    str(Path.home() / ".cache" / "moco-bench" / "FashionMNIST" / "raw"),  # torchvision download
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


class ImageDataset(Dataset):
    """Labelled RGB images, decoded lazily; `transform` gets a PIL image.

    ``__getitem__`` returns ``(transform(image), label, index)``: the index lets
    per-image state (memory banks, per-sample seeds) follow the image.
    """

    def __init__(self, name: str, samples: list[Sample], classes: list[str], transform=None):
        self.name, self.samples, self.classes, self.transform = name, samples, classes, transform

    @property
    def targets(self) -> list[int]:
        return [s.label for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        s = self.samples[index]
        if s.array is not None:
            return Image.fromarray(s.array).convert("RGB")
        try:
            with Image.open(s.path) as im:
                return im.convert("RGB")
        except Exception as e:
            raise UserError(
                f"cannot read image {s.path} ({type(e).__name__}: {e}); remove or replace the file"
            ) from None

    def __getitem__(self, index: int):
        image = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.samples[index].label, index

    def subset(self, max_images: int, seed: int = 0) -> "ImageDataset":
        """A class-balanced-in-expectation random subset (all if max_images <= 0)."""
        if max_images <= 0 or max_images >= len(self):
            return self
        keep = np.sort(np.random.default_rng(seed).permutation(len(self))[:max_images])
        return ImageDataset(self.name, [self.samples[i] for i in keep], self.classes, self.transform)


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
                  seed: int = 0) -> ImageDataset:
    """A registered data set by name, or an ImageNet-layout folder by path."""
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
    ds.transform = transform
    return ds
