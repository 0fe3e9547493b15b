"""Write a Backbone as a Detectron2 .pkl, an MMSegmentation .pth or a torchvision .pth.

Each writer checks the file it wrote before it becomes visible: the file is written to a
temporary name, read back, checked for exactly the expected keys and shapes of its depth (and,
with verify=True, loaded into the real consumer: see converters.verify), and only then renamed
over the output path. A failed check raises UserError and leaves no output behind.

Each returns a report: {"format", "path", "keys", "rows": [(what, count, example)], "checks": [str],
"max_abs_diff": {stage: float} from the library check, or None when it did not run}.
"""
import json
import pickle
from pathlib import Path

import numpy as np
import torch

from mocobench.errors import UserError
from mocobench.fileio import atomic_write
from converters import archs
from converters.loader import D2_AUTHOR, MMSEG_FORMAT, Backbone, check_backbone
from converters.names import tv_to_d2
from converters.reader import read_checkpoint

TORCHVISION_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                             "input_format": "RGB"}
MMSEG_PREFIX = "backbone."


def _plain(obj):
    """Only JSON-like values go into file metadata, so every reader (our restricted
    unpickler, torch.load(weights_only=True), mmengine) can load it."""
    return json.loads(json.dumps(obj, default=str))


def _meta(bb: Backbone) -> dict:
    keep = ("arch", "layout", "source", "method", "epoch", "image_size", "normalization", "git_sha")
    meta = {k: bb.meta[k] for k in keep if k in bb.meta}
    meta.update(arch=bb.arch, layout=bb.layout)
    meta.setdefault("normalization", TORCHVISION_NORMALIZATION)
    return _plain(meta)


def detectron2_settings(bb: Backbone) -> dict:
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


def _dropped_rows(bb: Backbone) -> list:
    order = ["head", "momentum encoder", "queue", "BN counters", "other"]
    dropped = sorted(bb.meta.get("dropped", {}).items(), key=lambda kv: order.index(kv[0]))
    rows = [(f"dropped: {cat}", len(keys), keys[0]) for cat, keys in dropped]
    if bb.meta.get("filled"):
        rows.append(("filled with 0 (absent in source)", len(bb.meta["filled"]), bb.meta["filled"][0]))
    return rows


def _report(fmt, path, out_keys, rows, checks, diffs):
    return {"format": fmt, "path": str(path), "keys": len(out_keys), "rows": rows, "checks": checks,
            "max_abs_diff": diffs}


def _not_same_file(bb: Backbone, out: Path):
    src = bb.meta.get("source")
    if src and Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
        raise UserError(f"output {out} is the input file; choose another output path")


# ----------------------------------------------------------------------------- Detectron2

def detectron2_state_dict(bb: Backbone) -> dict:
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
    return {tv_to_d2(k): s for k, s in archs.expected_shapes(arch).items()
            if not k.endswith("num_batches_tracked")}


def _check_d2_file(path, bb, model):
    obj = read_checkpoint(path).obj
    if not isinstance(obj, dict) or set(obj) < {"model", "__author__", "matching_heuristics"}:
        raise UserError(f"written file {path} lacks model/__author__/matching_heuristics; this is a bug")
    got = obj["model"]
    expected = detectron2_expected(bb.arch)
    _exact(got, expected, f"Detectron2 file for {bb.arch}")
    differ = [k for k in expected if not np.array_equal(got[k], model[k])]
    if differ:
        raise UserError(f"Detectron2 file differs from the source at {differ[0]} after writing; disk problem?")
    return f"key set: exactly the {len(expected)} Detectron2 keys of {bb.arch}, shapes and values match"


def to_detectron2(bb: Backbone, out, verify: bool = True) -> dict:
    """Write `{"model": {name: ndarray}, "__author__": "moco-bench", "matching_heuristics": True,
    "meta": {...}}` for DetectionCheckpointer. `out` must end in .pkl: that is how Detectron2
    recognises this format."""
    out = Path(out)
    if out.suffix != ".pkl":
        raise UserError(f"Detectron2 output {out} must end in .pkl (DetectionCheckpointer picks the "
                        f"format by extension)")
    _not_same_file(bb, out)
    model = detectron2_state_dict(bb)
    meta = _meta(bb)
    meta["detectron2_settings"] = detectron2_settings(bb)
    payload = {"model": model, "__author__": D2_AUTHOR, "matching_heuristics": True, "meta": meta}
    checks, diffs = [], None

    def write(tmp):
        nonlocal diffs
        with open(tmp, "wb") as f:
            pickle.dump(payload, f, protocol=4)
        checks.append(_check_d2_file(tmp, bb, model))
        if verify:
            from converters.verify import verify_detectron2
            diffs, line = verify_detectron2(bb, tmp)
            checks.append(line)

    atomic_write(out, write)
    n_counters = sum(k.endswith("num_batches_tracked") for k in bb.state_dict) - len(bb.meta.get("filled", []))
    rows = [("mapped to Detectron2 names", len(model), f"{bb.meta.get('example_key')} -> stem.conv1.weight")]
    rows += _dropped_rows(bb)
    if n_counters:
        rows.append(("dropped: BN num_batches_tracked (FrozenBN has none)", n_counters,
                     "bn1.num_batches_tracked"))
    return _report("detectron2", out, model, rows, checks, diffs)


