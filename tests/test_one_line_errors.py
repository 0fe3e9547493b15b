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


CASES = [
    # ---- configs, every CLI that reads one (mocobench.config) ----
    ("binary config", "pretrain",
     lambda tmp: ["--config", str(_binary_file(tmp)), "--output", str(tmp / "out")],
     r"is not a text YAML file"),
    ("override not YAML", "pretrain", _pretrain("train.lr=[1"), r"override 'train.lr=\[1'.*not valid YAML"),
    # ---- pretrain ----
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
    # ---- transfer detect ----
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
