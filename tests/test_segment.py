"""transfer segment: real MMSegmentation training + IoUMetric on CPU on the embedded scenes and
on a user's own data folder, MoCo weights landing in every backbone tensor, every image and label
checked before training, per-image outcomes that sum to the run's mIoU, a full protocol record,
and one-line refusals of the config traps (more one-line cases: tests/test_one_line_errors.py).

Needs mmsegmentation 1.2.2 + mmengine 0.10.7 + mmcv-lite 2.1.0 (the `segment` extra); without
them the mmseg-dependent tests skip with that reason. Budget: about a minute on 2 idle cores.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torchvision

from mocobench.errors import UserError
from mocobench.fileio import tensor_digest
from segment_fixtures import CLASSES, DEMO, ROOT, TINY, child_config, write_dataset
from transfer.segment_config import check_plain_resnet

VOC = ROOT / "configs" / "segmentation" / "fcn_r50_d8_voc12aug_512x512_20k.py"
CITYSCAPES = ROOT / "configs" / "segmentation" / "fcn_r50_d8_cityscapes_769x769_40k.py"
OWN = ROOT / "configs" / "segmentation" / "fcn_r50_d8_own_data_512x512_20k.py"

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
    ckpt = {"format": "moco-bench.pretrain/1", "arch": arch, "method": "moco_v2",
            "backbone_prefix": "encoder_q.", "epoch": 1, "epoch_step": 0, "step": 10, "state_dict": sd,
            "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                              "input_format": "RGB"},
            "image_size": 32, "config": {}, "git_sha": None, "optimizer": {}, "scaler": None, "rng": {}}
    torch.save({**ckpt, "checksum": tensor_digest(ckpt)}, path)  # stamped as pretrain does
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

def _mmseg_resnet(depth, checkpoint, **geometry):
    """mmseg's plain ResNet built and loaded the way a segmentation run does (init_cfg Pretrained)."""
    from mmengine.logging import MMLogger
    from mmseg.registry import MODELS

    model = MODELS.build(dict(type="ResNet", depth=depth, style="pytorch", norm_cfg=dict(type="BN"),
                              init_cfg=dict(type="Pretrained", checkpoint=str(checkpoint), prefix="backbone."),
                              **geometry))
    MMLogger.get_current_instance().setLevel("WARNING")
    model.init_weights()
    return model


@needs_mmseg
def test_converted_weights_fill_every_tensor_and_gaps_are_caught(moco, tmp_path):
    import converters
    from mocobench.mmseg_compat import import_mmseg
    from mocobench.state import compare_state
    from transfer.segment import check_backbone_loaded

    import_mmseg()
    path, source = moco
    out = tmp_path / "r18_mmseg.pth"
    converters.to_mmseg(converters.load_backbone(path), out, verify=False)
    # The FCN-D8 geometry: dilation changes no tensor shape, so every tensor must load.
    model = _mmseg_resnet(18, out, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True)
    diff = compare_state(model.state_dict(), source, skip_counters=True)
    assert diff.equal and diff.checked == len([k for k in source if not k.endswith("num_batches_tracked")])
    assert check_backbone_loaded(model, out).checked == diff.checked

    # A file missing tensors loads through mmengine with only a logged warning (strict=False);
    # the check turns that into one line.
    obj = torch.load(out, weights_only=True)
    del obj["state_dict"]["backbone.layer4.1.bn2.running_var"]
    holed = tmp_path / "holed.pth"
    torch.save(obj, holed)
    partial = _mmseg_resnet(18, holed)
    with pytest.raises(UserError, match=r"weights file .*holed\.pth, compared with the backbone the Runner built, "
                                        r"is missing 1 key\(s\): layer4\.1\.bn2\.running_var; of \d+ backbone "
                                        r"tensors not all came from it") as e:
        check_backbone_loaded(partial, holed)
    assert "\n" not in str(e.value)
    # Against the complete file, the tensor that stayed at its initial value differs.
    with pytest.raises(UserError, match=r"has different values for 1 key\(s\): layer4\.1\.bn2\.running_var; "
                                        r"of \d+ backbone tensors not all came from it, so the model would train "
                                        r"from partly random weights"):
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
    with pytest.raises(UserError, match=r"weights file .*backbone_mmseg\.pth, compared with the backbone the Runner "
                                        r"built, is missing 1 key\(s\): conv1\.weight; of 100 backbone tensors"):
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

    from transfer.segment_config import check_depth

    cfg = Config.fromfile(str(VOC))
    check_depth(cfg, 50, "resnet50")
    with pytest.raises(UserError, match=r"weights are resnet18 but the config's model\.backbone\.depth=50; .*"
                                        r"--cfg-options model\.backbone\.depth=18 model\.decode_head\.in_channels=512 "
                                        r"model\.auxiliary_head\.in_channels=256"):
        check_depth(cfg, 50, "resnet18")
    with pytest.raises(UserError, match=r"weights are wide_resnet50_2; MMSegmentation's plain ResNet only takes"):
        check_depth(cfg, 50, "wide_resnet50_2")


