"""The Detectron2 engine: MoCo's detection protocol on Detectron2 (the reference).

What it adds to Detectron2's DefaultTrainer, following facebookresearch/moco@7397dfe
detection/train_net.py:

- ``Res5ROIHeadsExtraNorm`` registered in ROI_HEADS_REGISTRY on import (the extra norm after
  res5 in the C4 head; forgetting to register it is moco#121 / detectron2#3855).
- Evaluators picked by the data set's layout: PascalVOCDetectionEvaluator for VOC,
  COCOEvaluator (box, and mask when MODEL.MASK_ON) for COCO; evaluation runs once, at the end,
  after PreciseBN (DefaultTrainer's hooks, TEST.EVAL_PERIOD 0).
- The pretrained weights are loaded by a DetectionCheckpointer whose load report (missing keys,
  unexpected keys, shape mismatches) is checked: a backbone key left unset is refused, instead
  of the one log line Detectron2 prints.
- One process works: at world size 1 SyncBN/naiveSyncBN become BN (said in the log), and the
  device falls back to the CPU when CUDA is absent. More GPUs/machines go through
  detectron2.engine.launch.
"""
import logging
import re
from pathlib import Path

import torch
import yaml

from mocobench.errors import UserError
from transfer.detect import config as dcfg
from transfer.detect import datasets as ds

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultTrainer, default_setup, launch
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads
from detectron2.utils import comm

logger = logging.getLogger("detectron2.moco_bench")  # a child of "detectron2": its console + log.txt
SYNC_NORMS = ("SyncBN", "naiveSyncBN")
NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM")


class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads with one more norm layer (MODEL.RESNETS.NORM) after res5, as in the MoCo
    paper's C4 detector. The layer is new (not in the pretrained weights): roi_heads.res5.norm.*."""

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        res5 = ret["res5"]
        res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, res5[-1].out_channels))
        return ret


if "Res5ROIHeadsExtraNorm" not in ROI_HEADS_REGISTRY:
    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)
elif ROI_HEADS_REGISTRY.get("Res5ROIHeadsExtraNorm") is not Res5ROIHeadsExtraNorm:
    logger.warning("Res5ROIHeadsExtraNorm was already registered by other code; using that one")


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        kind = MetadataCatalog.get(dataset_name).get("evaluator_type")
        if kind == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        folder = output_folder or str(Path(cfg.OUTPUT_DIR) / "inference")
        return COCOEvaluator(dataset_name, tasks=tasks, distributed=True, output_dir=folder)

    @classmethod
    def build_train_loader(cls, cfg):
        loader = super().build_train_loader(cfg)  # loads the data set, which fills thing_classes
        classes = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes") or []
        if len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise UserError(f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but "
                            f"{cfg.DATASETS.TRAIN[0]} has {len(classes)} classes; pass "
                            f"MODEL.ROI_HEADS.NUM_CLASSES {len(classes)}")
        return loader


class ReportingCheckpointer(DetectionCheckpointer):
    """A DetectionCheckpointer that keeps the load report of its last load() in `.report`
    (fvcore's _IncompatibleKeys: missing_keys, unexpected_keys, incorrect_shapes)."""

    report = None

    def _load_model(self, checkpoint):
        self.report = super()._load_model(checkpoint)
        return self.report


# Parameters the pretrained ResNet must provide: the backbone's stem/res2-res4 (C4; FPN nests them
# in bottom_up and adds res5) and the res5 blocks of the C4 head. Everything else is new: RPN,
# box/mask heads, FPN convs and the extra norm after res5 (roi_heads.res5.norm).
PRETRAINED = re.compile(r"^(backbone\.(bottom_up\.)?(stem|res[2-5])\.|roi_heads\.res5\.\d+\.)")


