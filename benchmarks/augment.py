"""Two-crop MoCo v2 augmentation throughput per data-loader worker (one process, one
thread, as a DataLoader worker runs), on real JPEG photos at 224 px: decode once,
augment twice.

Contenders, all the same MoCo v2 recipe:
  pil:    torchvision transforms on PIL images, the official pipeline (pretrain/data.py);
  tensor: transforms.v2 on uint8 tensors decoded by torchvision.io.decode_jpeg (lost:
          hue and blur are slower on tensors than in PIL);
  split:  pretrain/device_augment.py, the workers crop and flip and the colour ops run
          batched on the training device. Its worker half is what a worker pays; its
          device half is timed too, on this CPU (one thread, a batch of 64 views),
          to show what it costs where there is no GPU to take it.
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
from pretrain.device_augment import WorkerHalf, colour_batch

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


def run(full: bool = False) -> list[dict]:
    size, per_call, repeats = 224, 8, (15 if full else 9)
    raw = photos()
    pil_aug = moco_augmentation("v2", size, MEAN, STD)
    tensor_aug = tensor_augmentation(size)
    worker_half = WorkerHalf("v2", size)

    def pil_pipeline():
        for i in range(per_call):
            image = Image.open(io.BytesIO(raw[i % len(raw)])).convert("RGB")
            pil_aug(image), pil_aug(image)

    def tensor_pipeline():
        for i in range(per_call):
            image = decode_jpeg(torch.frombuffer(bytearray(raw[i % len(raw)]), dtype=torch.uint8))
            tensor_aug(image), tensor_aug(image)

    def split_worker():
        for i in range(per_call):
            image = Image.open(io.BytesIO(raw[i % len(raw)])).convert("RGB")
            worker_half(image), worker_half(image)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each DataLoader worker gets
    try:
        torch.manual_seed(0)
        image = Image.open(io.BytesIO(raw[0])).convert("RGB")
        views = [worker_half(image) for _ in range(64)]
        batch = torch.stack([v for v, _ in views]), torch.stack([p for _, p in views])
        t = interleaved({"pil": pil_pipeline, "tensor": tensor_pipeline, "split_worker": split_worker,
                         "split_device_64": lambda: colour_batch(*batch, worker_half.recipe, MEAN, STD)},
                        repeats=repeats)
    finally:
        torch.set_num_threads(threads)
    device_per_image = 2 * t["split_device_64"] / 64  # two views per image
    setting = f"two {size} px crops per image, {len(raw)} JPEG photos 427x640, 1 thread"
    return [
        {"name": "augmentation img/s per worker: ours (PIL)", "value": per_call / t["pil"],
         "unit": "img/s", "note": f"pretrain/data.py; {setting}"},
        {"name": "augmentation: v2 uint8 / PIL throughput", "value": t["pil"] / t["tensor"],
         "unit": "ratio", "note": "transforms.v2 + decode_jpeg; not adopted"},
        {"name": "augmentation: split worker half / PIL throughput per worker",
         "value": t["pil"] / t["split_worker"], "unit": "ratio",
         "note": "pretrain/device_augment.py: colour moves to the device (data.colour_on=device)"},
        {"name": "augmentation: split device half on this CPU, ms per image",
         "value": 1000 * device_per_image, "unit": "ms",
         "note": f"two views, batched 64 views; PIL pipeline: {1000 * t['pil'] / per_call:.1f} ms per image"},
        {"name": "augmentation: split (worker + device half, both on CPU) / PIL, time",
         "value": (t["split_worker"] / per_call + device_per_image) / (t["pil"] / per_call),
         "unit": "ratio", "note": "<1: cheaper in total even without a GPU"},
    ]