@needs_mmseg
@pytest.mark.parametrize("config", [VOC, CITYSCAPES, OWN])
def test_published_configs_pass_the_checks_and_name_missing_data(config, moco, tmp_path):
    from mmengine.config import Config

    from transfer.segment import run
    from transfer.segment_config import check_model_cfg, set_norm

    cfg = Config.fromfile(str(config))
    assert check_model_cfg(cfg) == 50
    b = cfg.model.backbone
    assert (b.type, b.style, b.strides, b.dilations, b.contract_dilation) == (
        "ResNet", "pytorch", (1, 2, 1, 1), (1, 1, 2, 4), True)
    assert cfg.model.data_preprocessor.bgr_to_rgb and cfg.model.data_preprocessor.std == [58.395, 57.12, 57.375]
    assert set_norm(cfg, sync=False) == "BN" and cfg.model.decode_head.norm_cfg.type == "BN"
    assert set_norm(cfg, sync=True) == "SyncBN" and cfg.model.backbone.norm_cfg.type == "SyncBN"
    with pytest.raises(UserError, match=r"nowhere/\S+ does not exist: train_dataloader\.dataset\S* reads its "
                                        r"images there .*; pass --data-root"):
        run(config, moco[0], tmp_path / "out", data_root=str(tmp_path / "nowhere"))
    assert not (tmp_path / "out" / "weights").exists()  # refused before any conversion


