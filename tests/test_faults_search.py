"""Hostile inputs to search and the image-folder datasets: decompression bombs, an edited
``meta.json``, a checkpoint that is not the index's model. Each: one line, exit 2 (or a stated
warning where it is legitimate), nothing written."""
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import search
from conftest import search_cli as cli, search_cli_error as cli_error
from data.folder import FaceFolder, load_rgb
from data.gallery_images import GalleryImages
from methods.dcdh import DCDH
from models import build_model
from utils.checkpoint import save_checkpoint
from utils.errors import UserInputError


def write_bomb_png(path, side=20000):
    """A valid 1-bit greyscale PNG of ``side`` x ``side`` pixels (all black): about 50 kB on disk,
    400 million pixels once decoded, more than PIL decodes (2 x ``Image.MAX_IMAGE_PIXELS``)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = (b"\0" * (1 + (side + 7) // 8)) * 1000  # filter byte + packed row, 1000 rows at a time
    z = zlib.compressobj(9)
    body = b"".join(z.compress(rows) for _ in range(side // 1000)) + z.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return str(path)


def save_tiny_checkpoint(path, bits=12, seed=0):
    import torch
    torch.manual_seed(seed)
    save_checkpoint({"backbone": build_model("dfhnet", bits).state_dict(), "centers": DCDH(3, bits).state_dict(),
                     "config": {"backbone": "dfhnet", "bits": bits, "image_size": 32}}, str(path))
    return str(path)


def write_image(path, rng, size=40):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 2-identity image gallery (3 images each), a 12-bit checkpoint, its index, a bomb PNG."""
    root = tmp_path_factory.mktemp("faults_search")
    rng = np.random.default_rng(0)
    for ident in ("ann", "ben"):
        for i in range(3):
            write_image(str(root / "faces" / "train" / ident / f"{i}.png"), rng)
    ckpt = save_tiny_checkpoint(root / "m.tar")
    meta = cli("index", "--load", ckpt, "--gallery", root / "faces", "--out", root / "ix", "--device", "cpu",
               "--workers", "0")
    return dict(root=root, ckpt=ckpt, meta=meta, index=str(root / "ix"), bomb=write_bomb_png(root / "bomb.png"),
                query=str(root / "faces" / "train" / "ben" / "1.png"))


# ------------------------------------------------------------------------------ decompression bombs


def test_bomb_query_is_one_line_naming_the_file(small, capsys):
    err = cli_error(capsys, "query", "--index", small["index"], small["bomb"], "--device", "cpu")
    assert f"{small['bomb']}: image too large to decode safely" in err and "400000000 pixels" in err


def test_bomb_in_an_indexed_gallery_is_refused_before_anything_is_written(small, tmp_path, capsys):
    gallery = tmp_path / "g"
    shutil.copytree(small["root"] / "faces", gallery)
    bomb = shutil.copy(small["bomb"], gallery / "train" / "ann" / "huge.png")
    err = cli_error(capsys, "index", "--load", small["ckpt"], "--gallery", gallery, "--out", tmp_path / "out",
                    "--device", "cpu", "--workers", "0")
    assert f"{bomb}: image too large to decode safely" in err
    assert sorted(os.listdir(tmp_path)) == ["g"]


def test_image_folder_dataset_and_gallery_images_refuse_a_bomb(small, tmp_path, monkeypatch):
    # the training/evaluation datasets read image folders with FaceFolder: an error, not a skipped file
    gallery = tmp_path / "g"
    shutil.copytree(small["root"] / "faces", gallery)
    bomb = str(shutil.copy(small["bomb"], gallery / "train" / "ben" / "huge.png"))
    with pytest.raises(UserInputError, match="huge.png: image too large to decode safely"):
        FaceFolder(str(gallery), "train", 32)
    with pytest.raises(UserInputError, match="huge.png: image too large"):
        GalleryImages()(bomb)
    # PIL's limit is what decides: a 40x40 image is a bomb under a 100-pixel limit (> 2 x 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UserInputError, match=r"1\.png: image too large to decode safely \(Image size \(1600"):
        load_rgb(str(gallery / "train" / "ann" / "1.png"))


# ------------------------------------------------------------------------------ an edited meta.json


