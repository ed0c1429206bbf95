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


def make_writable_folder(folder, blocked, failed, create=True):
    """Create ``folder`` (and its parents) and check that a file can be written in it.

    ``blocked`` and ``failed`` start the one-line messages: ``f"{blocked}: X is a file, not a
    folder"`` when a path on the way is a file, ``f"{failed}: <OS reason>"`` when it cannot be
    created or written. ``create`` False (a dry run): nothing is created; the nearest existing
    folder on the way must be writable. Raises: UserInputError.
    """
    blocker = folder
    while blocker and not os.path.exists(blocker):
        blocker = os.path.dirname(blocker)
    if blocker and not os.path.isdir(blocker):
        raise UserInputError(f"{blocked}: {blocker} is a file, not a folder")
    if not create:
        if not os.access(blocker or os.curdir, os.W_OK | os.X_OK):
            raise UserInputError(f"{failed}: {os.strerror(13)}")
        return
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserInputError(f"{failed}: {e.strerror or e}") from None


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


CONFIG_TYPES = {
    # config entry: (type, what is expected); None is taken as absent
    "method": (str, "a method name"),
    "method_args": (dict, "a dict of hyperparameters"),
    "backbone": (str, "a network name"),
    "bits": (int, "a positive integer"),
    "image_size": (int, "a positive integer"),
    "num_classes": (int, "a positive integer"),
    "epochs": (int, "a positive integer"),
    "optimizer": (str, "an optimizer name"),
    "recipe": (dict, "a dict (optimizer, lr, epochs, patience, ...)"),
    "label_map": (list, "a list of identities"),
    "unseen_identities": (list, "a list of identities (those held out of training)"),
}
"""Types of the ``config`` entries the scripts read; a file that breaks them is refused in one line."""

STATE_TYPES = {"epoch": (int, 0), "best_epoch": (int, -1), "best_loss": ((int, float), None)}
"""Types (and least values) of the training-state entries ``--resume`` reads."""


def _check_fields(path, ckpt):
    """Raise UserInputError naming ``path`` and the entry when ``config`` or the training-state
    entries have the wrong type (the file was edited or written by something else)."""
    for key, (kind, low) in STATE_TYPES.items():
        value = ckpt.get(key)
        if value is None:
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, kind) or (low is not None and value < low):
            expected = "a number" if low is None else f"an integer >= {low}"
            raise UserInputError(f"{path}: malformed checkpoint: '{key}' is {value!r}, expected {expected}")
    config = ckpt.get("config")
    if config is None:
        return
    if not isinstance(config, dict):
        raise UserInputError(f"{path}: malformed checkpoint: 'config' is a {type(config).__name__}, expected a "
                             "dict of the run's settings")
    for key, (kind, expected) in CONFIG_TYPES.items():
        value = config.get(key)
        if value is None:
            continue
        bad = isinstance(value, bool) or not isinstance(value, kind)
        if not bad and kind is int and value < 1:
            bad = True
        if bad:
            shown = repr(value) if len(repr(value)) <= 60 else f"a {type(value).__name__}"
            raise UserInputError(f"{path}: malformed checkpoint: config '{key}' is {shown}, expected {expected}")
    patience = (config.get("recipe") or {}).get("patience")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 0):
        raise UserInputError(f"{path}: malformed checkpoint: config 'recipe' patience is {patience!r}, "
                             "expected an integer >= 0")


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with ``weights_only=True`` and check its layout.

    Returns: the checkpoint dict (at least ``backbone`` and ``centers``; for DCDH, the method
    when ``config`` names none, ``centers`` must hold a (C, K) tensor ``centers``).
    Raises: UserInputError when the file is missing, truncated or corrupt, carries anything
    other than tensors and plain values (a code payload is refused and never runs), lacks
    the ``backbone``/``centers`` entries, or holds a malformed ``config`` (not a dict, or an
    entry of ``CONFIG_TYPES`` of another type) or training state (``STATE_TYPES``). A method
    name this code does not know is not an error here: evaluation and search need only the
    network (``--resume`` refuses it when it builds the method).
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
    if not isinstance(ckpt["backbone"], dict):
        raise UserInputError(f"{path}: malformed checkpoint: 'backbone' must hold the network's weights "
                             "(a dict of tensors)")
    _check_fields(path, ckpt)
    config = ckpt.get("config") or {}
    if config.get("method", "dcdh") == "dcdh":  # the authors' files carry no method: DCDH
        centers = ckpt["centers"].get("centers")
        if not isinstance(centers, torch.Tensor) or centers.dim() != 2:
            raise UserInputError(f"{path}: 'centers' must hold a (C, K) tensor named 'centers'")
    return ckpt
