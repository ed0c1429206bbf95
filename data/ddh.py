"""The DDH data layout (FaceScrub and YouTube Faces as released by the DDH authors).

``ROOT/{train,test}/*.pkl``, each a pickled tuple ``(data, label)``: ``data`` (n, 3072), one
flattened channel-first 3x32x32 image per row, ``label`` (n,) identity ids. Files are read
in sorted name order through ``data.safe_pickle`` (numpy arrays only). Each split is
normalised on its own with the scalar mean and std of the whole split (the authors'
``deprocess_image``): ``x = clip((x - mean) / (std + 1e-5) * 0.1, -1, 1)``.
"""
import glob
import os
import pickle

import numpy as np
import torch

from utils.errors import UserInputError

from .safe_pickle import DisallowedGlobal, load_arrays

ROW_LENGTH = 3 * 32 * 32


def _read_file(path):
    try:
        obj = load_arrays(path)
    except DisallowedGlobal as e:
        raise UserInputError(f"{path}: not a DDH data file ({e})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise UserInputError(f"{path}: expected a pickled tuple (data, label), got {type(obj).__name__}")
    data, label = np.asarray(obj[0]), np.asarray(obj[1])
    if data.dtype == object or not (np.issubdtype(data.dtype, np.number)):
        raise UserInputError(f"{path}: image data must be a numeric array, got dtype {data.dtype}")
    if data.ndim != 2 or data.shape[1] != ROW_LENGTH:
        raise UserInputError(f"{path}: image data must have shape (n, {ROW_LENGTH}) "
                             f"(3x32x32 channel-first rows), got {data.shape}")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise UserInputError(f"{path}: image data holds NaN or infinite values")
    label = label.reshape(-1) if label.ndim == 2 and 1 in label.shape else label
    if label.ndim != 1:
        raise UserInputError(f"{path}: labels must be a 1-d array, got shape {label.shape}")
    if label.dtype.kind not in "iu":
        raise UserInputError(f"{path}: labels must be integers (identity ids), got dtype {label.dtype}"
                             + (" (mixed types?)" if label.dtype == object or label.dtype.kind in "US" else ""))
    if len(label) != len(data):
        raise UserInputError(f"{path}: {len(data)} images but {len(label)} labels")
    return data, label.astype(np.int64)


def _split_stats(data):
    """Scalar mean and (population) std of a whole split, in float64."""
    if data.dtype == np.uint8:  # exact and cheap: from the histogram of byte values
        counts = np.bincount(data.reshape(-1), minlength=256).astype(np.float64)
        values = np.arange(256, dtype=np.float64)
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * (values - mean) ** 2).sum() / n
        return mean, float(np.sqrt(var))
    return float(data.mean(dtype=np.float64)), float(data.std(dtype=np.float64))


class DDHSplit(torch.utils.data.Dataset):
    """One split of a DDH-layout set, held in memory.

    Args:
        root (str): dataset folder holding ``train/`` and ``test/``.
        split (str): 'train' or 'test'.

    Attributes:
        images: uint8 (or float32 for float files) tensor (n, 3, 32, 32), unnormalised.
        raw_labels: int64 numpy array (n,) of the identity ids in the files.
        labels: int64 tensor (n,), contiguous class indices (set by ``data.assign_labels``).
        mean, std: float, the split's normalisation statistics.
        files, file_lengths: the .pkl files read (sorted) and their row counts.

    Items: ``(image float32 (3, 32, 32) in [-1, 1], label int64 scalar tensor)``;
    ``__getitems__`` returns whole batches at once.

    Raises: UserInputError naming the folder or file when the split is missing, empty or malformed.
    """

    def __init__(self, root, split):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise UserInputError(f"{folder}: no such folder (a DDH-layout dataset needs {split}/*.pkl)")
        files = sorted(f for f in glob.glob(os.path.join(folder, "*.pkl")) if os.path.isfile(f))
        if not files:
            raise UserInputError(f"{folder}: no .pkl files (expected DDH data files such as data_batch_1.pkl)")
        parts = [_read_file(f) for f in files]
        data = np.concatenate([p[0] for p in parts])
        if len(data) == 0:
            raise UserInputError(f"{folder}: the split holds no images")
        self._hold(data, np.concatenate([p[1] for p in parts]), root, split, files,
                   [len(p[0]) for p in parts])  # rows per file, in file order

    @classmethod
    def from_arrays(cls, data, labels, root="", split=""):
        """A split from arrays already in memory (benchmarks, tests), normalised like a file's.

        Args: data uint8 (or float) array (n, 3072) or (n, 3, 32, 32), channel-first; labels
        int array (n,), used as class indices. Returns: DDHSplit.
        """
        data = np.asarray(data)
        split_ = cls.__new__(cls)
        split_._hold(data.reshape(len(data), -1), np.asarray(labels, dtype=np.int64), root, split, [], [len(data)])
        return split_

    def _hold(self, data, raw_labels, root, split, files, file_lengths):
        self.root, self.split, self.files, self.file_lengths = root, split, files, file_lengths
        self.mean, self.std = _split_stats(data)
        self.scale = 0.1 / (self.std + 1e-5)
        if data.dtype != np.uint8:
            data = data.astype(np.float32)
        self.images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
        self.raw_labels = raw_labels
        self.labels = torch.from_numpy(raw_labels.copy())

    def __len__(self):
        return len(self.images)

    def normalize(self, images):
        """Per-split normalisation of a batch: any-dtype (B, 3, 32, 32) -> float32 in [-1, 1]."""
        x = images.to(torch.float32)
        return ((x - self.mean) * self.scale).clamp_(-1.0, 1.0)

    def __getitem__(self, index):
        return self.normalize(self.images[index]), self.labels[index]

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.normalize(self.images[idx]), self.labels[idx]
