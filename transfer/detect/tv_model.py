"""The torchvision engine's model: Faster/Mask R-CNN from torchvision on a converted ResNet,
following the Detectron2 config keys that transfer/detect/config.py implements.

- C4: the backbone is stem..layer3 (stride 16); RoIs are pooled with
  ``roi_align(aligned=True)`` (Detectron2's ROIAlignV2); the box head is layer4 (plus the
  extra norm of Res5ROIHeadsExtraNorm) and a spatial mean; for Mask R-CNN the same layer4
  module is the mask head, followed by a 2x deconvolution, as in Detectron2. Unlike
  Detectron2, torchvision runs layer4 a second time on the positive RoIs for masks.
- FPN: torchvision's FPN (P2-P6) and heads (2 FC box head, 4-conv mask head); its RoI
  pooling (MultiScaleRoIAlign) is not pixel-aligned.
"""
from collections import OrderedDict

from torch import nn
from torchvision.ops import MultiScaleRoIAlign, roi_align

from mocobench.errors import UserError
from transfer.detect.config import get, set_value

C4_BACKBONE = "build_resnet_backbone"
FPN_BACKBONE = "build_resnet_fpn_backbone"
SYNC_NORMS = ("SyncBN", "naiveSyncBN")


def _need(cfg, key, allowed, why=""):
    value = get(cfg, key)
    if value not in allowed:
        raise UserError(f"the torchvision engine supports {key} in {allowed}, got {value!r}"
                        f"{'; ' + why if why else ''}; use --engine detectron2 for other values")


def check_config(cfg: dict) -> str:
    """Refuse (one line) settings this engine does not implement; returns "c4" or "fpn"."""
    _need(cfg, "MODEL.META_ARCHITECTURE", ["GeneralizedRCNN"])
    _need(cfg, "MODEL.BACKBONE.NAME", [C4_BACKBONE, FPN_BACKBONE])
    _need(cfg, "MODEL.RESNETS.STRIDE_IN_1X1", [False], "torchvision ResNets stride in the 3x3 conv")
    _need(cfg, "MODEL.RESNETS.RES5_DILATION", [1])
    _need(cfg, "INPUT.FORMAT", ["RGB"], "torchvision weights take RGB input")
    _need(cfg, "INPUT.MIN_SIZE_TRAIN_SAMPLING", ["choice"])
    _need(cfg, "INPUT.RANDOM_FLIP", ["horizontal", "none"])
    _need(cfg, "SOLVER.LR_SCHEDULER_NAME", ["WarmupMultiStepLR"])
    _need(cfg, "SOLVER.WARMUP_METHOD", ["linear", "constant"])
    for key in ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM"):
        _need(cfg, key, ["", "BN", "FrozenBN", *SYNC_NORMS])
    if get(cfg, "MODEL.BACKBONE.NAME") == C4_BACKBONE:
        _need(cfg, "MODEL.ROI_HEADS.NAME", ["Res5ROIHeads", "Res5ROIHeadsExtraNorm"])
        for key in ("MODEL.RESNETS.OUT_FEATURES", "MODEL.RPN.IN_FEATURES", "MODEL.ROI_HEADS.IN_FEATURES"):
            _need(cfg, key, [["res4"]])
        _need(cfg, "MODEL.ROI_MASK_HEAD.NUM_CONV", [0])
        if len(get(cfg, "MODEL.ANCHOR_GENERATOR.SIZES")) != 1:
            raise UserError("C4 has one feature map: MODEL.ANCHOR_GENERATOR.SIZES needs one list of sizes")
        return "c4"
    _need(cfg, "MODEL.ROI_HEADS.NAME", ["StandardROIHeads"])
    _need(cfg, "MODEL.ROI_BOX_HEAD.NAME", ["FastRCNNConvFCHead"])
    _need(cfg, "MODEL.ROI_BOX_HEAD.NUM_FC", [2], "torchvision's TwoMLPHead")
    _need(cfg, "MODEL.RESNETS.OUT_FEATURES", [["res2", "res3", "res4", "res5"]])
    _need(cfg, "MODEL.FPN.IN_FEATURES", [["res2", "res3", "res4", "res5"]])
    _need(cfg, "MODEL.RPN.IN_FEATURES", [["p2", "p3", "p4", "p5", "p6"]])
    _need(cfg, "MODEL.ROI_HEADS.IN_FEATURES", [["p2", "p3", "p4", "p5"]])
    if len(get(cfg, "MODEL.ANCHOR_GENERATOR.SIZES")) != 5:
        raise UserError("FPN has five levels (P2-P6): MODEL.ANCHOR_GENERATOR.SIZES needs five lists")
    return "fpn"


