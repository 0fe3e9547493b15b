"""Configs are data: nested dataclasses that declare every field once with its
default, read from YAML and overridden with dotted ``key=value`` arguments.

    cfg = load_config(PretrainConfig, "configs/pretrain/demo.yaml", ["train.epochs=2"])

A YAML file may name one ``_base_`` file (relative to itself) whose values it
overrides; no deeper inheritance, so a config can always be read in two files.
Unknown keys, badly typed values and values outside a field's declared range are
refused in one line. A field declares its range with ``setting``:

    batch_size: int = setting(256, ge=1)        # global batch
    amp: str = setting("none", choices=("none", "bf16", "fp16"))
    crop_scale: list[float] = setting([0.2, 1.0], length=2, gt=0, le=1)  # rules apply per item
"""
import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml

from mocobench.errors import UserError


_RULES = {
    "ge": (lambda v, r: v >= r, "at least {}"),
    "gt": (lambda v, r: v > r, "more than {}"),
    "le": (lambda v, r: v <= r, "at most {}"),
    "lt": (lambda v, r: v < r, "less than {}"),
    "choices": (lambda v, r: v in r, "one of {}"),
}


def setting(default, **rules):
    """A dataclass field with a default (copied for lists and dicts) and value rules:
    ge / gt / le / lt (numbers), choices (a tuple), length (of a list). For a list the
    number and choice rules apply to every item. Checked whenever a config is built."""
    unknown = set(rules) - set(_RULES) - {"length"}
    if unknown:
        raise TypeError(f"unknown rules {sorted(unknown)}")
    meta = {"rules": rules}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_rules(cfg, prefix: str = "") -> None:
    """Refuse, in one line, the first value of `cfg` (recursively) outside its field's rules."""
    for f in dataclasses.fields(cfg):
        value, where = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_rules(value, where + ".")
            continue
        rules = f.metadata.get("rules", {})
        if not rules or value is None:
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        if "length" in rules and isinstance(value, (list, tuple)) and len(value) != rules["length"]:
            raise UserError(f"{where}={value!r} must have {rules['length']} items; fix the config "
                            "or override it")
        for item in items:
            for name, bound in rules.items():
                if name == "length":
                    continue
                ok, words = _RULES[name]
                if not ok(item, bound):
                    shown = ", ".join(map(str, bound)) if name == "choices" else bound
                    raise UserError(f"{where}={value!r} is not allowed: it must be "
                                    f"{words.format(shown)}; fix the config or override it")


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(value, annotation, where: str):
    """Check `value` (already YAML-parsed) against a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if arg is type(None) and value is None:
                return None
        errors = []
        for arg in typing.get_args(annotation):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list such as [1, 2], got {value!r}")
        (item,) = typing.get_args(annotation)[:1] or (typing.Any,)
        items = [_coerce(v, item, where) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is typing.Any:
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a section (mapping), got {value!r}")
        return from_dict(annotation, value, where + ".")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads 5e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if annotation in (int, float, str, bool) and not (
        isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
    ):
        raise UserError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, refusing unknown keys."""
    hints = typing.get_type_hints(cls)
    names = _field_names(cls)
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known: {', '.join(names)}"
            raise UserError(f"unknown config key {prefix}{key}{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    cfg = cls(**kwargs)
    if not prefix:  # once, from the top: nested sections are checked with their full names
        check_rules(cfg)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def merge(base: dict, over: dict) -> dict:
    """A deep copy of `base` with `over` merged in, section by section."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def configs_dir() -> Path:
    """The suite's configs: the copy shipped in the installed package (mocobench/configs),
    else the checkout's top-level configs/ folder."""
    here = Path(__file__).resolve().parent
    shipped = here / "configs"
    return shipped if shipped.is_dir() else here.parent / "configs"


def find_config(path) -> Path:
    """`path` itself when it exists; else, for a path starting with configs/ (the way the
    README, the bench configs and the docs name them), the suite's own copy of that file,
    so the shipped configs work after `pip install` from any working directory."""
    path = Path(path).expanduser()
    if path.exists() or path.is_absolute() or not path.parts or path.parts[0] != "configs":
        return path
    shipped = configs_dir().joinpath(*path.parts[1:])
    return shipped if shipped.exists() else path


def read_mapping(path, hint: str = "") -> dict:
    """The YAML mapping in `path`, or one line saying why it is not one."""
    path = find_config(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass an existing YAML file to --config{hint}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (UnicodeDecodeError, ValueError) as e:  # a binary file; YAML's reader errors too
        raise UserError(f"config file {path} is not a text YAML file ({type(e).__name__}); "
                        "pass the YAML config, not a checkpoint or archive") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return data


def read_yaml(path) -> dict:
    path = find_config(path)
    data = read_mapping(path)
    base = data.pop("_base_", None)
    if base:
        base_data = read_yaml(path.parent / base)
        if "_base_" in base_data:
            raise UserError(f"{path}: its _base_ {base} has a _base_ itself; one level only")
        data = merge(base_data, data)
    return data


def parse_overrides(overrides: list[str]) -> dict:
    """['train.epochs=2', 'model.arch=resnet18'] -> nested dict with YAML-typed values."""
    out: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value (e.g. train.epochs=2)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise UserError(f"override {item!r}: the value is not valid YAML "
                            f"({str(e).splitlines()[0]}); quote it or fix the brackets") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} conflicts with another override of {part}")
        node[parts[-1]] = value
    return out


def load_config(cls, path=None, overrides: list[str] | None = None):
    data = read_yaml(path) if path else {}
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def save_config(cfg, path) -> None:
    from mocobench.fileio import atomic_write

    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
