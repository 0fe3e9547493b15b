"""Every bad input a user can give a CLI ends in one line, `error: <what; what to do>`, and
exit status 2: no traceback, no partial output. One table for all the CLIs.

A case is (id, cli, make_args, expected): `make_args(tmp_path)` builds whatever the case
needs on disk and returns the argv; `expected` is a regex searched in the error line.
"""
import os
import re
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
