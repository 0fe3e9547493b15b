"""Write a Backbone as a Detectron2 .pkl, an MMSegmentation .pth or a torchvision .pth.

Each writer checks the file it wrote before it becomes visible: the file is written to a
temporary name, read back, checked for exactly the expected keys and shapes of its depth (and,
with verify=True, loaded into the real consumer: see converters.verify), and only then renamed
over the output path. A failed check raises UserError and leaves no output behind.

Before writing, the output's folder is prepared by mocobench.fileio.prepare_output (created,
a real write proven, room for the file checked), so an output that is a folder, read-only,
inside a regular file or on a full disk is one line. lock=True (the `python -m converters`
command) also takes that folder's lock; library callers (transfer tasks) write into folders
whose lock they hold already, and under torchrun a second node's converting rank must not
contend for it.

Each returns a report: {"format", "path", "keys", "rows": [(what, count, example)], "checks": [str],
"max_abs_diff": {stage: float} from the library check, or None when it did not run}.
"""
import contextlib
import json
import pickle
import shutil
from pathlib import Path

import torch

from mocobench.errors import UserError
from mocobench.fileio import atomic_write, prepare_output
from mocobench.state import compare_state
from converters import archs
from converters.formats import (D2_AUTHOR, MMSEG_FORMAT, MMSEG_PREFIX, TORCHVISION_NORMALIZATION,
                                detectron2_expected, detectron2_settings, detectron2_state_dict)
from converters.loader import Backbone
from converters.reader import read_checkpoint
from converters.verify import verify_detectron2, verify_mmseg


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


def _cannot_write(out: Path, e: Exception) -> UserError:
    why = getattr(e, "strerror", None)
    if not why:  # torch's zip writer hides the errno: "[enforce fail at inline_container.cc] ..."
        try:
            free = f"{shutil.disk_usage(out.parent).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        why = f"the write failed with {free}"
    return UserError(f"cannot write {out} ({why}); free disk space or choose another output path")


def _write(out: Path, bb: Backbone, lock: bool, save, check) -> None:
    """Write `out` atomically: save(tmp) writes the file, check(tmp) proves it before it is
    renamed into place. The folder is prepared first (see the module docstring)."""
    src = bb.meta.get("source")
    if src and Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
        raise UserError(f"output {out} is the input file; choose another output path")
    if out.is_dir():
        raise UserError(f"output {out} is a folder; give the file to write, e.g. {out / ('model' + out.suffix)}")
    need = sum(t.numel() * t.element_size() for t in bb.state_dict.values()) + 2**20  # + metadata
    held = prepare_output(out.parent, "converted weights", need_bytes=need, lock=lock)

    def write(tmp):
        try:
            save(tmp)
        except (OSError, RuntimeError) as e:  # RuntimeError: torch's zip writer on a full disk
            raise _cannot_write(out, e) from None
        check(tmp)

    with held or contextlib.nullcontext():
        try:
            atomic_write(out, write)
        except OSError as e:
            raise _cannot_write(out, e) from None


def _check_read_back(got: dict, shapes: dict, written: dict, what: str) -> None:
    """The file read back has exactly the keys and shapes of its arch, and the values written."""
    compare_state(got, shapes, values=False).refuse_unless_equal(what, then="refusing to write it")
    compare_state(got, written).refuse_unless_equal(
        f"{what} read back", then="it differs from what was written (disk problem?); refusing to write it")


# ----------------------------------------------------------------------------- Detectron2

def _check_d2_file(path, bb: Backbone, model: dict) -> str:
    obj = read_checkpoint(path).obj
    if not isinstance(obj, dict) or set(obj) < {"model", "__author__", "matching_heuristics"}:
        raise UserError(f"written file {path} lacks model/__author__/matching_heuristics; this is a bug")
    expected = detectron2_expected(bb.arch)
    _check_read_back(obj["model"], expected, model, f"Detectron2 file for {bb.arch}")
    return f"key set: exactly the {len(expected)} Detectron2 keys of {bb.arch}, shapes and values match"


def to_detectron2(bb: Backbone, out, verify: bool = True, lock: bool = False) -> dict:
    """Write `{"model": {name: ndarray}, "__author__": "moco-bench", "matching_heuristics": True,
    "meta": {...}}` for DetectionCheckpointer. `out` must end in .pkl: that is how Detectron2
    recognises this format."""
    out = Path(out)
    if out.suffix != ".pkl":
        raise UserError(f"Detectron2 output {out} must end in .pkl (DetectionCheckpointer picks the "
                        f"format by extension)")
    model = detectron2_state_dict(bb)
    meta = _meta(bb)
    meta["detectron2_settings"] = detectron2_settings(bb)
    payload = {"model": model, "__author__": D2_AUTHOR, "matching_heuristics": True, "meta": meta}
    checks, diffs = [], None

    def save(tmp):
        with open(tmp, "wb") as f:
            pickle.dump(payload, f, protocol=4)

    def check(tmp):
        nonlocal diffs
        checks.append(_check_d2_file(tmp, bb, model))
        if verify:
            diffs, line = verify_detectron2(bb, tmp)
            checks.append(line)

    _write(out, bb, lock, save, check)
    n_counters = sum(k.endswith("num_batches_tracked") for k in bb.state_dict) - len(bb.meta.get("filled", []))
    rows = [("mapped to Detectron2 names", len(model), f"{bb.meta.get('example_key')} -> stem.conv1.weight")]
    rows += _dropped_rows(bb)
    if n_counters:
        rows.append(("dropped: BN num_batches_tracked (FrozenBN has none)", n_counters,
                     "bn1.num_batches_tracked"))
    return _report("detectron2", out, model, rows, checks, diffs)


