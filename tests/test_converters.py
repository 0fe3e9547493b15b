"""converters: every input layout -> every output format, exact keys and values, round trips,
one-line errors, and numeric equivalence in real Detectron2 / MMSegmentation where installed."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from mocobench.errors import UserError
from converters import build_resnet, load_backbone, read_checkpoint, to_detectron2, to_mmseg, to_torchvision
from converters import archs
from converters.reader import Placeholder
from mocobench.fileio import PRETRAIN_CHECKPOINT_FORMAT as PRETRAIN_FORMAT
from converters.names import d2_to_tv, tv_to_d2

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["resnet18", "resnet50"]


# ----------------------------------------------------------------------------- fixtures

def _random_resnet(arch, seed):
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)()
    for m in model.modules():  # non-trivial BN statistics, so a dropped buffer would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


@pytest.fixture(scope="module", params=ARCHS)
def source(request):
    """(arch, torchvision state dict with fc) of a randomly initialised model."""
    return request.param, _random_resnet(request.param, seed=ARCHS.index(request.param))


def _momentum(sd):
    # A different value everywhere, stored as a 1-element view so files stay small.
    return {k: torch.full((), 7.0, dtype=v.dtype).expand(v.shape) for k, v in sd.items()}


def _backbone(sd):
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def _mlp_head(sd, prefix):
    dim = sd["fc.weight"].shape[1]
    return {f"{prefix}0.weight": torch.randn(dim, dim), f"{prefix}0.bias": torch.randn(dim),
            f"{prefix}2.weight": torch.randn(128, dim), f"{prefix}2.bias": torch.randn(128)}


def _queue():
    return {"queue": torch.randn(128, 64), "queue_ptr": torch.zeros(1, dtype=torch.long)}


def _official_moco_pkl(sd):
    """What facebookresearch/moco detection/convert-pretrain-to-detectron2.py writes:
    stem.fc junk kept, num_batches_tracked kept, __author__ MOCO."""
    newmodel = {}
    for k, v in sd.items():
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in [1, 2, 3]:
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        newmodel[k] = v.numpy()
    return {"model": newmodel, "__author__": "MOCO", "matching_heuristics": True}


def write_layout(layout, arch, sd, path: Path) -> Path:
    """Write `sd` (torchvision names, with fc) in one of the supported input layouts."""
    q = {**_backbone(sd), **_mlp_head(sd, "fc.")}  # MoCo v2 head
    if layout == "moco-bench":
        obj = {"format": PRETRAIN_FORMAT, "arch": arch, "method": "moco_v2", "backbone_prefix": "encoder_q.",
               "epoch": 3, "step": 30, "image_size": 32,
               "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "input_format": "RGB"},
               "state_dict": {**{f"encoder_q.{k}": v for k, v in q.items()},
                              **{f"encoder_k.{k}": v for k, v in _momentum(q).items()}, **_queue()},
               "config": {"lr": 0.03}, "git_sha": None, "optimizer": {}, "scaler": None, "rng": {}}
    elif layout == "moco-official-v1":
        obj = {"epoch": 200, "arch": arch, "optimizer": {},
               "state_dict": {**{f"module.encoder_q.{k}": v for k, v in sd.items()},
                              **{f"module.encoder_k.{k}": v for k, v in _momentum(sd).items()},
                              **{f"module.{k}": v for k, v in _queue().items()}}}
    elif layout == "moco-official-v2":
        obj = {"epoch": 200, "arch": arch, "optimizer": {},
               "state_dict": {**{f"module.encoder_q.{k}": v for k, v in q.items()},
                              **{f"module.encoder_k.{k}": v for k, v in _momentum(q).items()},
                              **{f"module.{k}": v for k, v in _queue().items()}}}
    elif layout == "openselfsup":
        obj = {"meta": {"epoch": 200},
               "state_dict": {**{f"encoder_q.0.{k}": v for k, v in _backbone(sd).items()},
                              **_mlp_head(sd, "encoder_q.1.mlp."),
                              **{f"encoder_k.0.{k}": v for k, v in _momentum(_backbone(sd)).items()},
                              **_queue()}}
    elif layout == "mmselfsup":
        obj = {"meta": {"epoch": 200, "mmselfsup_version": "1.0.0"},
               "state_dict": {**{f"backbone.{k}": v for k, v in _backbone(sd).items()},
                              **_mlp_head(sd, "neck.mlp."),
                              **{f"momentum_encoder.module.backbone.{k}": v
                                 for k, v in _momentum(_backbone(sd)).items()},
                              **{f"head.{k}": v for k, v in _queue().items()}}}
    elif layout == "torchvision":
        obj = sd
    elif layout == "torchvision-module":
        obj = {f"module.{k}": v for k, v in sd.items()}
    elif layout == "torchvision-state_dict":
        obj = {"state_dict": sd, "epoch": 90}
    elif layout == "torchvision-model":
        obj = {"model": {f"module.{k}": v for k, v in sd.items()}}
    elif layout == "torchvision-legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
        return path
    elif layout == "detectron2-moco":
        path = path.with_suffix(".pkl")
        with open(path, "wb") as f:
            pickle.dump(_official_moco_pkl(sd), f)
        return path
    else:
        raise AssertionError(layout)
    torch.save(obj, path)
    return path


LAYOUTS = {  # test layout -> the layout name load_backbone reports
    "moco-bench": "moco-bench", "moco-official-v1": "moco-official", "moco-official-v2": "moco-official",
    "openselfsup": "mmselfsup", "mmselfsup": "mmselfsup", "torchvision": "torchvision",
    "torchvision-module": "torchvision", "torchvision-state_dict": "torchvision",
    "torchvision-model": "torchvision", "torchvision-legacy": "torchvision",
    "detectron2-moco": "detectron2",
}


def _assert_same_backbone(got: dict, sd: dict, counters=True):
    want = _backbone(sd)
    assert list(got) == list(want)
    for k, v in want.items():
        if k.endswith("num_batches_tracked") and not counters:
            continue
        assert torch.equal(torch.as_tensor(got[k]), v), k


# ----------------------------------------------------------------------------- loading

@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_loads_the_query_backbone(layout, source, tmp_path):
    arch, sd = source
    path = write_layout(layout, arch, sd, tmp_path / "ckpt.pth")
    bb = load_backbone(path)
    assert (bb.arch, bb.layout) == (arch, LAYOUTS[layout])
    _assert_same_backbone(bb.state_dict, sd, counters=layout != "detectron2-moco")
    dropped = bb.meta["dropped"]
    if layout.startswith(("moco", "openselfsup", "mmselfsup")):
        assert {"head", "momentum encoder", "queue"} <= set(dropped)
        assert len(dropped["momentum encoder"]) >= len(_backbone(sd))
    if layout == "moco-bench":
        assert bb.meta["normalization"]["mean"] == [0.5, 0.5, 0.5] and bb.meta["arch_from"] == "file"
    if layout == "detectron2-moco":  # the official converter's stem.fc junk is recognised as head
        assert sorted(dropped["head"]) == ["stem.fc.bias", "stem.fc.weight"]
    model = build_resnet(bb).eval()
    assert isinstance(model.fc, torch.nn.Identity)
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 32, 32))
    assert feats.shape == (1, 512 if arch == "resnet18" else 2048)


@pytest.mark.parametrize("arch", list(archs.ARCHS))
def test_arch_is_inferred_for_every_torchvision_resnet(arch):
    with torch.device("meta"):
        sd = getattr(torchvision.models, arch)().state_dict()
    assert archs.infer_arch(_backbone(sd)) == arch


def test_names_round_trip_for_every_key():
    for arch in archs.ARCHS:
        for k in archs.expected_shapes(arch):
            assert d2_to_tv(tv_to_d2(k)) == k
    assert tv_to_d2("fc.weight") is None and d2_to_tv("stem.fc.weight") is None


# ----------------------------------------------------------------------------- writing

@pytest.mark.parametrize("layout", ["moco-official-v2", "openselfsup", "torchvision-module", "detectron2-moco"])
def test_every_output_has_exact_keys_and_values(layout, source, tmp_path):
    arch, sd = source
    bb = load_backbone(write_layout(layout, arch, sd, tmp_path / "in.pth"))
    counters = layout != "detectron2-moco"

    report = to_detectron2(bb, tmp_path / "out.pkl", verify=False)
    with open(tmp_path / "out.pkl", "rb") as f:
        d2 = pickle.load(f)
    assert d2["__author__"] == "moco-bench" and d2["matching_heuristics"] is True
    want = {tv_to_d2(k): v for k, v in _backbone(sd).items() if not k.endswith("num_batches_tracked")}
    assert set(d2["model"]) == set(want) and report["keys"] == len(want)
    assert not any(k.startswith("stem.fc") for k in d2["model"])
    for k, v in want.items():
        assert isinstance(d2["model"][k], np.ndarray) and np.array_equal(d2["model"][k], v.numpy()), k
    assert d2["meta"]["detectron2_settings"]["MODEL.RESNETS.STRIDE_IN_1X1"] is False

    to_mmseg(bb, tmp_path / "out_mmseg.pth", verify=False)
    mm = torch.load(tmp_path / "out_mmseg.pth", weights_only=True)
    assert mm["meta"]["mmseg_backbone"]["type"] == "ResNet"
    _assert_same_backbone({k[len("backbone."):]: v for k, v in mm["state_dict"].items()}, sd, counters)

    to_torchvision(bb, tmp_path / "out_tv.pth", verify=False)
    tv = torch.load(tmp_path / "out_tv.pth", weights_only=True)
    _assert_same_backbone(tv, sd, counters)
    result = getattr(torchvision.models, arch)().load_state_dict(tv, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


def test_round_trip_torchvision_detectron2_torchvision_is_identity(source, tmp_path):
    arch, sd = source
    bb = load_backbone(write_layout("torchvision", arch, sd, tmp_path / "tv.pth"))
    to_detectron2(bb, tmp_path / "d2.pkl", verify=False)
    back = load_backbone(tmp_path / "d2.pkl")
    assert (back.layout, back.arch, back.meta["author"]) == ("detectron2", arch, "moco-bench")
    to_torchvision(back, tmp_path / "tv2.pth", verify=False)
    again = torch.load(tmp_path / "tv2.pth", weights_only=True)
    assert set(again) == set(_backbone(sd))
    for k, v in _backbone(sd).items():  # fresh models: num_batches_tracked is 0 on both sides
        assert torch.equal(again[k], v) and again[k].dtype == v.dtype, k


def test_cli_prints_mapping_table(tmp_path, capsys):
    from converters.__main__ import main

    src = write_layout("moco-official-v2", "resnet18", _random_resnet("resnet18", 0), tmp_path / "m.pth.tar")
    main(["detectron2", str(src), str(tmp_path / "out.pkl"), "--no-verify"])
    out = capsys.readouterr().out
    for text in ("moco-official layout, resnet18", "dropped: head", "dropped: momentum encoder",
                 "dropped: queue", "output keys (detectron2)", "100"):
        assert text in out


# ----------------------------------------------------------------------------- refusals

def _tv_file(tmp_path, sd=None, name="tv.pth"):
    sd = sd if sd is not None else _random_resnet("resnet18", 0)
    torch.save(sd, tmp_path / name)
    return tmp_path / name


def test_unknown_layout_lists_prefixes_and_layouts(tmp_path):
    torch.save({"state_dict": {"trunk.stem.0.weight": torch.zeros(1), "trunk.blocks.1.w": torch.zeros(1)}},
               tmp_path / "x.pth")
    with pytest.raises(UserError, match=r"no ResNet backbone in a supported layout \(key prefixes found: "
                                        r"trunk\.blocks\., trunk\.stem\.\); supported: moco-bench") as e:
        load_backbone(tmp_path / "x.pth")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cut", [0, 100, 0.5])
def test_truncated_checkpoint_is_one_line(tmp_path, cut):
    data = _tv_file(tmp_path).read_bytes()
    bad = tmp_path / "bad.pth"
    bad.write_bytes(data[: int(cut if cut >= 1 else len(data) * cut)])
    with pytest.raises(UserError, match=rf"checkpoint {bad} is truncated or corrupt \(.*\); re-download") as e:
        load_backbone(bad)
    assert "\n" not in str(e.value)


def test_truncated_pickle_is_one_line(tmp_path):
    sd = _random_resnet("resnet18", 0)
    data = pickle.dumps(_official_moco_pkl(sd))
    (tmp_path / "bad.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_backbone(tmp_path / "bad.pkl")


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"checkpoint .*nope.pth not found"):
        load_backbone(tmp_path / "nope.pth")
    with pytest.raises(UserError, match=r"cannot read checkpoint .*nope.pth \(No such file or directory\)"):
        read_checkpoint(tmp_path / "nope.pth")  # the public reader on its own, too
    with pytest.raises(UserError, match=rf"cannot read checkpoint {tmp_path} \(Is a directory\)"):
        read_checkpoint(tmp_path)


def test_explicit_arch_must_match(tmp_path):
    path = _tv_file(tmp_path)
    assert load_backbone(path, arch="resnet18").meta["arch_from"] == "argument"
    with pytest.raises(UserError, match="holds a resnet18 backbone, not resnet34; drop --arch or pass --arch resnet18"):
        load_backbone(path, arch="resnet34")
    with pytest.raises(UserError, match="unknown arch 'resnet19'"):
        load_backbone(path, arch="resnet19")


def test_partial_or_misshapen_backbone_is_refused(tmp_path):
    as_r18 = "read as a resnet18 backbone,"
    sd = _random_resnet("resnet18", 0)
    del sd["layer3.1.bn2.running_var"]
    with pytest.raises(UserError, match=rf"{as_r18} is missing 1 key\(s\): layer3.1.bn2.running_var; refusing"):
        load_backbone(_tv_file(tmp_path, sd))
    sd = _random_resnet("resnet18", 0)
    sd["conv1.weight"] = torch.zeros(64, 4, 7, 7)
    with pytest.raises(UserError, match=rf"{as_r18} has wrong shapes for 1 key\(s\): conv1.weight; refusing"):
        load_backbone(_tv_file(tmp_path, sd))
    sd = _random_resnet("resnet18", 0)
    sd["layer1.0.se.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match=rf"{as_r18} has unexpected 1 key\(s\): layer1.0.se.weight; refusing"):
        load_backbone(_tv_file(tmp_path, sd))
    sd = _random_resnet("resnet18", 0)
    sd["attnpool.proj.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="that no torchvision ResNet has: attnpool.proj.weight; is this a ResNet"):
        load_backbone(_tv_file(tmp_path, sd))


def test_pickled_objects_load_as_inert_placeholders(tmp_path):
    import argparse

    sd = _random_resnet("resnet18", 0)
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.03, root=Path("/data/a b"))}, tmp_path / "ns.pth")
    payload = _official_moco_pkl(sd)
    payload["cfg"] = argparse.Namespace(lr=0.03)
    with open(tmp_path / "ns.pkl", "wb") as f:
        pickle.dump(payload, f)
    for name in ("ns.pth", "ns.pkl"):
        bb = load_backbone(tmp_path / name)  # no --allow-pickle needed: making an object runs nothing
        assert bb.arch == "resnet18"
        assert bb.meta["pickle"] == {"outside_allow_list": ["argparse.Namespace"], "ran_code": False}
    args = read_checkpoint(tmp_path / "ns.pth").obj["args"]
    assert isinstance(args, Placeholder) and args.pickled_global == "argparse.Namespace"
    assert args.pickled_state == {"lr": 0.03, "root": Path("/data/a b")}  # its data is kept, inert


class _RunsCode:
    """What a malicious checkpoint holds: unpickling it calls os.system (posix.system)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _code_running_files(tmp_path, sd):
    marker = tmp_path / "code ran"
    torch.save({"state_dict": sd, "hook": _RunsCode(marker)}, tmp_path / "evil.pth")
    payload = _official_moco_pkl(sd)
    payload["hook"] = _RunsCode(marker)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(payload, f)
    # The call's result need not be kept: called, then popped, before the real payload.
    cmd = f"touch '{marker}'".encode()
    with open(tmp_path / "popped.pkl", "wb") as f:
        f.write(b"\x80\x02cposix\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R0"
                + pickle.dumps(_official_moco_pkl(sd), protocol=2)[2:])
    return marker, ["evil.pth", "evil.pkl", "popped.pkl"]


