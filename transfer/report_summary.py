"""The suite summary: one row per pretraining, one column per data set of a task's suite.

Results of one task under one protocol name on several data sets (the classification suite:
linear probes on cifar10, dtd, flowers102, ...) become one summary table: each column is a
data set's own table (so each column compares rows within ONE protocol) showing its headline
metric (the first one its protocol record defines, e.g. mean per-class accuracy for flowers,
11-point mAP for VOC07), then the mean over the columns and the average rank (1 = best; ties
share their mean rank, scipy.stats.rankdata). Mean and rank need a value in every column; a
row without is shown with "—" there. Intervals stay in each data set's own table.
"""
import numpy as np
from scipy import stats

from transfer.report_tables import HEADERS, NO_VALUE


def _headline(table) -> str:
    defined = list(table["protocol"].get("metric", {}))
    return next((m for m in defined if m in table["metrics"]), table["metrics"][0])


def _values(table, metric) -> dict:
    return {r["label"]: r["cells"][metric]["mean"] for r in table["rows"]
            if r["kind"] == "ours" and r["status"] == "ok" and r["cells"][metric]["mean"] is not None
            and np.isfinite(r["cells"][metric]["mean"])}


def _ranks(values: dict) -> dict:
    labels = sorted(values)
    ranks = stats.rankdata([-values[k] for k in labels])  # higher is better: rank 1
    return dict(zip(labels, (float(r) for r in ranks)))


def summary_table(task, name, tables, digits) -> dict:
    tables = sorted(tables, key=lambda t: (t["dataset"], t["protocol_id"]))
    datasets = [t["dataset"] for t in tables]
    columns, headers, per_column = [], [], []
    for t in tables:
        metric = _headline(t)
        key = f"{t['dataset']}:{t['protocol_id'][:8]}"
        shown = t["dataset"] + (f" [{t['protocol_id'][:8]}]" if datasets.count(t["dataset"]) > 1 else "")
        columns.append(key)
        headers.append(f"{shown} {HEADERS.get(metric, metric)}")
        per_column.append((key, metric, _values(t, metric)))
    labels = sorted({label for _, _, vals in per_column for label in vals})
    ranks = {key: _ranks(vals) for key, _, vals in per_column}
    rows = []
    for label in labels:
        cells = {key: _number(vals.get(label), digits) for key, _, vals in per_column}
        complete = all(label in vals for _, _, vals in per_column)
        mean = float(np.mean([vals[label] for _, _, vals in per_column])) if complete else None
        rank = float(np.mean([ranks[key][label] for key, _, _ in per_column])) if complete else None
        cells["mean"], cells["avg_rank"] = _number(mean, digits), _number(rank, 2)
        rows.append({"label": label, "kind": "ours", "status": "ok", "cells": cells, "mean": mean,
                     "avg_rank": rank})
    rows.sort(key=lambda r: (r["avg_rank"] is None, r["avg_rank"] or 0, r["label"]))
    notes = [f"columns: {', '.join(f'{h}' for h in headers)}; each is one protocol's table, "
             "with its intervals; mean over data sets of their headline metric, average rank "
             "(1 = best) among the rows with a value in every column"]
    if any(r["mean"] is None for r in rows):
        notes.append("no mean or rank for rows without a result in every column: "
                     + ", ".join(r["label"] for r in rows if r["mean"] is None))
    return {"kind": "summary", "task": task, "dataset": "suite", "protocol": {}, "protocol_id": "",
            "title": f"{task} suite · {name}: {len(tables)} data sets", "header": [],
            "metrics": columns + ["mean", "avg_rank"], "headers": headers + ["mean", "avg rank"],
            "rows": rows, "notes": notes, "digits": digits}


def _number(x, digits) -> dict:
    return {"mean": x, "text": NO_VALUE if x is None else f"{x:.{digits}f}"}


def suite_summaries(tables, digits: int) -> list[dict]:
    """A summary per (task, protocol name) whose results cover two data sets or more."""
    groups = {}
    for t in tables:
        if t["kind"] == "results" and t["protocol"] and t["metrics"]:
            groups.setdefault((t["task"], t["protocol"].get("name", "")), []).append(t)
    return [summary_table(task, name, ts, digits) for (task, name), ts in groups.items()
            if len({t["dataset"] for t in ts}) >= 2]
