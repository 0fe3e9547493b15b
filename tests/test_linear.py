"""transfer linear / knn on real Fashion-MNIST subsets with ResNet-18 at 32 px.

A backbone with signal is made honestly and cheaply here: ResNet-18 trained
supervised for 50 steps on Fashion-MNIST train images (the probes choose settings on
the carved val split and are scored on the test split, which it never saw), saved
as a pretrain-format checkpoint (tests/helpers.py).
"""
import contextlib
import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import transfer.features as features_mod
from mocobench.config import load_config
from mocobench.errors import UserError
from mocobench.fileio import sha256_file
from mocobench.knn import topk_accuracy
from converters import load_backbone
from transfer import logreg
from transfer import frozen
from transfer.features import load_frozen_backbone, resolve_preprocessing
from transfer.linear import LinearConfig, run
from transfer.linear_paper import sanity_check, train_linear_paper
from transfer.results import read_results

from helpers import mounted_tmpfs, supervised_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
# Small enough for a 2-core CI, large enough that 10-class accuracies are not noise.
PROBE = [f"data.default_image_size={SIZE}", "data.max_train_images=800", "data.max_val_images=200",
         "data.max_test_images=400", "data.num_workers=0", "features.batch_size=200",
         "fast.l2_grid=[0.001,0.1]", "fast.max_iter=300"]


def config(cache_dir, *extra) -> LinearConfig:
    return load_config(LinearConfig, None, PROBE + [f"features.cache_dir={cache_dir}", *extra])


@pytest.fixture(scope="module")
def signal_weights(tmp_path_factory) -> Path:
    return supervised_checkpoint(tmp_path_factory.mktemp("weights") / "supervised_r18.pth", SIZE)


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
    assert before == 6, "train, val and test features, once per backbone; kNN reuses them"
    assert after == before
    hits = {"train": "hit", "val": "hit", "test": "hit"}
    assert runs["signal_fast_again"]["derived"]["feature_cache"] == hits
    assert runs["signal_knn"]["derived"]["feature_cache"] == hits
    assert runs["signal_fast_again"]["metrics"] == runs["signal_fast"]["metrics"]


def test_results_files_follow_the_schema(runs, signal_weights):
    rec = read_results(runs["signal_fast"]["path"])  # validates against the schema
    assert rec["task"] == "linear" and rec["protocol"]["name"] == "fast"
    assert rec["engine"] in ("sklearn", "torch")
    assert rec["dataset"]["name"] == "fashion-mnist"
    assert rec["dataset"]["splits"] == {"train": 800, "val": 200, "test": 400}
    assert rec["dataset"]["split_info"]["val"]["part"] == "carved"
    assert rec["weights"]["sha256"] == sha256_file(signal_weights)
    assert rec["weights"]["layout"] == "moco-bench"
    assert rec["weights"]["label"] == "supervised 50 steps"
    assert set(rec["metrics"]) == {"top1", "top5"}
    cfg = rec["config"]
    assert cfg["data"]["image_size"] == SIZE and cfg["data"]["resize_size"] == 37
    assert "image_size from weights" in cfg["derived"]["preprocessing_source"]
    assert cfg["derived"]["l2"] in (0.001, 0.1) and "paper" not in cfg
    assert set(cfg["derived"]["val_score"]) == {"0.001", "0.1"}
    knn = read_results(runs["random_knn"]["path"])
    assert knn["config"]["data"]["image_size"] == SIZE  # default_image_size: random init has none
    assert knn["task"] == "knn" and set(knn["metrics"]) == {"knn_top1", "knn_top5"}
    assert knn["weights"]["label"].startswith("random init") and knn["weights"]["sha256"] is None
    assert knn["config"]["knn"] == {"k": 200, "temperature": 0.1}


def test_protocol_records_say_how_each_number_was_made(runs):
    fast = read_results(runs["signal_fast"]["path"])["protocol"]
    assert fast["schedule"]["l2_grid"] == [0.1, 0.001] and "on val" in fast["schedule"]["selection"]
    assert fast["dataset"]["splits"] == {"train": 800, "val": 200, "test": 400}
    assert fast["input"]["test"]["crop"] == SIZE and list(fast["metric"]) == ["top1"]
    knn = read_results(runs["signal_knn"]["path"])["protocol"]
    assert knn["schedule"]["k_used"] == 200 and knn["name"] == "knn k200 T0.1"
    assert knn["dataset"] == fast["dataset"], "same images, same fingerprint"
    # the same protocol for both backbones (comparable), another for another image subset
    assert read_results(runs["random_fast"]["path"])["protocol"]["id"] == fast["id"]
    assert read_results(runs["random_knn"]["path"])["protocol"]["id"] == knn["id"]


