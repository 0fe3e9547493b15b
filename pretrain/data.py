"""Two-crop views of each image and a resumable, rank-aware sampling order.

Randomness is a pure function of (seed, epoch, image index): the crop an image
gets does not depend on which worker or rank decodes it, so a run resumed in
the middle of an epoch sees exactly the batches an uninterrupted run would.
"""
import random

import torch
from PIL import ImageFilter
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T


class GaussianBlur:
    """MoCo v2's blur, sigma drawn uniformly from [0.1, 2] (official moco/loader.py)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image):
        sigma = self.sigma[0] + float(torch.rand(())) * (self.sigma[1] - self.sigma[0])
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def moco_augmentation(version: str, size: int, mean, std, crop_scale=(0.2, 1.0)):
    """The official pipelines (main_moco.py L326-350), at any crop size."""
    normalize = T.Normalize(mean=mean, std=std)
    if version == "v2":  # "aug+", as in SimCLR
        # The blur's sigma range [0.1, 2] is in pixels of a 224 px crop: it scales with the
        # crop so a 32 px view is blurred as much as a 224 px one is, not 7 times more.
        blur_sigma = [0.1 * size / 224, 2.0 * size / 224]
        ops = [
            T.RandomResizedCrop(size, scale=tuple(crop_scale)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([GaussianBlur(blur_sigma)], p=0.5),
            T.RandomHorizontalFlip(),
        ]
    else:  # v1, as in InstDisc
        ops = [
            T.RandomResizedCrop(size, scale=tuple(crop_scale)),
            T.RandomGrayscale(p=0.2),
            T.ColorJitter(0.4, 0.4, 0.4, 0.4),
            T.RandomHorizontalFlip(),
        ]
    return T.Compose(ops + [T.ToTensor(), normalize])


def eval_transform(size: int, mean, std):
    """Resize to size*256/224 then center-crop, the ImageNet evaluation convention."""
    return T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(mean=mean, std=std)])


class TwoCrops(Dataset):
    """(query view, key view, label, index) of an ImageDataset, seeded per image.

    Items are addressed by (epoch, index), as EpochSampler yields them, so that persistent
    loader workers need no message when an epoch starts (a plain index means epoch 0).
    A view is what `transform` returns: a normalised tensor (the PIL pipeline), or a
    (uint8 pixels, colour parameters) pair from device_augment.WorkerHalf.

    With `key_view=False` (supervised training, the memory bank: nothing encodes a key
    view) the query view is returned in both places instead of augmenting twice."""

    def __init__(self, images, transform, seed: int, key_view: bool = True):
        self.images, self.transform, self.seed = images, transform, seed
        self.key_view = key_view

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, index = self.images.load_image(index)  # another index if the file was skipped
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            random.seed(index)  # PIL-level ops never use `random`, but be safe
            q = self.transform(image)
            k = self.transform(image) if self.key_view else q
        return q, k, self.images.samples[index].label, index


class EpochSampler(Sampler):
    """This rank's (epoch, index) pairs for one epoch: a seeded permutation cut to whole
    global batches (MoCo's queue needs every batch full, so the tail is dropped), dealt out
    rank by rank, starting after the batches already trained. `set_epoch` before each epoch;
    the loader then reads it anew (in the main process, also with persistent workers)."""

    def __init__(self, n, global_batch, rank, world_size, seed):
        self.n, self.global_batch, self.rank, self.world_size, self.seed = n, global_batch, rank, world_size, seed
        self.steps = n // global_batch
        self.set_epoch(0)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        per_rank = self.global_batch // self.world_size
        batches = perm[: self.steps * self.global_batch].view(self.steps, self.world_size, per_rank)
        self.epoch = epoch
        self.indices = batches[skip_batches:, self.rank].reshape(-1).tolist()

    def __iter__(self):
        return iter([(self.epoch, i) for i in self.indices])

    def __len__(self):
        return len(self.indices)
