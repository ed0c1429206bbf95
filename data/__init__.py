"""Datasets: the DDH pickle layout and face image folders.

``build_datasets(name, root, image_size)`` returns the database (train split) and the
query set (test split) with contiguous labels; ``make_loader`` batches either kind.
"""
import copy
import os

import numpy as np
import torch

from utils.errors import UserInputError

from .ddh import DDHSplit
from .device_loader import DeviceBatches
from .folder import FaceFolder, face_transforms

DATASETS = ("facescrub", "youtube", "vggface2", "ddh", "folder")
"""Values of ``--dataset``."""

DEFAULT_ROOTS = {"facescrub": "./FaceScrub", "youtube": "./YouTube", "vggface2": "./vggface2"}
"""The authors' data folders, used when ``--data-root`` is not given."""

DDH_LAYOUT = ("facescrub", "youtube", "ddh")


def default_backbone(name, image_size=None):
    """The paper's network for a dataset: DFHNet for 32x32 sets, SphereNet-20 for image folders."""
    if name in DDH_LAYOUT or image_size == 32:
        return "dfhnet"
    return "spherenet20"


SOURCES = {
    "facescrub": "FaceScrub (530 identities) as released by the DDH authors",
    "youtube": "YouTube Faces (1,595 identities) as released by the DDH authors",
    "vggface2": "the DCDH authors' VGGFace2 subset",
}
"""Where the authors' data of each ``--dataset`` comes from (README, section Data)."""

AUTHORS_REPO = "github.com/mzhang367/DCDH-PyTorch"


def expected_layout(name):
    """The files ``--dataset name`` expects under its root, in words."""
    if name in DDH_LAYOUT:
        return "train/*.pkl and test/*.pkl (the DDH layout: pickled (data, label) arrays of 32x32 faces)"
    return "train/<identity>/* and test/<identity>/* (one folder of face images per identity)"


def missing_root_message(name, root, given=True):
    """What to do when the data folder of ``--dataset name`` is missing: the files it needs and their source."""
    where = f"--data-root {root}" if given else f"{root} (the default folder of --dataset {name})"
    msg = f"{where}: no such folder; expected a folder holding {expected_layout(name)}"
    if name in SOURCES:
        msg += (f". The authors' data: {SOURCES[name]}, linked from the DCDH authors' repository "
                f"({AUTHORS_REPO}, section Data); download it and pass its folder with --data-root")
    elif name == "ddh":
        msg += "; any such set works (--dataset folder reads identity folders of images)"
    else:
        msg += "; for DDH pickles use --dataset ddh"
    return msg + ". No data at hand? 'make demo' trains on drawn synthetic faces."


def resolve_root(name, root):
    """The dataset folder for ``--dataset name``.

    Raises: UserInputError if it is not given where needed or does not exist; the message names
    the files the dataset needs and where the authors' data comes from.
    """
    if name not in DATASETS:
        raise UserInputError(f"--dataset {name!r} is unknown; expected one of {', '.join(DATASETS)}")
    given = root is not None
    if root is None:
        if name not in DEFAULT_ROOTS:
            raise UserInputError(f"--dataset {name} needs --data-root: a folder holding {expected_layout(name)}")
        root = DEFAULT_ROOTS[name]
    if not os.path.isdir(root):
        raise UserInputError(missing_root_message(name, root, given))
    return root


def assign_labels(database, queries):
    """Map identity ids to contiguous class indices 0..C-1 from the database (train) split.

    Identities are sorted (numbers numerically, names as strings); query identities absent
    from the database get fresh indices C, C+1, ... so that they match nothing.

    Returns: ``label_map``, a list of the C original identities (plain ints or strs); index = class.
    Raises: UserInputError when identity ids mix types.
    """
    def key_list(raw):
        return raw.tolist() if isinstance(raw, np.ndarray) else list(raw)
    train_ids = key_list(database.raw_labels)
    try:
        label_map = sorted(set(train_ids))
    except TypeError:
        raise UserInputError("identity labels of the training split mix types (numbers and names)") from None
    index = {k: i for i, k in enumerate(label_map)}
    for ds, ids in ((database, train_ids), (queries, key_list(queries.raw_labels))):
        extra = {}
        mapped = []
        for k in ids:
            if k not in index:
                extra.setdefault(k, len(index) + len(extra))
            mapped.append(index.get(k, extra.get(k)))
        labels = torch.tensor(mapped, dtype=torch.long)
        if isinstance(ds, FaceFolder):
            ds.set_labels(mapped)
        ds.labels = labels
    return label_map


def build_datasets(name, root, image_size=None):
    """Load the database (train) and query (test) splits of ``--dataset name``.

    Args:
        name (str): one of ``DATASETS``.  root (str or None): dataset folder (None: authors' default).
        image_size (int or None): input side for image folders (default 112); DDH sets are 32.

    Returns: (database, queries, label_map); both datasets yield ``(float32 (3, S, S), int64)``
    and carry ``labels`` (int64 tensor). Query identities missing from the database get labels >= C.
    Raises: UserInputError naming the folder, file or flag that is wrong.
    """
    root = resolve_root(name, root)
    if name in DDH_LAYOUT:
        if image_size not in (None, 32):
            raise UserInputError(f"--image-size {image_size}: DDH-layout data is 32x32")
        database, queries = DDHSplit(root, "train"), DDHSplit(root, "test")
    else:
        size = image_size or 112
        database, queries = FaceFolder(root, "train", size), FaceFolder(root, "test", size)
    label_map = assign_labels(database, queries)
    return database, queries, label_map


class WithIndex(torch.utils.data.Dataset):
    """``dataset`` whose items are ``(image, label, index)``, index = position in ``dataset``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return image, label, index


def make_loader(dataset, batch_size, shuffle=False, drop_last=False, workers=0, generator=None,
                device="cpu", sampler=None, with_index=False):
    """Batches of ``dataset``: in-memory DDH splits straight from a tensor on ``device``
    (``DeviceBatches``), image folders through a torch DataLoader with ``workers`` processes.

    Args: batch_size (int > 0); shuffle (bool); drop_last (bool); workers (int >= 0, folders
    only); generator (torch.Generator or None) for the shuffle order; device: where DDH batches live;
    sampler: a (Distributed)Sampler giving this process's indices (replaces ``shuffle``);
    with_index: also yield each sample's position in ``dataset`` (int64 (B,)).
    Returns: an iterable of ``(images float32 (B, 3, S, S), labels int64 (B,)[, index int64 (B,)])``
    with ``len()``.
    """
    if isinstance(dataset, DDHSplit):
        if sampler is not None:
            return DeviceBatches(dataset, batch_size, device, drop_last=drop_last, with_index=with_index,
                                 indices=torch.as_tensor(list(sampler), dtype=torch.long))
        return DeviceBatches(dataset, batch_size, device, shuffle=shuffle, drop_last=drop_last,
                             generator=generator, with_index=with_index)
    if with_index:
        dataset = WithIndex(dataset)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                       sampler=sampler,
                                       drop_last=drop_last, num_workers=workers, generator=generator,
                                       persistent_workers=False, pin_memory=torch.device(device).type == "cuda")


def training_view(database):
    """The database split as training data: image folders get the random-crop/flip transform.

    Returns a shallow copy for ``FaceFolder`` (the database keeps its test transform) and the
    dataset itself for in-memory DDH splits (the authors apply no augmentation there).
    """
    if isinstance(database, FaceFolder):
        view = copy.copy(database)
        view.transform = face_transforms(database.image_size, train=True)
        return view
    return database
