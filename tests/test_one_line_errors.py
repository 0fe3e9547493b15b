"""Every bad input a user can give a CLI ends in one line, `error: <what; what to do>`, and
exit status 2: no traceback, no partial output. One table for all the CLIs.

A case is (id, cli, make_args, expected): `make_args(tmp_path)` builds whatever the case
needs on disk and returns the argv; `expected` is a regex searched in the error line.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_DEMO = str(ROOT / "configs/pretrain/moco_v2_fmnist_demo.yaml")


def _cli(name):
    """The in-process entry point of `python -m <name>` (`transfer.<task>` for transfer tasks)."""
    import importlib

    if name == "pretrain":
        return importlib.import_module("pretrain.__main__").main
    if name == "converters":
        return importlib.import_module("converters.__main__").main
    task = name.split(".", 1)[1]
    return lambda argv: importlib.import_module("transfer.__main__").main([task, *argv])


def _binary_file(tmp_path, name="config.yaml"):
    p = tmp_path / name
    p.write_bytes(bytes(range(256)) * 4)
    return p


def _bench(**changes):
    """make_args for a bench whose config is a small valid one with `changes` applied."""
    def make(tmp):
        import yaml

        config = {"name": "t", "pretrainings": [{"label": "random init", "kind": "random", "arch": "resnet18"}],
                  "tasks": [{"name": "knn", "task": "knn"}], **changes}
        path = tmp / "bench.yaml"
        path.write_text(yaml.safe_dump(config))
        return ["--config", str(path), "--output", str(tmp / "out")]
    return make


def _results_file(content, splits=None):
    """argv for `transfer report` on a folder whose results.json holds `content` (bytes or
    text), or a valid record whose dataset splits are `splits`."""
    def make(tmp):
        folder = tmp / "run"
        folder.mkdir()
        data = content
        if splits is not None:
            import json

            record = json.loads((ROOT / "tests/fixtures/results/good/knn/random/results.json").read_text())
            record["dataset"]["splits"] = splits
            data = json.dumps(record)
        (folder / "results.json").write_bytes(data if isinstance(data, bytes) else data.encode())
        return [str(folder), "--output", str(tmp / "out")]
    return make


def _report_read_only_output(tmp):
    out = tmp / "ro"
    out.mkdir()
    out.chmod(0o555)
    import os

    if os.access(out, os.W_OK):  # root ignores modes: sysfs refuses new files to everyone
        out = Path("/sys/kernel")
    return [str(ROOT / "tests/fixtures/results/good/knn"), "--output", str(out)]


def _written(path, data: bytes):
    path.write_bytes(data)
    return path


def _pretrain(*overrides):
    return lambda tmp: ["--config", PRETRAIN_DEMO, "--output", str(tmp / "out"), *overrides]


# ---- converters helpers ----
MOUNTS = []  # file systems cases mounted; unmounted after each test


@pytest.fixture(autouse=True)
def _unmount_after(tmp_path):  # requests tmp_path, so it is torn down before tmp_path is removed
    yield
    while MOUNTS:
        subprocess.run(["umount", "-l", MOUNTS.pop()], capture_output=True)


def _tmpfs(tmp, name, *options, fill=False) -> Path:
    """A small tmpfs at tmp/name (filled to the last byte with fill=True); skips where mounting
    is not allowed (it needs root or a user namespace)."""
    where = tmp / name
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=256k",) + options), "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    MOUNTS.append(str(where))
    if fill:
        try:
            with open(where / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError:
            pass
    return where


def _r18(tmp, name="r18 'in' ; spaces.pth") -> str:
    import torch
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp / name)
    return str(tmp / name)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _code_running(tmp) -> str:
    import torch
    import torchvision

    torch.save({"state_dict": torchvision.models.resnet18().state_dict(), "x": _RunsCode(tmp / "ran")},
               tmp / "evil.pth")
    return str(tmp / "evil.pth")


def _cut(tmp) -> str:
    whole = Path(_r18(tmp)).read_bytes()
    (tmp / "cut.pth").write_bytes(whole[: len(whole) // 2])
    return str(tmp / "cut.pth")


def _bit_flipped(tmp) -> str:
    """A pretrain checkpoint (stamped as pretrain stamps it) with one bit of a tensor flipped."""
    import torch
    import torchvision

    from mocobench.fileio import PRETRAIN_CHECKPOINT_FORMAT, tensor_digest

    sd = {f"encoder_q.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}
    ckpt = {"format": PRETRAIN_CHECKPOINT_FORMAT, "method": "moco_v2", "backbone_prefix": "encoder_q.",
            "state_dict": sd}
    ckpt["checksum"] = tensor_digest(ckpt)
    sd["encoder_q.conv1.weight"].view(-1).view(torch.uint8)[3] ^= 4
    torch.save(ckpt, tmp / "flip.pth")
    return str(tmp / "flip.pth")


def _two_backbones(tmp) -> str:
    import torch
    import torchvision

    torch.save({"model": torchvision.models.resnet18().state_dict(),
                "state_dict": torchvision.models.resnet18().state_dict()}, tmp / "two.pth")
    return str(tmp / "two.pth")


def _regular_file(tmp) -> Path:
    (tmp / "a file").write_text("x")
    return tmp / "a file"


# ---- linear / knn / suite helpers ----
def _empty_class(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b", "empty"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            if cls != "empty":
                Image.new("RGB", (8, 8)).save(tmp_path / "data" / split / cls / "x.png")
    return tmp_path / "data"


def _random_run(tmp_path, *args, output=None, features=True):
    """A classification task on the random-init baseline: no checkpoint needed."""
    return ["--weights", "random", "--arch", "resnet18", "--output", str(output or tmp_path / "out"),
            *(["features.cache=false"] if features else []), "data.num_workers=0", *args]


CASES = [
    # ---- configs, every CLI that reads one (mocobench.config) ----
    ("binary config", "pretrain",
     lambda tmp: ["--config", str(_binary_file(tmp)), "--output", str(tmp / "out")],
     r"is not a text YAML file"),
    ("override not YAML", "pretrain", _pretrain("train.lr=[1"), r"override 'train.lr=\[1'.*not valid YAML"),
    # ---- pretrain ----
    ("queue_size -1", "pretrain", _pretrain("moco.queue_size=-1"), r"moco.queue_size=-1 is not allowed: it must be at least 1"),
    ("batch_size 0", "pretrain", _pretrain("train.batch_size=0"), r"train.batch_size=0 is not allowed"),
    ("batch_size -16", "pretrain", _pretrain("train.batch_size=-16"), r"train.batch_size=-16 is not allowed"),
    ("print_freq 0", "pretrain", _pretrain("train.print_freq=0"), r"train.print_freq=0 is not allowed"),
    ("num_workers -1", "pretrain", _pretrain("data.num_workers=-1"), r"data.num_workers=-1 is not allowed"),
    ("epochs 0", "pretrain", _pretrain("train.epochs=0"), r"train.epochs=0 is not allowed: it must be at least 1"),
    ("arch resnet19", "pretrain", _pretrain("model.arch=resnet19"), r"model.arch='resnet19'.*one of .*resnet18"),
    ("arch vgg11", "pretrain", _pretrain("model.arch=vgg11"), r"model.arch='vgg11' is not allowed"),
    ("amp fp8", "pretrain", _pretrain("train.amp=fp8"), r"train.amp='fp8'.*one of none, bf16, fp16"),
    ("fp16 on CPU", "pretrain", _pretrain("train.amp=fp16"), r"train.amp=fp16 needs a GPU"),
    ("schedule linear", "pretrain", _pretrain("train.schedule=linear"), r"train.schedule='linear'.*one of cos, step"),
    ("resume from a folder", "pretrain", lambda tmp: [*_pretrain()(tmp), "--resume", str(tmp)],
     r"is a folder; --resume takes a checkpoint file"),
    ("resume from a .pkl", "pretrain",
     lambda tmp: [*_pretrain()(tmp), "--resume", str(_written(tmp / "w.pkl", b"\x80\x04}q\x00."))],
     r"w.pkl is not a pretrain checkpoint \(not a file written by torch.save"),
    ("momentum 1", "pretrain", _pretrain("moco.momentum=1"), r"moco.momentum=1.0 is not allowed: it must be less than 1"),
    ("temperature 0", "pretrain", _pretrain("moco.temperature=0"), r"moco.temperature=0.0 is not allowed"),
    ("dictionary bank", "pretrain", _pretrain("moco.dictionary=bank"), r"moco.dictionary='bank'.*queue, end_to_end, memory_bank"),
    ("colour_on gpu", "pretrain", _pretrain("data.colour_on=gpu"), r"data.colour_on='gpu'.*worker, device, auto"),
    ("crop_scale 3 items", "pretrain", _pretrain("data.crop_scale=[0.2,0.5,1]"), r"data.crop_scale=.* must have 2 items"),
    ("crop_scale min > max", "pretrain", _pretrain("data.crop_scale=[0.9,0.5]"), r"min <= max"),
    ("BN groups of one image", "pretrain", _pretrain("train.batch_size=32", "moco.bn_splits=32"), r"BN groups of 1 image"),
    ("method byol", "pretrain", _pretrain("method=byol"), r"method='byol'.*one of moco, supervised"),
    # ---- converters ----
    ("convert: output is a folder", "converters", lambda tmp: ["torchvision", _r18(tmp), str(tmp)],
     r"output .* is a folder; give the file to write, e\.g\. "),
    ("convert: output inside a regular file", "converters",
     lambda tmp: ["mmseg", _r18(tmp), str(_regular_file(tmp) / "out.pth")], r"a file is a file, not a folder"),
    ("convert: output on a read-only file system", "converters",
     lambda tmp: ["detectron2", _r18(tmp), str(_tmpfs(tmp, "ro", "ro") / "out.pkl")],
     r"cannot write converted weights in .*ro \(Read-only file system\)"),
    ("convert: output on a full disk", "converters",
     lambda tmp: ["torchvision", _r18(tmp), str(_tmpfs(tmp, "full", fill=True) / "out.pth")],
     r"cannot write converted weights in .*full \(No space left on device\)"),
    ("convert: output on a disk without room for it", "converters",
     lambda tmp: ["detectron2", _r18(tmp), str(_tmpfs(tmp, "small") / "out.pkl")],
     r"only 0 MiB free in .*small but converted weights need about 4\d MiB; free disk space"),
    ("convert: a pickle that would run code", "converters",
     lambda tmp: ["torchvision", _code_running(tmp), str(tmp / "out.pth")],
     r"evil\.pth would run code when loaded: its pickle calls posix\.system; nothing was run"),
    ("convert: truncated checkpoint", "converters", lambda tmp: ["torchvision", _cut(tmp), str(tmp / "o.pth")],
     r"cut\.pth is truncated or corrupt \(.*\); re-download or re-save it"),
    ("convert: a pretrain checkpoint with a flipped bit", "converters",
     lambda tmp: ["torchvision", _bit_flipped(tmp), str(tmp / "o.pth")],
     r"flip\.pth is corrupt: checksum mismatch; re-copy the file"),
    ("convert: two different backbones in one file", "converters",
     lambda tmp: ["torchvision", _two_backbones(tmp), str(tmp / "o.pth")],
     r"two\.pth holds two different backbones, 'state_dict' \(unprefixed keys\) and 'model' .* save only"),
    # ---- transfer linear / knn / suite ----
    ("linear output inside a file", "transfer.linear",
     lambda tmp: _random_run(tmp, output=_regular_file(tmp) / "out"),
     r"is a file, not a folder; choose another output folder"),
    ("knn unknown data", "transfer.knn", lambda tmp: _random_run(tmp, "--data", str(tmp / "nowhere")),
     r"is neither a registered data set \(fashion-mnist, cifar10, .*\) nor an existing folder"),
    ("svm data set not on disk", "transfer.svm",
     lambda tmp: _random_run(tmp, "--data", "cifar10", "--data-root", str(tmp)),
     r"cifar10 train split cannot be read from .*cifar-10-batches-py .*--download on a connected machine"),
    ("knn empty class folder", "transfer.knn", lambda tmp: _random_run(tmp, "--data", str(_empty_class(tmp))),
     r"class folder\(s\) without images: empty; add images or remove"),
    ("svm negative cost", "transfer.svm", lambda tmp: _random_run(tmp, "svm.costs=[0.1,-1]"),
     r"svm.costs=\[0.1, -1(\.0)?\] is not allowed: it must be more than 0"),
    ("linear bad score split", "transfer.linear", lambda tmp: _random_run(tmp, "data.score_split=train"),
     r"data.score_split='train' is not allowed: it must be one of test, val"),
    ("fewshot headline not run", "transfer.fewshot",
     lambda tmp: _random_run(tmp, "fewshot.shots=[1]", "fewshot.headline_shot=5"),
     r"fewshot.headline_shot=5 is not one of fewshot.shots \[1\]"),
    ("fewshot more ways than classes", "transfer.fewshot",
     lambda tmp: _random_run(tmp, "fewshot.ways=11", "fewshot.shots=[1]", "data.max_test_images=400",
                             "data.default_image_size=32"),
     r"11-way 1-shot episodes with 15 queries need 11 classes with 16 test images each; 10 have them"),
    ("finetune missing subset list", "transfer.finetune",
     lambda tmp: _random_run(tmp, f"subset.file={tmp / '1percent.txt'}", "data.max_train_images=50",
                             features=False),
     r"subset.file .*1percent.txt does not exist; pass SimCLR's 1percent.txt"),
    # ---- transfer detect ---- (helpers at the end of the file)
    ("detect output inside a file", "transfer.detect",
     lambda tmp: _detect(tmp, output=_regular_file(tmp) / "out"), r"is a file, not a folder"),
    ("detect VOC without its split file", "transfer.detect", lambda tmp: _detect(tmp, test_split="test"),
     r"create .*ImageSets/Main/test.txt listing the images"),
    ("detect NUM_CLASSES against the data", "transfer.detect",
     lambda tmp: _detect(tmp, extra=["MODEL.ROI_HEADS.NUM_CLASSES", "20"]),
     r"NUM_CLASSES is 20 but .* has 10 classes"),
    ("detect image missing", "transfer.detect", lambda tmp: _detect(tmp, damage="missing"),
     r"1 of 4 images are missing"),
    ("detect image size against its annotation", "transfer.detect", lambda tmp: _detect(tmp, damage="size"),
     r"is 64x128 but its annotation says 128x128"),
    ("detect 16-bit image", "transfer.detect", lambda tmp: _detect(tmp, damage="16bit"), r"16/32-bit"),
    ("detect VOC split listing an image twice", "transfer.detect", lambda tmp: _detect(tmp, damage="listed twice"),
     r"trainval.txt lists '000001' twice \(lines 2 and 5\)"),
    ("detect VOC box outside its image", "transfer.detect", lambda tmp: _detect(tmp, damage="box outside"),
     r"000000.xml object 1 \(.*\) spans x .*\.\.300, .*outside its 128x128 image"),
    ("detect resume of a checkpoint without its run's identity", "transfer.detect",
     lambda tmp: _detect(tmp, flags=["--resume"], damage="orphan checkpoint"), r"no readable run_identity.json"),
    ("detect random without arch", "transfer.detect", lambda tmp: _detect(tmp, weights="random"),
     r"--weights random needs an architecture"),
    ("detect code-running pkl", "transfer.detect", lambda tmp: _detect(tmp, weights=_code_running_pkl(tmp)),
     r"would run code when loaded.*nothing was run.*pass --allow-pickle"),
    ("detect R34 pkl under DEPTH 18", "transfer.detect", lambda tmp: _detect(tmp, weights=_r34_pkl(tmp)),
     r"MODEL.RESNETS.DEPTH is 18, the weights need 34"),
    ("detect multi-machine with dist-url auto", "transfer.detect",
     lambda tmp: _detect(tmp, flags=["--num-machines", "2"]), r"pass --dist-url tcp://"),
    ("detect COCO object of category 0", "transfer.detect", lambda tmp: _detect_coco(tmp),
     r"category_id 0, the background"),
    ("detect flag after the overrides", "transfer.detect",
     lambda tmp: _detect(tmp, extra=["SOLVER.MAX_ITER", "2", "--allow-pickle"]),
     r"--allow-pickle comes after the KEY VALUE overrides"),
    # ---- transfer segment ----
    ("segment output inside a file", "transfer.segment",
     lambda tmp: _segment(tmp, output=_regular_file(tmp) / "out"), r"is a file, not a folder"),
    ("segment random without arch", "transfer.segment",
     lambda tmp: _segment(tmp, arch=None), r"--weights random needs an architecture; add --arch"),
    ("segment label >= num_classes", "transfer.segment",
     lambda tmp: _segment(tmp, edit=lambda d: _seg_label_value(d, 7)),
     r"train_0\.png holds value\(s\) \[7\] that are not class ids 0\.\.2 nor the ignore label 255"),
    ("segment colour label map", "transfer.segment",
     lambda tmp: _segment(tmp, edit=lambda d: _seg_colour_label(d)),
     r"label map .*train_0\.png has 3 channels; label maps hold one class id per pixel"),
    ("segment missing label folder", "transfer.segment",
     lambda tmp: _segment(tmp, edit=lambda d: shutil.rmtree(d / "ann_dir" / "val")),
     r"ann_dir/val does not exist: test_dataloader\.dataset reads its label maps there"),
    ("segment missing image", "transfer.segment",
     lambda tmp: _segment(tmp, edit=lambda d: (d / "img_dir" / "val" / "val_1.png").unlink(),
                          lines=["test_dataloader = dict(dataset=dict(ann_file='val.txt'))"],
                          list_file=("val.txt", "val_0\nval_1\n")),
     r"1 of the 2 images test_dataloader\.dataset lists do not exist \(e\.g\. .*val_1\.png\)"),
    ("segment image/label size mismatch", "transfer.segment",
     lambda tmp: _segment(tmp, edit=lambda d: _seg_resize_label(d)),
     r"label map .*val_0\.png is 24x20 but its image .*val_0\.png is 48x40"),
    ("segment 16-bit image", "transfer.segment",
     lambda tmp: _segment(tmp, edit=lambda d: _seg_image_16bit(d)),
     r"train_1\.png is not an 8-bit image \(PIL mode I;16"),
    ("segment classes/palette mismatch", "transfer.segment",
     lambda tmp: _segment(tmp, lines=["train_dataloader = dict(dataset=dict(metainfo=dict(palette=[[0, 0, 0]])))"]),
     r"train_dataloader\.dataset: metainfo has 3 classes but 1 palette colours"),
    ("segment num_classes=1", "transfer.segment",
     lambda tmp: _segment(tmp, edit=lambda d: (d / "classes.txt").write_text("object\n")),
     r"the dataset has 1 class \(object\); segmentation needs at least two"),
    ("segment head num_classes contradicts classes", "transfer.segment",
     lambda tmp: _segment(tmp, options=["model.decode_head.num_classes=5"]),
     r"model\.decode_head\.num_classes=5 but the dataset has 3 classes \(background, square, disc\)"),
    ("segment class weights for another class count", "transfer.segment",
     lambda tmp: _segment(tmp, options=["model.decode_head.loss_decode.class_weight=[0.2,1]"]),
     r"model\.decode_head\.loss_decode\.class_weight has 2 weights but the dataset has 3 classes"),
    ("segment metainfo contradicts classes.txt", "transfer.segment",
     lambda tmp: _segment(tmp, lines=["test_dataloader = dict(dataset=dict(metainfo=dict(classes=('a', 'b'))))"]),
     r"test_dataloader\.dataset\.metainfo\.classes \(2: a, b, \.\.\.\) contradicts .*classes\.txt"),
    ("segment no data", "transfer.segment",
     lambda tmp: _segment(tmp, lines=["embedded_data = None"], data_root=False),
     r"the config names no data \(no data_root, no embedded_data\); pass --data-root"),
    # ---- transfer report ----
    ("report results.json a number", "transfer.report", _results_file("3"), r"holds a number, not a results record"),
    ("report results.json null", "transfer.report", _results_file("null"), r"holds null, not a results record"),
    ("report results.json binary", "transfer.report", _results_file(bytes(range(256)) * 4), r"is not a text file"),
    ("report splits a list", "transfer.report", _results_file(None, splits=[1, 2]),
     r"dataset lacks 'splits', a mapping of split name to size"),
    ("report split size a string", "transfer.report", _results_file(None, splits={"test": "all"}),
     r"split 'test' should have a number of images"),
    ("report output read-only", "transfer.report", _report_read_only_output, r"cannot write report in "),
    # ---- transfer bench ----
    ("bench formats typo", "transfer.bench", _bench(formats=["torchvison"]),
     r"formats=\['torchvison'\] is not allowed: it must be one of torchvision, detectron2, mmseg"),
    ("bench missing pretrain config", "transfer.bench",
     _bench(pretrainings=[{"label": "MoCo", "kind": "pretrain", "config": "nope/moco.yaml"}]),
     r"pretrainings\[0\] \('MoCo'\): config file nope/moco.yaml does not exist"),
    ("bench bad pretrain override", "transfer.bench",
     _bench(pretrainings=[{"label": "MoCo", "kind": "pretrain", "config": PRETRAIN_DEMO,
                           "overrides": ["moco.queue_sise=16"]}]),
     r"pretrainings\[0\] \('MoCo'\): unknown config key moco.queue_sise; did you mean moco.queue_size"),
    ("bench bad kind", "transfer.bench", _bench(pretrainings=[{"label": "x", "kind": "checkpiont"}]),
     r"pretrainings\[0\]\.kind='checkpiont' is not allowed: it must be one of pretrain, checkpoint"),
    ("bench bad task name", "transfer.bench", _bench(tasks=[{"name": "probe", "task": "lineer"}]),
     r"task 'probe': task must be one of linear, knn, .*detect, segment .*not 'lineer'"),
    ("bench task folder clash", "transfer.bench", _bench(tasks=[{"name": "convert", "task": "knn"}]),
     r"task 'convert': name is its folder"),
    ("bench task config missing", "transfer.bench",
     _bench(tasks=[{"name": "knn", "task": "knn", "args": ["--config", "nope.yaml"]}]),
     r"task 'knn': its --config 'nope.yaml' does not exist"),
    ("bench task rows unknown", "transfer.bench",
     _bench(tasks=[{"name": "knn", "task": "knn", "rows": ["MoCo"]}]),
     r"task 'knn': rows \['MoCo'\] are not pretraining labels"),
    ("bench launcher flags in args", "transfer.bench",
     _bench(tasks=[{"name": "voc", "task": "detect", "args": ["--num-gpus", "8"]}]),
     r"the bench launches the task itself: drop \['--num-gpus'\]"),
    ("bench seeds on a checkpoint", "transfer.bench",
     _bench(pretrainings=[{"label": "x", "kind": "checkpoint", "path": "x.pth", "seeds": [0, 1]}]),
     r"seeds need a row that trains or draws its weights"),
    ("bench unknown key", "transfer.bench", _bench(executer="slurm"),
     r"unknown config key executer; did you mean executor\?"),
    ("bench unknown executor", "transfer.bench", _bench(executor="pbs"),
     r"executor='pbs' is not allowed: it must be one of local, slurm"),
    ("bench resources typo", "transfer.bench", _bench(slurm={"resources": {"pretrain": {"gpus": 8}}}),
     r"resources of pretrainings\[0\].*unknown config key gpus; known: nodes, gpus_per_node"),
    ("bench resources kind typo", "transfer.bench", _bench(slurm={"resources": {"detection": {}}}),
     r"slurm.resources has \['detection'\]"),
    ("bench GPUs and processes differ", "transfer.bench",
     _bench(executor="slurm", pretrainings=[{"label": "MoCo", "kind": "pretrain", "config": PRETRAIN_DEMO,
                                             "nproc": 4, "resources": {"gpus_per_node": 8}}]),
     r"nproc 4 processes per node but gpus_per_node 8"),
    ("bench nodes without slurm", "transfer.bench", _bench(slurm={"resources": {"knn": {"nodes": 2}}}),
     r"task 'knn': several nodes need executor: slurm"),
    ("bench detect engine auto on several processes", "transfer.bench",
     _bench(tasks=[{"name": "voc", "task": "detect", "nproc": 2, "args": ["--engine", "auto"]}]),
     r"several processes need --engine detectron2 or --engine torchvision"),
    ("bench output is a file", "transfer.bench",
     lambda tmp: _bench()(tmp)[:-1] + [str(_binary_file(tmp, "a_file")) + "/out"],
     r"cannot write bench in .*a_file/out: .*a_file is a file"),
]


@pytest.mark.parametrize("cli, make_args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(cli, make_args, expected, tmp_path, capsys):
    argv = make_args(tmp_path)
    with pytest.raises(SystemExit) as e:
        _cli(cli)(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(err) >= 1 and err[-1].startswith("error: "), err
    assert [line for line in err if line.startswith("error: ")] == [err[-1]]
    assert not any("Traceback" in line for line in err), err
    assert re.search(expected, err[-1]), err[-1]


# ----------------------------------------------------------------------------- transfer detect
# (with the converters helpers above: _r18, _regular_file, _RunsCode)

DETECT_DEMO = str(ROOT / "configs/detection/demo_scenes_voc_R18_FPN.yaml")


def _detect(tmp, weights=None, output=None, test_split="trainval", extra=(), flags=(), damage=None):
    """transfer detect on a 4-image VOC folder of the user's (path with a space and a ';')."""
    import numpy as np
    from PIL import Image

    from transfer import scenes as sc

    voc = sc.write_voc(tmp / "my voc; data", {"trainval": sc.compose_scenes(4, seed=0)})
    first = voc / "JPEGImages" / "000000.jpg"
    if damage == "missing":
        first.unlink()
    elif damage == "size":
        Image.new("RGB", (64, 128)).save(first)
    elif damage == "listed twice":
        split = voc / "ImageSets" / "Main" / "trainval.txt"
        split.write_text(split.read_text() + "000001\n")
    elif damage == "box outside":
        xml = voc / "Annotations" / "000000.xml"
        xml.write_text(re.sub(r"<xmax>\d+</xmax>", "<xmax>300</xmax>", xml.read_text(), count=1))
    elif damage == "orphan checkpoint":  # a checkpoint without the record of its run
        (tmp / "out").mkdir()
        (tmp / "out" / "last_checkpoint.pth").write_bytes(b"")
    elif damage == "16bit":
        first.unlink()
        Image.fromarray(np.zeros((128, 128), np.uint16)).save(first.with_suffix(".png"), format="PNG")
        first.with_suffix(".png").rename(first)
    return ["--config", DETECT_DEMO, "--weights", str(weights or _r18(tmp)), "--output", str(output or tmp / "out"),
            "--engine", "torchvision", *flags, "DATASETS.TRAIN", f"('voc:{voc}:trainval',)",
            "DATASETS.TEST", f"('voc:{voc}:{test_split}',)", *extra]


