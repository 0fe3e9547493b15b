"""Semantic segmentation fine-tuning through MMSegmentation 1.x (mmengine's Runner).

    python -m transfer segment --config configs/segmentation/fcn_r50_d8_voc12aug_512x512_20k.py \\
        --weights CKPT --output DIR [--launcher none|pytorch] [--data-root ROOT] [--cfg-options k=v ...]

    torchrun --nproc_per_node 4 -m transfer segment --launcher pytorch --config ... --weights ... --output ...

CKPT is any checkpoint ``converters.load_backbone`` reads (MoCo, mmselfsup, torchvision
supervised, Detectron2 .pkl ...). It is converted to MMSegmentation's layout
(``DIR/weights/backbone_mmseg.pth``, verified by the converter) and loaded through the
backbone's ``init_cfg`` -- never ``load_from``, which silently loads nothing from a bare
backbone file. What this module guards against (MoCo issues #55/#65, mmseg #695/#966/#3476):

* the backbone must be mmseg's plain ``ResNet`` (style pytorch); ``ResNetV1c`` -- mmseg's
  default FCN backbone -- keeps a random deep stem with torchvision-layout weights, and
  mmengine loads with ``strict=False``, so it would only log the missing keys;
* ``pretrained`` must be None (mmseg asserts against ``pretrained`` plus ``init_cfg``);
* after the Runner initialised the weights, every backbone tensor is compared with the
  converted file; any tensor that did not come from it stops the run (UserError);
* SyncBN when distributed on GPUs, BN otherwise (SyncBN cannot run on CPU);
* the data preprocessor uses the normalisation the weights were pretrained with when the
  checkpoint records it (RGB ImageNet mean/std otherwise, as in the configs).

Metrics: mIoU, mAcc, aAcc (percent) from mmseg's IoUMetric on the test split, after the
last training iteration, into DIR/results.json (engine "mmseg").
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

from mocobench.errors import UserError, cli
from mocobench.mmseg_compat import (PLAIN_RESNET_DEPTHS, STAGE_CHANNELS, check_plain_resnet,
                                 compare_backbone, import_mmseg, mmseg_state_dict)

ARCH_DEPTH = {f"resnet{d}": d for d in PLAIN_RESNET_DEPTHS}
PREFIX = "backbone."
CONVERTED = "weights/backbone_mmseg.pth"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m transfer segment", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="MMSegmentation config (.py), e.g. configs/segmentation/*.py")
    p.add_argument("--weights", required=True, help="backbone checkpoint in any layout converters reads")
    p.add_argument("--output", required=True, help="work dir: logs, checkpoints, results.json")
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                   help="'pytorch' under torchrun (one process per GPU); 'none' = one process")
    p.add_argument("--data-root", default=None,
                   help="dataset root for train/val/test (overrides the config's data_root)")
    p.add_argument("--label", default=None, help="name of the weights in reports (default: file stem)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="mmengine config overrides, e.g. train_cfg.max_iters=1000")
    return p.parse_args(argv)


@cli
def main(argv=None) -> None:
    args = parse_args(argv)
    run(args.config, args.weights, args.output, launcher=args.launcher, data_root=args.data_root,
        cfg_options=args.cfg_options, seed=args.seed, label=args.label)


# ----------------------------------------------------------------------------- config checks

def _cfg_options(pairs) -> dict:
    """`k=v` strings -> dict, values parsed the way mmengine's --cfg-options does."""
    from mmengine.config import DictAction

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--cfg-options expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = DictAction._parse_iterable(value)
    return out


def _walk(node, fn):
    """Call fn(dict) on every dict nested in lists/dicts of a config."""
    if isinstance(node, dict):
        fn(node)
        for v in node.values():
            _walk(v, fn)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _walk(v, fn)


def follow_iters(cfg, options: dict) -> None:
    """Merge --cfg-options. When they change train_cfg.max_iters, the schedulers that
    ended at the old max_iters (poly LR) end at the new one, unless set explicitly too."""
    old = (cfg.get("train_cfg") or {}).get("max_iters")
    try:
        cfg.merge_from_dict(options)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"--cfg-options {' '.join(options)} do not fit the config: {e}") from None
    new = (cfg.get("train_cfg") or {}).get("max_iters")
    if old is None or new == old or any(k.startswith("param_scheduler") for k in options):
        return
    for sched in cfg.get("param_scheduler") or []:
        if sched.get("end") == old:
            sched["end"] = new


