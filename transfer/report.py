"""python -m transfer report DIR... : comparison tables from results.json files.

Every ``results.json`` under the given folders is read through
``transfer.results.read_results`` (so it is validated) and nothing else is read.
Results are grouped into one table per task and dataset: rows are pretrainings
(the weights label), columns the task's metrics. As in the MoCo paper's tables,
each cell carries its difference to the baseline row, ``55.9 (+2.4)``; runs that
share a label (several seeds) become ``mean±std`` (sample std), ``55.9±0.2 (+2.4)``.

- Baseline: ``--baseline LABEL``, else the first row whose label starts with
  "supervised" and has results, else none (no deltas). Deltas are differences
  of the printed numbers, so a reader can check them against the table.
- Mixed engines or protocols in one table get an "engine / protocol" column, and
  each row is compared only with the baseline of its own engine / protocol.
- A result with status "missing" or "failed" (see transfer/results.py) is a row
  of "missing" / "failed" cells, with its reason under the table.
- Results measured with a protocol the MoCo papers published numbers for
  (transfer/paper_numbers.py) get the published rows beside them, labelled
  "paper: ...", with deltas to the paper's own supervised row.

Besides printing, it writes ``report.md`` (every table in GitHub format, with
what was compared) and one PNG bar chart per table into ``--output``.
"""
import argparse
import csv
import datetime
import io
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate

from mocobench.errors import UserError, cli
from mocobench.fileio import atomic_write
from transfer.paper_numbers import ANCHORS
from transfer.results import read_results

FORMATS = ("grid", "github", "latex", "csv", "json")

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


def canonical_metric(name: str) -> str:
    """Detectron2-style ``bbox/AP``, ``segm/AP50`` -> ``AP``, ``mask_AP50``."""
    m = re.fullmatch(r"(bbox|box|segm|mask)[/_.](\w+)", name)
    if not m:
        return name
    return ("mask_" if m[1] in ("segm", "mask") else "") + m[2]


# ---------------------------------------------------------------- reading

def find_results(dirs) -> list[Path]:
    """Every results.json under each of `dirs` (a results.json path is taken as is)."""
    found = {}
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise UserError(f"{d} does not exist; pass folders holding results.json files "
                            "(the --output of a transfer task or of bench)")
        paths = [d] if d.is_file() else sorted(d.rglob("results.json"))
        if not paths:
            raise UserError(f"no results.json under {d}; pass the --output folder of a "
                            "transfer task or of bench")
        for p in paths:
            found.setdefault(p.resolve(), p)  # overlapping folders must not count a run twice
    return sorted(found.values())


def load_results(dirs) -> list[dict]:
    records = []
    for path in find_results(dirs):
        record = read_results(path)
        record["_path"] = str(path)
        records.append(record)
    return records


def _label(record) -> str:
    w = record["weights"]
    return str(w.get("label") or Path(w.get("path") or "random init").stem)


def _protocol_name(record) -> str:
    return (record.get("protocol") or {}).get("name", "")


def _setting(record) -> str:
    return f"{record['engine']} / {_protocol_name(record)}"


def _matches(anchor, record) -> bool:
    if anchor["task"] != record["task"] or "demo" in _protocol_name(record).lower():
        return False
    names = [_protocol_name(record)] + [record["config"].get(k) for k in ("name", "config", "config_file")]
    if anchor["protocol"] and not any(isinstance(n, str) and re.search(anchor["protocol"], n, re.I)
                                      for n in names):
        return False
    return not anchor["dataset"] or bool(re.search(anchor["dataset"], record["dataset"]["name"], re.I))


# ---------------------------------------------------------------- tables

