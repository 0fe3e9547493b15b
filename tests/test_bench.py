"""The bench runs every stage through the real CLIs, caches finished stages by content,
re-runs only what changed (or what was lost), runs seeds as stages of their own, marks
unavailable baselines as missing, handles any path a user has, takes its stages down with
it when it is killed, and is checked in full before anything runs."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from mocobench.errors import UserError
from transfer.bench_sources import imagenet_weights
from transfer.results import read_results
from transfer.stage import launch_argv

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_DEMO = str(ROOT / "configs/pretrain/moco_v2_fmnist_demo.yaml")
TINY_PRETRAIN = ["model.arch=resnet18", "data.image_size=32", "data.max_images=64",
                 "data.num_workers=0", "train.batch_size=16", "moco.queue_size=64",
                 "train.max_steps=2", "moco.bn_splits=2"]
TINY_KNN = ["data.max_train_images=300", "data.max_val_images=100"]


def tiny_pretrain(steps: int) -> list[str]:
    return [o for o in TINY_PRETRAIN if not o.startswith("train.max_steps")] + [f"train.max_steps={steps}"]


def write_bench(tmp_path, knn_config, **extra) -> Path:
    config = {
        "name": "tiny",
        "scale": "a few steps on 64 images",
        "pretrainings": [
            {"label": "MoCo tiny", "kind": "pretrain", "overrides": TINY_PRETRAIN,
             "config": PRETRAIN_DEMO},
            # a source that cannot be reached: the bench is offline here, deterministically
            {"label": "supervised IN-1k", "kind": "imagenet_supervised", "arch": "resnet50",
             "url": f"file://{tmp_path}/offline/resnet50-0676ba61.pth"},
            {"label": "random init", "kind": "random", "arch": "resnet18"},
        ],
        "tasks": [{"name": "knn", "task": "knn", "args": ["--config", str(knn_config), *TINY_KNN]}],
        "formats": ["torchvision"],
        **extra,
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_bench(config, out, torch_home, *overrides, expect=0, cwd=ROOT):
    env = {**os.environ, "TORCH_HOME": str(torch_home), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "transfer", "bench", "--config", str(config),
                             "--output", str(out), *overrides], capture_output=True, text=True, cwd=cwd,
                            env=env, timeout=900)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    status = dict(re.findall(r"^\[\s*\d+/\d+\] (\S+)\s+(\S+)", result.stdout, re.M))
    return result.stdout + result.stderr, status


def test_bench_runs_caches_and_reruns_only_what_changed_or_was_lost(tmp_path):
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

    # a deleted checkpoint re-runs its stage and what depends on it; a corrupt stage.json re-runs its stage
    (out / "pretrain/moco-tiny/checkpoint_last.pth").unlink()
    (out / "knn/random-init/stage.json").write_text('{"key": "trunc')
    text, fourth = run_bench(bench, out, torch_home)
    assert fourth["pretrain/moco-tiny"] == fourth["convert/moco-tiny"] == fourth["knn/moco-tiny"] == "done"
    assert fourth["knn/random-init"] == "done" and fourth["convert/random-init"] == "cached"
    assert (out / "pretrain/moco-tiny/checkpoint_last.pth").exists()


def test_seeds_are_stages_of_their_own_cached_one_by_one(tmp_path):
    knn_config = ROOT / "configs/linear/fashion_mnist_demo.yaml"
    config = {"name": "seeds", "formats": ["torchvision"], "pretrainings": [
        {"label": "random init", "kind": "random", "arch": "resnet18", "seeds": [0, 1]}],
        "tasks": [{"name": "knn", "task": "knn", "args": ["--config", str(knn_config), *TINY_KNN],
                   "seeds": [0, 1]}]}
    bench = tmp_path / "bench.yaml"
    bench.write_text(yaml.safe_dump(config))
    out, torch_home = tmp_path / "out", tmp_path / "torch"
    _, status = run_bench(bench, out, torch_home)
    runs = [f"knn/random-init-seed{p}/seed{f}" for p in (0, 1) for f in (0, 1)]
    assert all(status[r] == "done" for r in runs), status
    records = {r: read_results(out / r / "results.json") for r in runs}
    assert [records[r]["seed"] for r in runs] == [0, 1, 0, 1]  # the fine-tuning seed reached the task
    weights = {r: records[r]["weights"]["sha256"] for r in runs}
    assert weights[runs[0]] == weights[runs[1]] != weights[runs[2]] == weights[runs[3]]
    assert {records[r]["weights"]["label"] for r in runs} == {"random init"}  # one row in the report
    assert re.search(r"\| random init\s+\| 4 ", (out / "report/report.md").read_text())

    config["tasks"][0]["seeds"] = [0, 1, 2]
    bench.write_text(yaml.safe_dump(config))
    _, more = run_bench(bench, out, torch_home)
    assert all(more[r] == "cached" for r in runs)
    assert more["knn/random-init-seed0/seed2"] == more["knn/random-init-seed1/seed2"] == "done"


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


def _hub_named(state: dict, folder: Path, stem: str) -> Path:
    """A file named as torch.hub names downloads: STEM-<first 8 hex of its sha256>.pth."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tmp.pth"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    return tmp.rename(folder / f"{stem}-{digest[:8]}.pth")


