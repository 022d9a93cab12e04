"""Each data set loads from files in its real format; bad paths fail with the expected layout."""

from __future__ import annotations

import importlib.abc
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from fqtorch.data import DatasetError, build_datasets, fingerprint
from fqtorch.data.datasets import CifarImages, torchvision_transforms


def write_cifar(root, per_batch=6, batches=5):
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


def read_cifar(root, names):
    """The images (N, 3, 32, 32), as floats, and the labels of the batches ``names``."""
    batches = [pickle.loads((root / name).read_bytes()) for name in names]
    images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = [label for b in batches for label in b[b"labels"]]
    return torch.from_numpy(images).float(), torch.tensor(labels)


def cifar_normalized(images):
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(3, 1, 1)
    std = torch.tensor((0.2470, 0.2435, 0.2616)).view(3, 1, 1)
    return (images / 255 - mean) / std


def crops_and_flips(image):
    """Every 32×32 window of ``image`` zero-padded by 4, each also flipped left-right."""
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    windows = [padded[:, t : t + 32, s : s + 32] for t in range(9) for s in range(9)]
    return windows + [w.flip(2) for w in windows]


class TestCifar:
    def test_loads_and_augments(self, tmp_path):
        """Images and labels are the files' (normalized by the CIFAR mean and std); validation
        images are not augmented; training images are a random crop of the padded image,
        flipped or not, replayed by reseeding the epoch and different in another epoch."""
        root = write_cifar(tmp_path / "cifar-10-batches-py")
        spec = build_datasets("cifar10", tmp_path, seed=1)
        assert len(spec.train) == 30 and len(spec.val) == 6 and spec.num_classes == 10
        val_images, val_labels = read_cifar(root, ["test_batch"])
        for i in range(len(spec.val)):
            image, label = spec.val[i]
            torch.testing.assert_close(image, cifar_normalized(val_images[i]))
            assert int(label) == int(val_labels[i])
        train_images, train_labels = read_cifar(root, [f"data_batch_{i}" for i in range(1, 6)])
        epochs = []
        for epoch in (0, 0, 1):
            spec.train.set_epoch(epoch)
            epochs.append([spec.train[i] for i in range(len(spec.train))])
        for i, (image, label) in enumerate(epochs[0]):
            assert image.shape == (3, 32, 32) and int(label) == int(train_labels[i])
            candidates = crops_and_flips(cifar_normalized(train_images[i]))
            assert any(torch.allclose(image, c) for c in candidates), i
            assert torch.equal(image, epochs[1][i][0])  # augmentation replays after reseeding
        unchanged = [cifar_normalized(im) for im in train_images]
        assert any(
            not torch.allclose(im, ref) for (im, _), ref in zip(epochs[0], unchanged, strict=True)
        )
        assert any(not torch.equal(a, b) for (a, _), (b, _) in zip(*epochs[::2], strict=True))

    def test_missing_and_corrupt(self, tmp_path):
        with pytest.raises(DatasetError, match="needs --data-dir"):
            build_datasets("cifar10")
        with pytest.raises(DatasetError, match="does not exist"):
            build_datasets("cifar10", tmp_path / "nope")
        tmp_path.joinpath("empty").mkdir()
        with pytest.raises(DatasetError, match="data_batch_1"):
            build_datasets("cifar10", tmp_path / "empty")
        tmp_path.joinpath("a_file").write_bytes(b"")
        with pytest.raises(
            DatasetError, match="a_file is a file; --dataset cifar10 needs the fold"
        ):
            build_datasets("cifar10", tmp_path / "a_file")
        root = write_cifar(tmp_path / "bad")
        (root / "data_batch_1").write_bytes(b"not a pickle")
        with pytest.raises(DatasetError, match="not a CIFAR-10 python batch"):
            build_datasets("cifar10", root)

    def test_labels_outside_the_ten_classes_are_refused(self, tmp_path):
        root = write_cifar(tmp_path / "c")
        with (root / "data_batch_3").open("rb") as f:
            batch = pickle.load(f)
        batch[b"labels"][0] = 11
        with (root / "data_batch_3").open("wb") as f:
            pickle.dump(batch, f)
        with pytest.raises(DatasetError, match="data_batch_3: labels must be the 10 classes"):
            build_datasets("cifar10", root)

    def test_exactly_the_five_training_batches(self, tmp_path):
        """The five batches by name: fewer are refused, naming the missing ones (a fifth of the
        data trained on, unsaid); a stray copy of a batch or of test_batch is not trained on
        (duplicated samples, or validation images in training)."""
        root = write_cifar(tmp_path / "four")
        (root / "data_batch_5").unlink()
        with pytest.raises(DatasetError, match="missing data_batch_5"):
            build_datasets("cifar10", root)
        root = write_cifar(tmp_path / "strays")
        (root / "data_batch_1 (copy)").write_bytes((root / "data_batch_1").read_bytes())
        (root / "data_batch_test").write_bytes((root / "test_batch").read_bytes())
        assert len(build_datasets("cifar10", root).train) == 30


