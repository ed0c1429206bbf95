"""Where a run writes, what an epoch saves, and how ``--resume`` restores it.

Two files per run: the best checkpoint (lowest epoch training loss, the authors' rule; never
chosen by test metrics) and ``<name>.last.tar`` with the latest epoch for ``--resume``. Both
hold the network (``backbone``), the method's state (``centers``: class centers, codebooks,
memory banks), the optimizer, the epoch counters, the CPU and CUDA random states and the run's
``config``.
"""
import glob
import math
import os

import torch

from utils.checkpoint import load_checkpoint, make_writable_folder
from utils.errors import UserInputError

MUST_MATCH = ("method", "method_args", "backbone", "bits", "num_classes", "image_size", "optimizer")
"""Config entries a resumed run must share with the checkpoint it continues."""


def output_paths(save, checkpoint_dir):
    """(best checkpoint path, last-state path, log path) for ``--save save``.

    ``save`` is a name under ``checkpoint_dir`` or, when it contains a folder, a path. The folder
    is created; temporary files of a run killed while saving are removed.
    Raises: UserInputError when the folder cannot be written or a target is a folder.
    """
    path = save if os.path.dirname(save) else os.path.join(checkpoint_dir, save)
    folder = os.path.dirname(os.path.abspath(path))
    make_writable_folder(folder, f"cannot write checkpoints to {folder}", f"cannot write checkpoints to {folder}")
    stem, ext = os.path.splitext(path)
    last = f"{stem}.last{ext or '.tar'}"
    for target in (path, last, f"{stem}.log"):
        if os.path.isdir(target):
            raise UserInputError(f"--save: {target} is a folder; name a checkpoint file")
    for target in (path, last):  # temporary files of a run killed while saving
        for stale in glob.glob(os.path.join(folder, "." + glob.escape(os.path.basename(target)) + ".*.tmp")):
            os.unlink(stale)
    return path, last, f"{stem}.log"


def find_resume(resume, best_path, last_path):
    """The file ``--resume [PATH]`` continues from, or None when not resuming.

    ``resume`` "auto" (the flag without a path) takes the last-state file, or the best file when
    the run was killed before its first last-save. Raises: UserInputError if the file is missing.
    """
    if resume is None:
        return None
    path = resume
    if resume == "auto":
        path = last_path if os.path.isfile(last_path) or not os.path.isfile(best_path) else best_path
    if not os.path.isfile(path):
        raise UserInputError(f"--resume: no such checkpoint {path}")
    return path


def epoch_state(model, method, optimizer, epoch, best_loss, best_epoch, config):
    """The dict saved after ``epoch`` (1-based count of epochs done); ``rng`` is the CPU random
    state, ``cuda_rng`` the CUDA one (one per device; empty without CUDA)."""
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"backbone": model.state_dict(), "centers": method.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": epoch, "best_loss": best_loss,
            "best_epoch": best_epoch, "rng": torch.get_rng_state(), "cuda_rng": cuda_rng, "config": config}


def restore(path, model, method, optimizer, config, best_path):
    """Load the run saved in ``path`` into ``model``, ``method`` and ``optimizer``.

    The fused-optimizer flag of this build is kept (a file from an older, unfused version would
    otherwise switch it off). A best file with a lower best loss than ``path`` (a kill between
    the two saves) supplies the best loss and epoch. The CPU random state and, when the file has
    it and the devices match, the CUDA ones are restored.

    Returns: (epochs done, best loss, best epoch (0-based, -1 if none)).
    Raises: UserInputError when the file holds no training state or another run's setup
    (method, its hyperparameters, network, code length, identities, input size, optimizer).
    """
    state = load_checkpoint(path)
    old = dict(state.get("config") or {})
    if "epoch" not in state or not old:
        raise UserInputError(f"--resume {path}: holds no training state (epoch, optimizer, config); "
                             "only checkpoints written by dcdh_train.py can be resumed")
    old.setdefault("method", "dcdh")  # files from before the method registry
    if "method_args" not in old:  # files from before the method registry: DCDH with the authors' flags
        old["method_args"] = {k: old[k] for k in config["method_args"] if k in old} or config["method_args"]
        old["method_args"] = {**config["method_args"], **old["method_args"]}
    elif old.get("method") == config["method"]:
        # a hyperparameter added to the method after the file was written: the file's run used
        # what is now its default
        old["method_args"] = {**{k: h.default for k, h in type(method).hyperparameters.items()
                                 if k not in old["method_args"]}, **old["method_args"]}
    old.setdefault("optimizer", config["optimizer"])
    for key in MUST_MATCH:
        if old.get(key) != config[key]:
            if key == "method_args":
                changed = sorted(k for k in set(old[key]) | set(config[key]) if old[key].get(k) != config[key].get(k))
                raise UserInputError(f"--resume {path}: its method hyperparameters differ from this run's ("
                                     + ", ".join(f"{k} {old[key].get(k)!r} vs {config[key].get(k)!r}" for k in changed)
                                     + "); resume with the same --method-args or start a new run")
            raise UserInputError(f"--resume {path}: its {key} is {old.get(key)!r}, this run's is {config[key]!r}")
    model.load_state_dict(state["backbone"])
    try:
        method.load_state_dict(state["centers"])
    except RuntimeError as e:
        raise UserInputError(f"--resume {path}: the method state does not fit ({str(e).splitlines()[0]})") from None
    if "optimizer" in state:
        saved = state["optimizer"]
        for group in saved.get("param_groups", []):  # the saved flags would win: keep fused
            group["fused"], group["foreach"] = True, None
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError, TypeError) as e:
            raise UserInputError(f"--resume {path}: its optimizer state does not fit this run's optimizer "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e})") from None
    done = int(state.get("epoch", 0))
    best_loss = float(state.get("best_loss", math.inf))
    best_epoch = int(state.get("best_epoch", -1))
    if "rng" in state:
        torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if os.path.isfile(best_path) and os.path.abspath(best_path) != os.path.abspath(path):
        best_state = load_checkpoint(best_path)
        if float(best_state.get("best_loss", math.inf)) < best_loss:
            best_loss, best_epoch = float(best_state["best_loss"]), int(best_state["best_epoch"])
    return done, best_loss, best_epoch

