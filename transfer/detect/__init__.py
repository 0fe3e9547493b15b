"""python -m transfer detect: detection fine-tuning of a pretrained ResNet.

    python -m transfer detect --config configs/detection/pascal_voc_R_50_C4_24k.yaml \\
        --weights CKPT --output DIR [--engine auto|detectron2|torchvision] [--allow-pickle] \\
        [--num-gpus N] [--num-machines M --machine-rank R --dist-url URL] [--resume] [KEY VALUE ...]

CKPT is any checkpoint `converters` reads (moco-bench, official MoCo, mmselfsup,
torchvision, Detectron2 .pkl), read without running pickled code unless --allow-pickle is
given; or ``random`` with ``--arch A`` for the random-init baseline. For Detectron2 it is
converted and verified on the fly into DIR/weights_detectron2.pkl (a clean file of arrays:
the only weights Detectron2 ever unpickles); the torchvision engine loads it with
converters.build_resnet (strict). The config's backbone settings must match the weights
(depth, groups, width, STRIDE_IN_1X1 False, RGB, the pretraining mean/std): a mismatch is
refused with the overrides to pass.

Engines: "detectron2" (the reference: MoCo's protocol, Res5ROIHeadsExtraNorm, PreciseBN,
multi-GPU/multi-node via Detectron2's launch) and "torchvision" (always installable; a
different protocol, see tv_engine). "auto" picks Detectron2 when it imports. Both read the
data with one reader (datasets) and score the same way (metrics): VOC data with
Detectron2's VOC07 evaluator, COCO data with COCOeval. Metrics (AP, AP50, AP75 in percent;
mask_AP* for Mask R-CNN) go to DIR/results.json (transfer.results), the per-image
detections and the evaluated ground truth beside it (transfer.outcomes). See
docs/detection.md.
"""
import argparse
import importlib
import os
import sys
from pathlib import Path

from mocobench.errors import UserError, cli
from mocobench.fileio import prepare_output

D2_INSTALL = ("pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git' "
              "(it builds against the installed torch)")


def detectron2_status() -> str | None:
    """None when Detectron2 imports with its compiled ops; else why not, in a few words."""
    try:
        importlib.import_module("detectron2")
        importlib.import_module("detectron2._C")
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken build's OSError
        return f"{type(e).__name__}: {e}"
    return None


def choose_engine(requested: str) -> str:
    if requested == "torchvision":
        return "torchvision"
    why = detectron2_status()
    if requested == "detectron2":
        if why:
            raise UserError(f"Detectron2 is not importable ({why.splitlines()[0]}); install it from source "
                            f"with {D2_INSTALL}, or use --engine torchvision")
        return "detectron2"
    if why:
        print(f"[detect] Detectron2 not importable ({why.splitlines()[0]}): using the torchvision engine",
              flush=True)
        return "torchvision"
    return "detectron2"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m transfer detect", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="Detectron2-format YAML (configs/detection/*.yaml)")
    p.add_argument("--weights", required=True,
                   help="pretrained backbone checkpoint (any converters layout), or 'random' with --arch")
    p.add_argument("--arch", default=None, help="required with --weights random; else checked against the file")
    p.add_argument("--allow-pickle", action="store_true",
                   help="let the checkpoint's pickled Python objects run (only for a file you trust)")
    p.add_argument("--output", required=True, help="output folder (results.json, logs, model)")
    p.add_argument("--engine", choices=["auto", "detectron2", "torchvision"], default="auto")
    p.add_argument("--label", default=None, help="name of the weights in tables (default: method and "
                   "epochs from the checkpoint, else folder/stem)")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs per machine (Detectron2 launch)")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto", help="Detectron2 launch rendezvous, e.g. tcp://host:port")
    p.add_argument("--resume", action="store_true", help="continue from DIR's last checkpoint")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides (Detectron2 style)")
    return p.parse_args(argv)


def _check_launch(args, engine: str) -> None:
    if args.num_gpus < 1 or args.num_machines < 1:
        raise UserError("--num-gpus and --num-machines must be at least 1")
    if not 0 <= args.machine_rank < args.num_machines:
        raise UserError(f"--machine-rank {args.machine_rank} must be in 0..{args.num_machines - 1}")
    if args.num_machines > 1 and args.dist_url == "auto":  # Detectron2's launch asserts on it
        raise UserError(f"--num-machines {args.num_machines} needs a rendezvous all machines reach: pass "
                        f"--dist-url tcp://<machine 0's address>:<free port>, the same on every machine")
    if engine == "torchvision" and (args.num_gpus > 1 or args.num_machines > 1):
        raise UserError("--num-gpus/--num-machines drive Detectron2's launcher; run the torchvision engine "
                        "under torchrun instead (torchrun --nproc_per_node N -m transfer detect ...)")


def run_identity(args, engine: str) -> dict:
    """What defines this run (resume.identity), from its config as the engine reads it."""
    from transfer.detect import resume

    if engine == "detectron2":
        from transfer.detect import d2_engine

        cfg = d2_engine.plain(d2_engine.build_cfg(args.config, args.opts))
        world = args.num_gpus * args.num_machines
    else:
        from transfer.detect import config as dcfg

        cfg = dcfg.load(args.config, args.opts)
        world = int(os.environ.get("WORLD_SIZE", "1"))
    return resume.identity(engine, cfg, args.weights, args.arch, world)


def _prepare_folder(out: Path, lead: bool, args, engine: str):
    """Create, prove writable and lock the output folder (the first process only: other ranks
    and machines write into the folder it holds); refuse a resume of another run before
    anything is written."""
    from transfer.detect import resume
    from transfer.results import start_run

    ident = run_identity(args, engine) if lead else None
    lock = prepare_output(out, "detection run", lock=lead)
    if lead:
        resume.prepare(out, ident, args.resume)
        start_run(out)  # a run that then fails leaves no results.json for `report` to read
    return lock


@cli
def main(argv=None):
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    engine = choose_engine(args.engine)
    _check_launch(args, engine)
    out = Path(args.output)
    lead = int(os.environ.get("RANK", "0")) == 0 and args.machine_rank == 0  # torchrun / Detectron2 launch
    lock = _prepare_folder(out, lead, args, engine)
    try:
        if engine == "detectron2":
            from transfer.detect import d2_engine

            return d2_engine.main(args, out)
        return run_torchvision(args, out)
    finally:
        if lock is not None:
            lock.release()


def run_torchvision(args, out: Path):
    from transfer.detect import config as dcfg
    from transfer.detect import tv_engine
    from transfer.detect.tv_model import check_config
    from transfer.detect.weights import check_weights_match, load_weights

    cfg = dcfg.load(args.config, args.opts)
    explicit = dcfg.explicit_keys(args.config, args.opts)
    cfg["OUTPUT_DIR"] = str(out)
    bb, weights = load_weights(args.weights, args.arch, args.allow_pickle, args.label)
    check_weights_match(bb, cfg)
    check_config(cfg)
    path = tv_engine.run(cfg, bb, weights, out, name=Path(args.config).stem, explicit=explicit,
                         resume=args.resume)
    if path:
        print(f"[detect] wrote {path}", flush=True)
    return path
