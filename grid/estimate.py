"""Time estimates: training-set size and images/s of this machine, never of another one.

A cell's estimate is ``training images x epochs left / images/s`` plus the mean evaluation time
of the experiment's finished cells that ran here (``OVERHEAD_S`` before one has finished). The
speed is, for the cell's precision (bf16/fp32, as ``--amp`` resolves here) and thread count: the
median images/s logged by the finished cells of the same method that ran on this machine (the
CPU model and capability, or the GPU name, that their metrics.json records), else by those on
the same network, else a few training batches of the network timed here (``time_batches``, once
per network, precision and thread count in a process), else unknown (the device is not on this
machine). Cells recorded on another machine, or before the machine was recorded, are not used.
Early stopping can end a cell sooner; the timed batches leave out data loading and the loss.
"""
import functools
import json
import os
import re
import statistics
import time
from datetime import datetime

TIMED_BATCHES = 3
"""Training batches timed (after one warm-up batch) when no cell has run here yet."""

TIMING_BUDGET_S = 2.0
"""Timing stops after this many seconds of timed batches (at least one batch is timed)."""

CPU_TIMING_BATCH = 32
"""Largest batch timed on the CPU: a CPU's images/s hardly changes above it (DFHNet on 2 AVX2 cores:
30-45 images/s at 16, 32 and 64 alike), and a 256-batch of DFHNet takes 10 s there."""

_TIMED = {}
"""(device, network, image size, batch, precision, threads) -> (images/s, batches, batch) or None:
the timings of this process (a dry run times each network once)."""

OVERHEAD_S = 15.0
"""Start-up and evaluation of a cell before one has been measured (2-core CPU, 32x32 sets)."""

EPOCH_LINE = re.compile(r"\[epoch (\d+)/(\d+)\].*?, ([\d.]+) images/s")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ")


def read_log(log_path):
    """(epoch lines' images/s list, epochs done per the log, training seconds over all attempts).

    Training seconds: for each attempt (from its ``[config]`` line to its last line) the time
    between the first and last time stamp, summed; a killed attempt counts up to its last line.
    What does not parse is skipped, never fatal (a log is a record, not an input): a time stamp
    that is no date (``2026-13-45 99:99:99``), an images/s that is no positive number, a log that
    cannot be read (what was read so far counts).
    """
    speeds, done, seconds = [], 0, 0.0
    if not os.path.isfile(log_path):
        return speeds, done, seconds
    start = last = None
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = STAMP.match(line)
                t = None
                if m:
                    try:
                        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
                    except (ValueError, OverflowError, OSError):
                        pass
                if t is not None:
                    if "[config] dataset" in line:
                        if start is not None:
                            seconds += max(0.0, last - start)
                        start = t
                    last = t
                e = EPOCH_LINE.search(line)
                if e:
                    try:  # a line that does not parse (an absurd number) is skipped, never fatal
                        epoch, speed = int(e.group(1)), float(e.group(3))
                    except ValueError:
                        continue
                    done = epoch
                    if 0 < speed < float("inf"):
                        speeds.append(speed)
    except OSError:
        pass
    if start is not None:
        seconds += max(0.0, last - start)
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


def count_trained_images(exp):
    """Images each seed's cells train on when ``exp`` holds identities out (``unseen_identities``):
    the training split less the held-out identities' images, drawn from each seed as dcdh_train.py
    draws them (``data.unseen.choose_unseen``), from the splits' listings (no image is decoded).
    Returns {seed: int}; {} when nothing is held out or the data cannot be read (the estimate
    then counts the whole training split)."""
    if not exp.unseen_identities:
        return {}
    try:
        from types import SimpleNamespace

        from data.unseen import choose_unseen, image_identities
        # the splits as choose_unseen reads them (their identities), listed without decoding an image
        train, test = (SimpleNamespace(raw_labels=image_identities(exp.dataset, exp.data_root, split))
                       for split in ("train", "test"))
        counts = {}
        for seed in exp.seeds:
            unseen = set(choose_unseen(train, test, exp.unseen_identities, seed))
            counts[seed] = sum(1 for k in train.raw_labels if k not in unseen)
        return counts
    except Exception:  # an estimate must never stop the grid: the run reports data errors itself
        return {}


