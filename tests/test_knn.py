"""mocobench.knn: weighted kNN on hand-made features, and feature extraction."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from mocobench.errors import UserError
from mocobench.knn import extract_features, topk_accuracy, weighted_knn


def reference_knn(train, labels, test, num_classes, k, t):
    """Row-by-row restatement of Wu et al.'s weighted vote, to check the batched one."""
    train, test = F.normalize(train.double(), dim=1), F.normalize(test.double(), dim=1)
    out = torch.zeros(len(test), num_classes, dtype=torch.float64)
    for i, q in enumerate(test):
        sim = train @ q
        order = sim.argsort(descending=True)[:min(k, len(train))]
        for j in order:
            out[i, labels[j]] += torch.exp(sim[j] / t)
    return out


def clusters(n_per_class, num_classes, dim, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g) * 3
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centers[labels] + noise * torch.randn(len(labels), dim, generator=g), labels


def test_matches_row_by_row_reference():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(57, 8, generator=g), torch.randn(13, 8, generator=g)
    labels = torch.randint(0, 4, (57,), generator=g)
    for k, t in [(5, 0.1), (20, 0.5), (57, 0.07)]:
        got = weighted_knn(train, labels, test, 4, k=k, temperature=t)
        want = reference_knn(train, labels, test, 4, k, t)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_separable_clusters_are_classified():
    x, y = clusters(30, 5, 16, noise=0.3, seed=1)
    q, qy = clusters(10, 5, 16, noise=0.3, seed=1)
    scores = weighted_knn(x, y, q, 5, k=10)
    assert topk_accuracy(scores, qy, ks=(1,))[1] == 100.0


@pytest.mark.parametrize("n_test", [1, 3, 99, 120])
def test_chunking_never_changes_scores_and_handles_tiny_sets(n_test):
    # DINO's chunk of num_test // 100 is 0 below 100 test images; ours must not be.
    x, y = clusters(20, 3, 6, noise=1.0, seed=2)
    q = torch.randn(n_test, 6, generator=torch.Generator().manual_seed(3))
    whole = weighted_knn(x, y, q, 3, k=7, chunk_size=10_000)
    for chunk in (None, 1, 2, 0):
        torch.testing.assert_close(weighted_knn(x, y, q, 3, k=7, chunk_size=chunk), whole)
    assert whole.shape == (n_test, 3)


def test_k_larger_than_bank_is_clipped_and_cosine_ignores_scale():
    x, y = clusters(2, 3, 4, noise=0.1, seed=4)  # 6 training features
    q = torch.randn(5, 4, generator=torch.Generator().manual_seed(5))
    a = weighted_knn(x, y, q, 3, k=200)
    b = weighted_knn(10 * x, y, 0.01 * q, 3, k=6)
    torch.testing.assert_close(a, b)


def test_topk_accuracy_skips_trivial_k():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    labels = torch.tensor([2, 0])
    acc = topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert acc == {1: 50.0, 2: 100.0}  # k=5 >= 3 classes would be 100% by construction


def test_bad_inputs_say_what_is_wrong():
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(UserError, match="dimension 4 but test features 5"):
        weighted_knn(x, y, torch.randn(3, 5), 2)
    with pytest.raises(UserError, match="10 training features but 9 labels"):
        weighted_knn(x, y[:9], torch.randn(3, 4), 2)
    with pytest.raises(UserError, match="at least one training feature"):
        weighted_knn(x[:0], y[:0], torch.randn(3, 4), 2)
    with pytest.raises(UserError, match="k >= 1 and temperature > 0"):
        weighted_knn(x, y, torch.randn(3, 4), 2, k=0)


def test_extract_features_keeps_order_dtype_and_mode():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model.train()
    images = torch.randn(11, 3)
    labels = torch.arange(11) % 3
    loader = DataLoader(TensorDataset(images, labels, torch.arange(11)), batch_size=4)
    feats, got_labels = extract_features(model, loader, "cpu", progress=False)
    assert model.training, "extract_features must restore the caller's mode"
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats, model(images))
    assert torch.equal(got_labels, labels)
    half, _ = extract_features(model, loader, "cpu", dtype=torch.float16, progress=False)
    assert half.dtype == torch.float16 and half.shape == (11, 4)


def test_half_precision_features_give_the_same_vote():
    x, y = clusters(40, 4, 32, noise=2.0, seed=6)
    q = torch.randn(30, 32, generator=torch.Generator().manual_seed(7)) * 3
    full = weighted_knn(x, y, q, 4, k=15)
    half = weighted_knn(x.half(), y, q.half(), 4, k=15, device="cpu")
    assert torch.equal(full.argmax(1), half.argmax(1))
    torch.testing.assert_close(half, full, rtol=2e-2, atol=1e-3)
