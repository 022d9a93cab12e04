"""The data sets ``fqtorch train`` and ``fqtorch variance`` read (see the package docstring).

Augmentation is random per sample, from a seed made of ``(seed, epoch, rank)`` (set by
:meth:`Augmented.set_epoch`) and the sample's index: a sample is augmented the same way whichever
loader worker reads it, in whatever order, so a run resumed mid-epoch, or one with more
``--workers``, sees exactly the same batches.

The image transforms (random crop with padding and flip for CIFAR-10; random-resized-crop and
flip, resize and centre crop for ImageNet) are torchvision's (``transforms.v2``) when torchvision
imports beside the installed torch, else this module's own, which do the same. Both paths scale
and normalize the pixels with the same code, so they differ only in the random draws.
``DataSpec.transforms`` says which ran.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "DataSpec",
    "DatasetError",
    "build_datasets",
    "default_corpus",
    "fingerprint",
    "list_datasets",
]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


class DatasetError(ValueError):
    """A data path is missing or not in the expected format."""


@dataclass(frozen=True)
class DataSpec:
    """What a trainer needs to know about a data set."""

    name: str
    train: Dataset
    val: Dataset
    num_classes: int
    task: str  # "image" or "text"
    in_channels: int = 3
    block_size: int = 0
    vocab: str = ""
    transforms: str = ""  # whose image transforms run: "torchvision X.Y" or fqtorch's own
    source: str = ""  # what was read, for the run header and results (e.g. the text corpus)


def torchvision_transforms() -> tuple[ModuleType | None, str]:
    """torchvision's ``transforms.v2`` and a description, or ``None`` and why not.

    A torchvision built for another torch raises ``RuntimeError`` on import (the CUDA build on
    the package index beside the CPU torch: ``operator torchvision::nms does not exist``), so
    any exception means: use our own transforms.
    """
    try:
        import torchvision
        from torchvision.transforms import v2
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"fqtorch's own (torchvision does not import here: {reason})"
    return v2, f"torchvision {torchvision.__version__} (transforms.v2)"


class Augmented(Dataset):
    """Base for data sets with random training augmentation, seeded per sample (module doc)."""

    def __init__(self, augment: bool, seed: int) -> None:
        self.augment = augment
        self.seed = seed
        self.generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        self.epoch_seed = self.seed * 1_000_003 + epoch * 1009 + rank

    def _sample_seed(self, index: int) -> int:
        mixed = self.epoch_seed * 6_364_136_223_846_793_005 + index * 1_442_695_040_888_963_407
        return mixed % 2**63

    def _seed_sample(self, index: int) -> None:
        """Start sample ``index``'s draws (from :attr:`generator`) from its own seed."""
        self.generator.manual_seed(self._sample_seed(index))

    def _torchvision(self, transform: Callable[[Any], Any], index: int, item: Any) -> Any:
        """Apply a torchvision transform to sample ``index`` with its own seed: torchvision draws
        from the global RNG, which is saved and restored around the call."""
        if not self.augment:
            return transform(item)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._sample_seed(index))
            return transform(item)

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (), generator=self.generator))