def test_a_code_running_pickle_is_named_and_never_runs_without_the_flag(tmp_path):
    sd = _random_resnet("resnet18", 0)
    marker, names = _code_running_files(tmp_path, sd)
    with open(tmp_path / "popped.pkl", "rb") as f:
        pickle.load(f)
    assert marker.exists()  # the files really run code when Python's pickle loads them
    for name in names:
        marker.unlink(missing_ok=True)
        with pytest.raises(UserError, match=rf"checkpoint {tmp_path / name} would run code when loaded: its pickle "
                                            r"calls posix.system; nothing was run\. .*--allow-pickle") as e:
            load_backbone(tmp_path / name)
        assert "\n" not in str(e.value) and "corrupt" not in str(e.value)
        assert not marker.exists()
        bb = load_backbone(tmp_path / name, allow_pickle=True)  # the user's informed choice: it runs
        assert marker.exists() and bb.meta["pickle"]["ran_code"] is True
        _assert_same_backbone(bb.state_dict, sd, counters=name == "evil.pth")


class _CustomTensor(torch.Tensor):
    """A tensor type only its own code can rebuild."""


def test_tensors_only_code_can_rebuild_need_the_flag(tmp_path):
    sd = _random_resnet("resnet18", 0)
    sd["conv1.weight"] = sd["conv1.weight"].as_subclass(_CustomTensor)
    torch.save(sd, tmp_path / "sub.pth")
    with pytest.raises(UserError, match=r"holds objects that only their own code can rebuild \([\w.]*_CustomTensor: .*"
                                        r"nothing was run\. If you trust the file, pass --allow-pickle"):
        load_backbone(tmp_path / "sub.pth")
    bb = load_backbone(tmp_path / "sub.pth", allow_pickle=True)
    assert bb.meta["pickle"]["ran_code"] and torch.equal(bb.state_dict["conv1.weight"], sd["conv1.weight"])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_archive_is_named(tmp_path):
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "scripted.pt"))
    for allow in (False, True):
        with pytest.raises(UserError, match=r"is a TorchScript archive \(torch.jit.save\).*model.state_dict\(\)"):
            load_backbone(tmp_path / "scripted.pt", allow_pickle=allow)