@dataclass
class Row:
    label: str
    setting: str
    kind: str = "ours"                                 # "ours" | "paper"
    values: dict = field(default_factory=dict)         # metric -> list of floats (ours)
    published: dict = field(default_factory=dict)      # metric -> (mean, std|None) (paper)
    seeds: list = field(default_factory=list)
    not_ok: list = field(default_factory=list)         # (status, reason) of runs without results
    paths: list = field(default_factory=list)

    @property
    def runs(self) -> int:
        return len(self.seeds)

    @property
    def status(self) -> str:
        if self.kind == "paper" or self.seeds:
            return "ok"
        return "missing" if any(s == "missing" for s, _ in self.not_ok) else "failed"

    def stat(self, metric):
        """(mean, std or None, n) of a metric, or None when this row lacks it."""
        if self.kind == "paper":
            if metric not in self.published:
                return None
            mean, std = self.published[metric]
            return mean, std, None
        vals = self.values.get(metric)
        if not vals:
            return None
        finite = [v for v in vals if math.isfinite(v)]
        if len(finite) < len(vals):
            return float("nan"), None, len(vals)
        std = statistics.stdev(vals) if len(vals) > 1 else None
        return statistics.fmean(vals), std, len(vals)


def _rank(label: str) -> tuple:
    low = label.casefold()  # the paper's order: random init, supervised, then the rest
    return (0 if low.startswith("random") else 1 if low.startswith("supervised") else 2, low)


def _fmt(x: float, digits: int) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.{digits}f}"


def _delta(mean: float, base: float, digits: int) -> float | None:
    """Difference of the printed (rounded) numbers, like the paper's tables."""
    if not (math.isfinite(mean) and math.isfinite(base)):
        return None
    d = round(round(mean, digits) - round(base, digits), digits)
    return 0.0 if d == 0 else d


def _group_rows(records) -> dict:
    rows = {}
    for r in records:
        key = (_label(r), _setting(r))
        row = rows.setdefault(key, Row(label=key[0], setting=key[1]))
        row.paths.append(r["_path"])
        status = r.get("status", "ok")
        if status != "ok":
            row.not_ok.append((status, r.get("reason", "")))
            continue
        row.seeds.append(r["seed"])
        for name, v in r["metrics"].items():
            row.values.setdefault(canonical_metric(name), []).append(
                float("nan") if v is None else float(v))
    return rows


def _pick_baseline(rows: list[Row], wanted: str | None) -> Row | None:
    if wanted is not None:
        return next((r for r in rows if r.label.casefold() == wanted.casefold()), None)
    supervised = [r for r in rows if r.label.casefold().startswith("supervised")]
    # a missing supervised row gives way to one with results; if none has any, the note says why
    return next((r for r in supervised if r.status == "ok"), supervised[0] if supervised else None)


