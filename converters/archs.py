"""The torchvision ResNet family: which constructor a state dict belongs to, and
the exact key set (with shapes) each constructor has."""
import functools

import torch
import torchvision

from mocobench.errors import UserError

# constructor -> (block, blocks per stage, groups, width_per_group), as in torchvision/models/resnet.py
ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": ("bottleneck", (3, 4, 23, 3), 64, 4),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": ("bottleneck", (3, 4, 23, 3), 1, 128),
}
DEPTHS = {("basic", (2, 2, 2, 2)): 18, ("basic", (3, 4, 6, 3)): 34, ("bottleneck", (3, 4, 6, 3)): 50,
          ("bottleneck", (3, 4, 23, 3)): 101, ("bottleneck", (3, 8, 36, 3)): 152}
BACKBONE_ROOTS = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")


def check_arch_name(arch: str) -> str:
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    return arch


def depth(arch: str) -> int:
    block, layers, _, _ = ARCHS[check_arch_name(arch)]
    return DEPTHS[(block, layers)]


def is_bottleneck(arch: str) -> bool:
    return ARCHS[check_arch_name(arch)][0] == "bottleneck"


@functools.lru_cache(maxsize=None)
def expected_shapes(arch: str) -> dict:
    """Every backbone key of torchvision's `arch` (fc excluded) -> shape, in module order.
    Built on the meta device, so even resnet152 costs no memory or time."""
    with torch.device("meta"):
        model = getattr(torchvision.models, check_arch_name(arch))()
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("fc.")}


def infer_arch(sd: dict) -> str:
    """The torchvision constructor whose blocks, groups and widths match `sd`
    (torchvision names, no prefix). Raises UserError when none does."""
    bottleneck = "layer1.0.conv3.weight" in sd
    layers = []
    for stage in range(1, 5):
        idx = {int(k.split(".")[1]) for k in sd if k.startswith(f"layer{stage}.")}
        layers.append(max(idx) + 1 if idx else 0)
    groups, wpg = 1, 64
    if bottleneck:
        conv1, conv2 = sd["layer1.0.conv1.weight"].shape, sd.get("layer1.0.conv2.weight")
        width = conv1[0]
        if conv2 is not None and conv2.shape[1] and width % conv2.shape[1] == 0:
            groups = width // conv2.shape[1]
        wpg = width // groups
    signature = ("bottleneck" if bottleneck else "basic", tuple(layers), groups, wpg)
    for name, sig in ARCHS.items():
        if sig == signature:
            return name
    raise UserError(f"no torchvision ResNet has {'bottleneck' if bottleneck else 'basic'} blocks "
                    f"{'-'.join(map(str, layers))} with groups={groups}, width_per_group={wpg}; "
                    f"supported: {', '.join(ARCHS)}")