# ----------------------------------------------------------------------------- norms

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


def sync_norms(model: nn.Module, cfg: dict, world: int, device) -> tuple[list, nn.Module]:
    """SyncBN/naiveSyncBN: torch SyncBatchNorm across GPU ranks; plain BN at world size 1 and
    on CPU processes (torch's SyncBatchNorm refuses CPU tensors), written back into `cfg` as
    "BN" (what ran, as the Detectron2 engine records it). Returns (notes, model)."""
    notes = []
    sync = world > 1 and device.type == "cuda"
    for key, part in (("MODEL.RESNETS.NORM", "backbone and res5 head"), ("MODEL.FPN.NORM", "FPN")):
        if get(cfg, key) in SYNC_NORMS:
            if sync:
                notes.append(f"{key} {get(cfg, key)} -> torch SyncBatchNorm over {world} ranks ({part})")
            else:
                where = "at world size 1" if world == 1 else "per CPU process (no SyncBatchNorm on CPU)"
                notes.append(f"{key} {get(cfg, key)} -> BN {where} ({part})")
                set_value(cfg, key, "BN")
    if sync and notes:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return notes, model


# ----------------------------------------------------------------------------- heads

class C4Pooler(MultiScaleRoIAlign):
    """Single-level RoIAlign on the stride-16 map, pixel-aligned like Detectron2's ROIAlignV2.
    A MultiScaleRoIAlign subclass because torchvision's R-CNN constructors insist on that type."""

    stride = 16

    def forward(self, x, boxes, image_shapes):
        return roi_align(x["0"], boxes, self.output_size, 1.0 / self.stride, self.sampling_ratio, aligned=True)


class Res5BoxHead(nn.Module):
    def __init__(self, res5: nn.Module):
        super().__init__()
        self.res5 = res5

    def forward(self, x):
        return self.res5(x).mean(dim=(2, 3))


def _c4(m: dict, resnet: nn.Module, c5: int, num_classes: int) -> tuple[nn.Module, dict]:
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    body = nn.Sequential(OrderedDict(
        conv1=resnet.conv1, bn1=resnet.bn1, relu=resnet.relu, maxpool=resnet.maxpool,
        layer1=resnet.layer1, layer2=resnet.layer2, layer3=resnet.layer3))
    body.out_channels = c5 // 2
    res5 = resnet.layer4
    if m["ROI_HEADS"]["NAME"] == "Res5ROIHeadsExtraNorm":
        # MoCo's C4 head: one more norm after res5, trained from scratch.
        res5 = nn.Sequential(OrderedDict(res5=res5, norm=_norm_layer(m["RESNETS"]["NORM"])(c5)))
    box = m["ROI_BOX_HEAD"]
    heads = dict(box_roi_pool=C4Pooler(["0"], box["POOLER_RESOLUTION"], box["POOLER_SAMPLING_RATIO"]),
                 box_head=Res5BoxHead(res5), box_predictor=FastRCNNPredictor(c5, num_classes + 1))
    if m["MASK_ON"]:
        mh = m["ROI_MASK_HEAD"]
        heads.update(mask_roi_pool=C4Pooler(["0"], mh["POOLER_RESOLUTION"], mh["POOLER_SAMPLING_RATIO"]),
                     mask_head=res5, mask_predictor=MaskRCNNPredictor(c5, mh["CONV_DIM"], num_classes + 1))
    return body, heads


