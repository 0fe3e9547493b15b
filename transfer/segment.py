"""Semantic segmentation fine-tuning through MMSegmentation 1.x (mmengine's Runner).

    python -m transfer segment --config configs/segmentation/fcn_r50_d8_voc12aug_512x512_20k.py \\
        --weights CKPT --output DIR [--launcher none|pytorch] [--data-root ROOT] [--cfg-options k=v ...]
    python -m transfer segment --config ... --weights random --arch resnet18 --output DIR

    torchrun --nproc_per_node 4 -m transfer segment --launcher pytorch --config ... --weights ... --output ...

CKPT is any checkpoint ``converters.load_backbone`` reads (MoCo, mmselfsup, torchvision
supervised, Detectron2 .pkl ...), or ``random`` with ``--arch`` (a seeded torchvision
initialisation, the random-init baseline). It is converted to MMSegmentation's layout
(``DIR/weights/backbone_mmseg.pth``, verified by the converter) and loaded through the
backbone's ``init_cfg`` -- never ``load_from``, which silently loads nothing from a bare
backbone file. What this module guards against (MoCo issues #55/#65, mmseg #695/#966/#3476):

* the backbone must be mmseg's plain ``ResNet`` (style pytorch); ``ResNetV1c`` -- mmseg's
  default FCN backbone -- keeps a random deep stem with torchvision-layout weights, and
  mmengine loads with ``strict=False``, so it would only log the missing keys;
* after the Runner initialised the weights, every backbone tensor is compared with the
  converted file; any tensor that did not come from it stops the run (UserError);
* every image and label map is checked before training (transfer/segment_data.py), and the
  heads must predict exactly the data's classes;
* SyncBN when distributed on GPUs, BN otherwise (SyncBN cannot run on CPU);
* the data preprocessor uses the normalisation the weights were pretrained with when the
  checkpoint records it (RGB ImageNet mean/std otherwise, as in the configs).

Metrics: mIoU, mAcc, aAcc (percent) from mmseg's IoUMetric on the test split, after the
last training iteration, into DIR/results.json (engine "mmseg", a full protocol record),
with one confusion matrix per test image in DIR/outcomes.npz (transfer.outcomes).
Users' own data, the configs and the demo's settings: docs/segmentation.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mocobench.dist import exit_with_launcher
from mocobench.errors import UserError, cli
from mocobench.mmseg_compat import import_mmseg
from transfer import segment_config as sc
from transfer import segment_data as sd

PREFIX = "backbone."
CONVERTED = "weights/backbone_mmseg.pth"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m transfer segment", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="MMSegmentation config (.py), e.g. configs/segmentation/*.py")
    p.add_argument("--weights", required=True,
                   help="backbone checkpoint in any layout converters reads, or 'random' with --arch")
    p.add_argument("--arch", default=None, help="architecture (required with --weights random; else checked)")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the --weights random initialisation")
    p.add_argument("--output", required=True, help="work dir: logs, converted weights, results.json")
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                   help="'pytorch' under torchrun (one process per GPU); 'none' = one process")
    p.add_argument("--data-root", default=None,
                   help="dataset root for train/val/test (overrides the config's data_root)")
    p.add_argument("--label", default=None, help="name of the weights in reports (default: method and "
                   "epochs from the checkpoint, else folder/stem)")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning seed (mmengine randomness.seed)")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="mmengine config overrides, e.g. train_cfg.max_iters=1000")
    return p.parse_args(argv)


@cli
def main(argv=None) -> None:
    args = parse_args(argv)
    run(args.config, args.weights, args.output, launcher=args.launcher, data_root=args.data_root,
        cfg_options=args.cfg_options, seed=args.seed, label=args.label, arch=args.arch,
        init_seed=args.init_seed)


# ----------------------------------------------------------------------------- weights

def load_weights(weights: str, arch: str | None, init_seed: int, label: str | None):
    """-> (converters.Backbone, transfer.results weights record)."""
    import converters
    from transfer.results import weights_record

    if weights == "random":  # the same seeded torchvision initialisation as linear / kNN use
        from transfer.features import load_frozen_backbone

        frozen = load_frozen_backbone("random", arch, init_seed, label)
        return converters.Backbone(frozen.arch, frozen.reference, "random"), frozen.record
    if not Path(weights).is_file():
        raise UserError(f"weights {weights} do not exist; pass a checkpoint file "
                        "(or --weights random --arch resnet50 for the random-init baseline)")
    bb = converters.load_backbone(weights, arch=arch)
    return bb, weights_record(weights, label, bb.layout, bb.meta)


def mmseg_state_dict(path, prefix: str = PREFIX) -> dict:
    """The backbone tensors of an mmseg-format file, prefix stripped, loaded with
    ``weights_only=True`` (the way mmengine's Pretrained init reads it)."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not an mmseg checkpoint (a dict with 'state_dict'); "
                        "convert it with converters.to_mmseg")
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise UserError(f"{path} has no '{prefix}*' tensors; convert it with converters.to_mmseg")
    return out


