"""Comparison tables from results: one per task and protocol.

A table holds the results of ONE protocol (transfer/report_protocol.py: table_key): rows are
pretrainings (the weights label), columns the task's metrics. Runs that share a label are one
row: mean ± sample std over them, with their count and kind (fine-tuning seeds: same weights,
another seed; pretraining runs: other weights). Each cell of a row with per-example outcomes
carries its 95% test-set bootstrap CI, and its difference to the table's baseline row with the
PAIRED bootstrap CI of that difference (transfer/report_uncertainty.py) and, where both rows
have several runs, Welch's t-test across them; a delta whose CI contains 0 (or whose seed test
gives p >= 0.05) is marked ``n.s.``. Published numbers (transfer/paper_numbers.py) join a
table only when its protocol matches theirs on every defining field.

Tables are plain dicts (the report's json format); ``cell_text`` is how every text format
shows a cell.
"""
import math
import statistics
from dataclasses import dataclass, field

from mocobench.errors import UserError
from transfer import report_protocol as rp
from transfer.paper_numbers import ANCHORS
from transfer.results import canonical_metric
from transfer.uncertainty import welch_p

# Columns in the paper's order. Mask columns only appear when some result has them.
TASK_METRICS = {
    "linear": ["top1", "top5"],
    "knn": ["knn_top1"],
    "detect": ["AP50", "AP", "AP75", "mask_AP50", "mask_AP", "mask_AP75"],
    "segment": ["mIoU", "mAcc", "aAcc"],
}
TASK_ORDER = list(TASK_METRICS)
HEADERS = {"top1": "top-1", "top5": "top-5", "knn_top1": "kNN top-1",
           "mask_AP": "mask AP", "mask_AP50": "mask AP50", "mask_AP75": "mask AP75"}
NO_VALUE = "—"  # a metric this row does not report (e.g. top-5 the paper did not publish)
SIGNIFICANCE = 0.05  # the seed test's level, matching the 95% intervals


@dataclass
class Options:
    baseline: str | None = None   # the label deltas are relative to (default: "supervised...")
    digits: int = 1
    paper: bool = True            # published rows where the protocol matches
    bootstrap: int = 1000         # redraws per interval; 0: no intervals
    seed: int = 0                 # of the redraws


@dataclass
class Row:
    label: str
    kind: str = "ours"                                 # "ours" | "paper"
    runs: list = field(default_factory=list)           # results records with status ok
    not_ok: list = field(default_factory=list)         # records with status missing / failed
    published: dict = field(default_factory=dict)      # metric -> (mean, std | None) (paper)

    @property
    def status(self) -> str:
        if self.kind == "paper" or self.runs:
            return "ok"
        return "missing" if any(r.get("status") == "missing" for r in self.not_ok) else "failed"

    def values(self, metric) -> list[float]:
        out = []
        for r in self.runs:
            got = {canonical_metric(k): v for k, v in r["metrics"].items()}
            if metric in got:
                out.append(float("nan") if got[metric] is None else float(got[metric]))
        return out

    def stat(self, metric):
        """(mean, std or None, n) of a metric, or None when this row lacks it."""
        if self.kind == "paper":
            if metric not in self.published:
                return None
            mean, std = self.published[metric]
            return mean, std, None
        vals = self.values(metric)
        if not vals:
            return None
        if not all(math.isfinite(v) for v in vals):
            return float("nan"), None, len(vals)
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)

    def variance(self) -> str:
        """What the row's runs vary: '1 run', '3 fine-tuning seeds', '3 pretraining runs'..."""
        n = len(self.runs)
        if self.kind == "paper" or n == 0:
            return "published" if self.kind == "paper" else "0 runs"
        weights = {r["weights"]["sha256"] for r in self.runs}
        if n == 1:
            return "1 run"
        if weights == {None}:
            return f"{n} seeds"
        if len(weights) == 1:
            return f"{n} fine-tuning seeds"
        if len(weights) == n:
            return f"{n} pretraining runs"
        return f"{n} runs of {len(weights)} pretrainings"


