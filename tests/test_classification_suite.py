"""The classification suite on real offline data: SVM (VOC07 protocol), low-shot SVM,
few-shot episodes and fine-tuning on Fashion-MNIST (a backbone with signal against a random
one, tests/helpers.py), multi-label VOC07 in its on-disk format built from Fashion-MNIST
items, the solver against scikit-learn on scikit-learn's digits, and the metrics against
references."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import supervised_checkpoint
from mocobench.config import load_config
from mocobench.data import fashion_mnist
from mocobench.datasets import VOC_CLASSES
from transfer import cls_metrics, fewshot, finetune, linear, svm
from transfer.results import read_results
from transfer.svm_solver import fit_svms

SIZE = 32
DATA = [f"data.default_image_size={SIZE}", "data.max_train_images=1000", "data.max_val_images=300",
        "data.max_test_images=1000", "data.num_workers=0", "features.batch_size=250"]
FEW_COSTS = "svm.costs=[0.0625,1.0,10.0]"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    # Longer than test_linear's 50 steps: random ResNet features are a strong baseline for
    # L2-normalised SVMs on Fashion-MNIST (75% at 32 px), and the margin must not be noise.
    path = tmp_path_factory.mktemp("w") / "sup.pth"
    return {"signal": str(supervised_checkpoint(path, SIZE, images=4000, steps=200)), "random": "random"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("features")


def _run(module, config_cls, task, weights, name, out, cache, *extra):
    arch = ["model.arch=resnet18"] if weights[name] == "random" else []
    cfg = load_config(config_cls, None, DATA + arch + [f"features.cache_dir={cache}", *extra])
    return module.run(task, cfg, weights[name], out / name)


# ----------------------------------------------------------------------------- metrics

def _voc_devkit_ap(scores, labels):
    """VOCevalcls.m, line by line: sort by confidence, cumulate, 11-point max precision."""
    keep = labels != -1
    order = np.argsort(-scores[keep], kind="stable")
    gt = labels[keep][order] == 1
    tp, fp = np.cumsum(gt), np.cumsum(~gt)
    rec, prec = tp / gt.sum(), tp / (tp + fp)
    return np.mean([prec[rec >= t].max() if (rec >= t).any() else 0 for t in np.arange(0, 1.1, 0.1)])


def test_metrics_match_references():
    from sklearn.metrics import balanced_accuracy_score, precision_recall_curve

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 500)
    pred = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 7, 500))
    assert cls_metrics.mean_per_class(pred, labels) == pytest.approx(
        100 * balanced_accuracy_score(labels, pred))
    for trial in range(20):
        y = rng.choice([1, 0, 0, 0, -1], 300)
        s = rng.normal(size=300) + 1.5 * (y == 1)
        assert cls_metrics.voc07_ap(s, y) == pytest.approx(_voc_devkit_ap(s, y))
        # ssl-transfer's voc_eval_cls (precision_recall_curve) agrees but at t = 0, where
        # sklearn's extra point (recall 0, precision 1) makes its term 1: equal when the top
        # scored image is a positive
        keep = y != -1
        prec, rec, _ = precision_recall_curve(y[keep] == 1, s[keep])
        theirs = np.mean([prec[rec >= t].max() for t in np.linspace(0, 1, 11)])
        if y[keep][np.argmax(s[keep])] == 1:
            assert cls_metrics.voc07_ap(s, y) == pytest.approx(theirs)
    ties = np.array([1.0, 1.0, 0.5, 0.5]), np.array([1, 0, 1, 0])
    assert cls_metrics.voc07_ap(*ties) == pytest.approx(_tied_reference(*ties))


def _tied_reference(s, y):
    """With ties, precision_recall_curve's thresholds: the curve at each distinct score."""
    from sklearn.metrics import precision_recall_curve

    prec, rec, _ = precision_recall_curve(y == 1, s)
    prec, rec = prec[:-1], rec[:-1]  # without the added (recall 0, precision 1) point
    return np.mean([prec[rec >= t].max() if (rec >= t).any() else 0 for t in np.linspace(0, 1, 11)])


