"""The results file every transfer task writes, and the only thing `report` reads.

Schema (``DIR/results.json``, version 2)::

    {
      "schema": "moco-bench.results/2",
      "task": "linear" | "knn" | "detect" | "segment" | ...,
      "dataset": {"name": str, "splits": {split name: number of images}, ...},
      "weights": {"path": str, "sha256": str, "label": str, "layout": str,
                  "method": str | null, "arch": str | null},   # method/arch: from the checkpoint
      "engine": str,           # e.g. "sklearn", "torch", "detectron2", "torchvision", "mmseg"
      "protocol": {...},       # what was measured, and how: see protocol_record below
      "outcomes": {"kind": str, "files": [str]},   # per-example outcomes beside results.json
                               # (transfer/outcomes.py); absent when the task kept none
      "config": {...},         # the resolved config, every value that was used
      "seed": int,             # the task's own seed (fine-tuning / probe / episodes)
      "wall_time_s": float,
      "metrics": {name: float | null}  # flat: top1/top5, knn_top1, AP/AP50/AP75, mIoU/...;
                               # null: undefined on this data (e.g. AP of a class without boxes)
      "created": ISO-8601 time, "git_sha": str | null,
      "status": "ok" | "missing" | "failed",  # optional, absent means "ok"
      "reason": str            # optional; required when status is not "ok"
    }

``protocol`` (see ``protocol_record``) is derived from the resolved run, never from a
config's file name: two results are compared only when their ``protocol["id"]`` is equal,
and published numbers are shown only beside a protocol that matches theirs field by field.

A row that could not be produced (e.g. the supervised ImageNet weights are not
on this machine, or the task crashed) is still written, with ``"metrics": {}``,
``status`` "missing" or "failed" and a one-line ``reason``, so ``report`` shows
it as such instead of silently dropping it; its protocol may be ``{}``.
"""
import datetime
import hashlib
import json
import math
import re
from pathlib import Path

from mocobench.errors import UserError
from mocobench.fileio import atomic_json, git_sha, sha256_file

SCHEMA = "moco-bench.results/2"
STATUSES = ("ok", "missing", "failed")
REQUIRED = {
    "schema": str, "task": str, "dataset": dict, "weights": dict, "engine": str,
    "protocol": dict, "config": dict, "seed": int, "wall_time_s": float, "metrics": dict,
}


# The fields of a protocol record; all but "name" define it (its "id" is their hash).
PROTOCOL_FIELDS = ("name", "task", "engine", "metric", "schedule", "input", "dataset")
OUTCOME_KINDS = ("classification", "detection", "segmentation")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def dataset_fingerprint(classes, splits: dict) -> str:
    """sha256 of the class names and of each split's members (file names, ids or indices,
    in the split's order): two runs on different images or class lists differ here even
    when names and sizes agree."""
    return _digest({"classes": [str(c) for c in classes],
                    "splits": {k: [str(m) for m in v] for k, v in sorted(splits.items())}})


def protocol_record(*, name: str, task: str, engine: str, metric: dict, schedule: dict,
                    input: dict, dataset: dict, model: dict | None = None) -> dict:
    """What a result was measured under, from the resolved run:

    name      short human name, shown in table headers ("fast", "voc_c4_24k", ...)
    task      the task
    engine    what computed it (and its metric code): detectron2, torchvision, mmseg, sklearn...
    metric    {metric name: its definition}, e.g. {"AP50": "VOC07 11-point AP at IoU 0.5"}
    schedule  every training value that changes the number: iterations or epochs, lr, batch,
              warmup, steps, l2 grid, k, ... (empty for kNN-like tasks without training); not
              the seed (runs that differ only in their seed are one protocol: report's rows
              aggregate them)
    input     train / test image sizes, crops, normalisation
    dataset   {"name", "splits": {split: size}, "classes": number, "fingerprint": see
              dataset_fingerprint} of the data actually read
    model     optional: what the task builds around the backbone when it changes the number,
              e.g. a detector's {"backbone": "build_resnet_fpn_backbone", "roi_heads": ...,
              "mask_on": true, "norm": "SyncBN"} (C4 and FPN runs are different protocols)

    Returns those fields plus "id", the hash of all but the name: results are comparable
    exactly when their ids are equal. (A record without "model" hashes as before it existed.)"""
    record = {"name": name, "task": task, "engine": engine, "metric": metric,
              "schedule": schedule, "input": input, "dataset": dataset}
    if model is not None:
        record["model"] = model
    record["id"] = _digest({k: v for k, v in record.items() if k != "name"})[:16]
    return record


def canonical_metric(name: str) -> str:
    """Detectron2-style ``bbox/AP``, ``segm/AP50`` -> ``AP``, ``mask_AP50``: one name per metric."""
    m = re.fullmatch(r"(bbox|box|segm|mask)[/_.](\w+)", name)
    if not m:
        return name
    return ("mask_" if m[1] in ("segm", "mask") else "") + m[2]


def default_label(path, meta: dict | None = None) -> str:
    """The row name of weights given no --label: what they are, from the checkpoint's own meta
    ("moco_v2 200ep", "supervised 50 steps"), else the file's folder and stem
    ("run3/model_final"): never the bare stem, which every pretraining shares
    (checkpoint_last)."""
    meta = meta or {}
    method = meta.get("method")
    if method:
        if meta.get("epoch"):
            return f"{method} {meta['epoch']}ep"
        if meta.get("step"):
            return f"{method} {meta['step']} steps"
        return str(method)
    path = Path(path)
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def weights_record(path, label: str | None = None, layout: str | None = None,
                   meta: dict | None = None) -> dict:
    """Describe the evaluated weights; `path` None means random initialisation. `meta`: what
    converters.load_backbone read about them (Backbone.meta); its method and arch are kept,
    so that report never merges weights of different methods or archs into one row."""
    if path is None:
        return {"path": None, "sha256": None, "label": label or "random init", "layout": "random"}
    meta = meta or {}
    return {"path": str(path), "sha256": sha256_file(path), "label": label or default_label(path, meta),
            "layout": layout, "method": meta.get("method"), "arch": meta.get("arch")}


