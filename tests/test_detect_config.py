"""Detection configs hold the published protocol, field by field, in both engines' readers.

The expected values are the spec (MoCo paper Sec. 4.2 and facebookresearch/moco@7397dfe
detection/configs; Detectron2's 1x/2x schedules; mmselfsup's FPN benchmark configs), not results.
"""
from pathlib import Path

import pytest
from helpers import NEEDS_DETECTRON2

from mocobench.errors import UserError
from transfer.detect import config as dcfg

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detection"

RGB = {  # moco detection/configs/*_moco.yaml: torchvision weights, RGB input
    "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
    "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "INPUT.FORMAT": "RGB",
    "MODEL.RESNETS.DEPTH": 50,
}
C4 = {  # moco detection/configs/Base-RCNN-C4-BN.yaml
    **RGB,
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.BACKBONE.NAME": "build_resnet_backbone",
    "MODEL.BACKBONE.FREEZE_AT": 0,
    "MODEL.RESNETS.NORM": "naiveSyncBN",
    "MODEL.ROI_HEADS.NAME": "Res5ROIHeadsExtraNorm",
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "TEST.PRECISE_BN.ENABLED": True,
    "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.BASE_LR": 0.02,
}
COCO_SCALES = [640, 672, 704, 736, 768, 800]
FPN = {  # Mask R-CNN R50-FPN, SyncBN in backbone and FPN (MoCo paper; mmselfsup coco_R_50_FPN_1x.yaml)
    **RGB,
    "MODEL.MASK_ON": True,
    "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone",
    "MODEL.BACKBONE.FREEZE_AT": 0,
    "MODEL.RESNETS.NORM": "SyncBN",
    "MODEL.FPN.NORM": "SyncBN",
    "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
    "TEST.PRECISE_BN.ENABLED": True,
    "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.BASE_LR": 0.02,
    "INPUT.MIN_SIZE_TRAIN": COCO_SCALES,
    "INPUT.MIN_SIZE_TEST": 800,
    "DATASETS.TRAIN": ["coco_2017_train"],
    "DATASETS.TEST": ["coco_2017_val"],
}
PROTOCOL = {
    "pascal_voc_R_50_C4_24k": {
        **C4,
        "MODEL.MASK_ON": False,
        "MODEL.ROI_HEADS.NUM_CLASSES": 20,
        "INPUT.MIN_SIZE_TRAIN": list(range(480, 801, 32)),
        "INPUT.MIN_SIZE_TEST": 800,
        "DATASETS.TRAIN": ["voc_2007_trainval", "voc_2012_trainval"],
        "DATASETS.TEST": ["voc_2007_test"],
        "SOLVER.STEPS": [18000, 22000],
        "SOLVER.MAX_ITER": 24000,
        "SOLVER.WARMUP_ITERS": 100,
    },
    "coco_R_50_C4_2x": {
        **C4, "MODEL.MASK_ON": True, "MODEL.ROI_HEADS.NUM_CLASSES": 80,
        "INPUT.MIN_SIZE_TRAIN": COCO_SCALES, "INPUT.MIN_SIZE_TEST": 800,
        "DATASETS.TRAIN": ["coco_2017_train"], "DATASETS.TEST": ["coco_2017_val"],
        "SOLVER.STEPS": [120000, 160000], "SOLVER.MAX_ITER": 180000,
    },
    "coco_R_50_C4_1x": {
        **C4, "MODEL.MASK_ON": True, "MODEL.ROI_HEADS.NUM_CLASSES": 80,
        "INPUT.MIN_SIZE_TRAIN": COCO_SCALES, "INPUT.MIN_SIZE_TEST": 800,
        "DATASETS.TRAIN": ["coco_2017_train"], "DATASETS.TEST": ["coco_2017_val"],
        "SOLVER.STEPS": [60000, 80000], "SOLVER.MAX_ITER": 90000,
    },
    "coco_R_50_FPN_1x": {**FPN, "SOLVER.STEPS": [60000, 80000], "SOLVER.MAX_ITER": 90000},
    "coco_R_50_FPN_2x": {**FPN, "SOLVER.STEPS": [120000, 160000], "SOLVER.MAX_ITER": 180000},
}


def _check(cfg, expected, name):
    for key, want in expected.items():
        have = dcfg.get(cfg, key)
        have = list(have) if isinstance(have, tuple) else have
        assert have == want, f"{name}: {key} is {have!r}, the protocol says {want!r}"


@pytest.mark.parametrize("name", sorted(PROTOCOL))
def test_paper_configs_hold_the_protocol(name):
    _check(dcfg.load(CONFIGS / f"{name}.yaml"), PROTOCOL[name], name)


@NEEDS_DETECTRON2
@pytest.mark.parametrize("name", sorted(PROTOCOL))
def test_detectron2_reads_the_same_values(name):
    from transfer.detect.d2_engine import build_cfg, plain

    d2 = plain(build_cfg(CONFIGS / f"{name}.yaml", []))
    _check(d2, PROTOCOL[name], name)
    ours = dcfg.load(CONFIGS / f"{name}.yaml")

    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    for key, value in walk(ours):
        assert dcfg.get(d2, key) == value, f"{name}: {key} differs between the engines' readers"


