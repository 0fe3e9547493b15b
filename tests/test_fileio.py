"""mocobench.fileio: the one output-folder preparation (create, real write, room, lock),
atomic saves whose bytes depend only on the contents, strict JSON."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import fill, mount_tmpfs, unmount
from mocobench.errors import UserError
from mocobench.fileio import (atomic_json, atomic_torch_save, lock_output, prepare_output,
                              remove_stale_temporaries, sha256_file)

ROOT = Path(__file__).resolve().parents[1]

HOLD = textwrap.dedent("""
    import sys, time
    from mocobench.fileio import prepare_output
    lock = prepare_output(sys.argv[1], "test run")
    print("locked", flush=True)
    time.sleep(60)
""")


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/out's lock."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out")], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    yield p
    p.kill()
    p.wait()


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, holder):
    with pytest.raises(UserError, match=rf"in use by pid {holder.pid} on .* since .*; two runs must "
                                        r"not write one folder"):
        prepare_output(tmp_path / "out", "pretraining")


def test_the_lock_goes_with_the_holder_even_when_killed(tmp_path, holder):
    holder.kill()
    holder.wait()
    with prepare_output(tmp_path / "out", "pretraining"):
        pass


def test_the_lock_is_reentrant_in_one_process_and_released(tmp_path):
    outer = lock_output(tmp_path, "a")
    inner = lock_output(tmp_path, "b")  # a library call inside a CLI that holds it already
    inner.release()
    probe = [sys.executable, "-c", "import sys; from mocobench.fileio import lock_output; "
             "lock_output(sys.argv[1], 'probe')", str(tmp_path)]
    assert subprocess.run(probe, cwd=ROOT, capture_output=True).returncode != 0  # still held
    outer.release()
    assert subprocess.run(probe, cwd=ROOT, capture_output=True).returncode == 0


def test_an_output_inside_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"f is a file, not a folder"):
        prepare_output(tmp_path / "f" / "out", "results")


@pytest.fixture
def full_fs(tmp_path):
    """A really full file system (a 256 KiB tmpfs, filled), unmounted afterwards."""
    mnt = tmp_path / "full"
    mount_tmpfs(mnt, "256k")
    try:
        fill(mnt / "filler")
        yield mnt
    finally:
        unmount(mnt)


def test_a_really_full_disk_is_found_by_the_write_probe(full_fs):
    # need_bytes=0: only the real write can tell (creating an empty file still works there)
    (full_fs / "empty").touch()
    with pytest.raises(UserError, match=r"cannot write results in .*No space left on device"):
        prepare_output(full_fs / "out", "results", need_bytes=0)


def test_a_save_that_hits_a_full_disk_keeps_the_previous_file(full_fs):
    target = full_fs / "ckpt.pth"
    (full_fs / "filler").unlink()
    atomic_torch_save({"w": torch.zeros(10)}, target)  # fits
    before = sha256_file(target)
    fill(full_fs / "filler2")  # full again
    with pytest.raises(Exception):  # torch raises RuntimeError from its zip writer
        atomic_torch_save({"w": torch.zeros(100_000)}, target)
    assert sha256_file(target) == before
    assert not list(full_fs.glob(".ckpt.pth.*"))  # no temporary left behind


def test_same_contents_give_the_same_bytes(tmp_path):
    obj = {"state_dict": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3}
    atomic_torch_save(obj, tmp_path / "a.pth")
    first = sha256_file(tmp_path / "a.pth")
    atomic_torch_save(obj, tmp_path / "a.pth")
    assert sha256_file(tmp_path / "a.pth") == first


def test_stale_temporaries_of_killed_saves_are_removed(tmp_path):
    (tmp_path / ".ckpt.pth.abc123.tmp").write_text("left by a kill (old style)")
    (tmp_path / ".ckpt.pth.def456.tmp").mkdir()
    (tmp_path / ".ckpt.pth.def456.tmp" / "ckpt.pth").write_text("left by a kill")
    (tmp_path / "ckpt.pth").write_text("the real one")
    removed = remove_stale_temporaries(tmp_path, "ckpt.pth")
    assert len(removed) == 2 and [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_json_is_strict(tmp_path):
    atomic_json({"AP": float("nan"), "x": [float("inf"), 1.0]}, tmp_path / "r.json")
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"AP": None, "x": [None, 1.0]}
