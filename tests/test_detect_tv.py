"""The torchvision engine: a few iterations train and evaluate on CPU on the embedded scenes in
both layouts and both heads; the evaluation sharded over two gloo ranks equals one process's;
a trained model beats the same model untrained; untrusted weights never run code unasked
(both engines); the output folder is prepared, locked and never left with stale results."""
import json
import math
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import NEEDS_DETECTRON2

from mocobench.errors import UserError
from transfer.results import read_results

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "detection"
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


def _run(config, weights, out, extra=(), engine="torchvision", flags=()):
    from transfer.detect import main

    main(["--config", str(config), "--weights", str(weights), "--output", str(out),
          "--engine", engine, *flags, *TINY, *extra])
    return read_results(out / "results.json")


def test_fpn_faster_rcnn_on_voc_layout(r18_weights, tmp_path):
    r = _run(CONFIGS / "demo_scenes_voc_R18_FPN.yaml", r18_weights, tmp_path)
    assert r["task"] == "detect" and r["engine"] == "torchvision"
    assert set(r["metrics"]) == {"AP", "AP50", "AP75"}
    assert r["dataset"]["splits"] == {"scenes_voc_train": 8, "scenes_voc_val": 4}
    assert r["weights"]["layout"] == "torchvision" and r["seed"] == 0
    assert r["config"]["SOLVER"]["MAX_ITER"] == 2
    assert any("-> BN at world size 1" in n for n in r["config"]["RUN"]["norm"])
    assert r["config"]["RUN"]["precise_bn_layers"] > 0
    assert (tmp_path / "model_final.pth").is_file() and (tmp_path / "config.yaml").is_file()
    # The protocol comes from the resolved run: the override of MAX_ITER is in it.
    p = r["protocol"]
    assert p["name"] == "demo_scenes_voc_R18_FPN" and p["engine"] == "torchvision"
    assert p["schedule"]["iterations"] == 2 and p["schedule"]["batch"] == 2 and p["schedule"]["lr"] == 0.02
    assert p["schedule"]["images_per_process"] == 2  # one process: see the torchrun test
    assert p["input"]["min_size_test"] == 64 and "VOC07 11-point" in p["metric"]["AP50"]
    assert p["model"]["norm"] == "BN" and p["model"]["backbone"] == "build_resnet_fpn_backbone"  # what ran
    assert p["dataset"]["class_names"][0] == "t-shirt" and p["dataset"]["splits"]["scenes_voc_val"] == 4
    # Per-image outcomes: the evaluated ground truth and every detection, re-scorable.
    from transfer import outcomes
    from transfer.detect import metrics

    assert r["outcomes"]["metric"] == "voc07"
    saved = outcomes.load(tmp_path / "results.json", r)
    assert len(saved["ground_truth"]["images"]) == 4 and saved["detections"]
    assert metrics.score(saved["ground_truth"], saved["detections"], "voc07") == pytest.approx(r["metrics"])
    # ... and `report`'s bootstrap, redrawing nothing, gives the same numbers (else it shows no interval)
    from transfer.uncertainty_detection import DetectionOutcomes

    ev = DetectionOutcomes(saved["ground_truth"], saved["detections"], "voc07")
    identity = ev.evaluate(np.ones((1, 4)), ev.names(r["metrics"]))
    assert {k: float(v[0]) for k, v in identity.items()} == pytest.approx(r["metrics"], abs=1e-9)


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
    assert r["protocol"]["name"] == "pascal_voc_R_50_C4_24k"
    assert r["outcomes"]["metric"] == "coco" and "COCO 101-point" in r["protocol"]["metric"]["AP"]
    assert set(r["metrics"]) == {"AP", "AP50", "AP75", "mask_AP", "mask_AP50", "mask_AP75"}
    assert all(math.isfinite(v) for v in r["metrics"].values())
    assert "segmentation" in json.loads((tmp_path / "detections.json").read_text())[0]
    state = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert "roi_heads.box_head.res5.norm.running_var" in state  # the extra norm after res5


def test_c4_model_uses_the_pretrained_weights_everywhere(r18_weights):
    from converters import build_resnet, load_backbone
    from transfer.detect import config as dcfg
    from transfer.detect.tv_model import build_model

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
    from transfer.detect.tv_model import build_model

    cfg = dcfg.load(CONFIGS / "demo_scenes_voc_R18_FPN.yaml", ["MODEL.BACKBONE.FREEZE_AT", "2"])
    model = build_model(cfg, build_resnet(load_backbone(r18_weights)), 10)
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer1[0].bn1, FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert isinstance(body.layer2[0].bn1, torch.nn.BatchNorm2d)
    assert all(p.requires_grad for p in body.layer2.parameters())


@NEEDS_DETECTRON2
def test_lr_schedule_matches_detectron2():
    from detectron2.config import get_cfg
    from detectron2.solver import build_lr_scheduler

    from transfer.detect.tv_solver import lr_factor

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