class TestImageFolder:
    def test_loads(self, tmp_path):
        pytest.importorskip("PIL")
        write_imagefolder(tmp_path)
        spec = build_datasets("imagenet", tmp_path, image_size=16)
        assert spec.num_classes == 2 and len(spec.train) == 6
        x, _ = spec.train[0]
        assert x.shape == (3, 16, 16)
        assert spec.val[0][0].shape == (3, 16, 16)

    def test_a_broken_image_names_itself_and_what_to_do(self, tmp_path):
        """A file with an image's name that is not one (a truncated download) stopped the run
        with PIL's "cannot identify image file" alone: now one line says to remove or replace
        it, and that the run resumes from its last checkpoint."""
        pytest.importorskip("PIL")
        write_imagefolder(tmp_path)
        broken = tmp_path / "train" / "cat" / "0.png"
        broken.write_bytes(b"\x89PNG not really")
        spec = build_datasets("imagenet", tmp_path, image_size=16)
        index = [str(p) for p, _ in spec.train.samples].index(str(broken))
        with pytest.raises(DatasetError, match="is not a readable image") as raised:
            spec.train[index]
        assert str(broken) in str(raised.value) and "remove or replace it" in str(raised.value)

    def test_a_worker_s_error_is_said_in_its_own_line(self, tmp_path):
        """With --workers N the DataLoader re-raises a worker's error with the worker's whole
        traceback in its message, which the command line printed as its "one line"; the command
        line now says the worker's error alone."""
        pytest.importorskip("PIL")
        from fqtorch.cli import _worker_error_line

        write_imagefolder(tmp_path)
        (tmp_path / "train" / "cat" / "0.png").write_bytes(b"\x89PNG not really")
        spec = build_datasets("imagenet", tmp_path, image_size=16)
        loader = torch.utils.data.DataLoader(spec.train, batch_size=6, num_workers=1)
        with pytest.raises(DatasetError) as raised:
            next(iter(loader))
        assert "Traceback" in str(raised.value)  # as the DataLoader gives it
        line = _worker_error_line(str(raised.value))
        assert line.startswith(str(tmp_path / "train" / "cat" / "0.png"))
        assert line.endswith(
            "remove or replace it and resume the run (its last checkpoint is kept)"
        )
        assert _worker_error_line("lr must be > 0") == "lr must be > 0"

    def test_bad_layout(self, tmp_path):
        pytest.importorskip("PIL")
        (tmp_path / "train" / "a").mkdir(parents=True)
        with pytest.raises(DatasetError, match="ImageFolder"):
            build_datasets("imagenet", tmp_path)

    def test_every_image_and_class_is_counted(self, tmp_path):
        """Images in subfolders of a class folder are read, as torchvision's ImageFolder reads
        them (they were skipped); a validation class the training tree lacks is refused (its
        images were left out of validation, unsaid)."""
        pytest.importorskip("PIL")
        write_imagefolder(tmp_path)
        for split in ("train", "val"):
            nested = tmp_path / split / "cat" / "more"
            nested.mkdir()
            (tmp_path / split / "cat" / "0.png").rename(nested / "0.png")
        spec = build_datasets("imagenet", tmp_path, image_size=16)
        assert len(spec.train) == len(spec.val) == 6
        write_imagefolder(tmp_path / "extra")
        write_imagefolder(tmp_path / "extra", classes=("bird",))
        for path in (tmp_path / "extra" / "train" / "bird").iterdir():
            path.unlink()
        (tmp_path / "extra" / "train" / "bird").rmdir()
        with pytest.raises(DatasetError, match=r"class folders \['bird'\] that .* lacks"):
            build_datasets("imagenet", tmp_path / "extra", image_size=16)

    @pytest.mark.parametrize(
        "size,expected", [((1000, 100), (0, 0, 133, 100)), ((100, 1000), (0, 0, 100, 133))]
    )
    def test_crop_fallback_is_torchvision_s(self, tmp_path, size, expected):
        """Where ten draws find no crop, the crop is the image's centre with its aspect ratio
        clamped to [3/4, 4/3], as torchvision's RandomResizedCrop (it was a centre square)."""
        from fqtorch.data.datasets import ImageFolder

        pytest.importorskip("PIL")
        write_imagefolder(tmp_path)
        folder = ImageFolder(tmp_path / "train", ["cat", "dog"], True, 0, 16)
        folder._uniform = lambda: 1.0  # every draw: the whole area at ratio 4/3, which never fits
        box = folder._crop_box(*size)
        width, height = size
        w, h = expected[2], expected[3]
        assert box == ((width - w) // 2, (height - h) // 2, (width + w) // 2, (height + h) // 2)


class TestText:
    def test_file_and_folder(self, tmp_path):
        write_text(tmp_path / "a.txt")
        spec = build_datasets("text", tmp_path / "a.txt", block_size=16)
        x, y = spec.train[0]
        assert x.shape == (16,) and torch.equal(x[1:], y[:-1])
        assert spec.num_classes == len(spec.vocab)
        assert len(build_datasets("text", tmp_path, block_size=16).train) == len(spec.train)
        (tmp_path / "sub.txt").mkdir()  # a folder named like a text file is not one
        assert len(build_datasets("text", tmp_path, block_size=16).train) == len(spec.train)

    def test_default_corpus_is_the_interpreters_pydoc_topics(self):
        """Without --data-dir: the Python documentation of the running interpreter, split
        90/10 in order (the last 10% of the file is validation)."""
        import pydoc_data.topics

        spec = build_datasets("text", block_size=64)
        text = Path(pydoc_data.topics.__file__).read_text(encoding="utf-8")
        assert spec.source.startswith(pydoc_data.topics.__file__)
        assert f"{len(text):,} characters" in spec.source
        cut = int(0.9 * len(text))
        assert len(spec.train) == (cut - 1) // 64
        assert len(spec.val) == (len(text) - cut - 1) // 64
        x, _ = spec.val[0]
        assert "".join(spec.vocab[i] for i in x) == text[cut : cut + 64]

    def test_errors(self, tmp_path):
        (tmp_path / "short.txt").write_text("abc")
        with pytest.raises(DatasetError, match="too short"):
            build_datasets("text", tmp_path / "short.txt", block_size=16)
        (tmp_path / "empty").mkdir()
        with pytest.raises(DatasetError, match="no .txt files"):
            build_datasets("text", tmp_path / "empty")
        with pytest.raises(DatasetError, match="unknown dataset"):
            build_datasets("mnist")


class TestImageTransforms:
    """torchvision's transforms when torchvision imports beside this torch, else ours; the
    DataSpec says which (the run header prints it)."""

    @staticmethod
    def fake_torchvision(monkeypatch) -> list:
        """A torchvision 9.9 whose ``transforms.v2`` steps record their names (and the draw a
        random step makes from the global RNG, as torchvision's do) and pass images through."""
        calls: list = []

        def step(name: str) -> type:
            def __init__(self, *args, **kwargs):
                self.args, self.kwargs = args, kwargs

            def __call__(self, image):
                calls.append(name)
                if name.startswith("Random"):
                    calls.append(float(torch.rand(())))
                return image

            return type(name, (), {"__init__": __init__, "__call__": __call__})

        v2 = types.ModuleType("torchvision.transforms.v2")
        for name in [
            "RandomCrop",
            "RandomHorizontalFlip",
            "RandomResizedCrop",
            "Resize",
            "CenterCrop",
        ]:
            setattr(v2, name, step(name))

        class Compose:
            def __init__(self, steps):
                self.steps = steps

            def __call__(self, image):
                for s in self.steps:
                    image = s(image)
                return image

        v2.Compose = Compose
        transforms = types.ModuleType("torchvision.transforms")
        transforms.v2 = v2
        torchvision = types.ModuleType("torchvision")
        torchvision.__version__ = "9.9"
        torchvision.transforms = transforms
        monkeypatch.setitem(sys.modules, "torchvision", torchvision)
        monkeypatch.setitem(sys.modules, "torchvision.transforms", transforms)
        monkeypatch.setitem(sys.modules, "torchvision.transforms.v2", v2)
        return calls

    def test_torchvision_when_it_imports(self, tmp_path, monkeypatch):
        calls = self.fake_torchvision(monkeypatch)
        write_cifar(tmp_path)
        spec = build_datasets("cifar10", tmp_path, seed=1)
        assert spec.transforms == "torchvision 9.9 (transforms.v2)"
        own = CifarImages(spec.val.images, spec.val.labels, False, 1)
        assert torch.equal(spec.val[0][0], own[0][0]) and calls == []  # no transform, and
        # the same scaling and normalization as ours
        rng = torch.get_rng_state()
        spec.train.set_epoch(2)
        spec.train[3]
        spec.train[4]
        spec.train[3]
        assert calls[0::2] == ["RandomCrop", "RandomHorizontalFlip"] * 3
        draws = calls[1::2]
        # each sample draws from its own seed (the same again for the same sample and epoch),
        # and the global RNG is left as it was
        assert draws[4:] == draws[:2] and len(set(draws[:4])) == 4
        assert torch.equal(torch.get_rng_state(), rng)
        calls.clear()
        write_imagefolder(tmp_path / "tree", per_class=1, size=(16, 16))
        spec = build_datasets("imagenet", tmp_path / "tree", image_size=16)
        assert spec.transforms == "torchvision 9.9 (transforms.v2)"
        spec.train[0]
        spec.val[0]
        names = [c for c in calls if isinstance(c, str)]
        assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "Resize", "CenterCrop"]

    def test_ours_when_torchvision_does_not_import(self, tmp_path, monkeypatch):
        class BuiltForAnotherTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "torchvision":
                    raise RuntimeError("operator torchvision::nms does not exist")
                return None

        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setattr(sys, "meta_path", [BuiltForAnotherTorch(), *sys.meta_path])
        write_cifar(tmp_path)
        spec = build_datasets("cifar10", tmp_path, seed=1)
        assert spec.transforms == (
            "fqtorch's own (torchvision does not import here: operator torchvision::nms does "
            "not exist)"
        )
        self.assert_crop_and_flip(spec)
        monkeypatch.setitem(sys.modules, "torchvision", None)  # not installed
        v2, said = torchvision_transforms()
        assert v2 is None and said.startswith("fqtorch's own (torchvision does not import here")

    def test_real_torchvision_does_what_ours_does(self, tmp_path):
        v2, said = torchvision_transforms()
        if v2 is None:
            pytest.skip(said)
        write_cifar(tmp_path)
        spec = build_datasets("cifar10", tmp_path, seed=1)
        assert spec.transforms == said
        own = CifarImages(spec.val.images, spec.val.labels, False, 1)
        assert torch.equal(spec.val[0][0], own[0][0])
        self.assert_crop_and_flip(spec)

    @staticmethod
    def assert_crop_and_flip(spec):
        """A training image is one of the crops (pad 4), flipped or not, of the normalized image,
        and the same again for the same epoch."""
        plain = CifarImages(spec.train.images, spec.train.labels, False, 1)[0][0]
        padded = torch.nn.functional.pad(plain, (4, 4, 4, 4))
        crops = [padded[:, t : t + 32, s : s + 32] for t in range(9) for s in range(9)]
        spec.train.set_epoch(0)
        image = spec.train[0][0]
        assert any(torch.equal(image, c) for c in crops + [c.flip(2) for c in crops])
        spec.train.set_epoch(0)
        assert torch.equal(spec.train[0][0], image)


