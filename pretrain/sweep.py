"""python -m pretrain.sweep --config CONFIG --output DIR --grid key=v1,v2,... [--grid ...] [key=value ...]

Runs the cartesian product of the grids, one pretraining run per point in
DIR/<slug of the point's overrides>/, evaluates each with the weighted kNN of
``python -m transfer knn`` (a subprocess: pretrain never imports transfer), and
summarises every run found in DIR (so several sweeps into one DIR make one
table): DIR/sweep.md and sweep.json, and the plots acc_vs_K.png, acc_vs_m.png,
loss_curves.png, consistency.png (the shapes of MoCo's Fig. 3 and Table 1).

Re-running is cheap: a point whose RUN/knn/results.json exists is skipped, an
unfinished one resumes from its checkpoint_last.pth.
"""
import argparse
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from mocobench.config import configs_dir, load_config
from mocobench.errors import UserError, cli
from mocobench.fileio import atomic_json
from pretrain.config import PretrainConfig, check

KNN_CONFIG = "linear/fashion_mnist_demo.yaml"  # in the suite's configs (installed or checkout)
POINT = "sweep_point.json"


def default_knn_config() -> Path:
    return configs_dir() / KNN_CONFIG


def _device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values:
            raise UserError(f"--grid {spec!r} is not key=v1,v2,...; e.g. --grid moco.queue_size=256,1024")
        if key in dict(grid):
            raise UserError(f"--grid {key} is given twice; list all its values in one --grid")
        grid.append((key, values.split(",")))
    return grid