def check_backbone_loaded(backbone, converted):
    """UserError unless every tensor of `backbone` equals the converted file's; -> StateDiff."""
    from mocobench.state import compare_state

    diff = compare_state(mmseg_state_dict(converted), backbone.state_dict(), skip_counters=True)
    total = diff.checked + len(diff.missing)  # the backbone's tensors, BN counters aside
    diff.refuse_unless_equal(
        f"the backbone weights file {converted}, compared with the backbone the Runner built,",
        then=f"of {total} backbone tensors not all came from it, so the model would train from "
             "partly random weights -- check the config's backbone (plain ResNet, style pytorch) and the checkpoint")
    return diff


def backbone_weights_hook(converted: str):
    """An mmengine hook that, once the Runner has initialised the weights (before the
    first iteration), compares every backbone tensor with the converted file and
    stops the run if any did not come from it. `hook.report` holds the comparison."""
    from mmengine.hooks import Hook
    from mmengine.model import is_model_wrapper

    class BackboneWeightsCheck(Hook):
        priority = "VERY_HIGH"

        def __init__(self):
            self.report = None

        def before_train(self, runner):
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            self.report = check_backbone_loaded(model.backbone, converted)
            runner.logger.info(f"backbone check: all {self.report.checked} tensors equal {converted}")

    return BackboneWeightsCheck()


# ----------------------------------------------------------------------------- the run's parts

@dataclass
class Data:
    source: dict  # segment_data.resolve_data_root
    splits: list  # [segment_data.Split]
    identity: dict  # segment_data.dataset_identity
    ignore_index: int
    pairs_checked: int  # distinct (image, label map) pairs checked before training


def prepare_data(cfg, data_root: str | None) -> Data:
    """Point the config at the data it reads and check all of it before training."""
    from transfer.segment_eval import use_per_image_metric

    source = sd.resolve_data_root(cfg, data_root)
    sd.apply_class_list(cfg, source)
    splits = sd.read_splits(cfg)
    ignore_index = use_per_image_metric(cfg)
    sc.fit_heads(cfg, splits[0].classes, ignore_index)
    checked = sd.check_files(splits, ignore_index)
    return Data(source, splits, sd.dataset_identity(sd.dataset_name(cfg, source), splits), ignore_index, checked)


def _rank_from_env() -> int:
    return int(os.environ.get("RANK", 0))


def prepare_output(output: Path):
    """Rank 0 prepares and locks the folder (mocobench.fileio) and moves an earlier run's
    results.json aside (transfer.results.start_run), so a failed re-run leaves nothing for
    `report`; other ranks return None."""
    from mocobench.fileio import prepare_output as prepare
    from transfer.results import start_run

    if _rank_from_env() != 0:
        return None
    lock = prepare(output, "segmentation fine-tuning", need_bytes=200 * 2**20)
    start_run(output)
    return lock


def init_distributed(cfg, launcher: str) -> bool:
    """Join torchrun's process group before the Runner, so one process per node converts
    while the others wait; True when distributed."""
    import torch
    from mmengine.dist import init_dist, is_distributed

    if launcher == "none":
        return False
    if not is_distributed():
        exit_with_launcher()
        dist_cfg = dict(cfg.get("env_cfg", {}).get("dist_cfg", {}) or {})
        if torch.cuda.is_available():
            init_dist(launcher, **dist_cfg)
        else:
            # mmengine's pytorch launcher calls torch.cuda.set_device unconditionally; on CPU
            # start the process group from torchrun's env:// variables ourselves, with gloo
            # (NCCL needs GPUs). The Runner then finds it initialised and uses it.
            import datetime

            timeout = dist_cfg.get("timeout")
            torch.distributed.init_process_group(
                backend="gloo", **({"timeout": datetime.timedelta(seconds=timeout)} if timeout else {}))
    return True


def convert(bb, output: Path, distributed: bool) -> Path:
    """The verified mmseg file of `bb`, written by one process per node."""
    import converters
    from mmengine.dist import barrier

    converted = output / CONVERTED
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        converters.to_mmseg(bb, str(converted), verify=True)
    if distributed:
        barrier()
    return converted


