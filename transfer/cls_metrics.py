"""Classification metrics of the transfer suite, from class scores (N x C).

    top1 / top5      percent of test images whose label is among the k best scores
    mean_per_class   mean over the classes present in the labels of each class's top-1 accuracy
                     (sklearn's balanced_accuracy_score; Flowers, Pets, Aircraft, Caltech-101)
    mAP              multi-label (VOC07): mean over classes of the VOC07 11-point average
                     precision of that class's scores; labels 1 present, 0 absent, -1 ignored
                     ("difficult" only). As the VOC devkit's VOCevalcls.m: the mean over
                     t = 0, 0.1, ..., 1 of the best precision at recall >= t. (ssl-transfer's
                     voc_eval_cls gets its curve from sklearn's precision_recall_curve, which
                     adds a point of precision 1 at recall 0: its t = 0 term is always 1.)

Every value is in percent. `mocobench.datasets.METRICS` holds the definitions that
results' protocol records quote.
"""
import numpy as np
import torch

HEADLINES = ("top1", "mean_per_class", "mAP")


def topk_ids(scores, k: int = 5) -> np.ndarray:
    """(N, min(k, C)) class ids, best first."""
    scores = torch.as_tensor(scores)
    return scores.topk(min(k, scores.shape[1]), dim=1).indices.numpy()


def top_k(topk: np.ndarray, labels: np.ndarray, k: int) -> float:
    return 100.0 * float((topk[:, :k] == np.asarray(labels)[:, None]).any(1).mean())


def mean_per_class(pred: np.ndarray, labels: np.ndarray) -> float:
    labels, pred = np.asarray(labels), np.asarray(pred)
    per_class = [(pred[labels == c] == c).mean() for c in np.unique(labels)]
    return 100.0 * float(np.mean(per_class))


def precision_recall(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Precision and recall at each distinct score, best first, of one class: `labels`
    1 / 0 / -1 (ignored); tied scores count as one threshold. None without positives."""
    keep = labels != -1
    s, y = np.asarray(scores, dtype=np.float64)[keep], (labels[keep] == 1)
    if y.sum() == 0:
        return None  # undefined: no positive test image of this class
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each tie group
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return tp / (tp + fp), tp / y.sum()


def voc07_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """VOC07 11-point AP of one class (the mean over t = 0, 0.1, ..., 1 of the best
    precision at recall >= t); NaN when the class has no positive image."""
    pr = precision_recall(scores, labels)
    if pr is None:
        return float("nan")
    precision, recall = pr
    return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                          for t in np.linspace(0, 1, 11)]))


def area_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """The area under the precision envelope (VOC 2010+; what Goyal et al.'s
    svm_helper.calculate_ap reports for the VOC07 SVM benchmark)."""
    pr = precision_recall(scores, labels)
    if pr is None:
        return float("nan")
    precision, recall = pr
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * envelope))


def mean_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """mAP (%): 11-point AP averaged over the classes that have a positive image."""
    return 100.0 * float(np.nanmean([voc07_ap(scores[:, c], labels[:, c]) for c in range(labels.shape[1])]))


def mean_area_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.nanmean([area_ap(scores[:, c], labels[:, c]) for c in range(labels.shape[1])]))


def metrics_from_topk(top: np.ndarray, labels: np.ndarray, headline: str, num_classes: int,
                      prefix: str = "") -> dict[str, float]:
    """Single-label metrics from (N, k) best-first class ids: the headline first, then
    top-1 and top-5 (only with more than 5 classes: top-5 of 5 is 100% by construction)."""
    out = {}
    if headline == "mean_per_class":
        out[f"{prefix}mean_per_class"] = mean_per_class(top[:, 0], labels)
    out[f"{prefix}top1"] = top_k(top, labels, 1)
    if num_classes > 5 and top.shape[1] >= 5:
        out[f"{prefix}top5"] = top_k(top, labels, 5)
    return out


def classification_metrics(scores, labels, headline: str, prefix: str = "") -> dict[str, float]:
    """The headline metric first, then top-1 / top-5 where defined; `prefix`, e.g. "knn_",
    goes before every name."""
    scores = torch.as_tensor(scores).float()
    labels = np.asarray(labels)
    if headline == "mAP":
        return {f"{prefix}mAP": mean_ap(scores.numpy(), labels)}
    return metrics_from_topk(topk_ids(scores, 5), labels, headline, scores.shape[1], prefix)
