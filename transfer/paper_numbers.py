"""The MoCo papers' published transfer numbers (R50, ImageNet-1M pretraining), as data.

Each entry names its source and the full protocol its numbers were measured under (see
docs/report.md, "Published rows"). ``report`` puts an entry's rows beside a table only when
the table's protocol matches ``protocol`` on every defining field
(transfer/report_protocol.py: differences); when a table's protocol is named as one of
``names`` but differs, the table lists the fields that differ and shows no published rows.
Values are in percent, as published; a ``[mean, std]`` pair is a mean over several trials
with its spread.

``protocol`` uses the vocabulary the tasks write into results.json's protocol record:
engine; metric: {metric: a phrase its definition must contain} ("11-point" for the VOC07
metric, "101-point" for COCO's; "" = any definition); model (detection: what Detectron2
builds around the backbone, so C4 and FPN never match each other), schedule and input:
values compared field by field (lr is the learning rate actually used, batch the global batch); dataset:
split sizes (compared as a multiset, whatever the splits are called) and number of classes.
Metric names are ours (see report_tables.TASK_METRICS): box ``AP``/``AP50``/``AP75``,
mask ``mask_AP``/``mask_AP50``/``mask_AP75``.
"""

MOCO_V1 = "arXiv:1911.05722 (MoCo v1 paper)"
MOCO_REPO = "facebookresearch/moco @7397dfe"

# Detection entries are full records ("complete": every field transfer/detect/record.py writes
# for model, schedule and input, compared both ways: a field recorded on one side only is a
# difference). Values: MoCo's detection configs (facebookresearch/moco@7397dfe detection/configs,
# the *_moco.yaml variants: RGB input) on Detectron2's defaults, 8 GPUs (detection/README.md).
# Detectron2's input sizes for MoCo's detection configs (MAX_SIZE_* keep Detectron2's 1333).
_VOC_INPUT = {"min_size_train": list(range(480, 801, 32)), "max_size_train": 1333,
              "min_size_test": 800, "max_size_test": 1333, "format": "RGB", "random_flip": "horizontal"}
_COCO_INPUT = {**_VOC_INPUT, "min_size_train": list(range(640, 801, 32))}
_COCO_DATA = {"name": "COCO 2017 (train2017 -> val2017)",
              "splits": {"train": 118287, "val": 5000}, "classes": 80}
_COCO_BOX = {"AP": "101-point", "AP50": "101-point", "AP75": "101-point"}
_COCO_MASK = {**_COCO_BOX, "mask_AP": "101-point", "mask_AP50": "101-point", "mask_AP75": "101-point"}


# What Detectron2 builds around the backbone: the record's readable fields, and under "config"
# every MODEL key whose value is not Detectron2's default.
_C4_CONFIG = {"MODEL.BACKBONE.FREEZE_AT": 0, "MODEL.RESNETS.NORM": "naiveSyncBN",
              "MODEL.ROI_HEADS.NAME": "Res5ROIHeadsExtraNorm"}
_VOC_C4 = {"detector": "Faster R-CNN", "backbone": "build_resnet_backbone", "roi_heads": "Res5ROIHeadsExtraNorm",
           "mask_on": False, "norm": "naiveSyncBN", "fpn_norm": "", "freeze_at": 0,
           "config": {**_C4_CONFIG, "MODEL.ROI_HEADS.NUM_CLASSES": 20}}
