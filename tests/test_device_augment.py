"""The split augmentation (pretrain/device_augment.py): the device half computes
torchvision's colour ops image by image, the worker half draws torchvision's
parameter distributions, and a view stays a function of (seed, epoch, index)."""
from pathlib import Path

import pytest
import sklearn
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from pretrain.data import TwoCrops
from pretrain.device_augment import (BLUR, FACTORS, GRAY, JITTER, ORDER, SIGMA, Recipe, WorkerHalf,
                                     colour_batch)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def photo() -> Image.Image:
    """A real colour photo (scikit-learn's china.jpg, 427x640)."""
    return Image.open(Path(sklearn.__file__).parent / "datasets/images/china.jpg").convert("RGB")


def one_by_one(pixels, params, recipe):
    """The reference: torchvision's tensor ops, one image and one op at a time."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    out = []
    for image, p in zip(pixels, params):
        x = image.float() / 255

        def jitter(x):
            if p[JITTER] > 0:
                for op in p[ORDER].long().tolist():
                    x = ops[op](x, float(p[FACTORS.start + op]))
            return x

        def gray(x):
            return TF.rgb_to_grayscale(x, num_output_channels=3) if p[GRAY] > 0 else x

        x = gray(jitter(x)) if recipe.version == "v2" else jitter(gray(x))
        if p[BLUR] > 0:
            x = TF.gaussian_blur(x, [recipe.kernel] * 2, [float(p[SIGMA])] * 2)
        out.append(TF.normalize(x, MEAN, STD))
    return torch.stack(out)


@pytest.mark.parametrize("version,size", [("v2", 64), ("v2", 224), ("v1", 48)])
def test_device_half_equals_torchvisions_ops_image_by_image(version, size):
    torch.manual_seed(0)
    half = WorkerHalf(version, size)
    views = [half(photo()) for _ in range(24)]
    pixels, params = torch.stack([v for v, _ in views]), torch.stack([p for _, p in views])
    assert pixels.dtype == torch.uint8 and pixels.shape == (24, 3, size, size)
    assert params[:, JITTER].sum() > 0 and params[:, GRAY].sum() > 0  # every branch ran
    if version == "v2":
        assert 0 < params[:, BLUR].sum() < 24
    batched = colour_batch(pixels, params, half.recipe, MEAN, STD)
    torch.testing.assert_close(batched, one_by_one(pixels, params, half.recipe), atol=1e-4, rtol=0)


def test_parameters_follow_the_recipes_distributions():
    torch.manual_seed(0)
    v2 = Recipe("v2", 224)
    rows = torch.stack([v2.draw() for _ in range(4000)])
    for column, p in ((JITTER, 0.8), (GRAY, 0.2), (BLUR, 0.5)):
        assert rows[:, column].mean().item() == pytest.approx(p, abs=0.03)
    b_c_s, hue = rows[:, FACTORS][:, :3], rows[:, FACTORS][:, 3]
    assert b_c_s.min() >= 0.6 and b_c_s.max() <= 1.4 and b_c_s.mean().item() == pytest.approx(1, abs=0.02)
    assert hue.abs().max() <= 0.1
    assert (rows[:, ORDER].sort(1).values == torch.arange(4.0)).all()  # a permutation each time
    blurred = rows[rows[:, BLUR] > 0, SIGMA]
    assert blurred.min() >= 0.1 and blurred.max() <= 2.0  # moco/main_moco.py's range at 224 px
    assert Recipe("v2", 32).sigma == pytest.approx((0.1 * 32 / 224, 2.0 * 32 / 224))
    v1 = torch.stack([Recipe("v1", 224).draw() for _ in range(500)])
    assert (v1[:, JITTER] == 1).all() and (v1[:, BLUR] == 0).all() and v1[:, FACTORS][:, 3].abs().max() > 0.2


def pil_colour(crop: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The official pipeline's PIL ops (moco/loader.py's blur) with the given parameters."""
    from PIL import ImageFilter
    from torchvision.transforms import functional as F

    ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    image = F.to_pil_image(crop)
    if p[JITTER] > 0:
        for op in p[ORDER].long().tolist():
            image = ops[op](image, float(p[FACTORS.start + op]))
    if p[GRAY] > 0:
        image = F.to_grayscale(image, num_output_channels=3)
    if p[BLUR] > 0:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(p[SIGMA])))
    return F.to_tensor(image)


