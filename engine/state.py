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
import shutil

import torch

from utils.checkpoint import atomic_write, load_checkpoint, make_writable_folder
from utils.errors import UserInputError

MUST_MATCH = ("method", "method_args", "backbone", "bits", "unseen_identities", "num_classes", "image_size",
              "optimizer")
"""Config entries a resumed run must share with the checkpoint it continues (held-out identities
before the class count, which follows from them, so that the message names the cause)."""


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


def best_model_file(best_path, resume_path, best_loss, best_epoch):
    """The file that holds a resumed run's best model: the state saved after its best epoch
    (``epoch == best_epoch + 1`` with the same ``best_epoch`` and ``best_loss``), looked for in
    ``best_path`` (this run's --save), ``resume_path`` and, for a ``<name>.last.tar``, its
    ``<name>.tar``. Returns the first such path, or None (none found, or no epoch done yet).
    Unreadable candidates are passed over."""
    if best_epoch < 0:
        return None
    stem, ext = os.path.splitext(resume_path)
    sibling = stem[:-len(".last")] + ext if stem.endswith(".last") else None
    for path in (best_path, resume_path, sibling):
        if not path or not os.path.isfile(path):
            continue
        try:
            state = load_checkpoint(path)
        except UserInputError:
            continue
        if (state.get("epoch") == best_epoch + 1 and state.get("best_epoch") == best_epoch
                and state.get("best_loss") == best_loss):
            return path
    return None


def carry_best_model(best_path, resume_path, best_loss, best_epoch):
    """Make ``best_path`` hold the resumed run's best model when it does not already: a resume
    under another name (``--save new.tar --resume other.last.tar``) copies it there (atomically),
    so that ``best_path`` is the model whether or not a later epoch improves on it.

    Returns: (path that held the best model or None when no file holds it, whether it was copied).
    """
    holder = best_model_file(best_path, resume_path, best_loss, best_epoch)
    if holder is None or os.path.abspath(holder) == os.path.abspath(best_path):
        return holder, False
    with open(holder, "rb") as src:
        atomic_write(best_path, lambda f: shutil.copyfileobj(src, f))
    return holder, True


def epoch_state(model, method, optimizer, epoch, best_loss, best_epoch, config):
    """The dict saved after ``epoch`` (1-based count of epochs done); ``rng`` is the CPU random
    state, ``cuda_rng`` the CUDA one (one per device; empty without CUDA)."""
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"backbone": model.state_dict(), "centers": method.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": epoch, "best_loss": best_loss,
            "best_epoch": best_epoch, "rng": torch.get_rng_state(), "cuda_rng": cuda_rng, "config": config}


def data_mismatch(old, new):
    """Why a checkpoint's training data (its ``config`` ``old``) are not this run's (``new``), as
    a str, or None: another layout (DDH pickles for ``--dataset`` ddh/facescrub/youtube, an image
    folder for folder/vggface2) or other identities (``label_map``, class index -> identity: the
    class centers and codebooks belong to those identities). Entries a file lacks are not compared."""
    from data import DDH_LAYOUT

    def layout(name):
        return "DDH-layout pickles" if name in DDH_LAYOUT else "an image folder"
    if old.get("dataset") is not None and layout(old["dataset"]) != layout(new["dataset"]):
        return (f"it was trained on {layout(old['dataset'])} (--dataset {old['dataset']}), this run reads "
                f"{layout(new['dataset'])} (--dataset {new['dataset']})")
    if old.get("label_map") is not None and list(old["label_map"]) != list(new["label_map"]):
        others = len(set(map(repr, old["label_map"])) - set(map(repr, new["label_map"])))
        return (f"it was trained on other identities ({others} of its {len(old['label_map'])} are not among "
                "this run's)" if others else
                "its identities are this run's in another order (class indices would change meaning)")
    return None


def restore(path, model, method, optimizer, config, best_path):
    """Load the run saved in ``path`` into ``model``, ``method`` and ``optimizer``.

    The fused-optimizer flag of this build is kept (a file from an older, unfused version would
    otherwise switch it off). A best file with a lower best loss than ``path`` (a kill between
    the two saves) supplies the best loss and epoch. The CPU random state and, when the file has
    it and the devices match, the CUDA ones are restored.

    Returns: (epochs done, best loss, best epoch (0-based, -1 if none)).
    Raises: UserInputError when the file holds no training state or another run's setup
    (method, its hyperparameters, network, code length, identities, input size, optimizer), or
    was trained on other data (``data_mismatch``: another layout or other identities).
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
    old.setdefault("unseen_identities", [])  # files from before --unseen-identities held none out
    for key in MUST_MATCH:
        if old.get(key) != config[key]:
            if key == "method_args":
                changed = sorted(k for k in set(old[key]) | set(config[key]) if old[key].get(k) != config[key].get(k))
                raise UserInputError(f"--resume {path}: its method hyperparameters differ from this run's ("
                                     + ", ".join(f"{k} {old[key].get(k)!r} vs {config[key].get(k)!r}" for k in changed)
                                     + "); resume with the same --method-args or start a new run")
            if key == "unseen_identities":
                raise UserInputError(f"--resume {path}: it holds out other identities ({len(old[key])}) than this "
                                     f"run ({len(config[key])}; --unseen-identities and --seed choose them); "
                                     "resume with the same flags or start a new run")
            raise UserInputError(f"--resume {path}: its {key} is {old.get(key)!r}, this run's is {config[key]!r}")
    other_data = data_mismatch(old, config)
    if other_data:
        raise UserInputError(f"--resume {path}: {other_data}; resume on the data it was trained on or start a new run")
    # the precision may change on resume (another machine: --amp auto is bf16 on one CPU, fp32 on
    # another); the record keeps every precision the run used, in order: "bf16+fp32"
    was = old.get("precision") or ("bf16" if old.get("amp") else "fp32")
    if was.split("+")[-1] != config["precision"]:
        config["precision"] = f"{was}+{config['precision']}"
    else:
        config["precision"] = was
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

