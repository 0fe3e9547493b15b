"""Every pretraining setting, declared once with its default, its allowed values and why.

Defaults are MoCo v2's ImageNet recipe; configs/pretrain/*.yaml state every value again
with its source. A value outside its field's rule (``setting(..., ge=1)``) is refused in one
line when the config is loaded; ``check`` then refuses combinations that cannot work
together. Derived values (per-rank batch, scaled LR, BN groups) are computed in
pretrain/train.py and printed at start, never hidden in the YAML.
"""
from dataclasses import dataclass, field

import torchvision

from mocobench.config import setting
from mocobench.errors import UserError

# The torchvision constructors build_encoder accepts (converters read the same names).
RESNETS = tuple(sorted(n for n in torchvision.models.list_models(module=torchvision.models)
                       if n.startswith(("resnet", "wide_resnet", "resnext"))))
DICTIONARIES = ("queue", "end_to_end", "memory_bank")


@dataclass
class ModelConfig:
    arch: str = setting("resnet50", choices=RESNETS)  # a torchvision ResNet constructor name


@dataclass
class MocoConfig:
    dim: int = setting(128, ge=1)  # feature dimension (paper: 128)
    queue_size: int = setting(65536, ge=1)  # K, negatives in the queue (paper: 65536)
    momentum: float = setting(0.999, ge=0, lt=1)  # m of the key encoder (paper: 0.999; 0 fails to train)
    temperature: float = setting(0.2, gt=0)  # T (v1 0.07, v2 0.2)
    mlp: bool = True  # v2 MLP head 2048-2048-128; v1 a linear head
    # How key BN statistics are kept apart from the queries': "shuffle" (shuffling BN: the
    # key batch is shuffled across ranks, plus bn_splits groups per rank), "sync" (SyncBN over
    # all GPUs, for comparison; no shuffle), "none" (plain per-rank BN, no shuffle: the
    # paper's ablation in which the model can cheat through the batch statistics).
    bn: str = setting("shuffle", choices=("shuffle", "sync", "none"))
    # BN groups per batch; 0 = auto: 8 on one process (stands in for the per-GPU BN of
    # shuffling BN, as the official Colab demo does), 1 when distributed.
    bn_splits: int = setting(0, ge=0)
    # Where the negatives come from (pretrain/dictionary.py, the paper's Fig. 2/3 ablation):
    # "queue" (MoCo), "end_to_end" (the current global batch, keys with gradients; K is the
    # batch, queue_size and momentum are unused), "memory_bank" (InstDisc: one feature per
    # training image, queue_size negatives sampled from it; momentum is unused).
    dictionary: str = setting("queue", choices=DICTIONARIES)
    # memory_bank only: InstDisc's proximal update of an entry, v = norm(m v + (1-m) f)
    # (InstDisc: 0.5); 0 overwrites the entry with the newest feature.
    bank_momentum: float = setting(0.5, ge=0, lt=1)


@dataclass
class DataConfig:
    source: str = "fashion-mnist"  # a registered name or an ImageNet-layout folder (uses train/)
    # v1: the MoCo v1 augmentation; v2: "aug+" (adds blur, stronger jitter)
    augmentation: str = setting("v2", choices=("v1", "v2"))
    image_size: int = setting(224, ge=8)  # crop size (a ResNet downsamples 32x; 8 px leaves it 1x1 by layer2)
    # RandomResizedCrop's area range (both papers: 0.2-1). Small objects on an empty
    # background (Fashion-MNIST) may need a larger minimum: a 20% crop can be all background.
    crop_scale: list[float] = setting([0.2, 1.0], length=2, gt=0, le=1)
    max_images: int = setting(0, ge=0)  # use a random subset of this many images (0 = all)
    num_workers: int = setting(4, ge=0)  # data loader workers per rank
    # Where the colour half of the augmentation runs (pretrain/device_augment.py): "worker"
    # (PIL in the loader workers, the official pipeline: the default until the device one is
    # shown equal at the accuracy level, see docs/pretraining.md), "device" (batched where
    # the model runs; workers only crop and flip), "auto" (device on a GPU, worker on a CPU).
    colour_on: str = setting("worker", choices=("worker", "device", "auto"))
    # Unreadable image files skipped (each named in a warning) before a rank stops: a few
    # broken JPEGs should not end a week-long run, a broken copy of the data set should.
    max_unreadable: int = setting(100, ge=0)
    mean: list[float] = setting([0.485, 0.456, 0.406], length=3)  # ImageNet RGB
    std: list[float] = setting([0.229, 0.224, 0.225], length=3, gt=0)