def check_model_cfg(cfg) -> int:
    """Refuse configs whose backbone cannot take torchvision-layout weights; return its depth."""
    model = cfg.get("model")
    if not model or "backbone" not in model:
        raise UserError("config has no model.backbone; start from a file in configs/segmentation/")
    if model.get("pretrained") is not None:
        raise UserError(f"config sets model.pretrained={model['pretrained']!r}; set it to None: "
                        "the backbone weights come from --weights")
    depth = check_plain_resnet(model["backbone"], "model.backbone")
    for key in ("load_from", "resume"):
        if cfg.get(key):
            raise UserError(f"config sets {key}={cfg[key]!r}, but transfer segment fine-tunes from --weights "
                            "and never reloads Runner checkpoints (see mocobench/mmseg_compat.py); "
                            f"set {key} to None/False")
    return depth


def check_depth(cfg, depth: int, arch: str) -> None:
    if arch not in ARCH_DEPTH:
        raise UserError(f"weights are {arch}; MMSegmentation's plain ResNet only takes "
                        f"{', '.join(ARCH_DEPTH)} weights")
    want = ARCH_DEPTH[arch]
    if want == depth:
        return
    fix = [f"model.backbone.depth={want}"]
    for head in ("decode_head", "auxiliary_head"):
        h = cfg.model.get(head)
        if isinstance(h, dict) and isinstance(h.get("in_index"), int):
            fix.append(f"model.{head}.in_channels={STAGE_CHANNELS[want][h['in_index']]}")
    raise UserError(f"weights are {arch} but the config's model.backbone.depth={depth}; "
                    f"use a matching config or add --cfg-options {' '.join(fix)}")


def set_norm(cfg, sync: bool) -> str:
    """SyncBN on GPUs when distributed, BN otherwise, in backbone and heads alike."""
    norm = "SyncBN" if sync else "BN"

    def fix(d):
        n = d.get("norm_cfg")
        if isinstance(n, dict) and n.get("type") in ("BN", "SyncBN", "BN2d"):
            n["type"] = norm

    _walk(cfg.model, fix)
    return norm


def set_normalization(cfg, meta: dict) -> dict:
    """Use the checkpoint's recorded normalisation (timm's rule: preprocessing travels
    with the weights); keep the config's (RGB ImageNet mean/std) when none is recorded."""
    pre = cfg.model.get("data_preprocessor")
    if pre is None:
        raise UserError("config has no model.data_preprocessor; start from a file in configs/segmentation/")
    norm = (meta or {}).get("normalization") or {}
    if norm.get("mean") and norm.get("std"):
        scale = 255.0 if max(norm["mean"]) <= 1.0 else 1.0  # mmseg normalises 0..255 pixels
        mean = [round(float(m) * scale, 4) for m in norm["mean"]]
        std = [round(float(s) * scale, 4) for s in norm["std"]]
        rgb = str(norm.get("input_format", "RGB")).upper() == "RGB"
        changed = ([round(float(m), 4) for m in pre.get("mean", [])] != mean
                   or [round(float(s), 4) for s in pre.get("std", [])] != std
                   or bool(pre.get("bgr_to_rgb")) != rgb)
        pre.update(mean=mean, std=std, bgr_to_rgb=rgb)
        source = "checkpoint" + (" (differs from the config)" if changed else "")
    else:
        source = "config"
    cfg.model.data_preprocessor = pre
    return {"mean": list(pre["mean"]), "std": list(pre["std"]), "bgr_to_rgb": bool(pre.get("bgr_to_rgb")),
            "source": source}


def _datasets(cfg):
    """Every dataset dict the config's dataloaders use (ConcatDataset children too)."""
    found = []
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg.get(name)
        if not loader:
            continue
        stack = [loader["dataset"]]
        while stack:
            d = stack.pop()
            if "datasets" in d:
                stack.extend(d["datasets"])
            elif "dataset" in d:  # RepeatDataset / ClassBalancedDataset
                stack.append(d["dataset"])
            else:
                found.append(d)
    return found


