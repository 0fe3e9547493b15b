"""The bench's SLURM executor against a real single-node SLURM cluster that these tests
start themselves (tests/slurm_cluster.py; skipped, with the reason, where it cannot start):
the same stages and numbers as the local executor, nothing submitted twice, a failing
stage cancelling what depends on it, and a pretraining job that is stopped and requeued
resuming to the same weights as an uninterrupted run."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from slurm_cluster import SlurmCluster

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_DEMO = str(ROOT / "configs/pretrain/moco_v2_fmnist_demo.yaml")
KNN_DEMO = str(ROOT / "configs/linear/fashion_mnist_demo.yaml")
TINY_PRETRAIN = ["model.arch=resnet18", "data.image_size=32", "data.max_images=64", "data.num_workers=0",
                 "train.batch_size=16", "moco.queue_size=64", "train.max_steps=2", "moco.bn_splits=2"]
TINY_KNN = ["--config", KNN_DEMO, "data.max_train_images=300", "data.max_val_images=100"]
# One CPU a job, so the two-core node runs two stages side by side.
SLURM = {"poll_s": 1, "resources": {"default": {"cpus_per_task": 1, "mem_gb": 2, "time_min": 30}}}


@pytest.fixture(scope="module")
def cluster():
    why = SlurmCluster.unavailable()
    if why:
        pytest.skip(why)
    try:
        c = SlurmCluster().start()
    except (RuntimeError, OSError) as e:
        pytest.skip(f"the test SLURM cluster did not start here: {str(e).splitlines()[0]}")
    yield c
    c.stop()


def write_bench(folder: Path, pretrainings, tasks, **extra) -> Path:
    config = {"name": "slurm-test", "pretrainings": pretrainings, "tasks": tasks,
              "formats": ["torchvision"], "slurm": SLURM, **extra}  # extra may replace slurm
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def bench(cluster, config, out, *args, expect=0):
    env = {**cluster.env(), "OMP_NUM_THREADS": "1", "TORCH_HOME": str(Path(out).parent / "torch")}
    r = subprocess.run([sys.executable, "-m", "transfer", "bench", "--config", str(config),
                        "--output", str(out), *args], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=900)
    assert r.returncode == expect, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def records(out: Path) -> dict:
    """stage name -> its stage.json, for every stage folder under a bench output."""
    found = {}
    for p in sorted(Path(out).rglob("stage.json")):
        rec = json.loads(p.read_text())
        found[rec["name"]] = rec
    return found


def metrics(out: Path) -> dict:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text())["metrics"]
            for p in sorted(Path(out).rglob("results.json"))}


def test_a_slurm_bench_gives_the_local_numbers_and_a_rerun_submits_nothing_new(cluster, tmp_path):
    config = write_bench(tmp_path, [
        {"label": "MoCo tiny", "kind": "pretrain", "config": PRETRAIN_DEMO, "overrides": TINY_PRETRAIN},
        {"label": "random init", "kind": "random", "arch": "resnet18"},
    ], [{"name": "knn", "task": "knn", "args": TINY_KNN}])
    local = tmp_path / "local"
    bench(cluster, config, local, "jobs=2")

    # a quote and a ; in the folder every job's paths (and sbatch's log paths) go through
    out = tmp_path / "it's; slurm"
    first = bench(cluster, config, out, "executor=slurm")
    submitted = {n: r["job_id"] for n, r in records(out).items() if r.get("job_id")}
    # MoCo's pretrain and convert, random init's convert (its weights are the bench's own), 2 knn, report
    assert len(submitted) == 6, first
    jobs_before = set(cluster.jobs())

    again = bench(cluster, config, out, "executor=slurm")  # while they are queued or running
    assert "0 job(s) submitted" in again, again
    assert set(cluster.jobs()) == jobs_before
    refused = bench(cluster, config, out, expect=2)  # nor does executor local run them a second time
    assert re.search(r"^error: stage \S+ is SLURM job \d+ \((PENDING|RUNNING)\): wait for it or scancel",
                     refused, re.M), refused
    assert {n: r.get("job_id") for n, r in records(out).items() if n in submitted} == submitted

    waited = bench(cluster, config, out, "executor=slurm", "--wait")
    assert "bench finished" in waited and "kNN top-1" in waited
    assert all(cluster.jobs()[j] == "COMPLETED" for j in submitted.values()), cluster.jobs()
    assert {n: r["status"] for n, r in records(out).items()} == {
        n: r["status"] for n, r in records(local).items()}
    assert metrics(out) == metrics(local) and len(metrics(out)) == 2
    assert (out / "report/report.md").exists()

    # everything finished: a re-run is all cached and writes the report right here
    last = bench(cluster, config, out, "executor=slurm")
    assert "submitted" not in last and last.count(" cached ") == 6
    assert set(cluster.jobs()) == jobs_before


@pytest.mark.parametrize("kill_flag", ["yes", "no"], ids=["slurm-cancels", "bench-cancels"])
def test_a_failing_stage_cancels_its_dependants_which_become_failed_rows(cluster, tmp_path, kill_flag):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    # "no": a cluster where SLURM leaves them pending forever (DependencyNeverSatisfied)
    slurm = {**SLURM, "resources": {"default": {**SLURM["resources"]["default"],
                                                "sbatch": [f"--kill-on-invalid-dep={kill_flag}"]}}}
    config = write_bench(tmp_path, [
        {"label": "broken", "kind": "checkpoint", "path": str(broken)},
        {"label": "random init", "kind": "random", "arch": "resnet18"},
    ], [{"name": "knn", "task": "knn", "args": TINY_KNN}], slurm=slurm)
    out = tmp_path / "out"
    text = bench(cluster, config, out, "executor=slurm", "--wait", expect=1)
    recs = records(out)
    states = cluster.jobs()
    assert states[recs["convert/broken"]["job_id"]] == "FAILED"
    assert states[recs["knn/broken"]["job_id"]] == "CANCELLED"  # not left pending forever
    failed = json.loads((out / "knn/broken/results.json").read_text())
    assert failed["status"] == "failed" and failed["reason"].startswith("conversion failed")
    assert json.loads((out / "knn/random-init/results.json").read_text()).get("status", "ok") == "ok"
    assert "bench: 1 stage(s) failed: convert/broken" in text
    assert ("a stage they need failed" in text) == (kill_flag == "no")


def _wait_for_step(log: Path, step: int, cluster, job: str, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if log.exists():
            steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line]
            if steps and max(steps) >= step:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{log} never reached step {step}; the cluster says:\n" + cluster.describe_job(job))


def _requeued(cluster, job: str) -> None:
    """SLURM holds a requeued job for two minutes (its BeginTime); start it sooner, but only
    once its first attempt has left the node and a new second has begun: slurmd refuses a
    launch whose credential is not newer (whole seconds) than the kill's revocation ("Job
    credential revoked"), and the job then fails instead of running again."""
    deadline = time.time() + 60
    while cluster.jobs().get(job) != "PENDING" and time.time() < deadline:
        time.sleep(0.2)
    while cluster.job_processes(job) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")


