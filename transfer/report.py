"""python -m transfer report DIR... : comparison tables from results.json files.

Every ``results.json`` under the given folders is read through
``transfer.results.read_results`` (so it is validated), with the per-example outcomes it
names (transfer/outcomes.py); nothing else is read. One table per task and protocol
(transfer/report_tables.py): rows are pretrainings, cells the task's metrics with their 95%
test-set bootstrap CI, deltas to the baseline row with their paired CI and significance
mark, mean ± std and a seed test for rows of several runs, and published rows only where the
protocol matches theirs. A task run on several data sets under one protocol name also gets a
suite summary (transfer/report_summary.py). How to read the tables: docs/report.md.

Besides printing, it writes ``report.md`` (every table in GitHub format, with what was
compared) and one PNG bar chart per table into ``--output``.
"""
import argparse
import sys
from pathlib import Path

from mocobench.errors import UserError, cli
from mocobench.fileio import prepare_output
from transfer.report_render import FORMATS, render, slug, write_report
from transfer.report_summary import suite_summaries
from transfer.report_tables import result_tables
from transfer.results import read_results

__all__ = ["find_results", "load_results", "build_tables", "render", "slug", "report", "main"]


def find_results(dirs) -> list[Path]:
    """Every results.json under each of `dirs` (a results.json path is taken as is)."""
    found = {}
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise UserError(f"{d} does not exist; pass folders holding results.json files "
                            "(the --output of a transfer task or of bench)")
        paths = [d] if d.is_file() else sorted(p for p in d.rglob("results.json") if p.is_file())
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


def build_tables(records, baseline: str | None = None, digits: int = 1, paper: bool = True,
                 bootstrap: int = 1000, seed: int = 0) -> list[dict]:
    """Every table of a report: one per task and protocol, then the suite summaries."""
    tables = result_tables(records, baseline, digits, paper, bootstrap, seed)
    return tables + suite_summaries(tables, digits)


def report(dirs, fmt: str = "grid", baseline: str | None = None, output=None, digits: int = 1,
           bootstrap: int = 1000, seed: int = 0) -> tuple[str, list[Path]]:
    """The whole command as a library call: (printed text, files written: report.md + PNGs)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if output is None:
        first = Path(dirs[0])
        output = first.parent if first.is_file() else first
    records = load_results(dirs)
    with prepare_output(output, "report"):
        tables = build_tables(records, baseline=baseline, digits=digits, bootstrap=bootstrap, seed=seed)
        written = write_report(tables, output, dirs, len(records))
    return render(tables, fmt), written


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m transfer report",
        description="Comparison tables (one per task and protocol) from the results.json files "
                    "under DIR..., with bootstrap confidence intervals; also writes report.md and "
                    "a PNG bar chart per table. How to read them: docs/report.md.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="folders searched recursively for results.json")
    p.add_argument("--format", default="grid", choices=FORMATS, help="table format on stdout (default grid)")
    p.add_argument("--baseline", metavar="LABEL",
                   help="row the deltas are relative to (default: a label starting with 'supervised')")
    p.add_argument("--output", metavar="DIR",
                   help="where report.md and the charts go (default: the first DIR)")
    p.add_argument("--digits", type=int, default=1, help="decimals shown (default 1, as in the paper)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap redraws of the test images per interval (default 1000; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap redraws (default 0)")
    args = p.parse_args(argv)
    text, written = report(args.dirs, args.format, args.baseline, args.output, args.digits,
                           args.bootstrap, args.seed)
    print(text.rstrip("\n"))
    # stderr, so stdout stays one parseable csv/json document
    print(f"wrote {written[0]} and {len(written) - 1} chart(s) beside it", file=sys.stderr)