def _table(task, dataset, records, baseline, digits, paper) -> dict:
    ours = sorted(_group_rows(records).values(), key=lambda r: (r.setting, _rank(r.label)))
    settings = sorted({r.setting for r in ours})
    notes = []

    anchors = [a for a in ANCHORS if paper and any(_matches(a, r) for r in records)]
    # two published settings in one table need the column too, or their rows look alike
    mixed_ours = len(settings) > 1
    mixed = mixed_ours or len(anchors) > 1
    paper_rows = []
    for a in anchors:
        for label, vals in a["rows"].items():
            pub = {m: (tuple(v) if isinstance(v, (list, tuple)) else (v, None)) for m, v in vals.items()}
            paper_rows.append((a, Row(label=label, setting=f"paper / {a['id']}", kind="paper",
                                      published=pub)))

    known = TASK_METRICS.get(task)
    present = {m for r in ours for m in r.values}
    metrics = [m for m in known or [] if m in present] or sorted(present) \
        or [m for m in known or [] if not m.startswith("mask_")]

    # Baselines: one per engine/protocol for our rows, the paper's own for paper rows.
    bases = {}
    for s in settings:
        block = [r for r in ours if r.setting == s]
        base = _pick_baseline(block, baseline)
        where = f" for {s}" if mixed_ours else ""
        if base is None:
            why = (f"no row labelled {baseline!r}" if baseline else
                   "no row whose label starts with 'supervised'; pass --baseline LABEL")
            notes.append(f"no deltas{where}: {why}")
        elif base.status != "ok":
            notes.append(f"no deltas{where}: baseline {base.label!r} is {base.status}")
            base = None
        else:
            notes.append(f"baseline{where}: {base.label}")
        bases[s] = base
    for a, row in paper_rows:
        if a["baseline"] == row.label:
            bases[row.setting] = row

    out_rows = []
    for row in ours + [r for _, r in paper_rows]:
        base = bases.get(row.setting)
        cells = {}
        for m in metrics:
            if row.status != "ok":
                cells[m] = {"mean": None, "std": None, "n": 0, "delta": None, "text": row.status}
                continue
            st = row.stat(m)
            if st is None:
                cells[m] = {"mean": None, "std": None, "n": 0, "delta": None, "text": NO_VALUE}
                continue
            mean, std, n = st
            text = _fmt(mean, digits) + (f"±{_fmt(std, digits)}" if std is not None else "")
            delta = None
            bst = base.stat(m) if base is not None and base is not row else None
            if bst is not None:
                delta = _delta(mean, bst[0], digits)
                if delta is not None:
                    text += f" ({delta:+.{digits}f})"
            cells[m] = {"mean": mean, "std": std, "n": n, "delta": delta, "text": text}
        out_rows.append({
            "label": row.label, "kind": row.kind, "setting": row.setting, "status": row.status,
            "is_baseline": base is row, "runs": row.runs, "seeds": sorted(row.seeds),
            "reasons": [reason for _, reason in row.not_ok], "paths": row.paths, "cells": cells,
        })
        for status, reason in row.not_ok:
            part = "" if row.status != "ok" else f"1 of {row.runs + len(row.not_ok)} runs "
            notes.append(f"{row.label}{f' [{row.setting}]' if mixed else ''}: {part}{status}: {reason}")
        if len(set(row.seeds)) < len(row.seeds):
            notes.append(f"{row.label}: several runs share a seed ({sorted(row.seeds)}); "
                         "they count as separate runs in mean±std")

    ok = [r for r in records if r.get("status", "ok") == "ok"]
    splits = {json.dumps(r["dataset"]["splits"], sort_keys=True) for r in ok}
    title = f"{task} · {dataset}"
    if len(splits) == 1 and ok[0]["dataset"]["splits"]:
        title += " (" + ", ".join(f"{k} {v}" for k, v in ok[0]["dataset"]["splits"].items()) + ")"
    elif len(splits) > 1:
        notes.append("dataset splits differ between runs: " + "; ".join(sorted(splits)))
    if mixed_ours:
        notes.append("engines/protocols are mixed: each row is compared with the baseline of its own "
                     "engine / protocol only")
    for a in anchors:
        notes.append(f"paper rows ({a['id']}): {a['source']}")
        others = sorted({r["engine"] for r in records
                         if _matches(a, r) and a["engine"] not in (None, r["engine"])})
        if others:
            notes.append(f"paper rows ({a['id']}) were measured with {a['engine']}; rows run with "
                         f"{', '.join(others)} are a different protocol, not directly comparable")
    return {"task": task, "dataset": dataset, "title": title, "metrics": metrics,
            "headers": [HEADERS.get(m, m) for m in metrics], "mixed_settings": mixed,
            "settings": settings, "rows": out_rows, "notes": notes, "digits": digits}


def build_tables(records, baseline: str | None = None, digits: int = 1, paper: bool = True) -> list[dict]:
    """One table (a plain dict, also the json format) per (task, dataset)."""
    if not 0 <= digits <= 4:
        raise UserError(f"--digits {digits} is out of range; use 0 to 4 (the paper uses 1)")
    groups = {}
    for r in records:
        groups.setdefault((r["task"], r["dataset"]["name"]), []).append(r)
    # A row that never ran (missing weights, a failed earlier stage) has no data set: it
    # belongs in each of its task's tables, not in a table of its own.
    # It takes the table's engine/protocol when all its runs share one.
    for task, ds in [k for k in groups if not k[1]]:
        named = [k for k in groups if k[0] == task and k[1]]
        for key in named:
            ran = {(r["engine"], json.dumps(r["protocol"], sort_keys=True)) for r in groups[key]}
            setting = {}
            if len(ran) == 1:
                engine, protocol = ran.pop()
                setting = {"engine": engine, "protocol": json.loads(protocol)}
            groups[key] += [{**r, **setting} for r in groups[(task, ds)]]
        if named:
            del groups[(task, ds)]
    order = sorted(groups, key=lambda k: (TASK_ORDER.index(k[0]) if k[0] in TASK_ORDER else 99, k))
    tables = [_table(task, ds, groups[(task, ds)], baseline, digits, paper) for task, ds in order]
    if baseline is not None and not any(r["label"].casefold() == baseline.casefold()
                                        for t in tables for r in t["rows"] if r["kind"] == "ours"):
        labels = sorted({r["label"] for t in tables for r in t["rows"] if r["kind"] == "ours"})
        raise UserError(f"--baseline {baseline!r} matches no row; labels found: {', '.join(labels)}")
    return tables


