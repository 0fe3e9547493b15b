"""Linear probe and weighted kNN on a frozen backbone.

    python -m transfer linear --weights W --data fashion-mnist --output DIR \\
        [--protocol fast|paper] [--config configs/linear/X.yaml] [--label L] [key=value ...]
    python -m transfer knn    --weights W --data DATA --output DIR [...]
    torchrun --nproc_per_node 8 -m transfer linear --protocol paper ...

Splits: train / val / test (mocobench.datasets.evaluation_splits); test is scored once.

- ``fast`` (linear): pooled features extracted once with the eval transform and cached
  (transfer.features); logistic regression with the L2 strength chosen by the data set's
  metric on val, refit on train + val (ssl-transfer's linear.py; transfer.logreg).
- ``paper`` (linear): MoCo's main_lincls recipe (transfer.linear_paper): frozen backbone
  in eval mode, only fc trains with SGD, lr 30 per 256 images, 100 epochs, on train + val.
- ``knn`` (its own task): weighted kNN, k=200, T=0.1, cosine, of the test images on the
  train + val features (mocobench.knn); k is clipped to the bank and the k used recorded.

W is a checkpoint `converters.load_backbone` reads, or ``random`` with ``--arch`` for
the random-init baseline. Each run writes DIR/results.json and DIR/outcomes.npz.
"""
from dataclasses import dataclass, field

import torch

from mocobench import dist
from mocobench.config import setting, to_dict
from mocobench.errors import UserError, cli
from mocobench.knn import weighted_knn
from transfer import cls_metrics, frozen, logreg
from transfer.frozen import DataConfig, FeatureConfig, ModelConfig

PROTOCOLS = ("fast", "paper")


@dataclass
class FastConfig:
    solver: str = setting("auto", choices=logreg.SOLVERS)  # auto: sklearn up to sklearn_max_elements
    sklearn_max_elements: int = 20_000_000  # ~40k x 512 or ~10k x 2048 features
    # L2 strengths (of the mean loss, on standardised features) tried on the validation split.
    l2_grid: list[float] = setting([1e-5, 1e-4, 1e-3, 1e-2, 1e-1], gt=0)
    select_max_images: int = setting(0, ge=0)  # fit the l2 search on at most this many (0 = all)
    max_iter: int = setting(1000, ge=1)  # L-BFGS iterations per fit
    tol: float = setting(1e-4, gt=0)


@dataclass
class PaperConfig:
    # MoCo main_lincls.py defaults (moco@7397dfe, README "Linear Classification").
    epochs: int = setting(100, ge=1)
    batch_size: int = setting(256, ge=1)  # global, over all processes
    lr: float = setting(30.0, gt=0)  # per 256 images, scaled linearly to the global batch
    lr_steps: list[int] = field(default_factory=lambda: [60, 80])  # epochs where lr x 0.1
    momentum: float = setting(0.9, ge=0)
    weight_decay: float = setting(0.0, ge=0)
    crop_scale: list[float] = setting([0.08, 1.0], length=2, gt=0, le=1)  # RandomResizedCrop area
    eval_every: int = setting(1, ge=0)  # evaluate every N epochs (0 = only after the last)
    resume: bool = True  # continue from DIR/checkpoint.pth when it is there


@dataclass
class KnnConfig:
    k: int = setting(200, ge=1)  # neighbours (Wu et al. 2018; MoCo's CIFAR demo)
    temperature: float = setting(0.1, gt=0)


@dataclass
class LinearConfig:
    protocol: str = setting("fast", choices=PROTOCOLS)  # --protocol: fast | paper
    seed: int = 0
    device: str = setting("auto", choices=("auto", "cpu"))  # auto: the GPU torchrun assigns, else CPU
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    fast: FastConfig = field(default_factory=FastConfig)
    paper: PaperConfig = field(default_factory=PaperConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)


def _config_record(cfg: LinearConfig, task: str) -> dict:
    """The resolved config with only the sections this task used."""
    out = to_dict(cfg)
    used = "knn" if task == "knn" else cfg.protocol
    for section in ("fast", "paper", "knn"):
        if section != used:
            out.pop(section)
    if task == "knn":
        out.pop("protocol")
    if used == "paper":
        out.pop("features")
    return out