def _rank(label: str) -> tuple:
    low = label.casefold()  # the paper's order: random init, supervised, then the rest
    return (0 if low.startswith("random") else 1 if low.startswith("supervised") else 2, low)


def _fmt(x: float, digits: int, sign: bool = False) -> str:
    if not math.isfinite(x):
        return "nan"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _delta(mean: float, base: float, digits: int) -> float | None:
    """Difference of the printed (rounded) numbers, like the paper's tables."""
    if not (math.isfinite(mean) and math.isfinite(base)):
        return None
    d = round(round(mean, digits) - round(base, digits), digits)
    return 0.0 if d == 0 else d


def cell_text(cell: dict, digits: int) -> str:
    """`55.9±0.2 [55.1, 56.7] (+2.4 [+1.9, +2.9], p=0.01)`; `(+0.3 [-0.2, +0.8] n.s.)`."""
    if cell.get("mean") is None:
        return cell["text"]
    text = _fmt(cell["mean"], digits)
    if cell.get("std") is not None:
        text += f"±{_fmt(cell['std'], digits)}"
    if cell.get("ci"):
        text += f" [{_fmt(cell['ci'][0], digits)}, {_fmt(cell['ci'][1], digits)}]"
    if cell.get("delta") is None:
        return text
    inner = _fmt(cell["delta"], digits, sign=True)
    if cell.get("delta_ci"):
        lo, hi = cell["delta_ci"]
        inner += f" [{_fmt(lo, digits, True)}, {_fmt(hi, digits, True)}]"
    if cell.get("seed_p") is not None:
        inner += f", p={cell['seed_p']:.2g}"
    if cell.get("significant") is False:
        inner += " n.s."
    return f"{text} ({inner})"


def _significant(delta_ci, seed_p) -> bool | None:
    """Not significant when the paired CI contains 0 or the seed test does not reject."""
    if delta_ci is None and seed_p is None:
        return None
    if delta_ci is not None and delta_ci[0] <= 0 <= delta_ci[1]:
        return False
    return seed_p is None or seed_p < SIGNIFICANCE


# ----------------------------------------------------------------------------- grouping

def _rows(records) -> list[Row]:
    """One row per label; a label whose ok runs are weights of different methods or archs (as
    their results record them) is one row per method and arch instead, each named after it:
    averaging those would be a number of no pretraining. Several seeds of one method stay one row."""
    kinds = _kinds(records)
    rows = {}
    for r in records:
        label = _label(r)
        if len(kinds.get(label, ())) > 1:
            label = f"{label} [{_what(r)}]"
        row = rows.setdefault(label, Row(label=label))
        (row.runs if r.get("status", "ok") == "ok" else row.not_ok).append(r)
    return sorted(rows.values(), key=lambda row: _rank(row.label))


def _label(record) -> str:
    w = record["weights"]
    return str(w.get("label") or w.get("path") or "random init")


def _what(record) -> str:
    """The method and arch the weights record names (results written before they were
    recorded name neither)."""
    w = record["weights"]
    return ", ".join(str(w[k]) for k in ("method", "arch") if w.get(k)) or "method not recorded"


def _kinds(records) -> dict:
    """{label: {method and arch of its ok runs}}."""
    kinds = {}
    for r in _ok(records):
        kinds.setdefault(_label(r), set()).add(_what(r))
    return kinds


def _split_note(records) -> list[str]:
    kinds = _kinds(records)
    return [f"label {label!r} names weights of {len(k)} different methods or archs "
            f"({'; '.join(sorted(k))}): one row each; give each pretraining its own --label"
            for label, k in kinds.items() if len(k) > 1]


