"""Where the negatives come from: the three dictionaries of MoCo's Figure 2.

MoCo (He et al. 2020, §3.2 and Fig. 3) argues a contrastive dictionary must be
large and consistent. ``moco.dictionary`` picks one of the three mechanisms the
paper compares; everything else (encoders, InfoNCE loss, data, logging,
checkpoints) is shared:

    queue        MoCo: a momentum key encoder and a FIFO queue of K keys (builder.MoCo)
    end_to_end   keys of the current batch only, from the query encoder with gradients:
                 consistent, but K is the global batch (limited by memory)
    memory_bank  InstDisc (Wu et al. 2018): one stored feature per training image, K
                 negatives sampled from it, the batch's entries rewritten after each
                 step: large, but its keys come from encoders of the whole past epoch

All three give Nx(1+K)-style logits and labels for the same cross-entropy, and
keep the learning encoder at ``encoder_q.`` so checkpoints load the same way.
The consistency probe at the end measures the "consistent" half of the claim.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from mocobench import dist
from pretrain import shuffle
from pretrain.builder import MoCo, build_encoder, full_precision, normalized


class EndToEnd(nn.Module):
    """
    arch, dim, T, mlp, bn_splits, shuffle_keys: as for MoCo
    The key encoder is the query encoder itself (m = 0, no queue): a query's positive
    is its own image's key, the negatives the other keys of the global batch.
    """

    def __init__(self, arch="resnet50", dim=128, T=0.07, mlp=False, bn_splits=1, shuffle_keys=True):
        super().__init__()
        self.T, self.shuffle_keys = T, shuffle_keys
        self.encoder_q = build_encoder(arch, dim, mlp, bn_splits)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, index=None):
        q = normalized(self.encoder_q(im_q))  # NxC
        if self.shuffle_keys:
            # Shuffling BN as for MoCo's keys (across ranks, and across BN groups within a
            # rank), but differentiable: the keys' gradients travel back to the rank that
            # encoded them (pretrain/shuffle.py).
            im_k, plan = shuffle.shuffle(im_k)
            k = normalized(shuffle.unshuffle(self.encoder_q(im_k), plan))  # NxC, with grad
        else:
            k = normalized(self.encoder_q(im_k))
        # Every rank's loss uses every rank's keys: their gradients are summed back to the
        # rank that computed each key, so the ranks together get the gradient of the mean loss.
        k_all = dist.all_gather_with_grad(k)  # (world*N)xC
        with full_precision(q.device.type):
            logits = q @ k_all.T / self.T  # Nx(world*N): the positive is this rank's diagonal
        labels = dist.get_rank() * q.shape[0] + torch.arange(q.shape[0], device=q.device)
        return logits, labels


class MemoryBank(nn.Module):
    """
    arch, dim, T, mlp, bn_splits: as for MoCo
    num_images: bank entries, one per training image (indexed by the dataset index)
    K: negatives sampled uniformly from the bank at each step
    bank_momentum: InstDisc's proximal update v = normalize(m v + (1-m) f); 0 overwrites
    No key encoder: the bank is written by the query encoder (detached).
    """

    def __init__(self, arch="resnet50", dim=128, num_images=1281167, K=4096, T=0.07, mlp=False,
                 bn_splits=1, bank_momentum=0.5):
        super().__init__()
        self.K, self.T, self.bank_momentum = K, T, bank_momentum
        self.encoder_q = build_encoder(arch, dim, mlp, bn_splits)
        # A buffer, so checkpoints carry it and resume is exact (as for MoCo's queue).
        self.register_buffer("bank", F.normalize(torch.randn(num_images, dim), dim=1))

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor = None, index: torch.Tensor = None):
        # InstDisc encodes one view: the positive is the image's stored feature, so the
        # key view is not needed (TwoCrops repeats the query view rather than augmenting one).
        q = normalized(self.encoder_q(im_q))  # NxC, fp32
        negatives = torch.randint(self.bank.shape[0], (self.K,), device=q.device)
        dist.broadcast(negatives, src=0)  # the same negatives on every rank
        # Indexing copies, so the in-place bank update below cannot reach autograd.
        with full_precision(q.device.type):
            l_pos = torch.einsum("nc,nc->n", q, self.bank[index].float()).unsqueeze(-1)  # Nx1
            l_neg = torch.einsum("nc,kc->nk", q, self.bank[negatives].float())  # NxK
            logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._update_bank(q.detach(), index)
        return logits, labels

    @torch.no_grad()
    def _update_bank(self, features: torch.Tensor, index: torch.Tensor):
        # Every rank writes every rank's entries, so all ranks hold the same bank.
        ids = dist.all_gather_no_grad(index.to(self.bank.device))
        features = dist.all_gather_no_grad(features).to(self.bank.dtype)
        if self.bank_momentum > 0:
            features = F.normalize(self.bank_momentum * self.bank[ids]
                                   + (1.0 - self.bank_momentum) * features, dim=1)
        self.bank[ids] = features


def build_contrastive(cfg, num_images: int, bn_splits: int) -> nn.Module:
    """The model for cfg.moco.dictionary; the only place that reads the config."""
    m = cfg.moco
    shuffle_keys = m.bn == "shuffle"
    if m.dictionary == "queue":
        return MoCo(cfg.model.arch, m.dim, m.queue_size, m.momentum, m.temperature, m.mlp, bn_splits,
                    shuffle_keys)
    if m.dictionary == "end_to_end":
        return EndToEnd(cfg.model.arch, m.dim, m.temperature, m.mlp, bn_splits, shuffle_keys)
    return MemoryBank(cfg.model.arch, m.dim, num_images, m.queue_size, m.temperature, m.mlp,
                      bn_splits, m.bank_momentum)


def key_encoder(model: nn.Module) -> nn.Module:
    """The encoder whose outputs enter the dictionary."""
    return model.encoder_k if isinstance(model, MoCo) else model.encoder_q


def max_key_age(cfg, steps_per_epoch: int) -> int:
    """Steps a key stays in the dictionary: K/B for the queue, up to two epochs for the
    bank (an entry is rewritten when its image comes round again), 0 for end-to-end."""
    if cfg.moco.dictionary == "queue":
        return cfg.moco.queue_size // cfg.train.batch_size
    if cfg.moco.dictionary == "memory_bank":
        return 2 * steps_per_epoch
    return 0


# ============ dictionary consistency probe ============
@torch.no_grad()
def consistency(stored: dict, current: torch.Tensor, step: int) -> dict:
    """{age: mean cosine} between each stored snapshot ({step written: PxC keys}) and
    the same P images encoded now (PxC), age = step - step written."""
    now = F.normalize(current.float(), dim=1)
    return {step - s: float((F.normalize(keys.float(), dim=1) * now).sum(1).mean())
            for s, keys in sorted(stored.items(), reverse=True)}


class ConsistencyProbe:
    """Encodes a fixed probe set (deterministic eval views) with the key encoder every
    few steps, remembers each encoding as "the key that entered the dictionary at that
    step", and reports how similar the current key encoder's encoding of the same
    images is, for every age the dictionary still holds (up to max_age steps).

    Keys are encoded as in training, with batch statistics in BN (eval-mode running
    statistics would add their own drift early in training), in fixed chunks of
    `batch_size` images (the per-rank batch, so BN groups divide it; the probe set is
    cut to whole chunks); the BN buffers are restored afterwards and no random numbers
    are drawn, so training is unchanged by it. Every rank runs it (SyncBN would wait
    for the others otherwise). Snapshots live in memory only: after a resume the ages
    start again from 0.
    """

    def __init__(self, images: torch.Tensor, max_age: int, batch_size: int = 256):
        self.batch_size = min(batch_size, len(images))
        self.images = images[: len(images) // self.batch_size * self.batch_size]
        self.max_age = max_age
        self.stored: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, encoder: nn.Module) -> torch.Tensor:
        was_training = encoder.training
        buffers = [b.clone() for b in encoder.buffers()]
        encoder.train()
        device = next(encoder.parameters()).device
        keys = torch.cat([encoder(x.to(device)).float().cpu()
                          for x in self.images.split(self.batch_size)])
        for b, saved in zip(encoder.buffers(), buffers):
            b.copy_(saved)
        encoder.train(was_training)
        return F.normalize(keys, dim=1)

    def __call__(self, encoder: nn.Module, step: int) -> dict:
        keys = self.encode(encoder)
        self.stored = {s: k for s, k in self.stored.items() if step - s <= self.max_age}
        self.stored[step] = keys
        return consistency(self.stored, keys, step)