# ----------------------------------------------------------------------------- MMSegmentation

def to_mmseg(bb: Backbone, out, verify: bool = True) -> dict:
    """Write `{"state_dict": {"backbone.<torchvision name>": tensor}, "meta": {...}}` for mmseg's
    plain ResNet (style='pytorch', not ResNetV1c, whose deep stem would stay random), loaded
    with init_cfg=dict(type='Pretrained', checkpoint=out, prefix='backbone.'), pretrained=None."""
    out = Path(out)
    if archs.ARCHS[bb.arch][2:] != (1, 64):
        raise UserError(f"MMSegmentation's plain ResNet has no grouped or widened blocks, so {bb.arch} "
                        f"cannot load into it; use a resnet18/34/50/101/152 checkpoint")
    _not_same_file(bb, out)
    sd = {MMSEG_PREFIX + k: v.clone() for k, v in bb.state_dict.items()}
    meta = _meta(bb)
    meta.update(format=MMSEG_FORMAT, mmseg_backbone=dict(type="ResNet", depth=archs.depth(bb.arch),
                                                         style="pytorch", pretrained=None),
                init_cfg=dict(type="Pretrained", prefix=MMSEG_PREFIX))
    checks, diffs = [], None

    def write(tmp):
        nonlocal diffs
        torch.save({"state_dict": sd, "meta": meta}, tmp)
        got = torch.load(tmp, map_location="cpu", weights_only=True)["state_dict"]
        if any(not k.startswith(MMSEG_PREFIX) for k in got):
            raise UserError(f"written mmseg file {tmp} has keys outside {MMSEG_PREFIX}; this is a bug")
        stripped = {k[len(MMSEG_PREFIX):]: v for k, v in got.items()}
        check_backbone(stripped, bb.arch, where="MMSegmentation file")
        _same_values(stripped, bb.state_dict, "MMSegmentation file")
        checks.append(f"key set: exactly the {len(got)} keys of torchvision {bb.arch} without fc, "
                      f"under {MMSEG_PREFIX}, shapes and values match")
        if verify:
            from converters.verify import verify_mmseg
            diffs, line = verify_mmseg(bb, tmp)
            checks.append(line)

    atomic_write(out, write)
    rows = [(f"mapped (prefixed {MMSEG_PREFIX})", len(sd), f"{bb.meta.get('example_key')} -> "
             f"{MMSEG_PREFIX}conv1.weight")] + _dropped_rows(bb)
    return _report("mmseg", out, sd, rows, checks, diffs)


# ----------------------------------------------------------------------------- torchvision

def to_torchvision(bb: Backbone, out, verify: bool = True) -> dict:
    """Write the backbone as a plain state dict: torchvision.models.<arch>() loads it with
    strict=False and only fc.weight/fc.bias missing."""
    out = Path(out)
    _not_same_file(bb, out)
    sd = {k: v.clone() for k, v in bb.state_dict.items()}
    checks = []

    def write(tmp):
        torch.save(sd, tmp)
        got = torch.load(tmp, map_location="cpu", weights_only=True)
        check_backbone(got, bb.arch, where="torchvision file")
        _same_values(got, bb.state_dict, "torchvision file")
        checks.append(f"key set: exactly the {len(got)} keys of torchvision {bb.arch} without fc, "
                      f"shapes and values match")
        if verify:
            import torchvision

            model = getattr(torchvision.models, bb.arch)()
            result = model.load_state_dict(got, strict=False)
            if sorted(result.missing_keys) != ["fc.bias", "fc.weight"] or result.unexpected_keys:
                raise UserError(f"torchvision.models.{bb.arch}() loads the file with missing "
                                f"{result.missing_keys[:3]} unexpected {result.unexpected_keys[:3]}")
            checks.append(f"torchvision.models.{bb.arch}(): loads with only fc.weight, fc.bias missing")

    atomic_write(out, write)
    rows = [("mapped (torchvision names)", len(sd), f"{bb.meta.get('example_key')} -> conv1.weight")]
    return _report("torchvision", out, sd, rows + _dropped_rows(bb), checks, None)


# ----------------------------------------------------------------------------- helpers

def _exact(got: dict, expected: dict, where: str):
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    wrong = [k for k in expected if k in got and tuple(got[k].shape) != expected[k]]
    for label, bad in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
        if bad:
            raise UserError(f"{where}: {len(bad)} {label} keys ({', '.join(bad[:3])}); refusing to write it")


def _same_values(got: dict, ref: dict, where: str):
    differ = [k for k in ref if not torch.equal(got[k], ref[k])]
    if differ:
        raise UserError(f"{where} differs from the source at {differ[0]} after writing; disk problem?")


CONVERTERS = {"detectron2": to_detectron2, "mmseg": to_mmseg, "torchvision": to_torchvision}