@NEEDS_DETECTRON2
def test_torchvision_defaults_are_detectron2_defaults():
    import yaml
    from detectron2.config import get_cfg

    d2 = yaml.safe_load(get_cfg().dump())

    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    ours = dcfg.load(CONFIGS / "Base-RCNN-C4-BN.yaml")  # through yacs: tuples read back as lists
    base = dcfg.read_chain(CONFIGS / "Base-RCNN-C4-BN.yaml")[-1][1]
    for key, value in walk(dcfg.DEFAULTS):
        if key in set(walk_keys(base)):
            continue  # set by the file, not a default
        value = dcfg.get(ours, key)
        assert dcfg.get(d2, key) == pytest.approx(value) if isinstance(value, float) else \
            dcfg.get(d2, key) == value, key


def walk_keys(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from walk_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def test_every_shipped_config_loads():
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = dcfg.load(path)
        assert cfg["MODEL"]["META_ARCHITECTURE"] == "GeneralizedRCNN", path.name


def test_overrides_and_errors(tmp_path):
    path = CONFIGS / "pascal_voc_R_50_C4_24k.yaml"
    cfg = dcfg.load(path, ["SOLVER.MAX_ITER", "10", "INPUT.MIN_SIZE_TRAIN", "(64, 96)", "SOLVER.BASE_LR", "1.0"])
    assert cfg["SOLVER"]["MAX_ITER"] == 10 and cfg["INPUT"]["MIN_SIZE_TRAIN"] == [64, 96]
    assert cfg["SOLVER"]["BASE_LR"] == 1.0 and isinstance(cfg["SOLVER"]["BASE_LR"], float)
    assert cfg["SOLVER"]["STEPS"] == [18000, 22000]  # the file's value, not the default's
    with pytest.raises(UserError, match="KEY VALUE pairs"):
        dcfg.load(path, ["SOLVER.MAX_ITER"])
    with pytest.raises(UserError, match="MODEL.RESNETS.DEFORM_ON_PER_STAGE, not a key the torchvision "
                                        "engine implements.*--engine detectron2"):
        dcfg.load(path, ["MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[True, True, True, True]"])
    # yacs' (and so Detectron2's) rule: an int is not a float; both engines refuse it alike
    with pytest.raises(UserError, match="override: Type mismatch.*SOLVER.BASE_LR.*e.g. 1.0 for a float"):
        dcfg.load(path, ["SOLVER.BASE_LR", "1"])
    with pytest.raises(UserError, match="Type mismatch.*SOLVER.MAX_ITER"):
        dcfg.load(path, ["SOLVER.MAX_ITER", "many"])
    with pytest.raises(UserError, match="does not exist"):
        dcfg.load(CONFIGS / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("_BASE_: Base-RCNN-C4-BN.yaml\nMODEL:\n  NOPE: 1\n")
    (tmp_path / "Base-RCNN-C4-BN.yaml").write_text((CONFIGS / "Base-RCNN-C4-BN.yaml").read_text())
    with pytest.raises(UserError, match=f"{bad}: Non-existent config key: MODEL.NOPE, not a key"):
        dcfg.load(bad)


@NEEDS_DETECTRON2
def test_both_readers_refuse_an_int_for_a_float():
    from transfer.detect.d2_engine import build_cfg

    with pytest.raises(UserError, match="Type mismatch"):
        build_cfg(CONFIGS / "pascal_voc_R_50_C4_24k.yaml", ["SOLVER.BASE_LR", "1"])


def test_explicit_keys_follow_the_base_chain_and_the_overrides():
    keys = dcfg.explicit_keys(CONFIGS / "demo_scenes_voc_R18_FPN.yaml", ["SOLVER.BASE_LR", "0.1"])
    assert {"MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.RESNETS.NORM", "SOLVER.BASE_LR", "DATASETS.SCENES.N_TRAIN"} <= keys
    assert "MODEL.RPN.NMS_THRESH" not in keys


def test_torchvision_engine_refuses_what_it_does_not_implement():
    from transfer.detect.tv_model import check_config

    path = CONFIGS / "pascal_voc_R_50_C4_24k.yaml"
    assert check_config(dcfg.load(path)) == "c4"
    assert check_config(dcfg.load(CONFIGS / "coco_R_50_FPN_1x.yaml")) == "fpn"
    with pytest.raises(UserError, match="INPUT.FORMAT in \\['RGB'\\], got 'BGR'"):
        check_config(dcfg.load(path, ["INPUT.FORMAT", "BGR"]))
    with pytest.raises(UserError, match="MODEL.RESNETS.NORM .* got 'GN'"):
        check_config(dcfg.load(path, ["MODEL.RESNETS.NORM", "GN"]))


def test_weights_must_match_the_config():
    import torchvision

    from converters import Backbone
    from transfer.detect.weights import check_weights_match

    sd = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    bb = Backbone("resnet18", sd, "torchvision", {})
    cfg = dcfg.load(CONFIGS / "pascal_voc_R_50_C4_24k.yaml")
    with pytest.raises(UserError, match="MODEL.RESNETS.DEPTH is 50, the weights need 18.*pass .*"
                                        "MODEL.RESNETS.DEPTH 18 MODEL.RESNETS.RES2_OUT_CHANNELS 64"):
        check_weights_match(bb, cfg)
    cfg = dcfg.load(CONFIGS / "demo_scenes_voc_R18_FPN.yaml")
    check_weights_match(bb, cfg)
