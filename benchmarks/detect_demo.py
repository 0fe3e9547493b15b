"""The demo detection row, measured: AP and time per weights, for settings chosen on a
validation split carved from the training scenes (never on the demo's test split).

    python -m benchmarks.detect_demo --weights moco=PATH supervised=PATH random=random \\
        [--config configs/detection/demo_scenes_voc_R18_FPN.yaml] [--split holdout|test] \\
        [--engine torchvision] [--output runs/detect_demo] [KEY VALUE ...]

--split holdout (the default) trains on the first 3/4 of the demo's training scenes and scores
the last 1/4: use it to choose settings. --split test runs the demo exactly (train on every
training scene, score the test scenes): use it once, for the figures in docs/detection.md.
Each row runs `python -m transfer detect` in a child process with OMP_NUM_THREADS=1 (the
bench runs two stages at once on two cores); wall and CPU seconds cover the whole stage
(start-up, data, training, evaluation). Rows run one after another; on a shared machine wall
time includes the others' load, CPU time much less so.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from tabulate import tabulate

DEMO = "configs/detection/demo_scenes_voc_R18_FPN.yaml"


def holdout_split(config: str, opts: list, folder: Path) -> list:
    """A VOC folder viewing the demo's training scenes, split 3/4 fit + 1/4 holdout; returns
    the DATASETS overrides that train on fit and test on holdout."""
    from transfer.detect import config as dcfg
    from transfer.detect import datasets as ds

    cfg = dcfg.load(config, opts)
    (spec,), _ = ds.resolve_all(cfg)  # composes the scenes if needed
    ids = (spec.dirname / "ImageSets" / "Main" / f"{spec.split}.txt").read_text().split()
    cut = len(ids) * 3 // 4
    (folder / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for name in ("JPEGImages", "Annotations", "classes.txt"):
        if not (folder / name).exists():
            (folder / name).symlink_to(spec.dirname / name)
    (folder / "ImageSets" / "Main" / "fit.txt").write_text("\n".join(ids[:cut]) + "\n")
    (folder / "ImageSets" / "Main" / "holdout.txt").write_text("\n".join(ids[cut:]) + "\n")
    return ["DATASETS.TRAIN", f"('voc:{folder}:fit',)", "DATASETS.TEST", f"('voc:{folder}:holdout',)"]


def run_row(label: str, weights: str, args, opts: list, out: Path) -> dict:
    arch = ["--arch", "resnet18"] if weights == "random" else []
    cmd = [sys.executable, "-m", "transfer", "detect", "--config", args.config, "--weights", weights, *arch,
           "--output", str(out), "--engine", args.engine, "--label", label, *opts]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stage.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return {"label": label, "status": f"failed: {tail}", "wall_s": wall, "cpu_s": cpu}
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    return {"label": label, "status": "ok", "wall_s": wall, "cpu_s": cpu, **metrics}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.detect_demo", description=__doc__.split("\n")[0])
    p.add_argument("--weights", nargs="+", required=True, help="LABEL=PATH (PATH 'random': ResNet-18 init)")
    p.add_argument("--config", default=DEMO)
    p.add_argument("--split", choices=["holdout", "test"], default="holdout")
    p.add_argument("--engine", default="torchvision")
    p.add_argument("--output", default="runs/detect_demo")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every row")
    args = p.parse_args(argv)
    out = Path(args.output)
    opts = list(args.opts)
    if args.split == "holdout":
        opts += holdout_split(args.config, opts, out / "holdout_voc")
    rows = []
    for item in args.weights:
        label, weights = item.split("=", 1)
        rows.append(run_row(label, weights, args, opts, out / label))
        print(json.dumps(rows[-1]), flush=True)
    keys = ["label", "status", "AP50", "AP", "AP75", "wall_s", "cpu_s"]
    print(tabulate([[r.get(k) for k in keys] for r in rows], headers=keys, floatfmt=".1f", tablefmt="github"))
    (out / "summary.json").write_text(json.dumps({"split": args.split, "config": args.config, "opts": args.opts,
                                                  "engine": args.engine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
