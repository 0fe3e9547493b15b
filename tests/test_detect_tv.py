"""The torchvision engine trains and evaluates for a few iterations on CPU on the embedded scenes,
in both layouts and both heads, and writes a valid results.json."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torchvision

from mocobench.errors import UserError
from transfer.results import read_results

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detection"
HAS_D2 = importlib.util.find_spec("detectron2") is not None
# Tiny: 8 train / 4 val scenes at 64 px, 2 images per batch, 2 iterations.
TINY = ["SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
        "TEST.PRECISE_BN.NUM_ITER", "1", "DATASETS.SCENES.N_TRAIN", "8", "DATASETS.SCENES.N_VAL", "4",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "128", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
        "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
        "DATALOADER.NUM_WORKERS", "0", "SEED", "0",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]  # 2 iterations: keep low-score detections


@pytest.fixture(scope="module")
def r18_weights(tmp_path_factory):
    """A random-init torchvision ResNet-18 (the suite's random baseline format)."""
    path = tmp_path_factory.mktemp("w") / "r18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def scene_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOCO_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _run(config, weights, out, extra=()):
    from transfer.detect import main

    main(["--config", str(config), "--weights", str(weights), "--output", str(out),
          "--engine", "torchvision", *TINY, *extra])
    return read_results(out / "results.json")


def test_fpn_faster_rcnn_on_voc_layout(r18_weights, tmp_path):
    r = _run(CONFIGS / "demo_scenes_voc_R18_FPN.yaml", r18_weights, tmp_path)
    assert r["task"] == "detect" and r["engine"] == "torchvision"
    assert r["protocol"]["name"] == "demo_scenes_voc_R18_FPN@torchvision"
    assert set(r["metrics"]) == {"AP", "AP50", "AP75"}
    assert all(math.isfinite(v) and 0 <= v <= 100 for v in r["metrics"].values())
    assert r["dataset"]["splits"] == {"scenes_voc_train": 8, "scenes_voc_val": 4}
    assert r["weights"]["layout"] == "torchvision" and r["seed"] == 0
    assert r["config"]["SOLVER"]["MAX_ITER"] == 2
    assert any("-> BN at world size 1" in n for n in r["config"]["RUN"]["norm"])
    assert r["config"]["RUN"]["precise_bn_layers"] > 0
    assert (tmp_path / "model_final.pth").is_file() and (tmp_path / "config.yaml").is_file()


def test_c4_extra_norm_mask_rcnn_on_coco_layout(r18_weights, tmp_path):
    """The paper's C4 config (Res5ROIHeadsExtraNorm, naiveSyncBN) as Mask R-CNN, at R18/tiny size."""
    # res5 runs on every RoI (C4's cost): few RoIs, 8x8 pooling.
    extra = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
             "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "8", "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "8",
             "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16", "MODEL.RPN.POST_NMS_TOPK_TEST", "20",
             "TEST.DETECTIONS_PER_IMAGE", "20",
             "MODEL.MASK_ON", "True", "MODEL.ROI_HEADS.NUM_CLASSES", "10",
             "MODEL.ANCHOR_GENERATOR.SIZES", "[[16, 32, 64]]",
             "DATASETS.TRAIN", "('scenes_coco_train',)", "DATASETS.TEST", "('scenes_coco_val',)"]
    r = _run(CONFIGS / "pascal_voc_R_50_C4_24k.yaml", r18_weights, tmp_path, extra)
    assert r["protocol"]["name"] == "pascal_voc_R_50_C4_24k@torchvision"
    assert set(r["metrics"]) == {"AP", "AP50", "AP75", "mask_AP", "mask_AP50", "mask_AP75"}
    assert all(math.isfinite(v) for v in r["metrics"].values())
    state = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert "roi_heads.box_head.res5.norm.running_var" in state  # the extra norm after res5


def test_c4_model_uses_the_pretrained_weights_everywhere(r18_weights):
    from converters import build_resnet, load_backbone
    from transfer.detect import config as dcfg
    from transfer.detect.tv_engine import build_model

    bb = load_backbone(r18_weights)
    cfg = dcfg.load(CONFIGS / "pascal_voc_R_50_C4_24k.yaml", ["MODEL.RESNETS.DEPTH", "18"])
    model = build_model(cfg, build_resnet(bb), 20)
    sd = model.state_dict()
    for key, value in bb.state_dict.items():
        name = ("roi_heads.box_head.res5.res5." + key[len("layer4."):] if key.startswith("layer4.")
                else "backbone." + key)
        assert torch.equal(sd[name], value), key
    assert all(p.requires_grad for p in model.parameters())  # FREEZE_AT 0


def test_frozen_stages_follow_freeze_at(r18_weights):
    from torchvision.ops.misc import FrozenBatchNorm2d

    from converters import build_resnet, load_backbone
    from transfer.detect import config as dcfg
    from transfer.detect.tv_engine import build_model

    cfg = dcfg.load(CONFIGS / "demo_scenes_voc_R18_FPN.yaml", ["MODEL.BACKBONE.FREEZE_AT", "2"])
    model = build_model(cfg, build_resnet(load_backbone(r18_weights)), 10)
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer1[0].bn1, FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert isinstance(body.layer2[0].bn1, torch.nn.BatchNorm2d)
    assert all(p.requires_grad for p in body.layer2.parameters())


@pytest.mark.skipif(not HAS_D2, reason="detectron2 is not installed (built from source, optional)")
def test_lr_schedule_matches_detectron2():
    from detectron2.config import get_cfg
    from detectron2.solver import build_lr_scheduler

    from transfer.detect.tv_engine import lr_factor

    cfg = get_cfg()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS = 60, (30, 50), 10
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    sched = build_lr_scheduler(cfg, opt)
    ours = {k.upper(): v for k, v in {"steps": [30, 50], "max_iter": 60, "warmup_iters": 10,
                                       "gamma": 0.1, "warmup_factor": 0.001, "warmup_method": "linear"}.items()}
    for it in range(60):
        assert opt.param_groups[0]["lr"] == pytest.approx(cfg.SOLVER.BASE_LR * lr_factor(it, ours)), it
        opt.step()
        sched.step()


def test_engine_errors_name_the_fix(r18_weights, tmp_path, monkeypatch):
    import transfer.detect as detect

    monkeypatch.setattr(detect, "detectron2_status", lambda: "ModuleNotFoundError: No module named 'detectron2'")
    with pytest.raises(UserError, match="Detectron2 is not importable .* pip install --no-build-isolation "
                                        "'git\\+https://github.com/facebookresearch/detectron2.git'"):
        detect.choose_engine("detectron2")
    assert detect.choose_engine("auto") == "torchvision"
    with pytest.raises(SystemExit) as e:
        detect.main(["--config", str(CONFIGS / "pascal_voc_R_50_C4_24k.yaml"), "--weights", str(r18_weights),
                     "--output", str(tmp_path), "--engine", "torchvision"])
    assert e.value.code == 2  # UserError: R18 weights, R50 config


def test_missing_dataset_says_where_to_put_it(r18_weights, tmp_path, capsys):
    from transfer.detect import main

    with pytest.raises(SystemExit):
        main(["--config", str(CONFIGS / "pascal_voc_R_50_C4_24k.yaml"), "--weights", str(r18_weights),
              "--output", str(tmp_path), "--engine", "torchvision", "MODEL.RESNETS.DEPTH", "18",
              "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "DATASETS.ROOT", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert err.startswith("error: data set voc_2007_trainval:") and "DATASETS.ROOT" in err
    assert len(err.strip().splitlines()) == 1
