"""The torchvision engine's data: records (transfer.detect.datasets) -> image tensors and
torchvision targets, an endless shuffled sampler, and the training loader."""
import numpy as np
import torch

from mocobench.errors import UserError
from transfer.detect import datasets as ds


def read_image(record: dict) -> torch.Tensor:
    """3 x H x W float in [0, 1], RGB, EXIF rotation applied (as Detectron2 reads images)."""
    from PIL import Image, ImageOps
    from torchvision.transforms.functional import pil_to_tensor

    try:
        with Image.open(record["file_name"]) as im:
            image = ImageOps.exif_transpose(im).convert("RGB")
    except OSError as e:
        raise UserError(f"cannot read image {record['file_name']} ({type(e).__name__}); "
                        f"check the data set files") from None
    if image.size != (record["width"], record["height"]):
        raise UserError(f"{record['file_name']} is {image.size[0]}x{image.size[1]} but its annotation "
                        f"says {record['width']}x{record['height']}; fix the annotation")
    return pil_to_tensor(image).float() / 255.0


class DetectionData(torch.utils.data.Dataset):
    """Training pairs (image, target). COCO crowd regions are not trained on; VOC difficult
    objects are (both as Detectron2)."""

    def __init__(self, records, mask_on: bool, flip: bool):
        self.records, self.mask_on, self.flip = records, mask_on, flip

    def __len__(self):
        return len(self.records)

    def _masks(self, r, anns) -> torch.Tensor:
        masks = [ds.segmentation_to_mask(a["segmentation"], r["height"], r["width"])
                 if a["segmentation"] is not None else np.zeros((r["height"], r["width"]), np.uint8)
                 for a in anns]
        return torch.from_numpy(np.stack(masks)).reshape(-1, r["height"], r["width"])

    def __getitem__(self, i):
        r = self.records[i]
        x = read_image(r)
        anns = [a for a in r["annotations"] if not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {"boxes": boxes[keep],
                  "labels": torch.tensor([a["category"] + 1 for a in anns], dtype=torch.int64)[keep]}
        if self.mask_on:
            target["masks"] = self._masks(r, anns)[keep]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
            b = target["boxes"]
            target["boxes"] = torch.stack([r["width"] - b[:, 2], b[:, 1], r["width"] - b[:, 0], b[:, 3]], 1)
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return x, target


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless reshuffled indices, this rank's share of each permutation (Detectron2's TrainingSampler)."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.seed, self.rank, self.world = size, seed, rank, world

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.size, generator=g)[self.rank::self.world].tolist()


def _collate(batch):
    return tuple(zip(*batch))


def train_loader(records, cfg, seed, rank, world):
    per_rank = cfg["SOLVER"]["IMS_PER_BATCH"] // world
    data = DetectionData(records, cfg["MODEL"]["MASK_ON"], flip=cfg["INPUT"]["RANDOM_FLIP"] == "horizontal")
    return torch.utils.data.DataLoader(
        data, batch_size=per_rank, sampler=InfiniteSampler(len(records), seed, rank, world),
        num_workers=cfg["DATALOADER"]["NUM_WORKERS"], collate_fn=_collate,
        worker_init_fn=lambda w: torch.manual_seed(seed * 1000 + rank * 100 + w))