def set_data_root(cfg, root: str) -> None:
    for d in _datasets(cfg):
        d["data_root"] = str(root)
    cfg.data_root = str(root)


def check_data(cfg) -> None:
    """One line naming the missing folder, instead of mmseg's traceback on the first read."""
    for d in _datasets(cfg):
        root = Path(d.get("data_root") or ".")
        needed = [root / v for k, v in (d.get("data_prefix") or {}).items() if k == "img_path"]
        if d.get("ann_file"):
            needed.append(root / d["ann_file"])
        for path in needed:
            if not path.exists():
                raise UserError(f"{path} does not exist: {d.get('type')} expects it under data_root "
                                f"{str(root)!r}; pass --data-root pointing at the dataset folder")


# ----------------------------------------------------------------------------- weights check

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
            runner.logger.info(f"backbone check: all {self.report['checked']} tensors equal {converted}")

    return BackboneWeightsCheck()


def check_backbone_loaded(backbone, converted) -> dict:
    """UserError unless every tensor of `backbone` equals the converted file's."""
    report = compare_backbone(backbone, mmseg_state_dict(converted, PREFIX))
    bad = report["missing"] + report["differ"]
    if bad or report["unexpected"]:
        parts = []
        if report["missing"]:
            parts.append(f"{len(report['missing'])} not in the checkpoint (e.g. {report['missing'][0]})")
        if report["differ"]:
            parts.append(f"{len(report['differ'])} differ from it (e.g. {report['differ'][0]})")
        if report["unexpected"]:
            parts.append(f"{len(report['unexpected'])} checkpoint tensors unused "
                         f"(e.g. {report['unexpected'][0]})")
        raise UserError(f"backbone weights did not all come from {converted}: of {report['checked']} "
                        f"backbone tensors, {'; '.join(parts)}; the model would train from partly random "
                        "weights -- check the config's backbone (plain ResNet, style pytorch) and the checkpoint")
    return report


# ----------------------------------------------------------------------------- embedded data

def prepare_embedded_data(cfg) -> dict | None:
    """Configs with an `embedded_data` block run on scenes composed from held-out
    Fashion-MNIST items (transfer.scenes), written once in mmseg's img_dir/ann_dir layout
    and cached (``root`` None = transfer.scenes.default_root()). Safe to call on every
    rank: the scene writer renames a finished folder into place."""
    spec = cfg.get("embedded_data")
    if not spec:
        return None
    from transfer import scenes

    spec = dict(spec)
    paths = scenes.ensure_demo_scenes(spec.pop("root", None), **spec)
    set_data_root(cfg, paths["mmseg"])
    return {"root": str(paths["mmseg"]), "source": "Fashion-MNIST test split (transfer.scenes)", **spec}


# ----------------------------------------------------------------------------- the run