# ---------------------------------------------------------------------------------------- digits
class TensorImages(Augmented):
    """Images held in memory as a normalized float tensor (no augmentation)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        super().__init__(False, 0)
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.labels[i]


def _digits(seed: int) -> DataSpec:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    labels = torch.tensor(data.target, dtype=torch.long)
    # The split is fixed (not the run's seed): every run validates on the same 20%.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(labels))
    train_idx, val_idx = order[:cut], order[cut:]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return DataSpec(
        "digits",
        TensorImages(images[train_idx], labels[train_idx]),
        TensorImages(images[val_idx], labels[val_idx]),
        num_classes=10,
        task="image",
        in_channels=1,
    )


# --------------------------------------------------------------------------------------- cifar10
class CifarImages(Augmented):
    """CIFAR images as uint8 (N, 3, 32, 32); training adds random crop (pad 4 after normalizing,
    so the border is the mean colour) and flip. ``v2``: torchvision's transforms, else ours."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        augment: bool,
        seed: int,
        v2: ModuleType | None = None,
    ) -> None:
        super().__init__(augment, seed)
        self.images, self.labels = images, labels
        self.mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR_STD).view(3, 1, 1)
        self.transform = None
        if v2 is not None and augment:
            self.transform = v2.Compose(
                [v2.RandomCrop(32, padding=4, fill=0), v2.RandomHorizontalFlip()]
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image = (self.images[i].float() / 255 - self.mean) / self.std  # (3, 32, 32)
        if self.transform is not None:
            return self._torchvision(self.transform, i, image), self.labels[i]
        if self.augment:
            self._seed_sample(i)
            padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
            top, left = self._randint(9), self._randint(9)
            image = padded[:, top : top + 32, left : left + 32]
            if self._uniform() < 0.5:
                image = image.flip(2)
        return image, self.labels[i]


# What a CIFAR-10 python batch's pickle may name: numpy's array reconstruction (under numpy 1's
# and 2's module names) and, in pickles written by Python 3 at protocol 2, the bytes codec. Any
# other global (``os.system``, ``builtins.eval``...) would run code from a data folder.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5 (out-of-band buffers)
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: the batches come from a user's folder."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which a CIFAR-10 batch never does (refused: "
                "unpickling it could run code)"
            )
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:  # the official format is a pickle: read with an allow-list
            batch = _CifarUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:
        raise DatasetError(
            f"{path} is not a CIFAR-10 python batch (a pickled dict with b'data' of shape "
            f"(N, 3072) uint8 and b'labels'): {exc}"
        ) from exc
    if len(data) != len(labels):
        raise DatasetError(f"{path}: {len(data)} images but {len(labels)} labels")
    if labels.size and not (labels.min() >= 0 and labels.max() < 10):
        raise DatasetError(
            f"{path}: labels must be the 10 classes 0..9, found {int(labels.min())}.."
            f"{int(labels.max())}"
        )
    return data, labels


def _cifar10(data_dir: Path | None, seed: int) -> DataSpec:
    layout = "data_batch_1 .. data_batch_5 and test_batch (the CIFAR-10 python version)"
    if data_dir is None:
        raise DatasetError(f"--dataset cifar10 needs --data-dir holding {layout}")
    if not data_dir.is_dir():
        raise DatasetError(
            f"--data-dir {data_dir} is a file; --dataset cifar10 needs the folder holding {layout}"
        )
    root = (
        data_dir / "cifar-10-batches-py"
        if (data_dir / "cifar-10-batches-py").is_dir()
        else data_dir
    )
    # Exactly the five training batches, by name: not whatever matches data_batch_* (a copy of
    # a batch, or of test_batch, would be trained on), nor fewer (a fifth of the data, unsaid).
    train_files = [root / f"data_batch_{i}" for i in range(1, 6)]
    missing = [p.name for p in [*train_files, root / "test_batch"] if not p.is_file()]
    if missing:
        raise DatasetError(
            f"{root} must hold {layout}; missing {', '.join(missing)} (found "
            f"{sorted(p.name for p in root.glob('*'))[:10]})"
        )
    parts = [_read_cifar_batch(p) for p in train_files]
    train_x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    train_y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    val_x, val_y = (torch.from_numpy(a) for a in _read_cifar_batch(root / "test_batch"))
    v2, transforms = torchvision_transforms()
    return DataSpec(
        "cifar10",
        CifarImages(train_x, train_y, True, seed, v2),
        CifarImages(val_x, val_y, False, seed, v2),
        num_classes=10,
        task="image",
        transforms=transforms,
    )


