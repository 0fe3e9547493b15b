"""Files the suite writes: atomic saves, content hashes, the one way to prepare an output
folder (create, prove writable, check room, lock), and where caches live.

A kill during a save never leaves a broken file; two runs never write one folder.
"""
import datetime
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from mocobench.errors import UserError

# The format tag of `python -m pretrain` checkpoints: pretrain writes it, converters read it.
PRETRAIN_CHECKPOINT_FORMAT = "moco-bench.pretrain/1"


def pretrain_backbone_prefix(method: str) -> str:
    """Where a pretrain checkpoint of `method` keeps the backbone in its state_dict: the one
    encoder of supervised pretraining, MoCo's query encoder (never the momentum encoder)."""
    return "encoder." if method == "supervised" else "encoder_q."


def checksum_matches(ckpt: dict) -> bool:
    """Whether ckpt["checksum"] is the tensor_digest of everything else in it, as a pretrain
    checkpoint is stamped: a flipped byte anywhere (tensor or value) makes it False."""
    return ckpt.get("checksum") == tensor_digest({k: v for k, v in ckpt.items() if k != "checksum"})
LOCK_NAME = ".moco-bench.lock"


def slug(text: str, keep: str = "") -> str:
    """THE file/folder name made from a label: lower case; each run of characters other than
    a-z, 0-9 and those in `keep` becomes one "-"; none at either end ("MoCo v2 (demo)" ->
    "moco-v2-demo"). Used for the bench's row folders, report's chart files and sweep points."""
    name = re.sub(f"[^a-z0-9{re.escape(keep)}]+", "-", str(text).lower()).strip("-")
    return name or "unnamed"


def atomic_write(path, write_fn) -> None:
    """Call write_fn(tmp_path), fsync, then rename over `path` (atomic on POSIX).

    The temporary file is `path`'s own name inside a fresh hidden folder beside it, so
    formats that record their file name (torch.save's zip records the name's stem)
    write the same bytes for the same contents, whatever the temporary name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = os.path.join(tmp_dir, path.name)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # give the file normal permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def remove_stale_temporaries(folder, name: str) -> list[Path]:
    """Delete what killed saves of `folder/name` left behind (atomic_write's hidden
    temporaries); call it while holding the folder's lock, so no live save is touched."""
    stale = sorted(Path(folder).glob(f".{name}.*.tmp"))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


def ensure_room(folder, need_bytes: int, what: str) -> None:
    """Refuse to start a long stage whose output cannot be written: a file must really
    be creatable in `folder` (os.access misses read-only mounts and full quotas) and
    `need_bytes` must be free."""
    folder = Path(folder)
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write {what} in {folder}: {parent} is a file, not a "
                                "folder; choose another output folder")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(b"\0")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write {what} in {folder} ({e.strerror or e}); "
                        "choose another output folder") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise UserError(f"only {free / 2**20:.0f} MiB free in {folder} but {what} need about "
                        f"{need_bytes / 2**20:.0f} MiB; free disk space or choose another output folder")


# ----------------------------------------------------------------------------- output folders

class OutputLock:
    """An exclusive lock on an output folder, held by this process until `release()` (or
    its exit: the kernel drops a flock with the last descriptor, so a killed run never
    leaves a stale lock; forked children that inherited it keep it while they live)."""

    _held: dict = {}  # resolved folder -> [OutputLock, depth]: re-entrant within a process

    def __init__(self, folder: Path, fd: int):
        self.folder, self.fd = folder, fd

    def release(self) -> None:
        entry = OutputLock._held.get(self.folder)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del OutputLock._held[self.folder]
            os.close(self.fd)  # closing the descriptor releases the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _holder_text(info: dict) -> str:
    if not info:
        return "another process"
    command = " ".join(info.get("argv") or [])
    if len(command) > 160:  # keep the line short, but never cut it mid-path without saying so
        command = command[:150] + " ... (full command in .moco-bench.lock)"
    return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"
            + (f" ({command})" if command else ""))


def lock_output(folder, what: str) -> OutputLock:
    """Take the exclusive lock of `folder` for `what` (e.g. "pretraining"), or refuse in one
    line naming the holder. Works across machines on file systems with flock (NFS v4, Lustre
    with flock enabled); re-entrant within one process."""
    folder = Path(folder).resolve()
    if folder in OutputLock._held:
        OutputLock._held[folder][1] += 1
        return OutputLock._held[folder][0]
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot create the lock file {path} ({e.strerror or e}); "
                        "choose another output folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            info = json.loads(os.pread(fd, 65536, 0) or b"{}")
        except (OSError, ValueError):
            info = {}
        os.close(fd)
        raise UserError(f"{folder} is in use by {_holder_text(info)}; two runs must not write one "
                        f"folder: wait for it to end, or choose another output folder for this "
                        f"{what}") from None
    except OSError as e:  # a file system without flock
        os.close(fd)
        raise UserError(f"cannot lock {path} ({e.strerror or e}); choose an output folder on a file "
                        "system that supports flock") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "argv": sys.argv,
            "since": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    lock = OutputLock(folder, fd)
    OutputLock._held[folder] = [lock, 1]
    return lock


def prepare_output(folder, what: str, need_bytes: int = 0, lock: bool = True) -> OutputLock | None:
    """The one preparation of every output folder, before any long work: create it, prove a
    real file can be written there, check `need_bytes` are free, and (lock=True) take its
    exclusive lock. Each step that fails is one line saying what to do. Returns the lock
    (release it, or use it as a context manager), or None with lock=False."""
    ensure_room(folder, need_bytes, what)
    return lock_output(folder, what) if lock else None


# ----------------------------------------------------------------------------- saving

def atomic_torch_save(obj, path) -> None:
    import torch  # here, so that reading results.json does not pay for importing torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _no_nan(x):
    """NaN and infinities are not JSON (json.dump would write bare NaN): they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x


def atomic_json(obj, path) -> None:
    """Strict JSON (NaN written as null), atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(_no_nan(obj), f, indent=2, sort_keys=False, default=str, allow_nan=False)
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


# ----------------------------------------------------------------------------- places

def cache_root() -> Path:
    """Where the suite caches what it can rebuild (features, demo scenes, downloads):
    $MOCO_BENCH_CACHE, else $XDG_CACHE_HOME/moco-bench, else ~/.cache/moco-bench."""
    root = os.environ.get("MOCO_BENCH_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moco-bench"


def git_sha() -> str | None:
    """The commit of the code that ran (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None
