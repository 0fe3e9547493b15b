"""python -m transfer detect: detection fine-tuning of a pretrained ResNet.

    python -m transfer detect --config configs/detection/pascal_voc_R_50_C4_24k.yaml \\
        --weights CKPT --output DIR [--engine auto|detectron2|torchvision] [--num-gpus N] \\
        [--num-machines M --machine-rank R --dist-url URL] [--resume] [KEY VALUE ...]

CKPT is any checkpoint `converters` reads (moco-bench, official MoCo, mmselfsup,
torchvision, Detectron2 .pkl). For Detectron2 it is converted and verified on the fly
(DIR/weights_detectron2.pkl) unless it already is a Detectron2 .pkl; the torchvision engine
loads it with converters.build_resnet (strict). The config's backbone settings must match
the weights (depth, groups, width, STRIDE_IN_1X1 False, RGB, the pretraining mean/std):
a mismatch is refused with the overrides to pass.

Engines: "detectron2" (the reference: MoCo's protocol, Res5ROIHeadsExtraNorm, PreciseBN,
Pascal VOC / COCO evaluators, multi-GPU/multi-node via Detectron2's launch) and
"torchvision" (always installable; a different protocol, see tv_engine). "auto" picks
Detectron2 when it imports. Metrics (AP, AP50, AP75 in percent; mask_AP, mask_AP50, mask_AP75
for Mask R-CNN) go to DIR/results.json (transfer.results).
"""
import argparse
import importlib
import sys
import time
from pathlib import Path

from mocobench.errors import UserError, cli

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


def check_weights_match(bb, cfg: dict) -> None:
    """Refuse a config whose backbone settings contradict the weights (converters knows them)."""
    from converters import detectron2_settings
    from transfer.detect.config import get

    bad = []
    for key, want in detectron2_settings(bb).items():
        have = get(cfg, key)
        if isinstance(want, list):
            same = isinstance(have, (list, tuple)) and len(have) == len(want) and all(
                abs(float(a) - float(b)) < 1e-2 for a, b in zip(have, want))
        else:
            same = have == want
        if not same:
            bad.append((key, have, want))
    if bad:
        what = "; ".join(f"{k} is {h!r}, the weights need {w!r}" for k, h, w in bad)
        fix = " ".join(f"{k} {str(w).replace(' ', '')}" for k, _, w in bad)
        raise UserError(f"config does not match the {bb.arch} weights: {what}; pass {fix}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m transfer detect", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="Detectron2-format YAML (configs/detection/*.yaml)")
    p.add_argument("--weights", required=True, help="pretrained backbone checkpoint (any converters layout)")
    p.add_argument("--output", required=True, help="output folder (results.json, logs, model)")
    p.add_argument("--engine", choices=["auto", "detectron2", "torchvision"], default="auto")
    p.add_argument("--label", default=None, help="name of the weights in tables (default: file stem)")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs per machine (Detectron2 launch)")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto", help="Detectron2 launch rendezvous, e.g. tcp://host:port")
    p.add_argument("--resume", action="store_true", help="continue from DIR's last checkpoint")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides (Detectron2 style)")
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    engine = choose_engine(args.engine)
    if args.num_gpus < 1 or args.num_machines < 1:
        raise UserError("--num-gpus and --num-machines must be at least 1")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if engine == "detectron2":
        from transfer.detect import d2_engine

        return d2_engine.main(args, out)
    if args.num_gpus > 1 or args.num_machines > 1:
        raise UserError("--num-gpus/--num-machines drive Detectron2's launcher; run the torchvision engine "
                        "under torchrun instead (torchrun --nproc_per_node N -m transfer detect ...)")
    return run_torchvision(args, out)


def run_torchvision(args, out: Path):
    from mocobench import dist
    from converters import load_backbone
    from transfer.detect import config as dcfg
    from transfer.detect import datasets as ds
    from transfer.detect import tv_engine
    from transfer.results import weights_record, write_results

    t0 = time.time()
    cfg = dcfg.load(args.config, args.opts)
    cfg["OUTPUT_DIR"] = str(out)
    bb = load_backbone(args.weights)
    check_weights_match(bb, cfg)
    tv_engine.check_config(cfg)
    ds.resolve_all(cfg)  # fails early on missing data; composes demo scenes (safe on every rank)
    result = tv_engine.run(cfg, bb, out, resume=args.resume)  # fills in SEED when it is -1
    if not dist.is_main_process():
        return None
    train, test = cfg["DATASETS"]["TRAIN"], cfg["DATASETS"]["TEST"]
    stem = Path(args.config).stem
    record = dict(cfg)
    record["RUN"] = {**result["run"], "engine_note": tv_engine.__doc__.split("\n")[0],
                     "weights_layout": bb.layout, "arch": bb.arch,
                     "datasets": {s.name: s.describe() for s in sum(ds.resolve_all(cfg), [])}}
    path = write_results(
        out, task="detect",
        dataset={"name": f"{'+'.join(train)} -> {test[0]}", "splits": result["splits"]},
        weights=weights_record(args.weights, args.label, bb.layout),
        engine="torchvision", protocol=f"{stem}@torchvision", config=record, seed=cfg["SEED"],
        wall_time_s=time.time() - t0, metrics=result["metrics"])
    print(f"[detect] wrote {path}", flush=True)
    return path
