"""Read any checkpoint file's tensors without running anything the file contains.

    ckpt = read_checkpoint(path)                    # -> Checkpoint(obj, outside, ran_code)
    ckpt = read_checkpoint(path, allow_pickle=True) # may run the file's code, only if it must

A pickle (torch.save's data.pkl, a Detectron2 .pkl) names Python globals that unpickling
imports and calls. Here every file is unpickled by `SafeUnpickler`, whose `find_class` gives:

- the real object for the globals on `allowed()`: torch's own weights-only list (tensor and
  storage rebuilders, dtypes, devices), numpy's array/scalar/dtype rebuilders and a few plain
  data types (set, datetime, pathlib paths, ...). Calling them builds data, nothing else;
- for every other global an inert `Placeholder` class named after it: its module is never
  imported, nothing of it runs. A placeholder accepts any construction, state and items, and
  keeps them (it is a dict, so a custom mapping's items stay reachable). mmengine's
  MessageHub / HistoryBuffer, argparse.Namespace, config objects, numpy RandomState... come
  back as placeholders and the tensors beside them are read as usual.

Unpickling an object normally makes the class (NEWOBJ) and sets its state (BUILD): with a
placeholder both are inert. What makes loading a pickle run code is a *call* (REDUCE), as in
`__reduce__ = lambda self: (os.system, ("...",))`. A placeholder records such calls, and the
file is refused unless allow_pickle, naming the global it would call. allow_pickle also covers
files whose tensors only code outside the allow-list can rebuild (a custom tensor subclass, a
state dict inside an object built by its own __reduce__). Then, and only then, the file is
loaded by Python's own pickle, which runs whatever the file says: for files you trust.
"""
import _compat_pickle
import functools
import os
import pickle
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mocobench.errors import UserError

# Plain data constructors outside torch's list, safe to call with any arguments: they build a
# value and touch nothing else (no file system, no imports).
_DATA_TYPES = {
    "builtins": ("bytes", "frozenset", "slice", "range"),
    "collections": ("defaultdict",),
    "datetime": ("datetime", "date", "time", "timedelta", "timezone"),
    "pathlib": ("PurePosixPath", "PureWindowsPath", "PosixPath"),
}


@functools.lru_cache(maxsize=None)
def allowed() -> dict:
    """{"module.name": object} of the globals rebuilt for real; everything else is a placeholder."""
    import builtins
    import collections
    import datetime
    import pathlib

    import numpy as np
    from torch import _weights_only_unpickler

    out = dict(_weights_only_unpickler._get_allowed_globals())  # torch's weights_only=True list
    modules = {"builtins": builtins, "collections": collections, "datetime": datetime,
               "pathlib": pathlib}
    for module, names in _DATA_TYPES.items():
        for name in names:
            out[f"{module}.{name}"] = getattr(modules[module], name)
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    for prefix in ("numpy.core", "numpy._core"):  # files name whichever numpy wrote them
        out[f"{prefix}.multiarray._reconstruct"] = core.multiarray._reconstruct
        out[f"{prefix}.multiarray.scalar"] = core.multiarray.scalar
        out[f"{prefix}.numeric._frombuffer"] = core.numeric._frombuffer  # pickle protocol 5
    out["numpy.ndarray"], out["numpy.dtype"] = np.ndarray, np.dtype
    return out


# ----------------------------------------------------------------------------- placeholders

