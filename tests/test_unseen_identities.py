"""Identities held out of training (``data.unseen``, ``dcdh_train.py --unseen-identities``) and their
evaluation (``evaluation.py``: the paper's protocol at the top level, the unseen one under "unseen")."""
import itertools
import json
import os
import pickle

import numpy as np
import pytest
import torch

from data import assign_labels, build_datasets
from data.ddh import DDHSplit
from data.unseen import candidates, choose_unseen, hold_out, max_unseen
from utils.errors import UserInputError


def _splits(ids=10, without_test=(8, 9), per_id=4, seed=0):
    """Train and test DDH splits in memory: identities 0..ids-1 (raw ids 100 + i); those in
    ``without_test`` have no test image."""
    rng = np.random.default_rng(seed)
    train_labels = np.repeat(np.arange(ids), per_id) + 100
    test_labels = np.array([i + 100 for i in range(ids) if i not in without_test])
    train = DDHSplit.from_arrays(rng.integers(0, 256, (len(train_labels), 3072), dtype=np.uint8), train_labels)
    test = DDHSplit.from_arrays(rng.integers(0, 256, (len(test_labels), 3072), dtype=np.uint8), test_labels)
    assign_labels(train, test)
    return train, test


def test_choice_is_reproducible_among_identities_with_test_images_and_leaves_the_rng():
    train, test = _splits()
    assert candidates(train, test) == list(range(100, 108)) and max_unseen(train, test) == 7
    state = torch.get_rng_state()
    first = choose_unseen(train, test, 3, seed=5)
    assert torch.equal(torch.get_rng_state(), state)          # the training's random stream is untouched
    assert first == choose_unseen(train, test, 3, seed=5) == sorted(first)
    assert len(set(first)) == 3 and set(first) <= set(range(100, 108))
    assert set(first) <= set(choose_unseen(train, test, 5, seed=5))   # a larger K holds out a superset
    assert len({tuple(choose_unseen(train, test, 3, seed=s)) for s in range(6)}) > 1
    assert all(type(u) is int for u in first)                   # plain values for the checkpoint's config


@pytest.mark.parametrize("count", [0, 8, 50])
def test_out_of_range_count_is_refused(count):
    train, test = _splits()
    with pytest.raises(UserInputError, match=rf"^--unseen-identities {count}: expected 1\.\.7 \(8 of the 10 "):
        choose_unseen(train, test, count, seed=0)


def test_held_out_split_is_disjoint_from_training_and_relabelled():
    train, test = _splits()
    unseen = [101, 104, 106]
    s = hold_out(train, test, unseen)
    trained_ids = set(s["database"].raw_labels.tolist())
    assert trained_ids == set(range(100, 110)) - set(unseen) and s["label_map"] == sorted(trained_ids)
    assert set(s["queries"].raw_labels.tolist()) == set(range(100, 108)) - set(unseen)
    assert set(s["unseen_database"].raw_labels.tolist()) == set(s["unseen_queries"].raw_labels.tolist()) == set(unseen)
    assert len(s["database"]) + len(s["unseen_database"]) == len(train)
    assert len(s["queries"]) + len(s["unseen_queries"]) == len(test)
    assert s["database"].labels.tolist() == [s["label_map"].index(k) for k in s["database"].raw_labels.tolist()]
    assert sorted(set(s["unseen_database"].labels.tolist())) == [0, 1, 2]
    # the same images, and each part normalised on its own statistics (no image of the other part)
    rows = np.isin(train.raw_labels, unseen)
    assert torch.equal(s["unseen_database"].images, train.images[torch.from_numpy(rows)])
    kept = train.images[torch.from_numpy(~rows)].double()
    assert s["database"].mean == pytest.approx(float(kept.mean()))
    assert s["database"].std == pytest.approx(float(kept.std(unbiased=False)))


def test_held_out_identity_missing_from_the_data_is_one_line():
    train, test = _splits()
    with pytest.raises(UserInputError, match=r"^x.tar: 1 held-out identity has no image in the test split \(108\)"):
        hold_out(train, test, [101, 108], where="x.tar")


def test_image_folders_are_split_by_name(tmp_path):
    from PIL import Image
    for split, n in (("train", 2), ("test", 1)):
        for name in ("ann", "bob", "cy", "dee"):
            os.makedirs(tmp_path / split / name)
            for i in range(n):
                Image.new("RGB", (8, 8), (40 * i, 50, 60)).save(tmp_path / split / name / f"{i}.png")
    database, queries, _ = build_datasets("folder", str(tmp_path), 16)
    unseen = choose_unseen(database, queries, 2, seed=0)
    assert all(isinstance(u, str) for u in unseen)
    s = hold_out(database, queries, unseen)
    assert sorted(s["label_map"] + unseen) == ["ann", "bob", "cy", "dee"]
    assert {os.path.basename(os.path.dirname(p)) for p, _ in s["unseen_database"].samples} == set(unseen)
    assert [y for _, y in s["database"].samples] == [0, 0, 1, 1] and len(s["unseen_queries"]) == 2
    image, label = s["unseen_queries"][1]
    assert image.shape == (3, 16, 16) and int(label) == 1


