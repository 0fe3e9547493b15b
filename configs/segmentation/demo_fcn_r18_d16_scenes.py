# DEMO, CPU-sized: FCN-D16 on a ResNet-18, on the embedded Fashion-MNIST scenes. Not a benchmark.
#
# Scale, honestly: 256 train / 64 test scenes of 128x128 pixels (2-4 Fashion-MNIST test-split
# items of 28-56 px pasted on a dim gradient; 11 classes: background + the 10 Fashion-MNIST
# classes; transfer.scenes composes them once and caches them), random 96x96 training crops,
# batch 8, 200 iterations (about 6 epochs), one quarter-width FCN head. It exists to run the real
# MMSegmentation pipeline (dataset reader, FCN training, IoUMetric) end to end on a laptop within
# about two minutes of one CPU thread; its mIoU says nothing about VOC or Cityscapes. Settings
# were chosen on a validation split of the scenes, never the test split (docs/segmentation.md,
# "The demo": what was tried and measured). The network is the plain ResNet of the published
# configs with output stride 16 (strides (1,2,2,1), dilations (1,1,1,2)) instead of 8: at these
# crop sizes a larger crop paid more than a finer output. Depth 18 matches the CPU demo
# pretraining; for ResNet-50 weights add
#   --cfg-options model.backbone.depth=50 model.decode_head.in_channels=2048
#
# Run:  python -m transfer segment --config configs/segmentation/demo_fcn_r18_d16_scenes.py \
#           --weights CKPT --output DIR

# The data's name in results.json comes from what is read (here the embedded scenes: fmnist-scenes).
benchmark = dict(protocol='demo_fcn_r18_d16_96x96_200it')

# The scenes (transfer.scenes.ensure_demo_scenes arguments); root=None caches them under
# $MOCO_BENCH_CACHE/scenes or ~/.cache/moco-bench/scenes. transfer segment points data_root there.
embedded_data = dict(root=None, n_train=256, n_val=64, seed=0, canvas=128)

crop_size = (96, 96)
# None: the heads predict the classes of the data's classes.txt (the scenes write 'background' and
# the 10 Fashion-MNIST classes; a user's own data folder brings its own list, docs/segmentation.md).
num_classes = None
max_iters = 200
norm_cfg = dict(type='SyncBN', requires_grad=True)  # BN when run as one process (transfer segment)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],  # ImageNet RGB mean/std on 0..255 pixels, as MoCo and torchvision
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type='ResNet',  # plain ResNet (V1b): same tensor names as torchvision; never ResNetV1c
        depth=18,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        dilations=(1, 1, 1, 2),  # D16: layer4 dilated instead of strided
        strides=(1, 2, 2, 1),
        norm_cfg=norm_cfg,
        norm_eval=False,
        style='pytorch',
        contract_dilation=True,
        init_cfg=None),  # set by transfer segment: Pretrained(converted --weights, prefix='backbone.')
    decode_head=dict(
        type='FCNHead',
        in_channels=512,  # ResNet-18 layer4
        in_index=3,
        channels=128,  # published: 512
        num_convs=2,
        concat_input=True,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        # The scenes are ~84% background: weighting it 0.2 got the heads off all-background
        # (validation mIoU 14.8 vs 10.8 at 80 iterations); one weight per class of the scenes.
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0,
                         class_weight=[0.2] + [1.0] * 10)),
    # No auxiliary head: it cost 18% of each step and did not help here (validation mIoU 31.6
    # without, 29.6 with, at 160 iterations).
    auxiliary_head=None,
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

# ---- data: mmseg's own BaseSegDataset reads the img_dir/ + ann_dir/ layout unchanged
dataset_type = 'BaseSegDataset'
data_root = None  # filled by transfer segment from embedded_data
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(128, 128), ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=0,  # tiny PNGs: worker processes would cost more than they save
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        img_suffix='.png',
        seg_map_suffix='.png',
        reduce_zero_label=False,  # 0 is a real class (background)
        data_prefix=dict(img_path='img_dir/train', seg_map_path='ann_dir/train'),
        pipeline=train_pipeline))
test_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        img_suffix='.png',
        seg_map_suffix='.png',
        reduce_zero_label=False,
        data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
        pipeline=test_pipeline))
test_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])  # reports aAcc, mIoU, mAcc
# No validation during the run: the one evaluation is the test after the last iteration.
val_dataloader = None
val_cfg = None
val_evaluator = None

# ---- schedule: the published SGD + poly, over the demo's iterations
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=0.0005),  # published 0.01; 0.05 learnt faster here
    clip_grad=None)
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=max_iters, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)
test_cfg = dict(type='TestLoop')

# ---- runtime
default_scope = 'mmseg'
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=20, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # No checkpoint files (~100 MB each with the optimizer state): the model is evaluated in memory
    # right after training. --cfg-options default_hooks.checkpoint.interval=200 keeps one.
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=-1, save_last=False),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))  # gloo when no GPU (transfer segment)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
