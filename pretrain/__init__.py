"""MoCo v1/v2 pretraining of torchvision ResNets, from one CPU process to many GPUs.

    python -m pretrain --config configs/pretrain/moco_v2_r50_in1k.yaml --output DIR [key=value ...]
    torchrun --nproc_per_node=N -m pretrain --config ... --output DIR [key=value ...]
"""
from pretrain.builder import MoCo, SplitBatchNorm
from pretrain.config import PretrainConfig
from pretrain.train import train

__all__ = ["MoCo", "SplitBatchNorm", "PretrainConfig", "train"]
