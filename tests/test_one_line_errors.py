"""Every bad input a user can give a CLI ends in one line, `error: <what; what to do>`, and
exit status 2: no traceback, no partial output. One table for all the CLIs.

A case is (id, cli, make_args, expected): `make_args(tmp_path)` builds whatever the case
needs on disk and returns the argv; `expected` is a regex searched in the error line.
"""
import os
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


CASES = [
    # ---- configs, every CLI that reads one (mocobench.config) ----
    ("binary config", "pretrain",
     lambda tmp: ["--config", str(_binary_file(tmp)), "--output", str(tmp / "out")],
     r"is not a text YAML file"),
    ("override not YAML", "pretrain", _pretrain("train.lr=[1"), r"override 'train.lr=\[1'.*not valid YAML"),
    # ---- pretrain ----
    # ---- converters ----
    ("convert: a pickle that would run code", "converters",
     lambda tmp: ["torchvision", _code_running(tmp), str(tmp / "out.pth")],
     r"evil\.pth would run code when loaded: its pickle calls posix\.system; nothing was run"),
    ("convert: truncated checkpoint", "converters", lambda tmp: ["torchvision", _cut(tmp), str(tmp / "o.pth")],
     r"cut\.pth is truncated or corrupt \(.*\); re-download or re-save it"),
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
