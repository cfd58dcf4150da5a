"""Data sets for the lottery-ticket experiments, loaded once into memory as tensors.

``load_dataset(name, data_dir)`` returns a :class:`Dataset` with a validation split carved
out of the *training* set (never the test set) by a seeded permutation, images standardised
with statistics of the training split. Nothing is ever downloaded: ``mnist1d`` is generated
procedurally, the others are read from a local directory.

``Batches`` draws mini-batch indices into the preloaded tensors (a fresh seeded permutation
per epoch, resumable through ``state_dict``); ``augment_cifar`` is the standard CIFAR
augmentation (4-pixel padded random crop + horizontal flip), vectorised over the batch.
"""

from __future__ import annotations

import gzip
import os
import pickle
import random
import zlib
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = [
    "DATASETS",
    "Batches",
    "Dataset",
    "augment_cifar",
    "load_dataset",
    "read_idx",
]

DATASETS: dict[str, str] = {
    "mnist1d": "MNIST-1D (Greydanus 2020), generated procedurally: 4000 train / 1000 test, "
    "length 40; no data dir",
    "mnist": "MNIST, 60000 train / 10000 test 1x28x28, from a directory of the 4 IDX files",
    "fashion-mnist": "Fashion-MNIST, 60000 train / 10000 test 1x28x28, from a directory of "
    "the 4 IDX files",
    "cifar10": "CIFAR-10, 50000 train / 10000 test 3x32x32, from the python pickle batches",
}

_ALIASES = {
    "mnist-1d": "mnist1d",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
}

# Default validation-set sizes (mnist1d: 10% of its training set).
_DEFAULT_VAL = {"mnist": 5000, "fashion-mnist": 5000, "cifar10": 5000}


# --------------------------------------------------------------------------------------------
# The Dataset record
# --------------------------------------------------------------------------------------------


@dataclass(repr=False)
class Dataset:
    """A data set in memory. ``x_*`` float32 ``(N, *input_shape)``, normalised; ``y_*`` int64
    ``(N,)``. ``x_val``/``y_val`` come from the training set; ``x_train`` excludes them."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    input_shape: tuple[int, ...]

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with every tensor moved to `device` (e.g. once onto the GPU)."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device) if isinstance(v, Tensor) else v
        return Dataset(**kw)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.y_train)}, val={len(self.y_val)}, "
            f"test={len(self.y_test)}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes})"
        )


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------

# IDX type codes (http://yann.lecun.com/exdb/mnist/): data are big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decompress whatever the file is called
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from e
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a native-endian numpy array.

    Header: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a
    big-endian uint32. Raises ValueError when the header is malformed or the data size does
    not match the dimensions (truncated or trailing bytes)."""
    path = Path(path)
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(buf)} bytes, header needs 4)")
    if buf[0] != 0 or buf[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file (magic starts {buf[0]:#04x} {buf[1]:#04x}, "
            "expected 0x00 0x00)"
        )
    code, ndim = buf[2], buf[3]
    if code not in _IDX_DTYPES:
        valid = ", ".join(f"{c:#04x}" for c in _IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX type code {code:#04x} (valid: {valid})")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(
            f"{path}: truncated IDX header ({len(buf)} bytes, {ndim} dimensions need {header})"
        )
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(buf) - header
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX data {what}: dimensions {dims} of {dtype.name} need {expected} bytes, "
            f"found {actual}"
        )
    arr = np.frombuffer(buf, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _idx_candidates(base: Path, name: str, dataset: str) -> list[Path]:
    dotted = name.replace("-idx", ".idx")  # 'train-images.idx3-ubyte'
    subdirs = [base, base / "raw"]
    sub = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[dataset]
    subdirs.append(base / sub / "raw")  # torchvision's layout
    out = []
    for d in subdirs:
        for stem in (name, dotted):
            out += [d / stem, d / (stem + ".gz")]
    return out


def _load_mnist_like(name: str, data_dir: Path) -> tuple[np.ndarray, ...]:
    found: dict[str, Path] = {}
    for fname in _IDX_FILES:
        path = next((p for p in _idx_candidates(data_dir, fname, name) if p.is_file()), None)
        if path is not None:
            found[fname] = path
    missing = [f for f in _IDX_FILES if f not in found]
    if missing:
        raise FileNotFoundError(
            f"{name}: data directory {str(data_dir)!r} is missing: {', '.join(missing)}. "
            f"It must contain the four MNIST-format IDX files {', '.join(_IDX_FILES)} "
            "(raw or .gz; directly or under raw/; '.idx' in place of '-idx' also accepted). "
            "Nothing is downloaded."
        )
    arrays = [read_idx(found[f]) for f in _IDX_FILES]
    x_tr, y_tr, x_te, y_te = arrays
    for (xf, yf), x, y in (
        (_IDX_FILES[:2], x_tr, y_tr),
        (_IDX_FILES[2:], x_te, y_te),
    ):
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
            raise ValueError(
                f"{found[xf]}: expected uint8 images of shape (N, 28, 28), got {x.dtype} {x.shape}"
            )
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"{found[yf]}: expected {x.shape[0]} labels (one per image), got shape {y.shape}"
            )
        if y.size and (int(y.min()) < 0 or int(y.max()) > 9):
            raise ValueError(f"{found[yf]}: labels outside 0..9")
    return x_tr[:, None], y_tr, x_te[:, None], y_te


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------

_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_FILES = (*_CIFAR_TRAIN, "test_batch")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 python batch holds (dicts, lists, bytes, str, ints, numpy
    arrays) and nothing else: a crafted file cannot make it import or call anything."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }  # fmt: skip

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: a CIFAR-10 batch holds only arrays, lists "
                "and strings"
            )
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a CIFAR-10 python batch (not a dict)")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: CIFAR-10 batch lacks 'data' or 'labels'")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(
            f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(data_dir: Path) -> tuple[np.ndarray, ...]:
    dirs = [data_dir, data_dir / "cifar-10-batches-py"]
    base = next((d for d in dirs if all((d / f).is_file() for f in _CIFAR_FILES)), None)
    if base is None:
        # Report against whichever candidate holds more of the files.
        best = max(dirs, key=lambda d: sum((d / f).is_file() for f in _CIFAR_FILES))
        missing = [f for f in _CIFAR_FILES if not (best / f).is_file()]
        raise FileNotFoundError(
            f"cifar10: data directory {str(best)!r} is missing: {', '.join(missing)}. "
            f"It must contain the CIFAR-10 python batches {', '.join(_CIFAR_FILES)} "
            "(directly or under cifar-10-batches-py/). Nothing is downloaded."
        )
    train = [_read_cifar_batch(base / f) for f in _CIFAR_TRAIN]
    x_te, y_te = _read_cifar_batch(base / "test_batch")
    x_tr = np.concatenate([x for x, _ in train])
    y_tr = np.concatenate([y for _, y in train])
    return x_tr, y_tr, x_te, y_te


# --------------------------------------------------------------------------------------------
# MNIST-1D
# --------------------------------------------------------------------------------------------


def _load_mnist1d() -> tuple[np.ndarray, ...]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'mnist1d' data set needs the mnist1d package: pip install mnist1d"
        ) from e
    # make_dataset seeds numpy's (and Python's) global RNG: leave the caller's untouched.
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return (
        np.asarray(d["x"], dtype=np.float32),
        np.asarray(d["y"], dtype=np.int64),
        np.asarray(d["x_test"], dtype=np.float32),
        np.asarray(d["y_test"], dtype=np.int64),
    )