def group_tables(records) -> list[list[dict]]:
    """The records of each table. A run that produced nothing (missing weights, a failed
    stage) joins the tables of its task on its data set (every table of its task when it
    never got as far as a data set), so that it shows where it would have been."""
    tables = {}
    for r in records:
        if r.get("status", "ok") == "ok":
            tables.setdefault(rp.table_key(r), []).append(r)
    for r in records:
        if r.get("status", "ok") == "ok":
            continue
        name = r["dataset"]["name"]
        homes = [recs for (task, *_), recs in tables.items() if task == r["task"]
                 and (not name or any(x["dataset"]["name"] == name for x in _ok(recs)))]
        for recs in homes:
            recs.append(r)
        if not homes:
            tables.setdefault((r["task"], "", r["dataset"]["name"]), []).append(r)
    order = sorted(tables, key=lambda k: (TASK_ORDER.index(k[0]) if k[0] in TASK_ORDER else 99, k[0],
                                          _dataset(tables[k]), _protocol(tables[k]).get("name", ""), k))
    return [tables[k] for k in order]


def _ok(records) -> list[dict]:
    return [r for r in records if r.get("status", "ok") == "ok"]


def _protocol(records) -> dict:
    ok = _ok(records)
    return ok[0]["protocol"] if ok else {}


def _dataset(records) -> str:
    ok = _ok(records) or records
    return ok[0]["dataset"]["name"]


# ----------------------------------------------------------------------------- one table

def _metrics(task, rows) -> list[str]:
    known = TASK_METRICS.get(task, [])
    present = {canonical_metric(m) for row in rows for r in row.runs for m in r["metrics"]}
    ordered = [m for m in known if m in present] + sorted(present - set(known))
    return ordered or [m for m in known if not m.startswith("mask_")]


def _supervised(row) -> bool:
    """A label starting with "supervised" ("runs/supervised_r50": a default label is folder/stem,
    transfer.results.default_label), or weights recorded as supervised pretraining."""
    names = (row.label.casefold(), row.label.rsplit("/", 1)[-1].casefold())
    return any(n.startswith("supervised") for n in names) \
        or any(r["weights"].get("method") == "supervised" for r in row.runs)


def _baseline(rows, wanted) -> tuple[Row | None, list[str]]:
    if wanted is not None:
        base = next((r for r in rows if r.label.casefold() == wanted.casefold()), None)
        why = f"no row labelled {wanted!r}"
    else:
        supervised = [r for r in rows if _supervised(r)]
        # a missing supervised row gives way to one with results; if none has any, the note says why
        base = next((r for r in supervised if r.status == "ok"), supervised[0] if supervised else None)
        why = "no row whose label starts with 'supervised' (nor supervised weights); pass --baseline LABEL"
    if base is None:
        return None, [f"no deltas: {why}"]
    if base.status != "ok":
        return None, [f"no deltas: baseline {base.label!r} is {base.status}"]
    return base, [f"baseline: {base.label}"]


# Metrics that are the spread of another one (few-shot's 95% half-width, low-shot's std over
# samples): a difference of two spreads is no comparison, so they get no delta.
SPREAD_SUFFIXES = ("_ci95", "_std")


def _cell(row, metric, base, boot, digits) -> dict:
    empty = {"mean": None, "std": None, "n": 0, "ci": None, "delta": None, "delta_ci": None,
             "seed_p": None, "significant": None}
    if row.status != "ok":
        return {**empty, "text": row.status}
    st = row.stat(metric)
    if st is None:
        return {**empty, "text": NO_VALUE}
    mean, std, n = st
    cell = {**empty, "mean": mean, "std": std, "n": n}
    if boot is not None and row.kind == "ours":
        cell["ci"] = boot.ci(row, metric)
    bst = base.stat(metric) if base is not None and base is not row else None
    if bst is not None and not metric.endswith(SPREAD_SUFFIXES):
        cell["delta"] = _delta(mean, bst[0], digits)
        if row.kind == "ours" and cell["delta"] is not None:
            cell["delta_ci"] = boot.delta_ci(row, base, metric) if boot is not None else None
            cell["seed_p"] = welch_p(row.values(metric), base.values(metric))
            cell["significant"] = _significant(cell["delta_ci"], cell["seed_p"])
    cell["text"] = cell_text(cell, digits)
    return cell