def test_random_weights_need_an_arch_and_are_seeded(tmp_path):
    from transfer.detect.weights import load_weights

    with pytest.raises(UserError, match="--weights random needs an architecture; add --arch"):
        load_weights("random", None, False, None)
    a, rec = load_weights("random", "resnet18", False, None)
    b, _ = load_weights("random", "resnet18", False, None)
    assert rec["layout"] == "random" and rec["label"] == "random init (resnet18, seed 0)"
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    r = _run(CONFIGS / "demo_scenes_voc_R18_FPN.yaml", "random", tmp_path, flags=["--arch", "resnet18"])
    assert r["weights"]["path"] is None and r["config"]["RUN"]["arch"] == "resnet18"


# ----------------------------------------------------------------------------- output folder

def test_a_second_run_into_a_held_folder_is_refused(r18_weights, tmp_path, capsys):
    from transfer.detect import main

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mocobench.fileio import lock_output; "
                               f"lock_output({str(tmp_path)!r}, 'detection run'); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as e:
            main(["--config", str(CONFIGS / "demo_scenes_voc_R18_FPN.yaml"), "--weights", str(r18_weights),
                  "--output", str(tmp_path), "--engine", "torchvision", *TINY])
        assert e.value.code == 2
        assert f"is in use by pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_a_failed_rerun_leaves_no_previous_results(r18_weights, tmp_path):
    from transfer.detect import main

    _run(CONFIGS / "demo_scenes_voc_R18_FPN.yaml", r18_weights, tmp_path)
    assert (tmp_path / "results.json").is_file() and (tmp_path / "detections.json").is_file()
    with pytest.raises(SystemExit):
        main(["--config", str(CONFIGS / "demo_scenes_voc_R18_FPN.yaml"), "--weights", str(r18_weights),
              "--output", str(tmp_path), "--engine", "torchvision", *TINY, "DATASETS.TEST", "('scenes_voc_nope',)"])
    assert not (tmp_path / "results.json").exists()  # moved aside before the run (results.start_run)
    assert read_results(tmp_path / "results.previous.json")["task"] == "detect"


# ----------------------------------------------------------------------------- untrusted weights

