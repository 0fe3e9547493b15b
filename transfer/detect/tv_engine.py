"""The torchvision engine: Faster/Mask R-CNN from torchvision on the converted ResNet.

Always installable, and deliberately a *different protocol* from Detectron2's (results say
engine "torchvision" and protocol "<config>@torchvision"): the model follows the same
Detectron2 config keys (see transfer/detect/config.py for the implemented subset), but

- C4: the backbone is stem..layer3 (stride 16); RoIs are pooled 14x14 with
  ``roi_align(aligned=True)`` (Detectron2's ROIAlignV2); the box head is layer4 (plus the
  extra norm of Res5ROIHeadsExtraNorm) and a spatial mean; for Mask R-CNN the same layer4
  module is the mask head, followed by a 2x deconvolution to 14x14 masks, as in Detectron2.
  Unlike Detectron2, torchvision runs layer4 a second time on the positive RoIs for masks.
- FPN: torchvision's FPN (P2-P6) and heads (2 FC box head, 4-conv mask head);
  its RoI pooling (MultiScaleRoIAlign) is not pixel-aligned.
- Evaluation is pycocotools COCOeval (AP, AP50, AP75, in percent) on both layouts. VOC
  "difficult" objects become iscrowd (ignored) ground truth; Detectron2 instead uses the
  VOC devkit's AP over IoU 0.50:0.95, so VOC numbers of the two engines differ slightly.
- Training: SGD with Detectron2's warmup multi-step schedule and its parameter groups
  (no weight decay on norm layers), shortest-edge resize sampled from MIN_SIZE_TRAIN,
  horizontal flip, PreciseBN before evaluation when TEST.PRECISE_BN.ENABLED.

Multi-GPU: run under ``torchrun --nproc_per_node N``; SyncBN/naiveSyncBN become
torch's SyncBatchNorm there and plain BN at world size 1 (said in the log).
"""
import bisect
import contextlib
import io
import json
import math
import random
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from torchvision.ops import MultiScaleRoIAlign, roi_align

from mocobench import dist
from mocobench.errors import UserError
from mocobench.fileio import atomic_torch_save, atomic_write
from transfer.detect import datasets as ds
from transfer.detect.config import get

C4_BACKBONE = "build_resnet_backbone"
FPN_BACKBONE = "build_resnet_fpn_backbone"
SYNC_NORMS = ("SyncBN", "naiveSyncBN")


def log(msg: str) -> None:
    if dist.is_main_process():
        print(f"[detect] {msg}", flush=True)


# ----------------------------------------------------------------------------- config checks