class Placeholder(dict):
    """Stands in for an object of a global outside the allow-list; `pickled_global` names it.

    Nothing here calls anything: construction keeps its arguments (`pickled_args`), pickle's
    BUILD keeps the state (`pickled_state`), list items are kept in `pickled_items`, dict items
    as the placeholder's own items. Hashable by identity, so it may be a key or set member."""

    pickled_global = "?"
    _calls = None  # the unpickler's list of called globals, set on each subclass

    def __new__(cls, *args, **kwargs):  # pickle's NEWOBJ: making the object, not calling it
        self = super().__new__(cls)
        self.pickled_args, self.pickled_kwargs = args, kwargs
        self.pickled_state, self.pickled_items = None, []
        return self

    def __init__(self, *args, **kwargs):  # only reached by a call (REDUCE, INST/OBJ with arguments)
        super().__init__()
        if self._calls is not None:
            self._calls.append(self.pickled_global)

    def __setstate__(self, state):
        self.pickled_state = state

    def append(self, item):
        self.pickled_items.append(item)

    def extend(self, items):
        self.pickled_items.extend(items)

    __hash__ = object.__hash__
    __eq__ = object.__eq__
    __ne__ = object.__ne__

    def __repr__(self):
        return f"<placeholder for {self.pickled_global}>"


@dataclass
class _Record:
    """What one load met: placeholder classes by global name, and the globals it called."""
    classes: dict = field(default_factory=dict)
    calls: list = field(default_factory=list)

    def placeholder(self, name: str) -> type:
        if name not in self.classes:
            self.classes[name] = type(f"Placeholder[{name}]", (Placeholder,),
                                      {"pickled_global": name, "_calls": self.calls})
        return self.classes[name]


def _is_placeholder_class(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, Placeholder)


class SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose globals are the allowed ones or inert placeholders (see the
    module docstring). `record` collects what was met; torch.load subclasses this (its
    pickle_module) and adds its own persistent_load for tensor storages."""

    record: _Record = None  # set per load by _pickle_module

    def find_class(self, module, name):
        # Python 2 / protocol < 3 names (__builtin__.getattr, copy_reg._reconstructor)
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in allowed():
            return allowed()[full]
        if full == "builtins.getattr":  # how protocol < 4 names a method: getattr(Class, "name")
            return self._getattr
        if full == "copyreg._reconstructor":  # protocol 0/1 objects: make one, call nothing
            return self._reconstructor
        return self.record.placeholder(full)

    def _getattr(self, obj, name, *default):
        if _is_placeholder_class(obj):
            return self.record.placeholder(f"{obj.pickled_global}.{name}")
        return self.record.placeholder("builtins.getattr")(obj, name)  # recorded as a call

    def _reconstructor(self, cls, base, state):
        if _is_placeholder_class(cls):
            obj = cls.__new__(cls)
            obj.pickled_state = state
            return obj
        return self.record.placeholder("copyreg._reconstructor")(cls, base, state)


def _pickle_module(record: _Record) -> types.ModuleType:
    """A pickle module for torch.load(pickle_module=...): its Unpickler and load are safe."""
    unpickler = type("SafeUnpickler", (SafeUnpickler,), {"record": record})
    module = types.ModuleType("converters.reader.safe_pickle")
    module.Unpickler = unpickler
    module.load = lambda f, **kwargs: unpickler(f, **kwargs).load()
    return module


# ----------------------------------------------------------------------------- reading files

@dataclass
class Checkpoint:
    """What a checkpoint file holds.

    obj: the unpickled object.
    outside: the globals it names outside the allow-list, sorted: inert placeholders in `obj`,
        unless ran_code.
    ran_code: True when the file was loaded by Python's own pickle (allow_pickle, and the file
        needed it), which imported and ran those globals.
    """
    obj: object
    outside: list
    ran_code: bool = False


def _first_line(why) -> str:
    text = str(why).strip()
    why = text.splitlines()[0] if text else type(why).__name__
    return why.split(". ")[0][:100]  # torch's messages run on for several sentences


def _corrupt(path, why) -> UserError:
    return UserError(f"checkpoint {path} is truncated or corrupt ({_first_line(why)}); "
                     f"re-download or re-save it")


def _names(names) -> str:
    names = list(dict.fromkeys(names))
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _would_run_code(path, calls) -> UserError:
    return UserError(f"checkpoint {path} would run code when loaded: its pickle calls {_names(calls)}; "
                     f"nothing was run. Load it only if you trust the file: pass --allow-pickle "
                     f"(allow_pickle=True), which runs that code")


def _needs_code(path, culprit, why) -> UserError:
    return UserError(f"checkpoint {path} holds objects that only their own code can rebuild "
                     f"({culprit}: {_first_line(why)}); nothing was run. If you trust the "
                     f"file, pass --allow-pickle (allow_pickle=True), which runs that code")


# What an unpickled object that is not what its placeholder pretends raises (e.g. torch's
# rebuild of a custom tensor type given a placeholder type); a truncated file raises others.
_REBUILD_ERRORS = (TypeError, AttributeError, ValueError, NotImplementedError)


def _safe_load(path: Path, zipped: bool, record: _Record):
    """The file's object, read with SafeUnpickler (what it meets goes into `record`)."""
    module = _pickle_module(record)
    if os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        raise UserError("TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, so torch.load refuses the converters' "
                        "reader (which runs no code either); unset it for this command")
    if zipped:
        # weights_only=False is what lets torch use our pickle_module (with weights_only=True
        # torch refuses any pickle_module); tensors still rebuild through torch's own
        # persistent_load, and every global goes through SafeUnpickler.find_class.
        obj = torch.load(path, map_location="cpu", pickle_module=module, weights_only=False)
    else:
        with open(path, "rb") as f:
            obj = module.Unpickler(f, encoding="latin1").load()  # latin1: Python 2 numpy pickles
        if isinstance(obj, int) and obj == torch.serialization.MAGIC_NUMBER:
            # torch's legacy (non-zip) format: its first pickle is the magic number
            obj = torch.load(path, map_location="cpu", pickle_module=module, weights_only=False)
    return obj


