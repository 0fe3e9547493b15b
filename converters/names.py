"""torchvision <-> Detectron2 ResNet parameter names.

Detectron2 (modeling/backbone/resnet.py): BasicStem holds `conv1` with its norm inside
(`stem.conv1.norm`); stages are `res2..res5`; each block's `convK` carries its norm as
`convK.norm`; the projection shortcut is `shortcut` with `shortcut.norm`. The rules are those of
MoCo's detection/convert-pretrain-to-detectron2.py, applied to backbone keys only, so no
`stem.fc.*` junk can appear.
"""
import re


def tv_to_d2(key: str) -> str | None:
    """torchvision backbone key -> Detectron2 key; None for anything that is not backbone."""
    if key == "conv1.weight":
        return "stem.conv1.weight"
    if m := re.fullmatch(r"bn1\.(\w+)", key):
        return f"stem.conv1.norm.{m[1]}"
    if m := re.fullmatch(r"layer([1-4])\.(\d+)\.conv(\d)\.weight", key):
        return f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"
    if m := re.fullmatch(r"layer([1-4])\.(\d+)\.bn(\d)\.(\w+)", key):
        return f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"
    if m := re.fullmatch(r"layer([1-4])\.(\d+)\.downsample\.0\.weight", key):
        return f"res{int(m[1]) + 1}.{m[2]}.shortcut.weight"
    if m := re.fullmatch(r"layer([1-4])\.(\d+)\.downsample\.1\.(\w+)", key):
        return f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"
    return None


def d2_to_tv(key: str) -> str | None:
    """Detectron2 backbone key -> torchvision key; None for anything else (e.g. `stem.fc.*`)."""
    if key == "stem.conv1.weight":
        return "conv1.weight"
    if m := re.fullmatch(r"stem\.conv1\.norm\.(\w+)", key):
        return f"bn1.{m[1]}"
    if m := re.fullmatch(r"res([2-5])\.(\d+)\.conv(\d)\.weight", key):
        return f"layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight"
    if m := re.fullmatch(r"res([2-5])\.(\d+)\.conv(\d)\.norm\.(\w+)", key):
        return f"layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}"
    if m := re.fullmatch(r"res([2-5])\.(\d+)\.shortcut\.weight", key):
        return f"layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight"
    if m := re.fullmatch(r"res([2-5])\.(\d+)\.shortcut\.norm\.(\w+)", key):
        return f"layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}"
    return None
