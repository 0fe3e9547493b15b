"""Atomic writes and content hashes: a kill during a save never leaves a broken file."""
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from mocobench.errors import UserError


def atomic_write(path, write_fn) -> None:
    """Call write_fn(tmp_path), fsync, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def ensure_room(folder, need_bytes: int, what: str) -> None:
    """Refuse to start a long stage whose output cannot be written: a file must really
    be creatable in `folder` (os.access misses read-only mounts and full quotas) and
    `need_bytes` must be free."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(b"\0")
            f.flush()
    except OSError as e:
        raise UserError(f"cannot write {what} in {folder} ({e.strerror or e}); "
                        "choose another output folder") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise UserError(f"only {free / 2**20:.0f} MiB free in {folder} but {what} need about "
                        f"{need_bytes / 2**20:.0f} MiB; free disk space or choose another output folder")


def atomic_torch_save(obj, path) -> None:
    import torch  # here, so that reading results.json does not pay for importing torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_json(obj, path) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")

    atomic_write(path, write)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensor_digest(obj) -> str:
    """sha256 over every tensor and value in a nested dict/list, in a fixed order.

    torch.save's zip format notices a truncated file but not a flipped byte inside
    a tensor; storing this digest in a checkpoint lets the loader notice both.
    """
    import torch

    h = hashlib.sha256()

    def visit(x, path):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{path}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                visit(x[k], f"{path}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                visit(v, f"{path}/{i}")
        else:
            h.update(f"{path}={x!r}".encode())

    visit(obj, "")
    return h.hexdigest()
