"""Data: the restricted unpickler, DDH normalisation and file order, labels, image folders."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CELEBA, CELEBA_DDH, needs_celeba_ddh
from data import assign_labels, build_datasets, make_loader, training_view
from data.ddh import DDHSplit
from data.safe_pickle import load_arrays
from utils.errors import UserInputError


def write_ddh(root, split, parts):
    os.makedirs(os.path.join(root, split), exist_ok=True)
    for name, obj in parts.items():
        with open(os.path.join(root, split, name), "wb") as f:
            pickle.dump(obj, f, protocol=2)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_refuses_code_and_does_not_run_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps((np.zeros((1, 3072), np.uint8), Payload(str(marker))), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        load_arrays(str(path))
    assert not marker.exists()
    write_ddh(str(tmp_path / "set"), "train", {"a.pkl": (np.zeros((1, 3072), np.uint8), Payload(str(marker)))})
    with pytest.raises(UserInputError, match="a.pkl: not a DDH data file"):
        DDHSplit(str(tmp_path / "set"), "train")
    assert not marker.exists()


def test_unpickler_loads_python2_style_arrays(tmp_path):
    path = tmp_path / "ok.pkl"
    data = np.arange(12, dtype=np.uint8).reshape(2, 6)
    path.write_bytes(pickle.dumps((data, np.array([3, 1])), protocol=2))
    got = load_arrays(str(path))
    np.testing.assert_array_equal(got[0], data)
    np.testing.assert_array_equal(got[1], [3, 1])


def test_normalisation_and_sorted_file_order(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    b = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    # written in reverse name order: the reader must still take b_1 before b_2
    write_ddh(str(tmp_path), "train", {"data_batch_2.pkl": (b, np.array([1, 1])),
                                       "data_batch_1.pkl": (a, np.array([0, 2, 0]))})
    split = DDHSplit(str(tmp_path), "train")
    whole = np.concatenate([a, b]).astype(np.float64)
    expected = np.clip((whole - whole.mean()) / (whole.std() + 1e-5) * 0.1, -1, 1).reshape(5, 3, 32, 32)
    x, y = split.__getitems__([0, 1, 2, 3, 4])
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)
    assert y.tolist() == [0, 2, 0, 1, 1]
    x3, y3 = split[3]
    np.testing.assert_allclose(x3.numpy(), expected[3], atol=1e-6)


def test_split_statistics_are_per_split(tmp_path):
    write_ddh(str(tmp_path), "train", {"a.pkl": (np.full((2, 3072), 10, np.uint8), np.array([0, 1]))})
    write_ddh(str(tmp_path), "test", {"a.pkl": (np.full((1, 3072), 200, np.uint8), np.array([0]))})
    db, q, _ = build_datasets("ddh", str(tmp_path))
    assert db.mean == 10 and q.mean == 200
    assert db[0][0].abs().max() == 0 and q[0][0].abs().max() == 0


@pytest.mark.parametrize("obj,message", [
    ((np.zeros((2, 100), np.uint8), np.array([0, 1])), r"shape \(n, 3072\)"),
    ((np.zeros((2, 3072), np.uint8), np.array([0, 1, 2])), "2 images but 3 labels"),
    ((np.zeros((2, 3072), np.uint8), np.array([1, "a"], dtype=object)), "labels must be integers"),
    ({"data": 1}, "expected a pickled tuple"),
])
def test_malformed_ddh_files(tmp_path, obj, message):
    write_ddh(str(tmp_path), "train", {"x.pkl": obj})
    with pytest.raises(UserInputError, match=message):
        DDHSplit(str(tmp_path), "train")


def test_truncated_pickle(tmp_path):
    write_ddh(str(tmp_path), "train", {"x.pkl": (np.zeros((2, 3072), np.uint8), np.array([0, 1]))})
    p = tmp_path / "train" / "x.pkl"
    p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(UserInputError, match="x.pkl: truncated or corrupt"):
        DDHSplit(str(tmp_path), "train")


def test_missing_folders(tmp_path):
    with pytest.raises(UserInputError, match="no such folder"):
        build_datasets("ddh", str(tmp_path / "nope"))
    os.makedirs(tmp_path / "train")
    with pytest.raises(UserInputError, match="no .pkl files"):
        build_datasets("ddh", str(tmp_path))
    with pytest.raises(UserInputError, match="--dataset 'mnist' is unknown"):
        build_datasets("mnist", str(tmp_path))
    with pytest.raises(UserInputError, match="needs --data-root"):
        build_datasets("folder", None)


def test_labels_remapped_and_unseen_query_ids(tmp_path):
    z = np.zeros((1, 3072), np.uint8)
    write_ddh(str(tmp_path), "train", {"a.pkl": (np.repeat(z, 4, 0), np.array([100, 7, 42, 7]))})
    write_ddh(str(tmp_path), "test", {"a.pkl": (np.repeat(z, 3, 0), np.array([42, 999, 7]))})
    db, q, label_map = build_datasets("ddh", str(tmp_path))
    assert label_map == [7, 42, 100]
    assert db.labels.tolist() == [2, 0, 1, 0]
    assert q.labels.tolist() == [1, 3, 0]   # 999 is not in the database: a fresh id, matches nothing


def make_folder(root, spec, mode="RGB", size=(40, 48)):
    for split, ids in spec.items():
        for ident, count in ids.items():
            d = os.path.join(root, split, ident)
            os.makedirs(d, exist_ok=True)
            for i in range(count):
                Image.new(mode, size, color=(i * 30) % 255 if mode == "L" else (i * 30 % 255, 20, 90)).save(
                    os.path.join(d, f"{i}.png"))


def test_image_folder_labels_by_train_names_and_modes(tmp_path):
    make_folder(str(tmp_path), {"train": {"bob": 2, "alice": 3}, "test": {"carol": 1, "bob": 1}}, mode="L")
    db, q, label_map = build_datasets("folder", str(tmp_path), 32)
    assert label_map == ["alice", "bob"]
    assert db.labels.tolist() == [0, 0, 0, 1, 1]
    assert sorted(q.labels.tolist()) == [1, 2]     # carol unseen -> 2
    x, y = db[0]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1   # greyscale -> RGB
    view = training_view(db)
    assert view.transform is not db.transform and view.labels is db.labels
    xb, yb = next(iter(make_loader(q, 4)))
    assert xb.shape == (2, 3, 32, 32)


def test_mixed_label_types_are_refused():
    class Fake:
        raw_labels = [1, "a"]
    with pytest.raises(UserInputError, match="mix types"):
        assign_labels(Fake(), Fake())


@needs_celeba_ddh
def test_real_celeba_ddh32_counts():
    db, q, label_map = build_datasets("facescrub", CELEBA_DDH)
    assert (len(db), len(q), len(label_map)) == (4992, 1265, 299)
    x, y = next(iter(make_loader(q, 8)))
    assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32) and x.abs().max() <= 1
    assert not os.path.exists(os.path.join(CELEBA, "train", "__pycache__"))


def test_protocol_5_and_empty_protocol_2_splits(tmp_path):
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251
    os.makedirs(tmp_path / "train")
    (tmp_path / "train" / "a.pkl").write_bytes(pickle.dumps((data, np.array([4, 9])), protocol=5))
    split = DDHSplit(str(tmp_path), "train")
    assert split.raw_labels.tolist() == [4, 9] and split.images.shape == (2, 3, 32, 32)
    (tmp_path / "train" / "a.pkl").write_bytes(
        pickle.dumps((np.zeros((0, 3072), np.uint8), np.zeros(0, np.int64)), protocol=2))
    with pytest.raises(UserInputError, match="the split holds no images"):
        DDHSplit(str(tmp_path), "train")


def test_folder_named_pkl_is_ignored(tmp_path):
    write_ddh(str(tmp_path), "train", {"a.pkl": (np.zeros((2, 3072), np.uint8), np.array([0, 1]))})
    os.makedirs(tmp_path / "train" / "zz.pkl")
    assert len(DDHSplit(str(tmp_path), "train")) == 2


def test_truncated_jpeg_is_skipped_with_warning(tmp_path, capsys):
    make_folder(str(tmp_path), {"train": {"a": 2, "b": 2}, "test": {"a": 1}})
    good = tmp_path / "train" / "a" / "big.jpg"
    Image.effect_noise((64, 64), 50).convert("RGB").save(good, quality=95)
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "train" / "b" / "empty.jpg").write_bytes(b"")
    db, _, _ = build_datasets("folder", str(tmp_path), 32)
    assert len(db) == 4
    err = capsys.readouterr().err
    assert "skipped 2 unreadable image file(s)" in err and "big.jpg" in err and "empty.jpg" in err


def test_rgba_images_and_empty_identity_folder(tmp_path, capsys):
    make_folder(str(tmp_path), {"train": {"a": 2, "b": 2}, "test": {"a": 1}}, mode="RGBA")
    os.makedirs(tmp_path / "train" / "nobody")
    db, q, label_map = build_datasets("folder", str(tmp_path), 32)
    assert label_map == ["a", "b"] and len(db) == 4
    assert db[0][0].shape == (3, 32, 32)
    assert "ignored 1 identity folder(s) without images: nobody" in capsys.readouterr().err


def test_split_from_arrays_equals_split_from_files(synthetic_root):
    from_files = DDHSplit(synthetic_root, "train")
    in_memory = DDHSplit.from_arrays(from_files.images.numpy().reshape(len(from_files), -1), from_files.raw_labels)
    assert (in_memory.mean, in_memory.std, in_memory.scale) == (from_files.mean, from_files.std, from_files.scale)
    assert torch.equal(in_memory.images, from_files.images) and torch.equal(in_memory.labels, from_files.labels)
    torch.testing.assert_close(in_memory[3][0], from_files[3][0], rtol=0, atol=0)
