"""The one place that imports MMSegmentation (mmseg + mmengine + mmcv) safely.

Everything else (``transfer.segment``, the converters' numeric check) calls
``import_mmseg()`` lazily and never imports ``mmseg``/``mmcv`` itself, so the
rest of the suite works without them.

Which mmcv, and why (docs/dependencies.md gives both routes, as tried):

* Pinned set: ``mmsegmentation==1.2.2 mmengine==0.10.7 mmcv-lite==2.1.0 ftfy regex``
  (mmseg 1.2.2 asserts 2.0.0rc4 <= mmcv < 2.2.0; ``ftfy``/``regex`` are imported
  unconditionally by mmseg but only listed in one of its extras).
* We depend on **mmcv-lite**: pure Python, installs from PyPI in seconds. The full
  ``mmcv`` has no wheels on PyPI for this torch; building it from source takes
  ~16 min on 2 cores and needs C++20 and setuptools<81 patches. Every model this
  suite runs (FCN / ASPP / UPer heads on a plain ResNet) uses no compiled op.
* mmseg imports ``mmcv.ops`` at import time (``mmseg/utils/mask_classification.py``),
  which loads the compiled ``mmcv._ext`` that mmcv-lite lacks. When -- and only
  when -- that extension is absent, we register a stand-in ``mmcv._ext`` whose
  functions raise a one-line UserError if a model ever calls one (deformable
  conv, PSAMask, CrissCross, CARAFE...). A full mmcv (real ``mmcv._ext``, e.g.
  on a GPU cluster) is never touched and is used as is.
* The stand-in's ``__spec__`` is ``ModuleSpec('mmcv._ext', None)``: ``pkgutil``
  then reports "no loader", so mmengine's ``mmcv_full_available()`` and mmcv's
  ``check_ops_exist()`` keep answering False instead of raising.

torch >= 2.6 loads with ``weights_only=True`` by default. The converted backbone
file is a plain dict of tensors and loads under that default (mmengine's Pretrained
init calls ``torch.load`` without arguments); nothing here turns the safety off.
Runner checkpoints are never reloaded: their message hub pickles HistoryBuffer
with ``getattr(HistoryBuffer, 'min')`` references, and allow-listing ``getattr``
would hand a crafted file arbitrary attribute access, i.e. defeat ``weights_only``.
So ``transfer segment`` refuses ``load_from``/``resume`` and evaluates the model
in memory right after training.

opencv (pulled by mmengine) needs the system libraries libGL.so.1 and
libgthread-2.0.so.0; on slim Debian images: ``apt-get install libgl1 libglib2.0-0``.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types

from mocobench.errors import UserError

INSTALL = ("pip install mmsegmentation==1.2.2 mmengine==0.10.7 mmcv-lite==2.1.0 ftfy regex "
           "(or: pip install 'moco-bench[segment]')")

# Torchvision-compatible ResNets in mmseg: `ResNet` is V1b (7x7 stem conv1/bn1,
# stride in the 3x3 conv when style='pytorch'), so its state-dict names are
# torchvision's. Its registered subclasses (ResNetV1c/V1d deep stem, ResNeXt
# groups) are not, nor is style='caffe' (stride in the 1x1 conv).
PLAIN_RESNET_DEPTHS = (18, 34, 50, 101, 152)
STAGE_CHANNELS = {18: (64, 128, 256, 512), 34: (64, 128, 256, 512),
                  50: (256, 512, 1024, 2048), 101: (256, 512, 1024, 2048),
                  152: (256, 512, 1024, 2048)}

_STAND_IN_NOTE = "stand-in registered by mocobench.mmseg_compat because mmcv-lite has no compiled ops"


class _MissingOps(types.ModuleType):
    """Stand-in for ``mmcv._ext``: any op name resolves (``ext_loader.load_ext``
    only checks the names exist) to a function that refuses to run."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise UserError(
                f"mmcv op {name!r} needs mmcv's compiled extension, which mmcv-lite lacks; "
                "use a config without deformable/PSA/CARAFE/CrissCross layers, or install the full "
                "mmcv==2.1.0 built from source (see mocobench/mmseg_compat.py)")

        missing.__name__ = name
        return missing