def _row_record(row, base, metrics, boot, digits) -> dict:
    return {"label": row.label, "kind": row.kind, "setting": "", "status": row.status,
            "is_baseline": base is row, "runs": len(row.runs), "variance": row.variance(),
            "seeds": sorted(r["seed"] for r in row.runs),
            "weights": sorted({str(r["weights"]["sha256"]) for r in row.runs}),
            "reasons": [r.get("reason", "") for r in row.not_ok],
            "paths": [r["_path"] for r in row.runs + row.not_ok if "_path" in r],
            "cells": {m: _cell(row, m, base, boot, digits) for m in metrics}}


def _published(task, protocol, wanted: bool) -> tuple[list[tuple[dict, Row]], list[str]]:
    """Published rows whose protocol matches this table's on every defining field; a note for
    each entry this protocol is named after but differs from, listing the fields."""
    if not wanted or not protocol:
        return [], []
    rows, notes = [], []
    for a in (a for a in ANCHORS if a["task"] == task):
        diffs = rp.differences(a["protocol"], protocol)
        if not diffs:
            for label, vals in a["rows"].items():
                pub = {m: (tuple(v) if isinstance(v, (list, tuple)) else (v, None)) for m, v in vals.items()}
                rows.append((a, Row(label=label, kind="paper", published=pub)))
            notes.append(f"published rows ({a['id']}): {a['source']}; their deltas are to "
                         f"{a['baseline'] or 'nothing (no published baseline)'}")
        elif a in rp.candidates(protocol, task, ANCHORS):
            why = ("this protocol was recorded by name only, so it cannot be checked against theirs"
                   if rp.is_legacy(protocol) else f"this protocol differs in {'; '.join(diffs)}")
            notes.append(f"no published rows ({a['id']}, {a['source']}): {why}")
    return rows, notes


def _variance_note(rows, boot, options) -> str:
    """Which sources of variance the table's ± and [lo, hi] cover."""
    ours = [r for r in rows if r.kind == "ours" and r.runs]
    several = [f"{r.label} over {r.variance()}" for r in ours if len(r.runs) > 1]
    single = [r.label for r in ours if len(r.runs) == 1]
    parts = []
    if several:
        parts.append("±: sample std over runs (" + "; ".join(several) + ")")
    if single:
        parts.append(f"1 run, no training-randomness estimate: {', '.join(single)}")
    if ours and all(len({x['weights']['sha256'] for x in r.runs}) == 1 for r in ours):
        parts.append("each row's weights are 1 pretraining run (no pretraining-seed estimate)")
    described = boot.describe() if boot is not None else None
    parts.append(described or ("no test-set interval (--bootstrap 0)" if not options.bootstrap
                               else "no test-set interval: no row has usable per-example outcomes"))
    return "uncertainty: " + "; ".join(parts)


def _status_notes(rows) -> list[str]:
    notes = []
    for row in rows:
        for r in row.not_ok:
            part = "" if row.status != "ok" else f"1 of {len(row.runs) + len(row.not_ok)} runs "
            notes.append(f"{row.label}: {part}{r.get('status')}: {r.get('reason', '')}")
        pairs = [(r["weights"]["sha256"], r["seed"]) for r in row.runs]
        if len(set(pairs)) < len(pairs):
            notes.append(f"{row.label}: several runs share weights and seed "
                         f"({sorted(r['seed'] for r in row.runs)}); they count as separate runs in mean±std")
    return notes