@needs_mmseg
def test_configs_resolve_in_an_installed_copy(tmp_path):
    """After `pip install` there is no top-level configs/: the packages alone, laid out as the
    wheel lays them out (configs inside mocobench/, pyproject's package-dir), run from another
    folder, still load configs/segmentation/... (the README's and the bench configs' paths)."""
    import shutil

    site = tmp_path / "site"
    for package in ("mocobench", "transfer", "converters"):
        shutil.copytree(ROOT / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", site / "mocobench" / "configs")
    (tmp_path / "elsewhere").mkdir()
    code = ("from transfer.segment_config import load_config\n"
            "for name in ('demo_fcn_r18_d16_scenes', 'fcn_r50_d8_own_data_512x512_20k'):\n"
            "    print(load_config(f'configs/segmentation/{name}.py').filename)\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "elsewhere", env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    found = out.stdout.split()
    assert len(found) == 2 and all(f.startswith(str(site / "mocobench" / "configs" / "segmentation"))
                                   for f in found), found


@needs_mmseg
def test_own_data_config_reads_the_documented_layout(tmp_path):
    """configs/segmentation/fcn_r50_d8_own_data_512x512_20k.py on a folder laid out as
    docs/segmentation.md says: classes and num_classes from classes.txt, every pair checked."""
    from transfer.segment import prepare_data
    from transfer.segment_config import load_config

    data = write_dataset(tmp_path / "data")
    cfg = load_config(OWN, [f"{loader}.dataset.img_suffix=.png"
                            for loader in ("train_dataloader", "val_dataloader", "test_dataloader")])
    d = prepare_data(cfg, str(data))
    assert (d.source["from"], d.identity["name"]) == ("--data-root", "data")
    assert d.identity["splits"] == {"train": 4, "val": 2, "test": 2}  # VOC-style: val is the scored split
    assert d.identity["class_names"] == list(CLASSES)
    assert cfg.model.decode_head.num_classes == cfg.model.auxiliary_head.num_classes == 3


@needs_mmseg
def test_child_config_data_root_that_its_base_datasets_do_not_see_is_refused(moco, tmp_path):
    """mmengine resolves `data_root` inside the base file: a child's own data_root does not reach
    the datasets the base built, which would silently read the base's folder."""
    from transfer.segment import run

    config = tmp_path / "my_voc.py"
    config.write_text(f"_base_ = [{str(VOC)!r}]\ndata_root = {str(tmp_path / 'my_voc')!r}\n")
    with pytest.raises(UserError, match=r"the config's data_root is '.*my_voc' but train_dataloader\.dataset"
                                        r"\.datasets\[0\]\.data_root is 'data/VOCdevkit/VOC2012' \(a data_root set "
                                        r"in a child config does not reach the datasets its _base_ built\)"):
        run(config, moco[0], tmp_path / "out")


# ----------------------------------------------------------------------------- end to end

def _read_outcomes(folder):
    import numpy as np

    with np.load(folder / "outcomes.npz") as z:
        return {k: z[k] for k in z.files}


@needs_mmseg
def test_demo_trains_and_evaluates_with_moco_weights_in_every_backbone_tensor(moco, tmp_path, scenes_root,
                                                                               monkeypatch):
    import transfer.segment as segment
    from transfer.results import read_results
    from transfer.segment_eval import metrics_from_confusion

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
    assert r["weights"]["layout"] == "moco-bench"
    assert set(r["metrics"]) == {"mIoU", "mAcc", "aAcc"}
    extra = r["config"]["moco_bench"]
    assert extra["backbone_tensors_checked"] == len(learned)
    assert extra["norm"] == "BN" and extra["world_size"] == 1 and extra["pairs_checked"] == 22
    assert r["config"]["model"]["backbone"]["init_cfg"]["prefix"] == "backbone."
    assert r["config"]["param_scheduler"][0]["end"] == 4  # poly LR follows the shortened run

    # The protocol is the resolved run: a shortened run says so, and the defining values are there.
    p = r["protocol"]
    assert p["name"].startswith("demo_fcn_r18_d16") and "train_cfg.max_iters=4" in p["name"]
    assert "embedded_data.root" not in p["name"]  # where the files are changes no number
    assert (p["schedule"]["max_iters"], p["schedule"]["effective_batch"]) == (4, 4)
    assert p["schedule"]["optimizer"]["lr"] == r["config"]["optim_wrapper"]["optimizer"]["lr"]
    assert p["input"]["crop_size"] == [96, 96] and p["dataset"]["splits"] == {"train": 16, "test": 6}
    assert p["dataset"]["class_names"][0] == "background" and p["dataset"]["classes"] == 11
    assert set(p["metric"]) == {"mIoU", "mAcc", "aAcc"} and "IoUMetric" in p["metric"]["mIoU"]
    assert (p["model"]["decode_head"]["type"], p["model"]["norm"]) == ("FCNHead", "BN")
    assert "in_channels" not in p["model"]["decode_head"]  # follows the weights' depth, not the protocol

    # One confusion matrix per test image; summed, they give mmseg IoUMetric's numbers.
    o = _read_outcomes(out)
    assert r["outcomes"] == {"kind": "segmentation", "files": ["outcomes.npz"]}
    assert o["confusion"].shape == (6, 11, 11) and list(o["classes"]) == p["dataset"]["class_names"]
    assert sorted(o["ids"]) == [f"{i:06d}.png" for i in range(16, 22)]
    assert o["confusion"].sum() == 6 * 128 * 128  # every pixel of every test scene, none ignored
    summed = metrics_from_confusion(o["confusion"])
    for k in ("mIoU", "mAcc", "aAcc"):
        assert abs(summed[k] - r["metrics"][k]) <= 0.005 + 1e-9, (k, summed[k], r["metrics"][k])

    # A failed re-run into the same folder leaves nothing for report to read.
    with pytest.raises(SystemExit):
        segment.main(["--config", str(DEMO), "--weights", str(path), "--output", str(out),
                      "--cfg-options", *_tiny(scenes_root), "model.decode_head.num_classes=5"])
    assert not (out / "results.json").exists() and (out / "results.previous.json").exists()


@needs_mmseg
def test_per_image_confusion_matches_iou_metric_on_random_maps():
    """The per-image matrices reproduce mmseg's IoUMetric exactly, ignore label included."""
    import numpy as np
    from mmseg.evaluation import IoUMetric

    from transfer.segment_eval import PerImageIoUMetric, metrics_from_confusion

    rng = np.random.default_rng(0)
    samples = []
    for _ in range(7):
        label = torch.as_tensor(rng.integers(0, 4, (1, 20, 30)))
        label[0, :3] = 255
        pred = torch.where(torch.as_tensor(rng.random((1, 20, 30)) < 0.6), label.clamp(max=3),
                           torch.as_tensor(rng.integers(0, 4, (1, 20, 30))))
        samples.append({"pred_sem_seg": {"data": pred}, "gt_sem_seg": {"data": label}, "img_path": f"{_}.png"})
    ours, theirs = PerImageIoUMetric(), IoUMetric()
    for m in (ours, theirs):
        m.dataset_meta = {"classes": ("a", "b", "c", "d")}
        m.process({}, samples)
    got, want = ours.compute_metrics(ours.results), theirs.compute_metrics(theirs.results)
    assert got == want
    ids, confusion = ours.per_image
    assert ids == [f"{i}.png" for i in range(7)] and confusion.shape == (7, 4, 4)
    assert confusion.sum() == 7 * 17 * 30  # the 3 ignored rows of each map are not counted
    summed = metrics_from_confusion(confusion)
    assert all(abs(summed[k] - want[k]) < 0.005 + 1e-9 for k in want)


@needs_mmseg
def test_own_data_root_in_a_child_config_is_the_data_trained_and_scored(tmp_path, scenes_root):
    """A user's config built on the demo, with its own data_root: the run reads that folder (not
    the embedded scenes), takes its class list, and names the data after it."""
    from transfer.segment import run

    data = write_dataset(tmp_path / "my shapes")  # a space in the path, as users have
    config = child_config(tmp_path / "my_config.py", f"data_root = {str(data)!r}")
    embedded = tmp_path / "embedded-cache"
    r = run(config, "random", tmp_path / "out", arch="resnet18",
            cfg_options=[f"embedded_data.root={embedded}", *TINY])
    assert not embedded.exists()  # the demo's scenes were never written, let alone read
    assert (r["dataset"]["name"], r["dataset"]["root"], r["dataset"]["from"]) == ("my shapes", str(data), "config")
    assert r["dataset"]["splits"] == {"train": 4, "test": 2}
    assert r["dataset"]["class_names"] == list(CLASSES)  # from the data's classes.txt
    assert r["config"]["model"]["decode_head"]["num_classes"] == 3  # follows the class list
    assert r["weights"]["label"] == "random init (resnet18, seed 0)" and r["weights"]["sha256"] is None
    o = _read_outcomes(tmp_path / "out")
    assert sorted(o["ids"]) == ["val_0.png", "val_1.png"] and o["confusion"].shape == (2, 3, 3)
    # The disc's border ring is labelled 255: ignored, as the metric's ignore label.
    from segment_fixtures import scene
    import numpy as np

    _, label = scene(np.random.default_rng(1), (40, 48))
    assert o["confusion"].sum() == 2 * 40 * 48 - 2 * int((label == 255).sum())


@needs_mmseg
def test_same_data_elsewhere_keeps_its_fingerprint_and_other_data_does_not(tmp_path):
    from mmengine.config import Config

    from transfer import segment_data as sd

    def identity(root, **kwargs):
        write_dataset(root, **kwargs)
        cfg = Config.fromfile(str(child_config(tmp_path / "c.py", f"data_root = {str(root)!r}")))
        source = sd.resolve_data_root(cfg)
        sd.apply_class_list(cfg, source)
        return sd.dataset_identity(sd.dataset_name(cfg, source), sd.read_splits(cfg))

    a, moved, other = identity(tmp_path / "a"), identity(tmp_path / "b"), identity(tmp_path / "c", n_test=3)
    assert a["fingerprint"] == moved["fingerprint"] and a["name"] != moved["name"]
    assert other["fingerprint"] != a["fingerprint"] and other["splits"] == {"train": 4, "test": 3}


def _save_16bit(path, kind):
    import cv2
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 65535, 40 * 48).reshape(40, 48).astype(np.uint16)
    if kind == "gray16-pil":
        Image.fromarray(ramp).save(path)  # PIL mode I;16
    else:  # OpenCV writes 16-bit grey and 48-bit colour PNG and TIFF
        cv2.imwrite(str(path), ramp if kind == "gray16" else np.dstack([ramp, ramp[::-1], ramp[:, ::-1]]))


@needs_mmseg
@pytest.mark.parametrize("suffix, kind", [(".png", "gray16-pil"), (".png", "rgb48"), (".tif", "gray16"),
                                          (".tif", "rgb48")])
def test_16_bit_images_are_refused_before_training(suffix, kind, tmp_path):
    """mmseg's decoders misread them (OpenCV keeps the top 8 bits, Pillow's RGB conversion
    turns 16-bit grey white): refused, naming the file, before anything is converted or trained."""
    from transfer.segment import run

    from PIL import Image

    data = write_dataset(tmp_path / "data")
    if suffix != ".png":  # the same 8-bit images as TIFF
        for p in (data / "img_dir").rglob("*.png"):
            Image.open(p).save(p.with_suffix(suffix))
            p.unlink()
    _save_16bit(data / "img_dir" / "val" / f"val_1{suffix}", kind)  # one 16-bit image among 8-bit ones
    lines = [f"data_root = {str(data)!r}"]
    if suffix != ".png":
        lines += ["train_dataloader = dict(dataset=dict(img_suffix='.tif'))",
                  "test_dataloader = dict(dataset=dict(img_suffix='.tif'))"]
    config = child_config(tmp_path / "c.py", *lines)
    with pytest.raises(UserError, match=rf"val_1\{suffix} is not an 8-bit image \(PIL mode .*\): MMSegmentation "
                                        r"would read it wrongly .*convert the images to 8-bit") as e:
        run(config, "random", tmp_path / "out", arch="resnet18", cfg_options=TINY)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "weights").exists()


