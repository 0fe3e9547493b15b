"""Logistic regression on cached features, with the L2 strength chosen on a
validation split and the final classifier refit on train + val (ssl-transfer's linear.py).

Objective (both solvers): mean cross-entropy + l2/2 * ||W||^2 on standardised
features (bias not penalised). scikit-learn's C is 1 / (l2 * n). Multinomial for
single-label data; for multi-label data (VOC07: labels 1 / 0 / -1 ignored) one binary
logistic regression per class, ignored entries left out of that class's loss. Two solvers:

- ``sklearn``: LogisticRegression(lbfgs); exact and well tested, but holds a
  float64 copy of the features, fine up to ~10^7 feature values.
- ``torch``: full-batch L-BFGS whose loss/gradient stream over row chunks, so
  the feature matrix stays where it is (CPU RAM, float16 allowed, or the GPU
  when it fits). ImageNet's 1.28M x 2048 costs one matmul pass per evaluation.
"""
import time
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mocobench.errors import UserError

SOLVERS = ("auto", "sklearn", "torch")
_ROWS_PER_CHUNK = 65536


class Standardizer:
    """Per-dimension mean/std of the training features, computed in chunks (float64)."""

    def __init__(self, x: torch.Tensor):
        s = torch.zeros(x.shape[1], dtype=torch.float64)
        ss = torch.zeros_like(s)
        for start in range(0, len(x), _ROWS_PER_CHUNK):
            c = x[start:start + _ROWS_PER_CHUNK].to(torch.float64)
            s += c.sum(0)
            ss += (c * c).sum(0)
        n = max(len(x), 1)
        self.mean = (s / n).float()
        # Constant (e.g. dead-ReLU) dimensions get std 1 so they stay 0, not NaN.
        std = (ss / n - (s / n) ** 2).clamp_min(0).sqrt().float()
        self.std = torch.where(std > 1e-6, std, torch.ones_like(std))

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        return (chunk.float() - self.mean.to(chunk.device)) / self.std.to(chunk.device)


class LinearClassifier:
    """scores(x) = standardize(x) @ W + b, whichever solver found W, b."""

    def __init__(self, standardizer: Standardizer, weight: torch.Tensor, bias: torch.Tensor):
        self.standardizer, self.weight, self.bias = standardizer, weight.cpu(), bias.cpu()

    @torch.no_grad()
    def scores(self, x: torch.Tensor, device="cpu") -> torch.Tensor:
        w, b = self.weight.to(device), self.bias.to(device)
        out = [(self.standardizer(x[s:s + _ROWS_PER_CHUNK].to(device)) @ w + b).cpu()
               for s in range(0, len(x), _ROWS_PER_CHUNK)]
        return torch.cat(out) if out else torch.empty(0, len(b))


def _sklearn_fit(clf, z, y):
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    # One BLAS thread: matrices this small gain nothing from more, and on a shared
    # CPU spinning BLAS threads made each fit 5-20x slower (measured, 2 cores).
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        # Not converging to tol within max_iter is normal for weak L2; the validation
        # score is what counts, and it is reported.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(z, y)
    return clf