class _RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_cifar_batch_that_would_run_code_is_refused_and_runs_none(tmp_path):
    root = write_cifar(tmp_path / "evil")
    marker = tmp_path / "ran"
    batch = {b"data": _RunsCode(marker), b"labels": [0]}
    (root / "data_batch_1").write_bytes(pickle.dumps(batch))
    with pytest.raises(DatasetError, match="io.open.*refused"):
        build_datasets("cifar10", root)
    assert not marker.exists()


def test_cifar_batches_as_python_2_numpy_wrote_them_load(tmp_path):
    """The official files were pickled by numpy 1 (``numpy.core.multiarray``), protocol 2."""
    root = write_cifar(tmp_path / "py2")
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        batch = pickle.loads((root / name).read_bytes())
        raw = pickle.dumps(batch, protocol=2).replace(b"numpy._core.", b"numpy.core.")
        (root / name).write_bytes(raw)
    spec = build_datasets("cifar10", root)
    assert len(spec.train) + len(spec.val) == 36


def test_cifar_batches_at_pickle_protocol_5_load(tmp_path):
    """Protocol 5 (Python 3.14's default) rebuilds numpy arrays with ``_frombuffer``."""
    root = write_cifar(tmp_path / "p5")
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        batch = pickle.loads((root / name).read_bytes())
        (root / name).write_bytes(pickle.dumps(batch, protocol=5))
    assert len(build_datasets("cifar10", root).train) > 0


def test_digits_refuses_a_data_dir_it_would_ignore(tmp_path):
    with pytest.raises(DatasetError, match="digits is embedded .* would be ignored"):
        build_datasets("digits", tmp_path)


def test_fingerprint_tells_data_of_one_length_apart(tmp_path):
    """The processes of a run compare it: the same data gives the same fingerprint in another
    build, another corpus of the same length (reversed) another one, as does another split."""
    corpus = "".join(f"line {i}: the quick brown fox\n" for i in range(400))
    (tmp_path / "a.txt").write_text(corpus)
    (tmp_path / "b.txt").write_text(corpus[::-1])
    a, again, b = (
        build_datasets("text", tmp_path / name, block_size=16)
        for name in ("a.txt", "a.txt", "b.txt")
    )
    assert len(a.train) == len(b.train)
    assert fingerprint(a.train) == fingerprint(again.train)
    assert fingerprint(a.train) != fingerprint(b.train)
    assert fingerprint(a.train) != fingerprint(a.val)
    digits = build_datasets("digits")
    assert fingerprint(digits.train) == fingerprint(build_datasets("digits").train)