def check_config(cfg: dict) -> str:
    """Refuse (one line) settings this engine does not implement; returns "c4" or "fpn"."""
    def need(key, allowed, why=""):
        value = get(cfg, key)
        if value not in allowed:
            raise UserError(f"the torchvision engine supports {key} in {allowed}, got {value!r}"
                            f"{'; ' + why if why else ''}; use --engine detectron2 for other values")

    need("MODEL.META_ARCHITECTURE", ["GeneralizedRCNN"])
    need("MODEL.BACKBONE.NAME", [C4_BACKBONE, FPN_BACKBONE])
    need("MODEL.RESNETS.STRIDE_IN_1X1", [False], "torchvision ResNets stride in the 3x3 conv")
    need("MODEL.RESNETS.RES5_DILATION", [1])
    need("INPUT.FORMAT", ["RGB"], "torchvision weights take RGB input")
    need("INPUT.MIN_SIZE_TRAIN_SAMPLING", ["choice"])
    need("INPUT.RANDOM_FLIP", ["horizontal", "none"])
    need("SOLVER.LR_SCHEDULER_NAME", ["WarmupMultiStepLR"])
    need("SOLVER.WARMUP_METHOD", ["linear", "constant"])
    for key in ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM"):
        need(key, ["", "BN", "FrozenBN", *SYNC_NORMS])
    if get(cfg, "MODEL.BACKBONE.NAME") == C4_BACKBONE:
        need("MODEL.ROI_HEADS.NAME", ["Res5ROIHeads", "Res5ROIHeadsExtraNorm"])
        need("MODEL.RESNETS.OUT_FEATURES", [["res4"]])
        need("MODEL.RPN.IN_FEATURES", [["res4"]])
        need("MODEL.ROI_HEADS.IN_FEATURES", [["res4"]])
        need("MODEL.ROI_MASK_HEAD.NUM_CONV", [0])
        if len(get(cfg, "MODEL.ANCHOR_GENERATOR.SIZES")) != 1:
            raise UserError("C4 has one feature map: MODEL.ANCHOR_GENERATOR.SIZES needs one list of sizes")
        return "c4"
    need("MODEL.ROI_HEADS.NAME", ["StandardROIHeads"])
    need("MODEL.ROI_BOX_HEAD.NAME", ["FastRCNNConvFCHead"])
    need("MODEL.ROI_BOX_HEAD.NUM_FC", [2], "torchvision's TwoMLPHead")
    need("MODEL.RESNETS.OUT_FEATURES", [["res2", "res3", "res4", "res5"]])
    need("MODEL.FPN.IN_FEATURES", [["res2", "res3", "res4", "res5"]])
    need("MODEL.RPN.IN_FEATURES", [["p2", "p3", "p4", "p5", "p6"]])
    need("MODEL.ROI_HEADS.IN_FEATURES", [["p2", "p3", "p4", "p5"]])
    if len(get(cfg, "MODEL.ANCHOR_GENERATOR.SIZES")) != 5:
        raise UserError("FPN has five levels (P2-P6): MODEL.ANCHOR_GENERATOR.SIZES needs five lists")
    return "fpn"


# ----------------------------------------------------------------------------- model

def _norm_layer(name: str):
    """Detectron2 norm name -> module factory; Sync variants are converted later (world size > 1)."""
    if name == "":
        return None
    if name == "FrozenBN":
        from torchvision.ops.misc import FrozenBatchNorm2d
        return FrozenBatchNorm2d
    return nn.BatchNorm2d


def frozen_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `module` by a FrozenBatchNorm2d holding its statistics."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).copy_(getattr(module, name).detach())
        return frozen
    for name, child in module.named_children():
        setattr(module, name, frozen_bn(child))
    return module


def freeze_stages(resnet: nn.Module, freeze_at: int) -> None:
    """Detectron2's FREEZE_AT on a torchvision ResNet: 1 freezes the stem, 2 stem + res2, ...;
    frozen stages keep their BN statistics too (Detectron2 turns them into FrozenBN)."""
    if freeze_at >= 1:
        resnet.conv1.requires_grad_(False)
        resnet.bn1 = frozen_bn(resnet.bn1)
    for i in range(1, min(freeze_at, 5)):
        layer = frozen_bn(getattr(resnet, f"layer{i}"))
        layer.requires_grad_(False)


class C4Pooler(MultiScaleRoIAlign):
    """Single-level RoIAlign on the stride-16 map, pixel-aligned like Detectron2's ROIAlignV2.
    A MultiScaleRoIAlign subclass because torchvision's R-CNN constructors insist on that type."""

    stride = 16

    def forward(self, x, boxes, image_shapes):
        return roi_align(x["0"], boxes, self.output_size, 1.0 / self.stride, self.sampling_ratio, aligned=True)


def _c4_pooler(output_size: int, sampling_ratio: int) -> C4Pooler:
    return C4Pooler(["0"], output_size, sampling_ratio)


class Res5BoxHead(nn.Module):
    def __init__(self, res5: nn.Module):
        super().__init__()
        self.res5 = res5

    def forward(self, x):
        return self.res5(x).mean(dim=(2, 3))


