"""Packaging: every package of the checkout ships, the configs ship with them and resolve
after installation, the console scripts point at real entry points."""
import importlib
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_in_the_checkout_is_listed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for top in ("mocobench", "pretrain", "converters", "transfer")
             for p in (ROOT / top).rglob("__init__.py")}
    assert found <= listed, f"add to pyproject's packages: {sorted(found - listed)}"
    # the only top-level names installed: the design's packages plus the one shared package
    assert {p.split(".")[0] for p in listed} == {"mocobench", "pretrain", "converters", "transfer"}


def test_console_scripts_name_real_entry_points():
    for name, target in PYPROJECT["project"]["scripts"].items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


def _as_console_script(target: str, argv: list[str]) -> int:
    """What pip's console-script wrapper does: sys.exit(main()), with sys.argv set."""
    module, func = target.split(":")
    entry = getattr(importlib.import_module(module), func)
    saved = sys.argv
    sys.argv = [target, *argv]
    try:
        sys.exit(entry())
    except SystemExit as e:
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = saved


def test_console_scripts_exit_0_after_a_successful_run(tmp_path):
    import torch
    import torchvision

    scripts = PYPROJECT["project"]["scripts"]
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    assert _as_console_script(scripts["moco-convert"],
                              ["torchvision", str(weights), str(tmp_path / "out.pth")]) == 0
    assert (tmp_path / "out.pth").is_file()
    report_in = ROOT / "tests/fixtures/results/good/knn"
    assert _as_console_script(scripts["moco-transfer"],
                              ["report", str(report_in), "--output", str(tmp_path / "report")]) == 0


def test_configs_resolve_from_anywhere(tmp_path, monkeypatch):
    from mocobench.config import find_config, read_yaml

    monkeypatch.chdir(tmp_path)  # not the checkout: configs/... does not exist here
    path = find_config("configs/pretrain/moco_v2_fmnist_demo.yaml")
    assert path.is_file() and path.is_absolute()
    assert read_yaml("configs/pretrain/moco_v2_fmnist_demo.yaml")["model"]
    # an existing local file always wins over the suite's copy
    (tmp_path / "configs" / "pretrain").mkdir(parents=True)
    (tmp_path / "configs/pretrain/moco_v2_fmnist_demo.yaml").write_text("model: {arch: resnet34}\n")
    assert read_yaml("configs/pretrain/moco_v2_fmnist_demo.yaml") == {"model": {"arch": "resnet34"}}
