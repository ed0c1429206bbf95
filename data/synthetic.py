"""A small synthetic face-like set in the DDH layout, for the demo and tests when no real
faces are available. Each identity is a random smooth 3x32x32 prototype; its images are
the prototype with a random shift, brightness change and pixel noise, stored as uint8.
"""
import os
import pickle

import numpy as np


def write_synthetic_ddh(root, identities=20, train_per_id=30, test_per_id=5, seed=0, files=2):
    """Write ``root/train/data_batch_{1..files}.pkl`` and ``root/test/data_batch_1.pkl``.

    Each file is a protocol-2 pickle of ``(data uint8 (n, 3072) channel-first, label int64 (n,))``.
    Returns: ``root``. Raises OSError if ``root`` cannot be written.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 215, size=(identities, 3, 8, 8))
    prototypes = coarse.repeat(4, axis=2).repeat(4, axis=3)  # (C, 3, 32, 32)

    def images(per_id):
        labels = np.repeat(np.arange(identities), per_id)
        dx, dy = rng.integers(-2, 3, size=(2, labels.size))
        out = np.empty((labels.size, 3, 32, 32))
        for i, c in enumerate(labels):
            out[i] = np.roll(prototypes[c], (dy[i], dx[i]), axis=(1, 2))
        out = out * rng.uniform(0.8, 1.2, size=(labels.size, 1, 1, 1)) + rng.normal(0, 12, out.shape)
        order = rng.permutation(labels.size)
        return np.clip(out, 0, 255).astype(np.uint8).reshape(labels.size, -1)[order], labels[order].astype(np.int64)

    for split, per_id, nfiles in (("train", train_per_id, files), ("test", test_per_id, 1)):
        data, labels = images(per_id)
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for k, part in enumerate(np.array_split(np.arange(len(labels)), nfiles)):
            with open(os.path.join(root, split, f"data_batch_{k + 1}.pkl"), "wb") as f:
                pickle.dump((data[part], labels[part]), f, protocol=2)
    return root
