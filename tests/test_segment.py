"""transfer segment: real MMSegmentation training + IoUMetric on CPU on the embedded scenes,
MoCo weights landing in every backbone tensor, and one-line refusals of the config traps.

Needs mmsegmentation 1.2.2 + mmengine 0.10.7 + mmcv-lite 2.1.0 (the `segment` extra); without
them the mmseg-dependent tests skip with that reason. Budget: about a minute on 2 idle cores.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from mocobench.errors import UserError
from mocobench.mmseg_compat import check_plain_resnet

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "segmentation" / "demo_fcn_r18_d8_scenes.py"
VOC = ROOT / "configs" / "segmentation" / "fcn_r50_d8_voc12aug_512x512_20k.py"
CITYSCAPES = ROOT / "configs" / "segmentation" / "fcn_r50_d8_cityscapes_769x769_40k.py"

needs_mmseg = pytest.mark.skipif(
    importlib.util.find_spec("mmseg") is None or importlib.util.find_spec("mmengine") is None,
    reason="MMSegmentation not installed: pip install mmsegmentation==1.2.2 mmengine==0.10.7 "
           "mmcv-lite==2.1.0 ftfy regex")


# ----------------------------------------------------------------------------- fixtures

def _moco_checkpoint(path, arch="resnet18", seed=0, drop=()):
    """A pretrain checkpoint in the suite's contract format (pretrain/train.py save_checkpoint):
    query and key encoders, MLP head, queue. BN statistics are randomised so that a buffer
    left at its initial value would show."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    q = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    dim = model.fc.in_features
    q.update({"fc.0.weight": torch.randn(dim, dim), "fc.0.bias": torch.randn(dim),
              "fc.2.weight": torch.randn(128, dim), "fc.2.bias": torch.randn(128)})
    sd = {f"encoder_q.{k}": v for k, v in q.items() if not any(k.startswith(d) for d in drop)}
    sd.update({f"encoder_k.{k}": v + 1 for k, v in q.items()})
    sd.update(queue=torch.randn(128, 64), queue_ptr=torch.zeros(1, dtype=torch.long))
    torch.save({"format": "moco-bench.pretrain/1", "arch": arch, "method": "moco_v2",
                "backbone_prefix": "encoder_q.", "epoch": 1, "epoch_step": 0, "step": 10, "state_dict": sd,
                "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                  "input_format": "RGB"},
                "image_size": 32, "config": {}, "git_sha": None, "optimizer": {}, "scaler": None,
                "rng": {}}, path)
    return {k: v for k, v in q.items() if not k.startswith("fc.")}


@pytest.fixture(scope="module")
def moco(tmp_path_factory):
    """(checkpoint path, its query-encoder backbone tensors in torchvision names)."""
    path = tmp_path_factory.mktemp("weights") / "moco_v2_r18.pth"
    return path, _moco_checkpoint(path)


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory):
    return tmp_path_factory.mktemp("scenes")


def _tiny(scenes_root, *extra):
    """A few iterations on a few scenes: the real pipeline, at smoke-test scale."""
    return [f"embedded_data.root={scenes_root}", "embedded_data.n_train=16", "embedded_data.n_val=6",
            "train_cfg.max_iters=4", "train_dataloader.batch_size=4", *extra]


# ----------------------------------------------------------------------------- config traps (no mmseg needed)

def test_plain_resnet_accepted():
    assert check_plain_resnet(dict(type="ResNet", depth=50, style="pytorch", contract_dilation=True,
                                   strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))) == 50


@pytest.mark.parametrize("cfg, match", [
    (dict(type="ResNetV1c", depth=50), r"model\.backbone\.type is 'ResNetV1c', not the plain ResNet.*deep stem"),
    (dict(type="mmseg.ResNetV1d", depth=50), r"'ResNetV1d', not the plain ResNet"),
    (dict(type="ResNeXt", depth=50), r"'ResNeXt', not the plain ResNet"),
    (dict(type="ResNet", depth=50, style="caffe"), r"style='caffe' does not fit.*set style='pytorch'"),
    (dict(type="ResNet", depth=50, deep_stem=True), r"deep_stem=True does not fit"),
    (dict(type="ResNet", depth=50, pretrained="open-mmlab://resnet50_v1c"), r"pretrained=.*set pretrained=None"),
    (dict(type="ResNet", depth=26), r"depth=26 is not one of"),
])
def test_non_plain_backbones_refused_in_one_line(cfg, match):
    with pytest.raises(UserError, match=match) as e:
        check_plain_resnet(cfg)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- mmcv route