def train_and_test(cfg, converted: Path, log_line: str):
    """Build the Runner, check the backbone it loaded, train, test; -> (runner, metrics, check)."""
    from mmengine.runner import Runner

    runner = Runner.from_cfg(cfg)
    runner.logger.info(log_line)
    check = backbone_weights_hook(str(converted))
    runner.register_hook(check)
    runner.train()
    metrics = runner.test()
    if check.report is None:
        raise UserError("the backbone weight check did not run (training loop skipped?)")
    return runner, metrics, check


# ----------------------------------------------------------------------------- the run

def run(config, weights, output, *, launcher: str = "none", data_root: str | None = None,
        cfg_options=(), seed: int = 0, label: str | None = None, arch: str | None = None,
        init_seed: int = 0) -> dict:
    """Check everything, convert `weights`, fine-tune with `config`, evaluate on the test split;
    write results.json and outcomes.npz (rank 0) and return the record."""
    start = time.time()
    import_mmseg()
    import torch
    from mmengine.dist import get_dist_info

    cfg = sc.load_config(config, cfg_options)
    depth = sc.check_model_cfg(cfg)
    output = Path(output).resolve()
    lock = prepare_output(output)
    try:
        data = prepare_data(cfg, data_root)
        bb, weights_rec = load_weights(weights, arch, init_seed, label)
        sc.check_depth(cfg, depth, bb.arch)
        distributed = init_distributed(cfg, launcher)
        cuda = torch.cuda.is_available()
        converted = convert(bb, output, distributed)
        sc.set_backbone_init(cfg, converted, PREFIX)
        norm = sc.set_norm(cfg, sync=distributed and cuda)
        normalization = sc.set_normalization(cfg, bb.meta)
        sc.set_runtime(cfg, output, Path(config).stem, launcher=launcher, seed=seed,
                       distributed=distributed, cuda=cuda)
        resolved = copy.deepcopy(cfg.to_dict())
        rank, world_size = get_dist_info()
        per_process = cfg.train_dataloader.get("batch_size")
        runner, metrics, check = train_and_test(cfg, converted, (
            f"segment: {bb.arch} ({bb.layout}) -> mmseg ResNet depth {depth}, {norm}; batch {per_process} x "
            f"{world_size} process(es) = {per_process * world_size}, lr {cfg.optim_wrapper.optimizer.get('lr')}, "
            f"max_iters {cfg.train_cfg.get('max_iters')}; data {data.source['root']} ({data.source['from']})"))
        # IoUMetric rounds to 2 decimals in float32; keep its 2 decimals, not float32's tail
        record = {"metrics": {k: round(float(metrics[k]), 2) for k in ("mIoU", "mAcc", "aAcc") if k in metrics}}
        if rank != 0:
            return record
        resolved["moco_bench"] = {
            "config_file": str(config), "cfg_options": list(cfg_options), "weights_arch": bb.arch,
            "weights_layout": bb.layout, "converted": str(converted), "norm": norm,
            "normalization": normalization, "world_size": world_size, "batch_per_process": per_process,
            "effective_batch": per_process * world_size, "backbone_tensors_checked": check.report.checked,
            "data": data.source, "pairs_checked": data.pairs_checked}
        return write(output, cfg, config, runner, data, record["metrics"], weights=weights_rec,
                     resolved=resolved, seed=seed, norm=norm, world_size=world_size,
                     cfg_options=cfg_options, wall_time_s=time.time() - start)
    finally:
        if lock is not None:
            lock.release()


def write(output: Path, cfg, config, runner, data: Data, metrics: dict, *, weights: dict, resolved: dict,
          seed: int, norm: str, world_size: int, cfg_options, wall_time_s: float) -> dict:
    """outcomes.npz, then results.json (so a results.json always has its outcomes beside it)."""
    from transfer import segment_eval as se
    from transfer.results import read_results, write_results

    test = next(s for s in data.splits if s.role == "test")
    image_root = os.path.commonpath([os.path.dirname(p) for p in test.images])
    outcomes = se.save_outcomes(runner, output, list(test.classes), image_root)
    protocol = se.protocol(cfg, name=se.protocol_name(cfg, config), dataset=data.identity,
                           ignore_index=data.ignore_index, norm=norm, world_size=world_size,
                           cfg_options=cfg_options)
    dataset = {**data.identity, "root": data.source["root"], "from": data.source["from"]}
    path = write_results(output, task="segment", dataset=dataset, weights=weights, engine="mmseg",
                         protocol=protocol, outcomes=outcomes, config=resolved, seed=seed,
                         wall_time_s=wall_time_s, metrics=metrics)
    return read_results(path)
