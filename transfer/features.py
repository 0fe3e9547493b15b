"""Frozen backbones for the linear probe and kNN: weights -> model, the
preprocessing that travels with the weights, and an on-disk feature cache.

Weights are any checkpoint `converters.load_backbone` accepts, or the literal
``random`` (a freshly seeded torchvision ResNet of ``model.arch``).

Feature cache: one ``.pt`` file per (weights, data set, split, subsample,
transform, dtype), named by the sha256 of that description, under
``features.cache_dir`` (default ``$MOCO_BENCH_CACHE/features`` or
``~/.cache/moco-bench/features``). The description includes the weights'
sha256 and a hash of every image's path (or id, for in-memory images) and label;
replacing an image's content under the same name is not detected (delete the cache then).
A cache folder that cannot be written is warned about once per split, and the run goes on.
"""
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, Sampler
from torchvision import transforms as T

from mocobench import dist
from mocobench.errors import UserError
from mocobench.fileio import atomic_torch_save, cache_root
from mocobench.knn import extract_features
from transfer.results import weights_record

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DEFAULT_IMAGE_SIZE = 224
CACHE_VERSION = 2  # 2: in-memory images are identified by their ids too


@dataclass
class FrozenBackbone:
    model: torch.nn.Module  # torchvision ResNet, fc = Identity: images -> pooled features
    arch: str
    meta: dict  # normalization, image_size, method, epoch... when the checkpoint records them
    record: dict  # transfer.results.weights_record
    reference: dict  # the loaded backbone tensors, for the paper protocol's sanity check
    identity: str  # what the features depend on: the weights' sha256, or random:<arch>:<seed>


def load_frozen_backbone(weights: str, arch: str | None = None, init_seed: int = 0,
                         label: str | None = None, allow_pickle: bool = False) -> FrozenBackbone:
    """`weights` a checkpoint path or 'random'; `arch` must match the checkpoint when given."""
    from converters import Backbone, build_resnet, load_backbone

    if weights == "random":
        if not arch:
            raise UserError("--weights random needs an architecture; add --arch resnet50 (or resnet18, ...)")
        from converters.archs import check_arch_name

        check_arch_name(arch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            init = getattr(torchvision.models, arch)().state_dict()
        bb = Backbone(arch, {k: v for k, v in init.items() if not k.startswith("fc.")}, "random")
        # torchvision's init scheme may change between versions; so may the features.
        identity = f"random:{arch}:seed{init_seed}:torchvision{torchvision.__version__.split('+')[0]}"
        record = weights_record(None, label or f"random init ({arch}, seed {init_seed})")
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"weights file {weights} does not exist; pass a checkpoint path "
                            "(or --weights random --arch resnet50 for the random-init baseline)")
        bb = load_backbone(path, arch=arch, allow_pickle=allow_pickle)
        record = weights_record(path, label, bb.layout, bb.meta)
        identity = f"sha256:{record['sha256']}"
    reference = {k: v.detach().clone() for k, v in bb.state_dict.items()}
    return FrozenBackbone(build_resnet(bb), bb.arch, dict(bb.meta or {}), record, reference,
                          identity)


def feature_dim(model: torch.nn.Module) -> int:
    # torchvision's ResNet leaves `inplanes` at layer4's output width (fc.in_features).
    return int(model.inplanes)


@dataclass
class Preprocessing:
    image_size: int
    resize_size: int
    mean: list[float]
    std: list[float]
    source: str  # where the values came from, for the log and results.json

    def eval_transform(self):
        """MoCo's validation transform: Resize(size * 256/224), CenterCrop(size)."""
        return T.Compose([T.Resize(self.resize_size), T.CenterCrop(self.image_size), T.ToTensor(),
                          T.Normalize(self.mean, self.std)])

    def train_transform(self, crop_scale=(0.08, 1.0)):
        """MoCo's main_lincls training transform: RandomResizedCrop(size) and flip."""
        return T.Compose([T.RandomResizedCrop(self.image_size, scale=tuple(crop_scale)),
                          T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(self.mean, self.std)])

    def describe(self) -> dict:
        return {"resize": self.resize_size, "crop": self.image_size, "mean": list(self.mean),
                "std": list(self.std), "interpolation": "bilinear"}