def _significance_note(out_rows) -> list[str]:
    marks = [c["significant"] for r in out_rows if r["kind"] == "ours" for c in r["cells"].values()
             if c["delta"] is not None]
    unknown = sorted({r["label"] for r in out_rows if r["kind"] == "ours"
                      for c in r["cells"].values() if c["delta"] is not None and c["significant"] is None})
    notes = []
    if marks and all(m is False for m in marks):
        notes.append("no significant difference from the baseline at this scale: every delta's "
                     "interval contains 0")
    if unknown:
        notes.append("deltas without an interval (significance unknown): " + ", ".join(unknown))
    return notes


def build_table(records, options: Options) -> dict:
    task, protocol = records[0]["task"], _protocol(records)
    rows = _rows(records)
    metrics = _metrics(task, rows)
    base, notes = _baseline(rows, options.baseline)
    boot = None
    if options.bootstrap and any(r.runs for r in rows):
        from transfer.report_uncertainty import TableBootstrap

        boot = TableBootstrap([r for r in rows if r.runs], base, metrics, options.bootstrap, options.seed)
    paper, paper_notes = _published(task, protocol, options.paper)
    out_rows = [_row_record(r, base, metrics, boot, options.digits) for r in rows]
    for a, row in paper:
        pbase = next((r for x, r in paper if x is a and r.label == a["baseline"]), None)
        out_rows.append({**_row_record(row, pbase, metrics, None, options.digits), "setting": a["id"]})
    notes = [_variance_note(rows, boot, options)] + notes + (boot.notes if boot else []) \
        + _split_note(records) + _status_notes(rows) + _significance_note(out_rows) + paper_notes
    dataset = _dataset(records)
    return {"kind": "results", "task": task, "dataset": dataset, "protocol": protocol,
            "protocol_id": protocol.get("id", ""),
            "title": " · ".join(x for x in (task, dataset or "no data set", protocol.get("name")) if x),
            "header": rp.describe(protocol) if protocol else [], "metrics": metrics,
            "headers": [HEADERS.get(m, m) for m in metrics], "rows": out_rows, "notes": notes,
            "digits": options.digits}


def _sibling_notes(tables) -> None:
    """Tables of one task and data set under different protocols: give each a distinct title
    and say which defining fields set it apart."""
    titles = [t["title"] for t in tables]
    for t in tables:
        if titles.count(t["title"]) > 1:
            t["title"] += f" [{t['protocol_id'][:8]}]"
    for t in tables:
        same = [u for u in tables if u is not t and u["task"] == t["task"] and u["dataset"] == t["dataset"]
                and u["protocol"] and t["protocol"]]
        for u in same:
            mine, theirs = (rp.flatten({k: p.get(k) for k in rp.DEFINING})
                            for p in (t["protocol"], u["protocol"]))
            fields = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            t["notes"].append(f"not comparable with the {u['protocol'].get('name')} "
                              f"[{u['protocol_id'][:8]}] table: differs in {', '.join(fields[:8])}"
                              + (f" and {len(fields) - 8} more" if len(fields) > 8 else ""))


def result_tables(records, baseline: str | None = None, digits: int = 1, paper: bool = True,
                  bootstrap: int = 1000, seed: int = 0) -> list[dict]:
    """One table (a plain dict, also the json format) per task and protocol."""
    if not 0 <= digits <= 4:
        raise UserError(f"--digits {digits} is out of range; use 0 to 4 (the paper uses 1)")
    if bootstrap < 0:
        raise UserError(f"--bootstrap {bootstrap} is negative; use 0 (off) or a number of redraws "
                        "such as 1000")
    options = Options(baseline, digits, paper, bootstrap, seed)
    tables = [build_table(recs, options) for recs in group_tables(records)]
    _sibling_notes(tables)
    ours = {r["label"] for t in tables for r in t["rows"] if r["kind"] == "ours"}
    if baseline is not None and baseline.casefold() not in {label.casefold() for label in ours}:
        raise UserError(f"--baseline {baseline!r} matches no row; labels found: {', '.join(sorted(ours))}")
    return tables
