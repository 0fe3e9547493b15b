"""MoCo training step vs a supervised step of the same encoder, batch and resolution.

MoCo costs a supervised step plus one key forward pass (about 4/3 of the compute),
a queue matmul and a momentum update over every parameter; the ratio shows how
close to that ideal the implementation is, and the shares show where the rest goes.
"""
import torch
import torch.nn as nn

from benchmarks.timing import interleaved
from pretrain.builder import MoCo, build_encoder


def run(full: bool = False) -> list[dict]:
    arch, batch, size, K, repeats = (("resnet50", 64, 224, 65536, 10) if full
                                     else ("resnet18", 32, 64, 4096, 9))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    moco = MoCo(arch, 128, K, 0.999, 0.2, mlp=True, bn_splits=8).to(device)
    # One BN group: what each GPU runs under shuffling BN across ranks. The 8 groups above
    # are the single-process emulation (SplitBatchNorm), whose smaller reductions cost extra.
    moco_one_group = MoCo(arch, 128, K, 0.999, 0.2, mlp=True, bn_splits=1).to(device)
    sgd = lambda params: torch.optim.SGD(params, 0.03, momentum=0.9, weight_decay=1e-4)  # noqa: E731
    im_q, im_k = (torch.randn(batch, 3, size, size, device=device) for _ in range(2))
    labels = torch.randint(0, 10, (batch,), device=device)
    ce = nn.CrossEntropyLoss()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def moco_step_of(model):
        optimizer = sgd(model.encoder_q.parameters())

        def step():
            logits, target = model(im_q, im_k)
            optimizer.zero_grad()
            ce(logits, target).backward()
            optimizer.step()
            sync()
        return step

    def supervised_step_of(bn_splits):
        # 8 BN groups too: what the single-process emulation of shuffling BN costs by itself
        model = build_encoder(arch, 10, mlp=False, bn_splits=bn_splits).to(device)
        optimizer = sgd(model.parameters())

        def step():
            optimizer.zero_grad()
            ce(model(im_q), labels).backward()
            optimizer.step()
            sync()
        return step

    keys = nn.functional.normalize(torch.randn(batch, 128, device=device), dim=1)
    params_k = list(moco.encoder_k.parameters())
    params_q = list(moco.encoder_q.parameters())

    def momentum_loop():  # the official code's per-parameter Python loop, for comparison
        with torch.no_grad():
            for pk, pq in zip(params_k, params_q):
                pk.data = pk.data * moco.m + pq.data * (1.0 - moco.m)
        sync()

    t = interleaved({"moco": moco_step_of(moco), "moco_one_group": moco_step_of(moco_one_group),
                     "supervised": supervised_step_of(1), "supervised_8_groups": supervised_step_of(8)},
                    repeats=repeats)
    parts = interleaved({"momentum_foreach": lambda: (moco._momentum_update_key_encoder(), sync()),
                         "momentum_loop": momentum_loop,
                         "enqueue": lambda: (moco._dequeue_and_enqueue(keys), sync())},
                        repeats=repeats * 4)
    setting = f"{arch}, batch {batch}, {size} px, K={K}, {device.type}"
    return [
        {"name": "MoCo step / supervised step", "value": t["moco"] / t["supervised"],
         "unit": "ratio", "note": f"ideal ~1.33; {setting}, 8 BN groups (one process)"},
        {"name": "MoCo step, 1 BN group / supervised step", "value":
         t["moco_one_group"] / t["supervised"], "unit": "ratio",
         "note": "as each GPU runs it when shuffling BN across ranks"},
        {"name": "MoCo step / supervised step, both with 8 BN groups", "value":
         t["moco"] / t["supervised_8_groups"], "unit": "ratio",
         "note": "like for like under the one-process emulation"},
        {"name": "supervised step, 8 BN groups / 1 group", "value":
         t["supervised_8_groups"] / t["supervised"], "unit": "ratio",
         "note": "the emulation's own cost (SplitBatchNorm)"},
        {"name": "MoCo images/s", "value": batch / t["moco"], "unit": "img/s", "note": setting},
        {"name": "supervised images/s", "value": batch / t["supervised"], "unit": "img/s", "note": setting},
        {"name": "momentum update share of MoCo step", "value": parts["momentum_foreach"] / t["moco"],
         "unit": "fraction", "note": "one foreach lerp"},
        {"name": "momentum update: Python loop / foreach", "value":
         parts["momentum_loop"] / parts["momentum_foreach"], "unit": "ratio", "note": ">1: foreach wins"},
        {"name": "queue update share of MoCo step", "value": parts["enqueue"] / t["moco"],
         "unit": "fraction", "note": "in-place slice write"},
    ]