def resolve_preprocessing(meta: dict, image_size: int | None, resize_size: int | None,
                          mean: list[float] | None, std: list[float] | None,
                          default_image_size: int = DEFAULT_IMAGE_SIZE) -> Preprocessing:
    """Config values win, then what the checkpoint records, then the defaults
    (`default_image_size`, ImageNet's mean/std)."""
    norm = meta.get("normalization") or {}
    sources = []
    if norm.get("input_format", "RGB") != "RGB":
        raise UserError(f"checkpoint expects {norm['input_format']} input; only RGB backbones "
                        "are supported by the linear probe (convert the weights to RGB order)")
    if image_size is None:
        image_size = int(meta.get("image_size") or default_image_size)
        sources.append("image_size from " + ("weights" if meta.get("image_size") else "default"))
    else:
        sources.append("image_size from config")
    if mean is None or std is None:
        from_weights = bool(norm.get("mean") and norm.get("std"))
        mean = mean if mean is not None else list(norm.get("mean") or IMAGENET_MEAN)
        std = std if std is not None else list(norm.get("std") or IMAGENET_STD)
        sources.append("normalization from " + ("weights" if from_weights else "ImageNet default"))
    if len(mean) != 3 or len(std) != 3:
        raise UserError(f"data.mean and data.std need 3 values (RGB), got {mean} and {std}")
    if resize_size is None:
        resize_size = int(round(image_size * 256 / 224))
    if resize_size < image_size:
        raise UserError(f"data.resize_size={resize_size} is smaller than data.image_size={image_size}")
    return Preprocessing(int(image_size), int(resize_size), [float(v) for v in mean],
                         [float(v) for v in std], "; ".join(sources) or "config")


def dataset_identity(ds) -> dict:
    """What a data set's features depend on besides weights and transform."""
    h = hashlib.sha256()
    for s in ds.samples:
        h.update(f"{s.label}\t{s.path or s.id or ''}\n".encode())
    return {"name": ds.name, "images": len(ds), "samples_sha256": h.hexdigest()}


class _ContiguousShard(Sampler):
    """Rank r of w gets indices [r*n/w, (r+1)*n/w) in order: gathering the shards
    in rank order gives the data set's order, with no padding duplicates."""

    def __init__(self, n: int, rank: int, world: int):
        self.start, self.stop = n * rank // world, n * (rank + 1) // world

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self):
        return self.stop - self.start


def _gather_shards(x: torch.Tensor, device, rows: int = 16384) -> torch.Tensor:
    """Rank 0 gets every rank's rows in rank order (shards may differ by one row);
    other ranks get an empty tensor. Sent in blocks of `rows` so the device never
    holds more than world x rows at a time."""
    world = dist.get_world_size()
    if world == 1:
        return x
    sizes = dist.all_gather_no_grad(torch.tensor([len(x)], device=device)).tolist()
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, max(sizes), rows):
        block = x[start:start + rows]
        pad = torch.zeros((rows - len(block),) + tuple(x.shape[1:]), dtype=x.dtype)
        gathered = dist.all_gather_no_grad(torch.cat([block, pad]).to(device))
        if dist.is_main_process():
            gathered = gathered.cpu()
            for r in range(world):
                take = max(0, min(rows, sizes[r] - start))
                parts[r].append(gathered[r * rows:r * rows + take])
    if not dist.is_main_process():
        return x[:0]
    return torch.cat([p for rank_parts in parts for p in rank_parts])