# ----------------------------------------------------------------------------- MMSegmentation

def to_mmseg(bb: Backbone, out, verify: bool = True, lock: bool = False) -> dict:
    """Write `{"state_dict": {"backbone.<torchvision name>": tensor}, "meta": {...}}` for mmseg's
    plain ResNet (style='pytorch', not ResNetV1c, whose deep stem would stay random), loaded
    with init_cfg=dict(type='Pretrained', checkpoint=out, prefix='backbone.'), pretrained=None."""
    out = Path(out)
    if archs.ARCHS[bb.arch][2:] != (1, 64):
        raise UserError(f"MMSegmentation's plain ResNet has no grouped or widened blocks, so {bb.arch} "
                        f"cannot load into it; use a resnet18/34/50/101/152 checkpoint")
    sd = {MMSEG_PREFIX + k: v.clone() for k, v in bb.state_dict.items()}
    meta = _meta(bb)
    meta.update(format=MMSEG_FORMAT, mmseg_backbone=dict(type="ResNet", depth=archs.depth(bb.arch),
                                                         style="pytorch", pretrained=None),
                init_cfg=dict(type="Pretrained", prefix=MMSEG_PREFIX))
    checks, diffs = [], None

    def check(tmp):
        nonlocal diffs
        got = torch.load(tmp, map_location="cpu", weights_only=True)["state_dict"]
        if any(not k.startswith(MMSEG_PREFIX) for k in got):
            raise UserError(f"written mmseg file {tmp} has keys outside {MMSEG_PREFIX}; this is a bug")
        stripped = {k[len(MMSEG_PREFIX):]: v for k, v in got.items()}
        _check_read_back(stripped, archs.expected_shapes(bb.arch), bb.state_dict, "MMSegmentation file")
        checks.append(f"key set: exactly the {len(got)} keys of torchvision {bb.arch} without fc, "
                      f"under {MMSEG_PREFIX}, shapes and values match")
        if verify:
            diffs, line = verify_mmseg(bb, tmp)
            checks.append(line)

    _write(out, bb, lock, lambda tmp: torch.save({"state_dict": sd, "meta": meta}, tmp), check)
    rows = [(f"mapped (prefixed {MMSEG_PREFIX})", len(sd), f"{bb.meta.get('example_key')} -> "
             f"{MMSEG_PREFIX}conv1.weight")] + _dropped_rows(bb)
    return _report("mmseg", out, sd, rows, checks, diffs)


# ----------------------------------------------------------------------------- torchvision

def _check_torchvision_load(arch: str, sd: dict) -> str:
    import torchvision

    result = getattr(torchvision.models, arch)().load_state_dict(sd, strict=False)
    if sorted(result.missing_keys) != ["fc.bias", "fc.weight"] or result.unexpected_keys:
        raise UserError(f"torchvision.models.{arch}() loads the file with missing "
                        f"{result.missing_keys[:3]} unexpected {result.unexpected_keys[:3]}")
    return f"torchvision.models.{arch}(): loads with only fc.weight, fc.bias missing"


def to_torchvision(bb: Backbone, out, verify: bool = True, lock: bool = False) -> dict:
    """Write the backbone as a plain state dict: torchvision.models.<arch>() loads it with
    strict=False and only fc.weight/fc.bias missing."""
    out = Path(out)
    sd = {k: v.clone() for k, v in bb.state_dict.items()}
    checks = []

    def check(tmp):
        got = torch.load(tmp, map_location="cpu", weights_only=True)
        _check_read_back(got, archs.expected_shapes(bb.arch), bb.state_dict, "torchvision file")
        checks.append(f"key set: exactly the {len(got)} keys of torchvision {bb.arch} without fc, "
                      f"shapes and values match")
        if verify:
            checks.append(_check_torchvision_load(bb.arch, got))

    _write(out, bb, lock, lambda tmp: torch.save(sd, tmp), check)
    rows = [("mapped (torchvision names)", len(sd), f"{bb.meta.get('example_key')} -> conv1.weight")]
    return _report("torchvision", out, sd, rows + _dropped_rows(bb), checks, None)


CONVERTERS = {"detectron2": to_detectron2, "mmseg": to_mmseg, "torchvision": to_torchvision}
