"""Datasets on tensors (no torchvision): Fashion-MNIST (offline default), CIFAR-10/100, ImageFolder.

A dataset is held as uint8 images [N, C, H, W] plus int64 labels, or, for an ImageFolder too large to hold,
as a list of files decoded per batch. Augmentation and normalisation run batched on float tensors.
"""
from __future__ import annotations

import gzip
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import UserError
from .registry import Registry

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class DatasetInfo:
    """What a model trained on a dataset must know about it: recorded in every checkpoint."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] = field(default_factory=list)


@dataclass
class ImageSet:
    info: DatasetInfo
    labels: torch.Tensor  # int64 [N]
    images: torch.Tensor | None = None  # uint8 [N, C, H, W] when held in memory
    files: list[Path] | None = None  # otherwise decoded per batch

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 images at the given indices."""
        if self.images is not None:
            return self.images[idx]
        return torch.stack([_decode(self.files[i], self.info) for i in idx.tolist()])


Loader = Callable[[Path | None, str, int | None], ImageSet]
DATASETS: Registry[Loader] = Registry("dataset")


def list_datasets() -> list[str]:
    return DATASETS.names()


def load_dataset(name: str, split: str = "test", data_dir: str | Path | None = None,
                 image_size: int | None = None) -> ImageSet:
    """Load `split` ('train' or 'test') of a registered dataset; `data_dir` overrides the default location."""
    if split not in ("train", "test"):
        raise UserError(f"split must be 'train' or 'test', got '{split}'")
    loader = DATASETS.get(name)
    ds = loader(Path(data_dir) if data_dir is not None else None, split, image_size)
    if len(ds) == 0:
        raise UserError(f"dataset '{name}' ({split}) is empty under {data_dir}")
    return ds


# ---------------------------------------------------------------------------------------------- Fashion-MNIST

# Mean/std of the 60k training images after zero-padding to 32×32 (computed by tests/test_data.py).
FMNIST_MEAN, FMNIST_STD = (0.2190,), (0.3318,)
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzip or raw): magic 0x0000 08 <ndim>, big-endian sizes, uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: header says {dims}, found {body.size} bytes")
    return body.reshape(dims).copy()  # frombuffer is read-only; torch wants writable memory


def _find(root: Path, names: Sequence[str]) -> Path:
    for n in names:
        if (root / n).is_file():
            return root / n
    if root == FASHION_MNIST_DIR:
        raise UserError(f"missing {names[0]} in {root} (install Debian's dataset-fashion-mnist or pass --data-dir)")
    raise UserError(f"missing {names[0]} in {root}: --data-dir must hold Fashion-MNIST's IDX files "
                    f"(train-/t10k-images-idx3-ubyte and -labels-idx1-ubyte, gzipped or not)")


@DATASETS.register("fashion-mnist")
def fashion_mnist(data_dir: Path | None, split: str, image_size: int | None) -> ImageSet:
    root = data_dir or FASHION_MNIST_DIR
    if not root.is_dir():
        raise UserError(f"Fashion-MNIST directory {root} not found: apt-get install dataset-fashion-mnist, "
                        "or pass --data-dir")
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(root, [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-images-idx3-ubyte"]))
    labels = read_idx(_find(root, [f"{prefix}-labels-idx1-ubyte.gz", f"{prefix}-labels-idx1-ubyte"]))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"Fashion-MNIST files in {root} disagree: images {images.shape}, labels {labels.shape}")
    x = torch.from_numpy(images).unsqueeze(1)
    pad = (32 - x.shape[-1]) // 2
    x = F.pad(x, (pad, pad, pad, pad))  # 28×28 → 32×32, the CIFAR resolution the ResNets expect
    info = DatasetInfo("fashion-mnist", 10, 1, 32, FMNIST_MEAN, FMNIST_STD, FMNIST_CLASSES)
    return ImageSet(info, torch.from_numpy(labels.astype(np.int64)), images=x)


# ---------------------------------------------------------------------------------------------- CIFAR

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2557, 0.2761)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"missing CIFAR batch {path}: --data-dir must hold the python-version batches")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # a corrupt or foreign pickle can raise almost anything
        raise UserError(f"cannot read CIFAR batch {path}: {e}") from None


def _cifar(data_dir: Path | None, split: str, folder: str, files: dict[str, list[str]], label_key: bytes,
           meta_file: str, names_key: bytes, info: DatasetInfo) -> ImageSet:
    if data_dir is None:
        raise UserError(f"{info.name} needs --data-dir (the folder holding {folder}/)")
    root = data_dir / folder if (data_dir / folder).is_dir() else data_dir
    xs, ys = [], []
    for name in files[split]:
        d = _unpickle(root / name)
        if b"data" not in d or label_key not in d:
            raise UserError(f"{root / name} is not a CIFAR batch (no {b'data'!r}/{label_key!r} entries)")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    if (root / meta_file).is_file():
        info.classes = [n.decode() for n in _unpickle(root / meta_file)[names_key]]
    return ImageSet(info, torch.from_numpy(np.concatenate(ys)), images=torch.from_numpy(np.concatenate(xs)))


