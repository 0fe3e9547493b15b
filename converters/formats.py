"""What each written format holds: the facts the writers write, the loader recognises and the
verification checks, kept in one place so that those three never import each other in a circle.

Imports: archs, names <- formats <- loader <- verify <- writers. (So `bb` below, a
converters.loader.Backbone, is not annotated: importing loader here would close a circle.)
"""
from mocobench.errors import UserError
from converters import archs
from converters.names import tv_to_d2

MMSEG_FORMAT = "moco-bench.mmseg/1"  # meta.format of the files `python -m converters mmseg` writes
MMSEG_PREFIX = "backbone."
D2_AUTHOR = "moco-bench"
TORCHVISION_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                             "input_format": "RGB"}


def detectron2_settings(bb) -> dict:
    """The Detectron2 config values under which torchvision-layout weights compute what
    torchvision computes: stride in the 3x3 conv (STRIDE_IN_1X1 False), RGB input in 0-255
    normalised with the pretraining mean/std (times 255), and the arch's depth/groups/width."""
    norm = bb.meta.get("normalization") or TORCHVISION_NORMALIZATION
    _, _, groups, width = archs.ARCHS[bb.arch]
    depth = archs.depth(bb.arch)
    return {
        "INPUT.FORMAT": "RGB",
        "MODEL.PIXEL_MEAN": [round(255 * m, 3) for m in norm["mean"]],
        "MODEL.PIXEL_STD": [round(255 * s, 3) for s in norm["std"]],
        "MODEL.RESNETS.DEPTH": depth,
        "MODEL.RESNETS.STRIDE_IN_1X1": False,
        "MODEL.RESNETS.RES2_OUT_CHANNELS": 64 if depth in (18, 34) else 256,
        "MODEL.RESNETS.NUM_GROUPS": groups,
        "MODEL.RESNETS.WIDTH_PER_GROUP": width,
    }


def detectron2_state_dict(bb) -> dict:
    """Backbone -> {Detectron2 name: float32 ndarray}, without BN num_batches_tracked.

    The counters are dropped on purpose. Detectron2's default norm, FrozenBN, has no
    num_batches_tracked, so keeping them (as MoCo's converter does) logs 53 unused keys for a
    R50; with NORM BN/SyncBN and FREEZE_AT 0 (MoCo's detection configs) torch's BatchNorm loader
    fills a missing counter itself, so both load cleanly. Only BN stages frozen by FREEZE_AT > 0
    (converted to FrozenBN that keeps a counter) log them as missing: harmless, as eval-mode and
    frozen BN never read the counter. DetectionCheckpointer drops them too for pycls files.
    """
    out = {}
    for key, value in bb.state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        name = tv_to_d2(key)
        if name is None or name in out:
            raise UserError(f"cannot name {key!r} in Detectron2 terms; this is a bug, please report it")
        out[name] = value.detach().cpu().numpy().copy()
    return out


def detectron2_expected(arch: str) -> dict:
    """{Detectron2 name: shape} of every backbone tensor of `arch` (no BN counters)."""
    return {tv_to_d2(k): s for k, s in archs.expected_shapes(arch).items()
            if not k.endswith("num_batches_tracked")}