def test_outcomes_reproduce_the_reported_metrics(runs):
    for name, key in [("signal_fast", "top1"), ("signal_knn", "knn_top1")]:
        rec = read_results(runs[name]["path"])
        z = np.load(Path(runs[name]["path"]).parent / "outcomes.npz")
        assert rec["outcomes"] == {"kind": "classification", "files": ["outcomes.npz"]}
        assert z["labels"].shape == (400,) and z["topk"].shape == (400, 5)
        assert len(set(z["ids"])) == 400 and all(i.startswith("test/") for i in z["ids"])
        assert 100 * (z["topk"][:, 0] == z["labels"]).mean() == pytest.approx(rec["metrics"][key])
        assert 100 * (z["topk"] == z["labels"][:, None]).any(1).mean() == pytest.approx(
            rec["metrics"][key.replace("top1", "top5")])


def test_knn_with_fewer_training_images_than_k_records_the_k_used(tmp_path):
    cfg = config(tmp_path / "cache", "data.max_train_images=60", "data.max_val_images=20",
                 "model.arch=resnet18")
    out = run("knn", cfg, "random", tmp_path / "knn")
    rec = read_results(out["path"])
    assert rec["protocol"]["schedule"]["k_used"] == 80 and rec["protocol"]["name"] == "knn k80 T0.1"
    assert rec["config"]["derived"]["k_used"] == 80 and rec["config"]["knn"]["k"] == 200


@pytest.mark.parametrize("fault", ["read-only", "a file where the folder goes", "full"])
def test_an_unwritable_feature_cache_warns_and_the_run_still_writes_its_result(
        fault, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    if fault == "read-only":  # as root, chmod does not stop writes: the save is refused instead
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(features_mod, "atomic_torch_save", refuse)
    elif fault == "a file where the folder goes":
        cache.write_text("not a folder")
    cfg = config(cache, "data.max_train_images=100", "data.max_val_images=20", "data.max_test_images=40",
                 "model.arch=resnet18")
    with contextlib.ExitStack() as stack:
        if fault == "full":  # a real file system smaller than any split's features
            cfg.features.cache_dir = str(stack.enter_context(mounted_tmpfs(tmp_path / "small", "16k")))
        out = run("knn", cfg, "random", tmp_path / "out")
    assert read_results(out["path"])["metrics"]["knn_top1"] >= 0
    assert out["derived"]["feature_cache"] == {"train": "unwritable", "val": "unwritable",
                                               "test": "unwritable"}
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "feature cache" in ln]
    assert len(warnings) == 3
    assert all(w.startswith("warning: cannot write the feature cache") for w in warnings)


