"""What several test modules share (importable as `helpers`: pyproject's pytest pythonpath).

Running the CLIs as a user does (`run_pretrain`, `run_with_fault`, `one_line_error`),
a backbone with signal made honestly and cheaply (`supervised_checkpoint`), and a really
small file system (`mounted_tmpfs`).
"""
import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_DEMO = str(ROOT / "configs/pretrain/moco_v2_fmnist_demo.yaml")
INJECT = str(ROOT / "tests" / "faults" / "inject.py")
# A few seconds of CPU: 64 Fashion-MNIST images at 32 px, batches of 16, a queue of 64.
TINY_PRETRAIN = ["model.arch=resnet18", "data.image_size=32", "data.max_images=64",
                 "data.num_workers=0", "train.batch_size=16", "moco.queue_size=64", "moco.dim=16",
                 "train.epochs=2", "train.print_freq=1", "moco.bn_splits=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pretrain(out, *overrides, nproc=1, extra_env=None):
    cmd = [sys.executable, "-m", "pretrain", "--config", PRETRAIN_DEMO, "--output", str(out),
           *TINY_PRETRAIN, *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "pretrain",
               *cmd[3:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def run_with_fault(out, fault, *overrides):
    """`python -m pretrain` (one process) with FAULT injected from outside (faults/inject.py)."""
    cmd = [sys.executable, INJECT, "--config", PRETRAIN_DEMO, "--output", str(out), *TINY_PRETRAIN,
           *overrides]
    env = {**os.environ, "FAULT": fault, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def one_line_error(result, pattern: str) -> None:
    """The process ended with exit status 2 and one `error: ...` line containing `pattern`."""
    assert result.returncode == 2, result.stdout[-1000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]


def supervised_checkpoint(path: Path, size: int = 32, images: int = 1920, steps: int = 50) -> Path:
    """ResNet-18 trained supervised for `steps` Adam steps on `images` Fashion-MNIST training
    images (never the carved val or the test split), saved as a pretrain checkpoint (moco-bench
    format, so its image_size and normalization travel): a backbone with signal."""
    import torchvision
    from torchvision import transforms as T

    from mocobench.data import build_dataset

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
    torch.save({"format": "moco-bench.pretrain/1", "arch": "resnet18", "method": "supervised",
                "backbone_prefix": "encoder.", "epoch": 0, "step": steps,
                "state_dict": {f"encoder.{k}": v for k, v in model.state_dict().items()},
                "normalization": {"mean": mean, "std": std, "input_format": "RGB"},
                "image_size": size}, path)
    return path


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str = "256k"):
    """A tmpfs of `size` mounted at `where` while the block runs, or skip the test with the
    reason where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode}); "
                    "the full-disk path needs root or a user namespace")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