def test_a_stopped_and_requeued_pretraining_resumes_to_the_uninterrupted_weights(cluster, tmp_path):
    # 16 steps an epoch, a checkpoint every 4 steps; stopped twice mid-epoch
    overrides = ["model.arch=resnet18", "data.image_size=32", "data.max_images=256", "data.num_workers=0",
                 "train.batch_size=16", "moco.queue_size=64", "moco.dim=16", "train.epochs=2",
                 "train.print_freq=1", "moco.bn_splits=2", "train.save_every_steps=4"]
    config = write_bench(tmp_path, [
        {"label": "MoCo", "kind": "pretrain", "config": PRETRAIN_DEMO, "overrides": overrides},
    ], [{"name": "knn", "task": "knn", "args": TINY_KNN}])
    straight = tmp_path / "straight"
    r = subprocess.run([sys.executable, "-m", "pretrain", "--config", PRETRAIN_DEMO, "--output",
                        str(straight), *overrides], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]

    out = tmp_path / "out"
    bench(cluster, config, out, "executor=slurm")
    job = records(out)["pretrain/moco"]["job_id"]
    log = out / "pretrain/moco/log.jsonl"
    _wait_for_step(log, 6, cluster, job)
    cluster.run("scancel", "--signal=USR2", job)  # what SLURM sends before the time limit (submitit)
    _requeued(cluster, job)
    _wait_for_step(log, 22, cluster, job)
    cluster.run("scontrol", "requeue", job)  # SLURM's own preemption: SIGTERM, then requeue
    _requeued(cluster, job)
    bench(cluster, config, out, "executor=slurm", "--wait")

    stage_log = (out / "pretrain/moco/stage.log").read_text()
    assert stage_log.count("resumed from") == 2, stage_log[-3000:]
    assert records(out)["pretrain/moco"]["status"] == "done"
    a = torch.load(straight / "checkpoint_last.pth", weights_only=True)
    b = torch.load(out / "pretrain/moco/checkpoint_last.pth", weights_only=True)
    assert a["step"] == b["step"] == 32
    for name, t in a["state_dict"].items():
        assert torch.equal(t, b["state_dict"][name]), name
