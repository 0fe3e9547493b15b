"""Checkpoints of `python -m pretrain`: what an exact resume needs, written so that a kill or a
full disk never costs more than the work since the last one, and read back only after its
checksum, its model and its config have been checked against the run that resumes it.

A checkpoint holds both encoders (or the one that learns), the queue or memory bank, the
optimizer and grad scaler, the progress (epoch, step into it, total steps), every rank's RNG
states, and the resolved config. `log.jsonl` is cut back to the resumed step, so a resumed
run's log never repeats steps.
"""
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mocobench import dist
from mocobench.config import to_dict
from mocobench.errors import UserError
from mocobench.fileio import (PRETRAIN_CHECKPOINT_FORMAT, atomic_torch_save, atomic_write, checksum_matches,
                              ensure_room, git_sha, pretrain_backbone_prefix, tensor_digest)
from mocobench.state import compare_state
from pretrain.config import MAY_CHANGE_ON_RESUME, PretrainConfig, method_name

LAST = "checkpoint_last.pth"
LOG = "log.jsonl"


def periodic_name(epoch: int) -> str:
    return f"checkpoint_ep{epoch:04d}.pth"


@dataclass
class Progress:
    epoch: int = 0  # completed epochs
    epoch_step: int = 0  # optimizer steps into epoch `epoch` (0 at an epoch end)
    step: int = 0  # optimizer steps in all


# ============ RNG ============
def rng_states() -> dict:
    """Every rank's RNG states, rank r's in row r: a collective, every rank calls it. Each
    rank's CUDA state is its own device's (a rank draws on no other device)."""
    states = {"torch": dist.all_gather_no_grad(torch.get_rng_state()[None]), "cuda": []}
    if torch.cuda.is_available():
        states["cuda"] = dist.all_gather_no_grad(torch.cuda.get_rng_state()[None])
    return states


def restore_rng(states: dict) -> None:
    """This rank's RNG states from `rng_states()`'s rows (a checkpoint of another world size
    gives rank r the states of rank r mod its world size: the run continues, not bit-exactly)."""
    rank = dist.get_rank()
    cpu = states["torch"]
    cpu = cpu[None] if cpu.dim() == 1 else cpu  # one state for every rank (older checkpoints)
    # clone: set_rng_state reads a row of the stacked states from the start of its storage
    torch.set_rng_state(cpu[rank % len(cpu)].clone())
    if torch.cuda.is_available() and len(states.get("cuda", [])):
        torch.cuda.set_rng_state(states["cuda"][rank % len(states["cuda"])].clone())


# ============ writing ============
def make_checkpoint(cfg: PretrainConfig, model, optimizer, scaler, progress: Progress,
                    rng: dict, num_images: int) -> dict:
    ckpt = {
        "format": PRETRAIN_CHECKPOINT_FORMAT,
        "arch": cfg.model.arch,
        "method": method_name(cfg),
        "backbone_prefix": pretrain_backbone_prefix(method_name(cfg)),
        "epoch": progress.epoch,
        "epoch_step": progress.epoch_step,
        "step": progress.step,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        "normalization": {"mean": cfg.data.mean, "std": cfg.data.std, "input_format": "RGB"},
        "image_size": cfg.data.image_size,
        "num_images": num_images,
        "config": to_dict(cfg),
        "world_size": dist.get_world_size(),
        "git_sha": git_sha(),
    }
    ckpt["checksum"] = tensor_digest(ckpt)
    return ckpt


def save_checkpoint(path: Path, ckpt: dict) -> None:
    """Write atomically (temp file + rename: the previous file stays until then); a disk that
    fills up on the way is one line, torch's zip writer's RuntimeError included."""
    try:
        atomic_torch_save(ckpt, path)
    except (OSError, RuntimeError) as e:
        writer_failed = "inline_container" in str(e) or "PytorchStreamWriter" in str(e)
        if isinstance(e, RuntimeError) and not writer_failed:
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "torch's file writer failed"
        free = shutil.disk_usage(path.parent).free / 2**20
        raise UserError(f"cannot write checkpoint {path} ({reason}; {free:.0f} MiB free there); the "
                        "previous checkpoint is intact: free disk space or choose another --output, "
                        "then re-run to resume") from None


