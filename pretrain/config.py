"""Every pretraining setting, declared once with its default and why.

Defaults are MoCo v2's ImageNet recipe; configs/pretrain/*.yaml state every
value again with its source. Derived values (per-rank batch, scaled LR, BN
groups) are computed in ``resolve`` and printed, never hidden in the YAML.
"""
from dataclasses import dataclass, field

from mocobench.errors import UserError


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # any torchvision ResNet constructor name


@dataclass
class MocoConfig:
    dim: int = 128  # feature dimension (paper: 128)
    queue_size: int = 65536  # K, negatives in the queue (paper: 65536)
    momentum: float = 0.999  # m of the key encoder (paper: 0.999; 0 fails to train)
    temperature: float = 0.2  # T (v1 0.07, v2 0.2)
    mlp: bool = True  # v2 MLP head 2048-2048-128; v1 a linear head
    # How key BN statistics are kept apart from the queries': "shuffle" (shuffling BN:
    # across ranks, plus bn_splits groups), "sync" (SyncBN, for comparison), "none".
    bn: str = "shuffle"
    # BN groups per batch; 0 = auto: 8 on one process (stands in for the per-GPU BN of
    # shuffling BN, as the official Colab demo does), 1 when distributed.
    bn_splits: int = 0
    # Where the negatives come from (pretrain/dictionary.py, the paper's Fig. 2/3 ablation):
    # "queue" (MoCo), "end_to_end" (the current global batch, keys with gradients; K is the
    # batch, queue_size and momentum are unused), "memory_bank" (InstDisc: one feature per
    # training image, queue_size negatives sampled from it; momentum is unused).
    dictionary: str = "queue"
    # memory_bank only: InstDisc's proximal update of an entry, v = norm(m v + (1-m) f)
    # (InstDisc: 0.5); 0 overwrites the entry with the newest feature.
    bank_momentum: float = 0.5


@dataclass
class DataConfig:
    source: str = "fashion-mnist"  # a registered name or an ImageNet-layout folder (uses train/)
    augmentation: str = "v2"  # v1: the MoCo v1 augmentation; v2: "aug+" (adds blur, stronger jitter)
    image_size: int = 224  # crop size
    # RandomResizedCrop's area range (both papers: 0.2-1). Small objects on an empty
    # background (Fashion-MNIST) may need a larger minimum: a 20% crop can be all background.
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    max_images: int = 0  # use a random subset of this many images (0 = all)
    num_workers: int = 4  # data loader workers per rank
    # Where the colour half of the augmentation runs (pretrain/device_augment.py): "worker"
    # (PIL, the official pipeline), "device" (batched where the model runs; workers only crop
    # and flip), "auto" (device on a GPU, worker on a CPU, where the device is the bottleneck).
    colour_on: str = "auto"
    # Unreadable image files skipped (each named in a warning) before a rank stops: a few
    # broken JPEGs should not end a week-long run, a broken copy of the data set should.
    max_unreadable: int = 100
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ImageNet RGB
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 256  # global batch over all ranks (paper: 256 on 8 GPUs)
    lr: float = 0.03  # per 256 images, scaled linearly to the global batch (paper: 0.03 at 256)
    schedule: str = "cos"  # cos (v2) or step (v1)
    lr_steps: list[int] = field(default_factory=lambda: [120, 160])  # epochs of x0.1 for "step"
    sgd_momentum: float = 0.9
    weight_decay: float = 1e-4
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs)
    seed: int = 0
    amp: str = "none"  # none | bf16 | fp16 (fp16 only on GPU)
    channels_last: bool = False
    print_freq: int = 10  # steps between log.jsonl lines
    save_every_epochs: int = 10  # also keep checkpoint_epNNNN.pth every this many epochs
    save_every_steps: int = 0  # checkpoint_last.pth every this many steps too (long epochs)
    knn_every_epochs: int = 0  # weighted kNN monitor on a labelled split (0 = off)
    knn_max_train: int = 10000  # memory-bank images for the monitor
    knn_max_val: int = 2000
    # Dictionary consistency probe (pretrain/dictionary.py): every this many steps, encode a
    # fixed probe set with the key encoder and log the mean cosine to each earlier encoding
    # still young enough to be in the dictionary, by age (0 = off; it costs one forward of
    # consistency_images images per probe on every rank; at least one per-rank batch).
    consistency_every: int = 0
    consistency_images: int = 256


