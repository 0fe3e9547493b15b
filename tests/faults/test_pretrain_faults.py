"""Fault injection on real pretraining runs: a lost rank, a kill during a checkpoint
write, broken checkpoints, a diverging loss and a full disk each cost at most the
work since the last checkpoint and are reported in one line."""
import json
import struct
import subprocess
import time
import zipfile

import torch

from helpers import (ROOT, fault_command, fault_env, mount_tmpfs, one_line_error, run_pretrain, run_with_fault,
                     unmount)
from pretrain.checkpoint import load_checkpoint

def state(path):
    return torch.load(path, weights_only=True)


def assert_same_weights(a, b):
    assert (a["step"], a["epoch"], a["epoch_step"]) == (b["step"], b["epoch"], b["epoch_step"])
    for name, t in a["state_dict"].items():
        assert torch.equal(t, b["state_dict"][name]), name


def test_lost_rank_restarts_resumes_and_matches_an_uninterrupted_run(tmp_path):
    steps = ["train.max_steps=6", "train.save_every_steps=2"]
    straight = run_pretrain(tmp_path / "straight", *steps, nproc=2)
    assert straight.returncode == 0, straight.stderr[-2000:]
    faulty = run_with_fault(tmp_path / "faulty", "kill_rank:1:5", *steps, nproc=2, restarts=1)
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    assert "resumed from" in faulty.stdout and "step 4" in faulty.stdout  # the last checkpoint
    assert_same_weights(state(tmp_path / "straight/checkpoint_last.pth"),
                        state(tmp_path / "faulty/checkpoint_last.pth"))


def test_kill_between_temp_write_and_rename_keeps_the_previous_checkpoint(tmp_path):
    killed = run_with_fault(tmp_path, "kill_before_rename:2", "train.max_steps=3",
                            "train.save_every_steps=1")
    assert killed.returncode != 0
    assert state(tmp_path / "checkpoint_last.pth")["step"] == 1  # the write of step 2 never landed
    again = run_pretrain(tmp_path, "train.max_steps=3")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "step 1" in again.stdout.split("resumed from")[1].splitlines()[0]
    assert state(tmp_path / "checkpoint_last.pth")["step"] == 3
    # the killed run had logged step 2 after its last good checkpoint (step 1): the resumed run
    # cut the log back to step 1 before redoing it, so no step appears twice
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_broken_checkpoints_are_named_and_resume_falls_back_to_the_newest_valid(tmp_path):
    done = run_pretrain(tmp_path / "run", "train.max_steps=8", "train.save_every_epochs=1")
    assert done.returncode == 0, done.stderr[-2000:]
    reference = state(tmp_path / "run/checkpoint_last.pth")
    last, ep2 = tmp_path / "run/checkpoint_last.pth", tmp_path / "run/checkpoint_ep0002.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated
    with zipfile.ZipFile(ep2) as z:  # flip one byte in the middle of the largest tensor
        biggest = max(z.infolist(), key=lambda i: i.file_size)
    with open(ep2, "r+b") as f:
        f.seek(biggest.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(biggest.header_offset + 30 + name_len + extra_len + biggest.file_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))  # torch.load does not notice this by itself
    corrupt_copy = tmp_path / "corrupt.pth"
    corrupt_copy.write_bytes(ep2.read_bytes())  # the resumed run below rewrites ep2

    resumed = run_pretrain(tmp_path / "run", "train.max_steps=8", "train.save_every_epochs=1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    warnings = [x for x in resumed.stderr.splitlines() if x.startswith("warning: skipping")]
    assert len(warnings) == 2
    assert "checkpoint_last.pth" in warnings[0] and "truncated or corrupt" in warnings[0]
    assert "checkpoint_ep0002.pth" in warnings[1] and "checksum mismatch" in warnings[1]
    assert "checkpoint_ep0001.pth: epoch 1, step 4" in resumed.stdout
    assert_same_weights(reference, state(last))

    one_line_error(run_pretrain(tmp_path / "other", "--resume", str(corrupt_copy)), "checksum mismatch")


def test_diverging_loss_stops_with_one_line_and_keeps_finite_weights(tmp_path):
    result = run_with_fault(tmp_path, "nan_loss:3", "train.max_steps=5", "train.save_every_steps=1")
    one_line_error(result, "loss is nan at step 3 (last finite loss")
    assert "lower train.lr" in result.stderr
    ckpt = state(tmp_path / "checkpoint_last.pth")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())


def test_full_disk_is_refused_before_starting(tmp_path):
    result = run_with_fault(tmp_path, "disk_free:1000000", "train.max_steps=2")
    one_line_error(result, "MiB free in")
    assert not (tmp_path / "checkpoint_last.pth").exists()


def test_a_really_full_disk_during_a_checkpoint_write_is_one_line_and_the_previous_stays(tmp_path):
    """A small tmpfs, filled just before the second checkpoint write: torch's own zip writer
    fails on the full file system (its RuntimeError, not an injected OSError)."""
    mnt = tmp_path / "small"
    mount_tmpfs(mnt, "400m")  # room for the start-up check (twice a ~135 MB checkpoint)
    try:
        result = run_with_fault(mnt / "run", "fill_disk_at_save:2", "train.max_steps=3",
                                "train.save_every_steps=1")
        one_line_error(result, "cannot write checkpoint")
        assert "MiB free there); the previous checkpoint is intact" in result.stderr
        assert load_checkpoint(mnt / "run/checkpoint_last.pth")["step"] == 1  # checksum verified
        assert not [p for p in (mnt / "run").iterdir() if p.name.endswith(".tmp")]
    finally:
        unmount(mnt)


def test_a_second_pretraining_into_the_same_folder_is_refused_and_the_first_is_intact(tmp_path):
    """Two real processes: the first holds the folder (paused before its 2nd step), the
    second, with another lr, is refused in one line naming it; the first then finishes with
    the weights and log of a run that was never disturbed."""
    go = tmp_path / "go"
    first = subprocess.Popen(fault_command(tmp_path / "run", "train.max_steps=4"),
                             cwd=ROOT, env=fault_env(f"wait_for_file:2:{go}"), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        log = tmp_path / "run/log.jsonl"
        deadline = time.time() + 300
        while not (log.exists() and log.read_text().strip()) and time.time() < deadline:
            time.sleep(0.2)  # the first has trained one step: it holds the lock
        second = run_pretrain(tmp_path / "run", "train.max_steps=4", "train.lr=0.1")
        one_line_error(second, f"is in use by pid {first.pid}")
    finally:
        go.touch()
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    straight = run_pretrain(tmp_path / "straight", "train.max_steps=4")
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert_same_weights(state(tmp_path / "straight/checkpoint_last.pth"), state(tmp_path / "run/checkpoint_last.pth"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert "lr: 0.06" in (tmp_path / "run/config.yaml").read_text()  # not the second's 0.1


def test_stale_temporaries_of_killed_saves_are_removed_at_start(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ".checkpoint_last.pth.abc123.tmp").mkdir()
    (tmp_path / ".checkpoint_last.pth.abc123.tmp/checkpoint_last.pth").write_bytes(b"half a checkpoint")
    (tmp_path / ".checkpoint_ep0002.pth.def456.tmp").write_bytes(b"older style")
    result = run_pretrain(tmp_path, "train.max_steps=1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_failed_checkpoint_write_is_one_line_and_the_previous_stays(tmp_path):
    result = run_with_fault(tmp_path, "enospc_save:2", "train.max_steps=3", "train.save_every_steps=1")
    one_line_error(result, "No space left on device")
    assert state(tmp_path / "checkpoint_last.pth")["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