def test_area_ap_is_goyal_et_al_calculate_ap():
    rng = np.random.default_rng(1)
    for _ in range(10):
        y = rng.choice([1, 0, 0], 200)
        s = rng.normal(size=200) + y
        order = np.argsort(-s)
        tp = np.cumsum(y[order] == 1)
        prec, rec = tp / np.arange(1, 201), tp / (y == 1).sum()
        mrec, mpre = np.r_[0, rec, 1], np.r_[0, prec, 0]
        for i in range(len(mpre) - 2, -1, -1):
            mpre[i] = max(mpre[i], mpre[i + 1])
        idx = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
        assert cls_metrics.area_ap(s, y) == pytest.approx(np.sum((mrec[idx] - mrec[idx - 1]) * mpre[idx]))


# ----------------------------------------------------------------------------- the SVM solver

def test_batched_svms_solve_what_linear_svc_solves():
    from sklearn.datasets import load_digits
    from sklearn.svm import LinearSVC

    x, y = load_digits(return_X_y=True)
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)
    costs = [1e-3, 0.0625, 1.0, 10.0]
    targets = np.stack([np.where(y == c, 1.0, -1.0) for c in range(10) for _ in costs], 1)
    cost = np.array([c for _ in range(10) for c in costs])
    weight = np.where(targets > 0, 2.0, 1.0)
    w, b, decision = fit_svms(torch.tensor(x), torch.tensor(targets), torch.tensor(weight),
                              torch.tensor(cost), tol=1e-4)
    assert torch.allclose(decision, torch.tensor(x).float() @ w + b, atol=1e-4)
    for p in range(0, targets.shape[1], 3):
        clf = LinearSVC(C=cost[p], class_weight={1: 2, -1: 1}, loss="squared_hinge", tol=1e-5,
                        max_iter=20000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.fit(x, targets[:, p])

        def objective(wv, bv):
            hinge = np.clip(1 - targets[:, p] * (x @ wv + bv), 0, None)
            return 0.5 * (wv @ wv + bv * bv) + cost[p] * (weight[:, p] * hinge ** 2).sum()
        ours = objective(w[:, p].double().numpy(), float(b[p]))
        theirs = objective(clf.coef_[0], clf.intercept_[0])
        assert ours <= theirs * 1.005, (p, ours, theirs)
        agree = (np.sign(decision[:, p].numpy()) == np.sign(clf.decision_function(x))).mean()
        assert agree > 0.995, (p, agree)


def test_cross_validation_chooses_the_costs_sklearn_would():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import cross_val_score
    from sklearn.svm import LinearSVC

    x, y = load_digits(return_X_y=True)
    x, y = x[:600], y[:600]
    xs = svm.normalise(torch.tensor(x)).numpy()
    s = svm.SvmSettings(costs=[1e-4, 0.03125, 1.0], tol=1e-5)
    targets = svm.class_targets(torch.tensor(y), 10)
    chosen, mean_ap = svm._cross_validate(torch.tensor(xs), targets, s, "cpu", lambda m: None)
    for c in range(0, 10, 3):
        theirs = []
        for cost in s.costs:
            clf = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, tol=1e-5,
                            max_iter=20000)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs.append(cross_val_score(clf, xs, np.where(y == c, 1, -1), cv=3,
                                              scoring="average_precision").mean())
        assert np.allclose(mean_ap[c], theirs, atol=2e-3), (c, mean_ap[c], theirs)
        assert chosen[c] == s.costs[int(np.argmax(theirs))]


# ----------------------------------------------------------------------------- tasks on Fashion-MNIST

