"""The three dictionaries (queue, end-to-end, memory bank) against plain reference
computations, on two real gloo processes and through the CLI with exact resume,
and the dictionary consistency probe."""
import copy
import json
import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mocobench.config import load_config
from mocobench.errors import UserError
from pretrain.config import PretrainConfig, check
from pretrain.dictionary import ConsistencyProbe, EndToEnd, MemoryBank, consistency

from helpers import DEMO, free_port, one_line_error, run_pretrain, tiny_moco

PROBE = ["train.consistency_every=1", "train.consistency_images=16"]


def tiny_e2e(**kw):
    torch.manual_seed(0)
    return EndToEnd(**{**dict(arch="resnet18", dim=16, T=0.2, mlp=True, bn_splits=1), **kw})


def tiny_bank(**kw):
    torch.manual_seed(0)
    args = dict(arch="resnet18", dim=16, num_images=40, K=10, T=0.2, mlp=True, bn_splits=1,
                bank_momentum=0.0)
    return MemoryBank(**{**args, **kw})


# ---------------------------------------------------------------- end-to-end
def test_end_to_end_logits_are_batch_similarities_with_positives_on_the_diagonal():
    model = tiny_e2e()
    before = copy.deepcopy(model)
    im_q, im_k = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    logits, labels = model(im_q, im_k)
    with torch.no_grad():  # one BN group: per-image outputs do not depend on the permutation
        q = F.normalize(before.encoder_q(im_q), dim=1)
        k = F.normalize(before.encoder_q(im_k), dim=1)
    assert torch.allclose(logits, q @ k.T / 0.2, atol=1e-4)
    assert labels.tolist() == list(range(6))
    assert not any(name.startswith("encoder_k") for name in model.state_dict())


def test_end_to_end_gets_gradients_through_the_key_path_and_queue_never_does():
    im_q = torch.randn(4, 3, 32, 32)
    e2e = tiny_e2e()
    im_k = torch.randn(4, 3, 32, 32, requires_grad=True)
    F.cross_entropy(*e2e(im_q, im_k)).backward()
    assert im_k.grad is not None and im_k.grad.abs().sum() > 0  # the keys are differentiated

    moco = tiny_moco()
    im_k = torch.randn(4, 3, 32, 32, requires_grad=True)
    F.cross_entropy(*moco(im_q, im_k)).backward()
    assert im_k.grad is None
    assert all(p.grad is None and not p.requires_grad for p in moco.encoder_k.parameters())
    assert all(p.grad is not None for p in moco.encoder_q.parameters())


# ---------------------------------------------------------------- memory bank
def test_memory_bank_logits_use_stored_features_and_only_sampled_ids_change():
    model = tiny_bank()
    bank_before = model.bank.clone()
    index = torch.tensor([3, 7, 11, 20])
    im_q = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        q = F.normalize(copy.deepcopy(model.encoder_q)(im_q), dim=1)
    torch.manual_seed(5)
    logits, labels = model(im_q, None, index)
    torch.manual_seed(5)
    negatives = torch.randint(40, (10,))  # the same draw the model made
    expected = torch.cat([(q * bank_before[index]).sum(1, keepdim=True),
                          q @ bank_before[negatives].T], dim=1) / 0.2
    assert torch.allclose(logits, expected, atol=1e-4) and labels.tolist() == [0] * 4

    changed = (model.bank != bank_before).any(dim=1).nonzero().flatten()
    assert changed.tolist() == index.tolist()
    assert torch.allclose(model.bank[index], q, atol=1e-5)  # bank_momentum 0: overwritten


def test_memory_bank_proximal_update_and_no_key_encoder():
    model = tiny_bank(bank_momentum=0.5)
    old = model.bank.clone()
    index = torch.tensor([0, 1])
    im_q = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        q = F.normalize(copy.deepcopy(model.encoder_q)(im_q), dim=1)
    logits, _ = model(im_q, None, index)
    assert torch.allclose(model.bank[index], F.normalize(0.5 * old[index] + 0.5 * q, dim=1), atol=1e-5)
    assert logits.requires_grad and logits.shape == (2, 11)
    assert {n.split(".")[0] for n in model.state_dict()} == {"encoder_q", "bank"}


# ---------------------------------------------------------------- consistency probe
def test_consistency_is_one_for_an_unchanged_encoder_and_falls_after_it_moves():
    torch.manual_seed(0)
    encoder = tiny_moco().encoder_k
    probe = ConsistencyProbe(torch.randn(10, 3, 32, 32), max_age=3, batch_size=5)
    bn_before = copy.deepcopy(list(encoder.buffers()))
    assert probe(encoder, 0) == pytest.approx({0: 1.0}, abs=1e-5)
    unchanged = probe(encoder, 1)
    assert unchanged == pytest.approx({0: 1.0, 1: 1.0}, abs=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(bn_before, encoder.buffers()))  # BN untouched
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = probe(encoder, 2)
    assert moved[0] == pytest.approx(1.0, abs=1e-5)
    assert moved[1] < 0.999 and moved[2] < 0.999
    assert set(probe(encoder, 5)) == {0, 3}  # keys older than max_age have left the dictionary
    # the pure function: orthogonal keys have cosine 0, age is measured from the step written
    e = torch.eye(4)
    assert consistency({10: e, 12: e[[1, 0, 3, 2]]}, e, 13) == pytest.approx({1: 0.0, 3: 1.0})