@needs_mmseg
def test_mmcv_lite_stand_in_only_when_compiled_ops_absent(monkeypatch):
    import mmcv
    from mmengine.utils.dl_utils import mmcv_full_available

    from mocobench import mmseg_compat

    mmseg_compat.import_mmseg()
    if mmseg_compat.has_compiled_ops():  # a full mmcv: its own extension, untouched
        assert not isinstance(sys.modules["mmcv._ext"], mmseg_compat._MissingOps)
        return
    # mmcv-lite: the stand-in keeps mmengine/mmcv reporting "no compiled ops" ...
    assert not mmcv_full_available()
    # ... and a compiled op refuses in one line instead of crashing somewhere deep.
    import mmcv.ops

    with pytest.raises(UserError, match=r"mmcv op 'nms' needs mmcv's compiled extension.*mmcv-lite"):
        mmcv.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)
    # A real extension (what a full mmcv install provides) is never replaced.
    real = type(sys)("mmcv._ext")
    monkeypatch.setitem(sys.modules, "mmcv._ext", real)
    monkeypatch.setattr(mmcv, "_ext", real, raising=False)
    mmseg_compat._register_stand_in_ops()
    assert sys.modules["mmcv._ext"] is real and mmseg_compat.has_compiled_ops()
    # With nothing registered and no compiled extension on disk, the stand-in goes in.
    monkeypatch.delitem(sys.modules, "mmcv._ext")
    mmseg_compat._register_stand_in_ops()
    assert isinstance(sys.modules["mmcv._ext"], mmseg_compat._MissingOps)
    assert sys.modules["mmcv._ext"].__spec__.loader is None


# ----------------------------------------------------------------------------- weights

@needs_mmseg
def test_converted_weights_fill_every_tensor_and_gaps_are_caught(moco, tmp_path):
    import converters
    from mocobench.mmseg_compat import build_resnet_backbone, compare_backbone
    from transfer.segment import check_backbone_loaded

    path, source = moco
    out = tmp_path / "r18_mmseg.pth"
    converters.to_mmseg(converters.load_backbone(path), out, verify=False)
    # The FCN-D8 geometry: dilation changes no tensor shape, so every tensor must load.
    model = build_resnet_backbone(18, str(out), strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                                  contract_dilation=True)
    report = compare_backbone(model, source)
    assert report["checked"] == len([k for k in source if not k.endswith("num_batches_tracked")])
    assert report["missing"] == report["differ"] == report["unexpected"] == []
    assert check_backbone_loaded(model, out)["checked"] == report["checked"]

    # A file missing tensors loads through mmengine with only a logged warning (strict=False);
    # the check turns that into one line.
    obj = torch.load(out, weights_only=True)
    del obj["state_dict"]["backbone.layer4.1.bn2.running_var"]
    holed = tmp_path / "holed.pth"
    torch.save(obj, holed)
    partial = build_resnet_backbone(18, str(holed))
    with pytest.raises(UserError, match=r"backbone weights did not all come from .*holed\.pth: of \d+ backbone "
                                        r"tensors, 1 not in the checkpoint \(e\.g\. layer4\.1\.bn2\.running_var\)"):
        check_backbone_loaded(partial, holed)
    # Against the complete file, the tensor that stayed at its initial value differs.
    with pytest.raises(UserError, match=r"of \d+ backbone tensors, 1 differ from it \(e\.g\. "
                                        r"layer4\.1\.bn2\.running_var\); the model would train from partly random"):
        check_backbone_loaded(partial, out)