def test_torch_solver_agrees_with_sklearn(runs):
    """The ImageNet-scale solver reaches the same accuracy as scikit-learn on real features."""
    stored = [torch.load(p, weights_only=True) for p in glob.glob(str(runs["cache_dir"] / "*.pt"))]
    mine = [s for s in stored if s["description"]["weights"].startswith("sha256")]
    split = {s["description"]["split"]: (s["features"], s["labels"]) for s in mine}
    (xtr, ytr), (xva, yva), (xte, yte) = split["train"], split["val"], split["test"]
    acc = {}
    for solver in ("sklearn", "torch"):
        clf = logreg.fit(xtr, ytr, 10, l2=1e-2, solver=solver, max_iter=200)
        acc[solver] = topk_accuracy(clf.scores(xte), yte, ks=(1,))[1]
    assert abs(acc["sklearn"] - acc["torch"]) <= 1.0, acc
    score = lambda s, y: topk_accuracy(s, y, ks=(1,))[1]  # noqa: E731
    l2, record, init = logreg.select_l2(xtr, ytr, xva, yva, 10, [1e-3, 1e-1], "torch", score,
                                        max_iter=100, select_max_images=300, log=lambda m: None)
    assert record["search_images"] == 300 and record["val_images"] == 200 and init is not None
    clf, _ = logreg.fit_final(torch.cat([xtr, xva]), torch.cat([ytr, yva]), 10, l2, "torch",
                              max_iter=100, init=init, log=lambda m: None)
    top1 = topk_accuracy(clf.scores(xte), yte, ks=(1,))[1]
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
    cfg = config(tmp_path / "cache", "data.max_train_images=192", "data.max_val_images=64",
                 "data.max_test_images=128", "paper.epochs=2", "paper.lr_steps=[1]",
                 "paper.batch_size=64", "paper.lr=1.0", "protocol=paper")
    r = frozen.start("linear", cfg, str(signal_weights), tmp_path / "out")
    result = train_linear_paper(r)
    model = r.backbone.model
    file_tensors = load_backbone(signal_weights).state_dict
    state = model.state_dict()
    assert set(state) - set(file_tensors) == {"fc.weight", "fc.bias"}
    for k, v in file_tensors.items():  # BN running statistics included
        assert torch.equal(state[k], v), k
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert model.fc.weight.shape == (10, 512)
    assert r.derived["lr"] == 1.0 * 64 / 256 and r.derived["sanity_check"] == "passed"
    assert 0 <= result["metrics"]["top1"] <= 100 and len(r.derived["history"]) == 2
    assert result["schedule"]["fit_on"] == "train + val"
    z = np.load(tmp_path / "out" / "outcomes.npz")
    assert 100 * (z["topk"][:, 0] == z["labels"]).mean() == pytest.approx(result["metrics"]["top1"])

    model.layer1[0].bn1.running_mean[0] += 1e-6
    with pytest.raises(RuntimeError, match="layer1.0.bn1.running_mean changed"):
        sanity_check(model, r.backbone.reference)


def test_paper_cli_writes_results_and_resumes(signal_weights, tmp_path, capsys):
    args = ["--weights", str(signal_weights), "--output", str(tmp_path / "out"), "--protocol",
            "paper", "data.max_train_images=128", "data.max_val_images=32",
            "data.max_test_images=64", "paper.epochs=1",
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
              "data.max_val_images=50", "data.max_test_images=101",
              f"features.cache_dir={tmp_path / 'cache'}"]
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
                     "data.max_train_images=96", "data.max_val_images=24", "data.max_test_images=51",
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
                 "data.max_val_images=24", "data.max_test_images=48", "data.num_workers=0",
                 "fast.l2_grid=[0.01]",
                 "paper.epochs=1", "paper.batch_size=48", "paper.lr=0.1"]
    summary = compare("random", tmp_path, None, overrides, arch="resnet18")
    assert [r["run"] for r in summary["rows"]] == ["fast (cold cache)", "fast (warm cache)",
                                                   "knn", "paper", "paper SGD on eval-view features"]
    cold, warm = (read_results(r["results"])["config"]["derived"]["feature_cache"]
                  for r in summary["rows"][:2])
    assert cold == {"train": "miss", "val": "miss", "test": "miss"}
    assert warm == {"train": "hit", "val": "hit", "test": "hit"}
    saved = json.loads((tmp_path / "linear_protocols.json").read_text())
    assert saved["speedup_fast_cold"] == summary["rows"][0]["paper_time_over_this"]
    assert saved["scale"]["max_train_images"] == 96 and saved["paper_epochs"] == 1
    assert 0 <= saved["top1_paper_sgd_on_eval_features"] <= 100


def test_a_second_run_into_a_busy_folder_is_refused_and_an_old_result_never_passes_for_new(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mocobench.fileio import prepare_output; "
         "prepare_output(sys.argv[1], 'test'); print('locked', flush=True); time.sleep(60)",
         str(tmp_path / "busy")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = config(tmp_path / "cache", "model.arch=resnet18")
        busy = rf"in use by pid {holder.pid} .*two runs must not write one folder"
        with pytest.raises(UserError, match=busy):
            run("knn", cfg, "random", tmp_path / "busy")
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text('{"an": "earlier run"}')
    cfg = config(tmp_path / "cache", "model.arch=resnet18", f"data.source={tmp_path / 'nowhere'}")
    with pytest.raises(UserError, match="neither a registered data set"):
        run("knn", cfg, "random", tmp_path / "old")  # fails after the folder was prepared
    assert not (tmp_path / "old" / "results.json").exists()
    assert (tmp_path / "old" / "results.previous.json").read_text() == '{"an": "earlier run"}'
