"""Checkpoints in the authors' format, written atomically and read safely.

Format (docs/design.md): ``torch.save`` of a dict with ``backbone`` (network state_dict) and
``centers`` (the method's state_dict; for DCDH one entry ``centers`` of shape (C, K)) — the
authors' ``dcdh_<dataset><bits>.tar`` files — plus, when written by this project, ``optimizer``,
``epoch`` (epochs completed), ``best_loss``, ``best_epoch``, ``rng`` and ``config`` (plain
types only: method, method_args, backbone, bits, image_size, dataset, num_classes, label_map,
recipe). A file whose config names no method is a DCDH checkpoint.
"""
import os
import pickle
import re
import tempfile

import torch

from .errors import UserInputError

DEFAULT_DIR = "checkpoint"
"""Where the authors' scripts read and write checkpoints (``./checkpoint``)."""


def atomic_write(path, write):
    """Call ``write(fileobj)`` on a temporary file in ``path``'s folder, fsync, then rename.

    A crash or kill at any moment leaves either the old ``path`` or the new one, never a
    partial file. Raises OSError when the folder is not writable (the temporary file is removed).
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions of a new file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_checkpoint(state, path):
    """Atomically ``torch.save`` the dict ``state`` to ``path`` (see ``atomic_write``)."""
    atomic_write(path, lambda f: torch.save(state, f))


def resolve_checkpoint(name, directory=DEFAULT_DIR):
    """Find ``--load name``: a path as given, else ``directory/name`` (the authors' convention).

    Raises: UserInputError naming both places when neither is a file.
    """
    candidates = [name] if os.path.isabs(name) else [name, os.path.join(directory, name)]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise UserInputError(f"--load {name}: no such checkpoint (looked for "
                         + " and ".join(repr(c) for c in candidates) + ")")


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with ``weights_only=True`` and check its layout.

    Returns: the checkpoint dict (at least ``backbone`` and ``centers``; for DCDH, the method
    when ``config`` names none, ``centers`` must hold a (C, K) tensor ``centers``).
    Raises: UserInputError when the file is missing, truncated or corrupt, carries anything
    other than tensors and plain values (a code payload is refused and never runs), or lacks
    the ``backbone``/``centers`` entries.
    """
    if not os.path.isfile(path):
        raise UserInputError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise UserInputError(f"{path}: empty file, not a checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
        if found:
            raise UserInputError(f"{path}: refused to load: it carries the Python object {found.group(1)} "
                                 "(only tensors and plain values are loaded; nothing was run)") from None
        raise UserInputError(f"{path}: not a checkpoint (unrecognised or corrupt content)") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        if isinstance(e, (PermissionError, IsADirectoryError)):
            raise UserInputError(f"{path}: cannot read ({e.strerror or e})") from None
        raise UserInputError(f"{path}: not a readable checkpoint (truncated or corrupt; "
                             f"{type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "backbone" not in ckpt or "centers" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserInputError(f"{path}: not a DCDH checkpoint (expected keys 'backbone' and 'centers', got {keys})")
    if not isinstance(ckpt["centers"], dict):
        raise UserInputError(f"{path}: 'centers' must hold the method's state (a dict of tensors)")
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    if config.get("method", "dcdh") == "dcdh":  # the authors' files carry no method: DCDH
        centers = ckpt["centers"].get("centers")
        if not isinstance(centers, torch.Tensor) or centers.dim() != 2:
            raise UserInputError(f"{path}: 'centers' must hold a (C, K) tensor named 'centers'")
    return ckpt