def test_quotes_and_semicolons_in_every_path_run_nothing_but_the_stages(tmp_path):
    odd = tmp_path / "it's; \"odd\" $(touch PWNED)"
    odd.mkdir()
    pretrain_config, knn_config = odd / "pre'train;.yaml", odd / "k'nn;.yaml"
    shutil.copy(PRETRAIN_DEMO, pretrain_config)
    shutil.copy(ROOT / "configs/pretrain/moco_v2_r50_in1k.yaml", odd)  # its _base_
    shutil.copy(ROOT / "configs/linear/fashion_mnist_demo.yaml", knn_config)
    weights = torchvision.models.resnet18().state_dict()
    malicious = odd / "x'; touch PWNED; echo '.pth"  # the file name
    torch.save(weights, malicious)
    mirror = _hub_named(weights, odd / "mir'ror;", "resnet18")  # torchvision's weights API, from a file:// URL
    config = {"name": "odd", "formats": ["torchvision"], "pretrainings": [
        {"label": "MoCo 'quoted'; tiny", "kind": "pretrain", "config": str(pretrain_config),
         "overrides": tiny_pretrain(1)},
        {"label": "theirs", "kind": "checkpoint", "path": str(malicious)},
        {"label": "supervised", "kind": "imagenet_supervised", "arch": "resnet18", "url": mirror.as_uri()}],
        "tasks": [{"name": "knn", "task": "knn", "args": ["--config", str(knn_config), *TINY_KNN]}]}
    bench = odd / "be'nch;.yaml"
    bench.write_text(yaml.safe_dump(config))
    out, torch_home = odd / "o'ut; ls", odd / "tor'ch;"
    text, status = run_bench(bench, out, torch_home, "jobs=2", cwd=odd)
    assert all(status[f"knn/{r}"] == "done" for r in ("moco-quoted-tiny", "theirs", "supervised")), text
    assert not list(tmp_path.rglob("PWNED")) and not (ROOT / "PWNED").exists()
    downloaded = torch_home / "hub/checkpoints" / mirror.name  # into torch's hub cache, checksum verified
    assert downloaded.read_bytes() == mirror.read_bytes()
    assert read_results(out / "knn/supervised/results.json")["weights"]["path"] == str(downloaded)
    assert read_results(out / "knn/theirs/results.json")["weights"]["label"] == "theirs"


