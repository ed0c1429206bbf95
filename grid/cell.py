"""One cell of a grid, in its own process: train (or resume), evaluate, write ``metrics.json``.

    python -m grid.cell CELL_DIR CODE_VERSION

``CELL_DIR/cell.json`` (written by the runner) holds the cell's dcdh_train.py and evaluation.py
arguments. Training runs ``dcdh_train.main`` with them, plus ``--resume`` when the folder holds a
checkpoint of a killed attempt; it is skipped when the checkpoint shows training already ended
(all epochs, or the early-stopping rule), so a kill during evaluation never trains an extra
epoch. The best checkpoint (lowest training loss) is then evaluated by ``evaluation.main``
(test split as queries, train split as database, curves included), and ``metrics.json`` is
written atomically: the cell is finished when that file exists. ``model.last.tar`` (the resume
state, as large as the checkpoint) is then removed; ``model.tar`` and ``model.log`` stay.
The cell runs with the torch thread count of its ``threads`` setting, and its records name no
machine path (paths relative to the output folder) and no host (the CPU/GPU model instead).

A checkpoint the cell cannot continue from (a truncated ``model.last.tar``, a corrupt
``model.tar``, or ``model.tar`` missing while ``model.last.tar`` holds progress) is set aside
(renamed ``<name>.corrupt-N``, never deleted; ``recover_checkpoints``) and the cell fails once
with one line naming it; the next run continues from the last whole checkpoint, or from scratch.
Without ``model.last.tar`` (removed once a cell finished) a ``model.tar`` whose log says training
had ended is evaluated again (a cell whose unusable ``metrics.json`` the runner set aside).

Exit status: 0, or the trainer's or evaluator's (1: non-finite loss, 2: bad input: one line
``grid.cell: error: ...``, as for a checkpoint set aside).
"""
import json
import os
import re
import shlex
import statistics
import sys
import time
from datetime import datetime


def training_finished(last_path):
    """(True if the run saved in ``last_path`` has ended, its state dict)."""
    from utils.checkpoint import load_checkpoint
    state = load_checkpoint(last_path)
    config = state.get("config") or {}
    done, best = int(state.get("epoch", 0)), int(state.get("best_epoch", -1))
    epochs = int(config.get("epochs", 0))
    patience = int((config.get("recipe") or {}).get("patience", epochs))
    return done >= epochs or done - 1 - best > patience, state


def set_aside(path, why):
    """Rename ``path`` to ``<path>.<why>-<n>`` (the first free n >= 1) so that nothing reads it
    again and nothing is lost. Returns the new path. Raises: OSError when it cannot be renamed."""
    n = 1
    while os.path.lexists(f"{path}.{why}-{n}"):
        n += 1
    os.rename(path, f"{path}.{why}-{n}")
    return f"{path}.{why}-{n}"


def log_says_ended(log_path):
    """True when the last training attempt in ``log_path`` (from its last ``[config] dataset``
    line on) logged ``[done]``: training had ended, so its best checkpoint is final."""
    ended = False
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if "[config] dataset" in line:
                    ended = False
                elif re.match(r"\S+ \S+ \[done\] ", line):  # "<date> <time> [done] ..."
                    ended = True
    except OSError:
        return False
    return ended


def _load(path):
    """(state dict, None) for a whole checkpoint; (None, None) when there is none; (None, the
    one-line reason) when its content is unusable (truncated, corrupt, not a checkpoint).
    Raises: UserInputError when it cannot be read at all (permissions): not set aside then."""
    from utils.checkpoint import load_checkpoint
    from utils.errors import UserInputError
    if not os.path.lexists(path):
        return None, None
    if os.path.isdir(path):
        return None, f"{path}: a folder, not a checkpoint file"
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise UserInputError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return load_checkpoint(path), None
    except UserInputError as e:
        return None, str(e)


