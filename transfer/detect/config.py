"""Detection configs: Detectron2's own YAML format, read by both engines.

The files in configs/detection are Detectron2 configs (upper-case keys, one ``_BASE_``),
so the Detectron2 engine reads them with Detectron2's own ``CfgNode`` and every
Detectron2 key works there. Without Detectron2 the torchvision engine reads the same
files here, through the same rules (``_BASE_`` merge, strings such as ``(480, 512)``
decoded like yacs does, ``KEY VALUE`` overrides) against ``DEFAULTS``: the subset of
Detectron2's keys, with Detectron2's default values, that the torchvision engine
implements. Any other key is refused in one line rather than silently ignored.

Two sections are ours and exist for both engines (added to Detectron2's config before
merging): ``DATASETS.ROOT`` (where ``voc_2007_trainval``-style names live; "" means
$DETECTRON2_DATASETS or ./datasets, as in Detectron2) and ``DATASETS.SCENES`` (the
size of the embedded Fashion-MNIST scene set behind the ``scenes_*`` names).
"""
import ast
from pathlib import Path

from mocobench.config import merge, read_mapping
from mocobench.errors import UserError

# Ours: present in both engines' configs.
EXTRA = {
    "DATASETS": {
        "ROOT": "",
        "SCENES": {"N_TRAIN": 256, "N_VAL": 64, "SEED": 0, "CANVAS": 128},
    },
}

# Detectron2's defaults (detectron2/config/defaults.py) for every key the torchvision engine
# implements; tests/test_detect_config.py checks them against Detectron2 when it is installed.
DEFAULTS = {
    "VERSION": 2,
    "MODEL": {
        "MASK_ON": False,
        "DEVICE": "cuda",
        "META_ARCHITECTURE": "GeneralizedRCNN",
        "WEIGHTS": "",
        "PIXEL_MEAN": [103.530, 116.280, 123.675],
        "PIXEL_STD": [1.0, 1.0, 1.0],
        "BACKBONE": {"NAME": "build_resnet_backbone", "FREEZE_AT": 2},
        "FPN": {"IN_FEATURES": [], "OUT_CHANNELS": 256, "NORM": ""},
        "ANCHOR_GENERATOR": {"SIZES": [[32, 64, 128, 256, 512]], "ASPECT_RATIOS": [[0.5, 1.0, 2.0]]},
        "RPN": {
            "IN_FEATURES": ["res4"],
            "IOU_THRESHOLDS": [0.3, 0.7],
            "BATCH_SIZE_PER_IMAGE": 256,
            "POSITIVE_FRACTION": 0.5,
            "PRE_NMS_TOPK_TRAIN": 12000,
            "PRE_NMS_TOPK_TEST": 6000,
            "POST_NMS_TOPK_TRAIN": 2000,
            "POST_NMS_TOPK_TEST": 1000,
            "NMS_THRESH": 0.7,
        },
        "ROI_HEADS": {
            "NAME": "Res5ROIHeads",
            "NUM_CLASSES": 80,
            "IN_FEATURES": ["res4"],
            "IOU_THRESHOLDS": [0.5],
            "BATCH_SIZE_PER_IMAGE": 512,
            "POSITIVE_FRACTION": 0.25,
            "SCORE_THRESH_TEST": 0.05,
            "NMS_THRESH_TEST": 0.5,
        },
        "ROI_BOX_HEAD": {
            "NAME": "",
            "BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
            "POOLER_RESOLUTION": 14,
            "POOLER_SAMPLING_RATIO": 0,
            "NUM_FC": 0,
            "FC_DIM": 1024,
        },
        "ROI_MASK_HEAD": {
            "NAME": "MaskRCNNConvUpsampleHead",
            "POOLER_RESOLUTION": 14,
            "POOLER_SAMPLING_RATIO": 0,
            "NUM_CONV": 0,
            "CONV_DIM": 256,
        },
        "RESNETS": {
            "DEPTH": 50,
            "OUT_FEATURES": ["res4"],
            "NUM_GROUPS": 1,
            "NORM": "FrozenBN",
            "WIDTH_PER_GROUP": 64,
            "STRIDE_IN_1X1": True,
            "RES5_DILATION": 1,
            "RES2_OUT_CHANNELS": 256,
            "STEM_OUT_CHANNELS": 64,
        },
    },
    "INPUT": {
        "MIN_SIZE_TRAIN": [800],
        "MIN_SIZE_TRAIN_SAMPLING": "choice",
        "MAX_SIZE_TRAIN": 1333,
        "MIN_SIZE_TEST": 800,
        "MAX_SIZE_TEST": 1333,
        "RANDOM_FLIP": "horizontal",
        "FORMAT": "BGR",
        "MASK_FORMAT": "polygon",
    },
    "DATASETS": {"TRAIN": [], "TEST": []},
    "DATALOADER": {"NUM_WORKERS": 4, "ASPECT_RATIO_GROUPING": True, "FILTER_EMPTY_ANNOTATIONS": True},
    "SOLVER": {
        "LR_SCHEDULER_NAME": "WarmupMultiStepLR",
        "MAX_ITER": 40000,
        "BASE_LR": 0.001,
        "MOMENTUM": 0.9,
        "NESTEROV": False,
        "WEIGHT_DECAY": 0.0001,
        "WEIGHT_DECAY_NORM": 0.0,
        "GAMMA": 0.1,
        "STEPS": [30000],
        "WARMUP_FACTOR": 1.0 / 1000,
        "WARMUP_ITERS": 1000,
        "WARMUP_METHOD": "linear",
        "CHECKPOINT_PERIOD": 5000,
        "IMS_PER_BATCH": 16,
        "REFERENCE_WORLD_SIZE": 0,
        "BIAS_LR_FACTOR": 1.0,
        "WEIGHT_DECAY_BIAS": None,
    },
    "TEST": {
        "EVAL_PERIOD": 0,
        "DETECTIONS_PER_IMAGE": 100,
        "PRECISE_BN": {"ENABLED": False, "NUM_ITER": 200},
    },
    "OUTPUT_DIR": "./output",
    "SEED": -1,
    "CUDNN_BENCHMARK": False,
}