# --------------------------------------------------------------------------------------------
# load_dataset
# --------------------------------------------------------------------------------------------


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return key


def _split_indices(n: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """(train indices in original order, val indices sorted) from a seeded permutation."""
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    keep = torch.ones(n, dtype=torch.bool)
    keep[perm[:val_size]] = False
    return keep.nonzero().squeeze(1), (~keep).nonzero().squeeze(1)


def _uint8_stats(x: Tensor, per_channel: bool) -> tuple[Tensor, Tensor]:
    """Exact mean / population std of uint8 images scaled to [0, 1], from value counts.
    Per channel (dim 1) or a single scalar."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    groups = [x[:, c] for c in range(x.shape[1])] if per_channel else [x]
    means, stds = [], []
    for g in groups:
        counts = torch.bincount(g.reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum()
        mean = (counts * values).sum() / total
        var = (counts * (values - mean) ** 2).sum() / total
        means.append(mean)
        stds.append(var.sqrt().clamp_min(1e-12))
    return torch.stack(means), torch.stack(stds)


def _normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = mean.to(torch.float32).view(shape)
    s = std.to(torch.float32).view(shape)
    return ((x.to(torch.float32) / 255.0) - m) / s


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    val_size: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load `name` ("mnist1d", "mnist", "fashion-mnist", "cifar10") into memory.

    `val_size` examples of the training set (default 5000; mnist1d: 10% = 400) chosen by a
    permutation seeded with `seed` form the validation split; the rest keep their original
    order. Images are scaled to [0, 1] and standardised with the training split's mean / std
    (per channel for CIFAR-10, a scalar for (Fashion-)MNIST); mnist1d is standardised by its
    generator. Never downloads: a missing file raises FileNotFoundError."""
    key = _canonical(name)
    if key == "mnist1d":
        x_tr, y_tr, x_te, y_te = _load_mnist1d()
    else:
        if data_dir is None:
            raise ValueError(
                f"dataset {key!r} is read from a local directory: pass --data-dir "
                f"(data_dir=...); nothing is downloaded"
            )
        d = Path(data_dir).expanduser()
        if not d.is_dir():
            raise FileNotFoundError(
                f"{key}: data directory {str(d)!r} does not exist or is not a directory"
            )
        if key == "cifar10":
            x_tr, y_tr, x_te, y_te = _load_cifar10(d)
        else:
            x_tr, y_tr, x_te, y_te = _load_mnist_like(key, d)

    n = len(y_tr)
    if val_size is None:
        val_size = n // 10 if key == "mnist1d" else _DEFAULT_VAL[key]
    if isinstance(val_size, bool) or int(val_size) != val_size or val_size < 0:
        raise ValueError(f"val_size must be a non-negative integer, got {val_size!r}")
    val_size = int(val_size)
    if val_size >= n:
        raise ValueError(
            f"val_size={val_size} must be smaller than the {key} training set ({n} examples)"
        )

    x_tr_t = torch.from_numpy(np.ascontiguousarray(x_tr))
    x_te_t = torch.from_numpy(np.ascontiguousarray(x_te))
    y_tr_t = torch.from_numpy(np.ascontiguousarray(y_tr)).to(torch.int64)
    y_te_t = torch.from_numpy(np.ascontiguousarray(y_te)).to(torch.int64)
    train_idx, val_idx = _split_indices(n, val_size, seed)
    x_train, x_val = x_tr_t[train_idx], x_tr_t[val_idx]
    y_train, y_val = y_tr_t[train_idx], y_tr_t[val_idx]

    if x_tr_t.dtype == torch.uint8:
        mean, std = _uint8_stats(x_train, per_channel=(key == "cifar10"))
        x_train, x_val, x_test = (_normalise(x, mean, std) for x in (x_train, x_val, x_te_t))
    else:
        x_train, x_val, x_test = (x.to(torch.float32) for x in (x_train, x_val, x_te_t))

    return Dataset(
        name=key,
        x_train=x_train.contiguous(),
        y_train=y_train.contiguous(),
        x_val=x_val.contiguous(),
        y_val=y_val.contiguous(),
        x_test=x_test.contiguous(),
        y_test=y_te_t.contiguous(),
        num_classes=10,
        input_shape=tuple(int(s) for s in x_tr_t.shape[1:]),
    )


# --------------------------------------------------------------------------------------------
# Mini-batches and augmentation
# --------------------------------------------------------------------------------------------


class Batches:
    """Mini-batch indices into preloaded tensors: each epoch a fresh permutation of
    ``range(n)`` drawn from a generator seeded with `seed`, cut into ``n // batch_size``
    consecutive batches (the incomplete remainder is dropped).

    ``next()`` returns a CPU int64 tensor of `batch_size` indices. ``state_dict()`` /
    ``load_state_dict()`` capture the exact position and generator state (tensors and ints
    only, loadable with ``torch.load(weights_only=True)``)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        n, batch_size = int(n), int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size > n:
            raise ValueError(f"batch_size={batch_size} is larger than the data set (n={n})")
        self.n = n
        self.batch_size = batch_size
        self.seed = int(seed)
        self.batches_per_epoch = n // batch_size
        self._gen = torch.Generator().manual_seed(self.seed)
        self._perm = torch.randperm(n, generator=self._gen)
        self._pos = 0  # batches already taken from the current permutation
        self.epoch = 0  # completed epochs
        self.step = 0  # batches drawn in total

    def next(self) -> Tensor:
        if self._pos == self.batches_per_epoch:
            self._perm = torch.randperm(self.n, generator=self._gen)
            self._pos = 0
            self.epoch += 1
        start = self._pos * self.batch_size
        idx = self._perm[start : start + self.batch_size].clone()
        self._pos += 1
        self.step += 1
        return idx

    __next__ = next

    def __iter__(self) -> Batches:
        return self

    def state_dict(self) -> dict:
        return {
            "n": self.n,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "generator": self._gen.get_state(),
            "perm": self._perm.clone(),
            "pos": self._pos,
            "epoch": self.epoch,
            "step": self.step,
        }

    def load_state_dict(self, sd: dict) -> None:
        n, bs = int(sd["n"]), int(sd["batch_size"])
        if (n, bs) != (self.n, self.batch_size):
            raise ValueError(
                f"Batches state is for n={n}, batch_size={bs}; "
                f"this one has n={self.n}, batch_size={self.batch_size}"
            )
        perm = torch.as_tensor(sd["perm"], dtype=torch.int64).cpu()
        pos = int(sd["pos"])
        if perm.shape != (n,) or not 0 <= pos <= self.batches_per_epoch:
            raise ValueError("corrupt Batches state (permutation or position)")
        self._gen.set_state(torch.as_tensor(sd["generator"], dtype=torch.uint8).cpu())
        self._perm = perm.clone()
        self._pos = pos
        self.seed = int(sd["seed"])
        self.epoch = int(sd["epoch"])
        self.step = int(sd["step"])


def augment_cifar(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random crop after 4-pixel zero padding plus a random horizontal flip (p=0.5), for a
    batch ``(B, C, H, W)``; one gather for the whole batch. Randomness is drawn from
    `generator` (on its own device) in a fixed order, so a given generator state gives the
    same result. Note: the padding is 0 in the tensor's (normalised) space."""
    if x.dim() != 4:
        raise ValueError(f"augment_cifar expects (B, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    pad = 4
    gdev = generator.device
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev).to(x.device)
    flip = torch.rand(b, generator=generator, device=gdev).to(x.device) < 0.5
    padded = F.pad(x, (pad, pad, pad, pad))
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = oy[:, None] + ar_h  # (B, H)
    cols = ox[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # (B, W)
    bidx = torch.arange(b, device=x.device)[:, None, None]
    out = padded[bidx, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
