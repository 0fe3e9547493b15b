"""Detection configs: Detectron2's own YAML format, read by both engines.

The files in configs/detection are Detectron2 configs (upper-case keys, one ``_BASE_``),
so the Detectron2 engine reads them with Detectron2's own ``CfgNode`` and every
Detectron2 key works there. The torchvision engine reads the same files with yacs'
``CfgNode`` (what Detectron2's builds on: the same value decoding, type checks and
``KEY VALUE`` overrides) against ``DEFAULTS``: the subset of Detectron2's keys, with
Detectron2's default values, that the torchvision engine implements. Any other key is
refused in one line rather than silently ignored. ``_BASE_`` (a file relative to the
config, merged underneath it) is Detectron2's addition to yacs and is followed here too.

Two sections are ours and exist for both engines (added to Detectron2's config before
merging): ``DATASETS.ROOT`` (where ``voc_2007_trainval``-style names live; "" means
$DETECTRON2_DATASETS or ./datasets, as in Detectron2) and ``DATASETS.SCENES`` (the
embedded Fashion-MNIST scene set behind the ``scenes_*`` names; see transfer.scenes).
"""
import copy
from pathlib import Path

import yaml
from yacs.config import CfgNode

from mocobench.config import find_config, merge, read_mapping
from mocobench.errors import UserError

# Ours: present in both engines' configs.
EXTRA = {
    "DATASETS": {
        "ROOT": "",
        # transfer.scenes.ensure_demo_scenes' arguments (OBJECTS is (min, max) items per scene,
        # SCALE the (min, max) item size in multiples of 28 px, BACKGROUND its style).
        "SCENES": {"N_TRAIN": 256, "N_VAL": 64, "SEED": 0, "CANVAS": 128,
                   "OBJECTS": [2, 4], "SCALE": [1.0, 2.0], "BACKGROUND": "gradient"},
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
        "MIN_SIZE_TRAIN": (800,),
        "MIN_SIZE_TRAIN_SAMPLING": "choice",
        "MAX_SIZE_TRAIN": 1333,
        "MIN_SIZE_TEST": 800,
        "MAX_SIZE_TEST": 1333,
        "RANDOM_FLIP": "horizontal",
        "FORMAT": "BGR",
        "MASK_FORMAT": "polygon",
    },
    "DATASETS": {"TRAIN": (), "TEST": ()},
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
        "STEPS": (30000,),
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
    return merge(copy.deepcopy(DEFAULTS), copy.deepcopy(EXTRA))


def read_chain(path) -> list[tuple[Path, dict]]:
    """The YAML mappings of `path` and of its ``_BASE_`` chain, base first (each without _BASE_)."""
    path = find_config(path)
    data = read_mapping(path, hint=" (the shipped ones are in configs/detection/)")
    base = data.pop("_BASE_", None)
    chain = read_chain(path.parent / base) if base else []
    return chain + [(path, data)]


def items(node: dict, prefix: str = ""):
    """(dotted key, value) for every leaf of a nested config dict: ("SOLVER.BASE_LR", 0.02)."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def explicit_keys(path, opts=()) -> set[str]:
    """The dotted keys the config file chain or the KEY VALUE overrides set (as opposed to
    those left at Detectron2's defaults): an explicit NUM_CLASSES that contradicts the data
    is refused, a default one follows the data."""
    keys = {k for _, data in read_chain(path) for k, _ in items(data)}
    return keys | set(list(opts)[0::2])


def _why(e: Exception) -> str:
    return str(e).strip().strip("'\"").splitlines()[0]


def _merge(cfg: CfgNode, where: str, fn) -> None:
    try:
        fn()
    except (KeyError, AssertionError) as e:  # yacs: "Non-existent key: X"
        raise UserError(f"{where}: {_why(e)}, not a key the torchvision engine implements; remove it "
                        f"or run with --engine detectron2 (which reads every Detectron2 key)") from None
    except ValueError as e:  # yacs: "Type mismatch (<class 'float'> vs. <class 'int'>) ... key: K"
        raise UserError(f"{where}: {_why(e)}; give a value of the default's type (e.g. 1.0 for a float), "
                        f"as Detectron2 requires") from None


def opts_pairs(opts) -> list:
    opts = list(opts or [])
    flags = [o for o in opts[0::2] if o.startswith("--")]
    if flags:
        raise UserError(f"{flags[0]} comes after the KEY VALUE overrides, which take every argument that "
                        f"follows them; put {flags[0]} before the first KEY")
    if len(opts) % 2:
        raise UserError(f"overrides come in KEY VALUE pairs (e.g. SOLVER.MAX_ITER 100); "
                        f"{opts[-1]!r} has no value")
    return opts


def load(path, opts=None) -> dict:
    """Read `path` (+ KEY VALUE `opts`) with yacs into a plain nested dict with every
    default filled, refusing keys the torchvision engine does not implement."""
    opts = opts_pairs(opts)
    cfg = CfgNode(defaults())
    for file, data in read_chain(path):
        _merge(cfg, str(file), lambda: cfg.merge_from_other_cfg(CfgNode(data)))
    _merge(cfg, "override", lambda: cfg.merge_from_list(opts))
    return yaml.safe_load(cfg.dump())  # plain dicts and lists, as the Detectron2 engine's plain()


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
