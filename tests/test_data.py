import numpy as np
import pytest
import torch

from fl_core.data import TensorBatches, augment, load_dataset
from fl_core.partition import partition, partition_dirichlet, stratified_split

LABELS = np.repeat(np.arange(10), 200)  # 2000 samples, 10 balanced classes


def _assert_disjoint_complete(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partitions_are_disjoint_complete_and_seeded(scheme):
    parts = partition(LABELS, 10, scheme, beta=0.5, min_samples=5, seed=3)
    _assert_disjoint_complete(parts, len(LABELS))
    again = partition(LABELS, 10, scheme, beta=0.5, min_samples=5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(LABELS, 10, scheme, beta=0.5, min_samples=5, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    assert min(len(p) for p in parts) >= 5


def _label_entropy(parts):
    ent = []
    for p in parts:
        q = np.bincount(LABELS[p], minlength=10) / len(p)
        q = q[q > 0]
        ent.append(-(q * np.log(q)).sum())
    return float(np.mean(ent))


def test_dirichlet_skew_follows_beta():
    skewed = _label_entropy(partition(LABELS, 10, "dirichlet", beta=0.1, min_samples=5, seed=0))
    mild = _label_entropy(partition(LABELS, 10, "dirichlet", beta=100.0, min_samples=5, seed=0))
    iid = _label_entropy(partition(LABELS, 10, "iid", min_samples=5, seed=0))
    assert skewed < 1.3 < 2.2 < mild  # log(10) = 2.30 is a uniform label mix
    assert abs(mild - iid) < 0.05


def test_shards_give_few_classes_per_client():
    parts = partition(LABELS, 10, "shards", shards_per_client=2, seed=1)
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)


def test_min_samples_is_enforced():
    with pytest.raises(ValueError, match="min_samples"):
        partition(LABELS, 10, "iid", min_samples=500, seed=0)
    with pytest.raises(ValueError, match="dirichlet"):
        partition_dirichlet(LABELS, 10, beta=0.01, min_samples=199, seed=0, max_tries=5)


def test_stratified_split_keeps_proportions_and_is_disjoint():
    rest, chosen = stratified_split(torch.as_tensor(LABELS), 500, seed=0)
    assert len(chosen) == 500 and len(np.intersect1d(rest, chosen)) == 0
    assert len(rest) + len(chosen) == len(LABELS)
    assert (np.bincount(LABELS[chosen]) == 50).all()


def test_augment_is_a_shifted_crop_or_flip():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    y = augment(x, gen, pad=2)
    assert y.shape == x.shape
    for i in range(64):  # every output is some shift (+ optional flip) of its input, zeros outside
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        found = any(torch.equal(y[i], cand[:, dy:dy + 8, dx:dx + 8])
                    for cand in (padded, padded.flip(-1)) for dy in range(5) for dx in range(5))
        assert found
    assert not torch.equal(y, x)


def test_tensor_batches_cover_each_epoch_once_and_count_steps():
    images = torch.arange(10).view(10, 1, 1, 1).to(torch.uint8)
    labels = torch.arange(10)
    batches = TensorBatches(images, labels, batch_size=4, seed=0)
    assert len(batches) == 3
    first = torch.cat([y for _, y in batches])
    second = torch.cat([y for _, y in batches])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(10))
    assert first.tolist() != second.tolist()  # reshuffled
    stepped = list(TensorBatches(images, labels, batch_size=4, seed=0, steps=7))
    assert len(stepped) == 7


def test_a_lone_last_sample_joins_the_batch_before_it():
    """BatchNorm cannot train on a batch of one: 9 samples in batches of 4 are batches of 4 and 5."""
    images = torch.arange(9).view(9, 1, 1, 1).to(torch.uint8)
    batches = TensorBatches(images, torch.arange(9), batch_size=4, seed=0)
    assert len(batches) == 2 and [len(y) for _, y in batches] == [4, 5]
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(9))
    assert [len(y) for _, y in TensorBatches(images, torch.arange(9), batch_size=4, seed=0, steps=3)] == [4, 5, 4]
    assert [len(y) for _, y in TensorBatches(images[:1], torch.arange(1), batch_size=4, seed=0)] == [1]


def test_imagefolder_is_decoded_once_into_a_tensor_cache(tiny_root, tmp_path):
    ds = load_dataset("tiny", tiny_root, tmp_path / "cache")
    assert ds.train.images.dtype == torch.uint8 and ds.train.images.shape == (160, 3, 16, 16)
    assert ds.test.images.shape == (40, 3, 16, 16)
    assert ds.train.classes == ["circle", "cross", "square", "stripe"]
    assert torch.equal(torch.bincount(ds.train.labels), torch.full((4,), 40))
    assert (tmp_path / "cache" / "datasets" / "tiny.pt").is_file()
    again = load_dataset("tiny", "/nonexistent", tmp_path / "cache")  # served from the cache alone
    assert torch.equal(again.train.images, ds.train.images) and ds.source.startswith("imagefolder:")


def test_missing_dataset_names_every_place_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", tmp_path, tmp_path / "cache")
    text = str(err.value)
    assert "ImageFolder tree" in text and "cifar-10-batches-py" in text and "download" in text


def test_idx_layout_is_read(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 255, (5, 28, 28), dtype=np.uint8)
    for prefix in ("train", "t10k"):
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape) + images.tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + bytes([0, 1, 2, 3, 4]))
    ds = load_dataset("mnist", tmp_path, tmp_path / "cache")
    assert ds.train.images.shape == (5, 1, 28, 28)
    assert np.array_equal(ds.train.images[:, 0].numpy(), images)
    assert ds.train.labels.tolist() == [0, 1, 2, 3, 4]