def defaults() -> dict:
    return merge(DEFAULTS, EXTRA)


def decode(value):
    """yacs' rule: a string that parses as a Python literal is that literal; tuples become lists."""
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    if isinstance(value, (list, tuple)):
        return [decode(v) for v in value]
    return value


def read_yaml_with_base(path) -> dict:
    """Read a Detectron2 YAML file, merging its ``_BASE_`` (relative to the file) underneath."""
    path = Path(path)
    data = read_mapping(path, hint=" (the shipped ones are in configs/detection/)")
    base = data.pop("_BASE_", None)
    data = decode(data)
    if base:
        data = merge(read_yaml_with_base(path.parent / base), data)
    return data


def _types_compatible(new, old) -> bool:
    if old is None or new is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, float) and isinstance(new, int):
        return True
    if isinstance(old, list):
        return isinstance(new, list)
    return type(new) is type(old)


def _check_keys(data: dict, ref: dict, prefix: str, where: str) -> dict:
    out = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in ref:
            raise UserError(f"{where}: {full} is not a key the torchvision engine implements; remove it "
                            f"or run with --engine detectron2 (which reads every Detectron2 key)")
        if isinstance(ref[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"{where}: {full} is a section; give it as a mapping")
            out[key] = _check_keys(value, ref[key], full + ".", where)
            continue
        if not _types_compatible(value, ref[key]):
            raise UserError(f"{where}: {full} should be a {type(ref[key]).__name__} like "
                            f"{ref[key]!r}, got {value!r}")
        out[key] = float(value) if isinstance(ref[key], float) and isinstance(value, int) else value
    return out


def opts_to_dict(opts: list[str]) -> dict:
    """['SOLVER.MAX_ITER', '10', ...] (Detectron2's KEY VALUE pairs) -> nested dict."""
    if len(opts) % 2:
        raise UserError(f"overrides come in KEY VALUE pairs (e.g. SOLVER.MAX_ITER 100); "
                        f"{opts[-1]!r} has no value")
    out: dict = {}
    for key, raw in zip(opts[0::2], opts[1::2]):
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = decode(raw)
    return out


def load(path, opts: list[str] | None = None) -> dict:
    """Read `path` (+ KEY VALUE `opts`) into a plain nested dict with every default filled,
    refusing keys the torchvision engine does not implement."""
    data = read_yaml_with_base(path)
    cfg = merge(defaults(), _check_keys(data, defaults(), "", str(path)))
    over = opts_to_dict(list(opts or []))
    return merge(cfg, _check_keys(over, defaults(), "", "override"))


def get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def set_value(cfg: dict, dotted: str, value) -> None:
    node = cfg
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
