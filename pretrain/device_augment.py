"""MoCo's augmentation split in two: geometry in the data-loader workers, colour on the device.

On fast GPUs the two-crop pipeline, not the model, limits MoCo's step, and most of
its per-image cost is colour (jitter, grayscale, blur: 8 of 11.5 ms per 224 px crop on
PIL, hue alone 4). Workers here only crop, flip and hand over uint8 pixels, plus a
row of random parameters; the colour ops then run on the whole batch at once where
the model runs. The parameters are drawn in the worker from the same per-image
seeded RNG as the crop, so a view is still a pure function of (seed, epoch, index),
and they follow torchvision's distributions exactly (ColorJitter's random order
and factor ranges, RandomApply / RandomGrayscale probabilities, MoCo v2's blur
sigma). The ops are torchvision's tensor ops computed per image with per-image
factors (tests compare them image by image); the PIL pipeline rounds to uint8
between ops and blurs with box passes, so pixels differ slightly, not the recipe.
"""
import math

import torch
import torch.nn.functional as F
from torchvision import transforms as T

# Columns of the parameter row each view carries from the worker to the device.
JITTER, FACTORS, ORDER, GRAY, BLUR, SIGMA = 0, slice(1, 5), slice(5, 9), 9, 10, 11
NUM_PARAMS = 12
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2)


class Recipe:
    """The colour half of MoCo v1 / v2 (main_moco.py), its probabilities and ranges."""

    def __init__(self, version: str, size: int):
        self.version = version
        if version == "v2":  # jitter (p 0.8), then grayscale, then blur (p 0.5)
            self.p_jitter, self.strength, self.hue = 0.8, 0.4, 0.1
            self.p_blur, self.sigma = 0.5, (0.1 * size / 224, 2.0 * size / 224)
        else:  # v1: grayscale, then jitter every time, no blur
            self.p_jitter, self.strength, self.hue = 1.0, 0.4, 0.4
            self.p_blur, self.sigma = 0.0, (0.0, 0.0)
        self.p_gray = 0.2
        # One kernel size for the batch: 3 sigma of the largest sigma each side, like
        # PIL's radius; smaller sigmas only put ~0 weight on the outer taps.
        self.kernel = 2 * math.ceil(3 * self.sigma[1]) + 1

    def draw(self) -> torch.Tensor:
        """One view's parameter row, from torch's (per-image seeded) RNG."""
        row = torch.zeros(NUM_PARAMS)
        row[JITTER] = float(torch.rand(()) < self.p_jitter)
        s = self.strength
        row[FACTORS] = torch.empty(4).uniform_(1 - s, 1 + s)
        row[FACTORS.start + 3] = float(torch.empty(()).uniform_(-self.hue, self.hue))
        row[ORDER] = torch.randperm(4).float()  # ColorJitter applies its four ops in random order
        row[GRAY] = float(torch.rand(()) < self.p_gray)
        row[BLUR] = float(torch.rand(()) < self.p_blur)
        row[SIGMA] = float(torch.empty(()).uniform_(*self.sigma)) if self.p_blur else 0.0
        return row


class WorkerHalf:
    """What a DataLoader worker runs on a PIL image: (uint8 CxHxW view, parameter row)."""

    def __init__(self, version: str, size: int, crop_scale=(0.2, 1.0)):
        self.recipe = Recipe(version, size)
        self.geometry = T.Compose([T.RandomResizedCrop(size, scale=tuple(crop_scale)),
                                   T.RandomHorizontalFlip(), T.PILToTensor()])

    def __call__(self, image):  # an RGB image: mocobench/data.py converts every image it reads
        return self.geometry(image), self.recipe.draw()


def grayscale(x: torch.Tensor) -> torch.Tensor:
    w = x.new_tensor(_GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(x, other, factor):
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, hue + shift (mod 1), -> RGB, per image (torchvision's adjust_hue)."""
    v, vmin = x.amax(1), x.amin(1)
    chroma = v - vmin
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = x.unbind(1)
    h = torch.where(v == r, (g - b) / safe, torch.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = (h / 6 + shift.view(-1, 1, 1)).remainder(1)
    # hsv -> rgb: channel n is v - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    k = (x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1) + 6 * h[:, None]).remainder(6)
    return v[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def _jitter_op(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    if op == 0:  # brightness
        return (x * f).clamp_(0, 1)
    if op == 1:  # contrast: towards the image's mean gray
        return _blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), f)
    if op == 2:  # saturation: towards the pixel's gray
        return _blend(x, grayscale(x), f)
    return shift_hue(x, factor)


def _blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per image, reflect padding (torchvision's)."""
    n, c, h, w = x.shape
    taps = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c) x size
    pad = size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, size), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, size, 1), groups=n * c)
    return y.view(n, c, h, w)


@torch.no_grad()
def colour_batch(views: torch.Tensor, params: torch.Tensor, recipe: Recipe, mean, std) -> torch.Tensor:
    """The device half: uint8 NxCxHxW views and their parameter rows -> normalised float.

    Which images each op touches is decided from the parameter rows on the CPU, where the
    loader delivers them: the device never waits for the host (no nonzero() or len() of a
    device tensor, each a full synchronisation), only index lists travel to it."""
    x = views.float().div_(255)
    plan = params.cpu()  # a no-op for the loader's rows; a device copy would wait here once
    on_device = params.to(x.device, non_blocking=True)

    def where(mask, fn):  # apply fn to the images selected by the CPU mask
        idx = mask.nonzero().squeeze(1)
        if len(idx):
            idx = idx.to(x.device, non_blocking=True)
            x[idx] = fn(x[idx], on_device[idx])

    def jitter():
        on = plan[:, JITTER] > 0
        order = plan[:, ORDER].long()
        for slot in range(4):
            for op in range(4):
                where(on & (order[:, slot] == op),
                      lambda xs, p, op=op: _jitter_op(xs, op, p[:, FACTORS.start + op]))

    def gray():
        where(plan[:, GRAY] > 0, lambda xs, p: grayscale(xs).expand(-1, 3, -1, -1))

    if recipe.version == "v2":
        jitter(), gray()
        where(plan[:, BLUR] > 0, lambda xs, p: _blur(xs, p[:, SIGMA], recipe.kernel))
    else:
        gray(), jitter()
    mean, std = x.new_tensor(mean).view(1, -1, 1, 1), x.new_tensor(std).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)