def recover_checkpoints(best, last, log):
    """Before a cell (re)starts: set aside (``set_aside``, never delete) a checkpoint it cannot
    continue from, so that the next attempt starts from the last whole checkpoint or from scratch.

    * ``last`` (the resume state) unusable, ``best`` whole: ``last`` -> ``.corrupt-N``; the next
      run evaluates ``best`` (the log says training had ended) or resumes from it (its epoch).
    * ``best`` unusable, or missing while ``last`` exists (the best epoch's weights are lost):
      ``best`` -> ``.corrupt-N``, ``last`` -> ``.corrupt-N`` or ``.orphan-N``, ``log`` -> ``.old-N``;
      the next run trains the cell from scratch.

    Returns None when there is nothing to set aside. Raises: UserInputError, one line naming
    the file, what was set aside and what the next run does (the cell fails once, visibly).
    """
    from utils.errors import UserInputError
    last_state, bad_last = _load(last)
    best_state, bad_best = _load(best)
    if not (bad_last or bad_best or (last_state is not None and best_state is None)):
        return
    problem = bad_last or bad_best or (f"{best}: missing, but {os.path.basename(last)} holds training progress "
                                       "(the best epoch's weights are lost)")
    try:
        moved = [set_aside(path, "corrupt") for path, bad in ((last, bad_last), (best, bad_best)) if bad]
        if best_state is not None:
            step = ("the next run evaluates model.tar (training had ended, per model.log)" if log_says_ended(log)
                    else f"the next run resumes from model.tar (epoch {int(best_state.get('epoch', 0))})")
        else:
            if last_state is not None:
                moved.append(set_aside(last, "orphan"))
            if os.path.isfile(log):
                moved.append(set_aside(log, "old"))
            step = "the next run trains the cell from scratch"
    except OSError as e:
        raise UserInputError(f"{problem}; it cannot be set aside ({e.strerror or e}): rename or remove it") from None
    raise UserInputError(f"{problem}; set aside as {', '.join(os.path.basename(p) for p in moved)}; {step}")


def flat_metrics(metrics):
    """``evaluation.main``'s metrics as one flat dict of numbers (results.csv columns): the paper's
    protocol under its own names, the ``--real`` figures prefixed ``real_`` (``real_map``), the
    unseen protocol's suffixed ``_unseen`` (``map_unseen``, ``chance_map_unseen``,
    ``real_map_unseen``); curves left out (``curves``, ``curves_unseen``)."""
    out = {}
    for part, suffix in ((metrics, ""), (metrics.get("unseen") or {}, "_unseen")):
        for key, value in part.items():
            if key == "real":
                out.update({f"real_{k}{suffix}": v for k, v in value.items()})
            elif key not in ("curves", "unseen") and not (suffix and key == "bits"):
                out[key + suffix] = value
    return out


def device_name(device_flag):
    """The device in words: ``cpu (2 threads)`` or ``cuda:0 (NVIDIA H200)``."""
    import torch

    from utils.device import resolve_device
    device = resolve_device(device_flag)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"{device.type} ({threads} thread{'s' if threads != 1 else ''})"


def provenance(spec, config, out_dir):
    """The machine- and path-independent record of how a cell ran, for its metrics.json.

    ``spec``: the cell.json dict (flags already resolved to absolute paths); ``config``: the
    checkpoint's config (``precision``, ``cpu_capability``, ``gpu_name`` since issue 21; older
    checkpoints only hold ``amp``, so the precision follows from it); ``out_dir``: the output folder.
    Returns: dict with ``precision`` ("bf16"/"fp32"), ``threads`` (int), ``cpu_model``,
    ``cpu_capability``, ``gpu_name`` (str or None), ``train_command`` with its paths relative to
    ``out_dir`` (it runs from that folder), and ``paths`` saying so.
    """
    import torch

    from grid.config import portable_flags, relative_path
    from utils.device import machine_info, resolve_device
    machine = machine_info(resolve_device(spec.get("device")))
    amp = config.get("amp")
    precision = config.get("precision") or (None if amp is None else ("bf16" if amp else "fp32"))
    script = relative_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        "dcdh_train.py"), out_dir)
    # the training run's own record (dcdh_train.py's config) first: the machine and threads that
    # trained; this process's (it evaluates) for checkpoints from before those entries
    return {"precision": precision, "threads": config.get("threads") or torch.get_num_threads(),
            "cpu_model": config.get("cpu_model") or machine["cpu_model"],
            "cpu_capability": config.get("cpu_capability") or machine["cpu_capability"],
            "gpu_name": config.get("gpu_name", machine["gpu_name"]),
            "train_command": f"python {script} " + shlex.join(portable_flags(spec["train_flags"], out_dir)),
            "paths": "relative to the experiment's output folder (the folder of results.csv)"}


