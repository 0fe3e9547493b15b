"""The Detectron2 engine: MoCo's detection protocol on Detectron2 (the reference).

What it adds to Detectron2's DefaultTrainer, following facebookresearch/moco@7397dfe
detection/train_net.py:

- ``Res5ROIHeadsExtraNorm`` registered in ROI_HEADS_REGISTRY on import (the extra norm after
  res5 in the C4 head; forgetting to register it is moco#121 / detectron2#3855).
- The data sets read by our reader (transfer.detect.datasets, the same records the
  torchvision engine sees), checked before launch.
- One evaluator for every layout (``OutcomesEvaluator``): it collects every detection in
  COCO results format, gathers them on rank 0 and scores them with transfer.detect.metrics:
  VOC data exactly as Detectron2's PascalVOCDetectionEvaluator (VOC07 11-point AP, tested
  against it), COCO data with pycocotools' COCOeval as Detectron2's COCOEvaluator, on ground
  truth whose annotation ids are renumbered from 1. Evaluation runs once, at the end, after
  PreciseBN (DefaultTrainer's hooks, TEST.EVAL_PERIOD 0).
- The weights Detectron2 loads are always a file we wrote (DIR/weights_detectron2.pkl, plain
  arrays, verified), never the user's file: Detectron2's checkpointer unpickles .pkl files
  with plain pickle.load. Its load report (missing keys, unexpected keys, shape mismatches)
  is checked: a backbone key left unset is refused.
- One process works: at world size 1 SyncBN/naiveSyncBN become BN (said in the log), and the
  device falls back to the CPU when CUDA is absent. More GPUs/machines go through
  detectron2.engine.launch.
"""
import logging
import pickle
import random
import re
import time
from pathlib import Path

import torch
import yaml
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import DefaultTrainer, default_setup, launch
from detectron2.evaluation import DatasetEvaluator
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads
from detectron2.utils import comm

from mocobench.config import find_config
from mocobench.errors import UserError
from transfer.detect import config as dcfg
from transfer.detect import datasets as ds
from transfer.detect import metrics, record, resume

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


class OutcomesEvaluator(DatasetEvaluator):
    """Collects every detection (COCO results, image ids as in datasets.ground_truth), gathers
    them on rank 0 (comm.gather: a gloo group, legal under NCCL) and scores them there."""

    def __init__(self, ground_truth: dict, metric: str, mask_on: bool):
        self.ground_truth, self.metric, self.mask_on = ground_truth, metric, mask_on
        self.detections = None

    def reset(self):
        self._mine = []

    def process(self, inputs, outputs):
        for inp, output in zip(inputs, outputs):
            inst = output["instances"].to("cpu")
            masks = inst.pred_masks.numpy() if self.mask_on and inst.has("pred_masks") else None
            self._mine.append((inp["image_id"], metrics.coco_results(
                inp["image_id"], inst.pred_boxes.tensor.numpy(), inst.scores.numpy(),
                inst.pred_classes.numpy(), masks)))

    def evaluate(self):
        shards = comm.gather(self._mine, dst=0)
        if not comm.is_main_process():
            return None
        per_image = sorted((item for shard in shards for item in shard), key=lambda item: item[0])
        self.detections = [d for _, dets in per_image for d in dets]
        scores = metrics.score(self.ground_truth, self.detections, self.metric, self.mask_on)
        out = {"bbox": {k: v for k, v in scores.items() if not k.startswith("mask_")}}
        if self.mask_on:
            out["segm"] = {k[len("mask_"):]: v for k, v in scores.items() if k.startswith("mask_")}
        return out


class Trainer(DefaultTrainer):
    ground_truth, metric, evaluator = None, None, None  # set by _worker before training

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        Trainer.evaluator = OutcomesEvaluator(cls.ground_truth, cls.metric, cfg.MODEL.MASK_ON)
        return Trainer.evaluator


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
    """Load a Detectron2 .pkl backbone (one we wrote) into `model`; return the report, and
    refuse (UserError) a load that leaves a pretrained backbone key unset or drops one for a
    shape mismatch. BN num_batches_tracked counters are not weights (FrozenBN has none)."""
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