def this_machine(dev):
    """``utils.device.machine_info`` of device type ``dev`` here, or None when this machine lacks it
    (a CUDA experiment planned on a machine without a GPU)."""
    return _this_machine(dev)


@functools.lru_cache(maxsize=None)
def _this_machine(dev):
    import torch

    from utils.device import machine_info
    if dev == "cuda" and not torch.cuda.is_available():
        return None
    try:
        return machine_info(dev)
    except Exception:  # an estimate must never stop the grid
        return None


def ran_here(record, here):
    """Whether a finished cell's metrics.json dict ``record`` was written on the machine ``here``
    (``this_machine``): the same GPU name, or no GPU and the same CPU model and capability. A
    record without them (written before issue 21) never matches."""
    if not isinstance(record, dict) or not here:
        return False
    if here.get("gpu_name"):
        return record.get("gpu_name") == here["gpu_name"]
    return (record.get("gpu_name") is None and record.get("cpu_model") is not None
            and record.get("cpu_model") == here["cpu_model"] and record.get("cpu_capability") == here["cpu_capability"])


def cell_precision(cell, dev):
    """``"bf16"`` or ``"fp32"``: the precision the trainer would pick for ``cell`` on device type
    ``dev`` of this machine (``utils.device.choose_precision`` of the cell's ``amp``)."""
    import torch

    from methods import METHODS
    from utils.device import choose_precision
    amp = {True: "on", False: "off"}.get(cell.amp, cell.amp)
    allowed = cell.method not in METHODS or "amp" not in METHODS[cell.method].unsupported
    try:
        return choose_precision(amp, torch.device(dev), allowed)[1]
    except ValueError:
        return "fp32"


def _read_record(cell):
    try:
        with open(cell.path("metrics.json")) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    precision, threads = record.get("precision"), record.get("threads")
    if not (precision is None or isinstance(precision, str)) or \
            not (threads is None or (isinstance(threads, int) and not isinstance(threads, bool))):
        return None  # a hand-edited record: its speeds are not used
    return record


def measured(exp):
    """Speeds and evaluation times of the experiment's finished cells that ran on this machine.

    Returns: dict with ``("method", method, precision, threads)`` and ``("net", network, image
    size, precision, threads)`` -> median images/s over their logged epochs; ``eval_s`` (mean
    evaluation seconds of those cells, or None); ``here`` (``this_machine``); ``ran_here`` and
    ``elsewhere``: how many finished cells ran here and how many on another (or an unrecorded)
    machine, whose figures are not used.
    """
    here = this_machine(device_type(exp))
    groups, evals, counts = {}, [], {"ran_here": 0, "elsewhere": 0}
    for cell in exp.cells:
        record = _read_record(cell)
        if record is None:
            continue
        if not ran_here(record, here):
            counts["elsewhere"] += 1
            continue
        counts["ran_here"] += 1
        speeds, _, _ = read_log(cell.path("model.log"))
        precision, threads = record.get("precision"), record.get("threads")
        groups.setdefault(("method", cell.method, precision, threads), []).extend(speeds)
        groups.setdefault(("net", cell.backbone, cell.image_size, precision, threads), []).extend(speeds)
        try:
            evals.append(float(record["eval_s"]))
        except (KeyError, TypeError, ValueError):
            pass
    out = {k: statistics.median(v) for k, v in groups.items() if v}
    out.update(counts, here=here, eval_s=statistics.fmean(evals) if evals else None)
    return out


def device_type(exp):
    """``cpu`` or ``cuda``: the experiment's device, else what the trainer would pick."""
    if exp.device:
        return "cuda" if exp.device.startswith("cuda") else exp.device.split(":")[0]
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def time_batches(backbone, image_size, bits, bs, precision, threads, dev):
    """Images/s of ``backbone``'s training step on device type ``dev`` here: one warm-up batch,
    then up to ``TIMED_BATCHES`` timed ones (fewer once ``TIMING_BUDGET_S`` has passed) of random
    (B, 3, image_size, image_size) float32 images, B = ``bs`` on a GPU and at most
    ``CPU_TIMING_BATCH`` on the CPU, forward in ``precision`` ("bf16": autocast) with ``threads``
    torch threads (restored after), a squared-code loss, backward and an Adam step. The method's
    own loss and the data loading are left out.

    Returns: (images/s float, batches timed int, batch size int).
    Raises: whatever torch raises (out of memory, ...); ``cell_speed`` turns it into "unknown".
    """
    import torch

    from models import build_model
    device = torch.device(dev)
    batch = bs if device.type == "cuda" else min(bs, CPU_TIMING_BATCH)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build_model(backbone, bits).to(device).to(memory_format=torch.channels_last).train()
        optimizer = torch.optim.Adam(model.parameters())
        images = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(
            memory_format=torch.channels_last)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                codes = model(images)
            optimizer.zero_grad(set_to_none=True)
            codes.float().pow(2).mean().backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        step()
        n, start = 0, time.perf_counter()
        while n < TIMED_BATCHES and (n == 0 or time.perf_counter() - start < TIMING_BUDGET_S):
            step()
            n += 1
        return batch * n / (time.perf_counter() - start), n, batch
    finally:
        torch.set_num_threads(before)


