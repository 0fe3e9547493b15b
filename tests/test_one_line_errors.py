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
    # ---- transfer linear / knn / suite ----
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
