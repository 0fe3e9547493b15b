"""Every bad input a user can give a CLI ends in one line, `error: <what; what to do>`, and
exit status 2: no traceback, no partial output. One table for all the CLIs.

A case is (id, cli, make_args, expected): `make_args(tmp_path)` builds whatever the case
needs on disk and returns the argv; `expected` is a regex searched in the error line.
"""
import re
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


def _pretrain(*overrides):
    return lambda tmp: ["--config", PRETRAIN_DEMO, "--output", str(tmp / "out"), *overrides]


def _file(tmp_path):
    p = tmp_path / "a-file"
    p.write_text("not a folder")
    return p


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
    # ---- converters ----
    # ---- transfer linear / knn / suite ----
    ("linear output inside a file", "transfer.linear",
     lambda tmp: _random_run(tmp, output=_file(tmp) / "out"),
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
    # ---- transfer detect ----
    # ---- transfer segment ----
    # ---- transfer report ----
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
