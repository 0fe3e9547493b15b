"""Two-crop MoCo v2 augmentation throughput per data-loader worker (one process, one
thread, as a DataLoader worker runs), on real JPEG photos at 224 px: decode once,
augment twice.

Contenders: the pipeline pretrain/data.py uses (torchvision transforms on PIL images,
the official recipe), and the same recipe on uint8 tensors with torchvision.transforms.v2
and torchvision.io.decode_jpeg. The tensor pipeline is only a candidate: pretrain/data.py
switches to it only if it is at least 2x faster here.
"""
import io
from pathlib import Path

import sklearn
import torch
from PIL import Image
from torchvision.io import decode_jpeg
from torchvision.transforms import v2

from benchmarks.timing import interleaved
from pretrain.data import moco_augmentation

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def photos() -> list[bytes]:
    """The two colour photos scikit-learn ships (427x640 JPEG): real decoded images."""
    folder = Path(sklearn.__file__).parent / "datasets/images"
    return [p.read_bytes() for p in sorted(folder.glob("*.jpg"))]


def tensor_augmentation(size: int):
    """MoCo v2's recipe on uint8 tensors. Blur: 13 taps covers 3 sigma at sigma 2 (PIL's
    radius is sigma too). Every draw comes from torch's RNG, like the PIL pipeline."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(13, sigma=(0.1, 2.0))], p=0.5),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def hybrid_augmentation(size: int):
    """Each op where it was fastest per stage: crop on the uint8 tensor, colour and blur
    in PIL (hue and blur are 1.6x and 2.5x slower on tensors), then a cheap float
    conversion. Measured to see what mixing could win; not adopted either."""
    from torchvision.transforms import functional as F

    from pretrain.data import GaussianBlur
    crop = v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True)
    colour = v2.Compose([
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([GaussianBlur([0.1, 2.0])], p=0.5),
        v2.RandomHorizontalFlip(),
    ])
    to_float = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    return lambda image: to_float(colour(F.to_pil_image(crop(image))))


def run(full: bool = False) -> list[dict]:
    size, per_call, repeats = 224, 8, (15 if full else 5)
    raw = photos()
    pil_aug = moco_augmentation("v2", size, MEAN, STD)
    tensor_aug = tensor_augmentation(size)
    hybrid_aug = hybrid_augmentation(size)

    def pil_pipeline():
        for i in range(per_call):
            image = Image.open(io.BytesIO(raw[i % len(raw)])).convert("RGB")
            pil_aug(image), pil_aug(image)

    def tensor_pipeline():
        for i in range(per_call):
            image = decode_jpeg(torch.frombuffer(bytearray(raw[i % len(raw)]), dtype=torch.uint8))
            tensor_aug(image), tensor_aug(image)

    def hybrid_pipeline():
        for i in range(per_call):
            image = decode_jpeg(torch.frombuffer(bytearray(raw[i % len(raw)]), dtype=torch.uint8))
            hybrid_aug(image), hybrid_aug(image)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each DataLoader worker gets
    try:
        torch.manual_seed(0)
        t = interleaved({"pil": pil_pipeline, "tensor": tensor_pipeline, "hybrid": hybrid_pipeline},
                        repeats=repeats)
    finally:
        torch.set_num_threads(threads)
    setting = f"two {size} px crops per image, {len(raw)} JPEG photos 427x640, 1 thread"
    return [
        {"name": "augmentation img/s per worker: ours (PIL)", "value": per_call / t["pil"],
         "unit": "img/s", "note": f"pretrain/data.py; {setting}"},
        {"name": "augmentation img/s per worker: transforms.v2 uint8", "value": per_call / t["tensor"],
         "unit": "img/s", "note": "candidate, decode_jpeg"},
        {"name": "augmentation: v2 uint8 / PIL throughput", "value": t["pil"] / t["tensor"],
         "unit": "ratio", "note": ">= 2 to adopt it"},
        {"name": "augmentation: hybrid (tensor crop, PIL colour) / PIL", "value": t["pil"] / t["hybrid"],
         "unit": "ratio", "note": "candidate, decode_jpeg"},
    ]
