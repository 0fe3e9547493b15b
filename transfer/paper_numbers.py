"""The MoCo papers' published transfer numbers (R50, ImageNet-1M pretraining), as data.

Sources and the full table: docs/paper-numbers.md; each entry names its
source. ``report`` puts these rows beside ours when a result's protocol is the
one the numbers were measured with. Values are in percent, as published; a
``[mean, std]`` pair is a mean over several trials with its spread.

Matching: an entry applies to a result when ``task`` is equal, the regex
``protocol`` (case-insensitive ``re.search``; None: any) matches the result's
``protocol`` string or its config's ``name`` / ``config`` / ``config_file``
string, and the regex ``dataset`` (None: any) matches the result's dataset name.
A protocol containing "demo" never matches: demo scales are not the paper's.
``engine`` (None: any) is what the paper used; a matching result from another
engine (e.g. our torchvision detection engine) still gets the rows, with a note
that they are not directly comparable.
Detection protocols carry the Detectron2 config name (pascal_voc_R_50_C4_24k);
segmentation results are matched on their dataset (voc12aug, cityscapes), as
transfer/segment.py names protocols after the mmseg schedule only.

Metric names are ours (see report.TASK_METRICS): box ``AP``/``AP50``/``AP75``,
mask ``mask_AP``/``mask_AP50``/``mask_AP75``.
"""

MOCO_V1 = "arXiv:1911.05722 (MoCo v1 paper)"

ANCHORS = [
    {
        "id": "in1k_linear",
        "task": "linear",
        "engine": None,
        "protocol": r"^paper$",
        "dataset": r"imagenet|in-?1k|ilsvrc",
        "source": "facebookresearch/moco README @7397dfe: ImageNet linear top-1, "
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
        "engine": "detectron2",  # the MoCo detection code; other engines get a caveat
        "protocol": r"voc\w*[_-]c4[_-]\w*24k",  # pascal_voc_R_50_C4_24k, voc_c4_24k
        "dataset": None,
        "source": "facebookresearch/moco detection/README.md @7397dfe: Faster R-CNN R50-C4, "
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
        "engine": "detectron2",  # the MoCo detection code; other engines get a caveat
        "protocol": r"coco\w*[_-]c4[_-]\w*2x",
        "dataset": None,
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
        "engine": "detectron2",  # the MoCo detection code; other engines get a caveat
        "protocol": r"coco\w*[_-]fpn[_-]\w*2x",
        "dataset": None,
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
        "engine": "detectron2",  # the MoCo detection code; other engines get a caveat
        "protocol": r"coco\w*[_-]fpn[_-]\w*1x",
        "dataset": None,
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
        "engine": "detectron2",  # the MoCo detection code; other engines get a caveat
        "protocol": r"coco\w*[_-]c4[_-]\w*1x",
        "dataset": None,
        "source": f"{MOCO_V1} Table 5(c): Mask R-CNN R50-C4, COCO 1x schedule; "
                  "UNVERIFIED transcription, check against the paper PDF",
        "baseline": "paper: supervised IN-1M",
        "rows": {
            "paper: supervised IN-1M": {"AP": 38.2, "mask_AP": 33.3},
            "paper: MoCo v1 200ep": {"AP": 38.5, "mask_AP": 33.6},
        },
    },
    {
        "id": "voc_seg",
        "task": "segment",
        "engine": None,
        "protocol": None,
        "dataset": r"voc",
        "source": f"{MOCO_V1} Table 6: VOC semantic segmentation mIoU with the paper's own "
                  "FCN-16s-style protocol (dilated conv5, crop 513, 30k iters), not mmseg "
                  "FCN-D8 20k: not directly comparable",
        "baseline": "paper: supervised IN-1M",
        "rows": {
            "paper: supervised IN-1M": {"mIoU": 74.4},
            "paper: MoCo v1 200ep": {"mIoU": 72.5},
        },
    },
    {
        "id": "cityscapes_seg",
        "task": "segment",
        "engine": None,
        "protocol": None,
        "dataset": r"cityscapes",
        "source": f"{MOCO_V1} Table 6: Cityscapes semantic segmentation mIoU with the paper's "
                  "own FCN-16s-style protocol (dilated conv5, crop 769, 90k iters), not mmseg "
                  "FCN-D8 40k: not directly comparable",
        "baseline": "paper: supervised IN-1M",
        "rows": {
            "paper: supervised IN-1M": {"mIoU": 74.6},
            "paper: MoCo v1 200ep": {"mIoU": 75.3},
        },
    },
]