def run(cell_dir, code_version):
    import torch

    import dcdh_train
    import evaluation
    from grid.config import DEFAULT_THREADS, relative_path, resolve_flags
    from grid.estimate import read_log
    from utils.checkpoint import load_checkpoint

    try:
        with open(os.path.join(cell_dir, "cell.json")) as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        from utils.errors import UserInputError
        raise UserInputError(f"{os.path.join(cell_dir, 'cell.json')}: cannot read the cell's settings ({e})") from None
    # paths in cell.json are relative to the output folder (the cell folder's parent); the thread
    # count is the cell's setting, whatever --jobs is (it changes the trained network's numbers)
    out_dir = os.path.dirname(os.path.abspath(cell_dir))
    spec["train_flags"], spec["eval_flags"] = (resolve_flags(spec[k], out_dir) for k in ("train_flags", "eval_flags"))
    spec["data_root"] = os.path.join(out_dir, spec["data_root"])  # unchanged when absolute (older cell.json)
    torch.set_num_threads(int(spec.get("threads") or DEFAULT_THREADS))
    best, last, log = (os.path.join(cell_dir, n) for n in ("model.tar", "model.last.tar", "model.log"))
    recover_checkpoints(best, last, log)
    finished, state = training_finished(last) if os.path.isfile(last) else (False, None)
    if not finished and state is None and os.path.isfile(best) and log_says_ended(log):
        finished, state = True, load_checkpoint(best)  # e.g. an unusable metrics.json set aside: evaluate again
    if not finished:
        resume = os.path.isfile(last) or os.path.isfile(best)
        if not resume and os.path.isfile(log) and os.path.getsize(log):  # a fresh log for a fresh run
            try:  # (an earlier attempt's log, whole, cut mid-line or garbled: never appended to)
                kept = set_aside(log, "old")
            except OSError as e:
                from utils.errors import UserInputError
                raise UserInputError(f"{log}: no checkpoint is left of the run it records, and it cannot be set "
                                     f"aside ({e.strerror or e}): rename or remove it") from None
            print(f"[cell] {spec['cell']}: no checkpoint is left of the run model.log records; the log is "
                  f"kept as {os.path.basename(kept)} and the cell trains from scratch", flush=True)
        flags = spec["train_flags"] + (["--resume"] if resume else [])
        print(f"[cell] {spec['cell']}: {'resuming' if resume else 'training'}: python dcdh_train.py "
              + shlex.join(flags), flush=True)
        dcdh_train.main(dcdh_train.get_args_parser().parse_args(flags))
        state = load_checkpoint(last if os.path.isfile(last) else best)  # best: it had nothing left to train
    else:
        print(f"[cell] {spec['cell']}: training had ended; evaluating", flush=True)
    start = time.time()
    metrics = evaluation.main(evaluation.get_args_parser().parse_args(["--load", best] + spec["eval_flags"]))
    eval_s = time.time() - start
    speeds, logged, train_s = read_log(log)
    config = state.get("config") or {}
    # model.tar's epoch is its best one; without model.last.tar the log counts the epochs run
    epochs_run = int(state["epoch"]) if os.path.isfile(last) else max(int(state["epoch"]), logged)
    summary = {
        "experiment": spec["experiment"], "cell": spec["cell"], "method": spec["method"],
        "bits": spec["bits"], "seed": spec["seed"], "dataset": spec["dataset"],
        "data_root": relative_path(spec["data_root"], out_dir),
        "metrics": flat_metrics(metrics),
        "curves": metrics["curves"],
        **({"curves_unseen": metrics["unseen"]["curves"]} if "unseen" in metrics else {}),
        "epochs": config.get("epochs"), "epochs_run": epochs_run,
        "best_epoch": int(state["best_epoch"]) + 1, "best_loss": float(state["best_loss"]),
        "backbone": config.get("backbone"), "image_size": config.get("image_size"), "amp": config.get("amp"),
        "method_args": config.get("method_args"), "recipe": config.get("recipe"),
        "train_s": round(train_s, 1), "eval_s": round(eval_s, 1), "wall_s": round(train_s + eval_s, 1),
        "images_per_s": round(statistics.median(speeds), 1) if speeds else None,
        "device": device_name(spec.get("device")), "code_version": code_version,
        "finished": datetime.now().isoformat(timespec="seconds"),
        **provenance(spec, config, out_dir),
    }
    evaluation.write_json(summary, os.path.join(cell_dir, "metrics.json"))
    if os.path.isfile(last):  # the resume state is no longer needed; model.tar (the best epoch) stays
        os.unlink(last)
    print(f"[cell] {spec['cell']}: finished; metrics in {os.path.join(cell_dir, 'metrics.json')}", flush=True)


def main(argv):
    """``python -m grid.cell CELL_DIR CODE_VERSION`` (``argv`` without the program): ``run``, with
    a UserInputError printed as one line ``grid.cell: error: ...`` and exit status 2."""
    if len(argv) != 2:
        sys.exit("usage: python -m grid.cell CELL_DIR CODE_VERSION")
    from utils.errors import exit_on_user_error
    exit_on_user_error("grid.cell")(run)(*argv)


if __name__ == "__main__":
    main(sys.argv[1:])