def test_device_half_matches_the_pil_pipeline_given_the_same_draws():
    """Same crop, same parameters: PIL rounds to uint8 after every op and blurs with box
    passes, so pixels differ by a grey level or two, not by recipe."""
    torch.manual_seed(0)
    half = WorkerHalf("v2", 64)
    views = [half(photo()) for _ in range(64)]
    pixels, params = torch.stack([v for v, _ in views]), torch.stack([p for _, p in views])
    ours = colour_batch(pixels, params, half.recipe, [0.0] * 3, [1.0] * 3)  # in [0, 1]
    pil = torch.stack([pil_colour(v, p) for v, p in zip(pixels, params)])
    error = (ours - pil).abs().mean((1, 2, 3))
    sharp = params[:, BLUR] == 0
    # measured: ~1 grey level on average, 1.7 at most, with or without blur
    assert error[sharp].max() < 2.5 / 255  # PIL's uint8 rounding (hue in 256 steps)
    assert error[~sharp].max() < 3 / 255  # plus its box approximation of the Gaussian


def test_two_crops_with_the_worker_half_are_seeded_per_image():
    from mocobench.data import build_dataset

    images = build_dataset("fashion-mnist", "train", max_images=4)
    crops = TwoCrops(images, WorkerHalf("v2", 32), seed=3)
    (q_pixels, q_params), (k_pixels, k_params), _, _ = crops[1]
    assert q_pixels.shape == (3, 32, 32) and q_pixels.dtype == torch.uint8  # grey read as RGB
    assert not (torch.equal(q_pixels, k_pixels) and torch.equal(q_params, k_params))
    again = crops[1]
    assert torch.equal(again[0][0], q_pixels) and torch.equal(again[1][1], k_params)


def test_colour_on_the_device_keeps_the_moco_loss():
    """The perf-option contract (tests/test_perf_numerics.py): same crops and draws, colour by
    PIL in the workers or batched on the device: the MoCo loss agrees."""
    import torch.nn.functional as F
    from torchvision.transforms import functional as TVF

    from pretrain.builder import MoCo

    torch.manual_seed(0)
    half = WorkerHalf("v2", 32)
    views = [half(photo()) for _ in range(16)]
    pixels, params = torch.stack([v for v, _ in views]), torch.stack([p for _, p in views])
    on_device = colour_batch(pixels, params, half.recipe, MEAN, STD)
    in_workers = torch.stack([TVF.normalize(pil_colour(v, p), MEAN, STD) for v, p in zip(pixels, params)])

    def loss(batch):
        torch.manual_seed(0)
        model = MoCo("resnet18", dim=16, K=48, m=0.9, T=0.2, mlp=True, bn_splits=2)
        logits, labels = model(batch[:8], batch[8:])
        return F.cross_entropy(logits, labels)

    # Measured: 1.4% apart at this random init (bf16 autocast moves it 1-2%); other draws of
    # the colour parameters for the same crops move it 7%, so the check can tell them apart.
    torch.testing.assert_close(loss(on_device), loss(in_workers), rtol=3e-2, atol=0)
    other_draws = torch.stack([half.recipe.draw() for _ in range(16)])
    other = loss(colour_batch(pixels, other_draws, half.recipe, MEAN, STD))
    assert abs(other - loss(in_workers)) > 3e-2 * loss(in_workers)


def _plan_inputs(n=32, size=32):
    torch.manual_seed(0)
    half = WorkerHalf("v2", size)
    params = torch.stack([half.recipe.draw() for _ in range(n)])
    assert params[:, JITTER].sum() > 0 and params[:, GRAY].sum() > 0 and params[:, BLUR].sum() > 0
    return half.recipe, params


def test_device_half_never_reads_device_data_on_the_host():
    """The CPU proxy of "no host synchronisation": on the meta device nothing has data, so
    any nonzero(), len() of a data-dependent result or .item() on the device fails; the plan
    must come from the CPU parameter rows alone."""
    recipe, params = _plan_inputs()
    views = torch.empty(len(params), 3, 32, 32, dtype=torch.uint8, device="meta")
    out = colour_batch(views, params, recipe, MEAN, STD)
    assert out.device.type == "meta" and out.shape == views.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: counts real host syncs "
                    "(the meta-device test above is the CPU proxy)")
def test_device_half_on_cuda_makes_no_synchronising_call():
    recipe, params = _plan_inputs()
    views = torch.randint(0, 256, (len(params), 3, 32, 32), dtype=torch.uint8, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        colour_batch(views, params, recipe, MEAN, STD)
    finally:
        torch.cuda.set_sync_debug_mode("default")