def _fast(run: frozen.Run) -> dict:
    f, cfg = run.cfg.fast, run.cfg
    feats = frozen.split_features(run)
    if not dist.is_main_process():
        return {}
    (xtr, ytr), (xva, yva), (xte, yte) = feats["train"], feats["val"], feats["test"]
    solver = logreg.choose_solver(f.solver, xtr, f.sklearn_max_elements)
    num_classes = len(run.splits["train"].classes)
    score = lambda s, y: cls_metrics.classification_metrics(s, y, run.headline)[run.headline]  # noqa: E731
    run.log(f"logistic regression ({solver}) on {tuple(xtr.shape)} features, l2 grid {f.l2_grid} "
            f"chosen by {run.headline} on {len(xva)} val images")
    l2, search, init = logreg.select_l2(xtr, ytr, xva, yva, num_classes, f.l2_grid, solver, score,
                                        f.max_iter, f.tol, run.device, cfg.seed, f.select_max_images,
                                        log=run.log)
    x, y = torch.cat([xtr, xva]), torch.cat([ytr, yva])
    del feats, xtr, xva
    clf, refit = logreg.fit_final(x, y, num_classes, l2, solver, f.max_iter, f.tol, run.device, init,
                                  log=run.log)
    scores = clf.scores(xte, run.device)
    run.derived.update(search, **refit)
    schedule = {"protocol": "fast", "solver": solver, "l2_grid": search["l2_grid"],
                "selection": f"{run.headline} on val; refit on train + val",
                "select_max_images": f.select_max_images, "max_iter": f.max_iter, "tol": f.tol,
                "features": "standardised pooled features of the eval transform"}
    return {"metrics": cls_metrics.classification_metrics(scores, yte, run.headline),
            "engine": solver, "name": "fast", "schedule": schedule,
            "metric": frozen.metric_definition(run.headline, run.headline,
                                               "logistic regression on frozen features"),
            "outcomes": frozen.save_outcomes(run, yte.numpy(), scores=scores.numpy())}


def _knn(run: frozen.Run) -> dict:
    k, t = run.cfg.knn.k, run.cfg.knn.temperature
    if run.splits["train"].multilabel:
        raise UserError(f"{run.splits['train'].name} is multi-label; kNN votes for one class per "
                        "image: use `transfer linear` or `transfer svm` on it")
    feats = frozen.split_features(run)
    if not dist.is_main_process():
        return {}
    bank = torch.cat([feats["train"][0], feats["val"][0]])
    bank_labels = torch.cat([feats["train"][1], feats["val"][1]])
    (xte, yte) = feats["test"]
    used = min(k, len(bank))
    if used < k:
        run.log(f"warning: knn.k={k} but the bank holds {len(bank)} images: k={used} is used "
                "(and recorded)")
    run.log(f"weighted kNN (k={used}, T={t:g}, cosine) of {len(xte)} test on {len(bank)} "
            "train + val features")
    scores = weighted_knn(bank, bank_labels, xte, len(run.splits["train"].classes), k=used,
                          temperature=t, device=run.device)
    run.derived["k_used"] = used
    headline = f"knn_{run.headline}"
    return {"metrics": cls_metrics.classification_metrics(scores, yte, run.headline, prefix="knn_"),
            "engine": "torch", "name": f"knn k{used} T{t:g}",
            "schedule": {"k": k, "k_used": used, "temperature": t, "similarity": "cosine",
                         "bank": "train + val", "bank_images": len(bank)},
            "metric": frozen.metric_definition(headline, run.headline,
                                               f"weighted kNN vote (k={used}, T={t:g}, cosine)"),
            "outcomes": frozen.save_outcomes(run, yte.numpy(), scores=scores.numpy())}


def _paper(run: frozen.Run) -> dict:
    from transfer.linear_paper import train_linear_paper

    if run.splits["train"].multilabel:
        raise UserError(f"{run.splits['train'].name} is multi-label; the paper protocol trains a "
                        "softmax classifier: use --protocol fast on it")
    result = train_linear_paper(run)
    if not dist.is_main_process():
        return {}
    return {**result, "metric": frozen.metric_definition(
        run.headline, run.headline, "fc trained with SGD on frozen features (main_lincls)")}


def run(task: str, cfg: LinearConfig, weights: str, output, label: str | None = None,
        allow_pickle: bool = False) -> dict:
    """Evaluate `weights` with `task` ("linear" or "knn"); write output/results.json.

    Returns {"metrics": ..., "derived": ..., "path": results.json or None (non-main ranks)}."""
    body = {"knn": _knn, "fast": _fast, "paper": _paper}["knn" if task == "knn" else cfg.protocol]
    return frozen.run_task(task, cfg, weights, output, label, allow_pickle, body,
                           lambda c: _config_record(c, task))


def _protocol_flag(p):
    p.add_argument("--protocol", choices=PROTOCOLS, help="sets protocol (default: fast)")

    def apply(cfg, args):
        cfg.protocol = args.protocol or cfg.protocol
    return apply


@cli
def main_linear(argv=None) -> dict:
    return frozen.main("linear", "Linear probe of a frozen backbone", LinearConfig, run, argv,
                       _protocol_flag)


@cli
def main_knn(argv=None) -> dict:
    return frozen.main("knn", "Weighted kNN (cosine) on frozen features", LinearConfig, run, argv)


def main(argv=None) -> dict:
    return main_linear(argv)
