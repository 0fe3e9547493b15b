"""The bench runs every stage through the real CLIs, caches finished stages by
content, re-runs only what changed, and marks unavailable baselines as missing."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mocobench.errors import UserError
from transfer.bench_sources import imagenet_weights
from transfer.results import read_results

ROOT = Path(__file__).resolve().parents[1]
TINY_PRETRAIN = ["model.arch=resnet18", "data.image_size=32", "data.max_images=64",
                 "data.num_workers=0", "train.batch_size=16", "moco.queue_size=64",
                 "train.max_steps=2", "moco.bn_splits=2"]
TINY_KNN = ["data.max_train_images=300", "data.max_val_images=100"]


def write_bench(tmp_path, knn_config) -> Path:
    config = {
        "name": "tiny",
        "scale": "a few steps on 64 images",
        "pretrainings": [
            {"label": "MoCo tiny", "kind": "pretrain", "overrides": TINY_PRETRAIN,
             "config": str(ROOT / "configs/pretrain/moco_v2_fmnist_demo.yaml")},
            # a source that cannot be reached: the bench is offline here, deterministically
            {"label": "supervised IN-1k", "kind": "imagenet_supervised", "arch": "resnet50",
             "url": f"file://{tmp_path}/offline/resnet50-0676ba61.pth"},
            {"label": "random init", "kind": "random", "arch": "resnet18"},
        ],
        "tasks": [{"name": "knn", "task": "knn", "args": ["--config", str(knn_config), *TINY_KNN]}],
        "formats": ["torchvision"],
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_bench(config, out, torch_home, *overrides):
    env = {**os.environ, "TORCH_HOME": str(torch_home), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "transfer", "bench", "--config", str(config),
                             "--output", str(out), *overrides], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = dict(re.findall(r"^\[\s*\d+/\d+\] (\S+)\s+(\S+)", result.stdout, re.M))
    return result.stdout, status


def test_bench_runs_caches_and_reruns_only_what_changed(tmp_path):
    knn_config = tmp_path / "knn.yaml"
    shutil.copy(ROOT / "configs/linear/fashion_mnist_demo.yaml", knn_config)
    bench, out, torch_home = write_bench(tmp_path, knn_config), tmp_path / "out", tmp_path / "torch"

    stdout, status = run_bench(bench, out, torch_home)
    assert status["pretrain/moco-tiny"] == "done" and status["knn/moco-tiny"] == "done"
    assert status["knn/random-init"] == "done"
    assert status["pretrain/supervised-in-1k"] == "missing" and status["knn/supervised-in-1k"] == "missing"
    moco = read_results(out / "knn/moco-tiny/results.json")
    assert moco["weights"]["label"] == "MoCo tiny" and "knn_top1" in moco["metrics"]
    missing = read_results(out / "knn/supervised-in-1k/results.json")
    assert missing["status"] == "missing" and "resnet50-0676ba61.pth" in missing["reason"]
    assert (out / "convert/moco-tiny/torchvision.pth").exists()
    assert (out / "report/report.md").exists() and "MoCo tiny" in stdout.split("bench finished")[1]

    # a second run does no work
    _, again = run_bench(bench, out, torch_home)
    for stage in ("pretrain/moco-tiny", "pretrain/random-init", "convert/moco-tiny",
                  "convert/random-init", "knn/moco-tiny", "knn/random-init"):
        assert again[stage] == "cached", stage

    # editing the task's config re-runs that task only
    knn_config.write_text(knn_config.read_text().replace("k: 200", "k: 20"))
    _, third = run_bench(bench, out, torch_home)
    assert third["pretrain/moco-tiny"] == third["convert/moco-tiny"] == "cached"
    assert third["knn/moco-tiny"] == third["knn/random-init"] == "done"
    assert read_results(out / "knn/moco-tiny/results.json")["config"]["knn"]["k"] == 20


def test_missing_imagenet_weights_say_which_file_to_place_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match=r"place resnet50-0676ba61\.pth .* in .*/checkpoints/"):
        imagenet_weights("")
    (tmp_path / "hub/checkpoints").mkdir(parents=True)
    (tmp_path / "hub/checkpoints/resnet50-0676ba61.pth").write_bytes(b"x")
    assert imagenet_weights("").name == "resnet50-0676ba61.pth"
    with pytest.raises(UserError, match="do not exist"):
        imagenet_weights(str(tmp_path / "nope.pth"))


def test_jobs_run_stages_side_by_side_with_the_same_results(tmp_path):
    knn_config = tmp_path / "knn.yaml"
    shutil.copy(ROOT / "configs/linear/fashion_mnist_demo.yaml", knn_config)
    bench, torch_home = write_bench(tmp_path, knn_config), tmp_path / "torch"
    one_stdout, one = run_bench(bench, tmp_path / "one", torch_home)
    two_stdout, two = run_bench(bench, tmp_path / "two", torch_home, "jobs=2")
    assert "jobs: 2 stages at once" in two_stdout and "jobs:" not in one_stdout
    # every stage reported once, with the status it has when run one at a time
    assert len(re.findall(r"^\[\s*\d+/\d+\]", two_stdout, re.M)) == len(two) == len(one)
    assert two == one
    for row in ("moco-tiny", "random-init"):
        metrics = [read_results(tmp_path / out / "knn" / row / "results.json")["metrics"]
                   for out in ("one", "two")]
        assert metrics[0] == metrics[1], row

    def overlap(out):  # does the random row's conversion run during MoCo's pretraining?
        pre, conv = (json.loads((tmp_path / out / stage / "stage.json").read_text())
                     for stage in ("pretrain/moco-tiny", "convert/random-init"))
        return conv["started"] < pre["started"] + pre["seconds"] and pre["started"] < conv["started"]
    assert overlap("two") and not overlap("one")