def _kind(value) -> str:
    return "null" if value is None else "a number" if isinstance(value, (int, float)) \
        else f"a {type(value).__name__}"


def validate(record: dict, where: str = "results") -> dict:
    """Check every field `report` reads, with its type, so that a malformed file is one line
    naming the field, never a traceback or a silently wrong table."""
    for key, kind in REQUIRED.items():
        if key not in record:
            raise UserError(f"{where}: missing field {key!r} of the results schema")
        value = record[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"{where}: field {key!r} should be {kind.__name__}, got {_kind(value)}")
    if record["schema"] != SCHEMA:
        raise UserError(f"{where}: schema {record['schema']!r} is not {SCHEMA!r}")
    for name, v in record["metrics"].items():
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise UserError(f"{where}: metric {name!r} is not a number: {v!r}")
    status = record.get("status", "ok")
    if status not in STATUSES:
        raise UserError(f"{where}: status {status!r} is not one of {', '.join(STATUSES)}")
    if status != "ok" and not isinstance(record.get("reason"), str):
        raise UserError(f"{where}: status {status!r} needs a 'reason' string saying what to do")
    if status == "ok":
        _validate_protocol(record["protocol"], where)
    _validate_outcomes(record.get("outcomes"), where)
    _validate_dataset(record["dataset"], where, "dataset")
    for key in ("path", "sha256", "label"):
        if key not in record["weights"]:
            raise UserError(f"{where}: weights lacks {key!r}")
        if not isinstance(record["weights"][key], (str, type(None))):
            raise UserError(f"{where}: weights {key!r} should be a string or null, "
                            f"got {_kind(record['weights'][key])}")
    return record


def start_run(out_dir) -> Path | None:
    """Every task calls this once it holds its output folder's lock, before any work: an
    earlier run's results.json moves aside to results.previous.json, so a run that then fails
    leaves nothing that `report` could read as this run's result. Returns the moved file."""
    path = Path(out_dir) / "results.json"
    if not path.exists():
        return None
    previous = path.with_name("results.previous.json")
    path.replace(previous)
    return previous


def _validate_dataset(dataset: dict, where: str, field: str) -> None:
    if not isinstance(dataset.get("name"), str):
        raise UserError(f"{where}: {field} lacks a 'name' string")
    splits = dataset.get("splits")
    if not isinstance(splits, dict):
        raise UserError(f"{where}: {field} lacks 'splits', a mapping of split name to size, "
                        f"got {_kind(splits)}")
    for split, size in splits.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise UserError(f"{where}: {field} split {split!r} should have a number of images, "
                            f"got {size!r}")


def _validate_protocol(protocol: dict, where: str) -> None:
    missing = [k for k in (*PROTOCOL_FIELDS, "id") if k not in protocol]
    if missing:
        raise UserError(f"{where}: protocol lacks {', '.join(missing)}; re-run the task with "
                        "this version")
    for key in ("name", "task", "engine", "id"):
        if not isinstance(protocol[key], str):
            raise UserError(f"{where}: protocol {key!r} should be a string, got {_kind(protocol[key])}")
    for key in ("metric", "schedule", "input", "dataset", "model"):
        if key in protocol and not isinstance(protocol[key], dict):
            raise UserError(f"{where}: protocol {key!r} should be a mapping, got {_kind(protocol[key])}")
    _validate_dataset(protocol["dataset"], where, "protocol dataset")


def _validate_outcomes(outcomes, where: str) -> None:
    if outcomes is None:
        return
    if not (isinstance(outcomes, dict) and outcomes.get("kind") in OUTCOME_KINDS
            and isinstance(outcomes.get("files"), list)
            and all(isinstance(f, str) for f in outcomes["files"])):
        raise UserError(f"{where}: outcomes should be {{'kind': one of {', '.join(OUTCOME_KINDS)}, "
                        "'files': [str]}}; re-run that task")


def write_results(out_dir, *, task: str, dataset: dict, weights: dict, engine: str,
                  protocol: dict, config: dict, seed: int, wall_time_s: float,
                  metrics: dict, outcomes: dict | None = None, status: str = "ok",
                  reason: str | None = None) -> Path:
    """Validate and write out_dir/results.json atomically. `outcomes`: the record
    transfer.outcomes' savers return for the per-example file(s) written beside it."""
    record = {
        "schema": SCHEMA, "task": task, "dataset": dataset, "weights": weights,
        "engine": engine, "protocol": protocol, "config": config, "seed": int(seed),
        "wall_time_s": float(wall_time_s),
        "metrics": {k: (float(v) if v is not None and math.isfinite(float(v)) else None)
                    for k, v in metrics.items()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
    }
    if outcomes is not None:
        record["outcomes"] = outcomes
    if status != "ok" or reason is not None:
        record["status"], record["reason"] = status, reason
    validate(record)
    path = Path(out_dir) / "results.json"
    atomic_json(record, path)
    return path


def read_results(path) -> dict:
    path = Path(path)
    try:
        record = json.loads(path.read_text(), parse_constant=_refuse_constant)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; point report at folders holding results.json") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file; re-run that task") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}); check its permissions") from None
    except (json.JSONDecodeError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON ({getattr(e, 'msg', e)}); re-run that task") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} holds {_kind(record)}, not a results record; re-run that task")
    return validate(record, str(path))


def _refuse_constant(name):
    raise ValueError(f"{name} is not strict JSON")