@DATASETS.register("cifar10")
def cifar10(data_dir: Path | None, split: str, image_size: int | None) -> ImageSet:
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    info = DatasetInfo("cifar10", 10, 3, 32, CIFAR10_MEAN, CIFAR10_STD)
    return _cifar(data_dir, split, "cifar-10-batches-py", files, b"labels", "batches.meta", b"label_names", info)


@DATASETS.register("cifar100")
def cifar100(data_dir: Path | None, split: str, image_size: int | None) -> ImageSet:
    files = {"train": ["train"], "test": ["test"]}
    info = DatasetInfo("cifar100", 100, 3, 32, CIFAR100_MEAN, CIFAR100_STD)
    return _cifar(data_dir, split, "cifar-100-python", files, b"fine_labels", "meta", b"fine_label_names", info)


# ---------------------------------------------------------------------------------------------- ImageFolder

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _decode(path: Path, info: DatasetInfo) -> torch.Tensor:
    """Decode, resize the short side to size·8/7 (256 for 224) and centre-crop to size×size, as uint8 CHW."""
    try:
        with Image.open(path) as im:
            im = im.convert("L" if info.in_channels == 1 else "RGB")
            size = info.image_size
            short = round(size * 8 / 7)
            w, h = im.size
            scale = short / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"cannot decode image {path}: {e}") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def _mode(path: Path) -> str:
    try:
        with Image.open(path) as im:
            return im.mode
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"cannot decode image {path}: {e}") from None


@DATASETS.register("imagefolder")
def imagefolder(data_dir: Path | None, split: str, image_size: int | None) -> ImageSet:
    """`<dir>/<class>/*.png|jpg`; if `<dir>` has `train/` and `val/` (or `test/`) sub-folders, the split picks one.
    Classes are the sorted sub-folder names, as in every ImageFolder convention."""
    if data_dir is None or not data_dir.is_dir():
        raise UserError(f"imagefolder needs --data-dir pointing at a folder of class sub-folders, got {data_dir}")
    subdirs = ("train",) if split == "train" else ("val", "test")
    root = next((data_dir / s for s in subdirs if (data_dir / s).is_dir()), data_dir)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files, labels = [], []
    for c, name in enumerate(classes):
        for p in sorted((root / name).iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                files.append(p)
                labels.append(c)
    if not files:
        raise UserError(f"no images found in {root}: expected {root}/<class>/*.png or *.jpg")
    size = image_size or 224
    in_ch = 1 if _mode(files[0]) in ("1", "L", "I", "I;16", "F") else 3  # the first image decides: grey or colour
    mean, std = ((0.5,), (0.5,)) if in_ch == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    info = DatasetInfo("imagefolder", len(classes), in_ch, size, mean, std, classes)
    return ImageSet(info, torch.tensor(labels, dtype=torch.int64), files=files)


# ---------------------------------------------------------------------------------------------- batches


def normalize(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 [B,C,H,W] → float, scaled to [0, 1] then standardised by the dataset's mean/std."""
    mean = torch.tensor(info.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255 - mean) / std


def augment(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per sample, in one batched gather."""
    b, _, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator).to(dev)
    rows = (oy + torch.arange(h, device=dev))[:, None, :, None]  # [B,1,H,1]
    cols = (ox + torch.arange(w, device=dev))[:, None, None, :]  # [B,1,1,W]
    bidx = torch.arange(b, device=dev)[:, None, None, None]
    cidx = torch.arange(x.shape[1], device=dev)[None, :, None, None]
    out = padded[bidx, cidx, rows, cols]
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev)[:, None, None, None]
    return torch.where(flip, out.flip(3), out)


def random_resized_crop(x: torch.Tensor, generator: torch.Generator | None = None,
                        scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        flip: bool = True) -> torch.Tensor:
    """Per-sample random-resized crop (area fraction in `scale`, aspect ratio in `ratio`) resampled to the input
    size, with random horizontal flip: one affine grid for the whole batch, bilinear. A crop side that would
    exceed the image is clipped to it (torchvision retries instead; the distribution differs only there)."""
    b = x.shape[0]
    area = torch.empty(b).uniform_(*scale, generator=generator)
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)  # crop size as a fraction of the image side
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - w)  # centre, in [-1, 1] grid coordinates
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def batches(ds: ImageSet, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
            limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images, labels) batches; `limit` keeps the first N examples (smoke tests)."""
    n = len(ds) if limit is None else min(limit, len(ds))
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i: i + batch_size]
        yield ds.take(idx), ds.labels[idx]
