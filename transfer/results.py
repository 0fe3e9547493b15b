"""The results file every transfer task writes, and the only thing `report` reads.

Schema (``DIR/results.json``, version 1)::

    {
      "schema": "moco-bench.results/1",
      "task": "linear" | "knn" | "detect" | "segment",
      "dataset": {"name": str, "splits": {split name: number of images}},
      "weights": {"path": str, "sha256": str, "label": str, "layout": str},
      "engine": str,           # e.g. "sklearn", "torch", "detectron2", "torchvision", "mmseg"
      "protocol": str,         # e.g. "fast", "paper", "voc_c4_24k", "demo"
      "config": {...},         # the resolved config, every value that was used
      "seed": int,
      "wall_time_s": float,
      "metrics": {name: float} # flat: top1/top5, knn_top1, AP/AP50/AP75, mIoU/mAcc/aAcc
      "created": ISO-8601 time, "git_sha": str | null,
      "status": "ok" | "missing" | "failed",  # optional, absent means "ok"
      "reason": str            # optional; required when status is not "ok"
    }

A row that could not be produced (e.g. the supervised ImageNet weights are not
on this machine, or the task crashed) is still written, with ``"metrics": {}``,
``status`` "missing" or "failed" and a one-line ``reason``, so ``report`` shows
it as such instead of silently dropping it.
"""
import datetime
import math
import subprocess
from pathlib import Path

from mocobench.errors import UserError
from mocobench.fileio import atomic_json, sha256_file

SCHEMA = "moco-bench.results/1"
STATUSES = ("ok", "missing", "failed")
REQUIRED = {
    "schema": str, "task": str, "dataset": dict, "weights": dict, "engine": str,
    "protocol": str, "config": dict, "seed": int, "wall_time_s": float, "metrics": dict,
}


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def weights_record(path, label: str | None = None, layout: str | None = None) -> dict:
    """Describe the evaluated weights; `path` None means random initialisation."""
    if path is None:
        return {"path": None, "sha256": None, "label": label or "random init", "layout": "random"}
    return {"path": str(path), "sha256": sha256_file(path), "label": label or Path(path).stem,
            "layout": layout}


def validate(record: dict, where: str = "results") -> dict:
    for key, kind in REQUIRED.items():
        if key not in record:
            raise UserError(f"{where}: missing field {key!r} of the results schema")
        value = record[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind):
            raise UserError(f"{where}: field {key!r} should be {kind.__name__}, got {type(value).__name__}")
    if record["schema"] != SCHEMA:
        raise UserError(f"{where}: schema {record['schema']!r} is not {SCHEMA!r}")
    for name, v in record["metrics"].items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise UserError(f"{where}: metric {name!r} is not a number: {v!r}")
    status = record.get("status", "ok")
    if status not in STATUSES:
        raise UserError(f"{where}: status {status!r} is not one of {', '.join(STATUSES)}")
    if status != "ok" and not isinstance(record.get("reason"), str):
        raise UserError(f"{where}: status {status!r} needs a 'reason' string saying what to do")
    for key in ("name", "splits"):
        if key not in record["dataset"]:
            raise UserError(f"{where}: dataset lacks {key!r}")
    for key in ("path", "sha256", "label"):
        if key not in record["weights"]:
            raise UserError(f"{where}: weights lacks {key!r}")
    return record


def write_results(out_dir, *, task: str, dataset: dict, weights: dict, engine: str,
                  protocol: str, config: dict, seed: int, wall_time_s: float,
                  metrics: dict, status: str = "ok", reason: str | None = None) -> Path:
    record = {
        "schema": SCHEMA, "task": task, "dataset": dataset, "weights": weights,
        "engine": engine, "protocol": protocol, "config": config, "seed": int(seed),
        "wall_time_s": float(wall_time_s),
        "metrics": {k: (float(v) if v is not None and math.isfinite(float(v)) else float("nan"))
                    for k, v in metrics.items()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
    }
    if status != "ok" or reason is not None:
        record["status"], record["reason"] = status, reason
    validate(record)
    path = Path(out_dir) / "results.json"
    atomic_json(record, path)
    return path


def read_results(path) -> dict:
    import json

    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; point report at folders holding results.json") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); re-run that task") from None
    return validate(record, str(path))