@dataclass
class TrainConfig:
    epochs: int = setting(200, ge=1)
    batch_size: int = setting(256, ge=1)  # global batch over all ranks (paper: 256 on 8 GPUs)
    lr: float = setting(0.03, gt=0)  # per 256 images, scaled linearly to the global batch (paper: 0.03 at 256)
    schedule: str = setting("cos", choices=("cos", "step"))  # cos (v2) or step (v1)
    lr_steps: list[int] = setting([120, 160], ge=0)  # epochs of x0.1 for "step"
    sgd_momentum: float = setting(0.9, ge=0, lt=1)
    weight_decay: float = setting(1e-4, ge=0)
    max_steps: int = setting(0, ge=0)  # stop after this many optimizer steps (0 = run all epochs)
    seed: int = 0
    amp: str = setting("none", choices=("none", "bf16", "fp16"))  # fp16 only on GPU
    channels_last: bool = False
    print_freq: int = setting(10, ge=1)  # steps between log.jsonl lines
    save_every_epochs: int = setting(10, ge=0)  # also keep checkpoint_epNNNN.pth every this many epochs
    save_every_steps: int = setting(0, ge=0)  # checkpoint_last.pth every this many steps too (long epochs)
    knn_every_epochs: int = setting(0, ge=0)  # weighted kNN monitor on a labelled split (0 = off)
    knn_max_train: int = setting(10000, ge=0)  # memory-bank images for the monitor (0 = all)
    knn_max_val: int = setting(2000, ge=0)
    # Dictionary consistency probe (pretrain/dictionary.py): every this many steps, encode a
    # fixed probe set with the key encoder and log the mean cosine to each earlier encoding
    # still young enough to be in the dictionary, by age (0 = off; it costs one forward of
    # consistency_images images per probe on every rank; at least one per-rank batch).
    consistency_every: int = setting(0, ge=0)
    consistency_images: int = setting(256, ge=1)


@dataclass
class PretrainConfig:
    # "moco", or "supervised": the same encoder, data, augmentation and epochs trained with
    # the labels, the honest like-for-like baseline (the moco section is then unused)
    method: str = setting("moco", choices=("moco", "supervised"))
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# What a resumed run may change: how long it runs, how often it logs, saves and monitors,
# how it loads data and at what precision. Everything else defines the run being resumed
# and is refused (pretrain/checkpoint.check_resumable). data.source may move (a copy on
# node-local disk); the checkpoint's image count must then still match. train.epochs
# re-spreads the cosine schedule over the new total from the resumed epoch on.
MAY_CHANGE_ON_RESUME = (
    "train.epochs", "train.max_steps", "train.print_freq", "train.save_every_epochs",
    "train.save_every_steps", "train.knn_every_epochs", "train.knn_max_train", "train.knn_max_val",
    "train.consistency_every", "train.consistency_images", "train.amp", "train.channels_last",
    "data.num_workers", "data.max_unreadable", "data.source",
)


def method_name(cfg: PretrainConfig) -> str:
    """moco_v1 / moco_v2 when the settings are those of a paper, else moco (or supervised)."""
    if cfg.method == "supervised":
        return "supervised"
    m, d, t = cfg.moco, cfg.data, cfg.train
    if m.dictionary != "queue":  # an ablation, not either paper's method
        return "moco"
    if not m.mlp and d.augmentation == "v1" and m.temperature == 0.07 and t.schedule == "step":
        return "moco_v1"
    if m.mlp and d.augmentation == "v2" and m.temperature == 0.2 and t.schedule == "cos":
        return "moco_v2"
    return "moco"


def check(cfg: PretrainConfig, world_size: int, device_type: str = "cpu") -> None:
    """Refuse settings that cannot work together, before any work starts, one line each.
    (Each value's own range is checked when the config is loaded.)"""
    m, d, t = cfg.moco, cfg.data, cfg.train
    if t.batch_size % world_size:
        raise UserError(f"train.batch_size {t.batch_size} is not divisible by the world size "
                        f"{world_size}; choose a global batch that is")
    if cfg.method == "moco" and m.dictionary == "queue" and m.queue_size % t.batch_size:
        raise UserError(f"moco.queue_size {m.queue_size} is not divisible by the global batch "
                        f"{t.batch_size}; choose a batch that divides it (e.g. "
                        f"{_divisor_near(m.queue_size, t.batch_size)})")
    if d.crop_scale[0] > d.crop_scale[1]:
        raise UserError(f"data.crop_scale must be [min, max] with min <= max, not {d.crop_scale}")
    if t.amp == "fp16" and device_type != "cuda":
        raise UserError("train.amp=fp16 needs a GPU; use train.amp=bf16 on CPU")
    if m.bn == "sync" and world_size > 1 and device_type != "cuda" and cfg.method == "moco":
        raise UserError("moco.bn=sync needs GPUs: SyncBatchNorm synchronises CUDA tensors only; "
                        "use moco.bn=shuffle (shuffling BN) on CPU processes")
    if t.consistency_every and t.consistency_images < t.batch_size // world_size:
        raise UserError(f"train.consistency_images {t.consistency_images} is fewer than the per-rank "
                        f"batch {t.batch_size // world_size} the probe encodes at once; raise it")
    splits, per_rank = bn_splits(cfg, world_size), t.batch_size // world_size
    if per_rank % splits:
        raise UserError(f"per-rank batch {per_rank} is not divisible by moco.bn_splits {splits}; "
                        "change one of them")
    if per_rank // splits < 2:
        raise UserError(f"BN groups of {per_rank // splits} image (per-rank batch {per_rank} in "
                        f"{splits} groups) have no batch statistics; raise the batch or lower "
                        "moco.bn_splits")


def bn_splits(cfg: PretrainConfig, world_size: int) -> int:
    if cfg.moco.bn != "shuffle" or cfg.method == "supervised":
        return 1
    if cfg.moco.bn_splits > 0:
        return cfg.moco.bn_splits
    return 8 if world_size == 1 else 1


def _divisor_near(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))
