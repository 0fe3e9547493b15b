"""What choosing an SVM cost or a logistic-regression L2 strength costs on cached features at
realistic scale, ours against scikit-learn's plain per-value loop, side by side in one run.

    python -m benchmarks.svm_cost [--output runs/bench_svm] [--scales voc07,100k] [--sklearn-fits 6]

Synthetic 2048-d features (non-negative like pooled ResNet-50 features, class-dependent means):
  voc07  VOC07's 5011 trainval / 4952 test images, 20 classes, multi-label
  100k   100,000 training / 10,000 test images, 100 classes, single-label
Rows, per scale:
  svm cross-validation  the svm task's selection: per class x cost x fold SVMs, each class's
                        best mean cross-validated AP, refit (transfer.svm._cross_validate, the
                        anchor's 26 costs at voc07, --costs-100k at 100k)
                        vs LinearSVC + cross_val_score per (class, cost), as train_svm_kfold.py
  lowshot draw          one low-shot draw at k=--lowshot-k: every class x cost on the drawn rows,
                        the cost chosen on the test images (standing in for val), test scored
                        vs one LinearSVC per (class, cost)
  logreg l2 selection   the fast protocol's search over --l2-values strengths (torch L-BFGS,
                        warm-started along the grid) vs LogisticRegression(lbfgs) per value
scikit-learn's loop is timed on --sklearn-fits of its fits spread over the costs (strengths) and
extrapolated linearly to all of them (its fits are independent: the loop costs their sum; one
fit at 100k for the logistic regression); the JSON says how many were timed. Wall and CPU
seconds are both recorded (scikit-learn runs with one BLAS thread, as the suite runs it; ours
with torch's threads). Our side always runs in full. The 100k cross-validation row is left out unless --with-100k-cv (scikit-learn needs hours
there on 2 cores). Prints a table and writes OUTPUT/svm_cost.json.
"""
import argparse
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

from mocobench.errors import cli
from mocobench.fileio import atomic_json
from transfer import logreg, svm

SCALES = {"voc07": {"train": 5011, "test": 4952, "classes": 20, "multilabel": True},
          "100k": {"train": 100_000, "test": 10_000, "classes": 100, "multilabel": False},
          "tiny": {"train": 300, "test": 100, "classes": 4, "multilabel": True}}  # the test's
DIM = 2048