def test_a_pickled_whole_model_is_named(tmp_path):
    torch.save(torchvision.models.resnet18(), tmp_path / "model.pth")
    with pytest.raises(UserError, match=r"holds a pickled torchvision.models.resnet.ResNet object, not a dict of "
                                        r"tensors; save its state_dict\(\)"):
        load_backbone(tmp_path / "model.pth")


def test_a_checkpoint_saved_on_gpus_reads_on_a_cpu(tmp_path, monkeypatch):
    import torch.serialization

    sd = _random_resnet("resnet18", 0)
    with monkeypatch.context() as m:  # what torch.save records for tensors that live on a GPU
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"state_dict": sd}, tmp_path / "gpu.pth")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # the file really says cuda:0
            torch.load(tmp_path / "gpu.pth", weights_only=True)
    bb = load_backbone(tmp_path / "gpu.pth")
    assert bb.state_dict["conv1.weight"].device.type == "cpu"
    _assert_same_backbone(bb.state_dict, sd)


def _mmselfsup_1x_checkpoint(sd, path):
    """What an mmselfsup 1.x (mmengine Runner) checkpoint holds: meta, state_dict and a REAL
    MessageHub's state (HistoryBuffers with numpy arrays and numpy scalars), plus the MessageHub
    itself as older mmengine runs saved it."""
    from mmengine.logging import MessageHub

    hub = MessageHub.get_instance("moco-bench-test")
    for step in range(3):
        hub.update_scalar("train/loss", np.float32(6.0 - step))
        hub.update_scalar("train/lr", np.float64(0.03))
    hub.update_info("iter", np.int64(300))
    obj = {"meta": {"epoch": 200, "iter": 250200, "seed": np.int64(0), "mmengine_version": "0.10.7",
                    "cfg": "model = dict(type='MoCo')", "dataset_meta": {"classes": ("a", "b")}},
           "state_dict": {**{f"backbone.{k}": v for k, v in _backbone(sd).items()}, **_mlp_head(sd, "neck.mlp.")},
           "message_hub": hub.state_dict(), "message_hub_object": hub,
           "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(0.03), "params": [0, 1]}]},
           "param_schedulers": [{"T_max": 200, "eta_min": 0.0}]}
    torch.save(obj, path)
    return path