# ---------------------------------------------------------------- rendering

def table_rows(table) -> tuple[list[str], list[list[str]]]:
    """Header and cell text of one table, as shown in every text format."""
    show_runs = any(r["runs"] > 1 for r in table["rows"])
    header = ["pretraining"] + (["engine / protocol"] if table["mixed_settings"] else []) \
        + (["runs"] if show_runs else []) + table["headers"]
    body = []
    for r in table["rows"]:
        line = [r["label"]]
        if table["mixed_settings"]:
            line.append(r["setting"])
        if show_runs:
            line.append(str(r["runs"]) if r["kind"] == "ours" else "")
        line += [r["cells"][m]["text"] for m in table["metrics"]]
        body.append(line)
    return header, body


def render(tables, fmt: str = "grid") -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps({"tables": _json_safe(tables)}, indent=2, allow_nan=False, ensure_ascii=False)
    if fmt == "csv":
        return _render_csv(tables)
    parts = []
    for t in tables:
        header, body = table_rows(t)
        text = tabulate(body, headers=header, tablefmt=fmt, disable_numparse=True)
        if fmt == "github":
            notes = "\n".join(f"- {n}" for n in t["notes"])
            parts.append(f"### {t['title']}\n\n{text}\n\n{notes}")
        elif fmt == "latex":
            notes = "\n".join(f"% {n}" for n in t["notes"])
            parts.append(f"% {t['title']}\n{text}\n{notes}")
        else:
            notes = "\n".join(f"  * {n}" for n in t["notes"])
            parts.append(f"{t['title']}\n{text}\n{notes}")
    return "\n\n".join(parts)


def _render_csv(tables) -> str:
    """All tables stacked into one rectangle: task and dataset first, metric columns united."""
    columns = []
    for t in tables:
        columns += [h for h in t["headers"] if h not in columns]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "dataset", "pretraining", "engine / protocol", "runs", "status"] + columns)
    for t in tables:
        for r in t["rows"]:
            by_header = {h: r["cells"][m]["text"] for h, m in zip(t["headers"], t["metrics"])}
            w.writerow([t["task"], t["dataset"], r["label"], r["setting"],
                        r["runs"] if r["kind"] == "ours" else "", r["status"]]
                       + [by_header.get(h, "") for h in columns])
    return buf.getvalue()


def _json_safe(tables):
    """NaN is not JSON; a metric that came out NaN becomes null."""
    def fix(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fix(v) for v in x]
        return x
    return fix(tables)


def slug(table) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{table['task']}-{table['dataset']}".lower()).strip("-")