@needs_mmseg
def test_checkpoint_missing_backbone_keys_refused(tmp_path, scenes_root):
    from transfer.segment import run

    path = tmp_path / "moco_holed.pth"
    _moco_checkpoint(path, drop=("layer4.1.bn2.",))
    with pytest.raises(UserError, match=r"moco_holed\.pth, read as a resnet18 backbone, is missing 4 key\(s\): "
                                        r"layer4\.1\.bn2\.weight.*refusing a partial load") as e:
        run(DEMO, path, tmp_path / "out", cfg_options=_tiny(scenes_root))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "results.json").exists()


@needs_mmseg
def test_run_stops_when_a_backbone_tensor_is_not_from_the_checkpoint(moco, tmp_path, scenes_root, monkeypatch):
    """If the file the Runner loads lacks a tensor (say, a converter bug), mmengine only logs
    it; the check after init_weights stops the run before the first iteration."""
    import converters
    from transfer.segment import run

    real = converters.to_mmseg

    def lossy_to_mmseg(bb, out, verify=True):
        report = real(bb, out, verify=False)
        obj = torch.load(out, weights_only=True)
        obj["state_dict"] = {k: v for k, v in obj["state_dict"].items() if not k.startswith("backbone.conv1.")}
        torch.save(obj, out)
        return report

    monkeypatch.setattr(converters, "to_mmseg", lossy_to_mmseg)
    with pytest.raises(UserError, match=r"backbone weights did not all come from .*: of 100 backbone tensors, "
                                        r"1 not in the checkpoint \(e\.g\. conv1\.weight\)"):
        run(DEMO, moco[0], tmp_path / "out", cfg_options=_tiny(scenes_root))
    assert not (tmp_path / "out" / "results.json").exists()


# ----------------------------------------------------------------------------- CLI refusals

def _write_config(tmp_path, old, new):
    text = DEMO.read_text()
    assert old in text
    path = tmp_path / "variant.py"
    path.write_text(text.replace(old, new, 1))
    return path


@needs_mmseg
def test_cli_refuses_resnetv1c_config_in_one_line(moco, tmp_path, capsys):
    from transfer.segment import main

    config = _write_config(tmp_path, "type='ResNet',", "type='ResNetV1c',")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(config), "--weights", str(moco[0]), "--output", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.backbone.type is 'ResNetV1c', not the plain ResNet")
    assert "\n" not in err


@needs_mmseg
def test_depth_mismatch_names_the_overrides():
    from mmengine.config import Config

    from transfer.segment import check_depth

    cfg = Config.fromfile(str(VOC))
    check_depth(cfg, 50, "resnet50")
    with pytest.raises(UserError, match=r"weights are resnet18 but the config's model\.backbone\.depth=50; .*"
                                        r"--cfg-options model\.backbone\.depth=18 model\.decode_head\.in_channels=512 "
                                        r"model\.auxiliary_head\.in_channels=256"):
        check_depth(cfg, 50, "resnet18")
    with pytest.raises(UserError, match=r"weights are wide_resnet50_2; MMSegmentation's plain ResNet only takes"):
        check_depth(cfg, 50, "wide_resnet50_2")


