"""Showing tables: text formats (grid, github, latex, csv, json), bar charts, report.md."""
import csv
import datetime
import io
import json
import math
import re
from pathlib import Path

from tabulate import tabulate

from mocobench.errors import UserError
from mocobench.fileio import atomic_write

FORMATS = ("grid", "github", "latex", "csv", "json")


def table_rows(table) -> tuple[list[str], list[list[str]]]:
    """Header and cell text of one table, as shown in every text format."""
    if table["kind"] == "summary":
        header = ["pretraining"] + table["headers"]
        return header, [[r["label"]] + [r["cells"][m]["text"] for m in table["metrics"]]
                        for r in table["rows"]]
    header = ["pretraining", "runs"] + table["headers"]
    body = [[r["label"], r["variance"]] + [r["cells"][m]["text"] for m in table["metrics"]]
            for r in table["rows"]]
    return header, body


def render(tables, fmt: str = "grid") -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps({"tables": _json_safe(tables)}, indent=2, allow_nan=False, ensure_ascii=False)
    if fmt == "csv":
        return _render_csv(tables)
    return "\n\n".join(_render_text(t, fmt) for t in tables)


def _render_text(t, fmt) -> str:
    header, body = table_rows(t)
    text = tabulate(body, headers=header, tablefmt=fmt, disable_numparse=True)
    if fmt == "github":
        about = "".join(f"{line}  \n" for line in t["header"])
        notes = "\n".join(f"- {n}" for n in t["notes"])
        return f"### {t['title']}\n\n{about}\n{text}\n\n{notes}"
    if fmt == "latex":
        lines = [f"% {t['title']}"] + [f"% {line}" for line in t["header"]]
        return "\n".join(lines) + f"\n{text}\n" + "\n".join(f"% {n}" for n in t["notes"])
    about = "".join(f"  {line}\n" for line in t["header"])
    notes = "\n".join(f"  * {n}" for n in t["notes"])
    return f"{t['title']}\n{about}{text}\n{notes}"


def _render_csv(tables) -> str:
    """All tables stacked into one rectangle: task, dataset, protocol first, columns united."""
    columns = []
    for t in tables:
        columns += [h for h in t["headers"] if h not in columns]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "dataset", "protocol", "protocol id", "pretraining", "runs", "status"] + columns)
    for t in tables:
        task = t["task"] + (" suite" if t["kind"] == "summary" else "")
        for r in t["rows"]:
            by_header = {h: r["cells"][m]["text"] for h, m in zip(t["headers"], t["metrics"])}
            w.writerow([task, t["dataset"], t["protocol"].get("name", ""), t["protocol_id"], r["label"],
                        r.get("variance", ""), r["status"]] + [by_header.get(h, "") for h in columns])
    return buf.getvalue()


def _json_safe(tables):
    """NaN is not JSON; a metric that came out NaN becomes null."""
    def fix(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [fix(v) for v in x]
        return x
    return fix(tables)


def slug(table) -> str:
    parts = (table["task"], table["dataset"], table["protocol"].get("name", ""), table["protocol_id"][:8])
    name = "-".join(parts)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ----------------------------------------------------------------------------- charts

def _bars(ax, table, rows, width):
    """One bar per row and metric; error bars the CI; each value written above its bar's CI."""
    crowded = len(rows) > 3
    for i, r in enumerate(rows):
        xs, hs, lows, highs, labels = [], [], [], [], []
        for j, m in enumerate(table["metrics"]):
            c = r["cells"][m]
            if c["mean"] is None or not math.isfinite(c["mean"]):
                continue
            lo, hi = c.get("ci") or (c["mean"], c["mean"])
            xs.append(j - 0.4 + width * (i + 0.5))
            hs.append(c["mean"])
            lows.append(c["mean"] - lo)
            highs.append(hi - c["mean"])
            mark = " n.s." if c.get("significant") is False else ""
            labels.append(f"{c['mean']:.{table['digits']}f}{mark}")
        paper = r["kind"] == "paper"
        ax.bar(xs, hs, width, yerr=[lows, highs] if any(lows + highs) else None, capsize=2,
               label=r["label"], hatch="//" if paper else None, alpha=0.55 if paper else 0.9)
        for x, h, up, text in zip(xs, hs, highs, labels):
            ax.annotate(text, (x, h + up), xytext=(0, 3), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7, rotation=90 if crowded else 0)


def plot_table(table, path) -> Path:
    """Grouped bar chart: one group per metric, one bar per row (published rows hatched),
    error bars the 95% test-set bootstrap CI, "n.s." on deltas that are not significant."""
    # Figure + FigureCanvasAgg, not pyplot: no global backend switch, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in table["rows"] if r["status"] == "ok"]
    metrics = table["metrics"]
    fig = Figure(figsize=(max(6.4, 1.6 + 0.3 * len(rows) * len(metrics)), 4.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    _bars(ax, table, rows, 0.8 / max(1, len(rows)))
    ax.set_xticks(range(len(metrics)), table["headers"])
    ax.set_xlim(-0.5, len(metrics) - 0.5)
    ax.set_ylabel("%")
    ax.set_title(f"{table['title']}\nerror bars: 95% test-set bootstrap CI; n.s.: delta to the "
                 "baseline not significant", fontsize=9)
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
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


# ----------------------------------------------------------------------------- report.md

_README = [
    "- One table per task and protocol: rows are pretrainings (the weights label), cells the "
    "task's metrics in percent; the lines above a table name its protocol and every field that "
    "defines it. Rows are compared only within one table.",
    "- `x±s`: mean and sample standard deviation over the row's runs (the runs column says how "
    "many, and whether they are fine-tuning seeds or pretraining runs).",
    "- `[lo, hi]`: 95% bootstrap confidence interval over the test images (test-set sampling only).",
    "- `(+d [lo, hi], p=...)`: difference to the table's baseline (named under each table), computed "
    "from the printed numbers; its paired bootstrap interval; Welch's t-test over seeds where both "
    "rows have several runs. `n.s.`: not significant at 95%.",
    "- `missing` / `failed`: the run could not be produced; the reason is under the table.",
    "- `paper: ...` rows are published numbers, shown only where the protocol matches theirs on "
    "every defining field (source under the table); their deltas are to the paper's own baseline.",
    "- How to read all this: docs/report.md.",
]


def write_report(tables, output, sources, n_files: int) -> list[Path]:
    """report.md (GitHub tables with what was compared) and one PNG per results table."""
    output = Path(output)
    written, sections = [], []
    for t in tables:
        section = render([t], "github")
        if t["kind"] == "results":
            png = plot_table(t, output / f"{slug(t)}.png")
            written.append(png)
            section += f"\n\n![{t['title']}]({png.name})"
        sections.append(section)
    header = ["# MoCo transfer report", "",
              f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} from {n_files} "
              f"results.json file(s) under: {', '.join(str(s) for s in sources)}.", ""] + _README
    text = "\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n"

    md = output / "report.md"
    atomic_write(md, lambda tmp: Path(tmp).write_text(text))
    return [md] + written
