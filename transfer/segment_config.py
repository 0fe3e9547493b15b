"""The MMSegmentation config of a `transfer segment` run: read it, merge --cfg-options, refuse
what cannot give a right number, and set what the run decides (norm layers, normalisation,
work dir, launcher). mmseg/mmengine are imported inside the functions (mocobench.mmseg_compat).
"""
from __future__ import annotations

import time
from pathlib import Path

from mocobench.errors import UserError

# Torchvision-compatible ResNets in mmseg: `ResNet` is V1b (7x7 stem conv1/bn1, stride in the
# 3x3 conv when style='pytorch'), so its state-dict names are torchvision's. Its registered
# subclasses (ResNetV1c/V1d deep stem, ResNeXt groups) are not, nor is style='caffe'.
PLAIN_RESNET_DEPTHS = (18, 34, 50, 101, 152)
ARCH_DEPTH = {f"resnet{d}": d for d in PLAIN_RESNET_DEPTHS}
STAGE_CHANNELS = {18: (64, 128, 256, 512), 34: (64, 128, 256, 512),
                  50: (256, 512, 1024, 2048), 101: (256, 512, 1024, 2048),
                  152: (256, 512, 1024, 2048)}
HEADS = ("decode_head", "auxiliary_head")


def parse_cfg_options(pairs) -> dict:
    """`k=v` strings -> dict, values parsed the way mmengine's --cfg-options does."""
    from mmengine.config import DictAction

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--cfg-options expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = DictAction._parse_iterable(value)
    return out


def follow_iters(cfg, options: dict) -> None:
    """Merge --cfg-options. When they change train_cfg.max_iters, the schedulers that
    ended at the old max_iters (poly LR) end at the new one, unless set explicitly too."""
    old = (cfg.get("train_cfg") or {}).get("max_iters")
    try:
        cfg.merge_from_dict(options)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise UserError(f"--cfg-options {' '.join(options)} do not fit the config: {e}") from None
    new = (cfg.get("train_cfg") or {}).get("max_iters")
    if old is None or new == old or any(k.startswith("param_scheduler") for k in options):
        return
    for sched in cfg.get("param_scheduler") or []:
        if sched.get("end") == old:
            sched["end"] = new


def load_config(path, cfg_options=()):
    """The mmengine Config of `path` with `cfg_options` merged; one line when it cannot be read."""
    from mmengine.config import Config

    from mocobench.config import find_config

    path = find_config(path)  # configs/segmentation/... also resolves in an installed copy
    if not path.is_file():
        raise UserError(f"config {path} does not exist; see configs/segmentation/")
    try:
        cfg = Config.fromfile(str(path))
    except Exception as e:  # a broken config file: show its own error in one line
        raise UserError(f"cannot read config {path}: {type(e).__name__}: {e}") from None
    follow_iters(cfg, parse_cfg_options(cfg_options))
    return cfg


# ----------------------------------------------------------------------------- the model

def check_plain_resnet(backbone_cfg, where: str = "model.backbone") -> int:
    """Refuse, in one line, any backbone whose weights cannot come from a
    torchvision-layout ResNet checkpoint; return its depth.

    The classic trap is mmseg's default ``ResNetV1c``: its deep stem (``stem.*``) has
    no ``conv1``, so torchvision-style weights leave it random and mmengine only logs
    the missing keys.
    """
    cfg = dict(backbone_cfg)
    kind = str(cfg.get("type", "")).split(".")[-1]
    example = "use type='ResNet', style='pytorch' as in configs/segmentation/fcn_r50_d8_voc12aug_512x512_20k.py"
    if kind != "ResNet":
        why = (" (deep stem 'stem.*' has no conv1/bn1 and would stay randomly initialised)"
               if kind in ("ResNetV1c", "ResNetV1d") else "")
        raise UserError(f"{where}.type is {kind or None!r}, not the plain ResNet that torchvision-layout "
                        f"weights fit{why}; {example}")
    checks = [
        ("style", "pytorch", "style='caffe' puts the stride in the 1x1 conv, torchvision in the 3x3"),
        ("deep_stem", False, "a deep stem has no counterpart in torchvision weights"),
        ("avg_down", False, "avg_down changes the shortcut layout"),
        ("in_channels", 3, "torchvision ResNets take 3-channel RGB"),
        ("stem_channels", 64, "torchvision ResNets have a 64-channel stem"),
        ("base_channels", 64, "torchvision ResNets have 64 base channels"),
        ("dcn", None, "deformable convs are not in torchvision weights"),
        ("plugins", None, "plugins add layers torchvision weights lack"),
        ("pretrained", None, "the backbone weights come from --weights through init_cfg"),
    ]
    for key, want, why in checks:
        if key in cfg and cfg[key] != want and not (key == "stem_channels" and cfg[key] is None):
            raise UserError(f"{where}.{key}={cfg[key]!r} does not fit torchvision-layout weights ({why}); "
                            f"set {key}={want!r}")
    depth = cfg.get("depth")
    if depth not in PLAIN_RESNET_DEPTHS:
        raise UserError(f"{where}.depth={depth!r} is not one of {PLAIN_RESNET_DEPTHS}")
    return int(depth)