def _fit_sklearn_multilabel(z: np.ndarray, y: np.ndarray, l2: float, max_iter: int, tol: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """One binary logistic regression per class on the rows not ignored (-1) for it."""
    from sklearn.linear_model import LogisticRegression

    weight, bias = torch.zeros(z.shape[1], y.shape[1]), torch.zeros(y.shape[1])
    for c in range(y.shape[1]):
        rows = y[:, c] != -1
        target = (y[rows, c] == 1).astype(np.int64)
        if target.min() == target.max():  # one value only: a constant score says it
            bias[c] = 1e9 if target[0] else -1e9
            continue
        clf = _sklearn_fit(LogisticRegression(C=1.0 / (l2 * len(target)), max_iter=max_iter,
                                              tol=tol), z[rows], target)
        weight[:, c], bias[c] = torch.from_numpy(clf.coef_[0]).float(), float(clf.intercept_[0])
    return weight, bias


def _fit_sklearn(z: np.ndarray, y: np.ndarray, num_classes: int, l2: float, max_iter: int,
                 tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.linear_model import LogisticRegression

    if y.ndim == 2:
        return _fit_sklearn_multilabel(z, y, l2, max_iter, tol)
    clf = _sklearn_fit(LogisticRegression(C=1.0 / (l2 * len(z)), max_iter=max_iter, tol=tol), z, y)
    weight = torch.zeros(z.shape[1], num_classes)
    bias = torch.zeros(num_classes)
    coef, icpt = torch.from_numpy(clf.coef_).float(), torch.from_numpy(clf.intercept_).float()
    if len(clf.classes_) == 2 and coef.shape[0] == 1:
        # Binary problems come back as one logit; spread it to the two classes.
        coef, icpt = torch.cat([-coef / 2, coef / 2]), torch.cat([-icpt / 2, icpt / 2])
    cls = torch.from_numpy(clf.classes_).long()
    weight[:, cls] = coef.T
    bias[cls] = icpt
    # Classes absent from this training split can never be predicted.
    missing = torch.ones(num_classes, dtype=torch.bool)
    missing[cls] = False
    bias[missing] = -1e9
    return weight, bias


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy; for multi-label y (1 / 0 / -1) summed binary cross-entropy
    of the entries not ignored."""
    if y.ndim == 1:
        return F.cross_entropy(logits, y, reduction="sum")
    return F.binary_cross_entropy_with_logits(logits, (y == 1).float(), weight=(y != -1).float(),
                                              reduction="sum")


def _fit_torch(x: torch.Tensor, y: torch.Tensor, std: Standardizer, num_classes: int, l2: float,
               max_iter: int, tol: float, device, init=None, desc="L-BFGS"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = x.shape
    weight = torch.zeros(d, num_classes, device=device)
    bias = torch.zeros(num_classes, device=device)
    if init is not None:
        weight.copy_(init[0]), bias.copy_(init[1])
    weight.requires_grad_(True), bias.requires_grad_(True)
    y = y.to(device)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=tol, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")
    bar = tqdm(total=max_iter, desc=desc, leave=False, dynamic_ncols=True)
    # Standardisation folded into the weights, (x - m)/s @ W = x @ (W/s) - (m/s) @ W: no
    # standardised copy of a chunk is made, and a closure costs one product per chunk.
    inv = (1.0 / std.std).to(device)
    shift = (std.mean * std.std.reciprocal()).to(device)
    starts = range(0, n, _ROWS_PER_CHUNK)

    def closure():
        opt.zero_grad()
        total = 0.0
        w_eff, b_eff = weight * inv[:, None], bias - shift @ weight
        for i, s in enumerate(starts):
            chunk = x[s:s + _ROWS_PER_CHUNK].to(device, non_blocking=True).float()
            loss = _loss(chunk @ w_eff + b_eff, y[s:s + len(chunk)]) / n
            loss.backward(retain_graph=i + 1 < len(starts))  # w_eff's graph serves every chunk
            total += loss.item()
        reg = 0.5 * l2 * (weight * weight).sum()
        reg.backward()
        bar.update(1)
        bar.set_postfix(loss=f"{total + reg.item():.4f}")
        return torch.tensor(total + reg.item())

    opt.step(closure)
    bar.close()
    return weight.detach(), bias.detach()


def _device_copy(x: torch.Tensor, device) -> torch.Tensor:
    """Move the features to the GPU once when they fit in half its free memory;
    otherwise leave them in RAM and stream chunks every evaluation."""
    device = torch.device(device)
    if device.type != "cuda":
        return x
    free, _ = torch.cuda.mem_get_info(device)
    return x.to(device) if x.numel() * x.element_size() < free // 2 else x


def choose_solver(solver: str, x: torch.Tensor, sklearn_max_elements: int) -> str:
    if solver not in SOLVERS:
        raise UserError(f"fast.solver={solver!r} is not one of {', '.join(SOLVERS)}")
    if solver == "auto":
        return "sklearn" if x.numel() <= sklearn_max_elements else "torch"
    return solver


def fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, solver: str,
        max_iter: int = 1000, tol: float = 1e-4, device="cpu", init=None,
        desc: str = "fit", std: Standardizer | None = None) -> LinearClassifier:
    """One multinomial logistic regression with L2 strength `l2` (solver 'sklearn' or 'torch').
    `init` (torch only): (W, b) to start from; `std`: x's Standardizer if already computed."""
    std = std or Standardizer(x)
    if solver == "sklearn":
        z = std(x).double().numpy()
        w, b = _fit_sklearn(z, y.numpy(), num_classes, l2, max_iter, tol)
    else:
        w, b = _fit_torch(_device_copy(x, device), y, std, num_classes, l2, max_iter, tol,
                          device, init=init, desc=desc)
    return LinearClassifier(std, w, b)


def select_l2(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
              num_classes: int, l2_grid: list[float], solver: str, score: Callable,
              max_iter: int = 1000, tol: float = 1e-4, device="cpu", seed: int = 0,
              select_max_images: int = 0, log=print) -> tuple[float, dict, tuple | None]:
    """The L2 strength of `l2_grid` whose classifier fit on (x, y) scores best on the
    validation split: `score(class scores, y_val)` -> a number, higher is better.

    The search fits on `select_max_images` random training images when > 0 (ImageNet: a
    128k-image search costs a tenth of a full one). Returns (best l2, a record of the search:
    validation score per l2, sizes, solver; the best classifier's (W, b) for a warm start)."""
    if not l2_grid or any(v <= 0 for v in l2_grid):
        raise UserError(f"fast.l2_grid must list positive L2 strengths, got {l2_grid}")
    if len(x) < 2 or len(x_val) < 1:
        raise UserError(f"the linear probe needs at least 2 training and 1 validation image, "
                        f"got {len(x)} and {len(x_val)}")
    grid = sorted(set(float(v) for v in l2_grid), reverse=True)  # strong to weak: warm starts
    if select_max_images > 0 and select_max_images < len(x):
        keep = torch.from_numpy(np.sort(np.random.default_rng(seed).permutation(len(x))[:select_max_images]))
        x, y = x[keep], y[keep]
    record = {"solver": solver, "l2_grid": grid, "search_images": len(x), "val_images": len(x_val)}
    if len(grid) == 1:
        return grid[0], record, None
    std, init, val_score, solutions = Standardizer(x), None, {}, {}
    for l2 in grid:
        clf = fit(x, y, num_classes, l2, solver, max_iter, tol, device, init, desc=f"l2={l2:g}", std=std)
        if solver == "torch":
            init = solutions[l2] = (clf.weight.to(device), clf.bias.to(device))
        val_score[l2] = float(score(clf.scores(x_val, device), y_val))
        log(f"  l2={l2:g}: validation {val_score[l2]:.2f} ({len(x)} fit / {len(x_val)} val)")
    # Ties go to the stronger regularisation (grid order is strong to weak).
    best = max(grid, key=lambda v: (val_score[v], -grid.index(v)))
    record["val_score"] = {f"{k:g}": v for k, v in val_score.items()}
    return best, record, solutions.get(best)


def fit_final(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, solver: str,
              max_iter: int = 1000, tol: float = 1e-4, device="cpu", init=None,
              log=print) -> tuple[LinearClassifier, dict]:
    """The classifier with the chosen `l2` fit on all of (x, y) (train + val)."""
    t0 = time.time()
    log(f"  chosen l2={l2:g}; refitting on {len(x)} train + val images ({solver})")
    clf = fit(x, y, num_classes, l2, solver, max_iter, tol, device, init, desc=f"refit l2={l2:g}")
    if not (torch.isfinite(clf.weight).all() and torch.isfinite(clf.bias).all()):
        raise RuntimeError("logistic regression diverged (non-finite weights)")
    return clf, {"l2": l2, "sklearn_C": 1.0 / (l2 * len(x)), "refit_images": len(x),
                 "refit_time_s": round(time.time() - t0, 3)}
