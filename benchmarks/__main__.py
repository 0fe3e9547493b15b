"""Run every benchmark (or --only some), print one table, write the figures as JSON."""
import argparse
import importlib
import json
import platform
import sys
from pathlib import Path

from tabulate import tabulate

# Each module has run(full: bool) -> list of {"name", "value", "unit", "note"}.
BENCHMARKS = ["pretrain_step", "augment", "shuffle", "memory", "linear_protocols", "report_time"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--full", action="store_true", help="GPU-sized settings instead of the small CPU ones")
    p.add_argument("--only", nargs="*", default=None, choices=BENCHMARKS)
    p.add_argument("--output", default="runs/benchmarks.json")
    args = p.parse_args(argv)
    rows = []
    for name in args.only or BENCHMARKS:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as e:
            print(f"skipping {name}: {e}", file=sys.stderr)
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        for row in module.run(full=args.full):
            rows.append({"benchmark": name, **row})
    print(tabulate([[r["benchmark"], r["name"], f"{r['value']:.3g}", r["unit"], r["note"]] for r in rows],
                   headers=["benchmark", "figure", "value", "unit", "setting"], tablefmt="github"))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                               "full": args.full, "figures": rows}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
