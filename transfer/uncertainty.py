"""How sure a number is: bootstrap confidence intervals over test images, and seed tests.

A metric measured on N test images is one draw: another N images from the same
distribution give another number. The bootstrap redraws the N test images with
replacement, B times (seeded), and recomputes the metric on each redraw; the middle 95% of
the B values is the confidence interval. This covers test-set sampling only, not training
randomness (seeds: see ``welch_p``).

Every redraw is a vector of counts ``w`` (how often each test image was drawn), and every
metric here is a function of per-image outcomes weighted by ``w``, so B redraws cost B
weighted sums, never B re-evaluations. The identity redraw (``w = 1``) gives the run's own
metric: ``report`` checks it against results.json before it trusts an interval.

Paired intervals: two rows scored on the same images get the same ``w`` in each redraw, so
the interval of their difference leaves out what they share (which images are hard). The
rows must really have been scored on the same images: ``align`` checks that their outcomes
list the same images (by id, else by position) with the same ground truth.

Metric evaluators (each gives ``keys`` per test image, ``truth`` for the pairing check,
``names(metrics)`` -> the metrics it can resample and ``evaluate(weights, names)``):
``ClassificationOutcomes``, ``SegmentationOutcomes``, and ``DetectionOutcomes`` in
transfer/uncertainty_detection.py. All values are in percent, as results.json.
"""
import numpy as np

CONFIDENCE = 0.95
# Largest gap, in percentage points, between a run's reported metric and the same metric
# recomputed from its outcomes (identity redraw) for its intervals to be shown: results.json
# holds float32 sums and mmseg rounds to 2 decimals, so exact equality cannot be asked for.
IDENTITY_TOLERANCE = 0.02
_CHUNK_ELEMENTS = 4_000_000  # redraws are made this many counts at a time (32 MB of float64)