_COCO_C4 = {**_VOC_C4, "detector": "Mask R-CNN", "mask_on": True, "config": {**_C4_CONFIG, "MODEL.MASK_ON": True}}
# Detectron2's Base-RCNN-FPN.yaml with SyncBN in the backbone and FPN (configs/detection/Base-RCNN-FPN-SyncBN.yaml)
_COCO_FPN = {"detector": "Mask R-CNN", "backbone": "build_resnet_fpn_backbone", "roi_heads": "StandardROIHeads",
             "mask_on": True, "norm": "SyncBN", "fpn_norm": "SyncBN", "freeze_at": 0, "config": {
                 "MODEL.ANCHOR_GENERATOR.SIZES": [[32], [64], [128], [256], [512]], "MODEL.BACKBONE.FREEZE_AT": 0,
                 "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone", "MODEL.FPN.IN_FEATURES": ["res2", "res3", "res4", "res5"],
                 "MODEL.FPN.NORM": "SyncBN", "MODEL.MASK_ON": True, "MODEL.RESNETS.NORM": "SyncBN",
                 "MODEL.RESNETS.OUT_FEATURES": ["res2", "res3", "res4", "res5"],
                 "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead", "MODEL.ROI_BOX_HEAD.NUM_FC": 2,
                 "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7, "MODEL.ROI_HEADS.IN_FEATURES": ["p2", "p3", "p4", "p5"],
                 "MODEL.ROI_HEADS.NAME": "StandardROIHeads", "MODEL.ROI_MASK_HEAD.NUM_CONV": 4,
                 "MODEL.RPN.IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"], "MODEL.RPN.POST_NMS_TOPK_TRAIN": 1000,
                 "MODEL.RPN.PRE_NMS_TOPK_TEST": 1000, "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 2000}}


def _schedule(iterations: int, steps: list, warmup: int = 1000) -> dict:
    """MoCo's SOLVER: batch 16 on 8 GPUs (2 images per BN), lr 0.02, PreciseBN (Detectron2's
    200 iterations), Detectron2's other defaults; warmup: Detectron2's default 1000 iterations
    (MoCo's COCO configs do not set it; its VOC config sets 100). "config": no other
    non-default setting."""
    return {"iterations": iterations, "lr": 0.02, "batch": 16, "images_per_process": 2, "warmup_iters": warmup,
            "warmup_factor": 0.001, "warmup_method": "linear", "steps": steps, "gamma": 0.1, "momentum": 0.9,
            "weight_decay": 0.0001, "precise_bn_iters": 200, "config": {}}



ANCHORS = [
    {
        "id": "in1k_linear",
        "task": "linear",
        "names": ["paper"],
        "protocol": {
            "engine": "torch",
            "metric": {"top1": ""},
            # main_lincls.py: SGD lr 30, momentum 0.9, no weight decay, 100 epochs, x0.1 at 60, 80
            "schedule": {"epochs": 100, "lr": 30.0, "batch": 256, "lr_steps": [60, 80],
                         "momentum": 0.9, "weight_decay": 0.0},
            "input": {"train_crop": 224, "test_resize": 256, "test_crop": 224},
            "dataset": {"name": "ImageNet-1k (ILSVRC-2012)",
                        "splits": {"train": 1281167, "val": 50000}, "classes": 1000},
        },
        "source": f"{MOCO_REPO} README: ImageNet linear top-1 (main_lincls.py), "
                  "mean±std over 5 trials (v2 800ep: the released model)",
        "baseline": None,  # the README gives no supervised linear number
        "rows": {
            "paper: MoCo v1 200ep": {"top1": [60.8, 0.2]},
            "paper: MoCo v2 200ep": {"top1": [67.5, 0.1]},
            "paper: MoCo v2 800ep": {"top1": 71.1},
        },
    },
    {
        "id": "voc_c4_24k",
        "task": "detect",
        "names": ["pascal_voc_R_50_C4_24k", "voc_c4_24k"],
        "protocol": {
            "engine": "detectron2", "complete": True,
            "metric": {"AP50": "11-point", "AP": "11-point", "AP75": "11-point"},
            "model": _VOC_C4,
            "schedule": _schedule(24000, [18000, 22000], warmup=100),
            "input": _VOC_INPUT,
            "dataset": {"name": "VOC07 test (trained on VOC07+12 trainval)",
                        "splits": {"train": 16551, "test": 4952}, "classes": 20},
        },
        "source": f"{MOCO_REPO} detection/README.md: Faster R-CNN R50-C4, "
                  "VOC07+12 trainval -> VOC07 test, 24k iters, 5-trial mean",
        "baseline": "paper: supervised IN-1M",
        "rows": {
            "paper: supervised IN-1M": {"AP50": 81.3, "AP": 53.5, "AP75": 58.8},
            "paper: MoCo v1 200ep": {"AP50": 81.5, "AP": 55.9, "AP75": 62.6},
            "paper: MoCo v2 200ep": {"AP50": 82.4, "AP": 57.0, "AP75": 63.6},
            "paper: MoCo v2 800ep": {"AP50": 82.5, "AP": 57.4, "AP75": 64.0},
        },
    },
    {
        "id": "coco_c4_2x",
        "task": "detect",
        "names": ["coco_R_50_C4_2x", "coco_c4_2x"],
        "protocol": {"engine": "detectron2", "complete": True, "metric": _COCO_MASK, "model": _COCO_C4,
                     "schedule": _schedule(180000, [120000, 160000]),
                     "input": _COCO_INPUT, "dataset": _COCO_DATA},
        "source": f"{MOCO_V1} Table 5(d): Mask R-CNN R50-C4, COCO 2x schedule "
                  "(secondary transcriptions, which agree)",
        "baseline": "paper: supervised IN-1M",
        "rows": {
            "paper: supervised IN-1M": {"AP": 40.0, "AP50": 59.9, "AP75": 43.1,
                                        "mask_AP": 34.7, "mask_AP50": 56.5, "mask_AP75": 36.9},
            "paper: MoCo v1 200ep": {"AP": 40.7, "AP50": 60.5, "AP75": 44.1,
                                     "mask_AP": 35.4, "mask_AP50": 57.3, "mask_AP75": 37.6},
        },
    },
    {
        "id": "coco_fpn_2x",
        "task": "detect",
        "names": ["coco_R_50_FPN_2x", "coco_fpn_2x"],
        "protocol": {"engine": "detectron2", "complete": True, "metric": _COCO_MASK, "model": _COCO_FPN,
                     "schedule": _schedule(180000, [120000, 160000]),
                     "input": _COCO_INPUT, "dataset": _COCO_DATA},
        "source": f"{MOCO_V1} Table 5(b): Mask R-CNN R50-FPN, COCO 2x schedule "
                  "(secondary transcriptions, which agree)",
        "baseline": "paper: supervised IN-1M",
        "rows": {
            "paper: supervised IN-1M": {"AP": 40.6, "AP50": 61.3, "AP75": 44.4,
                                        "mask_AP": 36.8, "mask_AP50": 58.1, "mask_AP75": 39.5},
            "paper: MoCo v1 200ep": {"AP": 40.8, "AP50": 61.6, "AP75": 44.7,
                                     "mask_AP": 36.9, "mask_AP50": 58.4, "mask_AP75": 39.7},
        },
    },
    {
        "id": "coco_fpn_1x",
        "task": "detect",
        "names": ["coco_R_50_FPN_1x", "coco_fpn_1x"],
        "protocol": {"engine": "detectron2", "complete": True, "metric": {"AP": "101-point", "mask_AP": "101-point"},
                     "model": _COCO_FPN, "schedule": _schedule(90000, [60000, 80000]),
                     "input": _COCO_INPUT, "dataset": _COCO_DATA},
        "source": f"{MOCO_V1} Table 5(a): Mask R-CNN R50-FPN, COCO 1x schedule; "
                  "UNVERIFIED transcription, check against the paper PDF",
        "baseline": "paper: supervised IN-1M",
        "rows": {
            "paper: supervised IN-1M": {"AP": 38.9, "mask_AP": 35.4},
            "paper: MoCo v1 200ep": {"AP": 38.5, "mask_AP": 35.1},
        },
    },
    {
        "id": "coco_c4_1x",
        "task": "detect",
        "names": ["coco_R_50_C4_1x", "coco_c4_1x"],
        "protocol": {"engine": "detectron2", "complete": True, "metric": {"AP": "101-point", "mask_AP": "101-point"},
                     "model": _COCO_C4, "schedule": _schedule(90000, [60000, 80000]),
                     "input": _COCO_INPUT, "dataset": _COCO_DATA},
        "source": f"{MOCO_V1} Table 5(c): Mask R-CNN R50-C4, COCO 1x schedule; "
                  "UNVERIFIED transcription, check against the paper PDF",
        "baseline": "paper: supervised IN-1M",
        "rows": {
            "paper: supervised IN-1M": {"AP": 38.2, "mask_AP": 33.3},
            "paper: MoCo v1 200ep": {"AP": 38.5, "mask_AP": 33.6},
        },
    },
    {
        # The paper's own FCN-16s-style protocol, which no task here runs: a run of the mmseg
        # FCN-D8 configs gets the fields that differ, never these rows.
        "id": "voc_seg",
        "task": "segment",
        "names": ["fcn_r50_d8_512x512_20k", "fcn_r50_d8_voc12aug_512x512_20k"],
        "protocol": {
            "engine": "MoCo paper FCN-16s-style (dilated conv5, two 256-channel dilation-6 convs)",
            "metric": {"mIoU": ""},
            "schedule": {"iterations": 30000, "lr": 0.003, "crop": 513},
            "input": {},
            "dataset": {"name": "VOC 2012 train_aug -> val", "splits": {"train": 10582, "val": 1449},
                        "classes": 21},
        },
        "source": f"{MOCO_V1} Table 6: VOC semantic segmentation mIoU with the paper's own "
                  "FCN-16s-style protocol (dilated conv5, crop 513, 30k iters)",
        "baseline": "paper: supervised IN-1M",
        "rows": {
            "paper: supervised IN-1M": {"mIoU": 74.4},
            "paper: MoCo v1 200ep": {"mIoU": 72.5},
        },
    },
    {
        "id": "cityscapes_seg",
        "task": "segment",
        "names": ["fcn_r50_d8_769x769_40k", "fcn_r50_d8_cityscapes_769x769_40k"],
        "protocol": {
            "engine": "MoCo paper FCN-16s-style (dilated conv5, two 256-channel dilation-6 convs)",
            "metric": {"mIoU": ""},
            "schedule": {"iterations": 90000, "lr": 0.01, "crop": 769},
            "input": {},
            "dataset": {"name": "Cityscapes train_fine -> val", "splits": {"train": 2975, "val": 500},
                        "classes": 19},
        },
        "source": f"{MOCO_V1} Table 6: Cityscapes semantic segmentation mIoU with the paper's "
                  "own FCN-16s-style protocol (dilated conv5, crop 769, 90k iters)",
        "baseline": "paper: supervised IN-1M",
        "rows": {
            "paper: supervised IN-1M": {"mIoU": 74.6},
            "paper: MoCo v1 200ep": {"mIoU": 75.3},
        },
    },
]