def _write_ddh(root, train, test):
    for split, (data, labels) in (("train", train), ("test", test)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        with open(os.path.join(root, split, "data_batch_1.pkl"), "wb") as f:
            pickle.dump((data, labels), f, protocol=2)
    return str(root)


def _read_ddh(root, split):
    from data.safe_pickle import load_arrays
    return tuple(np.asarray(a) for a in load_arrays(os.path.join(root, split, "data_batch_1.pkl")))


def _train(root, ckdir, *extra):
    import dcdh_train
    argv = ["--dataset", "ddh", "--data-root", root, "--len", "12", "--epochs", "2", "--bs", "32",
            "--save", "m.tar", "--checkpoint-dir", str(ckdir), "--device", "cpu", *extra]
    dcdh_train.main(dcdh_train.get_args_parser().parse_args(argv))
    return torch.load(os.path.join(ckdir, "m.tar"), map_location="cpu", weights_only=True)


def test_training_reads_no_image_of_held_out_identities_nor_any_test_image(tmp_path):
    """The same run on data whose held-out identities' training images and whose whole test split
    are replaced by noise gives the same checkpoint, bit for bit (and evaluates every epoch on the
    noise): neither training nor model selection reads them."""
    from data.synthetic import write_synthetic_ddh
    root = write_synthetic_ddh(str(tmp_path / "a"), identities=8, train_per_id=16, test_per_id=4, seed=1, files=1)
    (xtr, ytr), (xte, yte) = _read_ddh(root, "train"), _read_ddh(root, "test")
    a = _train(root, tmp_path / "ca", "--unseen-identities", "3", "--eval-every", "1")
    unseen = a["config"]["unseen_identities"]
    assert len(unseen) == 3 and a["config"]["label_map"] == sorted(set(range(8)) - set(unseen))
    assert a["config"]["num_classes"] == 5 and tuple(a["centers"]["centers"].shape) == (5, 12)
    rng = np.random.default_rng(7)
    noisy_train = xtr.copy()
    rows = np.isin(ytr, unseen)
    noisy_train[rows] = rng.integers(0, 256, (rows.sum(), 3072), dtype=np.uint8)
    noisy = _write_ddh(tmp_path / "b", (noisy_train, ytr), (rng.integers(0, 256, xte.shape, dtype=np.uint8), yte))
    b = _train(noisy, tmp_path / "cb", "--unseen-identities", "3", "--eval-every", "1")
    assert b["config"]["unseen_identities"] == unseen and b["best_epoch"] == a["best_epoch"]
    for part in ("backbone", "centers"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    # without --unseen-identities every identity is trained on, and the config says none is held out
    c = _train(root, tmp_path / "cc", "--eval-every", "0", "--epochs", "1")
    assert c["config"]["unseen_identities"] == [] and c["config"]["num_classes"] == 8


def test_out_of_range_on_the_command_line_is_one_line_exit_2(synthetic_root, tmp_path, capsys):
    import dcdh_train
    for value, needle in (("7", "--unseen-identities 7: expected 1..6 (8 of the 8 training identities"),
                          ("-1", "--unseen-identities -1: must be >= 0")):
        argv = ["--dataset", "ddh", "--data-root", synthetic_root, "--len", "12", "--epochs", "1", "--bs", "32",
                "--checkpoint-dir", str(tmp_path / "ck"), "--device", "cpu", "--unseen-identities", value]
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            dcdh_train.main(dcdh_train.get_args_parser().parse_args(argv))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert needle in err, err
    assert not (tmp_path / "ck").exists() or not [f for f in os.listdir(tmp_path / "ck") if f.endswith(".tar")]


def test_resume_with_other_held_out_identities_is_refused(synthetic_root, tmp_path, capsys):
    import dcdh_train
    database, queries, _ = build_datasets("ddh", synthetic_root)
    first = choose_unseen(database, queries, 2, 0)
    seeds = [s for s in range(1, 20) if choose_unseen(database, queries, 2, s) != first]
    argv = ["--dataset", "ddh", "--data-root", synthetic_root, "--len", "12", "--epochs", "2", "--bs", "32",
            "--save", "m.tar", "--checkpoint-dir", str(tmp_path), "--eval-every", "0", "--device", "cpu",
            "--unseen-identities", "2"]
    dcdh_train.main(dcdh_train.get_args_parser().parse_args(argv + ["--epochs", "1"]))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        dcdh_train.main(dcdh_train.get_args_parser().parse_args(argv + ["--seed", str(seeds[0]), "--resume"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "holds out other identities" in err, err
    # another K, or none: the same message (the class count follows from the held-out identities)
    for other in (["--unseen-identities", "3"], ["--unseen-identities", "0"]):
        with pytest.raises(SystemExit) as e:
            dcdh_train.main(dcdh_train.get_args_parser().parse_args(argv + other + ["--resume"]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and "holds out other identities" in err, err


# --------------------------------------------------------------------------------------------
# a hand-made case whose figures are known


class FirstPixels(torch.nn.Module):
    """A stand-in network: the code is the first 4 pixels of the first channel (bright -> +1, dark -> -1)."""

    def forward(self, x):
        return x[:, 0, 0, :4].clone()


A, B, C, D = (1, 1, 1, 1), (-1, -1, -1, -1), (1, -1, 1, -1), (-1, 1, -1, 1)


def _image(code):
    img = np.full((3, 32, 32), 128, dtype=np.uint8)
    img[0, 0, :4] = [255 if b > 0 else 0 for b in code]
    return img.reshape(-1)


def _brute_force_chance(relevant, n):
    """Mean AP over every ordering of a database of n items with ``relevant`` of them relevant."""
    aps = []
    for order in itertools.permutations(range(n)):
        rel = np.array([i < relevant for i in order], dtype=float)
        aps.append(float(np.sum(np.cumsum(rel) / np.arange(1, n + 1) * rel) / relevant))
    return float(np.mean(aps))


def test_known_figures_of_both_protocols(tmp_path, monkeypatch):
    """Identities 10, 11 trained; 12, 13 held out. Unseen database (in file order): three images of
    12 with code A, then 13's: one with code A, two with code B; queries: 12 (A) and 13 (B).
    Query 12 finds its three at distance 0 first: AP 1. Query 13 finds its two B's first, then
    the four A's with its own at the fourth of them (rank 6): AP (1 + 1 + 3/6) / 3 = 5/6."""
    import evaluation
    train = [(10, C)] * 3 + [(11, D)] * 3 + [(12, A)] * 3 + [(13, A), (13, B), (13, B)]
    test = [(10, C), (11, D), (12, A), (13, B)]
    root = _write_ddh(tmp_path / "data",
                      (np.stack([_image(c) for _, c in train]), np.array([k for k, _ in train])),
                      (np.stack([_image(c) for _, c in test]), np.array([k for k, _ in test])))
    config = {"backbone": "dfhnet", "bits": 4, "image_size": 32, "method": "dcdh", "unseen_identities": [12, 13]}
    monkeypatch.setattr(evaluation, "load_hashing_model",
                        lambda path, device, bits=None, backbone=None: (FirstPixels(), {"centers": {}}, dict(config)))
    (tmp_path / "x.tar").write_bytes(b"")
    js = tmp_path / "m.json"
    evaluation.main(evaluation.get_args_parser().parse_args(
        ["--load", str(tmp_path / "x.tar"), "--dataset", "ddh", "--data-root", root, "--device", "cpu",
         "--real", "--json", str(js)]))
    m = json.loads(js.read_text())
    assert (m["map"], m["num_queries"], m["num_database"], m["precision_at_1"]) == (1.0, 2, 6, 1.0)
    assert m["chance_map"] == pytest.approx(_brute_force_chance(3, 6))
    u = m["unseen"]
    assert set(u) >= set(m) - {"unseen", "checkpoint", "dataset"}      # the same keys
    assert (u["num_queries"], u["num_database"], u["queries_without_relevant"]) == (2, 6, 0)
    assert u["map"] == pytest.approx((1 + 5 / 6) / 2) and u["precision_at_1"] == 1.0
    assert u["precision_at_5"] == pytest.approx((3 / 5 + 2 / 5) / 2)
    assert u["chance_map"] == pytest.approx(_brute_force_chance(3, 6))
    # the outputs are exactly +-1, so the cosine ranking is the Hamming one (ties by database index)
    assert u["real"]["map"] == pytest.approx(u["map"]) and m["real"]["map"] == 1.0
    # a checkpoint without held-out identities: as before, every image, no "unseen"
    config["unseen_identities"] = []
    evaluation.main(evaluation.get_args_parser().parse_args(
        ["--load", str(tmp_path / "x.tar"), "--dataset", "ddh", "--data-root", root, "--device", "cpu",
         "--json", str(js)]))
    m = json.loads(js.read_text())
    assert "unseen" not in m and "real" not in m and (m["num_queries"], m["num_database"]) == (4, 12)
