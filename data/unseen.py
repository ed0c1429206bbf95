"""Identities held out of training: the unseen-identities protocol (Sablayrolles, Douze, Usunier,
Jegou, "How should we evaluate supervised hashing?", ICASSP 2017; README, "People never seen in
training, and the real-valued bound").

``dcdh_train.py --unseen-identities K`` holds K identities out of training entirely:

* ``choose_unseen`` draws them among the identities that have images in both splits (a test image
  to query with, a training image to find), with a torch.Generator of its own seeded by
  ``--seed``: the same seed and K give the same identities, and the training's random stream
  (weights, shuffling) is not moved. The first K of one seeded permutation are taken, so a larger
  K holds out a superset.
* ``hold_out`` splits both splits by identity: the trained part (the training data, and the
  paper's protocol: its test images query its training images) and the held-out part (the
  unseen protocol: the held-out identities' test images query their training-split images).
  Class indices are reassigned in each part (``data.assign_labels``): the trained identities get
  0..C-K-1, so every method's class centers, codebooks and classifiers cover exactly the
  identities it trains on (no untrained class), and method code is unchanged.

Each part of a DDH-layout split is normalised on its own (``DDHSplit.from_arrays``: the scalar
mean and std of the part), as if the files held only those identities: the training data's
normalisation depends on no image of a held-out identity. Image folders need no statistics.
"""
import copy
import glob
import os

import numpy as np
import torch

from utils.errors import UserInputError

from .ddh import DDHSplit
from .folder import FaceFolder

FLAG = "--unseen-identities"


def _ids(dataset):
    raw = dataset.raw_labels
    return raw.tolist() if isinstance(raw, np.ndarray) else list(raw)


def candidates(database, queries):
    """Identities with images in both the training (``database``) and the test (``queries``)
    split, sorted (plain ints or strs): those that can be held out."""
    return sorted(set(_ids(database)) & set(_ids(queries)))


def max_count(train_ids, test_ids):
    """The largest K that can be held out of identities ``train_ids`` (training split) given
    ``test_ids`` (test split): all that have test images but one (the paper's protocol needs a
    trained identity with test images), while at least 2 identities stay in training (hashing
    needs 2 classes)."""
    train_ids = set(train_ids)
    return max(0, min(len(train_ids & set(test_ids)) - 1, len(train_ids) - 2))


def max_unseen(database, queries):
    """``max_count`` of two loaded splits: the largest K ``choose_unseen`` accepts."""
    return max_count(_ids(database), _ids(queries))


def image_identities(dataset, root, split):
    """The identity of each image of one split of ``--dataset`` at ``root``, without decoding
    images (for checks and estimates before a run: ``grid``): the label values of a DDH layout's
    files (ints), the identity folder name of each image file otherwise (strs, as
    ``FaceFolder.raw_labels``; files that do not decode are counted too). Returns a list (empty
    when the split is missing). Raises: UserInputError for an unreadable DDH file."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        return []
    from . import DDH_LAYOUT
    if dataset in DDH_LAYOUT:
        from .ddh import _read_file
        return [int(v) for f in sorted(glob.glob(os.path.join(folder, "*.pkl"))) for v in _read_file(f)[1]]
    from torchvision.datasets.folder import IMG_EXTENSIONS
    return [e.name for e in sorted(os.scandir(folder), key=lambda e: e.name) if e.is_dir()
            for f in os.scandir(e.path) if f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS)]


def split_identities(dataset, root, split):
    """The set of ``image_identities``: the identities of one split, without decoding images (for
    checks before a run: ``grid.config``). Raises: UserInputError for an unreadable DDH file."""
    return set(image_identities(dataset, root, split))


def choose_unseen(database, queries, count, seed, flag=FLAG):
    """The ``count`` identities to hold out, drawn reproducibly from ``seed``.

    Args: database, queries: the train and test splits (``raw_labels`` set); count (int) K;
    seed (int): seeds a generator of its own (the global torch random state is not touched);
    flag: the option named in errors.
    Returns: list of K identities (plain ints or strs), sorted.
    Raises: UserInputError (one line naming ``flag``) when K < 1 or K > ``max_unseen``.
    """
    pool = candidates(database, queries)
    top = max_unseen(database, queries)
    if not 1 <= count <= top:
        trained = len(set(_ids(database)))
        if top < 1:
            raise UserInputError(f"{flag} {count}: no identity can be held out of this data ({len(pool)} of the "
                                 f"{trained} training identities have test images; one of them and at least 2 "
                                 "identities in all must stay in training)")
        raise UserInputError(f"{flag} {count}: expected 1..{top} ({len(pool)} of the {trained} training "
                             "identities have test images; one of them and at least 2 identities in all must "
                             "stay in training)")
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(pool), generator=generator)[:count].tolist()
    return sorted(pool[i] for i in order)


def subset(dataset, keep):
    """The items of ``dataset`` whose identity is in the set ``keep``, as a dataset of the same kind.

    DDH splits become a new ``DDHSplit`` normalised on its own (module docstring); image folders
    a shallow copy with the kept samples (same transform). ``labels`` are the raw identities until
    ``data.assign_labels`` runs. Raises: UserInputError if no item is kept.
    """
    rows = [i for i, k in enumerate(_ids(dataset)) if k in keep]
    if not rows:
        raise UserInputError(f"{getattr(dataset, 'root', '')}: no image of the identities asked for in "
                             f"the {dataset.split} split")
    if isinstance(dataset, DDHSplit):
        idx = torch.as_tensor(rows, dtype=torch.long)
        return DDHSplit.from_arrays(dataset.images[idx].numpy(), dataset.raw_labels[rows],
                                    root=dataset.root, split=dataset.split)
    if isinstance(dataset, FaceFolder):
        out = copy.copy(dataset)
        out.samples = [dataset.samples[i] for i in rows]
        out.imgs, out.targets = out.samples, [t for _, t in out.samples]
        out.raw_labels = [dataset.raw_labels[i] for i in rows]
        return out
    raise TypeError(f"cannot take identities out of a {type(dataset).__name__}")


def hold_out(database, queries, unseen, where="the data"):
    """Split both splits into the trained identities and the held-out ones.

    Args: database (train split), queries (test split); unseen: the held-out identities (as
    ``choose_unseen`` returns or a checkpoint lists them); where: names the data in errors.
    Returns: dict with ``database``, ``queries`` (trained identities; labels 0..C-K-1 from
    ``assign_labels``), ``label_map`` (the C-K trained identities), ``unseen_database``,
    ``unseen_queries`` (held-out identities; labels 0..K-1) and ``unseen`` (sorted list).
    Raises: UserInputError when a held-out identity has no training or no test image in the data
    (e.g. a checkpoint evaluated on other data than it was trained on).
    """
    from . import assign_labels
    unseen = list(unseen)
    keep = set(unseen)
    train_ids, test_ids = set(_ids(database)), set(_ids(queries))
    for ids, split in ((train_ids, "training"), (test_ids, "test")):
        missing = [u for u in unseen if u not in ids]
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
            has = "identity has" if len(missing) == 1 else "identities have"
            raise UserInputError(f"{where}: {len(missing)} held-out {has} no image in the {split} split "
                                 f"({shown}); evaluate on the data the model was trained on")
    trained = train_ids - keep
    out = {"database": subset(database, trained), "queries": subset(queries, test_ids - keep),
           "unseen_database": subset(database, keep), "unseen_queries": subset(queries, keep),
           "unseen": sorted(unseen)}
    out["label_map"] = assign_labels(out["database"], out["queries"])
    assign_labels(out["unseen_database"], out["unseen_queries"])
    return out
