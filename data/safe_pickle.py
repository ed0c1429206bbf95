"""A restricted unpickler for the DDH data files: numpy arrays and plain Python values only.

Pickle can run arbitrary code. The DDH files (FaceScrub, YouTube Faces) are pickled
``(data, label)`` tuples written by Python 2; this unpickler resolves only the handful of
globals needed to rebuild numpy arrays, so a file carrying any other global (a code
payload such as ``os.system``) is refused before anything runs.
"""
import codecs
import pickle

import numpy as np

_ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _multiarray._reconstruct
    _ALLOWED[(_mod, "scalar")] = _multiarray.scalar
try:  # protocol-5 pickles of arrays (numpy >= 1.16 writes them with _frombuffer)
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.numeric import _frombuffer
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = _frombuffer
for _mod in ("__builtin__", "builtins"):  # protocol 2 writes empty bytes as __builtin__.bytes()
    _ALLOWED[(_mod, "bytes")] = bytes


def _latin1_encode(text, encoding="latin1"):
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, 'latin1').
    if encoding not in ("latin1", "latin-1"):
        raise DisallowedGlobal(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


_ALLOWED[("_codecs", "encode")] = _latin1_encode


class DisallowedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the numpy-array allow-list; nothing was run."""


class ArrayOnlyUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that admits numpy arrays, dtypes and builtin containers only."""

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DisallowedGlobal(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed") from None


def load_arrays(path):
    """Unpickle ``path`` with ``ArrayOnlyUnpickler`` (``encoding='bytes'`` for Python 2 files).

    Returns: the unpickled object (for DDH files a tuple ``(data, label)``).
    Raises: DisallowedGlobal (a global outside the allow-list), pickle.UnpicklingError (corrupt stream), EOFError, OSError.
    """
    with open(path, "rb") as f:
        return ArrayOnlyUnpickler(f, encoding="bytes").load()
