"""Output faults are caught before a long stage starts: a folder that cannot really be
written (not just os.access) or a disk without room is one line, and in the bench the
stage is reported failed while the other stages still run."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mocobench.errors import UserError
from mocobench.fileio import ensure_room
from transfer.bench import run_bench
from transfer.results import read_results

ROOT = Path(__file__).resolve().parents[2]


def test_ensure_room_refuses_an_unwritable_folder_and_a_full_disk(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match=r"cannot write checkpoints in .*a_file/out"):
        ensure_room(tmp_path / "a_file" / "out", 0, "checkpoints")
    ensure_room(tmp_path / "ok", 1000, "checkpoints")
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(p)._replace(free=10 * 2**20))
    with pytest.raises(UserError, match=r"only 10 MiB free in .* but checkpoints need about 100 MiB"):
        ensure_room(tmp_path / "ok", 100 * 2**20, "checkpoints")


def bench_config(tmp_path) -> Path:
    config = {
        "name": "faults",
        "pretrainings": [{"label": "random init", "kind": "random", "arch": "resnet18"}],
        "tasks": [{"name": "knn", "task": "knn", "args": [
            "--config", str(ROOT / "configs/linear/fashion_mnist_demo.yaml"),
            "data.max_train_images=200", "data.max_val_images=100"]}],
        "formats": ["torchvision"],
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def small_fs(tmp_path):
    """A real 8 MiB file system (tmpfs) at tmp_path/out/knn, unmounted afterwards."""
    where = tmp_path / "out" / "knn"
    where.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode}); "
                    "the full-disk path needs root or a user namespace")
    yield where
    subprocess.run(["umount", "-l", str(where)])


def test_bench_stage_without_disk_room_fails_alone_with_the_reason(tmp_path, small_fs, capsys):
    outcome = run_bench(bench_config(tmp_path), tmp_path / "out")
    stdout = capsys.readouterr().out
    assert outcome.statuses["convert/random-init"] == "done" and outcome.statuses["knn/random-init"] == "FAILED"
    failed = read_results(small_fs / "random-init/results.json")  # the failed row fits where the stage did not
    assert failed["status"] == "failed" and re.search(r"only \d+ MiB free in .*knn/random-init", failed["reason"])
    assert "knn/random-init: only" in stdout
    assert (tmp_path / "out/convert/random-init/torchvision.pth").exists()  # others ran
    assert (tmp_path / "out/report/report.md").exists()


def test_bench_stage_whose_folder_cannot_be_created_is_reported(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/knn").write_text("a file where the knn stage's folder should be")
    run_bench(bench_config(tmp_path), tmp_path / "out")
    stdout = capsys.readouterr().out
    line = next(x for x in stdout.splitlines() if "knn/random-init" in x and "FAILED" in x)
    assert line
    assert "knn/random-init: cannot write the knn/random-init stage's outputs" in stdout
