"""transfer linear / knn on real Fashion-MNIST subsets with ResNet-18 at 32 px.

A backbone with signal is made honestly and cheaply here: ResNet-18 trained
supervised for 50 steps on Fashion-MNIST train images (the probes are scored on
the test split, which it never saw), saved as a pretrain-format checkpoint.
"""
import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision import transforms as T

import transfer.features as features_mod
from mocobench.config import load_config
from mocobench.data import build_dataset
from mocobench.errors import UserError
from mocobench.fileio import sha256_file, tensor_digest
from mocobench.knn import topk_accuracy
from converters import load_backbone
from transfer import logreg
from transfer.features import load_frozen_backbone, resolve_preprocessing
from transfer.linear import LinearConfig, run
from transfer.linear_paper import sanity_check, train_linear_paper
from transfer.results import read_results

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
# Small enough for a 2-core CI, large enough that 10-class accuracies are not noise.
PROBE = [f"data.default_image_size={SIZE}", "data.max_train_images=800", "data.max_val_images=400",
         "data.num_workers=0", "features.batch_size=200", "fast.l2_grid=[0.001,0.1]",
         "fast.max_iter=300"]


def config(cache_dir, *extra) -> LinearConfig:
    return load_config(LinearConfig, None, PROBE + [f"features.cache_dir={cache_dir}", *extra])


@pytest.fixture(scope="module")
def signal_weights(tmp_path_factory) -> Path:
    """ResNet-18 trained supervised for 50 steps on 1920 Fashion-MNIST train images, saved
    as a pretrain checkpoint (moco-bench format, so its image_size and normalization travel)."""
    torch.manual_seed(0)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    tf = T.Compose([T.Resize(SIZE), T.ToTensor(), T.Normalize(mean, std)])
    ds = build_dataset("fashion-mnist", "train", tf, max_images=1920, seed=123)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = torch.tensor(ds.targets)
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(50):
        idx = torch.randint(0, len(images), (64,))
        loss = torch.nn.functional.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("weights") / "supervised_r18.pth"
    ckpt = {"format": "moco-bench.pretrain/1", "arch": "resnet18", "method": "supervised",
            "backbone_prefix": "encoder.", "epoch": 0, "step": 50,
            "state_dict": {f"encoder.{k}": v for k, v in model.state_dict().items()},
            "normalization": {"mean": mean, "std": std, "input_format": "RGB"}, "image_size": SIZE}
    torch.save({**ckpt, "checksum": tensor_digest(ckpt)}, path)  # stamped as pretrain does
    return path