def load_pretrained(model, path) -> dict:
    """Load a Detectron2 .pkl backbone into `model`; return the report, and refuse (UserError) a
    load that leaves a pretrained backbone key unset or drops one for a shape mismatch.
    BN num_batches_tracked counters are not weights (Detectron2's FrozenBN has none)."""
    ck = ReportingCheckpointer(model)
    ck.load(str(path))
    r = ck.report
    missing = [k for k in r.missing_keys if PRETRAINED.match(k) and not k.endswith("num_batches_tracked")]
    shapes = [k for k, *_ in r.incorrect_shapes if PRETRAINED.match(k)]
    if missing or shapes:
        bad = missing or shapes
        raise UserError(f"{path}: {len(missing)} backbone keys missing, {len(shapes)} with the wrong shape "
                        f"(e.g. {bad[0]}); the weights do not fit this config's backbone "
                        f"(check MODEL.RESNETS.DEPTH/NUM_GROUPS/WIDTH_PER_GROUP/RES2_OUT_CHANNELS)")
    return {"missing_keys": list(r.missing_keys), "unexpected_keys": list(r.unexpected_keys),
            "incorrect_shapes": [list(map(str, x)) for x in r.incorrect_shapes]}


def build_cfg(path, opts) -> CfgNode:
    """Detectron2's config + our DATASETS.ROOT/SCENES keys, merged from `path` and KEY VALUE `opts`."""
    cfg = get_cfg()
    cfg.DATASETS.ROOT = dcfg.EXTRA["DATASETS"]["ROOT"]
    cfg.DATASETS.SCENES = CfgNode(dict(dcfg.EXTRA["DATASETS"]["SCENES"]))
    if not Path(path).is_file():
        raise UserError(f"config file {path} does not exist; pass an existing YAML file to --config "
                        f"(the shipped ones are in configs/detection/)")
    try:
        cfg.merge_from_file(str(path))
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError, yaml.YAMLError) as e:
        why = str(e).strip().strip("'\"").splitlines()[0]
        raise UserError(f"config {path}: {why}; keys and types are those of Detectron2's "
                        f"detectron2/config/defaults.py (plus DATASETS.ROOT and DATASETS.SCENES.*)") from None
    return cfg


def plain(cfg: CfgNode) -> dict:
    return yaml.safe_load(cfg.dump())


def check_model_support(cfg: CfgNode) -> None:
    if cfg.MODEL.ROI_HEADS.NAME.startswith("Res5ROIHeads") and cfg.MODEL.RESNETS.DEPTH in (18, 34):
        raise UserError(f"Detectron2's Res5ROIHeads builds a bottleneck res5, so C4 needs R50 or deeper "
                        f"(MODEL.RESNETS.DEPTH is {cfg.MODEL.RESNETS.DEPTH}); use an FPN config for "
                        f"R18/R34 (e.g. configs/detection/demo_scenes_voc_R18_FPN.yaml) or --engine torchvision")


def _register(specs) -> None:
    for spec in specs:
        ds.register_detectron2(spec)
        if spec.kind == "voc":
            MetadataCatalog.get(spec.name).set(evaluator_type="pascal_voc")


def _worker(cfg_text: str, job: dict):
    """Runs in every process that Detectron2's launch starts (or in-process at world size 1)."""
    import time
    from argparse import Namespace

    from transfer.results import write_results

    cfg = get_cfg()
    cfg.DATASETS.ROOT = ""
    cfg.DATASETS.SCENES = CfgNode(dict(dcfg.EXTRA["DATASETS"]["SCENES"]))
    cfg.merge_from_other_cfg(CfgNode.load_cfg(cfg_text))
    notes = []
    for key in NORM_KEYS:
        value = dcfg.get(cfg, key)
        if comm.get_world_size() == 1 and value in SYNC_NORMS:
            notes.append(f"{key} {value} -> BN at world size 1")
            dcfg.set_value(cfg, key, "BN")
    cfg.freeze()
    default_setup(cfg, Namespace(config_file=job["config_file"], eval_only=False, resume=job["resume"]))
    for n in notes:
        logger.warning(n)
    _register(job["train_specs"] + job["test_specs"])

    trainer = Trainer(cfg)
    report = None
    if job["resume"] and trainer.checkpointer.has_checkpoint():
        trainer.resume_or_load(resume=True)
    else:
        report = load_pretrained(trainer.model, cfg.MODEL.WEIGHTS)
        logger.info(f"pretrained weights {cfg.MODEL.WEIGHTS}: every backbone key loaded; new (random) "
                    f"keys: {len(report['missing_keys'])}, unused file keys: {len(report['unexpected_keys'])}")
    trainer.train()
    if not comm.is_main_process():
        return None
    # DefaultTrainer.train() returns the evaluation only when TEST.EXPECTED_RESULTS is set; the
    # final EvalHook always leaves it here.
    results = getattr(trainer, "_last_eval_results", None) or {}
    if "bbox" not in results:
        raise UserError(f"evaluation on {cfg.DATASETS.TEST[0]} returned no box metrics ({list(results)}); "
                        f"see {cfg.OUTPUT_DIR}/log.txt")
    metrics = {}
    for task, prefix in (("bbox", ""), ("segm", "mask_")):
        for k in ("AP", "AP50", "AP75"):
            if task in results:
                metrics[prefix + k] = float(results[task][k])
    splits = {n: len(DatasetCatalog.get(n)) for n in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)}
    record = plain(cfg)
    record["RUN"] = {**job["run"], "world_size": comm.get_world_size(), "norm": notes,
                     "ims_per_batch_per_rank": cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(),
                     "load_report": report}
    path = write_results(
        cfg.OUTPUT_DIR, task="detect",
        dataset={"name": f"{'+'.join(cfg.DATASETS.TRAIN)} -> {cfg.DATASETS.TEST[0]}", "splits": splits},
        weights=job["weights_record"], engine="detectron2", protocol=job["protocol"], config=record,
        seed=cfg.SEED, wall_time_s=time.time() - job["t0"], metrics=metrics)
    logger.info(f"wrote {path}")
    return path