def edited_index(small, tmp_path, **changes):
    """A copy of the index whose meta.json has ``changes`` (None deletes the key)."""
    out = tmp_path / "edited"
    shutil.copytree(small["index"], out)
    meta = dict(small["meta"], **changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


@pytest.mark.parametrize("changes, expected", [
    ({"version": 2}, "format version 2, this search.py reads version 1"),
    ({"version": None}, "format version None"),
    ({"bit_order": "big"}, "bit_order 'big', expected 'little'"),
    ({"bits": True}, "bits True: expected a positive integer"),
    ({"bits": 12.5}, "bits 12.5: expected a positive integer"),
    ({"transform": {"kind": "face_test", "image_size": 64}}, "transform image_size 64 differs from image_size 32"),
    ({"transform": {"kind": "ddh", "mean": 120.0, "std": 0}},
     "transform mean 120.0, std 0: expected finite numbers, std > 0"),
    ({"transform": {"kind": "ddh", "mean": 120.0, "std": -3.0}}, "transform mean 120.0, std -3.0"),
    ({"transform": {"kind": "ddh", "mean": float("nan"), "std": 60.0}}, "transform mean nan, std 60.0"),
    ({"transform": {"kind": "ddh", "mean": 120.0, "std": True}}, "transform mean 120.0, std True: expected numbers"),
    ({"transform": {"kind": "ddh", "mean": "126.6", "std": 60.0}}, "transform mean '126.6', std 60.0: expected numbers"),
    ({"transform": {"kind": "sharpen"}}, "transform kind 'sharpen': expected 'face_test' or 'ddh'"),
], ids=["version", "no-version", "bit-order", "bits-bool", "bits-float", "size", "std-0", "std-neg", "mean-nan",
        "std-bool", "mean-str", "kind"])
def test_edited_meta_is_one_line(small, tmp_path, capsys, changes, expected):
    ix = edited_index(small, tmp_path, **changes)
    err = cli_error(capsys, "query", "--index", ix, small["query"], "--device", "cpu", "--json", tmp_path / "r.json")
    assert f"{ix / 'meta.json'}: {expected}" in err and "rebuild the index" in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("changes, expected", [
    ({"num_items": 7}, "(7 num_items, 6 identities, 6 paths, 12 bits)"),
    ({"identities": ["ann"] * 5}, "(6 num_items, 5 identities, 6 paths, 12 bits)"),
    ({"paths": ["x.png"] * 7}, "(6 num_items, 6 identities, 7 paths, 12 bits)"),
], ids=["num_items", "identities", "paths"])
def test_meta_counts_that_differ_from_the_index_are_one_line(small, tmp_path, capsys, changes, expected):
    """6 codes in the faiss index; meta.json's counts must all be 6 (num_items was not checked)."""
    ix = edited_index(small, tmp_path, **changes)
    err = cli_error(capsys, "query", "--index", ix, small["query"], "--device", "cpu")
    assert f"--index {ix}: index.bin (6 codes of 16 bits) does not match meta.json {expected}" in err, err


@pytest.mark.parametrize("changes, expected", [
    ({"paths": 6}, "paths: expected a list of strings, one per indexed image"),
    ({"identities": [1, 2, 3, 4, 5, 6]}, "identities: expected a list of strings, one per indexed image"),
    ({"num_items": "6"}, "num_items '6': expected a count of images"),
], ids=["paths-int", "identities-ints", "num_items-str"])
def test_meta_lists_of_the_wrong_type_are_one_line(small, tmp_path, capsys, changes, expected):
    ix = edited_index(small, tmp_path, **changes)
    err = cli_error(capsys, "query", "--index", ix, small["query"], "--device", "cpu")
    assert f"{ix / 'meta.json'}: {expected}; rebuild the index" in err


# ------------------------------------------------------------------------------ another model


def test_another_model_of_the_same_network_is_refused(small, tmp_path, capsys):
    other = save_tiny_checkpoint(tmp_path / "other.tar", seed=1)  # same network, same code length
    err = cli_error(capsys, "query", "--index", small["index"], small["query"], "--load", other, "--device", "cpu")
    assert f"--load {other}: not the model --index {small['index']} was built with" in err
    assert small["ckpt"] in err


def test_the_same_weights_in_another_file_are_accepted(small, tmp_path, capsys):
    import torch
    state = torch.load(small["ckpt"], weights_only=True)
    copy = tmp_path / "copy.tar"
    save_checkpoint(dict(state, epoch=7), str(copy))  # another file, other training counters, same model
    ref = cli("query", "--index", small["index"], small["query"], "--device", "cpu")
    res = cli("query", "--index", small["index"], small["query"], "--load", copy, "--device", "cpu")
    assert "warning" not in capsys.readouterr().err
    assert res["queries"] == ref["queries"] and res["queries"][0]["results"][0]["distance"] == 0


def test_recorded_checkpoint_retrained_since_is_refused(small, tmp_path, capsys):
    ckpt = shutil.copy(small["ckpt"], tmp_path / "m.tar")
    cli("index", "--load", ckpt, "--gallery", small["root"] / "faces", "--out", tmp_path / "ix", "--device", "cpu",
        "--workers", "0")
    save_tiny_checkpoint(ckpt, seed=2)  # a new run saved under the same name
    err = cli_error(capsys, "query", "--index", tmp_path / "ix", small["query"], "--device", "cpu")
    assert f"its checkpoint {ckpt} has changed since the index was built" in err


def test_index_without_fingerprint_warns_in_one_line(small, tmp_path, capsys):
    ix = edited_index(small, tmp_path, model_sha256=None)
    capsys.readouterr()
    res = cli("query", "--index", ix, small["query"], "--device", "cpu")
    err = capsys.readouterr().err.strip()
    assert err == (f"search.py: warning: --index {ix} records no model fingerprint (built by an older search.py): "
                   f"cannot check that {small['ckpt']} is the model it was built with")
    assert res["queries"][0]["results"][0]["distance"] == 0


def test_fingerprint_covers_weights_and_method_state(small):
    import torch
    state = torch.load(small["ckpt"], weights_only=True)
    base = search.checkpoint_fingerprint(state)
    assert base == small["meta"]["model_sha256"] and len(base) == 64
    assert search.checkpoint_fingerprint(dict(state, epoch=3, optimizer={})) == base  # training counters: no
    for entry in ("backbone", "centers"):
        changed = {k: v.clone() for k, v in state[entry].items()}
        key = next(k for k, v in changed.items() if v.is_floating_point())
        changed[key].view(-1)[0] += 1e-6
        assert search.checkpoint_fingerprint(dict(state, **{entry: changed})) != base
    assert search.checkpoint_fingerprint(dict(state, config={"method": "csq"})) != base