def check_model_cfg(cfg) -> int:
    """Refuse configs whose backbone cannot take torchvision-layout weights; return its depth."""
    model = cfg.get("model")
    if not model or "backbone" not in model:
        raise UserError("config has no model.backbone; start from a file in configs/segmentation/")
    if model.get("pretrained") is not None:
        raise UserError(f"config sets model.pretrained={model['pretrained']!r}; set it to None: "
                        "the backbone weights come from --weights")
    depth = check_plain_resnet(model["backbone"], "model.backbone")
    for key in ("load_from", "resume"):
        if cfg.get(key):
            raise UserError(f"config sets {key}={cfg[key]!r}, but transfer segment fine-tunes from --weights "
                            "and never reloads Runner checkpoints (see mocobench/mmseg_compat.py); "
                            f"set {key} to None/False")
    return depth


def heads(cfg) -> list[tuple[str, dict]]:
    """(config path, head dict) of every decode/auxiliary head (a head may be a list)."""
    found = []
    for name in HEADS:
        head = cfg.model.get(name)
        for i, h in enumerate(head if isinstance(head, (list, tuple)) else [head]):
            if isinstance(h, dict):
                found.append((f"model.{name}" + (f"[{i}]" if isinstance(head, (list, tuple)) else ""), h))
    return found


def fit_heads(cfg, classes, ignore_index: int = 255) -> None:
    """Every head predicts exactly the data's classes: a head's num_classes left None follows
    from the class list; one that contradicts it is refused (mmseg scores ids 0..num_classes-1
    under the dataset's class names, so another count scores the wrong ids under the wrong
    names). And the losses ignore the label the metric ignores."""
    n = len(classes)
    if n == 0:
        raise UserError("the data has no class list: write classes.txt in the data root (one class name per "
                        "line, line i naming label value i) or set metainfo.classes in the config")
    if n < 2:
        raise UserError(f"the dataset has {n} class ({', '.join(map(str, classes)) or 'none'}); segmentation "
                        "needs at least two (include the background as a class, e.g. classes 'background' and "
                        "'object', and label its pixels 0)")
    for where, head in heads(cfg):
        if head.get("num_classes") is None:
            head["num_classes"] = n
        elif head["num_classes"] != n:
            raise UserError(f"{where}.num_classes={head['num_classes']} but the dataset has {n} classes "
                            f"({', '.join(map(str, classes[:4]))}{', ...' if n > 4 else ''}); "
                            f"set num_classes={n} in every head, or None to follow the class list")
        losses = head.get("loss_decode") or []
        for loss in losses if isinstance(losses, (list, tuple)) else [losses]:
            weights = loss.get("class_weight") if isinstance(loss, dict) else None
            if isinstance(weights, (list, tuple)) and len(weights) != n:
                raise UserError(f"{where}.loss_decode.class_weight has {len(weights)} weights but the dataset has "
                                f"{n} classes; give one weight per class, or class_weight=None")
        if head.get("ignore_index", 255) != ignore_index:
            raise UserError(f"{where}.ignore_index={head['ignore_index']} but the test metric ignores label "
                            f"{ignore_index}; use one ignore label for training and scoring")