@pytest.fixture(scope="module")
def suite(weights, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    runs = {}
    for name in ("signal", "random"):
        runs["svm", name] = _run(svm, svm.SvmConfig, "svm", weights, name, out / "svm", cache,
                                 "data.source=fashion-mnist", FEW_COSTS)
        runs["lowshot", name] = _run(svm, svm.SvmConfig, "lowshot", weights, name, out / "lowshot",
                                     cache, "data.source=fashion-mnist", FEW_COSTS,
                                     "lowshot.k_values=[2,16]", "lowshot.samples=3")
        runs["fewshot", name] = _run(fewshot, fewshot.FewshotConfig, "fewshot", weights, name,
                                     out / "fewshot", cache, "fewshot.shots=[1,5]", "fewshot.episodes=200")
    runs["lowshot", "again"] = _run(svm, svm.SvmConfig, "lowshot", weights, "random", out / "again",
                                    cache, "data.source=fashion-mnist", FEW_COSTS,
                                    "lowshot.k_values=[2,16]", "lowshot.samples=3")
    return runs


def test_a_backbone_with_signal_beats_a_random_one_under_each_task(suite):
    for task, metric in [("svm", "top1"), ("lowshot", "top1"), ("fewshot", "5way5shot")]:
        sig, rnd = suite[task, "signal"]["metrics"][metric], suite[task, "random"]["metrics"][metric]
        assert sig > rnd + 3, (task, sig, rnd)


def test_lowshot_reports_mean_and_std_per_k_over_its_samples(suite):
    rec = read_results(suite["lowshot", "signal"]["path"])
    m = rec["metrics"]
    assert m["top1"] == m["top1@k16"] and m["top1@k2"] < m["top1@k16"]
    assert m["top1@k2_std"] > 0 and m["top1@k16_std"] >= 0
    draws = rec["config"]["derived"]["draws"]
    assert [(d["k"], d["sample"]) for d in draws] == [(2, 0), (2, 1), (2, 2), (16, 0), (16, 1), (16, 2)]
    assert np.mean([d["test"] for d in draws if d["k"] == 16]) == pytest.approx(m["top1@k16"])
    assert rec["outcomes"]["samples"] == 3
    assert suite["lowshot", "again"]["metrics"] == suite["lowshot", "random"]["metrics"]  # seeded
    z = np.load(Path(suite["lowshot", "signal"]["path"]).parent / "outcomes.npz")
    assert len(z["labels"]) == 3 * 1000
    assert 100 * (z["topk"][:, 0] == z["labels"]).mean() == pytest.approx(m["top1"])


def test_lowshot_draws_are_seeded_and_per_class():
    rng = np.random.default_rng(0)
    targets = svm.class_targets(torch.tensor(rng.integers(0, 4, 200)), 4)
    a = svm.draw_lowshot(targets, 5, np.random.default_rng([0, 1, 5]), multilabel=False)
    b = svm.draw_lowshot(targets, 5, np.random.default_rng([0, 1, 5]), multilabel=False)
    assert np.array_equal(a, b) and (targets[a[:, 0] == 1].sum(0) == 5).all()
    multi = np.where(rng.random((300, 4)) < 0.3, 1, 0)
    rows = svm.draw_lowshot(multi, 3, rng, multilabel=True)
    for c in range(4):
        assert (multi[rows[:, c] == 1, c] == 1).sum() == 3 and (multi[rows[:, c] == 1, c] == 0).sum() == 9


def test_fewshot_reports_a_95_percent_interval_over_episodes(suite):
    rec = read_results(suite["fewshot", "signal"]["path"])
    assert 0 < rec["metrics"]["5way5shot_ci95"] < 5 and "5way1shot" in rec["metrics"]
    assert rec["protocol"]["schedule"]["episodes"] == 200
    z = np.load(Path(suite["fewshot", "signal"]["path"]).parent / "outcomes.npz")
    assert len(z["labels"]) == 200 * 5 * 15
    assert 100 * (z["topk"][:, 0] == z["labels"]).mean() == pytest.approx(rec["metrics"]["5way5shot"])


def test_fewshot_episode_draws_are_seeded_with_disjoint_support_and_queries():
    labels = np.repeat(np.arange(10), 30)
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    one = fewshot.draw_episode(by_class, 5, 5, 15, np.random.default_rng(3))
    two = fewshot.draw_episode(by_class, 5, 5, 15, np.random.default_rng(3))
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
    classes, support, query = one
    assert len(set(classes)) == 5 and not set(support.ravel()) & set(query.ravel())
    for i, c in enumerate(classes):
        assert (labels[support[i]] == c).all() and (labels[query[i]] == c).all()


def test_svm_records_its_protocol_and_chosen_costs(suite):
    rec = read_results(suite["svm", "signal"]["path"])
    assert rec["protocol"]["schedule"]["costs"] == [0.0625, 1.0, 10.0]
    assert rec["protocol"]["schedule"]["folds"] == 3 and rec["engine"] == "torch-svm"
    assert len(rec["config"]["derived"]["chosen_costs"]) == 10
    assert set(rec["config"]["derived"]["chosen_costs"]) <= {0.0625, 1.0, 10.0}


# ----------------------------------------------------------------------------- multi-label VOC07

def write_voc_from_fashion_mnist(root: Path, per_split=(150, 60, 150)) -> Path:
    """VOC2007's on-disk layout (JPEGImages, Annotations, ImageSets/Main) over Fashion-MNIST test
    items: a real multi-label data set whose image with item class a holds two objects, VOC class
    a and VOC class 10 + (3a + 1) mod 10 (all 20 classes occur), the second marked difficult in
    every fifth image."""
    images, labels = fashion_mnist("test")
    base = root / "VOCdevkit" / "VOC2007"
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / d).mkdir(parents=True, exist_ok=True)
    i = 0
    for split, n in zip(("train", "val", "test"), per_split):
        names = []
        for _ in range(n):
            name, a = f"{i:06d}", int(labels[i])
            Image.fromarray(images[i]).convert("RGB").save(base / "JPEGImages" / f"{name}.jpg", quality=95)
            objs = [(VOC_CLASSES[a], 0), (VOC_CLASSES[10 + (3 * a + 1) % 10], int(i % 5 == 0))]
            xml = "".join(f"<object><name>{c}</name><difficult>{d}</difficult></object>" for c, d in objs)
            (base / "Annotations" / f"{name}.xml").write_text(f"<annotation>{xml}</annotation>")
            names.append(name)
            i += 1
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def test_multilabel_voc07_linear_and_svm_score_map_from_their_outcomes(weights, tmp_path):
    root = write_voc_from_fashion_mnist(tmp_path / "voc")
    common = ["data.source=voc2007", f"data.root={root}", "data.max_train_images=0",
              "data.max_val_images=0", "data.max_test_images=0", f"features.cache_dir={tmp_path / 'c'}"]
    got = {}
    for name in ("signal", "random"):
        got["svm", name] = _run(svm, svm.SvmConfig, "svm", weights, name, tmp_path / "svm", tmp_path / "c",
                                *common, FEW_COSTS, "svm.folds=2")
        got["linear", name] = _run(linear, linear.LinearConfig, "linear", weights, name, tmp_path / "lin",
                                   tmp_path / "c", *common, "fast.l2_grid=[0.01,1.0]", "fast.solver=torch",
                                   "fast.max_iter=100")
    for task in ("svm", "linear"):
        rec = read_results(got[task, "signal"]["path"])
        assert rec["dataset"]["multilabel"] and list(rec["protocol"]["metric"]) == ["mAP"]
        z = np.load(Path(got[task, "signal"]["path"]).parent / "outcomes.npz")
        assert z["labels"].shape == (150, 20) and z["scores"].shape == (150, 20)
        assert set(np.unique(z["labels"])) == {-1, 0, 1}
        assert cls_metrics.mean_ap(z["scores"], z["labels"]) == pytest.approx(rec["metrics"]["mAP"])
        assert got[task, "signal"]["metrics"]["mAP"] > got[task, "random"]["metrics"]["mAP"] + 5, task
    assert "mAP_area" in got["svm", "signal"]["metrics"]