# ---------------------------------------------------------------- config
def test_unknown_dictionary_and_bad_bank_momentum_are_refused_in_one_line():
    with pytest.raises(UserError, match="moco.dictionary='bank' is not allowed: it must be one of "
                                        "queue, end_to_end, memory_bank"):
        load_config(PretrainConfig, DEMO, ["moco.dictionary=bank"])
    with pytest.raises(UserError, match=r"moco.bank_momentum=1.0 is not allowed: it must be less than 1"):
        load_config(PretrainConfig, DEMO, ["moco.dictionary=memory_bank", "moco.bank_momentum=1"])
    # queue_size need not divide the batch when there is no queue
    check(load_config(PretrainConfig, DEMO, ["moco.dictionary=memory_bank", "moco.queue_size=100"]), 1)


def test_memory_bank_with_more_negatives_than_images_is_one_line(tmp_path):
    one_line_error(run_pretrain(tmp_path, "moco.dictionary=memory_bank", "moco.queue_size=128"),
                    "moco.queue_size 128 is more negatives than the memory bank's 64 images")


# ---------------------------------------------------------------- CLI, one process
def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_end_to_end_cli_trains_and_logs_consistency(tmp_path):
    result = run_pretrain(tmp_path, "moco.dictionary=end_to_end", "train.max_steps=3", *PROBE)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dictionary end_to_end, K=16" in result.stdout
    ckpt = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert ckpt["method"] == "moco" and ckpt["backbone_prefix"] == "encoder_q."
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"encoder_q"}
    probes = [r["consistency"] for r in _log(tmp_path) if "consistency" in r]
    assert len(probes) == 3 and all(p == {"0": 1.0} for p in probes)  # keys never age


def test_memory_bank_cli_resume_is_exact_and_the_probe_changes_nothing(tmp_path):
    bank = ["moco.dictionary=memory_bank", "moco.queue_size=32"]
    straight = run_pretrain(tmp_path / "straight", *bank, "train.max_steps=5")
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = run_pretrain(tmp_path / "resumed", *bank, *PROBE, "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_pretrain(tmp_path / "resumed", *bank, *PROBE, "train.max_steps=5")
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-2000:]
    a = torch.load(tmp_path / "straight/checkpoint_last.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed/checkpoint_last.pth", weights_only=True)
    assert a["state_dict"]["bank"].shape == (64, 16) and a["step"] == b["step"] == 5
    for name, t in a["state_dict"].items():
        assert torch.equal(t, b["state_dict"][name]), name
    probes = [r["consistency"] for r in _log(tmp_path / "resumed") if "consistency" in r]
    assert len(probes) == 5 and probes[-1]["0"] == pytest.approx(1.0, abs=1e-5)
    assert probes[1]["1"] < 1.0  # the encoder moved in one step


# ---------------------------------------------------------------- two processes
def _worker(rank, world, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    out = {}
    for name, model in (("e2e", tiny_e2e()), ("bank", tiny_bank(bank_momentum=0.5))):
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1)
        torch.manual_seed(0)  # same RNG on both ranks, as pretrain's seeding gives
        g = torch.Generator().manual_seed(1 + rank)  # but each rank sees different images
        for step in range(2):
            index = torch.tensor([4 * step + 2 * rank, 4 * step + 2 * rank + 1])
            logits, labels = ddp(torch.randn(2, 3, 32, 32, generator=g),
                                 torch.randn(2, 3, 32, 32, generator=g), index)
            F.cross_entropy(logits, labels).backward()
            opt.step()
            opt.zero_grad()
        out[name] = {"shape": tuple(logits.shape), "labels": labels.tolist(),
                     "encoder_q": {n: p.detach().clone() for n, p in model.encoder_q.named_parameters()}}
        if name == "bank":
            out[name]["bank"] = model.bank.clone()
    torch.save(out, f"{tmp}/rank{rank}.pt")
    torch_dist.destroy_process_group()


def test_two_gloo_processes_end_to_end_and_memory_bank(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # end-to-end: N x global-batch logits, each rank's positives in its own block
    assert r0["e2e"]["shape"] == r1["e2e"]["shape"] == (2, 4)
    assert r0["e2e"]["labels"] == [0, 1] and r1["e2e"]["labels"] == [2, 3]
    for name in ("e2e", "bank"):
        for p, t in r0[name]["encoder_q"].items():
            assert torch.equal(t, r1[name]["encoder_q"][p]), (name, p)
    # memory bank: both ranks hold the same bank, with both ranks' ids (0..7) written
    assert torch.equal(r0["bank"]["bank"], r1["bank"]["bank"])
    changed = (r0["bank"]["bank"] != tiny_bank().bank).any(dim=1).nonzero().flatten().tolist()
    assert changed == list(range(8)), changed


def test_torchrun_two_processes_memory_bank_with_the_probe_on_rank_0(tmp_path):
    # (end-to-end's and the queue's two-process paths: the spawn test above and test_pretrain.py)
    result = run_pretrain(tmp_path, "moco.dictionary=memory_bank", "moco.queue_size=32",
                          "train.max_steps=2", *PROBE, nproc=2)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["world_size"] == 2
    # the CLI seeds 0 before building the model, as tiny_bank does: 2 steps x 16 ids written
    assert (ckpt["state_dict"]["bank"] != tiny_bank(num_images=64).bank).any(dim=1).sum() == 32
    assert len([r for r in _log(tmp_path) if "consistency" in r]) == 2