def resamples(n: int, samples: int, seed: int):
    """Yield (b, n) float64 count matrices, `samples` rows in all: row r says how often each
    of the n test images is drawn in redraw r (n draws with replacement)."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(samples, _CHUNK_ELEMENTS // max(n, 1)))
    done = 0
    while done < samples:
        b = min(chunk, samples - done)
        draws = rng.integers(0, n, size=(b, n), dtype=np.int32) + n * np.arange(b, dtype=np.int32)[:, None]
        yield np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        done += b


def percentile_ci(values, level: float = CONFIDENCE) -> tuple[float, float] | None:
    """The percentile interval of bootstrap values (undefined redraws, NaN, left out)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return None
    tail = 50 * (1 - level)
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def welch_p(a, b) -> float | None:
    """Two-sided p-value of Welch's t-test between two rows' per-seed values (the test of a
    difference across training seeds); None when either side has fewer than 2 runs or
    neither varies."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return None
    p = stats.ttest_ind(np.asarray(a, float), np.asarray(b, float), equal_var=False).pvalue
    return float(p) if np.isfinite(p) else None


def align(reference, run) -> np.ndarray | None:
    """Positions pos with run image j == reference image pos[j], or None when the two runs
    were not scored on the same images: other ids, another count, or other ground truth."""
    n = len(reference.keys)
    if len(run.keys) != n:
        return None
    if run.keyed and reference.keyed:
        index = {k: i for i, k in enumerate(reference.keys)}
        pos = np.array([index.get(k, -1) for k in run.keys])
        if len(index) != n or (pos < 0).any() or len(np.unique(pos)) != n:
            return None
    else:
        pos = np.arange(n)
    return pos if run.same_truth(reference, pos) else None


def _keys(ids, n: int) -> tuple[list[str], bool]:
    if ids is None:
        return [f"#{i}" for i in range(n)], False
    return [str(i) for i in ids], True


def precision_at_recalls(tp, fp, npos, thresholds, precision):
    """Interpolated precision at each recall threshold, as COCOeval.accumulate and the VOC
    devkit compute it: for each threshold t, the largest precision at any point of the ranked
    list whose recall tp/npos is at least t (0 when none is).

    tp, fp: (rows, d) cumulative weighted true / false positives along the ranked list
    (non-decreasing whole numbers: redraw counts); npos: (rows,) positives, > 0;
    precision(tp, fp): the precision formula of the reference. Returns (rows, len(thresholds))."""
    rows, d = tp.shape
    out = np.zeros((rows, len(thresholds)))
    if d == 0 or rows == 0:
        return out
    env = np.maximum.accumulate(precision(tp, fp)[:, ::-1], axis=1)[:, ::-1]
    first = _first_reaching(tp, npos, np.asarray(thresholds, dtype=np.float64))
    has = first < d
    r, t = np.nonzero(has)
    out[r, t] = env[r, first[r, t]]
    return out


def _first_reaching(tp, npos, thresholds):
    """np.searchsorted(tp[r] / npos[r], thresholds, side="left") for every row r at once, with
    the reference's own floating-point comparison: the smallest whole c with c / npos >= t
    is found exactly, then positions with tp < c are counted (rows stacked with offsets)."""
    rows, d = tp.shape
    npos = npos[:, None]
    c = np.ceil(thresholds[None, :] * npos)
    for _ in range(2):  # the product may round either way: settle c on the float comparison
        c = np.where((c - 1 >= 0) & ((c - 1) / npos >= thresholds[None, :]), c - 1, c)
        c = np.where(c / npos < thresholds[None, :], c + 1, c)
    span = max(float(tp[:, -1].max()), float(c.max())) + 1
    offsets = np.arange(rows, dtype=np.float64)[:, None] * span
    flat = np.searchsorted((tp + offsets).ravel(), (c + offsets).ravel(), side="left")
    return flat.reshape(rows, -1) - np.arange(rows)[:, None] * d


def _voc_precision(tp, fp):
    return tp / np.maximum(tp + fp, np.finfo(np.float64).eps)


VOC07_RECALLS = np.arange(0.0, 1.1, 0.1)  # the devkit's 11 points, with its own rounding


# ----------------------------------------------------------------------------- classification

def classification_kind(name: str, definition: str = "") -> str | None:
    """Which resampled computation a classification metric name stands for, or None."""
    low, text = name.lower(), definition.lower()
    if low.endswith("top1") or low in ("acc", "accuracy"):
        return "top1"
    if low.endswith("top5"):
        return "top5"
    if "per_class" in low or "per-class" in text or low in ("mpca", "balanced_accuracy"):
        return "mean_per_class"
    if low in ("map", "map11", "ap", "voc07_map") or "11-point" in text:
        return "ap11"
    return None


class ClassificationOutcomes:
    """labels (N,) class ids, or (N, C) 1 / 0 / negative = ignored for multi-label data;
    topk (N, k) class ids best first; scores (N, C); ids (N,) — see transfer/outcomes.py."""

    def __init__(self, labels, topk=None, scores=None, ids=None):
        self.labels, self.topk, self.scores = labels, topk, scores
        self.keys, self.keyed = _keys(ids, len(labels))
        self.multilabel = labels.ndim == 2
        self._hit1 = self._hit5 = None  # per-image hits, computed once for all redraws

    def same_truth(self, reference, pos) -> bool:
        return (isinstance(reference, ClassificationOutcomes)
                and reference.labels.shape[1:] == self.labels.shape[1:]
                and np.array_equal(reference.labels[pos], self.labels))

    def names(self, metrics: dict) -> dict:
        """{metric: kind} for the metrics (name -> definition) these outcomes can give."""
        usable = {"top1": self.topk is not None and not self.multilabel,
                  "top5": self.topk is not None and not self.multilabel and self.topk.shape[1] >= 5,
                  "mean_per_class": self.topk is not None and not self.multilabel,
                  "ap11": self.scores is not None and self.multilabel}
        kinds = {m: classification_kind(m, d) for m, d in metrics.items()}
        return {m: k for m, k in kinds.items() if k is not None and usable[k]}

    def evaluate(self, weights, names: dict) -> dict:
        total = weights.sum(1)
        return {m: getattr(self, f"_{kind}")(weights, total) for m, kind in names.items()}

    def _top1(self, w, total):
        if self._hit1 is None:
            self._hit1 = (self.topk[:, 0] == self.labels).astype(np.float64)
        return 100 * (w @ self._hit1) / total

    def _top5(self, w, total):
        if self._hit5 is None:
            self._hit5 = (self.topk[:, :5] == self.labels[:, None]).any(1).astype(np.float64)
        return 100 * (w @ self._hit5) / total

    def _mean_per_class(self, w, total=None):
        order = np.argsort(self.labels, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(self.labels[order]) != 0])
        correct = (self.topk[:, 0] == self.labels)[order]
        seen = np.add.reduceat(w[:, order], starts, axis=1)
        hits = np.add.reduceat(w[:, order] * correct, starts, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return 100 * np.nanmean(np.where(seen > 0, hits / seen, np.nan), axis=1)

    def _ap11(self, w, total=None):
        """Mean over classes of the VOC07 11-point AP of the ranking by score (the VOC
        devkit's classification measure); ignored labels (< 0) count neither way."""
        aps = []
        for c in range(self.labels.shape[1]):
            order = np.argsort(-self.scores[:, c], kind="mergesort")
            lab, wc = self.labels[order, c], w[:, order]
            tp, fp = np.cumsum(wc * (lab > 0), axis=1), np.cumsum(wc * (lab == 0), axis=1)
            npos = tp[:, -1].copy()
            q = precision_at_recalls(tp, fp, np.maximum(npos, 1), VOC07_RECALLS, _voc_precision)
            aps.append(np.where(npos > 0, q.sum(1) / 11.0, np.nan))
        with np.errstate(invalid="ignore"):
            return 100 * np.nanmean(np.stack(aps, 1), axis=1)


# ----------------------------------------------------------------------------- segmentation

class SegmentationOutcomes:
    """confusion (N, C, C) per-image pixel counts, rows ground truth, columns prediction; the
    metrics are mmseg's IoUMetric on the summed matrix: mIoU and mAcc average the classes whose
    value is defined (nanmean), aAcc is all correct pixels over all labelled ones."""

    def __init__(self, confusion, classes=None, ids=None):
        self.confusion = confusion
        self.flat = confusion.reshape(len(confusion), -1).astype(np.float64)
        self.c = confusion.shape[1]
        self.keys, self.keyed = _keys(ids, len(confusion))
        self.label_pixels = confusion.sum(axis=2)  # per image and class: the ground truth's share

    def same_truth(self, reference, pos) -> bool:
        return (isinstance(reference, SegmentationOutcomes)
                and np.array_equal(reference.label_pixels[pos], self.label_pixels))

    def names(self, metrics: dict) -> dict:
        return {m: m for m in metrics if m in ("mIoU", "mAcc", "aAcc")}

    def evaluate(self, weights, names: dict) -> dict:
        total = (weights @ self.flat).reshape(-1, self.c, self.c)
        inter = np.diagonal(total, axis1=1, axis2=2)
        label, pred = total.sum(2), total.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = {"mIoU": np.nanmean(inter / (label + pred - inter), axis=1),
                      "mAcc": np.nanmean(inter / label, axis=1),
                      "aAcc": inter.sum(1) / label.sum(1)}
        return {m: 100 * values[kind] for m, kind in names.items()}
