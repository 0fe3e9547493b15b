"""What several test modules share: running a tiny real pretraining (plain, under torchrun, or
with a fault injected), two-process gloo groups, one-line error checks, a backbone with signal made
honestly and cheaply (`supervised_checkpoint`), and a really full small file system. Imported as `helpers`
(pyproject's pytest `pythonpath` puts tests/ first)."""
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Detectron2 is built from its git repository, not installed from PyPI: CI has none.
NEEDS_DETECTRON2 = pytest.mark.skipif(importlib.util.find_spec("detectron2") is None,
                                      reason="detectron2 is not installed (built from its repository; see README)")

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs/pretrain/moco_v2_fmnist_demo.yaml")
INJECT = str(ROOT / "tests/faults/inject.py")
# A few seconds of CPU: 64 Fashion-MNIST images at 32 px, batches of 16, a queue of 64.
TINY = ["model.arch=resnet18", "data.image_size=32", "data.max_images=64", "data.num_workers=0",
        "train.batch_size=16", "moco.queue_size=64", "moco.dim=16", "train.epochs=2",
        "train.print_freq=1", "moco.bn_splits=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--max-restarts={restarts}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}"]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


def pretrain_command(out, *overrides, nproc=1, script=None) -> list[str]:
    """`python -m pretrain` (or `script`, a file calling pretrain's main) on the TINY settings."""
    args = ["--config", DEMO, "--output", str(out), *TINY, *overrides]
    program = [str(script)] if script else ["-m", "pretrain"]
    if nproc > 1:
        return [*_torchrun(nproc), *program, *args]
    return [sys.executable, *program, *args]


def run_pretrain(out, *overrides, nproc=1, extra_env=None, script=None):
    """Run pretrain_command (torchrun with `nproc` processes) and capture what it printed."""
    return subprocess.run(pretrain_command(out, *overrides, nproc=nproc, script=script),
                          capture_output=True, text=True, cwd=ROOT, env=_env(**(extra_env or {})),
                          timeout=600)


def fault_command(out, *overrides, nproc=1, restarts=0) -> list[str]:
    args = ["--config", DEMO, "--output", str(out), *TINY, *overrides]
    return [*_torchrun(nproc, restarts), INJECT, *args] if nproc > 1 else [sys.executable, INJECT, *args]


def fault_env(fault: str) -> dict:
    return _env(FAULT=fault)


def run_with_fault(out, fault, *overrides, nproc=1, restarts=0):
    """The same run with one fault of tests/faults/inject.py (FAULT=kind:args) injected."""
    return subprocess.run(fault_command(out, *overrides, nproc=nproc, restarts=restarts),
                          capture_output=True, text=True, cwd=ROOT, env=fault_env(fault), timeout=600)


def one_line_error(result, pattern):
    """A CLI run that ended with exit status 2 and exactly one `error:` line containing `pattern`."""
    assert result.returncode == 2, result.stdout[-1000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]


def tiny_moco(**kw):
    from pretrain.builder import MoCo

    args = dict(arch="resnet18", dim=16, K=32, m=0.9, T=0.2, mlp=True, bn_splits=1)
    args.update(kw)
    torch.manual_seed(0)
    return MoCo(**args)


def init_gloo(rank: int, world: int, port: int, backend: str = "gloo") -> None:
    """Join a `world`-process group on this machine (for mp.spawn workers)."""
    import torch.distributed as torch_dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group(backend, rank=rank, world_size=world)
    torch.set_num_threads(1)


def supervised_checkpoint(path: Path, size: int = 32, images: int = 1920, steps: int = 50) -> Path:
    """ResNet-18 trained supervised for `steps` Adam steps on `images` Fashion-MNIST training
    images (never the carved val or the test split), saved as a pretrain checkpoint (moco-bench
    format, so its image_size and normalization travel): a backbone with signal."""
    import torchvision
    from torchvision import transforms as T

    from mocobench.data import build_dataset
    from mocobench.fileio import PRETRAIN_CHECKPOINT_FORMAT, tensor_digest

    torch.manual_seed(0)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    tf = T.Compose([T.Resize(size), T.ToTensor(), T.Normalize(mean, std)])
    ds = build_dataset("fashion-mnist", "train", tf, max_images=images, seed=123)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor(ds.targets)
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = {"format": PRETRAIN_CHECKPOINT_FORMAT, "arch": "resnet18", "method": "supervised",
            "backbone_prefix": "encoder.", "epoch": 0, "step": steps,
            "state_dict": {f"encoder.{k}": v for k, v in model.state_dict().items()},
            "normalization": {"mean": mean, "std": std, "input_format": "RGB"}, "image_size": size}
    torch.save({**ckpt, "checksum": tensor_digest(ckpt)}, path)  # stamped as pretrain does
    return path


# ---------------------------------------------------------------- a really full file system
def mount_tmpfs(where: Path, size: str) -> None:
    """Mount a tmpfs of `size` (e.g. "256k") at `where`, or skip saying why it cannot be."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode}); "
                    "the full-disk path needs root or a user namespace")


def unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(path: Path) -> None:
    """Write `path` until its file system is full."""
    try:
        with open(path, "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str = "256k"):
    """mount_tmpfs for the duration of a `with` block (skips the test where mounting is not allowed)."""
    mount_tmpfs(where, size)
    try:
        yield where
    finally:
        unmount(where)