class WeightsOnlyCheckpointer(DetectionCheckpointer):
    """Reads only .pth files, with torch.load(weights_only=True): a resume never unpickles code
    (DetectionCheckpointer reads .pkl files with plain pickle.load)."""

    def _load_file(self, filename):
        if not filename.endswith(".pth"):
            raise UserError(f"{filename}: a resume reads only the .pth checkpoints this tool writes")
        return super()._load_file(filename)

    def _torch_load(self, f):
        return torch.load(f, map_location="cpu", weights_only=True)


def resume_from(trainer, out: Path) -> None:
    """DefaultTrainer.resume_or_load(resume=True), from a checkpoint this tool wrote in `out` only."""
    path = resume.detectron2_checkpoint(out)
    try:
        WeightsOnlyCheckpointer(trainer.model, str(out), **trainer.checkpointer.checkpointables).load(str(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise UserError(f"{path} cannot be resumed from ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        f"it is damaged or not a checkpoint this tool wrote: run without --resume") from None
    trainer.start_iter = trainer.iter + 1  # the checkpoint holds the iteration that just finished
    logger.info(f"resumed from {path} at iteration {trainer.start_iter}")


def _base_cfg() -> CfgNode:
    cfg = get_cfg()
    cfg.DATASETS.ROOT = dcfg.EXTRA["DATASETS"]["ROOT"]
    cfg.DATASETS.SCENES = CfgNode(dict(dcfg.EXTRA["DATASETS"]["SCENES"]))
    return cfg


def build_cfg(path, opts) -> CfgNode:
    """Detectron2's config + our DATASETS.ROOT/SCENES keys, merged from `path` and KEY VALUE `opts`."""
    cfg = _base_cfg()
    path = find_config(path)  # configs/detection/... also after pip install
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass an existing YAML file to --config "
                        f"(the shipped ones are in configs/detection/)")
    try:
        cfg.merge_from_file(str(path))
        cfg.merge_from_list(dcfg.opts_pairs(opts))
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


def _setup_worker(cfg_text: str, job: dict) -> tuple:
    cfg = _base_cfg()
    cfg.merge_from_other_cfg(CfgNode.load_cfg(cfg_text))
    notes = []
    for key in NORM_KEYS:
        value = dcfg.get(cfg, key)
        if comm.get_world_size() == 1 and value in SYNC_NORMS:
            notes.append(f"{key} {value} -> BN at world size 1")
            dcfg.set_value(cfg, key, "BN")
    cfg.freeze()
    from argparse import Namespace

    default_setup(cfg, Namespace(config_file=job["config_file"], eval_only=False, resume=job["resume"]))
    for n in notes:
        logger.warning(n)
    for spec in job["train_specs"] + [job["test_spec"]]:
        ds.register_detectron2(spec, job["classes"])
    return cfg, notes


def _worker(cfg_text: str, job: dict):
    """Runs in every process that Detectron2's launch starts (or in-process at world size 1)."""
    cfg, notes = _setup_worker(cfg_text, job)
    test, _ = ds.load(job["test_spec"])
    ds.check_images(test, job["test_spec"].name, every_image=False)
    Trainer.ground_truth = ds.ground_truth(test, job["classes"], with_masks=cfg.MODEL.MASK_ON)
    Trainer.metric = record.metric_name(job["test_spec"].kind)
    trainer = Trainer(cfg)
    report = None
    if job["resume"] and trainer.checkpointer.has_checkpoint():
        resume_from(trainer, Path(cfg.OUTPUT_DIR))
    else:
        report = load_pretrained(trainer.model, cfg.MODEL.WEIGHTS)
        logger.info(f"pretrained weights {cfg.MODEL.WEIGHTS}: every backbone key loaded; new (random) "
                    f"keys: {len(report['missing_keys'])}, unused file keys: {len(report['unexpected_keys'])}")
    trainer.train()
    if not comm.is_main_process():
        return None
    if Trainer.evaluator is None or Trainer.evaluator.detections is None:
        raise UserError(f"evaluation on {cfg.DATASETS.TEST[0]} did not run; see {cfg.OUTPUT_DIR}/log.txt")
    conf = plain(cfg)
    conf["RUN"] = {**job["run"], "world_size": comm.get_world_size(), "norm": notes,
                   "ims_per_batch_per_rank": cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(),
                   "load_report": report}
    path, scores = record.write(
        cfg.OUTPUT_DIR, engine="detectron2", name=job["name"], cfg=conf, defaults=plain(_base_cfg()),
        metric=Trainer.metric, data=job["data"], ground_truth=Trainer.ground_truth,
        detections=Trainer.evaluator.detections, weights=job["weights_record"], seed=cfg.SEED,
        wall_time_s=time.time() - job["t0"])
    logger.info(f"{Trainer.metric} metrics: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    logger.info(f"wrote {path}")
    return path


def _resolve(args, out: Path) -> CfgNode:
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
    return cfg


def _data(cfg: CfgNode, args) -> dict:
    """Read and check every data set in the parent, before launch; fills NUM_CLASSES."""
    p = plain(cfg)
    train_specs, (test_spec,) = ds.resolve_all(p)  # composes the demo scenes here, once
    train, classes, counts = ds.load_sets(train_specs)
    test, test_classes = ds.load(test_spec)
    if test_classes != classes:
        raise UserError(f"{test_spec.name} and {train_specs[0].name} have different class lists; "
                        f"test on the classes trained on")
    if cfg.MODEL.MASK_ON and test_spec.kind == "voc":
        raise UserError("MODEL.MASK_ON needs masks, which the VOC layout does not have; use COCO data "
                        "or MODEL.MASK_ON False")
    ds.check_images(train, "+".join(counts))
    ds.check_images(test, test_spec.name)
    explicit = "MODEL.ROI_HEADS.NUM_CLASSES" in dcfg.explicit_keys(args.config, args.opts)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = ds.check_num_classes(p, classes, train_specs[0].name, explicit)
    return {"train_specs": train_specs, "test_spec": test_spec, "classes": classes,
            "data": record.dataset(counts, test_spec.name, test, train, classes)}


def main(args, out: Path):
    """Parent process: read the config, weights and data, write the weights Detectron2 may
    load, then launch the workers."""
    import detectron2

    from converters import to_detectron2
    from transfer.detect.weights import check_weights_match, load_weights

    t0 = time.time()
    cfg = _resolve(args, out)
    bb, weights = load_weights(args.weights, args.arch, args.allow_pickle, args.label)
    check_weights_match(bb, plain(cfg))
    data = _data(cfg, args)
    d2_weights = out / "weights_detectron2.pkl"
    conv = to_detectron2(bb, d2_weights, verify=True)
    for line in conv["checks"]:
        print(f"[detect] weights {args.weights} -> {d2_weights}: {line}", flush=True)
    cfg.MODEL.WEIGHTS = str(d2_weights)
    job = {
        "config_file": str(find_config(args.config)), "resume": args.resume, "name": Path(args.config).stem, "t0": t0,
        **data, "weights_record": weights,
        "run": {"detectron2_version": detectron2.__version__, "device": cfg.MODEL.DEVICE,
                "num_gpus": args.num_gpus, "num_machines": args.num_machines,
                "converted_weights": str(d2_weights), "arch": bb.arch, "weights_layout": bb.layout,
                "datasets": {s.name: s.describe() for s in data["train_specs"] + [data["test_spec"]]}},
    }
    launch(_worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(cfg.dump(), job))
    return out / "results.json"
