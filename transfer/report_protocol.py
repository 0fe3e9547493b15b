"""What a table measured: protocol identity, its header text, and published-number matching.

Results are compared only within one protocol: two results share a table exactly when
their ``protocol["id"]`` (transfer/results.py: protocol_record) is equal. A legacy record (read
from a results file of this suite's first version, whose protocol was a plain name: schedule
``{"legacy": True}``) knows only its name, task, engine and dataset; such records share a
table only when those and the name are equal, and never get published rows. Nothing writes
them any more.
"""
import math

LEGACY_SCHEDULE = {"legacy": True}
DEFINING = ("engine", "metric", "model", "schedule", "input", "dataset")  # all but the name
_LIST_SHOWN = 4  # longer lists are shown as "first..last (n values)"


def is_legacy(protocol: dict) -> bool:
    return protocol.get("schedule") == LEGACY_SCHEDULE


def table_key(record: dict) -> tuple:
    """The table a result belongs to: its task and protocol id (and name, for legacy ones)."""
    p = record["protocol"]
    return (record["task"], p.get("id", ""), p.get("name", "") if is_legacy(p) else "")


def flatten(value, prefix: str = "") -> dict:
    """{"schedule.lr": 0.02, ...}: nested mappings as dotted paths, lists kept whole."""
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def show(value) -> str:
    if isinstance(value, (list, tuple)):
        if len(value) > _LIST_SHOWN and all(isinstance(v, (int, float)) for v in value):
            return f"{show(value[0])}..{show(value[-1])} ({len(value)} values)"
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _fields(mapping: dict) -> str:
    return ", ".join(f"{k} {show(v)}" for k, v in flatten(mapping).items() if k) or "none recorded"


def describe(protocol: dict) -> list[str]:
    """The lines a table header shows: the protocol and every field that defines it."""
    name, engine = protocol.get("name") or "unnamed", protocol.get("engine") or "unknown engine"
    ds = protocol.get("dataset", {})
    splits = ", ".join(f"{k} {v}" for k, v in ds.get("splits", {}).items())
    data = f"dataset {ds.get('name') or 'unnamed'}" + (f": {splits}" if splits else "")
    if "classes" in ds:
        data += f"; {ds['classes']} classes"
    if ds.get("fingerprint"):
        data += f"; fingerprint {str(ds['fingerprint'])[:12]}"
    if is_legacy(protocol):
        return [f"protocol {name} ({engine}), recorded by name only: its schedule, input and "
                "metric definitions are unknown (re-run the task with this version to record them)",
                data]
    metric = "; ".join(f"{k}: {v}" for k, v in protocol.get("metric", {}).items()) or "none recorded"
    model = [f"model: {_fields(protocol['model'])}"] if protocol.get("model") else []
    return [f"protocol {name} [id {protocol.get('id', '?')}], engine {engine}",
            f"metric: {metric}", *model,
            f"schedule: {_fields(protocol.get('schedule', {}))}",
            f"input: {_fields(protocol.get('input', {}))}",
            data]


# ----------------------------------------------------------------------------- published rows

def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _leaves(value: dict, part: str) -> dict:
    """flatten(), without the leaves that are empty mappings (nothing recorded there)."""
    return {k: v for k, v in flatten(value, part).items() if v != {}}


def differences(spec: dict, protocol: dict) -> list[str]:
    """Every defining field where a run's protocol differs from a published one, as text.

    spec (transfer/paper_numbers.py) gives engine, metric (name -> a phrase the run's
    definition must contain, e.g. "11-point"), model (optional), schedule and input (values
    compared after flattening, numbers as numbers; with "complete" True the spec is the full
    published record, so a field recorded here but not there differs too), and dataset (split sizes compared as a multiset, because
    split names are the tool's, and the number of classes; the name is a label anyone can give
    a folder, so it is shown but not compared)."""
    if is_legacy(protocol):
        return ["the protocol was recorded by name only"]
    diffs = []
    if spec["engine"] != protocol.get("engine"):
        diffs.append(f"engine: {protocol.get('engine')} here, {spec['engine']} published")
    for metric, phrase in spec["metric"].items():
        mine = protocol.get("metric", {}).get(metric)
        if mine is None:
            diffs.append(f"metric {metric}: not defined here")
        elif phrase.lower() not in str(mine).lower():
            diffs.append(f"metric {metric}: {mine!r} here, published {phrase!r}")
    for part in ("model", "schedule", "input"):
        mine, published = _leaves(protocol.get(part, {}), part), _leaves(spec.get(part, {}), part)
        for path, want in published.items():
            if path not in mine:
                diffs.append(f"{path}: not recorded here, {show(want)} published")
            elif not _same(mine[path], want):
                diffs.append(f"{path}: {show(mine[path])} here, {show(want)} published")
        if spec.get("complete"):  # a full published record: what it lacks was not the paper's setting
            diffs += [f"{path}: {show(mine[path])} here, not published" for path in mine if path not in published]
    ds, want = protocol.get("dataset", {}), spec["dataset"]
    sizes = sorted(ds.get("splits", {}).values())
    if sizes != sorted(want["splits"].values()):
        diffs.append(f"dataset split sizes: {show(sizes)} here, "
                     f"{show(sorted(want['splits'].values()))} published")
    if ds.get("classes") != want["classes"]:
        diffs.append(f"dataset classes: {ds.get('classes', 'not recorded')} here, "
                     f"{want['classes']} published")
    return diffs


def candidates(protocol: dict, task: str, anchors: list) -> list:
    """Published entries about this protocol: same task, and the protocol's name is one of the
    entry's names (so a table says why a paper's numbers are not beside a run of its config)."""
    name = (protocol.get("name") or "").casefold()
    return [a for a in anchors if a["task"] == task and name in (n.casefold() for n in a["names"])]
