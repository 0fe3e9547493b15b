"""MoCo: a query encoder, a momentum key encoder and a queue of keys.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning"
(v1, arXiv:1911.05722) and Chen et al., "Improved Baselines with Momentum
Contrastive Learning" (v2, arXiv:2003.04297). The structure follows the
official ``moco/builder.py``; what differs is that it runs on any device and at
any world size, including one process without a process group.
"""
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from mocobench import dist
from pretrain import shuffle


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from `num_splits` groups of the batch.

    Shuffling BN needs the keys' BN statistics to come from other sub-batches
    than the queries' (else the model "cheats" through the batch statistics).
    Across GPUs each rank's BN sees its own sub-batch; on one process, splitting
    the batch into groups gives the same effect (the official Colab demo's trick).
    The state-dict keys are those of BatchNorm2d, so checkpoints stay torchvision's.
    """

    def __init__(self, num_features: int, num_splits: int = 1, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.num_splits
        if not self.training or g == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % g:
            raise ValueError(f"batch of {n} cannot be split into {g} BN groups")
        mean, var = self.running_mean.repeat(g), self.running_var.repeat(g)
        out = F.batch_norm(
            x.reshape(n // g, c * g, h, w), mean, var, self.weight.repeat(g), self.bias.repeat(g),
            True, self.momentum, self.eps,
        ).view(n, c, h, w)
        # Each group updated its own copy of the running stats; keep their average.
        self.running_mean.copy_(mean.view(g, c).mean(0))
        self.running_var.copy_(var.view(g, c).mean(0))
        self.num_batches_tracked.add_(1)
        return out


@contextmanager
def full_precision(device_type: str):
    """Autocast off: the contrastive logits reach 1/T (14.3 at T = 0.07), where bf16 keeps
    steps of 0.06 and fp16 of 0.008; the features are normalised and compared in fp32."""
    with torch.autocast(device_type, enabled=False):
        yield


def normalized(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows in fp32, whatever the autocast precision of `x`."""
    with full_precision(x.device.type):
        return F.normalize(x.float(), dim=1)


def build_encoder(arch: str, dim: int, mlp: bool, bn_splits: int = 1) -> nn.Module:
    """A torchvision ResNet whose fc is the projection head (v1: linear; v2: MLP).

    Keeping torchvision's module names means the backbone's weights are a plain
    torchvision state dict under a prefix, which is what converters expect.
    """
    try:
        constructor = torchvision.models.get_model_builder(arch)
    except ValueError:
        constructor = None
    if constructor is None or not arch.startswith(("resnet", "wide_resnet", "resnext")):
        raise ValueError(f"unknown architecture {arch!r}; use a torchvision ResNet such as resnet50")
    norm_layer = partial(SplitBatchNorm, num_splits=bn_splits) if bn_splits > 1 else nn.BatchNorm2d
    encoder = constructor(num_classes=dim, norm_layer=norm_layer)
    if mlp:  # MoCo v2 head: 2048-2048-128 for ResNet-50
        hidden = encoder.fc.weight.shape[1]
        encoder.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), encoder.fc)
    return encoder


class MoCo(nn.Module):
    """
    arch: torchvision ResNet name (default resnet50)
    dim: feature dimension of the keys and queries (default 128)
    K: queue size, number of negative keys (default 65536)
    m: momentum of the key encoder update (default 0.999)
    T: softmax temperature (v1 0.07, v2 0.2)
    mlp: MLP projection head (v2) instead of a linear one (v1)
    bn_splits: BN groups per batch (>1 emulates shuffling BN on one process)
    shuffle_keys: shuffling BN's batch shuffle of the keys (False for SyncBN or plain BN)
    """

    def __init__(self, arch="resnet50", dim=128, K=65536, m=0.999, T=0.07, mlp=False, bn_splits=1,
                 shuffle_keys=True):
        super().__init__()
        self.K, self.m, self.T, self.shuffle_keys = K, m, T, shuffle_keys
        self.encoder_q = build_encoder(arch, dim, mlp, bn_splits)
        self.encoder_k = build_encoder(arch, dim, mlp, bn_splits)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)  # the key encoder starts as a copy
            param_k.requires_grad = False  # and is never updated by gradients
        # Buffers, so that checkpoints and DDP carry the queue along with the weights.
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        """key = m * key + (1 - m) * query, over every parameter in one fused call
        (lerp: one pass over the weights instead of a multiply and an add)."""
        params_k = [p for p in self.encoder_k.parameters()]
        params_q = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_lerp_(params_k, params_q, 1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor):
        keys = dist.all_gather_no_grad(keys)  # every rank enqueues every rank's keys
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0, "queue size must be a multiple of the global batch"
        self.queue[:, ptr:ptr + batch_size] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + batch_size) % self.K  # the oldest keys go next

    @torch.no_grad()
    def _batch_shuffle(self, x: torch.Tensor):
        """Shuffle the global batch so each rank (or BN group) encodes keys from other
        images than its queries. Returns this rank's slice and how to undo it. Across
        ranks an all_to_all moves only the images each rank encodes (pretrain/shuffle.py)."""
        return shuffle.shuffle(x)

    @torch.no_grad()
    def _batch_unshuffle(self, x: torch.Tensor, plan: shuffle.ShufflePlan) -> torch.Tensor:
        return shuffle.unshuffle(x, plan)

    def contrastive_logits(self, q: torch.Tensor, k: torch.Tensor):
        """Nx(1+K) fp32 logits with the positive key at index 0, and the N zero labels."""
        with full_precision(q.device.type):
            q, k = q.float(), k.float()
            l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # Nx1
            # clone: the queue is updated in place after this, autograd must not see that
            l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach().float())  # NxK
            logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return logits, labels

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, index=None):
        # index (the images' dataset ids) is for pretrain.dictionary.MemoryBank; unused here
        q = normalized(self.encoder_q(im_q))  # NxC

        with torch.no_grad():
            # after the query forward, before the key forward, as in the official code
            self._momentum_update_key_encoder()
            if self.shuffle_keys:
                im_k, idx_unshuffle = self._batch_shuffle(im_k)
                k = self._batch_unshuffle(normalized(self.encoder_k(im_k)), idx_unshuffle)
            else:
                k = normalized(self.encoder_k(im_k))

        logits, labels = self.contrastive_logits(q, k)
        self._dequeue_and_enqueue(k)
        return logits, labels


class Supervised(nn.Module):
    """The same encoder trained with labels: the like-for-like baseline on the same data.
    Its fc is the classifier, dropped by converters like MoCo's projection head."""

    def __init__(self, arch="resnet50", num_classes=1000):
        super().__init__()
        self.encoder = build_encoder(arch, num_classes, mlp=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)


def backbone(encoder: nn.Module) -> nn.Module:
    """The encoder up to the pooled features (drops the projection head)."""
    return nn.Sequential(*list(encoder.children())[:-1], nn.Flatten(1))
