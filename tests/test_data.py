"""lottery_ext.experiments.data: IDX reading, the MNIST / CIFAR-10 / MNIST-1D loaders (split,
normalisation, error messages), mini-batch sampling and CIFAR augmentation."""

from __future__ import annotations

import gzip
import io
import pickle
import random
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lottery_ext.experiments.data import (
    Batches,
    Dataset,
    augment_cifar,
    load_dataset,
    read_idx,
)

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C}
IDX_CODES.update({np.float32: 0x0D, np.float64: 0x0E})
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
REPO = Path(__file__).resolve().parents[1]
REAL_MNIST = [p for p in (Path("/work/shared/data/mnist"), REPO / "../shared/data/mnist")]
REAL_MNIST = next((p.resolve() for p in REAL_MNIST if p.is_dir()), None)


# -- helpers: an independent IDX / CIFAR writer ------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    code = IDX_CODES[arr.dtype.type]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


N_TRAIN, N_TEST = 50, 20


def fake_mnist_arrays(seed: int = 0):
    """Images whose pixel (0, 0) is the example's identity (train i -> i, test j -> 100 + j)."""
    rng = np.random.default_rng(seed)
    x_tr = rng.integers(0, 256, size=(N_TRAIN, 28, 28), dtype=np.uint8)
    x_te = rng.integers(0, 256, size=(N_TEST, 28, 28), dtype=np.uint8)
    x_tr[:, 0, 0] = np.arange(N_TRAIN)
    x_te[:, 0, 0] = 100 + np.arange(N_TEST)
    y_tr = rng.integers(0, 10, size=N_TRAIN).astype(np.uint8)
    y_te = rng.integers(0, 10, size=N_TEST).astype(np.uint8)
    return x_tr, y_tr, x_te, y_te


def write_fake_mnist(d: Path, gz: bool = False, sub: str = "", dotted: bool = False):
    arrays = fake_mnist_arrays()
    target = d / sub if sub else d
    target.mkdir(parents=True, exist_ok=True)
    for name, arr in zip(MNIST_FILES, arrays):
        fname = name.replace("-idx", ".idx") if dotted else name
        write_idx(target / (fname + (".gz" if gz else "")), arr, gz=gz)
    return arrays


def recover_ids(ds: Dataset, x: torch.Tensor) -> np.ndarray:
    """Raw training indices of rows of x: normalisation is a positive affine map, so the rank
    of pixel (0, 0) among all train + val rows is the raw index."""
    key = torch.cat([ds.x_train[:, 0, 0, 0], ds.x_val[:, 0, 0, 0]]).sort().values
    return torch.searchsorted(key, x[:, 0, 0, 0].contiguous()).numpy()


# -- read_idx ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize(
    "dtype,shape",
    [
        (np.uint8, (7,)),
        (np.uint8, (3, 4, 5)),
        (np.int8, (2, 3)),
        (np.int16, (4, 2)),
        (np.int32, (3, 2, 2)),
        (np.float32, (5, 3)),
        (np.float64, (2, 2, 2, 2)),
        (np.uint8, (0, 28, 28)),
    ],
)
def test_read_idx_round_trip(tmp_path, gz, dtype, shape):
    rng = np.random.default_rng(1)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        arr = rng.standard_normal(shape).astype(dtype)
    path = write_idx(tmp_path / ("a.idx" + (".gz" if gz else "")), arr, gz=gz)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    assert out.shape == shape
    np.testing.assert_array_equal(out, arr)
    out_str = read_idx(str(path))  # str paths too
    np.testing.assert_array_equal(out_str, arr)


def test_read_idx_gz_detected_by_content(tmp_path):
    arr = np.arange(12, dtype=np.int16).reshape(3, 4)
    path = tmp_path / "no-suffix"
    path.write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(path), arr)


