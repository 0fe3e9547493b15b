"""Linear SVMs on frozen pooled features: the VOC07 SVM benchmark and its low-shot variant
(Goyal et al., "Scaling and Benchmarking Self-Supervised Visual Representation Learning",
ICCV 2019; facebookresearch/fair_self_supervision_benchmark tools/svm, as VISSL and
mmselfsup run it).

    python -m transfer svm     --weights W --data voc2007 --data-root /datasets --output DIR
    python -m transfer lowshot --weights W --data voc2007 --data-root /datasets --output DIR

Both follow the anchor: features L2-normalised; one SVM per class (LinearSVC: squared
hinge, L2, intercept_scaling 1, class_weight {+1: 2, -1: 1}); costs from its list
(1e-7 ... 100 and 0.5^4 ... 0.5^19). Single-label data sets get one-vs-rest SVMs, scored by
the data set's metric on the argmax.

- ``svm``: fit on train + val (VOC07 trainval); per class the cost with the best mean
  3-fold cross-validated average precision (sklearn's stratified folds, in order, as
  cross_val_score); then that class's SVM refit on all of train + val, test scored once.
  As train_svm_kfold.py, "difficult"-only images count as negatives in training; the
  test metric ignores them.
- ``lowshot``: for k in {1, 2, 4, 8, 16, 32, 64, 96} and 5 independent seeded samples of the
  train split: per class k positives and (classes - 1) x k negatives (VOC07, as
  create_voc_low_shot_samples.py), or k images per class (single-label); one cost per
  (k, sample) chosen by the metric on val (the anchor reports the best cost on test: we
  choose on val), test scored with it; mean and std over the samples per k.

The SVMs of every class x cost (x fold) are solved at once (transfer.svm_solver).
"""
from dataclasses import dataclass, field

import numpy as np
import torch

from mocobench import dist
from mocobench.config import setting, to_dict
from mocobench.errors import UserError, cli
from transfer import cls_metrics, frozen
from transfer.frozen import DataConfig, FeatureConfig, ModelConfig
from transfer.svm_solver import fit_svms

# Goyal et al.'s VOC07 costs: the listed values, then 0.5^4 ... 0.5^19 (svm_helper.parse_cost_list).
ANCHOR_COSTS = [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0] + [0.5 ** k for k in range(4, 20)]


@dataclass
class SvmSettings:
    costs: list[float] = setting(ANCHOR_COSTS, gt=0)  # in the anchor's order: ties go to the first
    folds: int = setting(3, ge=2)  # cross-validation folds choosing each class's cost (svm task)
    positive_weight: float = setting(2.0, gt=0)  # class_weight {+1: 2, -1: 1}
    intercept_scaling: float = setting(1.0, gt=0)
    tol: float = setting(1e-3, gt=0)  # relative gradient norm at which each SVM stops
    max_iter: int = setting(50, ge=1)  # Newton iterations per SVM


@dataclass
class LowshotSettings:
    k_values: list[int] = setting([1, 2, 4, 8, 16, 32, 64, 96], ge=1)  # positives per class
    samples: int = setting(5, ge=1)  # independent seeded samples per k
    headline_k: int | None = setting(None, ge=1)  # the k reported as the headline (None: largest)


