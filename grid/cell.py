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

Exit status: 0, or the trainer's or evaluator's (1: non-finite loss, 2: bad input).
"""
import json
import os
import platform
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


def device_name(device_flag):
    """The device in words: ``cpu (2 threads)`` or ``cuda:0 (NVIDIA H200)``."""
    import torch

    from utils.device import resolve_device
    device = resolve_device(device_flag)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"{device.type} ({threads} thread{'s' if threads != 1 else ''})"


def run(cell_dir, code_version):
    import dcdh_train
    import evaluation
    from grid.estimate import read_log
    from utils.checkpoint import load_checkpoint

    with open(os.path.join(cell_dir, "cell.json")) as f:
        spec = json.load(f)
    best, last, log = (os.path.join(cell_dir, n) for n in ("model.tar", "model.last.tar", "model.log"))
    finished, state = training_finished(last) if os.path.isfile(last) else (False, None)
    if not finished:
        resume = os.path.isfile(last) or os.path.isfile(best)
        flags = spec["train_flags"] + (["--resume"] if resume else [])
        print(f"[cell] {spec['cell']}: {'resuming' if resume else 'training'}: python dcdh_train.py "
              + shlex.join(flags), flush=True)
        dcdh_train.main(dcdh_train.get_args_parser().parse_args(flags))
        state = load_checkpoint(last)
    else:
        print(f"[cell] {spec['cell']}: training had ended ({state['epoch']} epochs); evaluating", flush=True)
    start = time.time()
    metrics = evaluation.main(evaluation.get_args_parser().parse_args(["--load", best] + spec["eval_flags"]))
    eval_s = time.time() - start
    speeds, _, train_s = read_log(log)
    config = state.get("config") or {}
    summary = {
        "experiment": spec["experiment"], "cell": spec["cell"], "method": spec["method"],
        "bits": spec["bits"], "seed": spec["seed"], "dataset": spec["dataset"], "data_root": spec["data_root"],
        "metrics": {k: v for k, v in metrics.items() if k != "curves"},
        "curves": metrics["curves"],
        "epochs": config.get("epochs"), "epochs_run": int(state["epoch"]),
        "best_epoch": int(state["best_epoch"]) + 1, "best_loss": float(state["best_loss"]),
        "backbone": config.get("backbone"), "image_size": config.get("image_size"), "amp": config.get("amp"),
        "method_args": config.get("method_args"), "recipe": config.get("recipe"),
        "train_s": round(train_s, 1), "eval_s": round(eval_s, 1), "wall_s": round(train_s + eval_s, 1),
        "images_per_s": round(statistics.median(speeds), 1) if speeds else None,
        "device": device_name(spec.get("device")), "host": platform.node(), "code_version": code_version,
        "finished": datetime.now().isoformat(timespec="seconds"),
        "train_command": "python dcdh_train.py " + shlex.join(spec["train_flags"]),
    }
    evaluation.write_json(summary, os.path.join(cell_dir, "metrics.json"))
    if os.path.isfile(last):  # the resume state is no longer needed; model.tar (the best epoch) stays
        os.unlink(last)
    print(f"[cell] {spec['cell']}: finished; metrics in {os.path.join(cell_dir, 'metrics.json')}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m grid.cell CELL_DIR CODE_VERSION")
    run(sys.argv[1], sys.argv[2])
