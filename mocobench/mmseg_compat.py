"""The one place that imports MMSegmentation (mmseg + mmengine + mmcv) safely.

Everything else (``transfer.segment*``, the converters' numeric check) calls
``import_mmseg()`` lazily and never imports ``mmseg``/``mmcv`` before it, so the
rest of the suite works without them. This module is only that import shim; the
models and checks that use mmseg live next to their users (``transfer/segment_*.py``,
``converters/verify.py``).

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
                "mmcv==2.1.0 built from source (see docs/dependencies.md)")

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
