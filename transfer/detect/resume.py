"""What `transfer detect --resume` may continue, for both engines: only a run of the same
weights and the same defining settings, and only from a checkpoint this tool wrote in its
folder (a plain name there, a .pth read without running pickled code).

Every run writes DIR/run_identity.json (the engine, the weights' sha256, every config value
that defines the run, the images per process) before it trains. A resume compares it with
the run asking to resume and refuses, in one line listing what differs, before anything is
written: otherwise the old model would be continued (or, finished, only re-evaluated) and
labelled with the new weights or settings. A fresh run removes the checkpoint markers of an
earlier run, so a later --resume can never pick up another run's model.
"""
import json
import re
from pathlib import Path

from mocobench.errors import UserError
from mocobench.fileio import atomic_json, sha256_file
from transfer.detect.config import items

IDENTITY = "run_identity.json"
MARKERS = {"torchvision": "last_checkpoint.pth", "detectron2": "last_checkpoint"}
# Where and how fast the run goes, not what it computes; the label is a name in tables.
MAY_CHANGE = ("OUTPUT_DIR", "MODEL.DEVICE", "MODEL.WEIGHTS", "DATALOADER.NUM_WORKERS",
              "SOLVER.CHECKPOINT_PERIOD", "TEST.EVAL_PERIOD", "CUDNN_BENCHMARK")
# Detectron2's PeriodicCheckpointer names: what `last_checkpoint` may name.
D2_CHECKPOINT = re.compile(r"^model_(\d{7}|final)\.pth$")


def identity(engine: str, cfg: dict, weights: str, arch: str | None, world: int) -> dict:
    """What defines the run (JSON-plain, so that a saved one compares equal)."""
    config = {k: v for k, v in items(cfg) if k not in MAY_CHANGE}
    if weights == "random":
        digest = f"random init ({arch})"
    else:
        digest = sha256_file(weights) if Path(weights).is_file() else f"{weights} (unreadable)"
    batch = cfg["SOLVER"]["IMS_PER_BATCH"]
    ident = {"engine": engine, "weights_sha256": digest, "images_per_process": batch / world,
             "config": config}
    return json.loads(json.dumps(ident))


def _short(value) -> str:
    text = str(value)
    return text[:12] + "..." if len(text) > 24 and re.fullmatch(r"[0-9a-f]+", text) else text


def differences(saved: dict, now: dict) -> list[str]:
    absent = "(absent)"
    out = [f"{k} ({_short(saved.get(k, absent))} -> {_short(now.get(k, absent))})"
           for k in ("engine", "weights_sha256", "images_per_process") if saved.get(k) != now.get(k)]
    a, b = saved.get("config", {}), now.get("config", {})
    out += [f"{k} ({a.get(k, absent)} -> {b.get(k, absent)})" for k in sorted(set(a) | set(b))
            if a.get(k, absent) != b.get(k, absent)]
    return out


def prepare(out: Path, ident: dict, resume: bool) -> bool:
    """Before the run writes anything: whether it resumes (a checkpoint of the same run is in
    `out`); refuse a resume of another run. A fresh run forgets earlier checkpoints."""
    out = Path(out)
    marker = out / MARKERS[ident["engine"]]
    if resume and marker.exists():
        path = out / IDENTITY
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            raise UserError(f"cannot resume in {out}: its checkpoint has no readable {IDENTITY} saying which "
                            f"weights and settings it was trained with; choose another --output, or run "
                            f"without --resume to start afresh") from None
        differ = differences(saved, ident)
        if differ:
            raise UserError(f"cannot resume in {out}: the run there differs in {', '.join(differ)}; a "
                            f"resume may change only {', '.join(MAY_CHANGE)}: use that run's weights and "
                            f"settings, or choose another --output for a new run")
        return True
    for name in MARKERS.values():
        (out / name).unlink(missing_ok=True)
    atomic_json(ident, out / IDENTITY)
    return False


def detectron2_checkpoint(out: Path) -> Path:
    """The checkpoint `out/last_checkpoint` names, if it is one Detectron2's trainer wrote here
    (model_NNNNNNN.pth or model_final.pth, a plain name in `out`); else one line."""
    marker = Path(out) / MARKERS["detectron2"]
    name = marker.read_text().strip()
    if not D2_CHECKPOINT.fullmatch(name):
        raise UserError(f"{marker} names {name[:80]!r}, not a checkpoint this tool writes (model_NNNNNNN.pth "
                        f"or model_final.pth in {out}); remove {marker} and run without --resume")
    path = Path(out) / name
    if not path.is_file():
        raise UserError(f"{marker} names {name}, which is not in {out}; remove {marker} and run without --resume")
    return path