# -------------------------------------------------------------------------------------- imagenet
class ImageFolder(Augmented):
    """``root/<class>/<image>``; training: random-resized-crop + flip; validation: resize
    ``1.143 × size`` (256 for 224) and centre crop. ``v2``: torchvision's transforms, else ours."""

    def __init__(
        self,
        root: Path,
        classes: list[str],
        augment: bool,
        seed: int,
        size: int,
        v2: ModuleType | None = None,
    ) -> None:
        super().__init__(augment, seed)
        self.size = size
        self.transform = None if v2 is None else _imagenet_transform(v2, augment, size)
        self.samples = [  # at any depth within a class folder, as torchvision's ImageFolder
            (path, label)
            for label, name in enumerate(classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        ]
        if not self.samples:
            raise DatasetError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def _crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        for _ in range(10):
            target = area * (0.08 + 0.92 * self._uniform())
            log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * self._uniform()
            ratio = math.exp(log_ratio)
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                left, top = self._randint(width - w + 1), self._randint(height - h + 1)
                return left, top, left + w, top + h
        # Fall back to a centre crop of the whole image with its aspect ratio clamped to
        # [3/4, 4/3], as torchvision's RandomResizedCrop does
        w, h = width, height
        if width / height < 3 / 4:
            h = round(width / (3 / 4))
        elif width / height > 4 / 3:
            w = round(height * (4 / 3))
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        path, label = self.samples[i]
        try:
            img = Image.open(path)
            img.load()
        except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for a bad file
            raise DatasetError(
                f"{path} is not a readable image ({exc}); remove or replace it and resume the "
                "run (its last checkpoint is kept)"
            ) from None
        with img:
            img = img.convert("RGB")
            if self.transform is not None:
                img = self._torchvision(self.transform, i, img)
            elif self.augment:
                self._seed_sample(i)
                img = img.resize(
                    (self.size, self.size), Image.BILINEAR, box=self._crop_box(*img.size)
                )
                if self._uniform() < 0.5:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
            else:
                short = round(self.size * 256 / 224)
                w, h = img.size
                scale = short / min(w, h)
                img = img.resize(
                    (max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR
                )
                w, h = img.size
                left, top = (w - self.size) // 2, (h - self.size) // 2
                img = img.crop((left, top, left + self.size, top + self.size))
            array = np.asarray(img, dtype=np.float32) / 255  # (H, W, 3)
        image = torch.from_numpy(array).permute(2, 0, 1)
        return (image - self.mean) / self.std, torch.tensor(label)


def _imagenet_transform(v2: ModuleType, augment: bool, size: int) -> Callable[[Any], Any]:
    """torchvision's version of :class:`ImageFolder`'s own crops and flips (PIL in, PIL out)."""
    if augment:
        return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    return v2.Compose([v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)])


def _imagenet(data_dir: Path | None, seed: int, size: int) -> DataSpec:
    layout = "train/<class>/<image> and val/<class>/<image> (an ImageFolder tree)"
    if data_dir is None:
        raise DatasetError(f"--dataset imagenet needs --data-dir holding {layout}")
    try:
        import PIL  # noqa: F401
    except ImportError as exc:
        raise DatasetError(
            "--dataset imagenet needs Pillow: pip install 'fqtorch[vision]'"
        ) from exc
    train_root, val_root = data_dir / "train", data_dir / "val"
    if not train_root.is_dir() or not val_root.is_dir():
        raise DatasetError(f"{data_dir} must hold {layout}")
    classes = sorted(p.name for p in train_root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{train_root} has no class folders; expected {layout}")
    missing = [c for c in classes if not (val_root / c).is_dir()]
    if missing:
        raise DatasetError(f"{val_root} lacks class folders {missing[:5]}; expected {layout}")
    extra = sorted(p.name for p in val_root.iterdir() if p.is_dir() and p.name not in classes)
    if extra:  # their images would be left out of validation, unsaid
        raise DatasetError(
            f"{val_root} has class folders {extra[:5]} that {train_root} lacks; expected the "
            f"same classes in both ({layout})"
        )
    v2, transforms = torchvision_transforms()
    return DataSpec(
        "imagenet",
        ImageFolder(train_root, classes, True, seed, size, v2),
        ImageFolder(val_root, classes, False, seed, size, v2),
        num_classes=len(classes),
        task="image",
        transforms=transforms,
    )


# ------------------------------------------------------------------------------------------ text
class CharWindows(Dataset):
    """Non-overlapping windows of a character stream: ``x = s[o:o+T]``, ``y = s[o+1:o+T+1]``."""

    def __init__(self, codes: Tensor, block_size: int) -> None:
        self.codes, self.block_size = codes, block_size

    def __len__(self) -> int:
        return (len(self.codes) - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        start = i * self.block_size
        chunk = self.codes[start : start + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


def default_corpus() -> Path:
    """The text corpus ``--dataset text`` reads without ``--data-dir``: the Python documentation
    that ships with every CPython, ``pydoc_data/topics.py`` of the running interpreter's standard
    library (≈ 750 KB of English prose and code; no download)."""
    import pydoc_data.topics

    return Path(pydoc_data.topics.__file__)


def _text(data_dir: Path | None, block_size: int) -> DataSpec:
    layout = "a UTF-8 text file, or a folder of .txt files (concatenated in name order)"
    if data_dir is None:
        data_dir = default_corpus()
    if data_dir.is_file():
        files = [data_dir]
    elif data_dir.is_dir():
        files = sorted(f for f in data_dir.glob("*.txt") if f.is_file())
    else:
        raise DatasetError(f"{data_dir} does not exist; expected {layout}")
    if not files:
        raise DatasetError(f"{data_dir} holds no .txt files; expected {layout}")
    try:
        text = "".join(f.read_text(encoding="utf-8") for f in files)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{data_dir}: not UTF-8 text ({exc})") from exc
    source = f"{data_dir} ({len(text):,} characters; first 90% train, last 10% validation)"
    vocab = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(vocab)}
    codes = torch.tensor([lookup[c] for c in text], dtype=torch.int32)
    cut = int(0.9 * len(codes))
    if cut <= 2 * block_size or len(codes) - cut <= block_size + 1:
        raise DatasetError(
            f"{data_dir}: {len(codes)} characters is too short for block_size {block_size} "
            f"(the 10% validation part needs more than {block_size + 1}: about "
            f"{10 * (block_size + 2)} characters in all)"
        )
    return DataSpec(
        "text",
        CharWindows(codes[:cut], block_size),
        CharWindows(codes[cut:], block_size),
        num_classes=len(vocab),
        task="text",
        block_size=block_size,
        vocab=vocab,
        source=source,
    )


def fingerprint(dataset: Dataset) -> str:
    """A short hash of what ``dataset`` holds, without reading its images: the tensors of an
    in-memory set (CIFAR-10's images, a text's characters, labels; float images computed here,
    digits', by their sums to 4 digits), an image folder's class folders, file names and
    labels. Processes of one run compare it, so that one reading other data
    cannot train on silently."""
    digest = hashlib.sha256(type(dataset).__name__.encode())
    for name in ("codes", "images", "labels"):
        value = getattr(dataset, name, None)
        if not isinstance(value, Tensor):
            continue
        digest.update(f"{name} {tuple(value.shape)} {value.dtype}".encode())
        if value.is_floating_point():  # computed here (digits): the last bit may differ by CPU
            sums = value.double().sum(), value.double().abs().sum()
            digest.update(" ".join(f"{float(v):.4g}" for v in sums).encode())
        else:  # read as stored: hashed in place
            digest.update(memoryview(value.contiguous().view(-1).view(torch.uint8).numpy()))
    for path, label in getattr(dataset, "samples", ()):
        digest.update(f"{path.parent.name}/{path.name} {label}\n".encode())
    digest.update(f"len {len(dataset)}".encode())  # type: ignore[arg-type]
    return digest.hexdigest()[:16]


def list_datasets() -> list[str]:
    return ["digits", "cifar10", "imagenet", "text"]


def build_datasets(
    name: str,
    data_dir: str | Path | None = None,
    *,
    seed: int = 0,
    block_size: int = 64,
    image_size: int = 224,
) -> DataSpec:
    """Load the training and validation sets of ``name`` (see the package docstring)."""
    path = None if data_dir is None else Path(data_dir).expanduser()
    if path is not None and not path.exists():
        raise DatasetError(f"--data-dir {path} does not exist")
    if name == "digits":
        if path is not None:  # it would be ignored: the data ship with scikit-learn
            raise DatasetError(
                f"--dataset digits is embedded (scikit-learn's); --data-dir {path} would be "
                "ignored: leave it out, or pick a dataset that reads files (text, cifar10, "
                "imagenet)"
            )
        return _digits(seed)
    if name == "cifar10":
        return _cifar10(path, seed)
    if name == "imagenet":
        return _imagenet(path, seed, image_size)
    if name == "text":
        return _text(path, block_size)
    raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}")