def _corrupt_cases():
    good = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    return {
        "empty": (b"", "header"),
        "short-header": (good[:3], "header"),
        "bad-magic": (b"\x01\x00" + good[2:], "magic"),
        "bad-magic-2": (b"\x00\x07" + good[2:], "magic"),
        "unknown-type": (good[:2] + b"\x0a" + good[3:], "type code"),
        "zero-dims": (b"\x00\x00\x08\x00", "0 dimensions"),
        "truncated-dims": (good[:10], "truncated IDX header"),
        "truncated-data": (good[:-1], "truncated"),
        "trailing-bytes": (good + b"\x00", "trailing"),
        "wrong-dims": (good[:4] + struct.pack(">3I", 2, 3, 5) + good[16:], "truncated"),
    }


@pytest.mark.parametrize("case", sorted(_corrupt_cases()))
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_idx_corrupt(tmp_path, case, gz):
    data, match = _corrupt_cases()[case]
    path = tmp_path / "bad"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError, match=match):
        read_idx(path)


def test_read_idx_corrupt_gzip_stream(tmp_path):
    comp = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32)))
    path = tmp_path / "bad.gz"
    path.write_bytes(comp[: len(comp) // 2])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(path)


# -- MNIST-format loader -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize(
    "layout",
    [dict(), dict(gz=True), dict(sub="raw"), dict(dotted=True), dict(sub="raw", gz=True)],
    ids=["raw", "gz", "raw-subdir", "dotted", "raw-subdir-gz"],
)
def test_mnist_loader(tmp_path, name, layout):
    x_tr, y_tr, x_te, y_te = write_fake_mnist(tmp_path, **layout)
    ds = load_dataset(name, tmp_path, val_size=10, seed=3)
    assert ds.name == name and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.x_train.shape == (40, 1, 28, 28) and ds.x_val.shape == (10, 1, 28, 28)
    assert ds.x_test.shape == (20, 1, 28, 28)
    for x in (ds.x_train, ds.x_val, ds.x_test):
        assert x.dtype == torch.float32
    for y, n in ((ds.y_train, 40), (ds.y_val, 10), (ds.y_test, 20)):
        assert y.dtype == torch.int64 and y.shape == (n,)

    # Normalisation: scalar mean / std of the training split (val excluded), in [0, 1] units.
    assert abs(ds.x_train.mean().item()) < 1e-5
    assert abs(ds.x_train.std(unbiased=False).item() - 1) < 1e-4
    train_ids, val_ids = recover_ids(ds, ds.x_train), recover_ids(ds, ds.x_val)
    raw = x_tr[train_ids].astype(np.float64) / 255
    mean, std = raw.mean(), raw.std()
    expect = (x_tr[train_ids, None].astype(np.float64) / 255 - mean) / std
    np.testing.assert_allclose(ds.x_train.numpy(), expect, rtol=1e-5, atol=1e-5)
    expect_val = (x_tr[val_ids, None].astype(np.float64) / 255 - mean) / std
    np.testing.assert_allclose(ds.x_val.numpy(), expect_val, rtol=1e-5, atol=1e-5)
    expect_te = (x_te[:, None].astype(np.float64) / 255 - mean) / std
    np.testing.assert_allclose(ds.x_test.numpy(), expect_te, rtol=1e-5, atol=1e-5)

    # Split: disjoint, covers the training set, training order kept, test set untouched.
    assert set(train_ids).isdisjoint(val_ids)
    assert sorted([*train_ids, *val_ids]) == list(range(N_TRAIN))
    assert list(train_ids) == sorted(train_ids)
    np.testing.assert_array_equal(ds.y_train.numpy(), y_tr[train_ids])
    np.testing.assert_array_equal(ds.y_val.numpy(), y_tr[val_ids])
    np.testing.assert_array_equal(ds.y_test.numpy(), y_te)
    assert ds.x_val[:, 0, 0, 0].max() < ds.x_test[:, 0, 0, 0].min()  # no test image in val


def test_mnist_split_seeded(tmp_path):
    write_fake_mnist(tmp_path)
    a = load_dataset("mnist", tmp_path, val_size=10, seed=0)
    b = load_dataset("mnist", tmp_path, val_size=10, seed=0)
    c = load_dataset("mnist", tmp_path, val_size=10, seed=1)
    ids = [set(recover_ids(d, d.x_val)) for d in (a, b, c)]
    assert ids[0] == ids[1]
    assert ids[0] != ids[2]
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert not torch.equal(a.x_train, c.x_train)


def test_mnist_val_size_zero_and_too_large(tmp_path):
    write_fake_mnist(tmp_path)
    ds = load_dataset("mnist", str(tmp_path), val_size=0)
    assert ds.x_train.shape[0] == N_TRAIN and ds.x_val.shape == (0, 1, 28, 28)
    assert ds.y_val.shape == (0,) and ds.y_val.dtype == torch.int64
    assert (recover_ids(ds, ds.x_train) == np.arange(N_TRAIN)).all()  # original order
    for bad in (N_TRAIN, N_TRAIN + 1):
        with pytest.raises(ValueError, match="val_size"):
            load_dataset("mnist", tmp_path, val_size=bad)
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("mnist", tmp_path)  # the default 5000 exceeds the 50 fake images
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("mnist", tmp_path, val_size=-1)


def test_mnist_missing_files_message(tmp_path):
    arrays = fake_mnist_arrays()
    write_idx(tmp_path / MNIST_FILES[0], arrays[0])
    write_idx(tmp_path / (MNIST_FILES[2] + ".gz"), arrays[2], gz=True)
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("mnist", tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg
    missing = re.search(r"missing: (.*?)\.", msg).group(1).split(", ")
    assert missing == [MNIST_FILES[1], MNIST_FILES[3]]
    assert "must contain" in msg and all(f in msg for f in MNIST_FILES)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dataset("fashion-mnist", tmp_path / "nope")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_data_dir_required(name):
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset(name, None)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="mnist1d.*mnist.*fashion-mnist.*cifar10"):
        load_dataset("imagenet", "/tmp")


def test_mnist_inconsistent_files(tmp_path):
    x_tr, y_tr, x_te, y_te = fake_mnist_arrays()
    for name, arr in zip(MNIST_FILES, (x_tr, y_tr[:-1], x_te, y_te)):  # one label short
        write_idx(tmp_path / name, arr)
    with pytest.raises(ValueError, match="labels"):
        load_dataset("mnist", tmp_path, val_size=5)
    (tmp_path / MNIST_FILES[1]).write_bytes(idx_bytes(y_tr)[:-3])  # truncated
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("mnist", tmp_path, val_size=5)
    write_idx(tmp_path / MNIST_FILES[1], y_tr)
    write_idx(tmp_path / MNIST_FILES[0], x_tr[:, :27])  # 27x28 images
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        load_dataset("mnist", tmp_path, val_size=5)


@pytest.mark.skipif(REAL_MNIST is None, reason="real MNIST not in ../shared/data/mnist")
def test_real_mnist():
    raw_labels = read_idx(next(REAL_MNIST.glob("train-labels-idx1-ubyte*")))
    raw_images = read_idx(next(REAL_MNIST.glob("train-images-idx3-ubyte*")))
    assert raw_labels.shape == (60000,) and raw_images.shape == (60000, 28, 28)
    assert list(raw_labels[:10]) == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    ds = load_dataset("mnist", REAL_MNIST)
    assert ds.x_train.shape == (55000, 1, 28, 28) and ds.x_val.shape == (5000, 1, 28, 28)
    assert ds.x_test.shape == (10000, 1, 28, 28) and ds.y_test.shape == (10000,)
    assert ds.y_train.shape == (55000,) and ds.y_val.shape == (5000,)
    assert abs(ds.x_train.mean().item()) < 1e-4 and abs(ds.x_train.std().item() - 1) < 1e-3
    assert abs(ds.x_test.mean().item()) < 0.02  # test set normalised with train statistics
    counts = torch.bincount(torch.cat([ds.y_train, ds.y_val]))
    assert torch.equal(counts, torch.from_numpy(np.bincount(raw_labels)).long())
    # Undo the (positive affine) normalisation: pixel value 0 is the minimum, 255 the maximum.
    lo, hi = ds.x_train.min(), ds.x_train.max()

    def to_raw(x):
        return ((x - lo) / (hi - lo) * 255).round().to(torch.uint8).numpy()[:, 0]

    first = torch.from_numpy(raw_images[0])
    in_train = [torch.equal(torch.from_numpy(r), first) for r in to_raw(ds.x_train[:1])]
    if in_train[0]:
        assert ds.y_train[0].item() == 5
    else:  # raw example 0 went to validation
        rows = to_raw(ds.x_val)
        hit = [i for i in range(len(rows)) if np.array_equal(rows[i], raw_images[0])]
        assert hit and ds.y_val[hit[0]].item() == 5
    # The first training rows are raw training images, in their original order.
    recon = to_raw(ds.x_train[:20])
    pos = [next(i for i in range(60) if np.array_equal(raw_images[i], r)) for r in recon]
    assert pos == sorted(pos)
    np.testing.assert_array_equal(ds.y_train[:20].numpy(), raw_labels[pos])


# -- CIFAR-10 ----------------------------------------------------------------------------------


CIFAR_PER_BATCH, CIFAR_TEST = 20, 30


def cifar_batch(n: int, rng: np.random.Generator, offset: int) -> dict:
    img = np.empty((n, 3, 32, 32), dtype=np.uint8)
    # Channels with very different statistics, so scalar normalisation would be visible.
    img[:, 0] = rng.integers(0, 60, size=(n, 32, 32))
    img[:, 1] = rng.integers(100, 140, size=(n, 32, 32))
    img[:, 2] = rng.integers(150, 256, size=(n, 32, 32))
    img[:, 0, 0, 0] = offset + np.arange(n)  # identity in pixel (0, 0) of the red channel
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    return {b"batch_label": b"x", b"labels": labels, b"data": img.reshape(n, 3072)}


def write_fake_cifar(d: Path) -> list[dict]:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    batches = []
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        n = CIFAR_TEST if name == "test_batch" else CIFAR_PER_BATCH
        b = cifar_batch(n, rng, offset=i * CIFAR_PER_BATCH)
        (d / name).write_bytes(pickle.dumps(b, protocol=2))
        batches.append(b)
    return batches


@pytest.mark.parametrize("sub", ["", "cifar-10-batches-py"])
def test_cifar_loader(tmp_path, sub):
    batches = write_fake_cifar(tmp_path / sub if sub else tmp_path)
    ds = load_dataset("cifar10", tmp_path, val_size=10, seed=0)
    n_train = 5 * CIFAR_PER_BATCH
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert ds.x_train.shape == (n_train - 10, 3, 32, 32) and ds.x_val.shape == (10, 3, 32, 32)
    assert ds.x_test.shape == (CIFAR_TEST, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    mean = ds.x_train.mean(dim=(0, 2, 3))
    std = ds.x_train.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(3), atol=1e-4, rtol=0)

    # Layout: row of 3072 = 1024 R, 1024 G, 1024 B, each row-major 32x32.
    raw = np.concatenate([b[b"data"] for b in batches[:5]]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b[b"labels"] for b in batches[:5]])
    all_x = torch.cat([ds.x_train, ds.x_val])
    key = all_x[:, 0, 0, 0].sort()
    ids = key.indices.argsort()  # row r of all_x has raw index ids[r]
    train_ids = ids[: len(ds.x_train)].numpy()
    assert list(train_ids) == sorted(train_ids)
    np.testing.assert_array_equal(torch.cat([ds.y_train, ds.y_val]).numpy(), labels[ids])
    r = raw[train_ids].astype(np.float64) / 255
    m, s = r.mean(axis=(0, 2, 3)), r.std(axis=(0, 2, 3))
    expect = (raw[ids.numpy()] / 255 - m[:, None, None]) / s[:, None, None]
    np.testing.assert_allclose(all_x.numpy(), expect, rtol=1e-5, atol=1e-5)
    test_raw = batches[5][b"data"].reshape(-1, 3, 32, 32) / 255
    expect_te = (test_raw - m[:, None, None]) / s[:, None, None]
    np.testing.assert_allclose(ds.x_test.numpy(), expect_te, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ds.y_test.numpy(), batches[5][b"labels"])


