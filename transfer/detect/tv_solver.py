"""The torchvision engine's solver: Detectron2's parameter groups and warmup multi-step
schedule, and PreciseBN (fvcore's update_bn_stats)."""
import bisect

import torch
from torch import nn


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