@needs_mmseg
@pytest.mark.parametrize("config", [VOC, CITYSCAPES])
def test_published_configs_pass_the_checks_and_name_missing_data(config, moco, tmp_path):
    from mmengine.config import Config

    from transfer.segment import check_model_cfg, run, set_norm

    cfg = Config.fromfile(str(config))
    assert check_model_cfg(cfg) == 50
    b = cfg.model.backbone
    assert (b.type, b.style, b.strides, b.dilations, b.contract_dilation) == (
        "ResNet", "pytorch", (1, 2, 1, 1), (1, 1, 2, 4), True)
    assert cfg.model.data_preprocessor.bgr_to_rgb and cfg.model.data_preprocessor.std == [58.395, 57.12, 57.375]
    assert set_norm(cfg, sync=False) == "BN" and cfg.model.decode_head.norm_cfg.type == "BN"
    assert set_norm(cfg, sync=True) == "SyncBN" and cfg.model.backbone.norm_cfg.type == "SyncBN"
    with pytest.raises(UserError, match=r"does not exist: .* expects it under data_root .*; pass --data-root"):
        run(config, moco[0], tmp_path / "out", data_root=str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- end to end

@needs_mmseg
def test_demo_trains_and_evaluates_with_moco_weights_in_every_backbone_tensor(moco, tmp_path, scenes_root,
                                                                               monkeypatch):
    import transfer.segment as segment
    from transfer.results import read_results

    path, source = moco
    seen = {}
    make_hook = segment.backbone_weights_hook

    def recording_hook(converted):
        hook = make_hook(converted)
        check = hook.before_train

        def before_train(runner):
            check(runner)
            model = getattr(runner.model, "module", runner.model)
            seen.update({k: v.detach().clone() for k, v in model.backbone.state_dict().items()})

        hook.before_train = before_train
        return hook

    monkeypatch.setattr(segment, "backbone_weights_hook", recording_hook)
    out = tmp_path / "run"
    segment.main(["--config", str(DEMO), "--weights", str(path), "--output", str(out),
                  "--cfg-options", *_tiny(scenes_root)])

    # What the Runner trained from is the MoCo query encoder, tensor for tensor.
    learned = {k for k in seen if not k.endswith("num_batches_tracked")}
    assert learned == {k for k in source if not k.endswith("num_batches_tracked")}
    for k in learned:
        assert torch.equal(seen[k], source[k]), k

    r = read_results(out / "results.json")
    assert (r["task"], r["engine"], r["dataset"]["name"]) == ("segment", "mmseg", "fmnist-scenes")
    assert r["dataset"]["splits"] == {"train": 16, "test": 6}
    assert r["protocol"]["name"].endswith("max_iters=4")  # a shortened run is labelled as such
    assert r["weights"]["layout"] == "moco-bench"
    assert set(r["metrics"]) == {"mIoU", "mAcc", "aAcc"}
    assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in r["metrics"].values())
    extra = r["config"]["moco_bench"]
    assert extra["backbone_tensors_checked"] == len(learned)
    assert extra["norm"] == "BN" and extra["world_size"] == 1
    assert r["config"]["model"]["backbone"]["init_cfg"]["prefix"] == "backbone."
    assert r["config"]["param_scheduler"][0]["end"] == 4  # poly LR follows the shortened run


@needs_mmseg
def test_torchrun_two_cpu_processes(moco, tmp_path, scenes_root):
    """The pytorch launcher on CPU: gloo, BN (SyncBN needs GPUs), DDP without device_ids."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "transfer", "segment", "--launcher", "pytorch", "--config", str(DEMO), "--weights",
           str(moco[0]), "--output", str(out), "--cfg-options",
           *_tiny(scenes_root, "train_cfg.max_iters=2", "train_dataloader.batch_size=2")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    extra = r["config"]["moco_bench"]
    assert extra["world_size"] == 2 and extra["effective_batch"] == 4
    assert extra["norm"] == ("SyncBN" if torch.cuda.is_available() else "BN")
    assert math.isfinite(r["metrics"]["mIoU"])


@needs_mmseg
def test_two_runs_in_one_process_write_only_to_their_own_folders(moco, tmp_path, scenes_root,
                                                                 monkeypatch):
    """mmengine names its process-wide logger and visualizer by config name and a timestamp in
    seconds; two runs started within one second must still each write to their own folder."""
    import time

    import transfer.segment as segment

    frozen = time.localtime()
    monkeypatch.setattr(time, "localtime", lambda *args: frozen)  # mmengine's timestamp source
    path, _ = moco
    for name in ("first", "second"):
        segment.main(["--config", str(DEMO), "--weights", str(path), "--output", str(tmp_path / name),
                      "--cfg-options", *_tiny(scenes_root)])
    for name in ("first", "second"):
        assert len(list((tmp_path / name).glob("*/vis_data/config.py"))) == 1, name
        assert len(list((tmp_path / name).glob("*/*.log"))) == 1, name
