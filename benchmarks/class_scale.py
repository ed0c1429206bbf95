"""Time and peak memory of one training step of a method's loss against the number of identities C.

    python benchmarks/class_scale.py                         # C = 2,000 / 8,631 / 40,000 / 100,000
    python benchmarks/class_scale.py --classes 2000 8631 --repeat 3
    python benchmarks/class_scale.py --device cuda           # on a GPU

One step = the loss's forward and backward (``method(codes, labels, index)["total"].backward()``)
on a batch of random codes (batch 256, 48 bits; codes and labels seeded), no network. Rows:

* ``dcdh, reference``: DCDH with ``methods.dcdh.push_loss_reference``, the whole-matrix push term
  (about 3.3 float32 C x C tensors and a C x C mask);
* ``dcdh, blocked``: DCDH as trained (``push_loss``, blocks of centers, recomputed in backward);
* the per-class state of the other registered methods with one: ``dcwh`` (its centers, learned
  and mean), and ``csq`` / ``orthohash`` (codebooks) when they are in ``methods.METHODS``.

Every configuration runs in a fresh subprocess, so one peak does not hide another: the peak
memory is the increase of the process's peak resident set during the steps over the resident
set after setup (torch imported, method built, inputs made): on Linux the peak is reset after
setup (``/proc/self/clear_refs``) and read from ``VmHWM``, elsewhere ``ru_maxrss`` (which then
hides a step that needs less than the setup did); on a GPU ``torch.cuda.max_memory_allocated``. A configuration whose pre-flight estimate
(``memory_estimate``; for the reference push term 14.2 bytes per pair of identities, measured) exceeds the
memory available is not run; its estimate is printed instead. The time is the median of
``--repeat`` steps (the first includes allocation warm-up; one step for C >= 40,000 by
default). Ratios reference / blocked are printed for the C where both ran.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

REFERENCE_PUSH_BYTES_PER_PAIR = 14.2
"""Peak bytes per C^2 of the whole-matrix push term: 3.3 float32 C x C tensors and a boolean mask
(the issue measured 972 MiB at C = 8,631, 13.7 bytes per pair, with the pull term)."""


def _status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def _reset_peak_rss():
    """Reset the process's peak resident set to its current size (Linux: ``/proc/self/clear_refs``)
    and return that size; without the reset, the peak so far (``ru_maxrss``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss():
    """The peak resident set since the reset (``VmHWM``, else ``ru_maxrss``), in bytes."""
    try:
        value = _status_bytes("VmHWM")
    except OSError:
        value = None
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(args):
    """Build one configuration, run the steps, print one JSON line."""
    import torch

    import methods.dcdh
    from methods import METHODS

    torch.set_num_threads(args.threads) if args.threads else None
    device = torch.device(args.device)
    if args.variant == "reference":
        methods.dcdh.push_loss = methods.dcdh.push_loss_reference  # DCDH.forward looks it up here
    hparams = {"centers": args.variant} if args.method == "dcwh" else {}
    c, k, b = args.classes, args.bits, args.bs
    n = max(c, b)  # training labels, only for methods that want them at construction
    torch.manual_seed(0)  # the same initial centers / codebooks for every variant
    gen = torch.Generator().manual_seed(0)
    train_labels = torch.arange(n) % c
    method = METHODS[args.method](c, k, train_labels=train_labels, **hparams).to(device)
    codes = torch.randn(b, k, generator=gen).to(device).requires_grad_(True)
    labels = torch.randint(0, c, (b,), generator=gen).to(device)
    index = torch.randperm(n, generator=gen)[:b].to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    base_rss = _reset_peak_rss()
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        method.zero_grad(set_to_none=True)
        codes.grad = None
        total = method(codes, labels, index)["total"]
        total.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak_rss = _peak_rss() - base_rss
    out = {"seconds": statistics.median(times), "times": times, "peak_bytes": peak_rss,
           "loss": float(total), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    print(json.dumps(out))


def available_bytes(device):
    from engine.preflight import available_memory
    return available_memory(device)


def estimate(method_name, variant, c, k, b):
    from methods import METHODS
    cls = METHODS[method_name]
    hparams = {"centers": variant} if method_name == "dcwh" else None
    est = cls.memory_estimate(c, k, max(c, b), b, hparams)
    if variant == "reference":
        from methods.dcdh import push_block_rows
        est += int(REFERENCE_PUSH_BYTES_PER_PAIR * c * c) - 3 * 4 * push_block_rows(c, device="cuda") * c
    return est


def configurations(classes):
    from methods import METHODS
    rows = [("dcdh", "reference"), ("dcdh", "blocked"), ("dcwh", "learned"), ("dcwh", "mean")]
    rows += [(name, "-") for name in ("csq", "orthohash") if name in METHODS]
    return [(name, variant, c) for c in classes for name, variant in rows]


def mib(x):
    return f"{x / 2 ** 20:,.0f} MiB" if x < 2 ** 30 else f"{x / 2 ** 30:,.2f} GiB"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, nargs="+", default=[2000, 8631, 40000, 100000])
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--bs", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=None,
                   help="steps per configuration (default 3 below C = 40,000, else 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--only", nargs="+", default=None, help="methods to run (default all)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="dcdh", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="blocked", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.classes = args.classes[0]
        return _child(args)

    import torch
    device = torch.device(args.device)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"# device {device}, torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load}, "
          f"batch {args.bs}, {args.bits} bits", flush=True)
    results = []
    for name, variant, c in configurations(args.classes):
        if args.only and name not in args.only:
            continue
        est = estimate(name, variant, c, args.bits, args.bs)
        avail = available_bytes(device)
        row = {"method": name, "variant": variant, "classes": c, "estimate_bytes": est,
               "available_bytes": avail}
        if est > avail:
            row["skipped"] = f"estimate {mib(est)} > available {mib(avail)}"
            print(f"{name:10s} {variant:9s} C={c:>7,}: not run, {row['skipped']}", flush=True)
            results.append(row)
            continue
        repeat = args.repeat or (3 if c < 40000 else 1)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--method", name, "--variant", variant,
               "--classes", str(c), "--bits", str(args.bits), "--bs", str(args.bs), "--device", args.device,
               "--repeat", str(repeat)] + (["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            row["failed"] = f"exit {proc.returncode}: {tail}"
            print(f"{name:10s} {variant:9s} C={c:>7,}: failed, {row['failed']}", flush=True)
        else:
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{name:10s} {variant:9s} C={c:>7,}: {row['seconds']:8.3f} s/step, peak +{mib(row['peak_bytes'])} "
                  f"(estimate {mib(est)}), loss {row['loss']:.5f}", flush=True)
        results.append(row)

    print("\n| method | C | time / step | peak memory (increase) | pre-flight estimate |")
    print("|---|---|---|---|---|")
    for r in results:
        what = f"{r['method']}" + (f", {r['variant']}" if r["variant"] != "-" else "")
        if "seconds" in r:
            print(f"| {what} | {r['classes']:,} | {r['seconds']:.3f} s | {mib(r['peak_bytes'])} | {mib(r['estimate_bytes'])} |")
        else:
            print(f"| {what} | {r['classes']:,} | not run | - | {mib(r['estimate_bytes'])} "
                  f"({r.get('skipped') or r.get('failed')}) |")
    by = {(r["method"], r["variant"], r["classes"]): r for r in results}
    for c in args.classes:
        ref, blk = by.get(("dcdh", "reference", c)), by.get(("dcdh", "blocked", c))
        if ref and blk and "seconds" in ref and "seconds" in blk:
            print(f"C={c:,}: reference / blocked: time {ref['seconds'] / blk['seconds']:.2f}x, "
                  f"peak memory {ref['peak_bytes'] / max(blk['peak_bytes'], 1):.1f}x; "
                  f"loss {ref['loss']:.6f} vs {blk['loss']:.6f}")
    with open("/proc/loadavg") as f:
        print(f"# load average at the end {' '.join(f.read().split()[:3])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from utils.errors import quiet_broken_pipe
    quiet_broken_pipe(main)()  # '... | head' ends quietly