def _time_batches_apart(args, timeout=120):
    """``time_batches(*args)`` in a child process; its result, or None when it fails."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from grid.estimate import time_batches; "
            "print(json.dumps(time_batches(*json.loads(sys.argv[2]))))")
    r = subprocess.run([sys.executable, "-c", code, root, json.dumps(list(args))], capture_output=True,
                       text=True, timeout=timeout)
    return tuple(json.loads(r.stdout.strip().splitlines()[-1])) if r.returncode == 0 and r.stdout.strip() else None


def timed_speed(cell, dev, precision):
    """(images/s or None, source) of ``cell``'s network timed here (``time_batches``), once per
    (network, image size, batch, precision, threads) in this process."""
    batch = cell.bs if dev == "cuda" else min(cell.bs, CPU_TIMING_BATCH)
    key = (dev, cell.backbone, cell.image_size, batch, precision, cell.threads)
    if key not in _TIMED:
        args = (cell.backbone, cell.image_size, cell.bits, cell.bs, precision, cell.threads, dev)
        try:
            # on a GPU in a process of its own: the runner must not keep a CUDA context and cached
            # memory for the whole grid (the cells' memory checks, exclusive-process GPUs)
            _TIMED[key] = time_batches(*args) if dev != "cuda" else _time_batches_apart(args)
        except Exception:  # an estimate must never stop the grid: the run reports real errors
            _TIMED[key] = None
    timed = _TIMED[key]
    return (timed[0], "timed here") if timed else (None, "unknown (timing failed)")


def cell_speed(cell, speeds, dev):
    """(images/s or None, where it comes from) for ``cell`` on this machine.

    A finished cell: the median its metrics.json records (``recorded``). Otherwise, for the
    precision and threads the cell would use here: its method's cells that ran here
    (``<method> here``), else its network's (``<network> here``), else ``timed_speed`` (``timed
    here``), else None: ``unknown`` (the device is not on this machine, or the timing failed).
    """
    record = _read_record(cell)
    if record is not None and isinstance(record.get("images_per_s"), (int, float)):
        return record["images_per_s"], "recorded"
    precision = cell_precision(cell, dev)
    for key, source in ((("method", cell.method, precision, cell.threads), f"{cell.method} here"),
                        (("net", cell.backbone, cell.image_size, precision, cell.threads), f"{cell.backbone} here")):
        if key in speeds:
            return speeds[key], source
    if not speeds.get("here") or not cell.image_size:
        return None, "unknown"
    return timed_speed(cell, dev, precision)


def speed_note(speeds):
    """One line saying where the estimates' speeds come from (``measured``'s dict, after
    ``cell_speed`` has run for the cells)."""
    here = speeds.get("here")
    if not here:
        return ("speeds: unknown: this machine lacks the experiment's device, so nothing can be timed here "
                "and no other machine's figures are used")
    machine = here["gpu_name"] or f"{here['cpu_model']} ({here['cpu_capability']})"
    timed = [f"{net} {precision} {threads} thread{'s' if threads != 1 else ''} {t[0]:.0f} images/s "
             f"({t[1]} batch{'es' if t[1] != 1 else ''} of {t[2]})"
             for (dev, net, size, batch, precision, threads), t in _TIMED.items() if t]
    return (f"speeds: of this machine only ({machine}): {speeds.get('ran_here', 0)} finished cell(s) ran here; "
            f"{speeds.get('elsewhere', 0)} ran on another machine or did not record it (not used)"
            + ("; timed here: " + ", ".join(timed) if timed else ""))


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