def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def run(config, weights, output, *, launcher: str = "none", data_root: str | None = None,
        cfg_options=(), seed: int = 0, label: str | None = None) -> dict:
    """Convert `weights`, fine-tune with `config`, evaluate; write and return results.json's record."""
    start = time.time()
    import_mmseg()
    import torch
    from mmengine.config import Config
    from mmengine.dist import barrier, get_dist_info, init_dist, is_distributed
    from mmengine.runner import Runner

    import converters
    from transfer.results import read_results, weights_record, write_results

    config, output = Path(config), Path(output).resolve()
    if not config.is_file():
        raise UserError(f"config {config} does not exist; see configs/segmentation/")
    if not Path(weights).is_file():
        raise UserError(f"weights {weights} do not exist")
    try:
        cfg = Config.fromfile(str(config))
    except Exception as e:  # a broken config file: show its own error in one line
        raise UserError(f"cannot read config {config}: {type(e).__name__}: {e}") from None
    file_iters = (cfg.get("train_cfg") or {}).get("max_iters")
    follow_iters(cfg, _cfg_options(cfg_options))

    depth = check_model_cfg(cfg)
    if data_root is not None:  # the user's data wins over the embedded demo scenes
        set_data_root(cfg, data_root)
        embedded = None
    else:
        embedded = prepare_embedded_data(cfg)
    check_data(cfg)
    bb = converters.load_backbone(weights)
    check_depth(cfg, depth, bb.arch)

    distributed = launcher != "none"
    cuda = torch.cuda.is_available()
    if distributed and not is_distributed():
        # Before the Runner, so that one process per node converts while the others wait.
        dist_cfg = dict(cfg.get("env_cfg", {}).get("dist_cfg", {}) or {})
        if cuda:
            init_dist(launcher, **dist_cfg)
        else:
            # mmengine's pytorch launcher calls torch.cuda.set_device unconditionally; on CPU
            # start the process group from torchrun's env:// variables ourselves, with gloo
            # (NCCL needs GPUs). The Runner then finds it initialised and uses it.
            import datetime

            timeout = dist_cfg.get("timeout")
            torch.distributed.init_process_group(
                backend="gloo", **({"timeout": datetime.timedelta(seconds=timeout)} if timeout else {}))
    rank, world_size = get_dist_info()

    converted = output / CONVERTED
    if _local_rank() == 0:
        converters.to_mmseg(bb, str(converted), verify=True)
    if distributed:
        barrier()

    backbone = cfg.model.backbone
    backbone.pretrained = None
    backbone.init_cfg = dict(type="Pretrained", checkpoint=str(converted), prefix=PREFIX)
    cfg.model.pretrained = None
    norm = set_norm(cfg, sync=distributed and cuda)
    normalization = set_normalization(cfg, bb.meta)

    cfg.work_dir = str(output)
    # mmengine keeps its logger and visualizer as process-wide instances named by the experiment
    # (config name + a timestamp in seconds): a second run started in the same second of one
    # process would get the first run's instances and write into the first run's folder.
    cfg.experiment_name = f"{config.stem}_{time.time_ns()}"
    if isinstance(cfg.get("visualizer"), dict):  # mmseg configs name it "visualizer": one per process
        cfg.visualizer["name"] = cfg.experiment_name
    cfg.launcher = launcher
    cfg.randomness = dict(seed=seed, deterministic=False)
    if cfg.get("env_cfg") and not cuda:
        cfg.env_cfg.setdefault("dist_cfg", {})["backend"] = "gloo"
    if distributed and not cuda:
        # mmengine passes device_ids=[LOCAL_RANK] to DDP, which only GPU modules accept.
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None,
                                     broadcast_buffers=False)
    resolved = copy.deepcopy(cfg.to_dict())

    runner = Runner.from_cfg(cfg)
    per_process = cfg.train_dataloader.get("batch_size")
    runner.logger.info(
        f"segment: {bb.arch} ({bb.layout}) -> mmseg ResNet depth {depth}, {norm}; batch {per_process} x "
        f"{world_size} process(es) = {per_process * world_size}, lr "
        f"{cfg.optim_wrapper.optimizer.get('lr')}, max_iters {cfg.train_cfg.get('max_iters')}")
    check = backbone_weights_hook(str(converted))
    runner.register_hook(check)
    runner.train()
    metrics = runner.test()
    if check.report is None:
        raise UserError("the backbone weight check did not run (training loop skipped?)")

    record = {"metrics": {k: float(metrics[k]) for k in ("mIoU", "mAcc", "aAcc") if k in metrics}}
    if rank == 0:
        resolved["moco_bench"] = {
            "config_file": str(config), "cfg_options": list(cfg_options), "weights_arch": bb.arch,
            "weights_layout": bb.layout, "converted": str(converted), "norm": norm,
            "normalization": normalization, "world_size": world_size,
            "batch_per_process": per_process, "effective_batch": per_process * world_size,
            "backbone_tensors_checked": check.report["checked"], "embedded_data": embedded,
        }
        bench = dict(cfg.get("benchmark") or {})
        protocol = bench.get("protocol", config.stem)
        iters = cfg.train_cfg.get("max_iters")
        if iters != file_iters:  # a shortened run is not the named protocol
            protocol = f"{protocol}, max_iters={iters}"
        splits = {"train": len(runner.train_dataloader.dataset), "test": len(runner.test_dataloader.dataset)}
        path = write_results(
            output, task="segment",
            dataset={"name": bench.get("dataset", config.stem), "splits": splits},
            weights=weights_record(weights, label, bb.layout), engine="mmseg",
            protocol=protocol, config=resolved, seed=seed,
            wall_time_s=time.time() - start, metrics=record["metrics"])
        record = read_results(path)
    return record