def has_compiled_ops() -> bool:
    """True when a real compiled ``mmcv._ext`` is installed (full mmcv)."""
    mod = sys.modules.get("mmcv._ext")
    if mod is not None:
        return not isinstance(mod, _MissingOps)
    try:
        return importlib.util.find_spec("mmcv._ext") is not None
    except (ImportError, ValueError):
        return False


def _register_stand_in_ops() -> None:
    if "mmcv._ext" in sys.modules or has_compiled_ops():
        return  # the real extension (or our stand-in) is already there
    ext = _MissingOps("mmcv._ext", _STAND_IN_NOTE)
    ext.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)
    sys.modules["mmcv._ext"] = ext
    sys.modules["mmcv"]._ext = ext


def import_mmseg():
    """Import mmseg with every submodule registered; return the ``mmseg`` module.

    Raises UserError (one line naming the fix) when mmseg, mmengine or mmcv is
    missing or at an incompatible version. Idempotent and cheap after the first call.
    """
    if "mmseg.models" in sys.modules and "mmseg.evaluation" in sys.modules:
        return sys.modules["mmseg"]
    for module, package in (("mmengine", "mmengine"), ("mmcv", "mmcv-lite (or mmcv)"),
                            ("ftfy", "ftfy"), ("regex", "regex")):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"segmentation needs {package}, which is not installed; {INSTALL}")
    if importlib.util.find_spec("mmseg") is None:
        raise UserError(f"segmentation needs MMSegmentation, which is not installed; {INSTALL}")
    importlib.import_module("mmcv")
    _register_stand_in_ops()
    try:
        mmseg = importlib.import_module("mmseg")
        from mmseg.utils import register_all_modules
    except AssertionError as e:  # mmseg's own mmcv/mmengine version assertions
        raise UserError(f"{str(e).strip()} ({INSTALL})") from None
    except ImportError as e:
        if "_ext" in str(e) or "undefined symbol" in str(e):
            raise UserError(
                f"mmcv's compiled ops fail to load ({e}); rebuild mmcv 2.1.0 against this torch, "
                "or uninstall mmcv and install mmcv-lite==2.1.0") from None
        raise
    # Populates the registries; the Runner's `default_scope='mmseg'` selects them.
    register_all_modules(init_default_scope=False)
    return mmseg


# --- the plain ResNet backbone --------------------------------------------------------------

def check_plain_resnet(backbone_cfg, where: str = "model.backbone") -> int:
    """Refuse, in one line, any backbone whose weights cannot come from a
    torchvision-layout ResNet checkpoint; return its depth.

    The classic trap is mmseg's default ``ResNetV1c``: its deep stem (``stem.*``) has
    no ``conv1``, so torchvision-style weights leave it random and mmengine only logs
    the missing keys.
    """
    cfg = dict(backbone_cfg)
    kind = str(cfg.get("type", "")).split(".")[-1]
    example = "use type='ResNet', style='pytorch' as in configs/segmentation/fcn_r50_d8_voc12aug_512x512_20k.py"
    if kind != "ResNet":
        why = (" (deep stem 'stem.*' has no conv1/bn1 and would stay randomly initialised)"
               if kind in ("ResNetV1c", "ResNetV1d") else "")
        raise UserError(f"{where}.type is {kind or None!r}, not the plain ResNet that torchvision-layout "
                        f"weights fit{why}; {example}")
    checks = [
        ("style", "pytorch", "style='caffe' puts the stride in the 1x1 conv, torchvision in the 3x3"),
        ("deep_stem", False, "a deep stem has no counterpart in torchvision weights"),
        ("avg_down", False, "avg_down changes the shortcut layout"),
        ("in_channels", 3, "torchvision ResNets take 3-channel RGB"),
        ("stem_channels", 64, "torchvision ResNets have a 64-channel stem"),
        ("base_channels", 64, "torchvision ResNets have 64 base channels"),
        ("dcn", None, "deformable convs are not in torchvision weights"),
        ("plugins", None, "plugins add layers torchvision weights lack"),
        ("pretrained", None, "the backbone weights come from --weights through init_cfg"),
    ]
    for key, want, why in checks:
        if key in cfg and cfg[key] != want and not (key == "stem_channels" and cfg[key] is None):
            raise UserError(f"{where}.{key}={cfg[key]!r} does not fit torchvision-layout weights ({why}); "
                            f"set {key}={want!r}")
    depth = cfg.get("depth")
    if depth not in PLAIN_RESNET_DEPTHS:
        raise UserError(f"{where}.depth={depth!r} is not one of {PLAIN_RESNET_DEPTHS}")
    return int(depth)