# ----------------------------------------------------------------------------- fine-tuning

FT = ["finetune.epochs=2", "finetune.batch_size=50", "finetune.lr_steps=[1]", "finetune.lr=0.05"]


def test_finetuning_changes_the_backbone_and_resumes(weights, tmp_path, capsys):
    cfg = lambda *x: load_config(finetune.FinetuneConfig, None, DATA[:1] + [  # noqa: E731
        "data.max_train_images=300", "data.max_val_images=50", "data.max_test_images=200",
        "data.num_workers=0", *FT, *x])
    first = finetune.run("finetune", cfg(), weights["signal"], tmp_path / "ft")
    assert first["derived"]["backbone_change"] > 1e-3  # the linear probe's is 0 (test_linear)
    rec = read_results(first["path"])
    assert rec["protocol"]["name"] == "finetune" and rec["dataset"]["splits"]["train"] == 350
    again = finetune.run("finetune", cfg(), weights["signal"], tmp_path / "ft")
    assert "resumed from" in capsys.readouterr().out
    assert again["metrics"] == first["metrics"]
    from mocobench.errors import UserError
    with pytest.raises(UserError, match="other weights, data or finetune settings"):
        finetune.run("finetune", cfg("finetune.lr=0.5"), weights["signal"], tmp_path / "ft")