class _RunsCode:
    """Unpickling this runs code: it appends one "x" to the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'a').write('x')",))


def _code_running_pkl(path, marker):
    """A Detectron2 .pkl of a real ResNet-18 backbone that also carries a code-running object."""
    from converters import load_backbone
    from converters.formats import detectron2_state_dict

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path.with_suffix(".pth"))
    model = detectron2_state_dict(load_backbone(path.with_suffix(".pth")))
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "someone", "matching_heuristics": True,
                     "extra": _RunsCode(marker)}, f)
    return path


@pytest.mark.parametrize("engine", ["torchvision", pytest.param("detectron2", marks=NEEDS_DETECTRON2)])
def test_a_code_running_pkl_runs_nothing_without_allow_pickle(engine, tmp_path, capsys):
    from transfer.detect import main

    marker = tmp_path / "PWNED"
    pkl = _code_running_pkl(tmp_path / "r18.pkl", marker)
    argv = ["--config", str(CONFIGS / "demo_scenes_voc_R18_FPN.yaml"), "--weights", str(pkl),
            "--output", str(tmp_path / "out"), "--engine", engine]
    with pytest.raises(SystemExit) as e:
        main(argv + TINY)
    assert e.value.code == 2 and not marker.exists()
    err = capsys.readouterr().err
    assert "would run code when loaded" in err and "pass --allow-pickle" in err
    main(argv + ["--allow-pickle"] + TINY)  # the user vouches for the file: its code runs in our reader
    assert marker.read_text() == "x"  # once: the engine loaded only the clean file written from it
    r = read_results(tmp_path / "out" / "results.json")
    assert r["weights"]["layout"] == "detectron2" and r["config"]["RUN"]["arch"] == "resnet18"


@pytest.mark.parametrize("engine", ["torchvision", pytest.param("detectron2", marks=NEEDS_DETECTRON2)])
def test_a_resnet34_pkl_is_refused_under_a_depth_18_config(engine, tmp_path, capsys):
    from converters import load_backbone, to_detectron2
    from transfer.detect import main

    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    to_detectron2(load_backbone(tmp_path / "r34.pth"), tmp_path / "r34.pkl", verify=False)
    with pytest.raises(SystemExit) as e:
        main(["--config", str(CONFIGS / "demo_scenes_voc_R18_FPN.yaml"), "--weights", str(tmp_path / "r34.pkl"),
              "--output", str(tmp_path / "out"), "--engine", engine, *TINY])
    assert e.value.code == 2
    assert "MODEL.RESNETS.DEPTH is 18, the weights need 34" in capsys.readouterr().err


# ----------------------------------------------------------------------------- sharded evaluation

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_setup(cache: str):
    """The same model (seeded random init, eval mode) and 6 test scenes on every process."""
    os.environ["MOCO_BENCH_CACHE"] = cache
    from converters import build_resnet
    from transfer.detect import config as dcfg
    from transfer.detect import datasets as ds
    from transfer.detect.tv_model import build_model
    from transfer.detect.weights import random_backbone

    torch.set_num_threads(1)
    cfg = dcfg.load(CONFIGS / "demo_scenes_voc_R18_FPN.yaml", [*TINY, "DATASETS.SCENES.N_VAL", "6"])
    (spec,), _ = ds.resolve_all(cfg)
    records, classes = ds.load(ds.resolve("scenes_voc_val", cfg))
    torch.manual_seed(0)
    model = build_model(cfg, build_resnet(random_backbone("resnet18")), len(classes))
    return model, records, classes, cfg


def _sharded_worker(rank: int, world: int, port: int, cache: str, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from mocobench import dist
    from transfer.detect import tv_eval

    device = dist.init_distributed()
    model, records, _, cfg = _eval_setup(cache)
    with torch.no_grad():  # each rank's BN statistics differ, as after plain-BN training on each rank
        for buf in model.buffers():  # (exact binary fractions, so their mean is exact too)
            if buf.is_floating_point():
                buf.add_(0.25 * (rank + 1))
    dets = tv_eval.evaluate(model, records, cfg, device)
    if rank == 0:
        Path(out).write_text(json.dumps(dets))
    dist.destroy()


def test_sharded_evaluation_over_two_gloo_ranks_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    from transfer.detect import datasets as ds
    from transfer.detect import metrics, tv_eval

    cache = os.environ["MOCO_BENCH_CACHE"]
    out = tmp_path / "sharded.json"
    mp.start_processes(_sharded_worker, args=(2, _free_port(), cache, str(out)), nprocs=2, start_method="spawn")
    sharded = json.loads(out.read_text())

    model, records, classes, cfg = _eval_setup(cache)
    with torch.no_grad():  # the mean of the two ranks' statistics: what the sharded run evaluated
        for buf in model.buffers():
            if buf.is_floating_point():
                buf.add_(0.375)
    threads = torch.get_num_threads()
    try:
        single = tv_eval.evaluate(model, records, cfg, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert len(single) > 0 and {d["image_id"] for d in single} == {r["image_id"] for r in records}
    assert sharded == json.loads(json.dumps(single))  # every detection, in the same order, bit for bit
    gt = ds.ground_truth(records, classes)
    assert metrics.voc07(gt, sharded) == metrics.voc07(gt, single)


def test_two_ranks_under_torchrun_train_evaluate_and_write_once(tmp_path):
    """The CLI under torchrun with 2 gloo ranks (CI's stand-in for 2 GPUs): the seed drawn on
    rank 0 reaches rank 1 (object broadcast over the gloo group), both ranks evaluate and the
    results are written once, by rank 0."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "transfer", "detect", "--config", str(CONFIGS / "demo_scenes_voc_R18_FPN.yaml"),
         "--weights", "random", "--arch", "resnet18", "--output", str(out), "--engine", "torchvision",
         *TINY, "SEED", "-1"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = read_results(out / "results.json")
    assert r["config"]["RUN"]["world_size"] == 2 and r["seed"] >= 0
    # BN normalises over each process's images: another protocol than one process's (2 images)
    assert r["protocol"]["schedule"]["images_per_process"] == 1
    assert r["dataset"]["splits"]["scenes_voc_val"] == 4
    assert {img["id"] for img in json.loads((out / "ground_truth.json").read_text())["images"]} == {1, 2, 3, 4}
    assert proc.stdout.count("[detect] wrote") == 1


# One large item per 64 px scene on a flat background, scored on the training scenes themselves:
# 80 iterations are enough to learn them, so training must show (measured: AP50 33 from 0.05).
LEARNABLE = ["DATASETS.SCENES.N_TRAIN", "16", "DATASETS.SCENES.N_VAL", "4", "DATASETS.SCENES.CANVAS", "64",
             "DATASETS.SCENES.OBJECTS", "(1, 1)", "DATASETS.SCENES.SCALE", "(1.5, 2.0)",
             "DATASETS.SCENES.BACKGROUND", "flat", "DATASETS.TEST", "('scenes_voc_train',)",
             "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "64",
             "INPUT.MAX_SIZE_TEST", "128", "MODEL.ROI_BOX_HEAD.FC_DIM", "256",
             "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.BASE_LR", "0.02",
             "SOLVER.WARMUP_ITERS", "10", "SOLVER.STEPS", "(60, 70)", "TEST.PRECISE_BN.NUM_ITER", "2",
             "DATALOADER.NUM_WORKERS", "0", "SEED", "0"]


def test_a_trained_model_beats_the_same_model_untrained(tmp_path):
    from transfer.detect import main

    ap50 = {}
    for iters in (1, 80):
        main(["--config", str(CONFIGS / "demo_scenes_voc_R18_FPN.yaml"), "--weights", "random", "--arch", "resnet18",
              "--output", str(tmp_path / str(iters)), "--engine", "torchvision", *LEARNABLE,
              "SOLVER.MAX_ITER", str(iters)])
        ap50[iters] = read_results(tmp_path / str(iters) / "results.json")["metrics"]["AP50"]
    assert ap50[1] < 5 and ap50[80] > ap50[1] + 15, ap50
