"""The all_to_all batch shuffle against the official all_gather one, on two real gloo
processes: the same slices, the same unshuffled keys, and shuffle/unshuffle is the identity."""
import os

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from pretrain import shuffle
from pretrain.builder import MoCo
from helpers import free_port



def _worker(rank, world, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = []
    for trial, n in enumerate([1, 4, 7]):
        images = torch.randn(n, 3, 5, 5, generator=torch.Generator().manual_seed(10 * trial + rank))
        # The permutation comes from the global RNG and rank 0's wins: in the last trial
        # the ranks' RNGs disagree, which must not matter.
        torch.manual_seed(trial + (100 * rank if trial == 2 else 0))
        state = torch.get_rng_state()
        mine, plan = shuffle.shuffle(images)
        after_a2a = torch.get_rng_state()
        torch.set_rng_state(state)
        ref, idx_unshuffle = shuffle.gather_shuffle(images)
        assert torch.equal(after_a2a, torch.get_rng_state())  # both draw the same randomness
        keys = mine.flatten(1)[:, :4] * 2  # stand-in for the key encoder
        results.append({
            "images": images, "mine": mine, "ref": ref,
            "back": shuffle.unshuffle(mine, plan),
            "keys": shuffle.unshuffle(keys, plan),
            "ref_keys": shuffle.gather_unshuffle(ref.flatten(1)[:, :4] * 2, idx_unshuffle),
            "recv_counts": plan.recv_counts,
        })
    # channels_last images (train.channels_last) stay channels_last, with the same values
    images = torch.randn(4, 3, 5, 5)
    torch.manual_seed(3)
    plain, _ = shuffle.shuffle(images)
    torch.manual_seed(3)
    cl, _ = shuffle.shuffle(images.contiguous(memory_format=torch.channels_last))
    results.append({"channels_last": cl.is_contiguous(memory_format=torch.channels_last)
                    and torch.equal(cl, plain)})
    torch.manual_seed(5)
    model = MoCo("resnet18", dim=8, K=16, bn_splits=1)
    x = torch.randn(4, 3, 8, 8) + rank
    mine, plan = model._batch_shuffle(x)
    results.append({"moco_identity": torch.equal(model._batch_unshuffle(mine, plan), x)})
    torch.save(results, f"{tmp}/rank{rank}.pt")
    torch_dist.destroy_process_group()


def test_all_to_all_shuffle_equals_all_gather_and_undoes_itself(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for rank, results in enumerate(ranks):
        for trial in results[:-2]:
            n = trial["images"].shape[0]
            assert torch.equal(trial["mine"], trial["ref"])  # the same images, in the same order
            assert torch.equal(trial["back"], trial["images"])  # unshuffle(shuffle(x)) == x
            assert torch.equal(trial["keys"], trial["ref_keys"])
            assert trial["images"].flatten(1)[:, :4].mul(2).equal(trial["keys"])
            assert sum(trial["recv_counts"]) == n  # each rank receives only what it encodes
        assert results[-2]["channels_last"] and results[-1]["moco_identity"]
    # together the two ranks encode every image of the global batch exactly once
    for t0, t1 in zip(ranks[0][:-2], ranks[1][:-2]):
        everything = torch.cat([t0["images"], t1["images"]]).flatten(1)
        encoded = torch.cat([t0["mine"], t1["mine"]]).flatten(1)
        assert sorted(map(tuple, everything.tolist())) == sorted(map(tuple, encoded.tolist()))


def test_one_process_shuffle_is_a_local_permutation():
    x = torch.arange(12.0).view(6, 2)
    torch.manual_seed(0)
    mine, plan = shuffle.shuffle(x)
    torch.manual_seed(0)
    ref, idx_unshuffle = shuffle.gather_shuffle(x)
    assert torch.equal(mine, ref) and not torch.equal(mine, x)
    assert torch.equal(shuffle.unshuffle(mine, plan), x)
    assert torch.equal(shuffle.gather_unshuffle(ref, idx_unshuffle), x)


def test_all_to_all_receives_one_world_size_th_of_all_gather_bytes():
    expected = shuffle.bytes_received(64, 1000, 4)
    assert expected["all_to_all"] * 4 == expected["all_gather"]
    idx = torch.arange(128)  # identity: rank 0 encodes its own images, receives nothing
    assert shuffle.bytes_received(64, 10, 2, idx)["all_to_all"] == 0