@dataclass
class SvmConfig:
    seed: int = 0  # seeds the low-shot draws
    device: str = setting("auto", choices=("auto", "cpu"))
    data: DataConfig = field(default_factory=lambda: DataConfig(source="voc2007"))
    model: ModelConfig = field(default_factory=ModelConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    svm: SvmSettings = field(default_factory=SvmSettings)
    lowshot: LowshotSettings = field(default_factory=LowshotSettings)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """svm_helper.normalize_features: x / (||x|| + 1e-5), in float64."""
    x = x.double()
    return x / (x.norm(dim=1, keepdim=True) + 1e-5)


def class_targets(labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """(n, C): 1 positive, 0 negative, -1 ignored (multi-label "difficult" only)."""
    labels = labels.numpy()
    if labels.ndim == 2:
        return labels.astype(np.int64)
    return (labels[:, None] == np.arange(num_classes)[None]).astype(np.int64)


def _problems(targets: np.ndarray, rows: np.ndarray, s: SvmSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """SVM targets (+1 / -1: difficult as negative) and weights for columns of `targets`
    (one per problem), `rows` (n, P) 0/1 saying which rows each problem trains on."""
    y = np.where(targets == 1, 1.0, -1.0)
    weight = np.where(y > 0, s.positive_weight, 1.0) * rows
    return torch.from_numpy(y), torch.from_numpy(weight)


def _scores(metric: str, scores: np.ndarray, targets: np.ndarray, labels) -> float:
    if metric == "mAP":
        return cls_metrics.mean_ap(scores, targets)
    return cls_metrics.classification_metrics(scores, labels, metric)[metric]


def _cross_validate(x, targets: np.ndarray, s: SvmSettings, device, log) -> tuple[np.ndarray, np.ndarray]:
    """Per class the cost with the best mean cross-validated AP (stratified folds in order,
    as sklearn's cross_val_score); returns (chosen cost per class, mean AP per class x cost)."""
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import StratifiedKFold

    n, classes, costs = len(x), targets.shape[1], np.asarray(s.costs)
    fold_of = np.zeros((classes, n), dtype=np.int64)
    for c in range(classes):
        positive = targets[:, c] == 1
        if positive.sum() < s.folds:
            raise UserError(f"class {c} has {positive.sum()} positive training images, fewer than "
                            f"svm.folds={s.folds}; use more data or fewer folds")
        for f, (_, held) in enumerate(StratifiedKFold(s.folds).split(np.zeros(n), positive)):
            fold_of[c, held] = f
    # problem (c, j, f): class c, cost j, trained without fold f
    cls_idx, cost_idx, fold_idx = (a.ravel() for a in np.meshgrid(
        np.arange(classes), np.arange(len(costs)), np.arange(s.folds), indexing="ij"))
    rows = (fold_of[cls_idx] != fold_idx[:, None]).T.astype(np.float64)
    y, weight = _problems(targets[:, cls_idx], rows, s)
    log(f"cross-validating {len(cls_idx)} SVMs ({classes} classes x {len(costs)} costs x {s.folds} "
        f"folds) on {n} x {x.shape[1]} features")
    _, _, decision = fit_svms(x, y, weight, torch.from_numpy(costs[cost_idx]), device=device,
                              intercept_scaling=s.intercept_scaling, tol=s.tol, max_iter=s.max_iter)
    ap = np.zeros((classes, len(costs), s.folds))
    for p, (c, j, f) in enumerate(zip(cls_idx, cost_idx, fold_idx)):
        held = fold_of[c] == f
        ap[c, j, f] = average_precision_score(targets[held, c] == 1, decision[held, p].numpy())
    mean_ap = ap.mean(2)
    return costs[mean_ap.argmax(1)], mean_ap  # argmax: the first best, in the anchor's order


def _svm(run: frozen.Run) -> dict:
    s = run.cfg.svm
    feats = frozen.split_features(run)
    if not dist.is_main_process():
        return {}
    classes = len(run.splits["train"].classes)
    x = normalise(torch.cat([feats["train"][0], feats["val"][0]]))
    targets = class_targets(torch.cat([feats["train"][1], feats["val"][1]]), classes)
    chosen, cv_ap = _cross_validate(x, targets, s, run.device, run.log)
    y, weight = _problems(targets, np.ones_like(targets, dtype=np.float64), s)
    w, b, _ = fit_svms(x, y, weight, torch.from_numpy(chosen), device=run.device,
                       intercept_scaling=s.intercept_scaling, tol=s.tol, max_iter=s.max_iter)
    xte, yte = feats["test"]
    scores = (normalise(xte).float() @ w + b).numpy()
    run.derived.update(chosen_costs=chosen.tolist(), cv_mean_ap=cv_ap.round(5).tolist())
    metrics = _test_metrics(run.headline, scores, yte)
    return {"metrics": metrics, "engine": "torch-svm", "name": "svm",
            "schedule": {**_anchor_schedule(s), "selection": f"per class: best mean {s.folds}-fold "
                         "cross-validated AP (sklearn average_precision_score)",
                         "fit_on": "train + val", "folds": s.folds},
            "metric": frozen.metric_definition(run.headline, run.headline, "per-class linear SVMs"),
            "outcomes": frozen.save_outcomes(run, yte.numpy(), scores=scores)}


def _test_metrics(headline: str, scores: np.ndarray, labels: torch.Tensor) -> dict:
    if headline == "mAP":
        return {"mAP": cls_metrics.mean_ap(scores, labels.numpy()),
                "mAP_area": cls_metrics.mean_area_ap(scores, labels.numpy())}
    return cls_metrics.classification_metrics(scores, labels, headline)


def _anchor_schedule(s: SvmSettings) -> dict:
    return {"costs": list(s.costs), "loss": "squared hinge", "penalty": "l2",
            "class_weight": {"positive": s.positive_weight, "negative": 1.0},
            "intercept_scaling": s.intercept_scaling, "tol": s.tol, "max_iter": s.max_iter,
            "features": "L2-normalised pooled features of the eval transform",
            "difficult": "negative in training, ignored in scoring"}


# ----------------------------------------------------------------------------- low-shot

def draw_lowshot(targets: np.ndarray, k: int, rng: np.random.Generator, multilabel: bool) -> np.ndarray:
    """(n, C) 0/1: the rows each class's SVM trains on. Multi-label: k positives and
    (C - 1) x k negatives per class; single-label: k images per class, shared by all."""
    n, classes = targets.shape
    rows = np.zeros((n, classes))
    if multilabel:
        for c in range(classes):
            for value, count in ((1, k), (0, (classes - 1) * k)):
                pool = np.flatnonzero(targets[:, c] == value)
                if len(pool) < count:
                    raise UserError(f"low-shot k={k} needs {count} {'positive' if value else 'negative'} "
                                    f"training images of class {c}, the train split has {len(pool)}; "
                                    "lower lowshot.k_values or use more data")
                rows[rng.choice(pool, count, replace=False), c] = 1
        return rows
    chosen = []
    for c in range(classes):
        pool = np.flatnonzero(targets[:, c] == 1)
        if len(pool) < k:
            raise UserError(f"low-shot k={k} needs {k} training images of class {c}, the train split "
                            f"has {len(pool)}; lower lowshot.k_values or use more data")
        chosen.append(rng.choice(pool, k, replace=False))
    rows[np.concatenate(chosen)] = 1
    return rows


def _fit_draw(x, targets, rows, s: SvmSettings, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (d, C, costs), b (C, costs)) of every class x cost on one draw. Only the drawn rows
    enter the solver: once for all classes when they share them (k images per class), else
    class by class (VOC07: each class has its own k positives and 19 k negatives)."""
    classes, costs = targets.shape[1], torch.tensor(s.costs, dtype=torch.float64)
    shared = bool((rows == rows[:, :1]).all())
    groups = [list(range(classes))] if shared else [[c] for c in range(classes)]
    w = torch.zeros(x.shape[1], classes, len(costs))
    b = torch.zeros(classes, len(costs))
    for group in groups:
        used = np.flatnonzero(rows[:, group].any(1))
        cols = np.repeat(group, len(costs))  # problem (c, j): class c, cost j
        y, weight = _problems(targets[used][:, cols], rows[used][:, cols], s)
        wg, bg, _ = fit_svms(x[used], y, weight, costs.repeat(len(group)), device=device,
                             intercept_scaling=s.intercept_scaling, tol=s.tol, max_iter=s.max_iter)
        w[:, group] = wg.view(-1, len(group), len(costs))
        b[group] = bg.view(len(group), len(costs))
    return w, b


def _lowshot_once(run, x, targets, rows, xval, val, xte, s: SvmSettings) -> dict:
    """Fit every class x cost on one draw, choose the cost on val, score test with it."""
    costs = np.asarray(s.costs)
    w, b = _fit_draw(x, targets, rows, s, run.device)
    val_scores = torch.einsum("nd,dcj->jnc", xval.float(), w) + b.T[:, None]
    by_cost = [_scores(run.headline, v.numpy(), val["targets"], val["labels"]) for v in val_scores]
    j = int(np.nanargmax(by_cost))
    return {"cost": float(costs[j]), "val": float(by_cost[j]),
            "test_scores": (xte.float() @ w[:, :, j] + b[:, j]).numpy()}


def _lowshot(run: frozen.Run) -> dict:
    s, ls = run.cfg.svm, run.cfg.lowshot
    feats = frozen.split_features(run)
    if not dist.is_main_process():
        return {}
    classes, multilabel = len(run.splits["train"].classes), run.splits["train"].multilabel
    x, targets = normalise(feats["train"][0]), class_targets(feats["train"][1], classes)
    val = {"labels": feats["val"][1].numpy(), "targets": class_targets(feats["val"][1], classes)}
    xval, (xte, yte) = normalise(feats["val"][0]), feats["test"]
    xte = normalise(xte)
    headline_k = ls.headline_k or max(ls.k_values)
    if headline_k not in ls.k_values:
        raise UserError(f"lowshot.headline_k={headline_k} is not one of lowshot.k_values {ls.k_values}")
    metrics, draws, kept = {}, [], []
    for k in ls.k_values:
        tests = []
        for sample in range(ls.samples):
            rng = np.random.default_rng([run.cfg.seed, sample, k])
            one = _lowshot_once(run, x, targets, draw_lowshot(targets, k, rng, multilabel), xval, val,
                                xte, s)
            tests.append(_test_metrics(run.headline, one["test_scores"], yte)[run.headline])
            draws.append({"k": k, "sample": sample, "cost": one["cost"], "val": one["val"],
                          "test": tests[-1]})
            kept += [one["test_scores"]] if k == headline_k else []
        metrics[f"{run.headline}@k{k}"] = float(np.mean(tests))
        metrics[f"{run.headline}@k{k}_std"] = float(np.std(tests, ddof=1)) if len(tests) > 1 else None
        spread = metrics[f"{run.headline}@k{k}_std"] or 0.0
        run.log(f"k={k}: test {run.headline} {np.mean(tests):.2f} +- {spread:.2f} over {ls.samples} samples")
    run.derived["draws"] = draws
    return _lowshot_result(run, metrics, headline_k, kept, yte.numpy(), s, ls)


def _lowshot_result(run, metrics, headline_k, kept, labels, s, ls) -> dict:
    headline = run.headline
    metrics = {headline: metrics[f"{headline}@k{headline_k}"], **metrics}
    ids = [f"sample{i}/{name}" for i in range(len(kept)) for name in run.splits["test"].ids()]
    stacked = np.concatenate(kept)
    outcomes = frozen.save_outcomes(run, np.concatenate([labels] * len(kept)), scores=stacked, ids=ids)
    outcomes["samples"] = len(kept)  # rows: the test split once per sample; metric: mean over samples
    return {"metrics": metrics, "engine": "torch-svm", "name": f"lowshot k{headline_k}",
            "schedule": {**_anchor_schedule(s), "k_values": list(ls.k_values), "samples": ls.samples,
                         "headline_k": headline_k, "drawn_from": "train",
                         "selection": f"one cost per (k, sample): best {headline} on val"},
            "metric": frozen.metric_definition(headline, headline, f"mean over {ls.samples} seeded "
                                               f"samples of {headline_k} positives per class"),
            "outcomes": outcomes}


def _config_record(cfg: SvmConfig, task: str) -> dict:
    record = to_dict(cfg)
    if task == "svm":
        record.pop("lowshot")
    return record


def run(task: str, cfg: SvmConfig, weights: str, output, label: str | None = None,
        allow_pickle: bool = False) -> dict:
    return frozen.run_task(task, cfg, weights, output, label, allow_pickle,
                           _svm if task == "svm" else _lowshot, lambda c: _config_record(c, task))


@cli
def main_svm(argv=None) -> dict:
    return frozen.main("svm", "Per-class linear SVMs, costs by cross-validation (VOC07 SVM)",
                       SvmConfig, run, argv)


@cli
def main_lowshot(argv=None) -> dict:
    return frozen.main("lowshot", "Low-shot linear SVMs (k positives per class, seeded samples)",
                       SvmConfig, run, argv)