@dataclass
class PretrainConfig:
    # "moco", or "supervised": the same encoder, data, augmentation and epochs trained with
    # the labels, the honest like-for-like baseline (the moco section is then unused)
    method: str = "moco"
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


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


def check(cfg: PretrainConfig, world_size: int) -> None:
    """Refuse inconsistent settings before any work starts, one line each."""
    m, d, t = cfg.moco, cfg.data, cfg.train
    if cfg.method not in ("moco", "supervised"):
        raise UserError(f"method must be moco or supervised, not {cfg.method!r}")
    if t.batch_size % world_size:
        raise UserError(f"train.batch_size {t.batch_size} is not divisible by the world size "
                        f"{world_size}; choose a global batch that is")
    if m.dictionary not in ("queue", "end_to_end", "memory_bank"):
        raise UserError(f"moco.dictionary must be queue, end_to_end or memory_bank, not {m.dictionary!r}")
    if cfg.method == "moco" and m.dictionary == "queue" and m.queue_size % t.batch_size:
        raise UserError(f"moco.queue_size {m.queue_size} is not divisible by the global batch "
                        f"{t.batch_size}; choose a batch that divides it (e.g. "
                        f"{_divisor_near(m.queue_size, t.batch_size)})")
    if m.bn not in ("shuffle", "sync", "none"):
        raise UserError(f"moco.bn must be shuffle, sync or none, not {m.bn!r}")
    if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        raise UserError(f"data.crop_scale must be [min, max] with 0 < min <= max <= 1, not {d.crop_scale}")
    if d.augmentation not in ("v1", "v2"):
        raise UserError(f"data.augmentation must be v1 or v2, not {d.augmentation!r}")
    if d.colour_on not in ("auto", "worker", "device"):
        raise UserError(f"data.colour_on must be auto, worker or device, not {d.colour_on!r}")
    if t.schedule not in ("cos", "step"):
        raise UserError(f"train.schedule must be cos or step, not {t.schedule!r}")
    if t.amp not in ("none", "bf16", "fp16"):
        raise UserError(f"train.amp must be none, bf16 or fp16, not {t.amp!r}")
    if not 0.0 <= m.momentum < 1.0:
        raise UserError(f"moco.momentum must be in [0, 1), not {m.momentum}")
    if not 0.0 <= m.bank_momentum < 1.0:
        raise UserError(f"moco.bank_momentum must be in [0, 1), not {m.bank_momentum}")
    if m.queue_size < 1 and m.dictionary != "end_to_end":
        raise UserError(f"moco.queue_size must be at least 1 for moco.dictionary={m.dictionary}")
    if d.max_unreadable < 0:
        raise UserError(f"data.max_unreadable must be >= 0, not {d.max_unreadable}")
    if t.consistency_every < 0:
        raise UserError(f"train.consistency_every must be >= 0, not {t.consistency_every}")
    if t.consistency_every and t.consistency_images < t.batch_size // world_size:
        raise UserError(f"train.consistency_images {t.consistency_images} is fewer than the per-rank "
                        f"batch {t.batch_size // world_size} the probe encodes at once; raise it")
    splits = bn_splits(cfg, world_size)
    if (t.batch_size // world_size) % splits:
        raise UserError(f"per-rank batch {t.batch_size // world_size} is not divisible by "
                        f"moco.bn_splits {splits}; change one of them")


def bn_splits(cfg: PretrainConfig, world_size: int) -> int:
    if cfg.moco.bn != "shuffle" or cfg.method == "supervised":
        return 1
    if cfg.moco.bn_splits > 0:
        return cfg.moco.bn_splits
    return 8 if world_size == 1 else 1


def _divisor_near(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))