def test_cifar_missing_batch(tmp_path):
    write_fake_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    (tmp_path / "test_batch").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", tmp_path, val_size=10)
    msg = str(err.value)
    assert re.search(r"missing: data_batch_3, test_batch\.", msg), msg
    assert "data_batch_1" in msg and "cifar-10-batches-py" in msg


def test_cifar_corrupt_batch(tmp_path):
    write_fake_cifar(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_2"):
        load_dataset("cifar10", tmp_path, val_size=10)
    bad = {b"data": np.zeros((4, 3000), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match="3072"):
        load_dataset("cifar10", tmp_path, val_size=10)


# -- MNIST-1D ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist1d_and_rng():
    pytest.importorskip("mnist1d")
    np.random.seed(1234)
    random.seed(99)
    np_before, py_before = np.random.get_state(), random.getstate()
    ds = load_dataset("mnist1d", seed=0)
    np_after, py_after = np.random.get_state(), random.getstate()
    return ds, (np_before, py_before), (np_after, py_after)


def test_mnist1d(mnist1d_and_rng):
    ds, _, _ = mnist1d_and_rng
    assert ds.name == "mnist1d" and ds.input_shape == (40,) and ds.num_classes == 10
    assert ds.x_train.shape == (3600, 40) and ds.x_val.shape == (400, 40)
    assert ds.x_test.shape == (1000, 40)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert set(torch.cat([ds.y_train, ds.y_val, ds.y_test]).unique().tolist()) == set(range(10))
    # Standardised by the generator over all 5000 examples.
    all_x = torch.cat([ds.x_train, ds.x_val, ds.x_test])
    assert abs(all_x.mean().item()) < 1e-3 and abs(all_x.std().item() - 1) < 1e-2
    # Validation rows come from the training set: no val row appears in the test set.
    d = torch.cdist(ds.x_val, ds.x_test, compute_mode="donot_use_mm_for_euclid_dist")
    assert d.min() > 1e-3


def test_mnist1d_global_rng_untouched(mnist1d_and_rng):
    _, (np_before, py_before), (np_after, py_after) = mnist1d_and_rng
    assert np_before[0] == np_after[0] and np.array_equal(np_before[1], np_after[1])
    assert np_before[2:] == np_after[2:]
    assert py_before == py_after


def test_mnist1d_split_seeded(mnist1d_and_rng):
    ds, _, _ = mnist1d_and_rng
    again = load_dataset("mnist1d", seed=0)
    other = load_dataset("mnist1d", seed=5, val_size=0)
    assert torch.equal(again.x_val, ds.x_val) and torch.equal(again.x_train, ds.x_train)
    assert torch.equal(again.x_test, ds.x_test)
    assert other.x_train.shape == (4000, 40) and other.x_val.shape == (0, 40)
    # The train + val of seed 0 is a re-partition of the full training set, in order.
    full = other.x_train
    is_val = (full[:, None, :] == ds.x_val[None, :, :]).all(dim=2).any(dim=1)
    assert int(is_val.sum()) == 400
    assert torch.equal(full[~is_val], ds.x_train)


# -- Batches -----------------------------------------------------------------------------------


def test_batches_epochs_are_permutations():
    n, bs = 103, 10
    b = Batches(n, bs, seed=0)
    assert b.batches_per_epoch == 10
    epochs = []
    for _ in range(3):
        idx = [b.next() for _ in range(n // bs)]
        assert all(i.dtype == torch.int64 and i.shape == (bs,) for i in idx)
        cat = torch.cat(idx)
        assert len(set(cat.tolist())) == n // bs * bs  # no repeats within an epoch
        assert cat.min() >= 0 and cat.max() < n
        epochs.append(cat)
    assert b.epoch == 2 and b.step == 30
    assert not torch.equal(epochs[0], epochs[1])  # a fresh permutation each epoch
    # Over many epochs the dropped remainder differs, so every index appears.
    seen = set(torch.cat(epochs).tolist())
    assert len(seen) > n // bs * bs


def test_batches_exact_epoch_covers_all():
    b = Batches(40, 8, seed=1)
    idx = torch.cat([next(b) for _ in range(5)])
    assert sorted(idx.tolist()) == list(range(40))


def test_batches_same_seed_same_sequence():
    a, b, c = Batches(50, 7, seed=3), Batches(50, 7, seed=3), Batches(50, 7, seed=4)
    sa = torch.stack([a.next() for _ in range(20)])
    sb = torch.stack([b.next() for _ in range(20)])
    sc = torch.stack([c.next() for _ in range(20)])
    assert torch.equal(sa, sb) and not torch.equal(sa, sc)


def test_batches_unaffected_by_global_rng():
    torch.manual_seed(0)
    a = torch.stack([Batches(30, 5, 0).next() for _ in range(1)])
    torch.manual_seed(1)
    torch.rand(10)
    b = torch.stack([Batches(30, 5, 0).next() for _ in range(1)])
    assert torch.equal(a, b)


@pytest.mark.parametrize("through_file", [False, True])
@pytest.mark.parametrize("split_at", [0, 3, 7, 8, 9, 16])
def test_batches_state_round_trip(split_at, through_file):
    ref = Batches(37, 9, seed=11)  # 4 batches per epoch
    expected = [ref.next() for _ in range(split_at + 12)]
    b = Batches(37, 9, seed=11)
    for _ in range(split_at):
        b.next()
    sd = b.state_dict()
    if through_file:
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    b.next()  # diverge the original: the restored copy must not care
    resumed = Batches(37, 9, seed=999)
    resumed.load_state_dict(sd)
    got = [resumed.next() for _ in range(12)]
    for e, g in zip(expected[split_at:], got):
        assert torch.equal(e, g)
    assert resumed.step == split_at + 12


def test_batches_state_dict_contents():
    sd = Batches(20, 4, 0).state_dict()
    for v in sd.values():
        assert isinstance(v, (int, torch.Tensor))


def test_batches_errors():
    with pytest.raises(ValueError, match="batch_size"):
        Batches(10, 11, 0)
    with pytest.raises(ValueError, match="batch_size"):
        Batches(10, 0, 0)
    sd = Batches(10, 5, 0).state_dict()
    with pytest.raises(ValueError, match="n=10"):
        Batches(12, 5, 0).load_state_dict(sd)
    b = Batches(10, 10, 0)  # batch_size == n: one batch per epoch, all indices
    assert sorted(b.next().tolist()) == list(range(10))


# -- augment_cifar -----------------------------------------------------------------------------


def _candidates(img: torch.Tensor) -> torch.Tensor:
    """All 81 crops x 2 flips of one (C, H, W) image, as (162, C, H, W): index
    (dy * 9 + dx) * 2 + flip."""
    _, h, w = img.shape
    p = torch.nn.functional.pad(img, (4, 4, 4, 4))
    out = []
    for dy in range(9):
        for dx in range(9):
            crop = p[:, dy : dy + h, dx : dx + w]
            out += [crop, crop.flip(-1)]
    return torch.stack(out)


def test_augment_cifar_is_crop_and_flip():
    x = torch.randn(48, 3, 32, 32)
    out = augment_cifar(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    picks = []
    for i in range(len(x)):
        cand = _candidates(x[i])
        match = (cand == out[i]).flatten(1).all(dim=1).nonzero().flatten().tolist()
        assert match, f"example {i} is not a padded crop / flip of its input"
        picks.append(match[0])
    flips = {k % 2 for k in picks}
    offsets = {k // 2 for k in picks}
    assert flips == {0, 1}  # both flipped and unflipped examples
    assert len(offsets) > 10  # crops vary across the batch
    assert not torch.equal(out, x)


def test_augment_cifar_deterministic():
    x = torch.randn(16, 3, 32, 32)
    a = augment_cifar(x, torch.Generator().manual_seed(5))
    b = augment_cifar(x, torch.Generator().manual_seed(5))
    c = augment_cifar(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(5)
    first, second = augment_cifar(x, g), augment_cifar(x, g)
    assert torch.equal(first, a) and not torch.equal(first, second)  # the generator advances
    torch.manual_seed(0)
    d = augment_cifar(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, d)  # independent of the global RNG


def test_augment_cifar_bad_shape():
    with pytest.raises(ValueError, match="B, C, H, W"):
        augment_cifar(torch.zeros(3, 32, 32), torch.Generator())
