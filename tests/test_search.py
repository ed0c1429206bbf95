"""search.py and utils/binary_index.py: packed codes and faiss distances, stable top-k and radius ranking, the index/query CLI."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CELEBA_DDH, FIXTURES, needs_celeba_ddh, needs_fixtures, run_script
import search
from conftest import search_cli as cli, search_cli_error as cli_error
from utils import binary_index
from methods.dcdh import DCDH
from models import build_model
from utils.checkpoint import save_checkpoint
from utils.metrics import hamming_distance


def random_codes(rng, n, k):
    return rng.choice(np.array([-1.0, 1.0], np.float32), size=(n, k))


def brute_hamming(q, b):
    """Unpacked Hamming distance of +-1 codes, (K - <q, b>) / 2 (docs/design.md)."""
    k = q.shape[1]
    return ((k - q.astype(np.int64) @ b.astype(np.int64).T) // 2).astype(np.int64)


def full_distances(index, packed_q):
    n = index.ntotal
    d, i = index.search(packed_q, n)
    out = np.empty((len(packed_q), n), np.int64)
    np.put_along_axis(out, i.astype(np.int64), d.astype(np.int64), axis=1)
    return out


# ----------------------------------------------------------------------------- core functions


@pytest.mark.parametrize("bits", [12, 36, 48])
def test_packed_faiss_distances_equal_unpacked(bits):
    rng = np.random.default_rng(bits)
    db, q = random_codes(rng, 200, bits), random_codes(rng, 15, bits)
    packed = binary_index.pack_codes(db)
    assert packed.dtype == np.uint8 and packed.shape == (200, (bits + 7) // 8)
    index = binary_index.build_index(packed)
    assert index.d == 8 * ((bits + 7) // 8) and index.ntotal == 200
    faiss_d = full_distances(index, binary_index.pack_codes(q))
    np.testing.assert_array_equal(faiss_d, brute_hamming(q, db))
    np.testing.assert_array_equal(faiss_d, hamming_distance(torch.from_numpy(q), torch.from_numpy(db)).numpy())


def test_pack_codes_pads_with_zero_bits_and_maps_zero_to_minus_one():
    h = torch.tensor([[0.5] * 12, [0.0] * 12, [-1.0] * 11 + [2.0]])
    packed = binary_index.pack_codes(h)
    assert packed.shape == (3, 2)
    assert packed[0].tolist() == [0xFF, 0x0F]  # bits 12..15 of the second byte are padding = 0
    assert packed[1].tolist() == [0, 0]  # sign(0) -> -1 -> bit 0
    assert packed[2].tolist() == [0, 0x08]  # little bit order: code bit 11 is bit 3 of byte 1
    with pytest.raises(ValueError):
        binary_index.pack_codes(np.ones(12))


def stable_topk(q, db, k):
    d = brute_hamming(q, db)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d, order, axis=1)


@pytest.mark.parametrize("bits", [12, 36, 48])
def test_topk_equals_bruteforce_stable_sort(bits):
    rng = np.random.default_rng(100 + bits)
    # few distinct codes, so there are many ties at every distance
    base = random_codes(rng, 12, bits)
    db = base[rng.integers(0, 12, size=400)]
    db[::7] = random_codes(rng, len(db[::7]), bits)
    q = np.concatenate([random_codes(rng, 8, bits), base[:4]])
    index = binary_index.build_index(binary_index.pack_codes(db))
    for k in (1, 5, 37, 399, 400, 1000):
        ranked = binary_index.rank_topk(index, binary_index.pack_codes(q), k)
        order, dists = stable_topk(q, db, min(k, len(db)))
        for qi, (ids, d) in enumerate(ranked):
            assert ids.dtype == np.int64 and d.dtype == np.int64
            np.testing.assert_array_equal(ids, order[qi])
            np.testing.assert_array_equal(d, dists[qi])


def test_ties_come_out_in_database_order():
    rng = np.random.default_rng(0)
    code = random_codes(rng, 1, 36)
    far = -code
    db = np.concatenate([far.repeat(50, 0), code.repeat(300, 0), far.repeat(50, 0)])
    index = binary_index.build_index(binary_index.pack_codes(db))
    (ids, d), = binary_index.rank_topk(index, binary_index.pack_codes(code), 120)
    assert ids.tolist() == list(range(50, 170)) and set(d.tolist()) == {0}
    (ids, d), = binary_index.rank_topk(index, binary_index.pack_codes(code), 330)
    assert ids.tolist() == list(range(50, 350)) + list(range(0, 30)) and d[-1] == 36
    (ids, d), = binary_index.rank_within(index, binary_index.pack_codes(code), 0)
    assert ids.tolist() == list(range(50, 350))


@pytest.mark.parametrize("bits", [12, 36, 48])
def test_radius_returns_exactly_the_items_within_r(bits):
    rng = np.random.default_rng(200 + bits)
    base = random_codes(rng, 20, bits)
    db = base[rng.integers(0, 20, size=300)] * np.where(rng.random((300, bits)) < 0.05, -1, 1).astype(np.float32)
    q = np.concatenate([base[:5], random_codes(rng, 3, bits)])
    index = binary_index.build_index(binary_index.pack_codes(db))
    full = brute_hamming(q, db)
    for r in (0, 1, 2, bits // 4, bits // 2, bits):
        for qi, (ids, d) in enumerate(binary_index.rank_within(index, binary_index.pack_codes(q), r)):
            expect = np.argsort(full[qi], kind="stable")
            expect = expect[full[qi][expect] <= r]
            np.testing.assert_array_equal(ids, expect)
            np.testing.assert_array_equal(d, full[qi][expect])
        capped = binary_index.rank_within(index, binary_index.pack_codes(q), r, limit=3)
        assert all(len(ids) <= 3 for ids, _ in capped)


def test_bad_k_and_radius():
    index = binary_index.build_index(binary_index.pack_codes(np.ones((4, 12))))
    with pytest.raises(ValueError):
        binary_index.rank_topk(index, binary_index.pack_codes(np.ones((1, 12))), 0)
    with pytest.raises(ValueError):
        binary_index.rank_within(index, binary_index.pack_codes(np.ones((1, 12))), -1)


# ----------------------------------------------------------------------------- the CLI


def save_tiny_checkpoint(path, bits, classes=3, seed=0):
    torch.manual_seed(seed)
    model, loss = build_model("dfhnet", bits), DCDH(classes, bits)
    save_checkpoint({"backbone": model.state_dict(), "centers": loss.state_dict(),
                     "config": {"backbone": "dfhnet", "bits": bits, "image_size": 32}}, str(path))
    return str(path)


def write_image(path, rng, size=40):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-identity image gallery (train 4 each, test 1 each), 12- and 48-bit checkpoints, an index."""
    root = tmp_path_factory.mktemp("search")
    rng = np.random.default_rng(0)
    gallery = root / "faces"
    for ident in ("anna", "bob", "carl"):
        for i in range(4):
            write_image(str(gallery / "train" / ident / f"{i}.png"), rng)
        write_image(str(gallery / "test" / ident / "q.png"), rng)
    ck12 = save_tiny_checkpoint(root / "m12.tar", 12)
    ck48 = save_tiny_checkpoint(root / "m48.tar", 48)
    out = root / "ix"
    meta = cli("index", "--load", ck12, "--gallery", str(gallery), "--out", str(out), "--device", "cpu",
               "--workers", "0", "--bs", "5")
    return dict(root=root, gallery=gallery, ck12=ck12, ck48=ck48, index=str(out), meta=meta)


