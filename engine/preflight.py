"""Pre-flight: will the method's memory for C identities fit the device? Checked before training.

A method's own memory grows with the number of identities C (class centers, codebooks, B x C
scores) or with the training set N (memory banks, B x N pair terms); ``memory_estimate`` of the
method class gives the bytes for one step. ``check_memory`` compares it with what the device has
free and refuses in one line, before the network is built and before any file is written.

``DCDH_MEMORY_LIMIT_BYTES`` (environment): when set, the available memory is taken as this many
bytes (or less, when the device has less). A knob for tests and for clusters whose job limit is
below what the machine reports (a cgroup limit is also read, see ``available_memory``).
"""
import os

import torch

from utils.errors import UserInputError

LIMIT_ENV = "DCDH_MEMORY_LIMIT_BYTES"


def _meminfo_available():
    """MemAvailable from /proc/meminfo in bytes, or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room():
    """Bytes left under this process's cgroup (v2 or v1) memory limit, or None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                text = f.read().strip()
            if text == "max":
                return None
            limit = int(text)
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit >= 2 ** 60:  # v1 reports "no limit" as a huge number
            return None
        return max(limit - usage, 0)
    return None


def available_memory(device):
    """Bytes the process may still allocate on ``device``.

    CPU: MemAvailable (/proc/meminfo; else free pages from ``os.sysconf``), capped by a cgroup
    limit. CUDA: free memory from ``torch.cuda.mem_get_info``. Other devices: None (unknown).
    ``DCDH_MEMORY_LIMIT_BYTES``, when set, caps the result.
    Raises: UserInputError when ``DCDH_MEMORY_LIMIT_BYTES`` is not a non-negative integer.
    """
    device = torch.device(device)
    if device.type == "cpu":
        free = _meminfo_available()
        if free is None:
            try:
                free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                free = None
        room = _cgroup_room()
        if room is not None:
            free = room if free is None else min(free, room)
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = None
    limit = memory_limit()
    if limit is not None:
        free = limit if free is None else min(free, limit)
    return free


def memory_limit():
    """``DCDH_MEMORY_LIMIT_BYTES`` as an int, or None when unset or empty.

    Raises: UserInputError when it is not a non-negative integer.
    """
    text = os.environ.get(LIMIT_ENV)
    if not text:
        return None
    try:
        limit = int(text)
        if limit < 0:
            raise ValueError
    except ValueError:
        raise UserInputError(f"{LIMIT_ENV}={text!r} (environment): expected a number of bytes "
                             "(a non-negative integer)") from None
    return limit


def format_bytes(n):
    """``900 bytes`` / ``12.5 KiB`` / ``512 MiB`` / ``3.2 GiB``."""
    if n < 2 ** 10:
        return f"{n:,} bytes"
    if n < 2 ** 20:
        return f"{n / 2 ** 10:,.1f} KiB"
    return f"{n / 2 ** 20:,.0f} MiB" if n < 2 ** 30 else f"{n / 2 ** 30:,.1f} GiB"


def check_memory(method_cls, num_classes, bits, num_train, batch_size, device, hparams=None, processes=1):
    """Refuse a run whose method will not fit the device's free memory.

    Args: method_cls: a ``HashingMethod`` subclass; num_classes C; bits K; num_train N; batch_size
    B per process; device: torch.device or str; hparams: the run's hyperparameters (None: defaults);
    processes: training processes sharing this device's memory (several CPU processes of one
    machine share it; each GPU process has its own device, pass 1).
    Returns: (estimate bytes for all ``processes``, available bytes or None when unknown).
    Raises: UserInputError, one line naming C, the estimate, the memory available and what to do.
    """
    device = torch.device(device)
    estimate = int(method_cls.memory_estimate(num_classes, bits, num_train, batch_size, hparams)) * processes
    free = available_memory(device)
    if free is not None and estimate > free:
        where = "GPU" if device.type == "cuda" else "machine"
        raise UserInputError(
            f"--method {method_cls.name} with {num_classes:,} identities ({num_train:,} training images, "
            f"batch {batch_size}, {bits} bits" + (f", {processes} processes" if processes > 1 else "")
            + f") needs about {format_bytes(estimate)} for its own state and "
            f"one step, without the network, but only {format_bytes(free)} is available on {device}; "
            f"use a smaller --bs, a {where} with more memory, or fewer identities (or training images)")
    return estimate, free
