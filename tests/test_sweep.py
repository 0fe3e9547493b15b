"""pretrain.sweep: a real two-point grid (pretrain + transfer kNN subprocesses),
caching on re-run, the summary table and plots, and bad grids."""
import json
import os
import subprocess
import sys

import pytest

from mocobench.errors import UserError
from pretrain.sweep import parse_grid, points, slug

from helpers import DEMO, ROOT, TINY


def run_sweep(out, *args):
    cmd = [sys.executable, "-m", "pretrain.sweep", "--config", DEMO, "--output", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_grid_points_and_slugs():
    grid = parse_grid(["moco.dictionary=queue,memory_bank", "moco.queue_size=32,64"])
    pts = points(grid)
    assert len(pts) == 4 and pts[1] == {"moco.dictionary": "queue", "moco.queue_size": "64"}
    assert slug(pts[1]) == "dictionary-queue_queue_size-64"
    assert slug({"a.x": "1", "b.x": "2"}) == "a.x-1_b.x-2"  # ambiguous short names stay dotted
    with pytest.raises(UserError, match="is not key=v1,v2"):
        parse_grid(["moco.momentum"])
    with pytest.raises(UserError, match="given twice"):
        parse_grid(["moco.momentum=0.9", "moco.momentum=0.99"])


def test_two_point_sweep_runs_evaluates_caches_and_plots(tmp_path):
    knn = tmp_path / "knn.yaml"  # the demo kNN config on 200 + 100 images
    text = (ROOT / "configs/linear/fashion_mnist_demo.yaml").read_text()
    knn.write_text(text.replace("max_train_images: 10000", "max_train_images: 200")
                   .replace("max_val_images: 2000", "max_val_images: 100"))
    args = ["--knn-config", str(knn), "--grid", "moco.dictionary=queue,memory_bank",
            *TINY, "moco.queue_size=32", "train.max_steps=3", "train.consistency_every=1",
            "train.consistency_images=16"]
    out = tmp_path / "sweep"
    first = run_sweep(out, *args)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "dictionary-queue: done" in first.stdout and "dictionary-memory_bank: done" in first.stdout
    rows = {r["run"]: r for r in json.loads((out / "sweep.json").read_text())}
    assert set(rows) == {"dictionary-queue", "dictionary-memory_bank"}
    for name, row in rows.items():
        # each figure is the run's own: its kNN result, its last logged loss, its last probe
        knn_result = json.loads((out / name / "knn/results.json").read_text())["metrics"]["knn_top1"]
        log = [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines()]
        losses = [r for r in log if "loss" in r]
        probe = [r for r in log if "consistency" in r][-1]["consistency"]
        assert row["knn_top1"] == knn_result and row["knn_top1"] > 30  # 10 classes: chance is 10
        assert row["steps"] == losses[-1]["step"] == 3 and row["final_loss"] == losses[-1]["loss"]
        assert row["oldest_age"] == max(map(int, probe)) == 2
        assert row["consistency_oldest"] == probe[str(row["oldest_age"])]
        assert row["K"] == 32 and row["batch"] == 16
    assert rows["dictionary-queue"]["m"] == 0.99 and rows["dictionary-memory_bank"]["m"] is None
    results = json.loads((out / "dictionary-queue/knn/results.json").read_text())
    assert results["task"] == "knn" and results["weights"]["path"].endswith("checkpoint_last.pth")
    for name in ("sweep.md", "acc_vs_K.png", "acc_vs_m.png", "loss_curves.png", "consistency.png"):
        assert (out / name).stat().st_size > 0, name
    assert "dictionary-queue" in (out / "sweep.md").read_text()

    again = run_sweep(out, *args)  # finished runs are not repeated
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count(": cached") == 2


def test_bad_grid_key_is_one_line_before_any_run(tmp_path):
    result = run_sweep(tmp_path, "--grid", "moco.momentm=0.9,0.99")
    assert result.returncode == 2 and not (tmp_path / "momentm-0.9").exists()
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "moco.momentm" in lines[0], lines