def build_model(cfg: dict, resnet: nn.Module, num_classes: int) -> nn.Module:
    """Faster R-CNN (or Mask R-CNN when MODEL.MASK_ON) on a torchvision ResNet whose weights
    are already loaded (converters.build_resnet)."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    kind = check_config(cfg)
    m = cfg["MODEL"]
    if m["RESNETS"]["NORM"] == "FrozenBN":
        resnet = frozen_bn(resnet)
    # res5 is part of the C4 head, which FREEZE_AT never reaches (Detectron2 freezes backbone stages).
    freeze_stages(resnet, min(m["BACKBONE"]["FREEZE_AT"], 4 if kind == "c4" else 5))
    mask_on = m["MASK_ON"]
    sizes = [tuple(s) for s in m["ANCHOR_GENERATOR"]["SIZES"]]
    ratios = [tuple(r) for r in m["ANCHOR_GENERATOR"]["ASPECT_RATIOS"]]
    ratios = ratios * len(sizes) if len(ratios) == 1 else ratios
    anchors = AnchorGenerator(tuple(sizes), tuple(ratios))
    last = resnet.layer4[-1]
    c5 = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels
    extra = {}
    if kind == "c4":
        body = nn.Sequential(OrderedDict(
            conv1=resnet.conv1, bn1=resnet.bn1, relu=resnet.relu, maxpool=resnet.maxpool,
            layer1=resnet.layer1, layer2=resnet.layer2, layer3=resnet.layer3))
        body.out_channels = c5 // 2
        res5 = resnet.layer4
        if m["ROI_HEADS"]["NAME"] == "Res5ROIHeadsExtraNorm":
            # MoCo's C4 head: one more norm after res5, trained from scratch.
            res5 = nn.Sequential(OrderedDict(res5=res5, norm=_norm_layer(m["RESNETS"]["NORM"])(c5)))
        box = m["ROI_BOX_HEAD"]
        backbone = body
        extra.update(box_roi_pool=_c4_pooler(box["POOLER_RESOLUTION"], box["POOLER_SAMPLING_RATIO"]),
                     box_head=Res5BoxHead(res5), box_predictor=FastRCNNPredictor(c5, num_classes + 1))
        if mask_on:
            mh = m["ROI_MASK_HEAD"]
            extra.update(mask_roi_pool=_c4_pooler(mh["POOLER_RESOLUTION"], mh["POOLER_SAMPLING_RATIO"]),
                         mask_head=res5,
                         mask_predictor=MaskRCNNPredictor(c5, mh["CONV_DIM"], num_classes + 1))
    else:
        channels = [c5 // 8, c5 // 4, c5 // 2, c5]
        fpn_norm = _norm_layer(m["FPN"]["NORM"])
        backbone = BackboneWithFPN(resnet, {f"layer{i + 1}": str(i) for i in range(4)}, channels,
                                   m["FPN"]["OUT_CHANNELS"], extra_blocks=LastLevelMaxPool(),
                                   norm_layer=fpn_norm)
        names = ["0", "1", "2", "3"]
        box = m["ROI_BOX_HEAD"]
        res = box["POOLER_RESOLUTION"]
        out = m["FPN"]["OUT_CHANNELS"]
        extra.update(box_roi_pool=MultiScaleRoIAlign(names, res, box["POOLER_SAMPLING_RATIO"]),
                     box_head=TwoMLPHead(out * res * res, box["FC_DIM"]),
                     box_predictor=FastRCNNPredictor(box["FC_DIM"], num_classes + 1))
        if mask_on:
            mh = m["ROI_MASK_HEAD"]
            extra.update(mask_roi_pool=MultiScaleRoIAlign(names, mh["POOLER_RESOLUTION"],
                                                          mh["POOLER_SAMPLING_RATIO"]),
                         mask_head=MaskRCNNHeads(out, [mh["CONV_DIM"]] * mh["NUM_CONV"], 1),
                         mask_predictor=MaskRCNNPredictor(mh["CONV_DIM"], mh["CONV_DIM"], num_classes + 1))
    rpn, roi, inp = m["RPN"], m["ROI_HEADS"], cfg["INPUT"]
    kwargs = dict(
        num_classes=None,
        min_size=tuple(inp["MIN_SIZE_TRAIN"]), max_size=inp["MAX_SIZE_TRAIN"],
        image_mean=[v / 255.0 for v in m["PIXEL_MEAN"]], image_std=[v / 255.0 for v in m["PIXEL_STD"]],
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=rpn["PRE_NMS_TOPK_TRAIN"], rpn_pre_nms_top_n_test=rpn["PRE_NMS_TOPK_TEST"],
        rpn_post_nms_top_n_train=rpn["POST_NMS_TOPK_TRAIN"],
        rpn_post_nms_top_n_test=rpn["POST_NMS_TOPK_TEST"],
        rpn_nms_thresh=rpn["NMS_THRESH"], rpn_bg_iou_thresh=rpn["IOU_THRESHOLDS"][0],
        rpn_fg_iou_thresh=rpn["IOU_THRESHOLDS"][-1], rpn_batch_size_per_image=rpn["BATCH_SIZE_PER_IMAGE"],
        rpn_positive_fraction=rpn["POSITIVE_FRACTION"],
        box_score_thresh=roi["SCORE_THRESH_TEST"], box_nms_thresh=roi["NMS_THRESH_TEST"],
        box_detections_per_img=cfg["TEST"]["DETECTIONS_PER_IMAGE"],
        box_fg_iou_thresh=roi["IOU_THRESHOLDS"][0], box_bg_iou_thresh=roi["IOU_THRESHOLDS"][0],
        box_batch_size_per_image=roi["BATCH_SIZE_PER_IMAGE"], box_positive_fraction=roi["POSITIVE_FRACTION"],
        bbox_reg_weights=tuple(m["ROI_BOX_HEAD"]["BBOX_REG_WEIGHTS"]),
        **extra,
    )
    return (MaskRCNN if mask_on else FasterRCNN)(backbone, **kwargs)


# ----------------------------------------------------------------------------- data

class DetectionData(torch.utils.data.Dataset):
    """Records (transfer.detect.datasets) -> (image tensor in [0, 1], torchvision target)."""

    def __init__(self, records, mask_on: bool, train: bool, flip: bool):
        self.records, self.mask_on, self.train, self.flip = records, mask_on, train, flip

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        from PIL import Image, ImageOps
        from torchvision.transforms.functional import pil_to_tensor

        r = self.records[i]
        try:
            with Image.open(r["file_name"]) as im:
                image = ImageOps.exif_transpose(im).convert("RGB")
        except OSError as e:
            raise UserError(f"cannot read image {r['file_name']} ({type(e).__name__}); "
                            f"check the data set files") from None
        if image.size != (r["width"], r["height"]):
            raise UserError(f"{r['file_name']} is {image.size[0]}x{image.size[1]} but its annotation "
                            f"says {r['width']}x{r['height']}; fix the annotation")
        x = pil_to_tensor(image).float() / 255.0
        anns = [a for a in r["annotations"] if not (self.train and a["iscrowd"])]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {"boxes": boxes[keep],
                  "labels": torch.tensor([a["category"] + 1 for a in anns], dtype=torch.int64)[keep]}
        if self.mask_on and self.train:
            masks = [ds.segmentation_to_mask(a["segmentation"], r["height"], r["width"])
                     if a["segmentation"] is not None else np.zeros((r["height"], r["width"]), np.uint8)
                     for a in anns]
            target["masks"] = torch.from_numpy(np.stack(masks)).reshape(-1, r["height"], r["width"])[keep]
        if self.train and self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
            b = target["boxes"]
            target["boxes"] = torch.stack([r["width"] - b[:, 2], b[:, 1], r["width"] - b[:, 0], b[:, 3]], 1)
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return x, target


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless reshuffled indices, this rank's share of each permutation (Detectron2's TrainingSampler)."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.seed, self.rank, self.world = size, seed, rank, world

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.size, generator=g)[self.rank::self.world].tolist()


def _collate(batch):
    return tuple(zip(*batch))


def train_loader(records, cfg, seed, rank, world):
    per_rank = cfg["SOLVER"]["IMS_PER_BATCH"] // world
    data = DetectionData(records, cfg["MODEL"]["MASK_ON"], train=True,
                         flip=cfg["INPUT"]["RANDOM_FLIP"] == "horizontal")
    return torch.utils.data.DataLoader(
        data, batch_size=per_rank, sampler=InfiniteSampler(len(records), seed, rank, world),
        num_workers=cfg["DATALOADER"]["NUM_WORKERS"], collate_fn=_collate,
        worker_init_fn=lambda w: torch.manual_seed(seed * 1000 + rank * 100 + w))


# ----------------------------------------------------------------------------- solver

def param_groups(model: nn.Module, s: dict) -> list:
    """Detectron2's get_default_optimizer_params: norm layers get WEIGHT_DECAY_NORM, biases
    BIAS_LR_FACTOR and WEIGHT_DECAY_BIAS (None: the same as weights)."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
    groups, seen = [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            lr, wd = s["BASE_LR"], s["WEIGHT_DECAY"]
            if isinstance(module, norm_types):
                wd = s["WEIGHT_DECAY_NORM"]
            elif name == "bias":
                lr = s["BASE_LR"] * s["BIAS_LR_FACTOR"]
                wd = s["WEIGHT_DECAY"] if s["WEIGHT_DECAY_BIAS"] is None else s["WEIGHT_DECAY_BIAS"]
            groups.append({"params": [p], "lr": lr, "weight_decay": wd})
    return groups


def lr_factor(it: int, s: dict) -> float:
    """Warmup (linear from WARMUP_FACTOR, or constant) times GAMMA per passed step, as WarmupMultiStepLR."""
    steps = sorted(x for x in s["STEPS"] if x <= s["MAX_ITER"])
    factor = s["GAMMA"] ** bisect.bisect_right(steps, it)
    if it < s["WARMUP_ITERS"]:
        if s["WARMUP_METHOD"] == "constant":
            factor *= s["WARMUP_FACTOR"]
        else:
            alpha = it / s["WARMUP_ITERS"]
            factor *= s["WARMUP_FACTOR"] * (1 - alpha) + alpha
    return factor


def precise_bn(model: nn.Module, batches, num_iter: int, device) -> int:
    """Recompute BN running statistics as the plain average over `num_iter` training batches
    (fvcore's update_bn_stats); returns how many BN layers were updated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not bns or num_iter <= 0:
        return 0
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: every batch weighs the same
    with torch.no_grad():
        for _ in range(num_iter):
            images, targets = next(batches)
            model([i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets])
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    return len(bns)


# ----------------------------------------------------------------------------- evaluation

def _summarize(coco_eval) -> None:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    log(f"COCOeval {coco_eval.params.iouType}:\n{buf.getvalue().rstrip()}")


def evaluate(model: nn.Module, spec, cfg: dict, device) -> tuple[dict, int]:
    """COCOeval AP/AP50/AP75 (percent) on the test set; Mask R-CNN adds mask_AP*.
    Returns (metrics, number of test images)."""
    import pycocotools.mask as mask_util
    from pycocotools.cocoeval import COCOeval

    if spec.kind == "coco":
        records, classes, gt, cat_ids = ds.load_coco(spec)
        image_ids = [r["image_id"] for r in records]
    else:
        records, classes = ds.load_voc(spec)
        gt, cat_ids = ds.voc_as_coco(records, classes), list(range(1, len(classes) + 1))
        image_ids = list(range(1, len(records) + 1))
    mask_on = cfg["MODEL"]["MASK_ON"]
    data = DetectionData(records, mask_on=False, train=False, flip=False)
    inner = model.module if hasattr(model, "module") else model
    saved = inner.transform.min_size, inner.transform.max_size
    inner.transform.min_size = (cfg["INPUT"]["MIN_SIZE_TEST"],)
    inner.transform.max_size = cfg["INPUT"]["MAX_SIZE_TEST"]
    inner.eval()
    boxes, segms = [], []
    from tqdm import tqdm

    with torch.no_grad():
        for i in tqdm(range(len(data)), desc="evaluate", leave=False, disable=not dist.is_main_process()):
            x, _ = data[i]
            out = inner([x.to(device)])[0]
            for j in range(len(out["scores"])):
                x0, y0, x1, y1 = out["boxes"][j].tolist()
                det = {"image_id": image_ids[i], "category_id": cat_ids[int(out["labels"][j]) - 1],
                       "score": float(out["scores"][j])}
                boxes.append({**det, "bbox": [x0, y0, x1 - x0, y1 - y0]})
                if mask_on:
                    m = (out["masks"][j, 0] > 0.5).cpu().numpy().astype(np.uint8)
                    rle = mask_util.encode(np.asfortranarray(m))
                    rle["counts"] = rle["counts"].decode("ascii")
                    segms.append({**det, "segmentation": rle})
    inner.transform.min_size, inner.transform.max_size = saved
    metrics = {}
    for prefix, iou_type, dets in (("", "bbox", boxes), ("mask_", "segm", segms)):
        if iou_type == "segm" and not mask_on:
            continue
        if not dets:
            # Detectron2's COCOEvaluator reports NaN here too: no prediction means a broken model.
            log(f"no {iou_type} detections above MODEL.ROI_HEADS.SCORE_THRESH_TEST: AP is NaN")
            metrics.update({f"{prefix}AP": math.nan, f"{prefix}AP50": math.nan, f"{prefix}AP75": math.nan})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(dets)
        e = COCOeval(gt, dt, iou_type)
        e.params.imgIds = image_ids
        _summarize(e)
        stats = [100.0 * v if v >= 0 else float("nan") for v in e.stats[:3]]
        metrics.update({f"{prefix}AP": stats[0], f"{prefix}AP50": stats[1], f"{prefix}AP75": stats[2]})
    return metrics, len(records)


# ----------------------------------------------------------------------------- run

def _records(specs) -> tuple[list, list, dict]:
    records, classes, counts = [], None, {}
    for spec in specs:
        if spec.kind == "coco":
            r, c, _, _ = ds.load_coco(spec)
        else:
            r, c = ds.load_voc(spec)
        if classes is not None and c != classes:
            raise UserError(f"training sets have different class lists ({spec.name}); train on one class list")
        records, classes = records + r, c
        counts[spec.name] = len(r)
    return records, classes, counts


def _sync_norms(model: nn.Module, cfg: dict, world: int, device) -> tuple[list, nn.Module]:
    """SyncBN/naiveSyncBN: torch SyncBatchNorm across GPU ranks; plain BN at world size 1 and
    on CPU processes (torch's SyncBatchNorm refuses CPU tensors)."""
    notes = []
    sync = world > 1 and device.type == "cuda"
    for key, part in (("MODEL.RESNETS.NORM", "backbone and res5 head"), ("MODEL.FPN.NORM", "FPN")):
        if get(cfg, key) in SYNC_NORMS:
            if sync:
                notes.append(f"{key} {get(cfg, key)} -> torch SyncBatchNorm over {world} ranks ({part})")
            else:
                where = "at world size 1" if world == 1 else "per CPU process (no SyncBatchNorm on CPU)"
                notes.append(f"{key} {get(cfg, key)} -> BN {where} ({part})")
    if sync and notes:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for n in notes:
        log(n)
    return notes, model


def run(cfg: dict, bb, out_dir: Path, resume: bool = False) -> dict:
    """Train and evaluate; returns {"metrics", "splits", "run"} on every rank (metrics on rank 0)."""
    from tqdm import tqdm

    from converters import build_resnet

    device = dist.init_distributed()
    if cfg["MODEL"]["DEVICE"].startswith("cuda") and device.type == "cpu":
        log("MODEL.DEVICE asks for CUDA but none is available: running on the CPU")
    rank, world = dist.get_rank(), dist.get_world_size()
    s = cfg["SOLVER"]
    if s["IMS_PER_BATCH"] % world:
        raise UserError(f"SOLVER.IMS_PER_BATCH {s['IMS_PER_BATCH']} is not divisible by the world size "
                        f"{world}; choose a multiple of {world}")
    if cfg["SEED"] < 0:  # drawn once, shared by all ranks (the sampler needs one seed), recorded
        pick = [random.SystemRandom().randrange(2 ** 31)]
        if world > 1:
            torch.distributed.broadcast_object_list(pick, src=0)
        cfg["SEED"] = pick[0]
    seed = cfg["SEED"]
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    if dist.is_main_process():
        text = yaml.safe_dump(cfg, sort_keys=False)
        atomic_write(out_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))

    train_specs, (test_spec,) = ds.resolve_all(cfg)
    records, classes, counts = _records(train_specs)
    if cfg["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] != len(classes):
        raise UserError(f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg['MODEL']['ROI_HEADS']['NUM_CLASSES']} but "
                        f"{train_specs[0].name} has {len(classes)} classes; pass MODEL.ROI_HEADS.NUM_CLASSES "
                        f"{len(classes)}")
    if cfg["DATALOADER"]["FILTER_EMPTY_ANNOTATIONS"]:
        records = [r for r in records if any(not a["iscrowd"] for a in r["annotations"])]
    if not records:
        raise UserError(f"{train_specs[0].name} has no image with a (non-crowd) object to train on")

    model = build_model(cfg, build_resnet(bb), len(classes))
    notes, model = _sync_norms(model, cfg, world, device)
    model.to(device)
    optimizer = torch.optim.SGD(param_groups(model, s), lr=s["BASE_LR"], momentum=s["MOMENTUM"],
                                nesterov=s["NESTEROV"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, s))
    start = 0
    ckpt_path = out_dir / "last_checkpoint.pth"
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["iter"]
        log(f"resumed from {ckpt_path} at iteration {start}")
    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    per_rank = s["IMS_PER_BATCH"] // world
    log(f"torchvision {'Mask' if cfg['MODEL']['MASK_ON'] else 'Faster'} R-CNN "
        f"({check_config(cfg).upper()}, {bb.arch}) on {len(records)} training images, {len(classes)} classes; "
        f"batch {world} x {per_rank} = {s['IMS_PER_BATCH']}, base lr {s['BASE_LR']}, "
        f"{s['MAX_ITER']} iterations (steps {s['STEPS']}, warmup {s['WARMUP_ITERS']}), device {device}")

    batches = iter(train_loader(records, cfg, seed, rank, world))
    model.train()
    metrics_log = out_dir / "metrics.jsonl"
    t0 = time.time()
    bar = tqdm(range(start, s["MAX_ITER"]), desc="train", disable=not dist.is_main_process(),
               initial=start, total=s["MAX_ITER"])
    for it in bar:
        images, targets = next(batches)
        losses = train_model([i.to(device) for i in images],
                             [{k: v.to(device) for k, v in t.items()} for t in targets])
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise UserError(f"loss became {loss.item()} at iteration {it} "
                            f"({', '.join(f'{k}={v.item():.3g}' for k, v in losses.items())}); "
                            f"lower SOLVER.BASE_LR or raise SOLVER.WARMUP_ITERS")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2g}")
        done = it + 1
        if dist.is_main_process() and (done % 20 == 0 or done == s["MAX_ITER"]):
            with open(metrics_log, "a") as f:
                f.write(json.dumps({"iter": done, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                                    **{k: v.item() for k, v in losses.items()}}) + "\n")
        if dist.is_main_process() and s["CHECKPOINT_PERIOD"] > 0 and done % s["CHECKPOINT_PERIOD"] == 0 \
                and done < s["MAX_ITER"]:
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "iter": done}, ckpt_path)
    train_time = time.time() - t0

    n_bn = 0
    if cfg["TEST"]["PRECISE_BN"]["ENABLED"]:
        n_bn = precise_bn(model, batches, cfg["TEST"]["PRECISE_BN"]["NUM_ITER"], device)
        log(f"PreciseBN: {n_bn} BN layers re-estimated over {cfg['TEST']['PRECISE_BN']['NUM_ITER']} batches")
    metrics, n_test = {}, None
    if dist.is_main_process():
        atomic_torch_save(model.state_dict(), out_dir / "model_final.pth")
        metrics, n_test = evaluate(model, test_spec, cfg, device)
        log("metrics: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    dist.barrier()
    return {
        "metrics": metrics,
        "splits": {**counts, test_spec.name: n_test},
        "run": {"world_size": world, "ims_per_batch_per_rank": per_rank, "device": str(device),
                "norm": notes, "precise_bn_layers": n_bn, "train_time_s": round(train_time, 1),
                "iterations": s["MAX_ITER"], "train_images": len(records)},
    }
