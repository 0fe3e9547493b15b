"""Each speed option keeps the MoCo loss of the plain fp32 run: channels_last, bf16
autocast, the all_to_all shuffle (on two gloo processes) and the foreach momentum
update. Two training steps each, so the options also see updated weights and queue
(bf16: the first step only, see its test)."""
import json
import os
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pretrain import shuffle
from pretrain.builder import MoCo
from helpers import free_port

STEPS = 2


def losses(channels_last=False, bf16=False, momentum_loop=False, gather_shuffle=False,
           bn_splits=2, seed=0):
    torch.manual_seed(0)
    model = MoCo("resnet18", dim=16, K=48, m=0.9, T=0.2, mlp=True, bn_splits=bn_splits)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if momentum_loop:  # the official per-parameter loop
        def loop():
            with torch.no_grad():
                for pk, pq in zip(model.encoder_k.parameters(), model.encoder_q.parameters()):
                    pk.data = pk.data * model.m + pq.data * (1.0 - model.m)
        model._momentum_update_key_encoder = loop
    if gather_shuffle:
        model._batch_shuffle, model._batch_unshuffle = shuffle.gather_shuffle, shuffle.gather_unshuffle
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.01, momentum=0.9)
    data = torch.Generator().manual_seed(seed)
    out = []
    torch.manual_seed(1)  # the batch shuffle's permutations
    for _ in range(STEPS):
        im_q, im_k = (torch.randn(8, 3, 32, 32, generator=data).contiguous(memory_format=fmt)
                      for _ in range(2))
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            logits, labels = model(im_q, im_k)
            loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return torch.tensor(out)


# fp32 options change only the order of float operations; BN over groups of 4 images
# amplifies those last-bit differences to ~1e-5 of the loss by the second step.
FP32_RTOL = 3e-4


def test_channels_last_keeps_the_loss():
    torch.testing.assert_close(losses(channels_last=True), losses(), rtol=FP32_RTOL, atol=0)


def test_bf16_autocast_keeps_the_loss_to_bf16_precision():
    # bf16 keeps 8 bits of mantissa: through 18 layers the first loss moves by 0.3-4.7% over
    # seeds 0-5 (2.2% on average). The second one is compared in neither direction: the
    # rounded keys entering the 48-key queue move it by 0.3-15% over the same seeds (and a
    # last-bit change in the fp32 momentum update alone took seed 0 from 1.7% to 7.7%).
    first = [(losses(bf16=True, seed=s)[0] / losses(seed=s)[0] - 1).abs() for s in range(4)]
    assert max(first) < 0.06 and sum(first) / len(first) < 0.03, first


def test_foreach_momentum_update_keeps_the_loss():
    # m*k + (1-m)*q rounds differently from foreach's lerp k + (1-m)*(q-k) in the last bit
    torch.testing.assert_close(losses(momentum_loop=True), losses(), rtol=FP32_RTOL, atol=0)



def _worker(rank, world, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    # no DDP: the shuffle is what differs; each rank's loss is over its own images
    result = {"all_to_all": losses(bn_splits=1, seed=rank),
              "all_gather": losses(bn_splits=1, seed=rank, gather_shuffle=True)}
    torch.save(result, f"{tmp}/rank{rank}.pt")
    torch_dist.destroy_process_group()


def test_all_to_all_shuffle_keeps_the_loss_on_two_processes(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(r["all_to_all"], r["all_gather"]), r


# ---------------------------------------------------------------- benchmarks/gpu_smoke
def _smoke(argv, capsys):
    from benchmarks import gpu_smoke

    with pytest.raises(SystemExit) as e:
        gpu_smoke.main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return e.value.code, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_gpu_smoke_refuses_in_one_line_without_a_gpu(capsys):
    code, err = _smoke([], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: benchmarks.gpu_smoke needs a CUDA GPU")


def test_gpu_smoke_refuses_a_missing_official_source(tmp_path, capsys):
    code, err = _smoke(["--device", "cpu", "--tiny", "--official-source", str(tmp_path / "builder.py")], capsys)
    assert code == 2 and len(err) == 1 and "--official-source" in err[0] and "is not a file" in err[0]


def test_gpu_smoke_runs_end_to_end_at_toy_sizes_on_cpu_labelled_as_no_gpu_measurement(tmp_path, capsys):
    from benchmarks import gpu_smoke

    official = tmp_path / "builder.py"
    official.write_text("raise SystemExit('the official builder is not imported on a CPU')\n")
    report = gpu_smoke.main(["--device", "cpu", "--tiny", "--official-source", str(official),
                             "--output", str(tmp_path / "smoke.json")])
    assert json.loads((tmp_path / "smoke.json").read_text()) == report
    assert report["what"].startswith("NOT a GPU measurement")
    rows = {r["figure"]: r for r in report["rows"]}
    for name in ("ours, fp32", "ours, bf16 + channels_last", "pretrain loop, colour on the worker",
                 "pretrain loop, colour on the device"):
        assert rows[name]["value"] > 0, name
    ratio = rows["pretrain loop, colour on the device / worker"]["value"]
    assert ratio == pytest.approx(rows["pretrain loop, colour on the device"]["value"]
                                  / rows["pretrain loop, colour on the worker"]["value"])
    assert "skipped" in rows["official builder, fp32"]["note"]
    printed = capsys.readouterr().out
    assert "NOT a GPU measurement" in printed and "| ours, fp32" in printed