def _detect_coco(tmp):
    import json

    from transfer import scenes as sc

    root = sc.write_coco(tmp / "coco", {"train": sc.compose_scenes(4, seed=0)})
    ann = root / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    data["categories"].insert(0, {"id": 0, "name": "background"})
    data["annotations"][0]["category_id"] = 0
    ann.write_text(json.dumps(data))
    name = f"('coco:{ann}:{root / 'train'}',)"
    return ["--config", DETECT_DEMO, "--weights", str(_r18(tmp)), "--output", str(tmp / "out"),
            "--engine", "torchvision", "DATASETS.TRAIN", name, "DATASETS.TEST", name]


def _code_running_pkl(tmp):
    import pickle

    path = tmp / "weights.pkl"
    path.write_bytes(pickle.dumps({"model": {}, "payload": _RunsCode(tmp / "ran")}))
    return path


def _r34_pkl(tmp):
    import torch
    import torchvision

    from converters import load_backbone, to_detectron2

    torch.save(torchvision.models.resnet34().state_dict(), tmp / "r34.pth")
    to_detectron2(load_backbone(tmp / "r34.pth"), tmp / "r34.pkl", verify=False)
    return tmp / "r34.pkl"


# ----------------------------------------------------------------------------- transfer segment
# A small own-data folder (tests/segment_fixtures.py), spoiled one way per case; _regular_file above.

