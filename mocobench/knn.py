"""Weighted kNN on frozen features, and the feature extraction it runs on.

Shared by the offline ``transfer knn`` task and pretraining's kNN monitor.
The classifier is the one of Wu et al. (2018) used by MoCo's CIFAR demo and
DINO's eval_knn.py: cosine similarity, the k nearest training features vote
for their class with weight exp(similarity / T).
"""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mocobench.data import iterate
from mocobench.errors import UserError

# Similarity rows of this many elements are computed at a time (test chunk x
# number of training features): bounds memory at ~256 MiB of float32 whatever
# the sizes, and never rounds down to an empty chunk the way DINO's
# `num_test_images // 100` does below 100 test images.
_CHUNK_ELEMENTS = 64 * 1024 * 1024


@torch.no_grad()
def weighted_knn(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, num_classes: int, k: int = 200,
                 temperature: float = 0.1, chunk_size: int | None = None,
                 device=None) -> torch.Tensor:
    """Class scores (N_test x num_classes, CPU) of a weighted kNN vote; argmax is the prediction.

    Features (N x D, any float dtype) are L2-normalised here, so similarity is cosine.
    k is clipped to the number of training features. `chunk_size` test rows are
    scored at a time (None: as many as fit in ~256 MiB of similarities, at least 1).
    `device` (default: the training features') is where the work happens; the
    normalised bank is built there chunk by chunk, in half precision on a GPU when
    the features are half precision (ImageNet: 1.28M x 2048 is 5 GB, not 10).
    """
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise UserError("kNN features must be 2-D (N x D) tensors")
    if train_features.shape[1] != test_features.shape[1]:
        raise UserError(f"kNN train features have dimension {train_features.shape[1]} but test "
                        f"features {test_features.shape[1]}; extract both with the same backbone")
    if len(train_features) == 0:
        raise UserError("kNN needs at least one training feature")
    if len(train_labels) != len(train_features):
        raise UserError(f"{len(train_features)} training features but {len(train_labels)} labels")
    if k < 1 or temperature <= 0:
        raise UserError(f"kNN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    device = torch.device(device) if device is not None else train_features.device
    half = train_features.dtype in (torch.float16, torch.bfloat16) and device.type == "cuda"
    work = train_features.dtype if half else torch.float32
    train = torch.empty(train_features.shape, dtype=work, device=device)
    for s in range(0, len(train), 65536):
        train[s:s + 65536] = F.normalize(train_features[s:s + 65536].to(device).float(), dim=1)
    labels = train_labels.to(device=device, dtype=torch.long)
    k = min(k, len(train))
    if chunk_size is None:
        chunk_size = _CHUNK_ELEMENTS // len(train)
    chunk_size = max(1, int(chunk_size))
    scores = torch.zeros(len(test_features), num_classes, dtype=torch.float32)
    for start in range(0, len(test_features), chunk_size):
        test = F.normalize(test_features[start:start + chunk_size].to(device).float(), dim=1)
        sim, idx = (test.to(work) @ train.T).float().topk(k, dim=1)  # chunk x k
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(test), num_classes, device=device)
        votes.scatter_add_(1, labels[idx], weights)  # each neighbour adds its weight to its class
        scores[start:start + len(test)] = votes.cpu()
    return scores


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Percent of rows whose label is among the k highest scores, for each k < num_classes.

    k >= num_classes would be 100% by construction, so such k are left out."""
    labels = labels.to(scores.device).long()
    out = {}
    for k in ks:
        if k >= scores.shape[1] and k > 1:
            continue
        top = scores.topk(k, dim=1).indices
        out[k] = 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item()
    return out


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader, device, desc: str = "features",
                     dtype: torch.dtype = torch.float32, progress: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `model` (in eval mode) over `loader`; return CPU (features N x D, labels N)
    in loader order. Batches are (images, labels, ...) as ImageDataset yields them; labels
    are N class ids, or N x C for multi-label data.

    The output is allocated once (len(loader.sampler) rows) rather than
    concatenated, so a 1.28M x 2048 matrix does not need twice its size in RAM.
    """
    was_training = model.training
    model.eval()
    n = len(loader.sampler) if getattr(loader, "sampler", None) is not None else None
    features = labels = None
    chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
    filled = 0
    try:
        total = len(loader) if hasattr(loader, "__len__") else None
        for batch in tqdm(iterate(loader), total=total, desc=desc, disable=not progress,
                          leave=False, dynamic_ncols=True):
            images, target = batch[0], batch[1]
            out = model(images.to(device, non_blocking=True))
            out = out.flatten(1).to("cpu", dtype)
            target = torch.as_tensor(target, dtype=torch.long)
            if n is None:
                chunks.append((out, target))
                continue
            if features is None:
                features = torch.empty(n, out.shape[1], dtype=dtype)
                labels = torch.empty((n, *target.shape[1:]), dtype=torch.long)  # (n, C): multi-label
            if filled + len(out) > n:
                raise RuntimeError(f"loader yielded more than len(loader.sampler) = {n} samples")
            features[filled:filled + len(out)] = out
            labels[filled:filled + len(out)] = target
            filled += len(out)
    finally:
        model.train(was_training)
    if n is None:
        if not chunks:
            return torch.empty(0, 0, dtype=dtype), torch.empty(0, dtype=torch.long)
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
    if features is None:
        return torch.empty(0, 0, dtype=dtype), torch.empty(0, dtype=torch.long)
    return features[:filled], labels[:filled]