def check_depth(cfg, depth: int, arch: str) -> None:
    if arch not in ARCH_DEPTH:
        raise UserError(f"weights are {arch}; MMSegmentation's plain ResNet only takes "
                        f"{', '.join(ARCH_DEPTH)} weights")
    want = ARCH_DEPTH[arch]
    if want == depth:
        return
    fix = [f"model.backbone.depth={want}"]
    for where, h in heads(cfg):
        if isinstance(h.get("in_index"), int):
            fix.append(f"{where}.in_channels={STAGE_CHANNELS[want][h['in_index']]}")
    raise UserError(f"weights are {arch} but the config's model.backbone.depth={depth}; "
                    f"use a matching config or add --cfg-options {' '.join(fix)}")


def _walk(node, fn):
    """Call fn(dict) on every dict nested in lists/dicts of a config."""
    if isinstance(node, dict):
        fn(node)
        for v in node.values():
            _walk(v, fn)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _walk(v, fn)


def set_norm(cfg, sync: bool) -> str:
    """SyncBN on GPUs when distributed, BN otherwise, in backbone and heads alike."""
    norm = "SyncBN" if sync else "BN"

    def fix(d):
        n = d.get("norm_cfg")
        if isinstance(n, dict) and n.get("type") in ("BN", "SyncBN", "BN2d"):
            n["type"] = norm

    _walk(cfg.model, fix)
    return norm


def set_normalization(cfg, meta: dict) -> dict:
    """Use the checkpoint's recorded normalisation (timm's rule: preprocessing travels
    with the weights); keep the config's (RGB ImageNet mean/std) when none is recorded."""
    pre = cfg.model.get("data_preprocessor")
    if pre is None:
        raise UserError("config has no model.data_preprocessor; start from a file in configs/segmentation/")
    norm = (meta or {}).get("normalization") or {}
    if norm.get("mean") and norm.get("std"):
        scale = 255.0 if max(norm["mean"]) <= 1.0 else 1.0  # mmseg normalises 0..255 pixels
        mean = [round(float(m) * scale, 4) for m in norm["mean"]]
        std = [round(float(s) * scale, 4) for s in norm["std"]]
        rgb = str(norm.get("input_format", "RGB")).upper() == "RGB"
        changed = ([round(float(m), 4) for m in pre.get("mean", [])] != mean
                   or [round(float(s), 4) for s in pre.get("std", [])] != std
                   or bool(pre.get("bgr_to_rgb")) != rgb)
        pre.update(mean=mean, std=std, bgr_to_rgb=rgb)
        source = "checkpoint" + (" (differs from the config)" if changed else "")
    else:
        source = "config"
    cfg.model.data_preprocessor = pre
    return {"mean": list(pre["mean"]), "std": list(pre["std"]), "bgr_to_rgb": bool(pre.get("bgr_to_rgb")),
            "source": source}


def set_backbone_init(cfg, converted: str, prefix: str) -> None:
    """Load the backbone from the converted file through init_cfg -- never load_from, which
    silently loads nothing from a bare backbone file."""
    cfg.model.pretrained = None
    cfg.model.backbone.pretrained = None
    cfg.model.backbone.init_cfg = dict(type="Pretrained", checkpoint=str(converted), prefix=prefix)


def set_runtime(cfg, output: Path, stem: str, *, launcher: str, seed: int, distributed: bool,
                cuda: bool) -> None:
    cfg.work_dir = str(output)
    # mmengine keeps its logger and visualizer as process-wide instances named by the experiment
    # (config name + a timestamp in seconds): a second run started in the same second of one
    # process would get the first run's instances and write into the first run's folder.
    cfg.experiment_name = f"{stem}_{time.time_ns()}"
    if isinstance(cfg.get("visualizer"), dict):  # mmseg configs name it "visualizer": one per process
        cfg.visualizer["name"] = cfg.experiment_name
    cfg.launcher = launcher
    cfg.randomness = dict(seed=seed, deterministic=False)
    if cfg.get("env_cfg") and not cuda:
        cfg.env_cfg.setdefault("dist_cfg", {})["backend"] = "gloo"
    if distributed and not cuda:
        # mmengine passes device_ids=[LOCAL_RANK] to DDP, which only GPU modules accept.
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None,
                                     broadcast_buffers=False)
