"""Few-shot episodes on frozen features ("How Well Do Self-Supervised Models Transfer?",
Ericsson et al., CVPR 2021, linusericsson/ssl-transfer few_shot.py).

    python -m transfer fewshot --weights W --data cifar100 --data-root /datasets --output DIR

Each episode draws N classes of the test split and, per class, K support and Q query images
(5-way, Q = 15, 600 episodes by default, seeded); a classifier fit on the support features
labels the queries. Classifiers: ``logreg`` (the default, as the issue asks and as Tian et
al. 2020's "Rethinking few-shot": multinomial logistic regression, C = 1, on L2-normalised
features) or ``prototype`` (nearest class mean, Euclidean, what ssl-transfer's ProtoNet
evaluation computes). Reported per K: the mean accuracy over episodes and its 95% interval
(1.96 x std / sqrt(episodes), as few_shot.py prints it).
"""
import warnings
from dataclasses import dataclass, field

import numpy as np

from mocobench import dist
from mocobench.config import setting, to_dict
from mocobench.errors import UserError, cli
from transfer import frozen
from transfer.frozen import DataConfig, FeatureConfig, ModelConfig


@dataclass
class FewshotSettings:
    ways: int = setting(5, ge=2)
    shots: list[int] = setting([1, 5, 20], ge=1)
    queries: int = setting(15, ge=1)  # query images per class and episode
    episodes: int = setting(600, ge=1)
    classifier: str = setting("logreg", choices=("logreg", "prototype"))
    logreg_c: float = setting(1.0, gt=0)  # scikit-learn's C (Tian et al. 2020)
    headline_shot: int | None = setting(None, ge=1)  # the K reported as the headline (None: 5 if run)


@dataclass
class FewshotConfig:
    seed: int = 0  # seeds the episodes
    device: str = setting("auto", choices=("auto", "cpu"))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    fewshot: FewshotSettings = field(default_factory=FewshotSettings)


def draw_episode(by_class: list[np.ndarray], ways: int, shots: int, queries: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes (ways,), support indices (ways, shots), query indices (ways, queries))."""
    eligible = [c for c, members in enumerate(by_class) if len(members) >= shots + queries]
    if len(eligible) < ways:
        raise UserError(f"{ways}-way {shots}-shot episodes with {queries} queries need {ways} classes "
                        f"with {shots + queries} test images each; {len(eligible)} have them")
    classes = rng.choice(eligible, ways, replace=False)
    picks = np.stack([rng.choice(by_class[c], shots + queries, replace=False) for c in classes])
    return classes, picks[:, :shots], picks[:, shots:]


def classify(support: np.ndarray, support_y: np.ndarray, query: np.ndarray, s: FewshotSettings) -> np.ndarray:
    """Predicted episode-local labels of the queries."""
    if s.classifier == "prototype":
        protos = np.stack([support[support_y == c].mean(0) for c in range(s.ways)])
        return ((query[:, None] - protos[None]) ** 2).sum(-1).argmin(1)
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    norm = lambda a: a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-12)  # noqa: E731
    clf = LogisticRegression(C=s.logreg_c, max_iter=1000)
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(norm(support), support_y)
    return clf.predict(norm(query))


def run_episodes(x: np.ndarray, labels: np.ndarray, shots: int, s: FewshotSettings, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(accuracy per episode (%), query indices, their labels, predicted labels), all episodes."""
    rng = np.random.default_rng([seed, shots])
    by_class = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
    accuracy, queried, truth, predicted = [], [], [], []
    for _ in range(s.episodes):
        classes, support, query = draw_episode(by_class, s.ways, shots, s.queries, rng)
        local = np.repeat(np.arange(s.ways), shots)
        pred = classify(x[support.ravel()], local, x[query.ravel()], s)
        want = np.repeat(np.arange(s.ways), s.queries)
        accuracy.append(100.0 * (pred == want).mean())
        queried.append(query.ravel())
        truth.append(classes[want])
        predicted.append(classes[pred])
    return (np.asarray(accuracy), np.concatenate(queried), np.concatenate(truth),
            np.concatenate(predicted))


def _fewshot(run: frozen.Run) -> dict:
    s = run.cfg.fewshot
    if run.splits["test"].multilabel:
        raise UserError(f"{run.splits['test'].name} is multi-label; episodes need one class per image")
    headline_shot = s.headline_shot or (5 if 5 in s.shots else s.shots[0])
    if headline_shot not in s.shots:
        raise UserError(f"fewshot.headline_shot={headline_shot} is not one of fewshot.shots {s.shots}")
    feats = frozen.split_features(run, names=("test",))
    if not dist.is_main_process():
        return {}
    x, labels = feats["test"][0].float().numpy(), feats["test"][1].numpy()
    name = lambda k: f"{s.ways}way{k}shot"  # noqa: E731
    metrics, kept = {}, None
    for k in s.shots:
        acc, queried, truth, pred = run_episodes(x, labels, k, s, run.cfg.seed)
        metrics[name(k)] = float(acc.mean())
        metrics[f"{name(k)}_ci95"] = float(1.96 * acc.std() / np.sqrt(len(acc)))
        run.log(f"{name(k)}: {acc.mean():.2f} +- {metrics[f'{name(k)}_ci95']:.2f} ({s.episodes} episodes)")
        kept = (queried, truth, pred) if k == headline_shot else kept
    queried, truth, pred = kept
    names = run.splits["test"].ids()
    ids = [f"episode{i // (s.ways * s.queries)}/{names[j]}" for i, j in enumerate(queried)]
    headline = name(headline_shot)
    return {"metrics": {headline: metrics[headline], **{k: v for k, v in metrics.items() if k != headline}},
            "engine": "sklearn" if s.classifier == "logreg" else "numpy", "name": f"fewshot {headline}",
            "schedule": {"ways": s.ways, "shots": list(s.shots), "queries": s.queries,
                         "episodes": s.episodes, "classifier": s.classifier, "logreg_c": s.logreg_c,
                         "drawn_from": "test", "headline_shot": headline_shot},
            "metric": {headline: f"mean over {s.episodes} episodes of the query accuracy (%) of "
                                 f"{s.ways}-way {headline_shot}-shot episodes ({s.queries} queries "
                                 f"per class; {s.classifier} on frozen features)"},
            "outcomes": frozen.save_outcomes(run, truth, topk=pred[:, None], ids=ids)}


def run(task: str, cfg: FewshotConfig, weights: str, output, label: str | None = None,
        allow_pickle: bool = False) -> dict:
    return frozen.run_task(task, cfg, weights, output, label, allow_pickle, _fewshot, to_dict)


@cli
def main_fewshot(argv=None) -> dict:
    return frozen.main("fewshot", "N-way K-shot episodes on frozen features", FewshotConfig, run, argv)