def test_imagenet_weights_come_through_the_weights_api_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch/hub/checkpoints"
    offline = f"file://{tmp_path}/nowhere/resnet50-0676ba61.pth"
    with pytest.raises(UserError, match=r"cannot download them .*: place resnet50-0676ba61\.pth .* in .*checkpoints/"):
        imagenet_weights("resnet50", url=offline)
    good = _hub_named(torchvision.models.resnet18().state_dict(), tmp_path / "mirror", "resnet18")
    corrupt = good.parent / good.name.replace("resnet18", "resnet18x")
    corrupt.write_bytes(good.read_bytes()[:-1] + b"!")  # one byte changed after it was named
    with pytest.raises(UserError, match=r"download of .*resnet18x-.*is corrupt .*invalid hash value"):
        imagenet_weights("resnet18", url=corrupt.as_uri())
    assert not cache.exists() or not list(cache.iterdir())  # nothing kept
    got = imagenet_weights("resnet18", url=good.as_uri())
    assert got == cache / good.name and got.read_bytes() == good.read_bytes()
    good.unlink()
    assert imagenet_weights("resnet18", url=good.as_uri()) == got  # from the cache, offline
    # torchvision's own entry: its URL, checksum prefix and the cache file a download would go to
    entry = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    (cache / Path(entry.url).name).write_bytes(b"placed by hand")
    assert imagenet_weights("resnet50") == cache / "resnet50-0676ba61.pth"
    with pytest.raises(UserError, match="do not exist"):
        imagenet_weights("resnet50", path=str(tmp_path / "nope.pth"))


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            found.append(c)
            stack.append(c)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_killed_bench_leaves_no_stage_process_and_a_second_bench_is_refused(tmp_path):
    config = {"name": "long", "formats": ["torchvision"], "pretrainings": [
        {"label": "MoCo", "kind": "pretrain", "config": PRETRAIN_DEMO, "nproc": 2,  # torchrun + 2 workers
         "overrides": [*tiny_pretrain(100000), "train.epochs=100000"]}],
        "tasks": [{"name": "knn", "task": "knn", "args": TINY_KNN}]}
    bench = tmp_path / "bench.yaml"
    bench.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "transfer", "bench", "--config", str(bench), "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline, tree = time.time() + 120, []
        while time.time() < deadline and not (out / "pretrain/moco/log.jsonl").exists():
            time.sleep(0.5)
        tree = _descendants(first.pid)  # runner, torchrun, its two workers (own sessions) and theirs
        sessions = {os.getsid(p) for p in tree if _alive(p)}
        assert len(tree) >= 4 and len(sessions) >= 3, tree

        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and re.search(rf"error: {re.escape(str(out))} is in use by pid "
                                                    rf"{first.pid} on ", second.stderr), second.stderr
        first.send_signal(signal.SIGKILL)
        first.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in tree):
            time.sleep(0.2)
        assert not [p for p in tree if _alive(p)]
    finally:
        for p in [first.pid, *tree]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_failures_are_rows_a_failed_rerun_replaces_old_numbers_and_no_result_exits_non_zero(tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    knn = ["--config", str(ROOT / "configs/linear/fashion_mnist_demo.yaml"), *TINY_KNN]
    config = {"name": "fails", "formats": ["torchvision"], "pretrainings": [
        {"label": "random init", "kind": "random", "arch": "resnet18"},
        {"label": "broken", "kind": "checkpoint", "path": str(broken)}],
        "tasks": [{"name": "knn", "task": "knn", "args": knn}]}
    bench, out, torch_home = tmp_path / "bench.yaml", tmp_path / "out", tmp_path / "torch"
    bench.write_text(yaml.safe_dump(config))
    text, status = run_bench(bench, out, torch_home, expect=1)  # some stage failed
    assert status["convert/broken"] == "FAILED" and status["knn/broken"] == "failed"
    assert status["knn/random-init"] == "done" and "bench: 1 stage(s) failed: convert/broken" in text
    row = read_results(out / "knn/broken/results.json")
    assert row["status"] == "failed" and row["reason"].startswith("conversion failed: ")
    assert isinstance(row["protocol"], dict)  # a record, never the string results' shim took
    report = (out / "report/report.md").read_text()  # the failed row sits in its task's table
    assert re.search(r"^\|\s*broken\s*\|.*failed", report, re.M), report

    config["tasks"][0]["args"] = [*knn, "data.max_train_images=many"]  # the task itself now fails
    bench.write_text(yaml.safe_dump(config))
    text, status = run_bench(bench, out, torch_home, expect=2)  # and no stage produced a result
    assert status["knn/random-init"] == "FAILED"
    assert re.search(r"^error: no stage produced a result", text, re.M)
    rerun = read_results(out / "knn/random-init/results.json")
    assert rerun["status"] == "failed" and rerun["metrics"] == {}  # not the first run's numbers
    assert "max_train_images" in rerun["reason"]


def test_dry_run_prints_commands_resources_and_sbatch_scripts_and_runs_nothing(tmp_path):
    out = tmp_path / "paper"
    r = subprocess.run([sys.executable, "-m", "transfer", "bench", "--config",
                        "configs/bench/moco_in1k_paper.yaml", "--output", str(out), "--dry-run",
                        "executor=slurm", "slurm.resources.default.partition=gpu"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    text = r.stdout
    assert not out.exists()
    assert "torch.distributed.run --nproc_per_node=8" in text and "-m pretrain --config" in text
    assert re.search(r"-m transfer detect --num-gpus 8 --weights .* --engine detectron2", text)
    assert re.search(r"-m transfer segment --launcher pytorch --weights", text)
    assert "resources: 1 node(s) x 8 GPU(s), 80 CPUs, 480 GB, 4320 min, partition gpu" in text
    scripts = text.split("# sbatch script of the ")[1:]
    assert [s.split(" ")[0] for s in scripts] == ["pretrain", "convert", "linear", "detect", "segment", "report"]
    for script in scripts:
        assert "#SBATCH --kill-on-invalid-dep=yes" in script and "#SBATCH --signal=USR2@120" in script
        assert "#SBATCH --partition=gpu" in script
    assert "#SBATCH --gpus-per-node=8" in scripts[0] and "#SBATCH --dependency='afterany:" in scripts[-1]


def test_launchers_per_tool_on_one_node_and_several():
    py = [sys.executable, "-m"]
    one = {"style": "torchrun", "nproc": 1, "nodes": 1}
    assert launch_argv(["transfer", "knn", "--x"], one) == [*py, "transfer", "knn", "--x"]
    eight = {"style": "torchrun", "nproc": 8, "nodes": 1}
    assert launch_argv(["pretrain", "--config", "c"], eight) == [
        *py, "torch.distributed.run", "--nproc_per_node=8", "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0", "-m", "pretrain", "--config", "c"]
    two_nodes = {"style": "torchrun", "nproc": 8, "nodes": 2}
    argv = launch_argv(["pretrain", "--config", "c"], two_nodes, node=1, hosts=["n1", "n2"], job_id="4242")
    assert argv[3:8] == ["--nproc_per_node=8", "--nnodes=2", "--rdzv-id=4242", "--rdzv-backend=c10d",
                         "--rdzv-endpoint=n1:24242"]
    d2 = {"style": "detectron2", "nproc": 8, "nodes": 2}
    argv = launch_argv(["transfer", "detect", "--weights", "w", "SOLVER.MAX_ITER", "10"], d2, node=1,
                       hosts=["n1", "n2"], job_id="7")
    assert argv == [*py, "transfer", "detect", "--num-gpus", "8", "--num-machines", "2", "--machine-rank",
                    "1", "--dist-url", "tcp://n1:20007", "--weights", "w", "SOLVER.MAX_ITER", "10"]