def synthetic(n: int, classes: int, multilabel: bool, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """(features n x 2048 float32, labels: (n,) or (n, classes) 0/1)."""
    rng = np.random.default_rng(seed)
    if multilabel:  # ~1.5 labels per image, as VOC07
        y = (rng.random((n, classes)) < 0.025).astype(np.int64)
        y[np.arange(n), rng.integers(0, classes, n)] = 1
        mix = y / y.sum(1, keepdims=True)
    else:
        y = rng.integers(0, classes, n)
        mix = np.eye(classes)[y]
    means = np.random.default_rng(1234).normal(0, 1, (classes, DIM)).astype(np.float32)
    x = np.maximum(0, 0.6 * (mix.astype(np.float32) @ means) + rng.normal(0, 1, (n, DIM)).astype(np.float32))
    return torch.from_numpy(x), y


def _timed(fn):
    """(fn(), wall seconds, CPU seconds of this process): CPU seconds next to wall seconds
    because other jobs on a shared machine inflate the latter unevenly."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def _row(ours: tuple, sklearn: list, total: int, timed: str, problems: int, **more) -> dict:
    """ours: (wall, cpu) of our full run; sklearn: (wall, cpu) per timed fit, extrapolated
    to `total` fits."""
    wall, cpu = (float(np.mean([t[i] for t in sklearn])) * total for i in (0, 1))
    return {"ours_s": ours[0], "ours_cpu_s": ours[1], "sklearn_s": wall, "sklearn_cpu_s": cpu,
            "sklearn_timed": timed, "problems": problems,
            "cpu_ratio": round(cpu / max(ours[1], 1e-9), 2), **more}


def _sample_pairs(classes: int, values: list, budget: int) -> list[tuple[int, int]]:
    """`budget` (class, value index) pairs spread over the values, classes in turn."""
    idx = np.linspace(0, len(values) - 1, min(budget, len(values))).round().astype(int)
    return [(i % classes, int(j)) for i, j in enumerate(np.resize(idx, budget))]


def _linear_svc(cost):
    from sklearn.svm import LinearSVC

    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, loss="squared_hinge",
                     tol=1e-4, dual=True, max_iter=2000)


def svm_cross_validation(x, targets, costs, budget: int) -> dict:
    from sklearn.model_selection import cross_val_score

    s = svm.SvmSettings(costs=list(costs))
    xs = svm.normalise(x)
    _, *ours = _timed(lambda: svm._cross_validate(xs, targets, s, "cpu", lambda m: None))
    xn, per_pair = xs.numpy(), []
    for c, j in _sample_pairs(targets.shape[1], costs, budget):
        y = np.where(targets[:, c] == 1, 1, -1)

        def loop():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cross_val_score(_linear_svc(costs[j]), xn, y, cv=3, scoring="average_precision")
                _linear_svc(costs[j]).fit(xn, y)
        per_pair.append(_timed(loop)[1:])
    pairs = targets.shape[1] * len(costs)
    return _row(ours, per_pair, pairs, f"{len(per_pair)} of {pairs} (class, cost) pairs x 4 fits",
                pairs * 3)


def lowshot_draw(x, targets, test: tuple, costs, k: int, multilabel: bool, budget: int) -> dict:
    """One draw, its cost chosen on the test images standing in for val, test scored."""
    rows = svm.draw_lowshot(targets, k, np.random.default_rng(0), multilabel)
    s = svm.SvmSettings(costs=list(costs))
    xs, xt = svm.normalise(x), svm.normalise(test[0])
    val = {"labels": test[1], "targets": svm.class_targets(torch.from_numpy(test[1]), targets.shape[1])}
    quiet = _Quiet(headline="mAP" if multilabel else "top1")
    _, *ours = _timed(lambda: svm._lowshot_once(quiet, xs, targets, rows, xt, val, xt, s))
    xn, per_pair = xs.numpy(), []
    for c, j in _sample_pairs(targets.shape[1], costs, budget):
        used = rows[:, c] == 1
        y = np.where(targets[used, c] == 1, 1, -1)

        def fit():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _linear_svc(costs[j]).fit(xn[used], y)
        per_pair.append(_timed(fit)[1:])
    pairs = targets.shape[1] * len(costs)
    return _row(ours, per_pair, pairs, f"{len(per_pair)} of {pairs} (class, cost) fits", pairs,
                rows=int(rows.any(1).sum()))


class _Quiet:
    """What _lowshot_once reads from a run: its device and headline metric."""

    def __init__(self, headline: str):
        self.device, self.headline = torch.device("cpu"), headline


def logreg_selection(x, labels, values: int, budget: int, max_iter: int) -> dict:
    from sklearn.linear_model import LogisticRegression

    y = torch.from_numpy(labels if labels.ndim == 1 else labels.argmax(1))
    n_val = len(x) // 5
    grid = list(np.logspace(-6, 0, values))
    score = lambda s, t: float((s.argmax(1) == t).float().mean())  # noqa: E731
    _, *ours = _timed(lambda: logreg.select_l2(
        x[n_val:], y[n_val:], x[:n_val], y[:n_val], int(y.max()) + 1, grid, "torch", score,
        max_iter=max_iter, log=lambda m: None))
    std = logreg.Standardizer(x[n_val:])
    z, per_value = std(x[n_val:]).double().numpy(), []
    for _, j in _sample_pairs(1, grid, budget):
        clf = LogisticRegression(C=1.0 / (grid[j] * len(z)), max_iter=max_iter)
        per_value.append(_timed(lambda: logreg._sklearn_fit(clf, z, y[n_val:].numpy()))[1:])
    return _row(ours, per_value, len(grid), f"{len(per_value)} of {len(grid)} strengths", len(grid))


def measure(scale: str, args) -> list[dict]:
    spec = SCALES[scale]
    x, labels = synthetic(spec["train"], spec["classes"], spec["multilabel"], seed=0)
    test = synthetic(spec["test"], spec["classes"], spec["multilabel"], seed=1)
    targets = svm.class_targets(torch.from_numpy(labels), spec["classes"])
    costs = svm.ANCHOR_COSTS if scale != "100k" else [float(c) for c in args.costs_100k.split(",")]
    rows = []
    for name, fn in [("svm cross-validation",
                      lambda: svm_cross_validation(x, targets, costs, args.sklearn_fits)),
                     ("lowshot draw", lambda: lowshot_draw(x, targets, test, svm.ANCHOR_COSTS, args.lowshot_k,
                                                           spec["multilabel"], args.sklearn_fits)),
                     ("logreg l2 selection", lambda: logreg_selection(
                         x, labels, args.l2_values, args.sklearn_fits if scale != "100k" else 1,
                         args.logreg_iter))]:
        if name == "svm cross-validation" and scale == "100k" and not args.with_100k_cv:
            continue  # hours of scikit-learn on 2 CPU cores; --with-100k-cv on a bigger machine
        r = fn()
        r.update(scale=scale, run=name, images=spec["train"], dim=DIM, classes=spec["classes"],
                 sklearn_over_ours=round(r["sklearn_s"] / r["ours_s"], 2))
        print(f"{scale} {name}: ours {r['ours_s']:.1f} s, scikit-learn {r['sklearn_s']:.1f} s "
              f"({r['sklearn_timed']}), ratio {r['sklearn_over_ours']} (CPU seconds: "
              f"{r['cpu_ratio']})", flush=True)
        rows.append(r)
    return rows


@cli
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.svm_cost", description=__doc__.splitlines()[0])
    p.add_argument("--output", default="runs/bench_svm")
    p.add_argument("--scales", default="voc07,100k")
    p.add_argument("--sklearn-fits", type=int, default=6, help="scikit-learn fits timed per row")
    p.add_argument("--costs-100k", default="0.0078125,0.0625,1.0", help="SVM costs at 100k")
    p.add_argument("--with-100k-cv", action="store_true", help="add the 100k cross-validation row")
    p.add_argument("--logreg-iter", type=int, default=100, help="L-BFGS iterations per fit, both sides")
    p.add_argument("--lowshot-k", type=int, default=16)
    p.add_argument("--l2-values", type=int, default=8)
    args = p.parse_args(argv)
    rows = [r for scale in args.scales.split(",") for r in measure(scale, args)]
    print(tabulate([{k: r[k] for k in ("scale", "run", "images", "problems", "ours_s", "sklearn_s",
                                        "sklearn_over_ours", "cpu_ratio", "sklearn_timed")} for r in rows],
                   headers="keys", floatfmt=".1f"))
    record = {"rows": rows, "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                        "platform": platform.platform(), "loadavg": os.getloadavg()},
              "args": vars(args)}
    atomic_json(record, Path(args.output) / "svm_cost.json")
    return record


if __name__ == "__main__":
    main()
