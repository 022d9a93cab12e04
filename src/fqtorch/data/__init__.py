"""Data sets for training, read from standard formats on disk (nothing is downloaded).

- ``digits``: the 8×8 digits that ship inside scikit-learn (1797 images, 10 classes), split
  80/20 by a fixed permutation.
- ``cifar10``: the standard python batches (``data_batch_1..5``, ``test_batch``) in
  ``--data-dir`` or ``--data-dir/cifar-10-batches-py``; random crop (pad 4) + flip.
- ``imagenet``: an ImageFolder tree, ``--data-dir/{train,val}/<class>/<image>``;
  random-resized-crop 224 + flip, validation resize 256 + centre crop 224 (needs Pillow).
- ``text``: a character corpus, one UTF-8 file or a folder of ``.txt`` files; 90/10 split.
  Without ``--data-dir``: ``pydoc_data/topics.py`` of the running Python (``default_corpus``).
"""

from .datasets import (
    DatasetError,
    DataSpec,
    build_datasets,
    default_corpus,
    fingerprint,
    list_datasets,
)

__all__ = [
    "DataSpec",
    "DatasetError",
    "build_datasets",
    "default_corpus",
    "fingerprint",
    "list_datasets",
]