def check_disk_space(out: Path, model: torch.nn.Module, optimizer) -> None:
    """Refuse to start a run whose checkpoints cannot be written: a checkpoint holds the
    model, the optimizer's buffers, and while being replaced exists twice."""
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    n_bytes += sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"])
    ensure_room(out, 2 * n_bytes, "checkpoints")


def truncate_log(path: Path, step: int) -> None:
    """Keep the records of `path` (log.jsonl) up to `step`: what the resumed run does not redo.
    A line cut short by a kill is dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))


# ============ reading ============
def load_checkpoint(path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; --resume takes a checkpoint file, e.g. {path / LAST}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist; pass an existing file to --resume") from None
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive; a truncated one still starts so
        raise UserError(f"{path} is not a pretrain checkpoint (not a file written by torch.save, "
                        "e.g. a Detectron2 .pkl); --resume takes a checkpoint written by python -m pretrain")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is truncated or "
                        "corrupt: resume from an earlier checkpoint_epNNNN.pth") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != PRETRAIN_CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a pretrain checkpoint (format {PRETRAIN_CHECKPOINT_FORMAT}); "
                        "--resume takes a checkpoint written by python -m pretrain")
    if not checksum_matches(ckpt):
        raise UserError(f"checkpoint {path} is corrupt (checksum mismatch); "
                        "resume from an earlier checkpoint_epNNNN.pth")
    return ckpt


def find_resume(out: Path):
    """The newest valid checkpoint in `out` (last, then periodic ones), or (None, None).
    A broken file is reported in one line and skipped, never silently used."""
    periodic = sorted(out.glob("checkpoint_ep*.pth"), reverse=True)
    candidates = [p for p in [out / LAST, *periodic] if p.exists()]
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            if dist.is_main_process():
                print(f"warning: skipping {e}", file=sys.stderr, flush=True)
    if candidates:
        raise UserError(f"no valid checkpoint in {out} ({len(candidates)} found, all broken); "
                        "remove them to start afresh or pass --resume with a good file")
    return None, None


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_resumable(ckpt: dict, cfg: PretrainConfig, path, num_images: int) -> None:
    """Refuse, in one line listing every difference, to resume a run whose settings are not
    the checkpoint's (except the MAY_CHANGE_ON_RESUME fields), or whose data has another size."""
    saved, now = _flatten(ckpt.get("config", {})), _flatten(to_dict(cfg))
    absent = "(absent)"
    differ = [f"{key} ({saved.get(key, absent)} -> {now.get(key, absent)})"
              for key in sorted(set(saved) | set(now))
              if key not in MAY_CHANGE_ON_RESUME and saved.get(key, absent) != now.get(key, absent)]
    if ckpt.get("num_images", num_images) != num_images:
        differ.append(f"the number of training images ({ckpt['num_images']} -> {num_images})")
    if differ:
        raise UserError(
            f"cannot resume from {path}: the run differs in {', '.join(differ)}; a resumed run may "
            "change only train.epochs, train.max_steps, the print/save/kNN/probe settings, train.amp, "
            "train.channels_last, data.num_workers, data.max_unreadable and data.source (same images): "
            "use the checkpoint's values, or choose another --output for a new run")


def restore(ckpt: dict, path, model, optimizer, scaler) -> Progress:
    """Load `ckpt` into the run (model, optimizer, scaler, this rank's RNG); its progress."""
    compare_state(ckpt["state_dict"], model.state_dict(), values=False).refuse_unless_equal(
        f"checkpoint {path}", then="it was written for another model: choose another --output")
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"])
    return Progress(ckpt["epoch"], ckpt["epoch_step"], ckpt["step"])
