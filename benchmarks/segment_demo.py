"""The demo segmentation's settings, measured: mIoU on a VALIDATION split of the embedded
scenes (never the demo's test split), and the CPU seconds of the whole `transfer segment`
stage at one thread (what a demo bench row costs; the bench runs two 1-thread stages at once).

    python -m benchmarks.segment_demo --weights moco=W1 supervised=W2 random --output runs/seg-demo
    python -m benchmarks.segment_demo --split test --settings demo --weights ...   # the headline, once

Validation split: the scenes are composed one after another from one seed, so composing 256 +
128 scenes gives the demo's 256 training scenes and 64 test scenes (000256-000319) unchanged,
plus 64 more (000320-000383) whose Fashion-MNIST items appear in neither: those are scored.
Each setting is a list of --cfg-options over configs/segmentation/demo_fcn_r18_d16_scenes.py.
Results and the settings tried so far: docs/segmentation.md (The demo).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = "configs/segmentation/demo_fcn_r18_d16_scenes.py"
OS8 = ["model.backbone.strides=(1,2,1,1)", "model.backbone.dilations=(1,1,2,4)"]
CROP64 = ["train_dataloader.dataset.pipeline.3.crop_size=(64,64)", "model.data_preprocessor.size=(64,64)"]
SETTINGS = {  # name -> --cfg-options over the demo config
    "demo": [],
    "iters160": ["train_cfg.max_iters=160"],
    "iters240": ["train_cfg.max_iters=240"],
    "lr0.02": ["optim_wrapper.optimizer.lr=0.02"],
    "lr0.1": ["optim_wrapper.optimizer.lr=0.1"],
    "no-class-weight": ["model.decode_head.loss_decode.class_weight=None"],
    "crop64": CROP64,
    "os8": OS8,
}


def validation_options(folder: Path) -> list[str]:
    names = folder / "val_split.txt"
    names.write_text("".join(f"{i:06d}\n" for i in range(320, 384)))
    return ["embedded_data.n_val=128", f"test_dataloader.dataset.ann_file={names}"]


def non_background(outcomes: Path) -> float:
    """Percent of test pixels predicted as something other than class 0 (background)."""
    with np.load(outcomes) as z:
        c = z["confusion"].sum(axis=0)
    return float(100 * c[:, 1:].sum() / c.sum())


def run_one(name, label, weights, options, out: Path) -> dict:
    w = ["--weights", "random", "--arch", "resnet18"] if weights == "random" else ["--weights", weights]
    w += ["--label", label]  # the row's name in `transfer report` (else the file's stem: checkpoint_last)
    cmd = [sys.executable, "-m", "transfer", "segment", "--config", DEMO, *w, "--output", str(out),
           *(["--cfg-options", *options] if options else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = {"setting": name, "weights": label, "wall_s": round(time.time() - start, 1),
           "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 1)}
    if proc.returncode != 0:
        return {**row, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    return {**row, **metrics, "non_background_pct": round(non_background(out / "outcomes.npz"), 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.segment_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", nargs="+", required=True, help="label=checkpoint ..., or 'random'")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    base = validation_options(out) if args.split == "val" else []
    for name in args.settings:
        for spec in args.weights:
            label, _, path = spec.partition("=") if spec != "random" else ("random", "", "random")
            row = run_one(name, label, path, base + SETTINGS[name], out / f"{name}__{label}")
            print(json.dumps({"split": args.split, **row}), flush=True)
            with open(out / "rows.jsonl", "a") as f:
                f.write(json.dumps({"split": args.split, **row}) + "\n")


if __name__ == "__main__":
    main()