@pytest.fixture(scope="module")
def runs(signal_weights, tmp_path_factory):
    """Fast and kNN runs for the trained and the random backbone, counting extractions."""
    tmp = tmp_path_factory.mktemp("runs")
    cache = tmp / "cache"
    calls = []
    original = features_mod.extract_dataset

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return original(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(features_mod, "extract_dataset", counting)
    try:
        out = {}
        for name, weights, arch in [("signal", str(signal_weights), None),
                                    ("random", "random", "resnet18")]:
            extra = [f"model.arch={arch}"] if arch else []
            out[f"{name}_fast"] = run("linear", config(cache, *extra), weights, tmp / f"{name}_fast")
            out[f"{name}_knn"] = run("knn", config(cache, *extra), weights, tmp / f"{name}_knn")
        before = len(calls)
        out["signal_fast_again"] = run("linear", config(cache), str(signal_weights), tmp / "again")
        out["extractions"] = (before, len(calls))
    finally:
        mp.undo()
    out["cache_dir"] = cache
    return out


def test_signal_beats_random_under_fast_and_knn(runs):
    # Random ResNet features are a strong linear baseline on Fashion-MNIST (~74% here), so
    # the probe margin is smaller than kNN's (measured: ~+6 points fast, ~+23 kNN).
    sig, rnd = runs["signal_fast"]["metrics"], runs["random_fast"]["metrics"]
    assert sig["top1"] > rnd["top1"] + 3, (sig, rnd)
    sig, rnd = runs["signal_knn"]["metrics"], runs["random_knn"]["metrics"]
    assert sig["knn_top1"] > rnd["knn_top1"] + 10, (sig, rnd)


def test_second_run_hits_the_cache_without_extracting(runs):
    before, after = runs["extractions"]
    assert before == 4, "train and val features, once per backbone; kNN reuses them"
    assert after == before
    assert runs["signal_fast_again"]["derived"]["feature_cache"] == {"train": "hit", "val": "hit"}
    assert runs["signal_knn"]["derived"]["feature_cache"] == {"train": "hit", "val": "hit"}
    assert runs["signal_fast_again"]["metrics"] == runs["signal_fast"]["metrics"]


def test_results_files_follow_the_schema(runs, signal_weights):
    rec = read_results(runs["signal_fast"]["path"])  # validates against the schema
    assert rec["task"] == "linear" and rec["protocol"]["name"] == "fast"
    assert rec["engine"] in ("sklearn", "torch")
    assert rec["dataset"]["name"] == "fashion-mnist"
    assert rec["dataset"]["splits"] == {"train": 800, "val": 400}
    assert rec["weights"]["sha256"] == sha256_file(signal_weights)
    assert rec["weights"]["layout"] == "moco-bench"
    assert rec["weights"]["label"] == "supervised 50 steps"
    assert set(rec["metrics"]) == {"top1", "top5"}
    cfg = rec["config"]
    assert cfg["data"]["image_size"] == SIZE and cfg["data"]["resize_size"] == 37
    assert "image_size from weights" in cfg["derived"]["preprocessing_source"]
    assert cfg["derived"]["l2"] in (0.001, 0.1) and "paper" not in cfg
    knn = read_results(runs["random_knn"]["path"])
    assert knn["config"]["data"]["image_size"] == SIZE  # default_image_size: random init has none
    assert knn["task"] == "knn" and set(knn["metrics"]) == {"knn_top1", "knn_top5"}
    assert knn["weights"]["label"].startswith("random init") and knn["weights"]["sha256"] is None
    assert knn["config"]["knn"] == {"k": 200, "temperature": 0.1}


def test_torch_solver_agrees_with_sklearn(runs):
    """The ImageNet-scale solver reaches the same accuracy as scikit-learn on real features."""
    stored = [torch.load(p, weights_only=True) for p in glob.glob(str(runs["cache_dir"] / "*.pt"))]
    train = next(s for s in stored if s["description"]["split"] == "train"
                 and s["description"]["weights"].startswith("sha256"))
    val = next(s for s in stored if s["description"]["split"] == "val"
               and s["description"]["weights"] == train["description"]["weights"])
    acc = {}
    for solver in ("sklearn", "torch"):
        clf = logreg.fit(train["features"], train["labels"], 10, l2=1e-2, solver=solver, max_iter=200)
        acc[solver] = topk_accuracy(clf.scores(val["features"]), val["labels"], ks=(1,))[1]
    assert abs(acc["sklearn"] - acc["torch"]) <= 1.0, acc
    clf, record = logreg.select_and_fit(train["features"], train["labels"], 10, [1e-3, 1e-1], 0.2,
                                        "torch", max_iter=100, select_max_images=300,
                                        log=lambda m: None)
    assert record["search_images"] == 300 and record["holdout_images"] == 160
    top1 = topk_accuracy(clf.scores(val["features"]), val["labels"], ks=(1,))[1]
    assert abs(top1 - acc["sklearn"]) <= 3.0, (top1, acc)


def test_torch_solver_streams_row_chunks_like_one_batch():
    """More rows than one chunk (65536): the streamed loss/gradient equals sklearn's fit."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g)
    y = torch.randint(0, 3, (140_000,), generator=g)
    x = (centers[y] + 1.5 * torch.randn(len(y), 8, generator=g)).half()  # float16 cache dtype
    a = logreg.fit(x, y, 3, 1e-3, "sklearn", max_iter=200)
    b = logreg.fit(x, y, 3, 1e-3, "torch", max_iter=200)
    agree = (a.scores(x).argmax(1) == b.scores(x).argmax(1)).float().mean().item()
    assert agree > 0.995, agree


def test_paper_protocol_trains_only_fc_and_keeps_backbone_bit_identical(signal_weights, tmp_path):
    cfg = config(tmp_path / "cache", "data.max_train_images=256", "data.max_val_images=128",
                 "paper.epochs=2", "paper.lr_steps=[1]", "paper.batch_size=64", "paper.lr=1.0",
                 "protocol=paper")
    backbone = load_frozen_backbone(str(signal_weights))
    pre = resolve_preprocessing(backbone.meta, SIZE, None, None, None)
    train = build_dataset("fashion-mnist", "train", None, 256, 0)
    val = build_dataset("fashion-mnist", "val", None, 128, 0)
    metrics, derived = train_linear_paper(cfg, backbone, pre, train, val, torch.device("cpu"),
                                          tmp_path, log=lambda m: None)
    model = backbone.model
    file_tensors = load_backbone(signal_weights).state_dict
    state = model.state_dict()
    assert set(state) - set(file_tensors) == {"fc.weight", "fc.bias"}
    for k, v in file_tensors.items():  # BN running statistics included
        assert torch.equal(state[k], v), k
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert model.fc.weight.shape == (10, 512)
    assert derived["lr"] == 1.0 * 64 / 256 and derived["sanity_check"] == "passed"
    assert 0 <= metrics["top1"] <= 100 and len(derived["history"]) == 2

    model.layer1[0].bn1.running_mean[0] += 1e-6
    with pytest.raises(RuntimeError, match="layer1.0.bn1.running_mean changed"):
        sanity_check(model, backbone.reference)


def test_paper_cli_writes_results_and_resumes(signal_weights, tmp_path, capsys):
    args = ["--weights", str(signal_weights), "--output", str(tmp_path / "out"), "--protocol",
            "paper", "data.max_train_images=128", "data.max_val_images=64", "paper.epochs=1",
            "paper.batch_size=64", "paper.lr=1.0", *PROBE[:1], "data.num_workers=0"]
    from transfer.linear import main_linear

    first = main_linear(args)
    rec = read_results(first["path"])
    assert rec["protocol"]["name"] == "paper" and rec["engine"] == "torch"
    assert rec["config"]["paper"]["epochs"] == 1 and "features" not in rec["config"]
    assert "lr 0.25 = 1 x 64/256" in capsys.readouterr().out
    second = main_linear(args)  # the checkpoint says epoch 1 of 1: nothing left to train
    assert "resumed from" in capsys.readouterr().out
    assert second["metrics"]["top1"] == first["metrics"]["top1"]
    with pytest.raises(SystemExit):  # other settings must not continue that checkpoint
        main_linear(args + ["paper.lr=2.0"])
    assert "use a new --output folder" in capsys.readouterr().err


def test_preprocessing_travels_with_the_weights():
    meta = {"image_size": 48, "normalization": {"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1],
                                                "input_format": "RGB"}}
    pre = resolve_preprocessing(meta, None, None, None, None)
    assert (pre.image_size, pre.resize_size, pre.mean) == (48, 55, [0.1, 0.2, 0.3])
    pre = resolve_preprocessing(meta, 32, 40, [0.5, 0.5, 0.5], [0.2, 0.2, 0.2])
    assert (pre.image_size, pre.resize_size, pre.mean, pre.std) == (32, 40, [0.5] * 3, [0.2] * 3)
    pre = resolve_preprocessing({}, None, None, None, None)
    assert (pre.image_size, pre.resize_size, pre.mean) == (224, 256, [0.485, 0.456, 0.406])
    with pytest.raises(UserError, match="only RGB backbones"):
        resolve_preprocessing({"normalization": {"input_format": "BGR"}}, None, None, None, None)
    with pytest.raises(UserError, match="smaller than data.image_size"):
        resolve_preprocessing({}, 32, 30, None, None)


def test_in_process_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="--weights random needs an architecture"):
        load_frozen_backbone("random")
    with pytest.raises(UserError, match="unknown arch 'resnet7'"):
        load_frozen_backbone("random", "resnet7")
    with pytest.raises(UserError, match=r"unknown config key fast\.l2; "):
        load_config(LinearConfig, None, ["fast.l2=1"])
    with pytest.raises(UserError, match="fast.solver='newton' is not one of"):
        logreg.choose_solver("newton", torch.zeros(2, 2), 10)


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "transfer", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("case", ["missing weights", "no class folders", "wrong arch"])
def test_cli_bad_inputs_give_one_line_and_exit_2(case, signal_weights, tmp_path):
    out = str(tmp_path / "out")
    if case == "missing weights":
        args = ["linear", "--weights", str(tmp_path / "nope.pth"), "--output", out]
        expect = "weights file .*nope.pth does not exist"
    elif case == "no class folders":
        (tmp_path / "data" / "train").mkdir(parents=True)
        (tmp_path / "data" / "val").mkdir()
        args = ["knn", "--weights", "random", "--arch", "resnet18", "--data",
                str(tmp_path / "data"), "--output", out]
        expect = "has no class folders; put each class's images in"
    else:
        args = ["linear", "--weights", str(signal_weights), "--arch", "resnet50", "--output", out]
        expect = "holds a resnet18 backbone, not resnet50"
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert re.search(expect, lines[0]), lines[0]
    assert not (tmp_path / "out" / "results.json").exists()


def _torchrun(*args):
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "transfer", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_torchrun_two_processes_match_one(tmp_path):
    """Sharded extraction + gather (gloo) gives the features one process gets."""
    common = ["--weights", "random", "--arch", "resnet18", *PROBE, "data.max_train_images=300",
              "data.max_val_images=100", f"features.cache_dir={tmp_path / 'cache'}"]
    _torchrun("knn", "--output", str(tmp_path / "two"), *common)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["config"]["derived"]["world_size"] == 2
    cfg = load_config(LinearConfig, None, common[4:] + ["model.arch=resnet18", "features.cache=false"])
    one = run("knn", cfg, "random", tmp_path / "one")
    assert abs(two["metrics"]["knn_top1"] - one["metrics"]["knn_top1"]) <= 1.0


def test_torchrun_paper_protocol_splits_the_batch(tmp_path):
    """DDP over the fc (gloo), global batch split over 2 processes, sanity check on rank 0."""
    proc = _torchrun("linear", "--protocol", "paper", "--weights", "random", "--arch", "resnet18",
                     "--output", str(tmp_path / "out"), f"data.default_image_size={SIZE}",
                     "data.max_train_images=96", "data.max_val_images=50",
                     "data.num_workers=0", "paper.epochs=1", "paper.batch_size=48", "paper.lr=0.1")
    rec = read_results(tmp_path / "out" / "results.json")
    derived = rec["config"]["derived"]
    assert derived["world_size"] == 2 and derived["per_process_batch"] == 24
    assert derived["sanity_check"] == "passed"
    assert "(global batch 48 = 2 x 24)" in proc.stdout
    assert proc.stdout.count("sanity check passed") == 1  # only rank 0 logs


def test_protocol_benchmark_runs_side_by_side(tmp_path):
    """benchmarks/linear_protocols.py at toy scale: every run reported, JSON written."""
    from benchmarks.linear_protocols import compare

    overrides = [f"data.default_image_size={SIZE}", "data.max_train_images=96",
                 "data.max_val_images=48", "data.num_workers=0", "fast.l2_grid=[0.01]",
                 "paper.epochs=1", "paper.batch_size=48", "paper.lr=0.1"]
    summary = compare("random", tmp_path, None, overrides, arch="resnet18")
    assert [r["run"] for r in summary["rows"]] == ["fast (cold cache)", "fast (warm cache)",
                                                   "knn", "paper", "paper SGD on eval-view features"]
    cold, warm = (read_results(r["results"])["config"]["derived"]["feature_cache"]
                  for r in summary["rows"][:2])
    assert cold == {"train": "miss", "val": "miss"} and warm == {"train": "hit", "val": "hit"}
    saved = json.loads((tmp_path / "linear_protocols.json").read_text())
    assert saved["speedup_fast_cold"] == summary["rows"][0]["paper_time_over_this"]
    assert saved["scale"]["max_train_images"] == 96 and saved["paper_epochs"] == 1
    assert 0 <= saved["top1_paper_sgd_on_eval_features"] <= 100
