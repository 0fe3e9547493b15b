# FCN-D8, ResNet-50, PASCAL VOC 2012 + SBD "aug" (10,582 train / 1,449 val), 512x512 crops, 20k iterations.
#
# The published MMSegmentation setting, written out in full (no _base_): every value below is
# from mmsegmentation 1.2.2 configs/fcn/fcn_r50-d8_4xb4-20k_voc12aug-512x512.py and its bases
# _base_/models/fcn_r50-d8.py, _base_/datasets/pascal_voc12_aug.py, _base_/schedules/schedule_20k.py,
# _base_/default_runtime.py -- except the backbone, which is the one mmselfsup 0.x uses for its
# MoCo segmentation benchmark (configs/benchmarks/mmsegmentation/_base_/models/fcn_r50-d8.py):
# mmseg's default ResNetV1c has a deep stem (stem.*) that torchvision-layout MoCo / supervised
# weights do not fill, so it would silently stay random. mmselfsup's MoCo v2 row for this
# setting is 67.55 mIoU (not comparable with the MoCo paper's FCN-16s-style 72.5, see
# docs/paper-numbers.md).
#
# Run:  torchrun --nproc_per_node 4 -m transfer segment --launcher pytorch \
#           --config configs/segmentation/fcn_r50_d8_voc12aug_512x512_20k.py --weights CKPT --output DIR \
#           --data-root data/VOCdevkit/VOC2012
# 4 processes x 4 images = batch 16, as published. Data: VOC2012 plus SBD converted with mmseg's
# tools/dataset_converters/voc_aug.py (SegmentationClassAug/ and ImageSets/Segmentation/aug.txt).
# `transfer segment` fills backbone.init_cfg with the converted --weights, sets SyncBN/BN from the
# launcher, and takes mean/std from the checkpoint when it records them.

benchmark = dict(dataset='voc12aug', protocol='fcn_r50_d8_512x512_20k')

crop_size = (512, 512)
num_classes = 21
norm_cfg = dict(type='SyncBN', requires_grad=True)  # BN when run as one process (transfer segment)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],  # ImageNet RGB mean/std on 0..255 pixels, as MoCo and torchvision
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,  # images are read BGR by OpenCV; MoCo was trained on RGB
    pad_val=0,
    seg_pad_val=255,
    size=crop_size)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,  # must stay None: mmseg asserts against pretrained together with init_cfg
    backbone=dict(
        type='ResNet',  # plain ResNet (V1b): same tensor names as torchvision; never ResNetV1c
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        dilations=(1, 1, 2, 4),  # D8: layer3/layer4 dilated instead of strided, output stride 8
        strides=(1, 2, 1, 1),
        norm_cfg=norm_cfg,
        norm_eval=False,
        style='pytorch',  # stride in the 3x3 conv, as torchvision
        contract_dilation=True,
        init_cfg=None),  # set by transfer segment: Pretrained(converted --weights, prefix='backbone.')
    decode_head=dict(
        type='FCNHead',
        in_channels=2048,
        in_index=3,
        channels=512,
        num_convs=2,
        concat_input=True,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=1024,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

# ---- data
dataset_type = 'PascalVOCDataset'
data_root = 'data/VOCdevkit/VOC2012'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='LoadAnnotations'),  # after Resize: metrics are computed at the original size
    dict(type='PackSegInputs'),
]
dataset_train = dict(
    type=dataset_type,
    data_root=data_root,
    data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
    ann_file='ImageSets/Segmentation/train.txt',
    pipeline=train_pipeline)
dataset_aug = dict(
    type=dataset_type,
    data_root=data_root,
    data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClassAug'),
    ann_file='ImageSets/Segmentation/aug.txt',
    pipeline=train_pipeline)
train_dataloader = dict(
    batch_size=4,  # per process; published with 4 GPUs (batch 16)
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='ConcatDataset', datasets=[dataset_train, dataset_aug]))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
        ann_file='ImageSets/Segmentation/val.txt',
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])  # reports aAcc, mIoU, mAcc
test_evaluator = val_evaluator

# ---- schedule
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0005),
    clip_grad=None)
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=20000, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=20000, val_interval=2000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

# ---- runtime
default_scope = 'mmseg'
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2000),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))  # gloo when no GPU (transfer segment)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None  # must stay None: backbone weights come from --weights through init_cfg
resume = False
