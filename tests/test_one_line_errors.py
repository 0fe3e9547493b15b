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


def _pretrain(*overrides):
    return lambda tmp: ["--config", PRETRAIN_DEMO, "--output", str(tmp / "out"), *overrides]


CASES = [
    # ---- configs, every CLI that reads one (mocobench.config) ----
    ("binary config", "pretrain",
     lambda tmp: ["--config", str(_binary_file(tmp)), "--output", str(tmp / "out")],
     r"is not a text YAML file"),
    ("override not YAML", "pretrain", _pretrain("train.lr=[1"), r"override 'train.lr=\[1'.*not valid YAML"),
    # ---- pretrain ----
    # ---- converters ----
    # ---- transfer linear / knn / suite ----
    # ---- transfer detect ----
    # ---- transfer segment ----
    # ---- transfer report ----
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
