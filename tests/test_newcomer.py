"""What a new user meets first: the missing-data message, an empty radius query, the demo's
synthetic faces and chance level, and skip reasons in ``make test``."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, run_script
from data import DATASETS, build_datasets, resolve_root
from utils.errors import UserInputError


# ----------------------------------------------------------------------------- missing data root


@pytest.mark.parametrize("name", [d for d in DATASETS])
def test_missing_data_root_names_the_files_and_the_source(name, tmp_path):
    with pytest.raises(UserInputError) as e:
        resolve_root(name, str(tmp_path / "nope"))
    msg = str(e.value)
    assert f"--data-root {tmp_path / 'nope'}: no such folder" in msg and "\n" not in msg
    if name in ("facescrub", "youtube", "ddh"):
        assert "train/*.pkl" in msg and "test/*.pkl" in msg
    else:
        assert "train/<identity>/*" in msg and "test/<identity>/*" in msg
    if name in ("facescrub", "youtube"):
        assert "released by the DDH authors" in msg and "DCDH-PyTorch" in msg
    if name == "vggface2":
        assert "VGGFace2 subset" in msg and "DCDH-PyTorch" in msg
    assert "make demo" in msg


def test_missing_default_root_says_it_is_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./FaceScrub here
    with pytest.raises(UserInputError, match=r"\./FaceScrub \(the default folder of --dataset facescrub\): "
                                             r"no such folder.*train/\*\.pkl"):
        resolve_root("facescrub", None)
    with pytest.raises(UserInputError, match=r"--dataset ddh needs --data-root: .*train/\*\.pkl"):
        build_datasets("ddh", None)


def test_training_without_data_prints_what_to_do(tmp_path):
    """``python dcdh_train.py --dataset facescrub --len 48`` in a folder without ./FaceScrub."""
    proc = run_script(os.path.join(ROOT, "dcdh_train.py"), "--dataset", "facescrub", "--len", "48",
                      "--device", "cpu", cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("dcdh_train.py: error: ./FaceScrub")
    assert "train/*.pkl" in err and "test/*.pkl" in err and "DDH authors" in err


# ----------------------------------------------------------------------------- empty radius query


def _tiny_checkpoint(path, bits=12):
    from models import build_model
    from utils.checkpoint import save_checkpoint
    torch.manual_seed(0)
    model = build_model("dfhnet", bits)
    save_checkpoint({"backbone": model.state_dict(), "centers": {"centers": torch.zeros(2, bits)},
                     "config": {"backbone": "dfhnet", "bits": bits, "image_size": 32}}, str(path))
    return str(path)


def test_radius_query_with_no_hit_says_so_in_table_and_sheet(tmp_path, capsys, monkeypatch):
    import faiss

    import search
    from utils.binary_index import pack_codes
    rng = np.random.default_rng(0)
    for ident in ("anna", "bob"):
        for i in range(2):
            os.makedirs(tmp_path / "faces" / "train" / ident, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "faces" / "train" / ident / f"{i}.png")
    ck = _tiny_checkpoint(tmp_path / "m.tar")
    ix = str(tmp_path / "ix")
    cli = lambda *a: search.main(search.get_args_parser().parse_args(list(a)))  # noqa: E731
    cli("index", "--load", ck, "--gallery", str(tmp_path / "faces"), "--out", ix, "--device", "cpu",
        "--workers", "0")
    # make every gallery code the complement of the query's own code: Hamming distance 12 to all
    query = str(tmp_path / "faces" / "train" / "anna" / "0.png")
    index = faiss.read_index_binary(os.path.join(ix, search.INDEX_FILE))
    own = np.unpackbits(faiss.vector_to_array(index.xb).reshape(index.ntotal, -1)[:1], axis=1,
                        bitorder="little")[:, :12].astype(np.float32) * 2 - 1
    far = faiss.IndexBinaryFlat(index.d)
    far.add(np.repeat(pack_codes(-own), index.ntotal, axis=0))
    faiss.write_index_binary(far, os.path.join(ix, search.INDEX_FILE))

    drawn = []
    from matplotlib.figure import Figure
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), savefig(self, *a, **k))[1])
    capsys.readouterr()
    out = cli("query", "--index", ix, query, "--radius", "2", "--device", "cpu", "--sheet", str(tmp_path / "s.png"))
    text = capsys.readouterr().out
    assert out["queries"][0]["results"] == []
    assert "0 results" in text and "(no gallery item within Hamming radius 2)" in text
    assert "rank  dist" not in text  # no empty table header
    assert os.path.isfile(tmp_path / "s.png") and len(drawn) == 1
    sheet_texts = [t.get_text() for ax in drawn[0].axes for t in ax.texts]
    assert "no gallery item\nwithin Hamming\nradius 2" in sheet_texts
    # the same query with a wide enough radius finds the whole gallery, and no such line
    cli("query", "--index", ix, query, "--radius", "12", "--device", "cpu")
    text = capsys.readouterr().out
    assert "4 results" in text and "no gallery item" not in text


# ----------------------------------------------------------------------------- demo pieces


def test_synthetic_faces_layout_and_variation(tmp_path):
    from data.ddh import DDHSplit
    from data.synthetic import write_synthetic_faces
    root = write_synthetic_faces(str(tmp_path / "f"), identities=5, train_per_id=6, test_per_id=2, seed=3)
    train, test = DDHSplit(root, "train"), DDHSplit(root, "test")
    assert len(train) == 30 and len(test) == 10
    assert np.bincount(train.raw_labels.tolist()).tolist() == [6] * 5
    assert np.bincount(test.raw_labels.tolist()).tolist() == [2] * 5
    with open(os.path.join(root, "classes.txt")) as f:
        assert f.read().splitlines()[:2] == ["0 face_00", "1 face_01"]
    # every image differs (pose, light, noise), but images of one identity are closer than others
    x = train.images.reshape(len(train), -1).float()
    y = torch.as_tensor(np.asarray(train.raw_labels))
    d = torch.cdist(x, x)
    same = (y[:, None] == y[None, :]) & ~torch.eye(len(y), dtype=torch.bool)
    assert (d[~torch.eye(len(y), dtype=torch.bool)] > 0).all()
    assert d[same].mean() < d[y[:, None] != y[None, :]].mean()
    # deterministic for a seed
    again = write_synthetic_faces(str(tmp_path / "g"), identities=5, train_per_id=6, test_per_id=2, seed=3)
    assert torch.equal(DDHSplit(again, "train").images, train.images)


def test_chance_level_is_the_expected_ap_of_a_random_ranking():
    import itertools
    import demo
    from utils.metrics import tie_aware_map
    # brute force: the mean AP over every ordering of a 5-item database with 2 relevant items
    db = np.array([0, 0, 1, 1, 1])
    aps = []
    for order in itertools.permutations(range(5)):
        rel = (db[list(order)] == 0).astype(float)
        aps.append(float(np.sum(np.cumsum(rel) / np.arange(1, 6) * rel) / rel.sum()))
    assert demo.chance_map(np.array([0]), db) == pytest.approx(np.mean(aps))
    # a query whose identity is not in the database contributes 0
    assert demo.chance_map(np.array([0, 99]), db) == pytest.approx(np.mean(aps) / 2)
    # the demo's set: equals the tie-aware mAP of codes that are all equal (every order equally likely)
    db = np.repeat(np.arange(30), 40)
    q = np.arange(30)
    codes = torch.ones(len(db), 12)
    same = tie_aware_map(torch.ones(30, 12), codes, torch.from_numpy(q), torch.from_numpy(db))
    assert demo.chance_map(q, db) == pytest.approx(same["map"], rel=1e-6)
    assert demo.chance_map(q, db) > 1 / 30


def test_make_test_prints_skip_reasons():
    with open(os.path.join(ROOT, "Makefile")) as f:
        recipe = [line for line in f if "-m pytest" in line and not line.startswith("#")]
    assert recipe and all("-rs" in line for line in recipe)