def test_a_finetuning_killed_after_an_epoch_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    cfg = lambda: load_config(finetune.FinetuneConfig, None, [  # noqa: E731
        "data.default_image_size=32", "data.max_train_images=150", "data.max_val_images=50",
        "data.max_test_images=100", "data.num_workers=0", "model.arch=resnet18", *FT])
    whole = finetune.run("finetune", cfg(), "random", tmp_path / "whole")
    save = finetune.atomic_torch_save

    def killed_after_the_first(obj, path):
        save(obj, path)
        raise KeyboardInterrupt  # the process dies right after epoch 1's checkpoint
    monkeypatch.setattr(finetune, "atomic_torch_save", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        finetune.run("finetune", cfg(), "random", tmp_path / "killed")
    monkeypatch.undo()
    resumed = finetune.run("finetune", cfg(), "random", tmp_path / "killed")
    assert resumed["derived"]["history"][0] == whole["derived"]["history"][0]
    assert resumed["metrics"] == whole["metrics"]


def test_finetuning_under_torchrun_splits_the_batch_over_processes(tmp_path):
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "transfer", "finetune", "--weights", "random", "--arch", "resnet18", "--output",
         str(tmp_path / "out"), "data.default_image_size=32", "data.max_train_images=100",
         "data.max_val_images=20", "data.max_test_images=51", "data.num_workers=0", *FT],
        capture_output=True, text=True, cwd=root, timeout=900,
        env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads((tmp_path / "out" / "results.json").read_text())
    assert rec["config"]["derived"]["world_size"] == 2 and rec["config"]["derived"]["per_process_batch"] == 25
    z = np.load(tmp_path / "out" / "outcomes.npz")
    assert len(z["labels"]) == 51 and len(set(z["ids"])) == 51  # every test image once, in order
    assert 100 * (z["topk"][:, 0] == z["labels"]).mean() == pytest.approx(rec["metrics"]["top1"])


def test_semisupervised_subsets_are_class_balanced_or_read_from_a_list(tmp_path):
    from mocobench.data import build_dataset

    pool = build_dataset("fashion-mnist", "train", max_images=5000, seed=1)
    sub, how = finetune.labelled_subset(pool, finetune.SubsetSettings(fraction=0.1, seed=3))
    counts = np.bincount(sub.targets, minlength=10)
    full = np.bincount(pool.targets, minlength=10)
    assert np.array_equal(counts, np.maximum(1, np.round(0.1 * full)).astype(int))
    again, _ = finetune.labelled_subset(pool, finetune.SubsetSettings(fraction=0.1, seed=3))
    assert again.ids() == sub.ids() and how["images"] == len(sub)
    listing = tmp_path / "1percent.txt"
    listing.write_text("\n".join(pool.ids()[:7]) + "\n")
    from_file, how = finetune.labelled_subset(pool, finetune.SubsetSettings(file=str(listing)))
    assert sorted(from_file.ids()) == sorted(pool.ids()[:7]) and how["images"] == 7
    listing.write_text("n01440764_10026.JPEG\n")
    from mocobench.errors import UserError
    with pytest.raises(UserError, match="1 of the 1 images in .* are not in the training split"):
        finetune.labelled_subset(pool, finetune.SubsetSettings(file=str(listing)))


def test_the_svm_cost_benchmark_times_both_sides_in_one_run(tmp_path):
    import json

    from benchmarks.svm_cost import main

    main(["--scales", "tiny", "--output", str(tmp_path), "--sklearn-fits", "2", "--l2-values", "2",
          "--logreg-iter", "20", "--lowshot-k", "2"])
    saved = json.loads((tmp_path / "svm_cost.json").read_text())
    assert [r["run"] for r in saved["rows"]] == ["svm cross-validation", "lowshot draw",
                                                 "logreg l2 selection"]
    for r in saved["rows"]:
        assert r["ours_s"] > 0 and r["sklearn_s"] > 0
        assert r["sklearn_over_ours"] == round(r["sklearn_s"] / r["ours_s"], 2)
    assert saved["rows"][0]["problems"] == 4 * 26 * 3
    assert "of 104 (class, cost) pairs" in saved["rows"][0]["sklearn_timed"]