def stored_codes(index_dir):
    import faiss
    index = faiss.read_index_binary(os.path.join(index_dir, search.INDEX_FILE))
    packed = faiss.vector_to_array(index.xb).reshape(index.ntotal, -1)
    return np.unpackbits(packed, axis=1, bitorder="little").astype(np.float32) * 2 - 1


def test_index_folder_contents(tiny):
    meta = tiny["meta"]
    assert sorted(os.listdir(tiny["index"])) == ["index.bin", "meta.json"]
    assert not [n for n in os.listdir(tiny["root"]) if n.startswith(".")]  # no temp folders left
    with open(os.path.join(tiny["index"], "meta.json")) as f:
        assert json.load(f) == meta
    assert meta["bits"] == 12 and meta["index_bits"] == 16 and meta["backbone"] == "dfhnet"
    assert meta["image_size"] == 32 and meta["checkpoint"] == os.path.abspath(tiny["ck12"])
    assert meta["identities"] == ["anna"] * 4 + ["bob"] * 4 + ["carl"] * 4
    assert meta["paths"][5] == str(tiny["gallery"] / "train" / "bob" / "1.png")
    # padding bits stay 0 in the stored codes
    assert (stored_codes(tiny["index"])[:, 12:] == -1).all()


def test_flat_folder_gives_the_same_index(tiny):
    out = tiny["root"] / "ix_flat"
    meta = cli("index", "--load", tiny["ck12"], "--gallery", str(tiny["gallery"] / "train"), "--out", str(out),
               "--device", "cpu", "--workers", "0")
    assert meta["split"] is None and meta["paths"] == tiny["meta"]["paths"]
    np.testing.assert_array_equal(stored_codes(str(out)), stored_codes(tiny["index"]))


