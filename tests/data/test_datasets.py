"""Each data set loads from files in its real format; bad paths fail with the expected layout."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from fqtorch.data import DatasetError, build_datasets


def write_cifar(root, per_batch=6, batches=2):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, batches + 1)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
        }
        with (root / name).open("wb") as f:
            pickle.dump(batch, f)
    return root


def write_imagefolder(root, classes=("cat", "dog"), per_class=3, size=(40, 30)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def write_text(path, chars=4000):
    words = ["the ", "quick ", "brown ", "fox ", "jumps ", "over ", "lazy ", "dog.\n"]
    rng = np.random.default_rng(0)
    text = "".join(words[i] for i in rng.integers(0, len(words), chars // 4))
    path.write_text(text, encoding="utf-8")
    return path


class TestDigits:
    """The digits split is fixed (80/20), normalized, and the same for every seed."""

    def test_split(self):
        a, b = build_datasets("digits", seed=0), build_datasets("digits", seed=5)
        assert len(a.train) == 1437 and len(a.val) == 360
        x, y = a.train[0]
        assert x.shape == (1, 8, 8) and 0 <= int(y) < 10
        assert torch.equal(a.val[3][0], b.val[3][0])


class TestCifar:
    def test_loads_and_augments(self, tmp_path):
        root = write_cifar(tmp_path / "cifar-10-batches-py")
        spec = build_datasets("cifar10", tmp_path, seed=1)
        assert len(spec.train) == 12 and len(spec.val) == 6 and spec.num_classes == 10
        spec.train.set_epoch(0)
        a = spec.train[0][0]
        spec.train.set_epoch(0)
        assert torch.equal(a, spec.train[0][0])  # augmentation replays after reseeding
        assert a.shape == (3, 32, 32)
        assert root.exists()

    def test_missing_and_corrupt(self, tmp_path):
        with pytest.raises(DatasetError, match="needs --data-dir"):
            build_datasets("cifar10")
        with pytest.raises(DatasetError, match="does not exist"):
            build_datasets("cifar10", tmp_path / "nope")
        tmp_path.joinpath("empty").mkdir()
        with pytest.raises(DatasetError, match="data_batch_1"):
            build_datasets("cifar10", tmp_path / "empty")
        root = write_cifar(tmp_path / "bad")
        (root / "data_batch_1").write_bytes(b"not a pickle")
        with pytest.raises(DatasetError, match="not a CIFAR-10 python batch"):
            build_datasets("cifar10", root)


class TestImageFolder:
    def test_loads(self, tmp_path):
        pytest.importorskip("PIL")
        write_imagefolder(tmp_path)
        spec = build_datasets("imagenet", tmp_path, image_size=16)
        assert spec.num_classes == 2 and len(spec.train) == 6
        x, _ = spec.train[0]
        assert x.shape == (3, 16, 16)
        assert spec.val[0][0].shape == (3, 16, 16)

    def test_bad_layout(self, tmp_path):
        pytest.importorskip("PIL")
        (tmp_path / "train" / "a").mkdir(parents=True)
        with pytest.raises(DatasetError, match="ImageFolder"):
            build_datasets("imagenet", tmp_path)


class TestText:
    def test_file_and_folder(self, tmp_path):
        write_text(tmp_path / "a.txt")
        spec = build_datasets("text", tmp_path / "a.txt", block_size=16)
        x, y = spec.train[0]
        assert x.shape == (16,) and torch.equal(x[1:], y[:-1])
        assert spec.num_classes == len(spec.vocab)
        assert len(build_datasets("text", tmp_path, block_size=16).train) == len(spec.train)

    def test_errors(self, tmp_path):
        (tmp_path / "short.txt").write_text("abc")
        with pytest.raises(DatasetError, match="too short"):
            build_datasets("text", tmp_path / "short.txt", block_size=16)
        (tmp_path / "empty").mkdir()
        with pytest.raises(DatasetError, match="no .txt files"):
            build_datasets("text", tmp_path / "empty")
        with pytest.raises(DatasetError, match="unknown dataset"):
            build_datasets("mnist")