@needs_mmseg
def test_label_values_are_checked_as_mmseg_reads_them(tmp_path):
    """reduce_zero_label shifts ids down by one (0 becomes ignore), so raw value 3 is class 2 of
    three; 255 is the ignore label either way; anything else the heads cannot predict is refused."""
    import numpy as np
    from mmengine.config import Config
    from PIL import Image

    from transfer import segment_data as sd

    data = write_dataset(tmp_path / "data")
    label = data / "ann_dir" / "train" / "train_2.png"
    values = np.asarray(Image.open(label)).copy()
    values[values == 2] = 3
    Image.fromarray(values).save(label)

    def check(*lines):
        cfg = Config.fromfile(str(child_config(tmp_path / "c.py", f"data_root = {str(data)!r}", *lines)))
        sd.apply_class_list(cfg, sd.resolve_data_root(cfg))
        return sd.check_files(sd.read_splits(cfg))

    with pytest.raises(UserError, match=r"train_2\.png holds value\(s\) \[3\] that are not class ids 0\.\.2 "
                                        r"nor the ignore label 255; fix the labels"):
        check()
    reduce = ["train_dataloader = dict(dataset=dict(reduce_zero_label=True))",
              "test_dataloader = dict(dataset=dict(reduce_zero_label=True))"]
    assert check(*reduce) == 6  # every pair checked: 0 -> ignore, 1..3 -> classes 0..2
    values[0, 0] = 4
    Image.fromarray(values).save(label)
    with pytest.raises(UserError, match=r"holds value\(s\) \[4\] .* \(after reduce_zero_label\)"):
        check(*reduce)


@needs_mmseg
def test_a_second_run_into_a_locked_folder_is_refused(tmp_path, capsys):
    """The output folder is locked for the run (mocobench.fileio.prepare_output)."""
    from transfer.segment import main

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mocobench.fileio import prepare_output; "
         f"prepare_output({str(out)!r}, 'x'); print('locked', flush=True); time.sleep(120)"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as e:  # (refused before the data; nothing would be there to read)
            main(["--config", str(DEMO), "--weights", "random", "--arch", "resnet18", "--output", str(out),
                  "--data-root", str(tmp_path / "no data")])
        assert e.value.code == 2
        assert re.search(rf"is in use by pid {holder.pid} .*choose another output folder",
                         capsys.readouterr().err)
    finally:
        holder.kill()
        holder.wait()


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
    assert r["protocol"]["schedule"]["world_size"] == 2
    # Each rank scored half the test scenes; rank 0 wrote all of them, once each.
    from transfer.segment_eval import metrics_from_confusion

    o = _read_outcomes(out)
    assert sorted(o["ids"]) == [f"{i:06d}.png" for i in range(16, 22)]
    assert abs(metrics_from_confusion(o["confusion"])["mIoU"] - r["metrics"]["mIoU"]) <= 0.005 + 1e-9


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
