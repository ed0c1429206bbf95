"""utils/contact_sheet.py (drawing, with an injected image loader) and data/gallery_images.py."""
import pickle

import numpy as np
import pytest
from PIL import Image

from data.gallery_images import GalleryImages
from utils.contact_sheet import write_sheet
from utils.errors import UserInputError


def test_sheet_uses_the_loader_and_shows_missing_results_gray(tmp_path):
    seen = []

    def load(path):
        seen.append(path)
        if path == "gone.png":
            raise UserInputError("gone.png: no such file")
        return np.zeros((8, 8, 3), np.uint8)

    queries = [{"image": "/q/alice/1.png", "identity": "alice",
                "results": [{"path": "a.png", "identity": "alice", "distance": 0},
                            {"path": "gone.png", "identity": "bob", "distance": 3},
                            {"path": "c.png", "identity": "bob", "distance": 4}]}]
    out = tmp_path / "sheet.png"
    write_sheet(queries, str(out), load, max_results=2)
    assert seen == ["/q/alice/1.png", "a.png", "gone.png"]      # beyond max_results: not loaded
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]


def test_a_query_image_error_is_not_hidden(tmp_path):
    def load(path):
        raise UserInputError(f"{path}: no such file")

    with pytest.raises(UserInputError):
        write_sheet([{"image": "q.png", "identity": None, "results": []}], str(tmp_path / "s.png"), load)


def test_gallery_images_reads_image_files_and_ddh_rows(tmp_path):
    img = tmp_path / "face.png"
    Image.fromarray(np.full((5, 4, 3), 7, np.uint8)).save(img)
    rows = np.arange(2 * 3072).reshape(2, 3072)
    pkl = tmp_path / "part.pkl"
    with open(pkl, "wb") as f:
        pickle.dump((rows.astype(np.uint8), np.array([0, 1])), f)
    wide = tmp_path / "wide.pkl"
    with open(wide, "wb") as f:
        pickle.dump((rows.astype(np.float32), np.array([0, 1])), f)
    load = GalleryImages()
    assert load(str(img)).shape == (5, 4, 3)
    x = load(f"{pkl}#1")
    assert x.dtype == np.uint8 and x.shape == (32, 32, 3)
    np.testing.assert_array_equal(x, rows[1].astype(np.uint8).reshape(3, 32, 32).transpose(1, 2, 0))
    y = load(f"{wide}#0")                                  # other dtypes stretched to 0..255
    assert y.dtype == np.uint8 and y.min() == 0 and y.max() == 255
    with pytest.raises(UserInputError):
        load(str(tmp_path / "moved.png"))
    # an edited index's paths: rows the file does not have, a file that is no DDH file (these
    # raised IndexError/ValueError through search.py query --sheet; -1 silently showed the last row)
    for row in ("2", "99999", "-1", "abc", "1e3", "", "\u00b2", "\u0661"):  # isdigit(): "²" (int() refuses it), Arabic-Indic 1 (int() reads 1)
        with pytest.raises(UserInputError, match=rf"part.pkl#{row}: no such row \(the file has 2\)"):
            load(f"{pkl}#{row}")
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle")
    odd = tmp_path / "odd.pkl"
    with open(odd, "wb") as f:
        pickle.dump((np.zeros((2, 10), np.uint8), np.array([0, 1])), f)
    for bad in (garbage, odd, tmp_path / "gone.pkl"):
        with pytest.raises(UserInputError, match=rf"{bad}: not a DDH-layout file \("):
            load(f"{bad}#0")