def test_mmselfsup_1x_checkpoint_with_a_real_message_hub_converts_running_nothing(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mmengine", reason="mmengine not installed (pip install mmengine==0.10.7)")
    from mmengine.logging import HistoryBuffer, MessageHub

    from converters.__main__ import main

    sd = _random_resnet("resnet18", 0)
    path = _mmselfsup_1x_checkpoint(sd, tmp_path / "mmselfsup_1x.pth")
    marker = tmp_path / "mmengine code ran"

    def setstate(self, state):  # what unpickling these objects for real calls
        marker.touch()

    monkeypatch.setattr(HistoryBuffer, "__setstate__", setstate)
    monkeypatch.setattr(MessageHub, "__setstate__", setstate, raising=False)
    torch.load(path, weights_only=False)
    assert marker.exists()  # the marker works: Python's pickle runs mmengine's code
    marker.unlink()

    bb = load_backbone(path)
    assert not marker.exists()  # nothing of mmengine ran
    assert (bb.layout, bb.arch, bb.meta["pickle"]["ran_code"]) == ("mmselfsup", "resnet18", False)
    assert {"mmengine.logging.history_buffer.HistoryBuffer", "mmengine.logging.message_hub.MessageHub"} \
        <= set(bb.meta["pickle"]["outside_allow_list"])
    _assert_same_backbone(bb.state_dict, sd)
    main(["detectron2", str(path), str(tmp_path / "out.pkl"), "--no-verify"])
    assert "inert placeholders (mmengine.logging.history_buffer.HistoryBuffer" in capsys.readouterr().out
    assert load_backbone(tmp_path / "out.pkl").arch == "resnet18"
    assert not marker.exists()
    hub = read_checkpoint(path).obj["message_hub"]["log_scalars"]["train/loss"]
    assert list(hub.pickled_state["_log_history"]) == [6.0, 5.0, 4.0]  # its data is there, inert


def test_writer_refusals_leave_no_file(tmp_path, monkeypatch):
    bb = load_backbone(_tv_file(tmp_path))
    with pytest.raises(UserError, match=r"must end in \.pkl"):
        to_detectron2(bb, tmp_path / "out.pth")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.wide_resnet50_2().state_dict().items()}
    wide = {k: torch.zeros(s, dtype=torch.long if k.endswith("tracked") else torch.float) for k, s in shapes.items()}
    with pytest.raises(UserError, match="MMSegmentation's plain ResNet has no grouped or widened blocks"):
        to_mmseg(load_backbone(_tv_file(tmp_path, wide, "wide.pth")), tmp_path / "wide_mmseg.pth")

    import converters.writers as writers

    real = writers.detectron2_state_dict
    monkeypatch.setattr(writers, "detectron2_state_dict",
                        lambda b: {k: v for k, v in real(b).items() if k != "res4.1.conv2.weight"})
    with pytest.raises(UserError, match=r"Detectron2 file for resnet18 is missing 1 key\(s\): res4.1.conv2.weight; "
                                        r"refusing to write it"):
        to_detectron2(bb, tmp_path / "partial.pkl", verify=False)
    assert not (tmp_path / "partial.pkl").exists()
    assert not list(tmp_path.glob(".partial.pkl*"))


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "converters", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_cli_errors_are_one_line_exit_2(tmp_path):
    data = _tv_file(tmp_path).read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    torch.save({"blobs": {"conv1_w": torch.zeros(1)}}, tmp_path / "caffe.pth")
    for bad, text in (("cut.pth", "is truncated or corrupt"), ("caffe.pth", "key prefixes found: blobs.conv1_w")):
        res = _run_cli("torchvision", tmp_path / bad, tmp_path / "out.pth")
        assert res.returncode == 2, res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], res.stderr
        assert not (tmp_path / "out.pth").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: far too small for any ResNet."""
    mnt = tmp_path / "small disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); needs root or a user namespace")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_a_write_that_fills_the_disk_is_one_line_and_leaves_nothing(small_disk, tmp_path, monkeypatch):
    import converters.writers as writers

    bb = load_backbone(_tv_file(tmp_path))
    # As if the disk filled up after the folder was checked: the real writers meet the real full disk.
    monkeypatch.setattr(writers, "prepare_output", lambda *args, **kwargs: None)
    for fmt, name in (("detectron2", "out.pkl"), ("mmseg", "out.pth"), ("torchvision", "tv.pth")):
        with pytest.raises(UserError, match=rf"cannot write {small_disk / name} \((No space left on device|the write "
                                            rf"failed with 0\.\d MiB free there)\); free disk space") as e:
            writers.CONVERTERS[fmt](bb, small_disk / name, verify=False)
        assert "\n" not in str(e.value)
        assert list(small_disk.iterdir()) == []  # neither the file nor its temporary


def test_the_command_holds_its_output_folders_lock(tmp_path):
    hold = ("import sys, time; from mocobench.fileio import prepare_output; prepare_output(sys.argv[1], 'test'); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "out")], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        src = _tv_file(tmp_path)
        res = _run_cli("torchvision", src, tmp_path / "out" / "r18.pth", "--no-verify")
        assert res.returncode == 2 and f"is in use by pid {holder.pid}" in res.stderr, res.stderr
        assert not (tmp_path / "out" / "r18.pth").exists()
        # A library caller (a transfer task's rank writing into the folder its run holds) does not contend.
        to_torchvision(load_backbone(src), tmp_path / "out" / "r18.pth", verify=False)
    finally:
        holder.kill()
        holder.wait()


def _converters_modules():
    return sorted((ROOT / "converters").glob("*.py"))


def test_converters_modules_import_in_one_direction():
    """No module of converters imports (even lazily, inside a function) one that imports it back."""
    import ast

    graph = {}
    for path in _converters_modules():
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("converters"):
                names.add(node.module)
                names.update(f"converters.{a.name}" for a in node.names if node.module == "converters")
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names if a.name.startswith("converters"))
        graph[f"converters.{path.stem}"] = {n for n in names if n != "converters"}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))

    cycles = [m for m in graph if m != "converters.__init__" and reaches(m, m)]
    assert not cycles, {m: graph[m] for m in cycles}


def test_no_converters_function_is_over_80_lines():
    import ast

    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in _converters_modules() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long, long


def test_import_is_lazy():
    code = ("import sys, converters, converters.__main__; "
            "bad = [m for m in ('detectron2', 'mmseg', 'mmengine', 'mmcv') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=600)


# ----------------------------------------------------------------------------- real libraries

def test_detectron2_numeric_equivalence(source, tmp_path):
    pytest.importorskip("detectron2", reason="detectron2 not installed (built from its git repository)")
    arch, sd = source
    bb = load_backbone(write_layout("moco-official-v2", arch, sd, tmp_path / "m.pth"))
    report = to_detectron2(bb, tmp_path / "out.pkl")
    assert "DetectionCheckpointer" in report["checks"][-1]
    diffs = report["max_abs_diff"]
    assert list(diffs) == ["res2", "res3", "res4", "res5"] and max(diffs.values()) <= 1e-4


def test_detectron2_check_catches_stride_in_1x1(tmp_path, monkeypatch):
    pytest.importorskip("detectron2", reason="detectron2 not installed (built from its git repository)")
    import converters.verify as verify

    bb = load_backbone(write_layout("torchvision", "resnet50", _random_resnet("resnet50", 1), tmp_path / "t.pth"))
    real = verify.detectron2_settings  # the settings Detectron2's backbone is built with
    monkeypatch.setattr(verify, "detectron2_settings",
                        lambda b: {**real(b), "MODEL.RESNETS.STRIDE_IN_1X1": True})
    with pytest.raises(UserError, match=r"Detectron2 backbone output differs from torchvision's"):
        to_detectron2(bb, tmp_path / "out.pkl")
    assert not (tmp_path / "out.pkl").exists()


def test_mmseg_numeric_equivalence(source, tmp_path):
    pytest.importorskip("mmseg", reason="mmsegmentation not installed (pip install mmsegmentation==1.2.2 "
                                        "mmengine==0.10.7 mmcv-lite==2.1.0 ftfy regex)")
    arch, sd = source
    bb = load_backbone(write_layout("mmselfsup", arch, sd, tmp_path / "m.pth"))
    report = to_mmseg(bb, tmp_path / "out.pth")
    assert "init_cfg Pretrained" in report["checks"][-1]
    diffs = report["max_abs_diff"]
    assert list(diffs) == ["stage1", "stage2", "stage3", "stage4"] and max(diffs.values()) <= 1e-4


def test_half_precision_and_unknown_arch_name(tmp_path):
    sd = _random_resnet("resnet18", 0)
    torch.save({"arch": "resnet18w2", "state_dict": {f"module.encoder_q.{k}": v.half() if v.is_floating_point() else v
                                                      for k, v in sd.items()}}, tmp_path / "h.pth")
    bb = load_backbone(tmp_path / "h.pth")  # an arch name torchvision lacks is ignored, not trusted
    assert bb.arch == "resnet18" and bb.meta["arch_from"] == "inferred"
    assert bb.state_dict["conv1.weight"].dtype == torch.float32
    assert torch.equal(bb.state_dict["conv1.weight"], sd["conv1.weight"].half().float())


def test_real_pretrain_checkpoint_converts(tmp_path):
    """The checkpoint `python -m pretrain` really writes (2 steps on Fashion-MNIST, trained BN)."""
    cmd = [sys.executable, "-m", "pretrain", "--config", str(ROOT / "configs/pretrain/moco_v2_fmnist_demo.yaml"),
           "--output", str(tmp_path), "model.arch=resnet18", "data.image_size=32", "data.max_images=32",
           "data.num_workers=0", "train.batch_size=16", "moco.queue_size=32", "moco.dim=16",
           "train.epochs=1", "train.max_steps=2"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt_path = tmp_path / "checkpoint_last.pth"
    ckpt = torch.load(ckpt_path, weights_only=True)
    bb = load_backbone(ckpt_path)
    assert (bb.layout, bb.arch, bb.meta["image_size"]) == ("moco-bench", "resnet18", 32)
    q = {k[len("encoder_q."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("encoder_q.")}
    _assert_same_backbone(bb.state_dict, q)
    assert not torch.equal(bb.state_dict["bn1.running_var"], torch.ones(64))  # really trained
    report = to_detectron2(bb, tmp_path / "r18.pkl", verify=False)
    assert report["keys"] == 100
    assert to_torchvision(load_backbone(tmp_path / "r18.pkl"), tmp_path / "r18.pth")["keys"] == 120