def main(args, out: Path):
    """Parent process: read the config, convert the weights, then launch the workers."""
    import random
    import time

    import detectron2

    from converters import load_backbone, to_detectron2
    from transfer.detect import check_weights_match
    from transfer.results import weights_record

    t0 = time.time()
    cfg = build_cfg(args.config, args.opts)
    check_model_support(cfg)
    if cfg.SEED < 0:
        cfg.SEED = random.SystemRandom().randrange(2 ** 31)  # recorded, so the run can be repeated
    cfg.OUTPUT_DIR = str(out)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        print("[detect] MODEL.DEVICE asks for CUDA but none is available: running on the CPU", flush=True)
        cfg.MODEL.DEVICE = "cpu"
    if args.num_gpus * args.num_machines > 1 and not torch.cuda.is_available():
        # DefaultTrainer's create_ddp_model pins DDP to device_ids=[local rank], a GPU.
        raise UserError(f"--num-gpus {args.num_gpus} --num-machines {args.num_machines} needs one CUDA GPU per "
                        f"process and none is visible; on a CPU use --num-gpus 1")

    weights = Path(args.weights)
    try:
        bb = load_backbone(weights)
    except UserError:
        if weights.suffix != ".pkl":
            raise
        bb = None  # a Detectron2 .pkl our reader does not know (e.g. Caffe2 names): used as is
    if bb is not None:
        p = plain(cfg)
        if bb.layout != "detectron2":
            check_weights_match(bb, p)
    if weights.suffix == ".pkl":
        print(f"[detect] {weights} is a Detectron2 .pkl: loading it as is", flush=True)
        d2_weights = weights
    else:
        d2_weights = out / "weights_detectron2.pkl"
        conv = to_detectron2(bb, d2_weights, verify=True)
        for line in conv["checks"]:
            print(f"[detect] converted {weights} -> {d2_weights}: {line}", flush=True)
    cfg.MODEL.WEIGHTS = str(d2_weights)

    p = plain(cfg)
    train_specs, test_specs = ds.resolve_all(p)  # composes the demo scenes here, once, before launch
    job = {
        "config_file": str(args.config), "resume": args.resume, "train_specs": train_specs,
        "test_specs": test_specs, "protocol": Path(args.config).stem, "t0": t0,
        "weights_record": weights_record(args.weights, args.label, bb.layout if bb else "detectron2"),
        "run": {"detectron2_version": detectron2.__version__, "device": cfg.MODEL.DEVICE,
                "num_gpus": args.num_gpus, "num_machines": args.num_machines,
                "converted_weights": str(d2_weights), "arch": bb.arch if bb else None,
                "datasets": {s.name: s.describe() for s in train_specs + test_specs}},
    }
    launch(_worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(cfg.dump(), job))
    return out / "results.json"