def _segment(tmp, *, edit=None, lines=(), options=(), list_file=None, output=None, arch="resnet18",
             data_root=True):
    """argv of `transfer segment` with a config built on the demo reading a small own-data folder."""
    from segment_fixtures import TINY, child_config, write_dataset

    data = write_dataset(tmp / "data")
    if list_file:
        (data / list_file[0]).write_text(list_file[1])
    if edit:
        edit(data)
    config = child_config(tmp / "my_config.py", *([f"data_root = {str(data)!r}"] if data_root else []), *lines)
    return ["--config", str(config), "--weights", "random", *(["--arch", arch] if arch else []),
            "--output", str(output or tmp / "out"), "--cfg-options", *TINY, *options]


def _seg_label_value(data, value):
    import numpy as np
    from PIL import Image

    path = data / "ann_dir" / "train" / "train_0.png"
    label = np.asarray(Image.open(path)).copy()
    label[0, 0] = value
    Image.fromarray(label).save(path)


def _seg_colour_label(data):
    from PIL import Image

    path = data / "ann_dir" / "train" / "train_0.png"
    Image.open(path).convert("RGB").save(path)


def _seg_resize_label(data):
    from PIL import Image

    path = data / "ann_dir" / "val" / "val_0.png"
    Image.open(path).resize((24, 20), Image.NEAREST).save(path)


def _seg_image_16bit(data):
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 65535, 40 * 48).reshape(40, 48).astype(np.uint16)
    Image.fromarray(ramp).save(data / "img_dir" / "train" / "train_1.png")
