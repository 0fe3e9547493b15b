"""MoCo pretraining: the algorithm against plain reference computations, the
distributed path on two real gloo processes, exact resume, and bad inputs."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from helpers import DEMO, free_port, init_gloo, one_line_error, run_pretrain, tiny_moco
from pretrain.builder import SplitBatchNorm

# ---------------------------------------------------------------- algorithm
def test_logits_and_loss_equal_a_plain_reference():
    model = tiny_moco(bn_splits=1)
    before = copy.deepcopy(model)
    im_q, im_k = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    logits, labels = model(im_q, im_k)

    # Reference: the key encoder after one momentum step; with one BN group the
    # shuffle cannot change per-image outputs, so no shuffle is needed here.
    ref_k_enc = copy.deepcopy(before.encoder_k)
    for pk, pq in zip(ref_k_enc.parameters(), before.encoder_q.parameters()):
        pk.data = pk.data * 0.9 + pq.data * 0.1
    with torch.no_grad():
        q = F.normalize(before.encoder_q(im_q), dim=1)
        k = F.normalize(ref_k_enc(im_k), dim=1)
    queue = before.queue
    for i in range(8):
        expected = [float(q[i] @ k[i])] + [float(q[i] @ queue[:, j]) for j in range(queue.shape[1])]
        np.testing.assert_allclose(logits[i].detach().numpy(), np.array(expected) / 0.2, atol=1e-4)
    assert labels.tolist() == [0] * 8
    loss = F.cross_entropy(logits, labels)
    manual = -torch.log_softmax(logits, dim=1)[:, 0].mean()
    assert torch.allclose(loss, manual, atol=1e-6)


def test_momentum_update_is_the_convex_combination():
    model = tiny_moco(m=0.75)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    k_before = [p.clone() for p in model.encoder_k.parameters()]
    q_now = [p.clone() for p in model.encoder_q.parameters()]
    model._momentum_update_key_encoder()
    for kb, q, k in zip(k_before, q_now, model.encoder_k.parameters()):
        assert torch.allclose(k, 0.75 * kb + 0.25 * q, atol=1e-6)
        assert not k.requires_grad


def test_queue_enqueue_and_wrap_around():
    model = tiny_moco(K=12, dim=4)
    batches = [F.normalize(torch.randn(4, 4), dim=1) for _ in range(4)]
    for i, keys in enumerate(batches[:3]):
        model._dequeue_and_enqueue(keys)
        assert int(model.queue_ptr) == (4 * (i + 1)) % 12
    assert torch.equal(model.queue.T, torch.cat(batches[:3]))
    model._dequeue_and_enqueue(batches[3])  # overwrites the oldest keys, at the start
    assert int(model.queue_ptr) == 4
    assert torch.equal(model.queue.T[:4], batches[3])
    assert torch.equal(model.queue.T[4:], torch.cat(batches[1:3]))


def test_shuffle_unshuffle_is_identity_on_one_process():
    model = tiny_moco()
    x = torch.randn(10, 5)
    shuffled, idx_unshuffle = model._batch_shuffle(x)
    assert sorted(shuffled[:, 0].tolist()) == sorted(x[:, 0].tolist())
    assert torch.equal(model._batch_unshuffle(shuffled, idx_unshuffle), x)


def test_split_batchnorm_normalises_each_group_on_its_own():
    bn = SplitBatchNorm(3, num_splits=2)
    x = torch.cat([torch.randn(4, 3, 2, 2), 5 + 3 * torch.randn(4, 3, 2, 2)])
    y = bn(x)
    # groups are interleaved view-wise: images 0,2,4,6 form one group, 1,3,5,7 the other
    for group in (y[0::2], y[1::2]):
        assert torch.allclose(group.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert set(bn.state_dict()) == set(torch.nn.BatchNorm2d(3).state_dict())


# ---------------------------------------------------------------- two processes
def _worker(rank, world, port, tmp):
    init_gloo(rank, world, port)
    model = tiny_moco(K=24, bn_splits=1)  # same seed: identical start on both ranks
    # shuffle/unshuffle identity across ranks
    x = torch.arange(6, dtype=torch.float32).view(3, 2) + 100 * rank
    shuffled, idx = model._batch_shuffle(x)
    assert torch.equal(model._batch_unshuffle(shuffled, idx), x)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1)
    local_keys = []
    original = model._dequeue_and_enqueue
    model._dequeue_and_enqueue = lambda k: (local_keys.append(k.clone()), original(k))[1]
    torch.manual_seed(1 + rank)  # each rank sees different images
    for _ in range(3):
        logits, labels = ddp(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
        F.cross_entropy(logits, labels).backward()
        opt.step()
        opt.zero_grad()
    # Parameters only: BN running statistics are per rank by design (each rank's BN sees its
    # own shuffled sub-batch; DDP re-broadcasts rank 0's buffers at every forward).
    params = lambda m: {n: p.detach().clone() for n, p in m.named_parameters()}  # noqa: E731
    torch.save({"queue": model.queue, "ptr": model.queue_ptr, "keys": local_keys,
                "encoder_k": params(model.encoder_k), "encoder_q": params(model.encoder_q)},
               f"{tmp}/rank{rank}.pt")
    torch_dist.destroy_process_group()


def test_two_gloo_processes_keep_queue_and_key_encoder_identical(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["queue"], r1["queue"]) and int(r0["ptr"]) == int(r1["ptr"]) == 0
    for name, t in r0["encoder_k"].items():
        assert torch.equal(t, r1["encoder_k"][name]), name
    for name, t in r0["encoder_q"].items():  # DDP kept the query encoders in step too
        assert torch.equal(t, r1["encoder_q"][name]), name
    # 3 steps x 2 ranks x 4 keys fill the queue of 24 in order: step, then rank
    expected = torch.cat([torch.cat([r0["keys"][s], r1["keys"][s]]) for s in range(3)])
    assert torch.allclose(r0["queue"].T, expected, atol=1e-6)


def test_torchrun_two_processes_train_and_write_a_checkpoint(tmp_path):
    result = run_pretrain(tmp_path, "train.max_steps=3", nproc=2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "world size 2 x 8 per rank = global 16" in result.stdout
    ckpt = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2
    assert int(ckpt["state_dict"]["queue_ptr"]) == (3 * 16) % 64


# ---------------------------------------------------------------- resume
def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
    straight = run_pretrain(tmp_path / "straight", "train.max_steps=6")
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = run_pretrain(tmp_path / "resumed", "train.max_steps=3")  # stops mid-epoch (4 steps/epoch)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_pretrain(tmp_path / "resumed", "train.max_steps=6", "data.num_workers=2")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout
    a = torch.load(tmp_path / "straight/checkpoint_last.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed/checkpoint_last.pth", weights_only=True)
    assert (a["epoch"], a["epoch_step"], a["step"]) == (b["epoch"], b["epoch_step"], b["step"]) == (1, 2, 6)
    for name, t in a["state_dict"].items():
        assert torch.equal(t, b["state_dict"][name]), name
    logged = [line for line in (tmp_path / "resumed/log.jsonl").read_text().splitlines()]
    assert len(logged) == 6 and (tmp_path / "resumed/config.yaml").exists()


def test_checkpoint_records_what_converters_need_and_knn_monitor_logs(tmp_path):
    result = run_pretrain(tmp_path, "train.max_steps=4", "train.knn_every_epochs=1",
                          "train.knn_max_train=100", "train.knn_max_val=50")
    assert result.returncode == 0, result.stderr[-2000:]
    knn = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()
           if "knn_top1" in line]
    assert len(knn) == 1 and knn[0]["epoch"] == 1 and 0.0 <= knn[0]["knn_top1"] <= 100.0
    ckpt = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert ckpt["format"] == "moco-bench.pretrain/1" and ckpt["arch"] == "resnet18"
    assert ckpt["method"] == "moco_v2" and ckpt["backbone_prefix"] == "encoder_q."
    assert ckpt["normalization"]["input_format"] == "RGB" and ckpt["image_size"] == 32
    keys = ckpt["state_dict"].keys()
    assert {"queue", "queue_ptr", "encoder_q.conv1.weight", "encoder_k.fc.2.weight"} <= set(keys)


# ---------------------------------------------------------------- bad input
def test_missing_data_folder_is_one_line(tmp_path):
    one_line_error(run_pretrain(tmp_path / "o", f"data.source={tmp_path}/nowhere"),
                    "neither a registered data set")


def test_empty_image_folder_is_one_line(tmp_path):
    (tmp_path / "data/train").mkdir(parents=True)
    one_line_error(run_pretrain(tmp_path / "o", f"data.source={tmp_path}/data"), "has no class folders")


def test_queue_not_divisible_by_batch_is_one_line(tmp_path):
    one_line_error(run_pretrain(tmp_path / "o", "moco.queue_size=100"),
                    "moco.queue_size 100 is not divisible by the global batch 16")


def test_unknown_override_is_one_line(tmp_path):
    one_line_error(run_pretrain(tmp_path / "o", "train.epoch=3"), "did you mean train.epochs")


def test_overrides_take_exponent_floats_and_lists():
    from mocobench.config import load_config
    from pretrain.config import PretrainConfig

    cfg = load_config(PretrainConfig, DEMO, ["train.weight_decay=5e-4", "data.crop_scale=[0.5,1]"])
    assert cfg.train.weight_decay == 5e-4 and cfg.data.crop_scale == [0.5, 1.0]


def test_supervised_baseline_trains_the_same_encoder_with_labels(tmp_path):
    result = run_pretrain(tmp_path, "method=supervised", "train.max_steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "supervised baseline: resnet18, 10 classes" in result.stdout
    ckpt = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert ckpt["method"] == "supervised" and ckpt["backbone_prefix"] == "encoder."
    assert ckpt["state_dict"]["encoder.fc.weight"].shape == (10, 512)
    assert not any(k.startswith("encoder_k.") or k == "queue" for k in ckpt["state_dict"])


def test_two_crops_are_seeded_per_image_and_skip_the_unused_key_view():
    from mocobench.data import build_dataset
    from pretrain.data import TwoCrops, moco_augmentation

    images = build_dataset("fashion-mnist", "train", max_images=4)
    aug = moco_augmentation("v2", 32, [0.5] * 3, [0.5] * 3)
    both, query_only = TwoCrops(images, aug, seed=3), TwoCrops(images, aug, seed=3, key_view=False)
    q, k, _, _ = both[1]
    q1, k1, _, _ = query_only[1]
    assert not torch.equal(q, k)  # two different augmentations
    assert torch.equal(q1, q) and k1 is q1  # same query view, no second augmentation
    assert torch.equal(both[1][0], q)  # a function of (seed, epoch, index) alone


def test_v2_blur_is_the_official_one_at_224_and_scales_with_smaller_crops():
    from pretrain.data import GaussianBlur, moco_augmentation

    def blur_sigma(size):
        ops = moco_augmentation("v2", size, [0.5] * 3, [0.5] * 3).transforms
        blurs = [t for op in ops for t in getattr(op, "transforms", []) if isinstance(t, GaussianBlur)]
        return blurs[0].sigma

    assert blur_sigma(224) == pytest.approx([0.1, 2.0])  # moco/main_moco.py
    assert blur_sigma(32) == pytest.approx([0.1 * 32 / 224, 2.0 * 32 / 224])


def test_colour_on_the_device_trains_and_logs_where_it_ran(tmp_path):
    result = run_pretrain(tmp_path, "train.max_steps=2", "data.colour_on=device", "data.num_workers=1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "colour on the device" in result.stdout
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