def plot_table(table, path) -> Path:
    """Grouped bar chart: one group per metric, one bar per row (paper rows hatched)."""
    # Figure + FigureCanvasAgg, not pyplot: no global backend switch, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in table["rows"] if r["status"] == "ok"]
    metrics = table["metrics"]
    fig = Figure(figsize=(max(6.4, 1.6 + 0.3 * len(rows) * len(metrics)), 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs, hs, es = [], [], []
        for j, m in enumerate(metrics):
            c = r["cells"][m]
            if c["mean"] is not None and math.isfinite(c["mean"]):
                xs.append(j - 0.4 + width * (i + 0.5))
                hs.append(c["mean"])
                es.append(c["std"] or 0.0)
        name = r["label"] + (f" [{r['setting']}]" if table["mixed_settings"] else "")
        bars = ax.bar(xs, hs, width, yerr=es if any(es) else None, capsize=2, label=name,
                      hatch="//" if r["kind"] == "paper" else None,
                      alpha=0.55 if r["kind"] == "paper" else 0.9)
        crowded = len(rows) > 3
        ax.bar_label(bars, fmt=f"%.{table['digits']}f", fontsize=7, padding=4 if any(es) else 1,
                     rotation=90 if crowded else 0)
    ax.set_xticks(range(len(metrics)), table["headers"])
    ax.set_xlim(-0.5, len(metrics) - 0.5)
    ax.set_ylabel("%")
    ax.set_title(table["title"], fontsize=10)
    absent = [f"{r['label']}: {r['status']}" for r in table["rows"] if r["status"] != "ok"]
    if not rows:  # every row missing: say so instead of an empty frame
        ax.text(0.5, 0.5, "no results: " + "; ".join(absent), transform=ax.transAxes,
                ha="center", va="center", fontsize=8, wrap=True)
        ax.set_ylim(0, 100)
    else:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False,
                  title=("not shown: " + "; ".join(absent)) if absent else None, title_fontsize=7)
    ax.margins(y=0.18)
    ax.spines[["top", "right"]].set_visible(False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def write_report(tables, output, sources, n_files: int) -> list[Path]:
    """report.md (GitHub tables with what was compared) and one PNG per table."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    sections = []
    for t in tables:
        png = plot_table(t, output / f"{slug(t)}.png")
        written.append(png)
        sections.append(render([t], "github") + f"\n\n![{t['title']}]({png.name})")
    header = [
        "# MoCo transfer report",
        "",
        f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} from {n_files} results.json "
        f"file(s) under: {', '.join(str(s) for s in sources)}.",
        "",
        "- One table per task and dataset; rows are pretrainings (the weights label), cells are the "
        "task's metrics in percent.",
        "- `x±s`: mean and sample standard deviation over the runs (seeds) sharing a label; the runs "
        "column says how many.",
        "- `(+d)`: difference to the table's baseline row (named under each table), computed from the "
        "printed numbers; rows are compared only within one engine / protocol.",
        "- `missing` / `failed`: the run could not be produced; the reason is under the table.",
        "- `paper: ...` rows are published numbers (source under the table); their deltas are to the "
        "paper's own supervised row.",
    ]
    text = "\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n"
    md = output / "report.md"

    def write(tmp):
        Path(tmp).write_text(text)
        os.chmod(tmp, 0o644)  # atomic_write's temp file is 0600; a report is meant to be shared

    atomic_write(md, write)
    return [md] + written


def report(dirs, fmt: str = "grid", baseline: str | None = None, output=None,
           digits: int = 1) -> tuple[str, list[Path]]:
    """The whole command as a library call: (printed text, files written: report.md + PNGs)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    records = load_results(dirs)
    tables = build_tables(records, baseline=baseline, digits=digits)
    if output is None:
        first = Path(dirs[0])
        output = first.parent if first.is_file() else first
    written = write_report(tables, output, dirs, len(records))
    return render(tables, fmt), written


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m transfer report",
        description="Comparison tables (one per task and dataset) from the results.json files "
                    "under DIR...; also writes report.md and a PNG bar chart per table.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="folders searched recursively for results.json")
    p.add_argument("--format", default="grid", choices=FORMATS, help="table format on stdout (default grid)")
    p.add_argument("--baseline", metavar="LABEL",
                   help="row the deltas are relative to (default: a label starting with 'supervised')")
    p.add_argument("--output", metavar="DIR",
                   help="where report.md and the charts go (default: the first DIR)")
    p.add_argument("--digits", type=int, default=1, help="decimals shown (default 1, as in the paper)")
    args = p.parse_args(argv)
    text, written = report(args.dirs, args.format, args.baseline, args.output, args.digits)
    print(text.rstrip("\n"))
    # stderr, so stdout stays one parseable csv/json document
    print(f"wrote {written[0]} and {len(written) - 1} chart(s) beside it", file=sys.stderr)