def extract_dataset(model, ds, device, batch_size: int, num_workers: int, desc: str,
                    dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image of `ds` in order; under torchrun each rank extracts a
    shard and rank 0 gets them all (the other ranks get empty tensors)."""
    sampler = _ContiguousShard(len(ds), dist.get_rank(), dist.get_world_size())
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=torch.device(device).type == "cuda")
    feats, labels = extract_features(model, loader, device, desc=desc, dtype=dtype,
                                     progress=dist.is_main_process())
    return _gather_shards(feats, device), _gather_shards(labels, device)


def default_cache_dir() -> Path:
    return cache_root() / "features"


def cache_key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def cached_features(backbone: FrozenBackbone, ds, split: str, pre: Preprocessing, *, device,
                    batch_size: int, num_workers: int, subsample: dict, cache: bool = True,
                    cache_dir: str | None = None, dtype: str = "float32", log=print
                    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Features and labels of `ds` (its transform is set to pre.eval_transform()).

    Returns (features N x D, labels N, info) with info["cache"] one of
    "hit", "miss" (extracted and saved) or "off"."""
    if dtype not in ("float32", "float16"):
        raise UserError(f"features.dtype must be float32 or float16, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    description = {
        "version": CACHE_VERSION, "weights": backbone.identity, "arch": backbone.arch,
        "dataset": dataset_identity(ds), "split": split, "subsample": subsample,
        "transform": pre.describe(), "dtype": dtype,
    }
    key = cache_key(description)
    path = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = path / f"{key[:32]}.pt"
    info = {"cache": "off", "key": key, "path": str(path) if cache else None}

    hit = torch.zeros(1, device=device)
    if cache and dist.is_main_process() and path.is_file():
        hit.fill_(1)
    # Rank 0 decides, so ranks without a shared file system still agree.
    dist.broadcast(hit)
    if cache and hit.item():
        stored = None
        if dist.is_main_process():
            stored = _load_cache(path, description, ds)
        ok = torch.tensor([1.0 if stored is not None or not dist.is_main_process() else 0.0],
                          device=device)
        dist.broadcast(ok)
        if ok.item():
            log(f"{split}: feature cache hit ({path})")
            info["cache"] = "hit"
            if stored is None:  # other ranks: the fit runs on rank 0 only
                return torch.empty(0), torch.empty(0, dtype=torch.long), info
            return stored[0], stored[1], info
        log(f"{split}: cached features at {path} do not match this data; extracting again")

    ds.transform = pre.eval_transform()
    feats, labels = extract_dataset(backbone.model, ds, device, batch_size, num_workers,
                                    desc=f"{split} features", dtype=torch_dtype)
    if dist.is_main_process() and not torch.equal(labels, torch.as_tensor(ds.targets,
                                                                             dtype=torch.long)):
        raise RuntimeError("extracted labels are out of order with the data set")
    if cache:
        info["cache"] = "miss"
        if dist.is_main_process() and not _save_cache(path, description, feats, labels):
            info["cache"] = "unwritable"
        elif dist.is_main_process():
            log(f"{split}: extracted {tuple(feats.shape)} features, cached at {path}")
    else:
        log(f"{split}: extracted {tuple(feats.shape)} features (cache off)")
    return feats, labels, info


def _save_cache(path: Path, description: dict, feats, labels) -> bool:
    """Save the features for the next run; a cache that cannot be written (read-only,
    full, a file where the folder should be) costs the next run an extraction, never this
    run its result: warn and carry on."""
    try:
        atomic_torch_save({"description": description, "features": feats, "labels": labels}, path)
        return True
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError
        reason = (getattr(e, "strerror", None) or str(e).splitlines()[0])[:200]
        print(f"warning: cannot write the feature cache {path} ({reason}); carrying on without "
              "it (set features.cache_dir to a writable folder to reuse these features)",
              file=sys.stderr, flush=True)
        return False


def _load_cache(path: Path, description: dict, ds):
    try:
        # mmap: a 5 GB ImageNet cache is paged in, not copied.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if obj.get("description") != description:
        return None
    feats, labels = obj["features"], obj["labels"]
    if len(feats) != len(ds) or not torch.equal(labels, torch.as_tensor(ds.targets, dtype=torch.long)):
        return None
    return feats, labels
