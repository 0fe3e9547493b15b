"""The Detectron2 engine: MoCo weights reach the backbone (asserted on the checkpointer's load
report), and a few iterations train and evaluate on the VOC and COCO layouts of the scenes."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torchvision

from mocobench.errors import UserError
from transfer.results import read_results

pytestmark = pytest.mark.skipif(importlib.util.find_spec("detectron2") is None,
                                reason="detectron2 is not installed (built from source, optional; "
                                       "CI cannot build it)")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detection"
TINY = ["SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
        "TEST.PRECISE_BN.NUM_ITER", "1", "DATASETS.SCENES.N_TRAIN", "8", "DATASETS.SCENES.N_VAL", "4",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "128", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
        "DATALOADER.NUM_WORKERS", "0", "SEED", "0",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]  # 2 iterations: keep low-score detections


def _official_moco_checkpoint(path, arch):
    """The layout of facebookresearch/moco's main_moco.py checkpoints (v2: MLP head)."""
    torch.manual_seed(0)
    q = getattr(torchvision.models, arch)()
    dim = q.fc.in_features
    q.fc = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), torch.nn.Linear(dim, 128))
    sd = {f"module.encoder_q.{k}": v for k, v in q.state_dict().items()}
    sd.update({f"module.encoder_k.{k}": v.clone() for k, v in q.state_dict().items()})
    sd.update({"module.queue": torch.randn(128, 256), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    torch.save({"epoch": 200, "arch": arch, "state_dict": sd, "optimizer": {}}, path)
    return {k[len("module.encoder_q."):]: v for k, v in sd.items() if k.startswith("module.encoder_q.")}


@pytest.fixture(scope="module")
def moco_r50(tmp_path_factory):
    path = tmp_path_factory.mktemp("moco") / "moco_v2_r50.pth.tar"
    return path, _official_moco_checkpoint(path, "resnet50")


@pytest.fixture(scope="module")
def c4_model():
    from detectron2.modeling import build_model

    from transfer.detect.d2_engine import build_cfg

    cfg = build_cfg(CONFIGS / "pascal_voc_R_50_C4_24k.yaml", ["MODEL.DEVICE", "cpu"])
    return build_model(cfg)


@pytest.fixture(autouse=True)
def scene_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOCO_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_moco_weights_reach_the_c4_backbone(moco_r50, c4_model, tmp_path):
    from converters import load_backbone, to_detectron2
    from transfer.detect.d2_engine import PRETRAINED, load_pretrained

    ckpt, source = moco_r50
    pkl = tmp_path / "r50.pkl"
    to_detectron2(load_backbone(ckpt), pkl, verify=True)
    report = load_pretrained(c4_model, pkl)

    missing = report["missing_keys"]
    assert not [k for k in missing if PRETRAINED.match(k) and not k.endswith("num_batches_tracked")]
    assert report["unexpected_keys"] == [] and report["incorrect_shapes"] == []
    # Res5ROIHeadsExtraNorm is registered and built: its norm is the one new layer in res5.
    assert {k for k in missing if k.startswith("roi_heads.res5.")} == {
        f"roi_heads.res5.norm.{p}" for p in ("weight", "bias", "running_mean", "running_var")}
    sd = c4_model.state_dict()
    for d2_key, tv_key in [("backbone.stem.conv1.weight", "conv1.weight"),
                           ("backbone.stem.conv1.norm.running_var", "bn1.running_var"),
                           ("backbone.res2.0.shortcut.weight", "layer1.0.downsample.0.weight"),
                           ("backbone.res4.5.conv3.norm.weight", "layer3.5.bn3.weight"),
                           ("roi_heads.res5.0.conv2.weight", "layer4.0.conv2.weight"),
                           ("roi_heads.res5.2.conv3.norm.bias", "layer4.2.bn3.bias")]:
        assert torch.equal(sd[d2_key], source[tv_key]), d2_key


def test_a_backbone_that_does_not_fit_is_refused(c4_model, tmp_path):
    from converters import load_backbone, to_detectron2
    from transfer.detect.d2_engine import load_pretrained

    _official_moco_checkpoint(tmp_path / "r18.pth", "resnet18")
    to_detectron2(load_backbone(tmp_path / "r18.pth"), tmp_path / "r18.pkl", verify=False)
    with pytest.raises(UserError, match="backbone keys missing.*do not fit this config's backbone"):
        load_pretrained(c4_model, tmp_path / "r18.pkl")


def test_c4_needs_a_bottleneck_resnet():
    from transfer.detect.d2_engine import build_cfg, check_model_support

    cfg = build_cfg(CONFIGS / "pascal_voc_R_50_C4_24k.yaml", ["MODEL.RESNETS.DEPTH", "18"])
    with pytest.raises(UserError, match="C4 needs R50 or deeper.*use an FPN config"):
        check_model_support(cfg)
    with pytest.raises(UserError, match="Non-existent key: MODEL.NOPE; keys and types are those of Detectron2"):
        build_cfg(CONFIGS / "pascal_voc_R_50_C4_24k.yaml", ["MODEL.NOPE", "1"])


def _run(config, weights, out):
    from transfer.detect import main

    main(["--config", str(config), "--weights", str(weights), "--output", str(out),
          "--engine", "detectron2", *TINY])
    return read_results(out / "results.json")


@pytest.fixture(scope="module")
def moco_r18(tmp_path_factory):
    path = tmp_path_factory.mktemp("moco18") / "moco_v2_r18.pth.tar"
    _official_moco_checkpoint(path, "resnet18")
    return path


def test_voc_layout_train_and_evaluate(moco_r18, tmp_path):
    from transfer import outcomes
    from transfer.detect import metrics

    r = _run(CONFIGS / "demo_scenes_voc_R18_FPN.yaml", moco_r18, tmp_path)
    assert r["engine"] == "detectron2" and r["protocol"]["name"] == "demo_scenes_voc_R18_FPN"
    assert set(r["metrics"]) == {"AP", "AP50", "AP75"}
    assert r["dataset"]["splits"] == {"scenes_voc_train": 8, "scenes_voc_val": 4}
    # Scored as Detectron2's VOC evaluator (tests/test_detect_metrics.py), from outcomes it kept.
    assert r["outcomes"]["metric"] == "voc07" and "VOC07 11-point" in r["protocol"]["metric"]["AP50"]
    saved = outcomes.load(tmp_path / "results.json", r)
    assert metrics.score(saved["ground_truth"], saved["detections"], "voc07") == pytest.approx(r["metrics"])
    p = r["protocol"]
    assert p["schedule"]["iterations"] == 2 and p["model"]["norm"] == "BN"  # what ran
    assert p["schedule"]["images_per_process"] == 2  # what BN normalised over
    assert "MODEL.WEIGHTS" not in p["model"]["config"] and "OUTPUT_DIR" not in p["schedule"]["config"]
    # The torchvision engine on the same config: the same data, metric and inputs, another protocol.
    from transfer.detect import main

    main(["--config", str(CONFIGS / "demo_scenes_voc_R18_FPN.yaml"), "--weights", str(moco_r18),
          "--output", str(tmp_path / "tv"), "--engine", "torchvision", *TINY])
    tv = read_results(tmp_path / "tv" / "results.json")["protocol"]
    assert tv["dataset"] == p["dataset"] and tv["metric"] == p["metric"] and tv["input"] == p["input"]
    assert tv["engine"] == "torchvision" and tv["id"] != p["id"]
    assert r["weights"]["layout"] == "moco-official"
    run = r["config"]["RUN"]
    assert "MODEL.RESNETS.NORM SyncBN -> BN at world size 1" in run["norm"]
    assert r["config"]["MODEL"]["RESNETS"]["NORM"] == "BN" and run["world_size"] == 1
    assert run["load_report"]["unexpected_keys"] == []
    assert not [k for k in run["load_report"]["missing_keys"] if "bottom_up" in k]
    assert (tmp_path / "weights_detectron2.pkl").is_file() and (tmp_path / "model_final.pth").is_file()


def test_coco_layout_mask_rcnn_train_and_evaluate(moco_r18, tmp_path):
    r = _run(CONFIGS / "demo_scenes_coco_R18_FPN_mask.yaml", moco_r18, tmp_path)
    assert set(r["metrics"]) == {"AP", "AP50", "AP75", "mask_AP", "mask_AP50", "mask_AP75"}
    assert all(math.isfinite(v) for v in r["metrics"].values())
    assert r["dataset"]["splits"] == {"scenes_coco_train": 8, "scenes_coco_val": 4}
    assert r["outcomes"]["metric"] == "coco"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_multi_process_needs_gpus(moco_r18, tmp_path, capsys):
    from transfer.detect import main

    with pytest.raises(SystemExit) as e:
        main(["--config", str(CONFIGS / "demo_scenes_voc_R18_FPN.yaml"), "--weights", str(moco_r18),
              "--output", str(tmp_path), "--engine", "detectron2", "--num-gpus", "2"])
    assert e.value.code == 2
    assert "needs one CUDA GPU per process" in capsys.readouterr().err


def test_random_weights(tmp_path):
    from transfer.detect import main

    main(["--config", str(CONFIGS / "demo_scenes_voc_R18_FPN.yaml"), "--weights", "random", "--arch", "resnet18",
          "--output", str(tmp_path), "--engine", "detectron2", *TINY])
    r = read_results(tmp_path / "results.json")
    assert r["weights"]["layout"] == "random" and r["config"]["RUN"]["arch"] == "resnet18"


@pytest.mark.parametrize("anchor_id", ["voc_c4_24k", "coco_c4_2x", "coco_fpn_2x", "coco_fpn_1x", "coco_c4_1x"])
def test_a_shipped_paper_config_at_8_processes_records_the_published_protocol(anchor_id):
    """What record.py writes for the shipped config (the classes its data has, 16 images on 8
    processes) is the published entry's record on every model, schedule and input field."""
    from transfer.detect import record
    from transfer.detect.d2_engine import _base_cfg, build_cfg, plain
    from transfer.paper_numbers import ANCHORS
    from transfer.report_protocol import differences

    (anchor,) = [a for a in ANCHORS if a["id"] == anchor_id]
    cfg = build_cfg(CONFIGS / f"{anchor['names'][0]}.yaml", [])
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = anchor["protocol"]["dataset"]["classes"]
    conf = plain(cfg)
    conf["RUN"] = {"ims_per_batch_per_rank": cfg.SOLVER.IMS_PER_BATCH // 8}
    defaults = plain(_base_cfg())
    protocol = {"engine": "detectron2", "metric": {m: p for m, p in anchor["protocol"]["metric"].items()},
                "model": record.model(conf, defaults), "schedule": record.schedule(conf, defaults),
                "input": record.input_sizes(conf), "dataset": anchor["protocol"]["dataset"]}
    assert differences(anchor["protocol"], protocol) == []
    conf["RUN"] = {"ims_per_batch_per_rank": 16}  # one GPU: BN over 16 images, another protocol
    assert differences(anchor["protocol"], {**protocol, "schedule": record.schedule(conf, defaults)}) == [
        "schedule.images_per_process: 16 here, 2 published"]