def points(grid) -> list[dict[str, str]]:
    """Every combination of the grid's values, in order, as {key: value}."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*[v for _, v in grid])]


def slug(point: dict[str, str]) -> str:
    """A folder name for a point: last key part and value, e.g. dictionary-queue_queue_size-256."""
    short = [k.rsplit(".", 1)[-1] for k in point]
    names = short if len(set(short)) == len(short) else list(point)
    text = "_".join(f"{n}-{v}" for n, v in zip(names, point.values())) or "base"
    return re.sub(r"[^A-Za-z0-9.=_-]+", "-", text)


def _run(cmd: list[str], log_path: Path) -> int:
    with open(log_path, "a") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode


def _last_error(log_path: Path) -> str:
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1].removeprefix("error: ")[:300]


def run_point(config: str, fixed: list[str], point: dict, run_dir: Path, nproc: int,
              knn_config: str) -> str:
    """Pretrain (resuming if started) and kNN-evaluate one point; returns a status word."""
    if (run_dir / "knn/results.json").exists():
        return "cached"
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = fixed + [f"{k}={v}" for k, v in point.items()]
    atomic_json({"config": config, "overrides": overrides, "point": point}, run_dir / POINT)
    launcher = [sys.executable, "-m", "pretrain"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", "-m", "pretrain"]
    if _run(launcher + ["--config", config, "--output", str(run_dir), *overrides],
            run_dir / "pretrain.log"):
        return "failed: " + _last_error(run_dir / "pretrain.log")
    knn = [sys.executable, "-m", "transfer", "knn", "--config", knn_config,
           "--weights", str(run_dir / "checkpoint_last.pth"), "--output", str(run_dir / "knn")]
    if _run(knn, run_dir / "knn.log"):
        return "failed: " + _last_error(run_dir / "knn.log")
    return "done"


# ============ summary ============
def _read_log(path: Path):
    losses, consistency = [], None
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                losses.append((record["step"], record["loss"]))
            if "consistency" in record:
                consistency = record
    return losses, consistency


def collect(out: Path) -> list[dict]:
    """One row per run folder of `out`, finished or not, from its own files."""
    rows = []
    for point_file in sorted(out.glob(f"*/{POINT}")):
        run = point_file.parent
        if not (run / "config.yaml").exists():
            continue
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        m, t = cfg["moco"], cfg["train"]
        losses, consistency = _read_log(run / "log.jsonl")
        knn = run / "knn/results.json"
        top1 = json.loads(knn.read_text())["metrics"].get("knn_top1") if knn.exists() else None
        by_age = (consistency or {}).get("consistency", {})
        oldest = max(by_age, key=int) if by_age else None
        rows.append({
            "run": run.name, "dictionary": m.get("dictionary", "queue"),
            # end-to-end's negatives are the rest of the global batch
            "K": t["batch_size"] if m.get("dictionary") == "end_to_end" else m["queue_size"],
            "m": m["momentum"] if m.get("dictionary", "queue") == "queue" else None,
            "batch": t["batch_size"], "steps": losses[-1][0] if losses else 0,
            "final_loss": losses[-1][1] if losses else None, "knn_top1": top1,
            "consistency_oldest": by_age.get(oldest) if oldest else None,
            "oldest_age": int(oldest) if oldest else None,
            "losses": losses, "consistency": {int(a): c for a, c in by_age.items()},
        })
    return rows


def write_summary(out: Path, rows: list[dict]) -> None:
    from tabulate import tabulate

    cols = ["run", "dictionary", "K", "m", "batch", "steps", "final_loss", "knn_top1",
            "consistency_oldest", "oldest_age"]
    # m as given (0.9999 must not print as 1.000)
    floatfmt = ["", "", "", "g", "", "", ".3f", ".2f", ".3f", ""]
    table = tabulate([[r[c] for c in cols] for r in rows], headers=cols, tablefmt="github",
                     floatfmt=floatfmt, missingval="-")
    (out / "sweep.md").write_text(table + "\n")
    atomic_json([{c: r[c] for c in cols} for r in rows], out / "sweep.json")
    print(table)
    _plots(out, rows)


def _plots(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["knn_top1"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in sorted({r["dictionary"] for r in scored}):
        pts = sorted((r["K"], r["knn_top1"]) for r in scored
                     if r["dictionary"] == name and (name != "queue" or r["m"] == _usual_m(scored)))
        ax.plot(*zip(*pts), marker="o", label=name) if pts else None
    _finish(ax, "K (negatives)", "kNN top-1 (%)", "accuracy vs K", out / "acc_vs_K.png", logx=True)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    queue = sorted((r["m"], r["knn_top1"]) for r in scored if r["dictionary"] == "queue")
    if queue:
        labels = [f"{m:g}" for m, _ in queue]
        ax.plot(range(len(queue)), [a for _, a in queue], marker="o")
        ax.set_xticks(range(len(queue)), labels)
    _finish(ax, "momentum m", "kNN top-1 (%)", "queue: accuracy vs m", out / "acc_vs_m.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["losses"]:
            ax.plot(*zip(*r["losses"]), label=r["run"], linewidth=1)
    _finish(ax, "step", "training loss", "training loss", out / "loss_curves.png", small=True)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["consistency"]:
            ax.plot(*zip(*sorted(r["consistency"].items())), marker=".", label=r["run"], linewidth=1)
    _finish(ax, "key age (steps)", "mean cosine, stored vs re-encoded",
            "dictionary consistency (last probe)", out / "consistency.png", small=True)


def _usual_m(rows):
    """The momentum most queue runs share, so the K plot does not mix momenta."""
    ms = [r["m"] for r in rows if r["dictionary"] == "queue"]
    return max(set(ms), key=ms.count) if ms else None


def _finish(ax, xlabel, ylabel, title, path, logx=False, small=False):
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logx and ax.lines:
        ax.set_xscale("log", base=2)
    if ax.lines and any(line.get_label()[:1] != "_" for line in ax.lines):
        ax.legend(fontsize=6 if small else 8)
    ax.grid(alpha=0.3)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=120)
    plt.close(ax.figure)


# ============ entry point ============
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.sweep", description=__doc__.split("\n\n")[1])
    p.add_argument("--config", required=True, help="pretrain YAML, e.g. configs/pretrain/sweep_demo.yaml")
    p.add_argument("--output", required=True, help="folder: one subfolder per run, plus tables and plots")
    p.add_argument("--grid", action="append", default=[], metavar="key=v1,v2,...",
                   help="a config key and its values; several --grid make a cartesian product")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun); default 1")
    p.add_argument("--knn-config", default=None, help=f"transfer knn config (default: the shipped configs/{KNN_CONFIG})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides shared by every run")
    return p


@cli
def main(argv=None) -> list[dict]:
    args = parser().parse_args(argv)
    grid = parse_grid(args.grid)
    todo = points(grid)
    for point in todo:  # refuse a bad key or an inconsistent point before any run starts
        overrides = args.overrides + [f"{k}={v}" for k, v in point.items()]
        check(load_config(PretrainConfig, args.config, overrides), args.nproc, _device_type())
    knn_config = str(args.knn_config or default_knn_config())
    if not Path(knn_config).is_file():
        raise UserError(f"--knn-config {knn_config} does not exist; pass a transfer knn config")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    statuses = {}
    for i, point in enumerate(todo, 1):
        name = slug(point)
        print(f"[{i}/{len(todo)}] {name} ...", flush=True)
        statuses[name] = run_point(args.config, args.overrides, point, out / name, args.nproc,
                                   knn_config)
        print(f"[{i}/{len(todo)}] {name}: {statuses[name]}", flush=True)
    rows = collect(out)
    write_summary(out, rows)
    failed = {n: s for n, s in statuses.items() if s.startswith("failed")}
    if failed:
        raise UserError(f"{len(failed)} of {len(todo)} runs failed (first: {next(iter(failed))}, "
                        f"{next(iter(failed.values()))}); fix and re-run, finished runs are kept")
    return rows


if __name__ == "__main__":
    main()
