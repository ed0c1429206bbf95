"""Pictures of gallery items for display (the search contact sheet).

A gallery path is an image file or a DDH row named ``/abs/file.pkl#row`` (how ``search.py``
names the rows of DDH-layout galleries). ``GalleryImages`` turns either into an RGB uint8 array.
"""
import numpy as np

from utils.errors import UserInputError

from .folder import open_image
from .safe_pickle import load_arrays


class GalleryImages:
    """Callable ``path -> (H, W, 3) uint8 array``; each DDH file is read once and kept.

    Raises: UserInputError (from ``data.folder.open_image``) for an image file that is missing
    or unreadable or too large for PIL to decode (a decompression bomb); UserInputError for a
    DDH file that cannot be read as one, or a row it does not have (``#-1``, ``#abc``, past its end).
    """

    def __init__(self):
        self._files = {}

    def __call__(self, path):
        if "#" in path and path.rsplit("#", 1)[0].endswith(".pkl"):
            return self._ddh_row(*path.rsplit("#", 1))
        return np.asarray(open_image(path))

    def _ddh_row(self, file, row):
        if file not in self._files:
            try:
                data = np.asarray(load_arrays(file)[0])
                if data.ndim < 2 or int(np.prod(data.shape[1:])) != 3 * 32 * 32:
                    raise ValueError(f"rows of shape {data.shape[1:]}, expected 3x32x32 = 3072 values")
            except Exception as e:  # a moved, foreign or corrupt file: the caller shows a placeholder
                raise UserInputError(f"{file}: not a DDH-layout file ({type(e).__name__}: {e})") from None
            self._files[file] = data
        if not (row.isascii() and row.isdigit() and int(row) < len(self._files[file])):  # not "²" or "١"
            raise UserInputError(f"{file}#{row}: no such row (the file has {len(self._files[file])})")
        x = self._files[file][int(row)].reshape(3, 32, 32).transpose(1, 2, 0)
        if x.dtype != np.uint8:   # stretch other dtypes to 0..255 for display
            x = np.clip((x - x.min()) / max(float(x.max() - x.min()), 1e-12) * 255, 0, 255).astype(np.uint8)
        return x