def _fpn(m: dict, resnet: nn.Module, c5: int, num_classes: int) -> tuple[nn.Module, dict]:
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    channels = [c5 // 8, c5 // 4, c5 // 2, c5]
    out = m["FPN"]["OUT_CHANNELS"]
    backbone = BackboneWithFPN(resnet, {f"layer{i + 1}": str(i) for i in range(4)}, channels, out,
                               extra_blocks=LastLevelMaxPool(), norm_layer=_norm_layer(m["FPN"]["NORM"]))
    names = ["0", "1", "2", "3"]
    box = m["ROI_BOX_HEAD"]
    res = box["POOLER_RESOLUTION"]
    heads = dict(box_roi_pool=MultiScaleRoIAlign(names, res, box["POOLER_SAMPLING_RATIO"]),
                 box_head=TwoMLPHead(out * res * res, box["FC_DIM"]),
                 box_predictor=FastRCNNPredictor(box["FC_DIM"], num_classes + 1))
    if m["MASK_ON"]:
        mh = m["ROI_MASK_HEAD"]
        heads.update(mask_roi_pool=MultiScaleRoIAlign(names, mh["POOLER_RESOLUTION"], mh["POOLER_SAMPLING_RATIO"]),
                     mask_head=MaskRCNNHeads(out, [mh["CONV_DIM"]] * mh["NUM_CONV"], 1),
                     mask_predictor=MaskRCNNPredictor(mh["CONV_DIM"], mh["CONV_DIM"], num_classes + 1))
    return backbone, heads


def _rcnn_settings(cfg: dict, backbone: nn.Module) -> dict:
    """torchvision's GeneralizedRCNN arguments from the Detectron2 keys."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RPNHead

    m, inp = cfg["MODEL"], cfg["INPUT"]
    sizes = [tuple(s) for s in m["ANCHOR_GENERATOR"]["SIZES"]]
    ratios = [tuple(r) for r in m["ANCHOR_GENERATOR"]["ASPECT_RATIOS"]]
    ratios = ratios * len(sizes) if len(ratios) == 1 else ratios
    anchors = AnchorGenerator(tuple(sizes), tuple(ratios))
    rpn, roi = m["RPN"], m["ROI_HEADS"]
    return dict(
        num_classes=None,
        min_size=tuple(inp["MIN_SIZE_TRAIN"]), max_size=inp["MAX_SIZE_TRAIN"],
        image_mean=[v / 255.0 for v in m["PIXEL_MEAN"]], image_std=[v / 255.0 for v in m["PIXEL_STD"]],
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=rpn["PRE_NMS_TOPK_TRAIN"], rpn_pre_nms_top_n_test=rpn["PRE_NMS_TOPK_TEST"],
        rpn_post_nms_top_n_train=rpn["POST_NMS_TOPK_TRAIN"], rpn_post_nms_top_n_test=rpn["POST_NMS_TOPK_TEST"],
        rpn_nms_thresh=rpn["NMS_THRESH"], rpn_bg_iou_thresh=rpn["IOU_THRESHOLDS"][0],
        rpn_fg_iou_thresh=rpn["IOU_THRESHOLDS"][-1], rpn_batch_size_per_image=rpn["BATCH_SIZE_PER_IMAGE"],
        rpn_positive_fraction=rpn["POSITIVE_FRACTION"],
        box_score_thresh=roi["SCORE_THRESH_TEST"], box_nms_thresh=roi["NMS_THRESH_TEST"],
        box_detections_per_img=cfg["TEST"]["DETECTIONS_PER_IMAGE"],
        box_fg_iou_thresh=roi["IOU_THRESHOLDS"][0], box_bg_iou_thresh=roi["IOU_THRESHOLDS"][0],
        box_batch_size_per_image=roi["BATCH_SIZE_PER_IMAGE"], box_positive_fraction=roi["POSITIVE_FRACTION"],
        bbox_reg_weights=tuple(m["ROI_BOX_HEAD"]["BBOX_REG_WEIGHTS"]),
    )


def build_model(cfg: dict, resnet: nn.Module, num_classes: int) -> nn.Module:
    """Faster R-CNN (or Mask R-CNN when MODEL.MASK_ON) on a torchvision ResNet whose weights
    are already loaded (converters.build_resnet)."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN

    kind = check_config(cfg)
    m = cfg["MODEL"]
    if m["RESNETS"]["NORM"] == "FrozenBN":
        resnet = frozen_bn(resnet)
    # res5 is part of the C4 head, which FREEZE_AT never reaches (Detectron2 freezes backbone stages).
    freeze_stages(resnet, min(m["BACKBONE"]["FREEZE_AT"], 4 if kind == "c4" else 5))
    last = resnet.layer4[-1]
    c5 = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels
    backbone, heads = (_c4 if kind == "c4" else _fpn)(m, resnet, c5, num_classes)
    return (MaskRCNN if m["MASK_ON"] else FasterRCNN)(backbone, **_rcnn_settings(cfg, backbone), **heads)
