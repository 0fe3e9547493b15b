"""Numeric verification in the real consumer: build the target library's own ResNet, load the
converted file through that library's own loader, and compare its stage outputs with
torchvision's ResNet carrying the source weights (eval mode, one seeded random input).

Detectron2 and MMSegmentation are imported here only, inside the functions, so converters work
without them; when one is missing the check is skipped and the returned line says so.
Each function returns ({stage: max abs diff} or None when skipped, one line for the report),
or raises UserError. The writers call these; nothing here imports the writers.
"""
import contextlib
import importlib.util
import io
import os
import tempfile
import warnings

import torch

from mocobench.errors import UserError
from mocobench.state import compare_state
from converters import archs
from converters.formats import MMSEG_PREFIX, detectron2_settings, detectron2_state_dict
from converters.loader import Backbone, build_resnet

TOLERANCE = 1e-4
INPUT_SHAPE = (2, 3, 64, 64)  # small: the check runs on every conversion, on CPU too


def _input():
    return torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def torchvision_stages(bb: Backbone, x) -> list:
    """layer1..layer4 outputs of torchvision's ResNet with bb's weights, in eval mode."""
    m = build_resnet(bb).eval()
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    outs = []
    for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
        x = layer(x)
        outs.append(x)
    return outs


def _compare(names, ours, theirs, library):
    diffs = []
    for name, a, b in zip(names, ours, theirs):
        if a.shape != b.shape:
            raise UserError(f"{library} {name} has shape {tuple(b.shape)}, torchvision {tuple(a.shape)}; "
                            f"the converted backbone does not compute the same network")
        diffs.append((a - b).abs().max().item())
    text = ", ".join(f"{n} {d:.2e}" for n, d in zip(names, diffs))
    if max(diffs) > TOLERANCE:
        raise UserError(f"{library} backbone output differs from torchvision's (max abs diff {text}; "
                        f"tolerance {TOLERANCE:g}); refusing the conversion")
    return text, dict(zip(names, diffs))


def _refuse_unless_loaded(library: str, loaded: dict, written: dict) -> None:
    """What `library` loaded must be exactly what the file holds (BN counters aside: Detectron2
    files carry none, and FrozenBN has none to load)."""
    compare_state(loaded, written, skip_counters=True).refuse_unless_equal(
        f"{library}'s backbone after loading the converted file",
        then="it does not load as converted; refusing the conversion")


# ----------------------------------------------------------------------------- Detectron2

def verify_detectron2(bb: Backbone, pkl_path) -> tuple[dict | None, str]:
    if importlib.util.find_spec("detectron2") is None:
        return None, ("numeric check skipped: detectron2 is not installed "
                      "(pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git')")
    with warnings.catch_warnings():
        # detectron2 still calls torch.jit.script at import time; the warning is not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.layers import ShapeSpec
        from detectron2.modeling.backbone.resnet import build_resnet_backbone

    cfg = get_cfg()
    opts = []
    for key, value in detectron2_settings(bb).items():
        opts += [key, str(value)]
    cfg.merge_from_list(opts)
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.NORM = "FrozenBN"  # Detectron2's default; equals BN in eval mode
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()

    with tempfile.TemporaryDirectory() as tmp:
        # DetectionCheckpointer picks the .pkl reader by extension; the file being verified
        # still has its temporary name.
        link = os.path.join(tmp, "model.pkl")
        os.symlink(os.path.abspath(pkl_path), link)
        DetectionCheckpointer(backbone).load(link)

    _refuse_unless_loaded("Detectron2", backbone.state_dict(), detectron2_state_dict(bb))
    x = _input()
    ours = torchvision_stages(bb, x)
    with torch.no_grad():
        out = backbone(x)
    names = ["res2", "res3", "res4", "res5"]
    text, diffs = _compare(names, ours, [out[n] for n in names], "Detectron2")
    return diffs, (f"Detectron2 build_resnet_backbone ({bb.arch}, STRIDE_IN_1X1 False) via "
                   f"DetectionCheckpointer: all {len(backbone.state_dict())} tensors loaded; "
                   f"max abs diff vs torchvision: {text}")


# ----------------------------------------------------------------------------- MMSegmentation

def verify_mmseg(bb: Backbone, pth_path) -> tuple[dict | None, str]:
    if importlib.util.find_spec("mmseg") is None:
        from mocobench.mmseg_compat import INSTALL

        return None, f"numeric check skipped: mmsegmentation is not installed ({INSTALL})"
    from mocobench.mmseg_compat import build_resnet_backbone

    with contextlib.redirect_stdout(io.StringIO()):
        # mmengine prints "Loads checkpoint by local backend from path: <temporary name>";
        # what loaded is checked below, key by key.
        model = build_resnet_backbone(archs.depth(bb.arch), checkpoint=str(pth_path), prefix=MMSEG_PREFIX)
    model.eval()
    _refuse_unless_loaded("MMSegmentation", model.state_dict(), bb.state_dict)
    x = _input()
    ours = torchvision_stages(bb, x)
    with torch.no_grad():
        theirs = model(x)
    text, diffs = _compare(["stage1", "stage2", "stage3", "stage4"], ours, theirs, "MMSegmentation")
    return diffs, (f"MMSegmentation ResNet(depth={archs.depth(bb.arch)}, style='pytorch') via init_cfg "
                   f"Pretrained prefix '{MMSEG_PREFIX}': all {len(model.state_dict())} tensors loaded; "
                   f"max abs diff vs torchvision: {text}")
