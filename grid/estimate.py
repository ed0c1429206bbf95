"""Time estimates: training-set size, images/s measured in the cells' logs, a default otherwise.

A cell's estimate is ``training images x epochs left / images/s`` plus the mean evaluation time
of the experiment's finished cells (``OVERHEAD_S`` before one has finished). The speed is the
median images/s logged by the cells of the same method in this experiment, else by any of its
cells on the same network, else a default measured on this project's development machine
(``DEFAULT_SPEED``; DFHNet's for the other 32x32 networks), else unknown. Early stopping can end
a cell sooner: the estimate is an upper bound on the training time.
"""
import json
import os
import re
import statistics
from datetime import datetime

DEFAULT_SPEED = {
    # (network, device type, bf16 autocast): training images/s at batch 256
    ("dfhnet", "cpu", True): 500,    # 2-core CPU with AMX, README "Speed" (502-541 measured)
    ("dfhnet", "cpu", False): 250,   # 2-core CPU, fp32 (235-262 measured)
}
"""Speeds used before any cell of an experiment has logged one (benchmarks/README.md)."""

SMALL_NETWORKS = ("ddhnet", "ddahnet")
"""32x32 networks without a default of their own: DFHNet's is used (on the 2-core CPU, a training
step of DDHNet took about a quarter of DFHNet's, DDAHNet's about the same; measured under load)."""

OVERHEAD_S = 15.0
"""Start-up and evaluation of a cell before one has been measured (2-core CPU, 32x32 sets)."""

EPOCH_LINE = re.compile(r"\[epoch (\d+)/(\d+)\].*?, ([\d.]+) images/s")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ")


def read_log(log_path):
    """(epoch lines' images/s list, epochs done per the log, training seconds over all attempts).

    Training seconds: for each attempt (from its ``[config]`` line to its last line) the time
    between the first and last time stamp, summed; a killed attempt counts up to its last line.
    """
    speeds, done, seconds = [], 0, 0.0
    if not os.path.isfile(log_path):
        return speeds, done, seconds
    start = last = None
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = STAMP.match(line)
            if m:
                t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
                if "[config] dataset" in line:
                    if start is not None:
                        seconds += last - start
                    start = t
                last = t
            e = EPOCH_LINE.search(line)
            if e:
                done = int(e.group(1))
                speeds.append(float(e.group(3)))
    if start is not None:
        seconds += last - start
    return speeds, done, seconds


def count_train_images(dataset, root):
    """Images in the training split (int), or None when they cannot be counted."""
    try:
        from data import DDH_LAYOUT
        if dataset in DDH_LAYOUT:
            from data.ddh import DDHSplit
            return len(DDHSplit(root, "train"))
        from torchvision.datasets.folder import IMG_EXTENSIONS
        n, train = 0, os.path.join(root, "train")
        for entry in os.scandir(train):
            if entry.is_dir():
                n += sum(1 for f in os.scandir(entry.path) if f.name.lower().endswith(IMG_EXTENSIONS))
        return n or None
    except Exception:  # an estimate must never stop the grid: the run reports data errors itself
        return None


def measured(exp):
    """Speeds and evaluation times logged by the experiment's cells so far.

    Returns: dict ``method`` -> median images/s, ``backbone`` -> median images/s (keys prefixed
    ``net:``), and ``eval_s`` (mean evaluation seconds of finished cells, or None).
    """
    by_method, by_net, evals = {}, {}, []
    for cell in exp.cells:
        speeds, _, _ = read_log(cell.path("model.log"))
        by_method.setdefault(cell.method, []).extend(speeds)
        by_net.setdefault(cell.backbone, []).extend(speeds)
        try:
            with open(cell.path("metrics.json")) as f:
                evals.append(float(json.load(f)["eval_s"]))
        except (OSError, ValueError, KeyError):
            pass
    out = {m: statistics.median(v) for m, v in by_method.items() if v}
    out.update({f"net:{n}": statistics.median(v) for n, v in by_net.items() if v})
    out["eval_s"] = statistics.fmean(evals) if evals else None
    return out


def device_type(exp):
    """``cpu`` or ``cuda``: the experiment's device, else what the trainer would pick."""
    if exp.device:
        return "cuda" if exp.device.startswith("cuda") else exp.device.split(":")[0]
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def cell_speed(cell, speeds, dev):
    """(images/s or None, where it comes from) for ``cell``."""
    if cell.method in speeds:
        return speeds[cell.method], f"measured, {cell.method}"
    if f"net:{cell.backbone}" in speeds:
        return speeds[f"net:{cell.backbone}"], f"measured, {cell.backbone}"
    amp = cell.amp == "on" or (cell.amp == "auto" and dev == "cuda")
    if (cell.backbone, dev, amp) in DEFAULT_SPEED:
        return DEFAULT_SPEED[cell.backbone, dev, amp], "default"
    if cell.backbone in SMALL_NETWORKS and ("dfhnet", dev, amp) in DEFAULT_SPEED:
        return DEFAULT_SPEED["dfhnet", dev, amp], "dfhnet's default"
    return None, "unknown"


def cell_estimate(cell, n_images, speeds, dev, epochs_done=0):
    """Seconds left for ``cell`` (None when unknown) and the speed's source."""
    ips, source = cell_speed(cell, speeds, dev)
    if ips is None or n_images is None:
        return None, source
    seconds = n_images * max(cell.epochs - epochs_done, 0) / ips
    overhead = speeds.get("eval_s")
    return seconds + (OVERHEAD_S if overhead is None else overhead), source


def format_duration(seconds):
    """``1h 02min``, ``3min 05s``, ``42s`` or ``unknown``."""
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}min"
    return f"{minutes}min {secs:02d}s" if minutes else f"{secs}s"
