"""Loaders against files in the real formats, and the batched augmentation against a per-sample reference."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from zsq.data import FASHION_MNIST_DIR, FMNIST_MEAN, FMNIST_STD, augment, batches, load_dataset, normalize, read_idx
from zsq.errors import UserError

from conftest import write_cifar, write_idx


def test_idx_roundtrip_and_fmnist_padding(fmnist_dir):
    ds = load_dataset("fashion-mnist", "train", fmnist_dir)
    raw = read_idx(fmnist_dir / "train-images-idx3-ubyte.gz")
    assert raw.shape == (96, 28, 28)
    assert ds.images.shape == (96, 1, 32, 32) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0, 2:30, 2:30], torch.from_numpy(raw))
    assert ds.images[:, :, :2].sum() == 0 and ds.images[:, :, :, 30:].sum() == 0
    assert ds.labels.dtype == torch.int64 and ds.info.num_classes == 10 and ds.info.in_channels == 1
    assert len(load_dataset("fashion-mnist", "test", fmnist_dir)) == 40


def test_idx_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "x.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab")
    with pytest.raises(UserError, match="magic"):
        read_idx(bad)
    write_idx(tmp_path / "t.gz", np.zeros((4, 2), np.uint8))
    data = gzip.open(tmp_path / "t.gz").read()[:-3]
    with gzip.open(tmp_path / "t.gz", "wb") as f:
        f.write(data)
    with pytest.raises(UserError, match="truncated"):
        read_idx(tmp_path / "t.gz")


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fmnist_normalisation_constants():
    ds = load_dataset("fashion-mnist", "train")
    assert len(ds) == 60000 and len(load_dataset("fashion-mnist", "test")) == 10000
    x = ds.images.float() / 255
    assert x.mean().item() == pytest.approx(FMNIST_MEAN[0], abs=1e-4)
    assert x.std().item() == pytest.approx(FMNIST_STD[0], abs=1e-4)


def test_cifar10_pickles(cifar10_dir):
    train = load_dataset("cifar10", "train", cifar10_dir)
    test = load_dataset("cifar10", "test", cifar10_dir)
    assert train.images.shape == (100, 3, 32, 32) and len(test) == 20
    assert train.info.classes[:2] == ["c0", "c1"]
    import pickle

    with open(cifar10_dir / "cifar-10-batches-py" / "test_batch", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    # row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major 32×32
    assert torch.equal(test.images[3, 1].flatten(), torch.from_numpy(d[b"data"][3, 1024:2048]))
    assert test.labels.tolist() == d[b"labels"]
    # the folder itself is accepted as well as its parent
    assert len(load_dataset("cifar10", "test", cifar10_dir / "cifar-10-batches-py")) == 20


def test_cifar100_pickles(tmp_path):
    write_cifar(tmp_path, 100)
    ds = load_dataset("cifar100", "train", tmp_path)
    assert ds.info.num_classes == 100 and len(ds) == 20 and ds.labels.max() < 100


def test_cifar_missing_or_foreign(tmp_path):
    with pytest.raises(UserError, match="missing CIFAR batch"):
        load_dataset("cifar10", "test", tmp_path)
    with pytest.raises(UserError, match="needs --data-dir"):
        load_dataset("cifar10", "test")
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot read CIFAR batch"):
        load_dataset("cifar10", "test", tmp_path)


def test_imagefolder(imagefolder_dir):
    ds = load_dataset("imagefolder", "test", imagefolder_dir, image_size=16)
    assert ds.info.classes == ["cat", "dog", "fox"] and len(ds) == 6
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    x, y = next(batches(ds, 4))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.uint8
    grey = imagefolder_dir / "grey"
    (grey / "a").mkdir(parents=True)
    Image.fromarray(np.full((9, 9), 77, np.uint8)).save(grey / "a" / "g.png")
    g = load_dataset("imagefolder", "test", grey, image_size=8)
    assert g.info.in_channels == 1 and g.take(torch.tensor([0])).shape == (1, 1, 8, 8)
    empty = imagefolder_dir / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        load_dataset("imagefolder", "test", empty)


def test_imagefolder_centre_crop_values(tmp_path):
    arr = np.zeros((8, 16, 3), np.uint8)
    arr[:, 6:10] = 200  # a centre band: resize to 18×9 (short side 8·8/7), crop columns 5..12 → crop columns ~2..5
    (tmp_path / "a").mkdir()
    Image.fromarray(arr).save(tmp_path / "a" / "x.png")
    x = load_dataset("imagefolder", "test", tmp_path, image_size=8).take(torch.tensor([0]))
    assert x.shape == (1, 3, 8, 8)
    assert x[0, 0, :, 3:5].float().mean() > 150
    assert x[0, 0, :, 0].float().mean() < 60 and x[0, 0, :, 7].float().mean() < 60


def test_unknown_dataset():
    with pytest.raises(UserError, match="unknown dataset 'mnist3'"):
        load_dataset("mnist3")


def test_augment_matches_per_sample_reference():
    x = torch.randint(0, 255, (16, 3, 8, 8), dtype=torch.uint8)
    out = augment(x, torch.Generator().manual_seed(3), pad=2)
    gen = torch.Generator().manual_seed(3)  # replay the same draws
    oy = torch.randint(0, 5, (16, 1), generator=gen)
    ox = torch.randint(0, 5, (16, 1), generator=gen)
    flip = torch.rand(16, generator=gen) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):
        ref = padded[i, :, oy[i, 0]: oy[i, 0] + 8, ox[i, 0]: ox[i, 0] + 8]
        if flip[i]:
            ref = ref.flip(2)
        assert torch.equal(out[i], ref)


def test_normalize_and_batches(fmnist_dir):
    ds = load_dataset("fashion-mnist", "test", fmnist_dir)
    x, y = next(batches(ds, 8))
    z = normalize(x, ds.info)
    torch.testing.assert_close(z, (x.float() / 255 - FMNIST_MEAN[0]) / FMNIST_STD[0])
    sizes = [len(y) for _, y in batches(ds, 16, limit=35)]
    assert sizes == [16, 16, 3]
    seen = torch.cat([y for _, y in batches(ds, 7, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == sorted(ds.labels.tolist())
