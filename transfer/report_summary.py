"""The suite summary: one row per pretraining, one column per data set of a task's suite.

Results of one task under one protocol name on several data sets (the classification suite:
linear probes on cifar10, dtd, ...) become one summary table: each column is a data set's own
table (so each column compares rows within ONE protocol) showing its headline metric (the first
one its protocol record defines), then the mean over the columns and the average rank (1 = best;
ties share their mean rank, scipy.stats.rankdata). Mean and rank need a value in every column; a
row without is shown with "—" there. Intervals stay in each data set's own table.

A summary only combines columns of one task, one engine and one headline metric definition (the
text its protocol record gives it): a VOC07 AP50 is not averaged with a COCO AP, nor a
Detectron2 number with a torchvision one. Tables of one protocol name that differ in those get
separate summaries (each needs two data sets or more; the tables left out are named in its
notes). A data set with two tables under the same key (e.g. two schedules) gets no summary,
and a note under its tables says why.
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


def _suite_key(table) -> tuple:
    """What the columns of one summary must share: task, protocol name, engine, headline metric
    and its definition."""
    protocol, metric = table["protocol"], _headline(table)
    return (table["task"], protocol.get("name", ""), protocol.get("engine", ""), metric,
            protocol.get("metric", {}).get(metric, ""))


def _split_suite(tables) -> tuple[list, list]:
    """-> (suites: [(key, tables)] of two data sets or more, one table each; tables whose data
    set has two tables under one key, which no summary may take one of)."""
    by_key, doubled = {}, []
    for t in tables:
        by_key.setdefault(_suite_key(t), []).append(t)
    suites = []
    for key, ts in by_key.items():
        datasets = [t["dataset"] for t in ts]
        twice = [t for t in ts if datasets.count(t["dataset"]) > 1]
        doubled += twice
        if not twice and len(set(datasets)) >= 2:
            suites.append((key, ts))
    return suites, doubled


def suite_summaries(tables, digits: int) -> list[dict]:
    """A summary per (task, protocol name, engine, headline metric definition) covering two
    data sets or more; see the module docstring for what is kept apart."""
    groups = {}
    for t in tables:
        if t["kind"] == "results" and t["protocol"] and t["metrics"]:
            groups.setdefault((t["task"], t["protocol"].get("name", "")), []).append(t)
    out = []
    for (task, name), ts in groups.items():
        suites, doubled = _split_suite(ts)
        for t in doubled:
            t["notes"].append(f"no {task} suite summary for {t['dataset']}: it has several tables with "
                              f"the same engine and headline metric ({' / '.join(_suite_key(t)[2:4])}) "
                              "under different protocols; compare them in their own tables")
        for (_, _, engine, metric, _), members in suites:
            left_out = sorted({f"{t['dataset']} [{t['protocol'].get('engine', '')} "
                               f"{_headline(t)}]" for t in ts if t not in members})
            summary = summary_table(task, f"{name} · {engine} {HEADERS.get(metric, metric)}", members, digits)
            if left_out:
                summary["notes"].append("not in this summary (another engine or headline metric "
                                        "definition): " + ", ".join(left_out))
            out.append(summary)
    return out