def _unsafe_load(path: Path, zipped: bool):
    """Python's own pickle: runs whatever the file says (allow_pickle only)."""
    try:
        if not zipped:
            with open(path, "rb") as f:
                obj = pickle.load(f, encoding="latin1")
            if not (isinstance(obj, int) and obj == torch.serialization.MAGIC_NUMBER):
                return obj
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"checkpoint {path} does not load with Python's pickle either "
                        f"({type(e).__name__}: {_first_line(e)}); re-download or re-save it") from None


def _torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())


def read_checkpoint(path, *, allow_pickle: bool = False) -> Checkpoint:
    """Read a torch.save file (zip or legacy) or a plain pickle without running its code.

    Refuses (UserError, one line) an empty, truncated or corrupt file, a TorchScript archive,
    a file whose pickle calls a global outside the allow-list, and one whose objects only
    their own code can rebuild; with allow_pickle the last two are loaded by Python's pickle.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path} ({e.strerror or e}); check the path and "
                        f"its permissions") from None
    if not head:
        raise _corrupt(path, "empty file")
    zipped = head == b"PK\x03\x04"  # torch.save's zip format
    record = _Record()
    try:
        if zipped and _torchscript(path):
            raise UserError(f"checkpoint {path} is a TorchScript archive (torch.jit.save), whose tensors "
                            f"come with code; load it with torch.jit.load where you trust it and save "
                            f"model.state_dict() with torch.save")
        obj = _safe_load(path, zipped, record)
    except UserError:
        raise
    except _REBUILD_ERRORS as e:
        if not record.classes:  # no placeholder involved: the file itself is broken
            raise _corrupt(path, e) from None
        if not allow_pickle:
            if record.calls:
                raise _would_run_code(path, record.calls) from None
            # the placeholder made last is the one being rebuilt when it failed
            raise _needs_code(path, list(record.classes)[-1], e) from None
        return Checkpoint(_unsafe_load(path, zipped), sorted(record.classes), ran_code=True)
    except Exception as e:  # EOFError, UnpicklingError, torch's zip RuntimeError, zipfile errors...
        raise _corrupt(path, e) from None
    outside = sorted(record.classes)
    if record.calls:
        if not allow_pickle:
            raise _would_run_code(path, record.calls)
        return Checkpoint(_unsafe_load(path, zipped), outside, ran_code=True)
    return Checkpoint(obj, outside)
