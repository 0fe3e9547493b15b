"""MoCo pretraining: the algorithm against plain reference computations, the
distributed path on two real gloo processes, exact resume, and bad inputs."""
import copy
import os
import time
import subprocess
from pathlib import Path
import json

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from helpers import DEMO, ROOT, TINY, _env, free_port, init_gloo, one_line_error, pretrain_command, run_pretrain, tiny_moco
from pretrain.builder import MoCo, SplitBatchNorm

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


def test_split_batchnorm_running_statistics_average_what_each_group_alone_would_keep():
    """The running statistics are what every eval-mode transfer sees: after each step they must
    be the mean over groups of what a BatchNorm2d fed only that group would hold."""
    g, c = 4, 3
    split = SplitBatchNorm(c, num_splits=g, momentum=0.3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        group = (torch.arange(4 * g) % g).view(-1, 1, 1, 1)  # image i is in group i mod g
        # groups with different means and spreads, so no single group stands for the average
        x = torch.randn(4 * g, c, 3, 3, generator=gen) * (1 + group) + 2 * group
        refs = [torch.nn.BatchNorm2d(c, momentum=0.3) for _ in range(g)]
        for ref in refs:  # each starts from the statistics the split layer holds now
            ref.running_mean.copy_(split.running_mean)
            ref.running_var.copy_(split.running_var)
        y = split(x)
        for j, ref in enumerate(refs):
            torch.testing.assert_close(y[j::g], ref(x[j::g]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(split.running_mean, torch.stack([r.running_mean for r in refs]).mean(0))
        torch.testing.assert_close(split.running_var, torch.stack([r.running_var for r in refs]).mean(0))
    assert int(split.num_batches_tracked) == 3


@pytest.mark.parametrize("dictionary", ["queue", "end_to_end", "memory_bank"])
def test_contrastive_logits_are_fp32_under_bf16_autocast(dictionary):
    """Logits reach 1/T, where bf16 keeps steps of 1/T x 2^-8: they are computed from the
    encoders' (bf16) outputs in fp32, as a float64 reference computed from the same outputs."""
    from pretrain.dictionary import EndToEnd, MemoryBank

    torch.manual_seed(0)
    common = dict(arch="resnet18", dim=16, T=0.07, mlp=True, bn_splits=1)
    model = {"queue": lambda: MoCo(K=32, m=0.9, shuffle_keys=False, **common),
             "end_to_end": lambda: EndToEnd(shuffle_keys=False, **common),
             "memory_bank": lambda: MemoryBank(num_images=40, K=10, bank_momentum=0.0, **common)}[dictionary]()
    outputs = []
    for encoder in {model.encoder_q, getattr(model, "encoder_k", model.encoder_q)}:
        encoder.register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
    im_q, im_k, index = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), torch.arange(8)
    stored = (model.queue.T if dictionary == "queue" else getattr(model, "bank", None))
    stored = stored.clone().double() if stored is not None else None
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, labels = model(im_q, im_k, index)
    assert outputs[0].dtype == torch.bfloat16 and logits.dtype == torch.float32
    q = F.normalize(outputs[0].double(), dim=1)
    if dictionary == "memory_bank":
        torch.manual_seed(5)
        negatives = torch.randint(40, (10,))  # the draw the model made
        reference = torch.cat([(q * stored[index]).sum(1, keepdim=True), q @ stored[negatives].T], 1)
    else:
        k = F.normalize(outputs[1].double(), dim=1)
        reference = (torch.cat([(q * k).sum(1, keepdim=True), q @ stored.T], 1)
                     if dictionary == "queue" else q @ k.T)
    error = (logits.double() - reference / 0.07).abs().max().item()
    assert error < 1e-4, error  # bf16 logits would be off by up to ~0.03 here


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
    # own shuffled sub-batch).
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


# ---- a GPU node's process group, emulated: the guard against CPU tensors reaching NCCL
def _bound_like_nccl(backend: str) -> str:
    """`backend` with every backend replaced by gloo bound to the same device types. NCCL
    serves the cuda device type only (torch's Backend.backend_capability), so the group
    refuses a CPU tensor exactly where a GPU node's group would."""
    from torch.distributed import Backend

    pairs = []
    for part in backend.lower().split(","):
        devices = [part.split(":")[0]] if ":" in part else Backend.backend_capability[part]
        pairs += [f"{device}:gloo" for device in devices]
    return ",".join(pairs)


def _gpu_node_worker(rank, world, port, tmp):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    real_init, available, set_device = torch_dist.init_process_group, torch.cuda.is_available, torch.cuda.set_device
    torch_dist.init_process_group = lambda backend, **kw: real_init(backend=_bound_like_nccl(backend), **kw)
    torch.cuda.is_available, torch.cuda.set_device = (lambda: True), (lambda device: None)
    try:
        from mocobench import dist
        dist.init_distributed()  # takes the GPU path: the backend pretraining gets on GPUs
    finally:
        torch_dist.init_process_group, torch.cuda.is_available, torch.cuda.set_device = real_init, available, set_device
    from pretrain import checkpoint, shuffle

    # the CPU-side collectives of a pretraining step and checkpoint
    out = {"loss": dist.all_reduce_mean(1.0 + rank), "permutation": shuffle._permutation(8),
           "rng_rows": len(checkpoint.rng_states()["torch"])}
    dist.barrier()
    torch.save(out, f"{tmp}/rank{rank}.pt")
    dist.destroy()


def test_cpu_bookkeeping_collectives_work_in_a_process_group_bound_like_nccl(tmp_path):
    """Under NCCL a CPU tensor raised "No backend type associated with device type cpu" at
    the first logged step; gloo bound to cuda only refuses it the same way on a CPU."""
    assert _bound_like_nccl("nccl") == "cuda:gloo"
    mp.spawn(_gpu_node_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["loss"] == r1["loss"] == 1.5 and r0["rng_rows"] == 2
    assert torch.equal(r0["permutation"], r1["permutation"])


# ---- two ranks, one spawn shared by the tests below
def _two_rank_worker(rank, world, port, tmp):
    init_gloo(rank, world, port)
    from mocobench.config import load_config
    from pretrain.checkpoint import restore_rng, rng_states
    from pretrain.config import PretrainConfig
    from pretrain.dictionary import EndToEnd, build_contrastive
    from pretrain.train import wrap_ddp

    out = {}
    # end-to-end with shuffling BN across ranks: one step on this rank's half of a global batch
    torch.manual_seed(0)
    model = EndToEnd("resnet18", dim=8, T=0.2, mlp=False, bn_splits=1)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(0)
    im_q, im_k = (torch.randn(8, 3, 32, 32, generator=g) for _ in range(2))
    torch.manual_seed(7)  # the shuffle's permutation
    logits, labels = ddp(im_q[4 * rank:4 * rank + 4], im_k[4 * rank:4 * rank + 4])
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    out["e2e"] = {"loss": loss.item(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}

    # moco.bn=none: keys from this rank's own images under its own BN (no shuffle)
    torch.manual_seed(0)
    moco = tiny_moco(K=16, bn_splits=1, shuffle_keys=False)
    moco(im_q[4 * rank:4 * rank + 4], im_k[4 * rank:4 * rank + 4])
    out["no_shuffle_queue"] = moco.queue.clone()

    # the dictionaries are not re-sent by DDP: a mark on rank 1 outside the written entries stays
    for dictionary, buffer in (("memory_bank", "bank"), ("queue", "queue")):
        cfg = load_config(PretrainConfig, DEMO, TINY + [f"moco.dictionary={dictionary}", "moco.queue_size=32"])
        torch.manual_seed(0)
        model = build_contrastive(cfg, 64, 1)
        wrapped = wrap_ddp(cfg, model, torch.device("cpu"))
        state = getattr(model, buffer)
        if rank == 1:
            state.view(-1)[-1] = 123.0  # bank: image 63's entry; queue: the last key slot
        logits, labels = wrapped(im_q[:4], im_k[:4], torch.arange(4) + 4 * rank)
        F.cross_entropy(logits, labels).backward()
        logits, labels = wrapped(im_q[:4], im_k[:4], torch.arange(4) + 4 * rank)
        out[f"{buffer}_mark"] = float(state.view(-1)[-1])

    # every rank's RNG state saved, and each restored to its own
    torch.manual_seed(100 + rank)
    states = rng_states()
    expected = torch.rand(3)
    torch.manual_seed(999)
    restore_rng(states)
    out["rng"] = {"rows_differ": not torch.equal(states["torch"][0], states["torch"][1]),
                  "restored": torch.equal(torch.rand(3), expected)}
    torch.save(out, f"{tmp}/rank{rank}.pt")
    torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(_two_rank_worker, args=(2, free_port(), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in (0, 1)]


def test_end_to_end_on_two_ranks_shuffles_bn_across_ranks_with_the_full_gradient(two_ranks):
    """The reference: the same global batch in one process, each rank's BN computed on its own
    images (queries: its half; keys: the images the global permutation gives it), the mean of
    the two ranks' losses differentiated in one piece."""
    from pretrain.dictionary import EndToEnd

    torch.manual_seed(0)
    ref = EndToEnd("resnet18", dim=8, T=0.2, mlp=False, bn_splits=1)
    g = torch.Generator().manual_seed(0)
    im_q, im_k = (torch.randn(8, 3, 32, 32, generator=g) for _ in range(2))
    torch.manual_seed(7)
    perm = torch.randperm(8)  # rank r encodes the keys of images perm[4r:4r+4]
    q = [F.normalize(ref.encoder_q(im_q[4 * r:4 * r + 4]), dim=1) for r in (0, 1)]
    k = torch.empty(8, 8)
    k[perm] = torch.cat([F.normalize(ref.encoder_q(im_k[perm[4 * r:4 * r + 4]]), dim=1) for r in (0, 1)])
    losses = [F.cross_entropy(q[r] @ k.T / 0.2, torch.arange(4) + 4 * r) for r in (0, 1)]
    (sum(losses) / 2).backward()
    for rank, result in enumerate(two_ranks):
        assert result["e2e"]["loss"] == pytest.approx(losses[rank].item(), rel=1e-5)
        for name, p in ref.named_parameters():  # DDP averaged the ranks' gradients
            # fp32 summation order leaves ~6e-5 of the norm (measured against float64); the
            # gradient without the cross-rank terms is 15-25% off
            error = (result["e2e"]["grads"][name] - p.grad).norm() / p.grad.norm()
            assert error < 1e-3, (name, float(error))


def test_bn_none_encodes_keys_on_their_own_rank(two_ranks):
    g = torch.Generator().manual_seed(0)
    im_k = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)][1]
    torch.manual_seed(0)
    ref = tiny_moco(K=16, bn_splits=1, shuffle_keys=False)
    ref._momentum_update_key_encoder()
    with torch.no_grad():
        keys = torch.cat([F.normalize(ref.encoder_k(im_k[4 * r:4 * r + 4]), dim=1) for r in (0, 1)])
    torch.testing.assert_close(two_ranks[0]["no_shuffle_queue"].T[:8], keys, rtol=1e-4, atol=1e-5)


def test_ddp_does_not_resend_the_memory_bank_or_the_queue(two_ranks):
    assert two_ranks[0]["bank_mark"] != 123.0 and two_ranks[1]["bank_mark"] == 123.0
    assert two_ranks[1]["queue_mark"] == 123.0


def test_every_rank_saves_and_restores_its_own_rng_state(two_ranks):
    assert all(r["rng"]["rows_differ"] and r["rng"]["restored"] for r in two_ranks)


DESTROYED = """
import sys
import torch.distributed as d
from pretrain.__main__ import main
main(sys.argv[1:])
# one write per rank: two ranks' print() calls interleave their pieces on a shared pipe
sys.stdout.write(f"process group left: {d.is_initialized()}\\n")
sys.stdout.flush()
"""


def test_torchrun_two_processes_train_write_a_checkpoint_and_destroy_the_group(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(DESTROYED)
    result = run_pretrain(tmp_path / "out", "train.max_steps=3", nproc=2, script=script)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "world size 2 x 8 per rank = global 16" in result.stdout
    assert result.stdout.count("process group left: False") == 2  # both ranks destroyed it
    tmp_path = tmp_path / "out"
    ckpt = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2
    assert int(ckpt["state_dict"]["queue_ptr"]) == (3 * 16) % 64


def test_ranks_end_when_torchrun_is_killed(tmp_path):
    # SIGKILL gives torchrun no chance to stop its workers; without PR_SET_PDEATHSIG they
    # trained on as orphans, holding the output folder's lock (and, on a node, the GPUs).
    out = tmp_path / "out"
    launcher = subprocess.Popen(pretrain_command(out, "train.epochs=10000", nproc=2), cwd=ROOT,
                                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text().strip():
            assert launcher.poll() is None and time.monotonic() < deadline, "pretraining never logged"
            time.sleep(0.5)
        ranks = [int(p) for p in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
        assert len(ranks) == 2
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 60
        while any(Path(f"/proc/{r}").exists() and "Z" not in _proc_state(r) for r in ranks):
            assert time.monotonic() < deadline, "the ranks outlived torchrun"
            time.sleep(0.5)
    finally:
        launcher.kill()
        subprocess.run(["pkill", "-9", "-f", str(out)], capture_output=True)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"


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


def test_resume_with_changed_settings_is_refused_listing_them_before_anything_is_written(tmp_path):
    first = run_pretrain(tmp_path, "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    files = {name: (tmp_path / name).read_bytes() for name in ("config.yaml", "log.jsonl", "checkpoint_last.pth")}
    for overrides, fields in [
        (["model.arch=resnet34"], ["model.arch (resnet18 -> resnet34)"]),
        (["moco.queue_size=128", "moco.dim=32"], ["moco.dim (16 -> 32)", "moco.queue_size (64 -> 128)"]),
        (["method=supervised"], ["method (moco -> supervised)"]),
        (["train.lr=0.1"], ["train.lr (0.06 -> 0.1)"]),
        (["data.max_images=48"], ["data.max_images (64 -> 48)", "training images (64 -> 48)"]),
    ]:
        refused = run_pretrain(tmp_path, "train.max_steps=4", *overrides)
        one_line_error(refused, f"cannot resume from {tmp_path / 'checkpoint_last.pth'}: the run differs in")
        assert all(field in refused.stderr for field in fields), (fields, refused.stderr)
        assert {name: (tmp_path / name).read_bytes() for name in files} == files  # untouched
    # what a resumed run may change: length, frequencies, workers, precision
    allowed = run_pretrain(tmp_path, "train.max_steps=4", "train.epochs=3", "data.num_workers=1",
                           "train.print_freq=2", "train.save_every_steps=1", "train.amp=bf16")
    assert allowed.returncode == 0 and "resumed from" in allowed.stdout, allowed.stderr[-2000:]


def test_two_identical_runs_write_byte_identical_checkpoints(tmp_path):
    """The checkpoint's bytes are a function of its contents (torch's zip records the file
    name it was written under; atomic saves write under the final name), so caches keyed by
    sha256 hit and results' weights.sha256 is reproducible."""
    from mocobench.fileio import sha256_file

    for name in ("a", "b"):
        result = run_pretrain(tmp_path / name, "train.max_steps=2")
        assert result.returncode == 0, result.stderr[-2000:]
    assert sha256_file(tmp_path / "a/checkpoint_last.pth") == sha256_file(tmp_path / "b/checkpoint_last.pth")


def test_checkpoint_records_what_converters_need_and_knn_monitor_logs(tmp_path):
    tic = time.monotonic()
    result = run_pretrain(tmp_path, "train.max_steps=4", "train.knn_every_epochs=1",
                          "train.knn_max_train=100", "train.knn_max_val=50")
    elapsed = time.monotonic() - tic
    assert result.returncode == 0, result.stderr[-2000:]
    assert "precision: fp32, channels_last off" in result.stdout
    # stdout is a pipe, as in SLURM logs: the bar is drawn at start, at the end, at most once
    # per 10 s in between and once after each kNN line (tqdm redraws it below the message),
    # not once per step
    knn_lines = result.stdout.count("kNN top-1")
    assert knn_lines >= 1
    assert result.stdout.count("pretrain:") <= 2 + knn_lines + elapsed / 10, result.stdout
    knn = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()
           if "knn_top1" in line]
    assert len(knn) == 1 and knn[0]["epoch"] == 1 and 0.0 <= knn[0]["knn_top1"] <= 100.0
    ckpt = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert ckpt["format"] == "moco-bench.pretrain/1" and ckpt["arch"] == "resnet18"
    assert ckpt["method"] == "moco_v2" and ckpt["backbone_prefix"] == "encoder_q."
    assert ckpt["normalization"]["input_format"] == "RGB" and ckpt["image_size"] == 32
    keys = ckpt["state_dict"].keys()
    assert {"queue", "queue_ptr", "encoder_q.conv1.weight", "encoder_k.fc.2.weight"} <= set(keys)


def test_sync_bn_on_cpu_processes_and_fp16_on_cpu_are_refused_before_anything_starts():
    from mocobench.config import load_config
    from mocobench.errors import UserError
    from pretrain.config import PretrainConfig, check

    sync = load_config(PretrainConfig, DEMO, ["moco.bn=sync"])
    with pytest.raises(UserError, match="moco.bn=sync needs GPUs"):
        check(sync, 2, "cpu")
    check(sync, 2, "cuda")
    check(sync, 1, "cpu")  # one process: SyncBatchNorm is plain BatchNorm there
    with pytest.raises(UserError, match="train.amp=fp16 needs a GPU"):
        check(load_config(PretrainConfig, DEMO, ["train.amp=fp16"]), 1, "cpu")


def test_loader_workers_persist_and_see_each_epoch():
    """Workers are started once; the epoch reaches them through the sampler's (epoch, index)
    pairs, so epoch 1's views are the views of epoch 1 (no message to the workers needed)."""
    from mocobench.config import load_config
    from mocobench.data import build_dataset
    from pretrain.config import PretrainConfig
    from pretrain.train import build_data

    cfg = load_config(PretrainConfig, DEMO, TINY + ["data.num_workers=2"])
    images = build_dataset("fashion-mnist", "train", max_images=64)
    loader, sampler, _, _, _ = build_data(cfg, images, torch.device("cpu"))
    assert loader.persistent_workers
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        im_q, _, _, index = next(iter(loader))
        expected = torch.stack([loader.dataset[(epoch, int(i))][0] for i in index])
        assert torch.equal(im_q, expected), epoch
    assert not torch.equal(loader.dataset[(0, 5)][0], loader.dataset[(1, 5)][0])


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