def resnet_backbone_cfg(depth: int = 50, checkpoint: str | None = None, prefix: str = "backbone.",
                        **overrides) -> dict:
    """mmseg config dict of the plain ResNet, loading `checkpoint` through init_cfg.

    Defaults are mmseg ResNet's (strides (1,2,2,2), BN), whose stage outputs equal
    torchvision's layer1..layer4; pass strides/dilations/norm_cfg for the dilated
    FCN-D8 geometry (strides (1,2,1,1), dilations (1,1,2,4), contract_dilation=True).
    """
    cfg = dict(type="ResNet", depth=depth, style="pytorch", pretrained=None,
               norm_cfg=dict(type="BN", requires_grad=True))
    if checkpoint is not None:
        cfg["init_cfg"] = dict(type="Pretrained", checkpoint=str(checkpoint), prefix=prefix)
    cfg.update(overrides)
    check_plain_resnet(cfg, "backbone")
    return cfg


def build_resnet_backbone(depth: int = 50, checkpoint: str | None = None,
                          prefix: str = "backbone.", **overrides):
    """Build mmseg's plain ``ResNet`` from its registry; with `checkpoint`, load it
    the way a segmentation run does (``init_cfg`` Pretrained + `prefix`, via
    ``init_weights()``). Returned in train mode, like any freshly built module.

    Used by the converters' numeric check: compare its outputs (eval mode) with the
    torchvision model's, and ``compare_backbone(module, expected)`` for the tensors.
    """
    import_mmseg()
    from mmseg.registry import MODELS

    model = MODELS.build(resnet_backbone_cfg(depth, checkpoint, prefix, **overrides))
    if checkpoint is not None:
        from mmengine.logging import MMLogger

        # Outside a Runner (no log file) mmengine prints one INFO record per
        # parameter; keep warnings such as missing keys, drop the rest.
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel("WARNING")
        try:
            model.init_weights()
        finally:
            logger.setLevel(level)
    return model


def compare_backbone(module, expected: dict) -> dict:
    """Compare every tensor of `module`'s state dict with `expected` (same names,
    e.g. a converted file's ``state_dict`` with its ``backbone.`` prefix stripped).

    Returns {"checked": n, "missing": [...], "differ": [...], "unexpected": [...]}:
    missing = in the module but not in `expected` (stays at its initialisation),
    differ = present but a different value, unexpected = in `expected` only.
    ``num_batches_tracked`` counters are skipped: they carry no learned value.
    """
    import torch

    own = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    ref = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(k for k in own if k not in ref)
    unexpected = sorted(k for k in ref if k not in own)
    differ = sorted(k for k in own if k in ref and not (
        own[k].shape == ref[k].shape and torch.equal(own[k].detach().cpu(), ref[k].detach().cpu().to(own[k].dtype))))
    return {"checked": len(own), "missing": missing, "differ": differ, "unexpected": unexpected}


def mmseg_state_dict(path, prefix: str = "backbone.") -> dict:
    """The backbone tensors of an mmseg-format file, prefix stripped, loaded with
    ``weights_only=True`` (the way mmengine's Pretrained init reads it)."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise UserError(f"{path} is not an mmseg checkpoint (a dict with 'state_dict'); "
                        "convert it with converters.to_mmseg")
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise UserError(f"{path} has no '{prefix}*' tensors; convert it with converters.to_mmseg")
    return out