def test_cli_round_trip_json_sheet_and_radius(tiny, tmp_path):
    gallery_item = str(tiny["gallery"] / "train" / "bob" / "2.png")
    queries = [str(tiny["gallery"] / "test" / "anna" / "q.png"), gallery_item]
    js, sheet = tmp_path / "r.json", tmp_path / "s.png"
    proc = run_script("search.py", "query", "--index", tiny["index"], *queries, "--topk", "5",
                      "--json", str(js), "--sheet", str(sheet), "--device", "cpu", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "query 1/2" in proc.stdout and "identity anna" in proc.stdout
    out = json.loads(js.read_text())
    assert {"index", "checkpoint", "bits", "mode", "topk", "radius", "queries"} <= set(out)
    assert out["mode"] == "topk" and out["topk"] == 5 and out["bits"] == 12
    q0, q1 = out["queries"]
    assert q0["identity"] == "anna" and q1["identity"] == "bob"
    for q in out["queries"]:
        assert len(q["results"]) == 5 and [r["rank"] for r in q["results"]] == [1, 2, 3, 4, 5]
        assert set(q["results"][0]) == {"rank", "distance", "index", "identity", "path"}
    # the gallery image as a query: its own code, so brute force over the stored codes is exact
    codes = stored_codes(tiny["index"])[:, :12]
    own = tiny["meta"]["paths"].index(os.path.abspath(gallery_item))
    d = brute_hamming(codes[own:own + 1], codes)[0]
    order = np.argsort(d, kind="stable")[:5]
    assert [r["index"] for r in q1["results"]] == order.tolist()
    assert [r["distance"] for r in q1["results"]] == d[order].tolist()
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.size[0] > 300
    # --radius: exactly the items within R, in gallery order among ties
    r = int(np.sort(d)[6])
    res = cli("query", "--index", tiny["index"], gallery_item, "--radius", str(r), "--device", "cpu")
    expect = np.argsort(d, kind="stable")
    expect = expect[d[expect] <= r]
    assert res["mode"] == "radius" and [x["index"] for x in res["queries"][0]["results"]] == expect.tolist()


def test_ddh_gallery_paths_and_query_transform(synthetic_root, tmp_path):
    ck = save_tiny_checkpoint(tmp_path / "m.tar", 36, classes=8)
    meta = cli("index", "--load", ck, "--gallery", synthetic_root, "--out", str(tmp_path / "ix"), "--device", "cpu")
    assert meta["layout"] == "ddh" and meta["bits"] == 36 and meta["index_bits"] == 40
    assert meta["paths"][0].endswith("data_batch_1.pkl#0") and meta["paths"][-1].endswith(".pkl#63")
    # a query that is a gallery row saved as PNG encodes to that row's code (same normalisation)
    from data.ddh import DDHSplit
    ds = DDHSplit(synthetic_root, "train")
    png = tmp_path / "q.png"
    Image.fromarray(ds.images[10].permute(1, 2, 0).numpy()).save(png)
    res = cli("query", "--index", str(tmp_path / "ix"), str(png), "--radius", "0", "--device", "cpu",
              "--sheet", str(tmp_path / "s.png"))
    assert 10 in [r["index"] for r in res["queries"][0]["results"]]
    assert os.path.isfile(tmp_path / "s.png")


def test_bad_inputs_exit_2_with_one_line(tiny, tmp_path, capsys):
    q = str(tiny["gallery"] / "test" / "anna" / "q.png")
    ix = tiny["index"]
    assert "no such index folder" in cli_error(capsys, "query", "--index", str(tmp_path / "nope"), q)
    assert "nope.tar: no such checkpoint" in cli_error(
        capsys, "index", "--load", str(tmp_path / "nope.tar"), "--gallery", str(tiny["gallery"]),
        "--out", str(tmp_path / "o"))
    assert "missing.jpg: no such file" in cli_error(capsys, "query", "--index", ix, str(tmp_path / "missing.jpg"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert "bad.jpg: unreadable image" in cli_error(capsys, "query", "--index", ix, str(bad))
    assert "--topk 0" in cli_error(capsys, "query", "--index", ix, q, "--topk", "0")
    assert "--radius -1" in cli_error(capsys, "query", "--index", ix, q, "--radius", "-1")
    err = cli_error(capsys, "query", "--index", ix, q, "--load", tiny["ck48"], "--device", "cpu")
    assert "48-bit model" in err and "12-bit codes" in err
    assert "--gallery" in cli_error(capsys, "index", "--load", tiny["ck12"], "--gallery", str(tmp_path / "g"),
                                    "--out", str(tmp_path / "o"))
    assert "--json" in cli_error(capsys, "query", "--index", ix, q, "--json", str(tmp_path / "no" / "r.json"))
    for flag in ("--json", "--sheet"):  # an existing folder as the output file
        assert f"{flag} {tmp_path}: is a folder; name a file" in cli_error(capsys, "query", "--index", ix, q,
                                                                           flag, str(tmp_path))
    stale = tmp_path / "stale"
    stale.mkdir()
    for name in ("index.bin", "meta.json"):
        (stale / name).write_bytes((tiny["root"] / "ix" / name).read_bytes())
    meta = json.loads((stale / "meta.json").read_text())
    (stale / "meta.json").write_text(json.dumps(dict(meta, checkpoint=str(tmp_path / "gone.tar"))))
    assert "pass --load" in cli_error(capsys, "query", "--index", str(stale), q)
    (stale / "index.bin").write_bytes(b"junk")
    assert "index.bin" in cli_error(capsys, "query", "--index", str(stale), q)
    assert "--split val" in cli_error(capsys, "index", "--load", tiny["ck12"], "--gallery", str(tiny["gallery"]),
                                      "--split", "val", "--out", str(tmp_path / "o"))
    (tmp_path / "notindex").mkdir()
    (tmp_path / "notindex" / "keep.txt").write_text("x")
    assert "not a search index" in cli_error(capsys, "index", "--load", tiny["ck12"], "--gallery",
                                             str(tiny["gallery"]), "--out", str(tmp_path / "notindex"))
    assert (tmp_path / "notindex" / "keep.txt").read_text() == "x"


def test_unreadable_gallery_image_is_skipped_with_a_warning(tiny, tmp_path, capsys):
    gal = tmp_path / "g"
    rng = np.random.default_rng(1)
    for ident in ("x", "y"):
        write_image(str(gal / "train" / ident / "a.png"), rng)
    (gal / "train" / "y" / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    meta = cli("index", "--load", tiny["ck12"], "--gallery", str(gal), "--out", str(tmp_path / "o"),
               "--device", "cpu", "--workers", "0")
    assert "broken.jpg" in capsys.readouterr().err
    assert meta["identities"] == ["x", "y"] and not any("broken" in p for p in meta["paths"])


def test_failed_write_keeps_previous_index(tiny, tmp_path, monkeypatch):
    import faiss
    out = tmp_path / "ix"
    args = ["index", "--load", tiny["ck12"], "--gallery", str(tiny["gallery"]), "--out", str(out),
            "--device", "cpu", "--workers", "0"]
    cli(*args)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}

    def explode(index, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(faiss, "write_index_binary", explode)
    with pytest.raises(SystemExit):
        cli(*args)
    assert sorted(os.listdir(tmp_path)) == ["ix"]
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


@needs_fixtures
@needs_celeba_ddh
def test_seed_checkpoint_codes_match_authors_outputs():
    """The real celeba299-ddh32 test split as a gallery, encoded with the authors'-format checkpoint:
    the packed codes of the first 16 rows are the packed signs of the authors' recorded outputs."""
    from evaluation import load_hashing_model
    ds, identities, paths, info = search.load_gallery(CELEBA_DDH, search.detect_layout(CELEBA_DDH, "test"),
                                                      "test", 32)
    assert len(identities) == len(paths) == len(ds) == 1265 and info["layout"] == "ddh"
    assert paths[0].endswith("test/data_batch_1.pkl#0") and paths[-1].endswith("test/data_batch_1.pkl#1264")
    ref = np.load(os.path.join(FIXTURES, "seed_format_dfhnet12_outputs.npz"))
    with open(os.path.join(CELEBA_DDH, "classes.txt")) as f:
        names = dict(line.split() for line in f if line.strip())
    assert identities[:16] == [names[str(y)] for y in ref["test_labels"].tolist()]  # CelebA ids, not 0..C-1
    model, _, _ = load_hashing_model(os.path.join(FIXTURES, "seed_format_dfhnet12.tar"), torch.device("cpu"))
    batch = [(ds.normalize(ds.images[:16]), ds.labels[:16])]
    packed = search.encode_packed(model, batch, torch.device("cpu"))
    np.testing.assert_array_equal(packed, binary_index.pack_codes(ref["test_real_valued"]))
