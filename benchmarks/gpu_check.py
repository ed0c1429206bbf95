"""Every GPU check of the training-speed issue in one prepared run, for a short GPU lease.

    python benchmarks/gpu_check.py --out "$OUT"                 # on the GPU machine (about 9 minutes)
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check  # the same stages, tiny, on the CPU

Stages, in order of importance, each in its own process with a time limit within ``--budget``
(a stage that fails or runs out of time is recorded and the next one starts; the figures are
saved after each):

1. ``env``: torch version, device name.
2. ``correctness``: ``utils.metrics.retrieval_metrics`` on the device against the CPU (same
   values), the DCDH loss terms on the device against the CPU, and 20 training steps of
   ``engine.loop.training_step`` under ``torch.cuda.set_sync_debug_mode("error")`` (a step that
   waits for the GPU from the host fails this).
3. ``speed``: ``benchmarks/train_speed.py`` at batch 256, authors'-style loop against the
   project's trainer, bf16 and fp32.
4. ``schedule``: ``dcdh_train.py`` with its defaults (600 epochs, evaluation every 10) on a
   FaceScrub-size synthetic set (530 identities, 127 train + 5 test images each: 67,310 / 2,650),
   stopped after ``--schedule-seconds``; the time per epoch (evaluation and checkpoints included)
   is extrapolated to the 600 epochs and printed as such.
5. more ``speed`` runs as the budget allows: the project alone with torch.compile (default,
   reduce-overhead) and at batch 1024.

Writes ``gpu_check.log`` (everything printed), ``gpu_check.json`` (the figures) and
``schedule.log`` (the training run's output, each line with seconds since its start) to ``--out``;
exits 1 when a stage failed (a stage that ran out of time is recorded, not a failure).
"""
import argparse
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stage_env(device):
    import torch
    out = {"torch": torch.__version__, "python": sys.version.split()[0], "device": str(device),
           "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["cuda"] = torch.version.cuda
    return out


def _stage_correctness(device, smoke):
    import copy
    import warnings

    import torch

    from data.device_loader import DeviceBatches
    from engine.loop import train_one_epoch, training_step
    from engine.recipes import build_optimizer
    from methods.dcdh import DCDH
    from models import build_model
    from utils.metrics import retrieval_metrics

    out = {}
    g = torch.Generator().manual_seed(0)
    nq, nd, bits, classes = (50, 2000, 48, 53) if smoke else (500, 50000, 48, 530)
    q = torch.randint(0, 2, (nq, bits), generator=g).float() * 2 - 1
    d = torch.randint(0, 2, (nd, bits), generator=g).float() * 2 - 1
    ql, dl = torch.randint(0, classes, (nq,), generator=g), torch.randint(0, classes, (nd,), generator=g)
    on_cpu = retrieval_metrics(q, d, ql, dl)
    on_dev = retrieval_metrics(q.to(device), d.to(device), ql.to(device), dl.to(device))
    gaps = {k: abs(on_cpu[k] - on_dev[k]) for k, v in on_cpu.items() if isinstance(v, (int, float))}
    out["metrics_max_abs_gap"] = max(gaps.values())
    out["metrics_map_cpu"], out["metrics_map_device"] = on_cpu["map"], on_dev["map"]

    torch.manual_seed(0)
    criterion = DCDH(classes, bits)
    codes, labels = torch.randn(256, bits), torch.randint(0, classes, (256,))
    t_cpu = criterion(codes, labels)
    t_dev = copy.deepcopy(criterion).to(device)(codes.to(device), labels.to(device))
    out["loss_terms_max_rel_gap"] = max(abs(t_cpu[k].item() - t_dev[k].item()) / abs(t_cpu[k].item())
                                        for k in t_cpu)

    split = _random_split(2048 if smoke else 8192, classes)
    model = build_model("dfhnet", bits).to(device).to(memory_format=torch.channels_last)
    criterion = criterion.to(device)
    opt = build_optimizer("adam", model, criterion, 0.005)
    amp = device.type == "cuda"
    batches = iter(DeviceBatches(split, 256, device, shuffle=True, drop_last=True))
    sums = torch.zeros(4, dtype=torch.float64, device=device)

    def step():
        images, y = next(batches)
        images = images.contiguous(memory_format=torch.channels_last)
        terms = training_step(model, criterion, opt, images, y, amp=amp)
        sums.add_(torch.stack([terms[k] for k in ("total", "pull", "push", "quant")]).double() * 256)

    for _ in range(3):  # warm-up: allocations, cuDNN plans
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5 if smoke else 20):
            step()
        out["training_step_host_syncs"] = "none"
    except RuntimeError as e:
        out["training_step_host_syncs"] = f"FOUND: {str(e).splitlines()[0][:300]}"
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    out["training_loss_finite"] = bool(torch.isfinite(sums).all())

    # a whole epoch of dcdh_train.train_one_epoch: syncs expected only at its NaN checks (one per
    # 25 batches) and its end, counted as warnings
    loader = DeviceBatches(split, 256, device, shuffle=True, drop_last=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            stats = train_one_epoch(model, criterion, opt, loader, device, 0, amp=amp, progress=False)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0][:200] for w in caught if "synchroniz" in str(w.message)]
    out["epoch_batches"], out["epoch_sync_warnings"] = len(loader), len(syncs)
    out["epoch_sync_examples"] = sorted(set(syncs))[:3]
    out["epoch_loss"] = stats["loss"]
    return out


def _random_split(n, classes):
    """A DDHSplit of n random uint8 32x32 images (the speed benchmarks' data)."""
    import numpy as np

    from data.ddh import DDHSplit
    rng = np.random.default_rng(0)
    return DDHSplit.from_arrays(rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, classes, n))


def _run(cmd, seconds, log, stamp_to=None):
    """Run ``cmd``, echo its output to ``log``; returns (exit code or 'timeout', lines, seconds).

    ``lines`` holds (seconds since the start, line) as each line arrived (a reader thread, so no
    line waits in a buffer). With ``stamp_to`` each line is also written there with its time.
    """
    start = time.perf_counter()
    lines, arrived = [], queue.Queue()
    stamped = open(stamp_to, "w") if stamp_to else None
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)

    def read():
        for line in proc.stdout:
            arrived.put((time.perf_counter() - start, line.rstrip("\n")))
        arrived.put(None)

    threading.Thread(target=read, daemon=True).start()
    rc = None
    try:
        while True:
            left = start + max(seconds, 1) - time.perf_counter()
            try:
                item = arrived.get(timeout=max(left, 0.01))
            except queue.Empty:
                rc = "timeout"
                break
            if item is None:
                break
            lines.append(item)
            log(item[1])
            if stamped:
                stamped.write(f"{item[0]:9.2f} {item[1]}\n")
                stamped.flush()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        proc.wait()
        if stamped:
            stamped.close()
    return (rc or proc.returncode), lines, time.perf_counter() - start


SPEED_RUNS = {
    "baseline": [("bf16 (project default on CUDA) vs authors' loop, batch 256", []),
                 ("fp32 vs authors' loop, batch 256", ["--no-amp"])],
    "extra": [("bf16, eager vs torch.compile default, batch 256", ["--no-baseline", "--compile", "default"]),
              ("bf16, eager vs torch.compile reduce-overhead (CUDA graphs), batch 256",
               ["--no-baseline", "--compile", "reduce-overhead"]),
              ("bf16, batch 1024", ["--no-baseline", "--bs", "1024", "--steps", "50"])],
}


def _speed(args, log, python, runs, limit, results, save):
    """Run ``benchmarks/train_speed.py`` for each of ``runs``; appends to ``results``."""
    sizes = (["--images", "4096", "--steps", "2", "--rounds", "1"] if args.smoke
             else ["--steps", "100", "--rounds", "3"])
    for name, extra in runs:
        if args.smoke:  # tiny sizes, whatever the run asks for
            extra = [a for i, a in enumerate(extra) if a != "--steps" and (i == 0 or extra[i - 1] != "--steps")]
        seconds = limit()
        if seconds < 30:
            results.append({"run": name, "skipped": "out of time"})
            continue
        cmd = [python, "benchmarks/train_speed.py", "--device", args.device, *sizes, *extra]
        if args.smoke and args.device == "cpu" and "--no-amp" not in extra:
            cmd.append("--amp")  # bf16 on the CPU, as the GPU runs it
        log(f"$ {' '.join(cmd[1:])}")
        rc, lines, secs = _run(cmd, seconds, log)
        median = [l for _, l in lines if l.startswith("median:")]
        results.append({"run": name, "args": extra, "rc": rc, "seconds": round(secs, 1),
                        "median": median[-1] if median else None})
        save()


def _schedule(args, log, python, seconds):
    sys.path.insert(0, ROOT)
    from data.synthetic import write_synthetic_ddh
    work = tempfile.mkdtemp(prefix="gpu_check_")
    ids, per_id = (20, 20) if args.smoke else (530, 127)
    t = time.perf_counter()
    root = write_synthetic_ddh(os.path.join(work, "facescrub_size"), identities=ids, train_per_id=per_id,
                               test_per_id=5, seed=0, files=4)
    log(f"synthetic FaceScrub-size set: {ids * per_id} train / {ids * 5} test images "
        f"({time.perf_counter() - t:.0f} s to write)")
    cmd = [python, "dcdh_train.py", "--dataset", "facescrub", "--data-root", root, "--len", "48",
           "--device", args.device, "--checkpoint-dir", work, "--save", "schedule.tar",
           "--compile", args.schedule_compile]
    if args.smoke:
        cmd += ["--epochs", "600", "--eval-every", "2"]
    seconds = min(args.schedule_seconds, seconds - (time.perf_counter() - t))
    log(f"$ {' '.join(cmd[1:])}  (stopped after {seconds:.0f} s)")
    try:
        rc, lines, secs = _run(cmd, seconds, log, os.path.join(args.out, "schedule.log"))
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the synthetic set and checkpoints (about 250 MB)
    epochs = [(t, int(m.group(1)), float(m.group(2))) for t, l in lines
              if (m := re.match(r"\[epoch (\d+)/600\].* (\d+) images/s", l))]
    evals = [(t, l) for t, l in lines if l.startswith("[evaluate")]
    out = {"rc": rc, "seconds": round(secs, 1), "epochs_done": len(epochs), "compile": args.schedule_compile}
    if len(epochs) >= 3:
        (t0, e0, _), (t1, e1, _) = epochs[0], epochs[-1]
        per_epoch = (t1 - t0) / (e1 - e0)  # includes checkpoint writes and every 10th epoch's evaluation
        out.update(first_epoch_done_s=round(t0, 1), seconds_per_epoch=round(per_epoch, 3),
                   images_per_s_logged_median=sorted(r for _, _, r in epochs)[len(epochs) // 2],
                   extrapolated_600_epochs_min=round((t0 + per_epoch * (600 - e0)) / 60, 2),
                   evaluations=[l for _, l in evals][-3:])
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="results folder (default $OUT)")
    p.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script itself on a CPU")
    p.add_argument("--budget", type=int, default=540, help="seconds for the whole run (default 540)")
    p.add_argument("--stage-seconds", type=int, default=150, help="time limit of each stage")
    p.add_argument("--schedule-seconds", type=int, default=180, help="time given to the schedule run")
    p.add_argument("--schedule-compile", default="off", choices=("off", "default", "reduce-overhead", "max-autotune"),
                   help="--compile value of the schedule run (default off)")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage in-process
    args = p.parse_args()
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    sys.path.insert(0, ROOT)
    if args.budget < args.schedule_seconds + 150:
        p.error(f"--budget {args.budget}: too small; it needs --schedule-seconds ({args.schedule_seconds}) "
                "plus about 150 s for the checks and the first speed runs")
    if not args.stage:
        from utils.device import resolve_device
        from utils.errors import UserInputError
        try:
            resolve_device(args.device)
        except UserInputError as e:
            p.error(f"{e}; gpu_check.py is for a GPU machine (--smoke runs its stages at toy sizes on the CPU)")

    if args.stage:  # child process: print one JSON line
        import torch
        device = torch.device(args.device)
        result = _stage_env(device) if args.stage == "env" else _stage_correctness(device, args.smoke)
        print("RESULT " + json.dumps(result))
        return

    os.makedirs(args.out, exist_ok=True)
    logfile = open(os.path.join(args.out, "gpu_check.log"), "w")
    summary_path = os.path.join(args.out, "gpu_check.json")
    summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": args.smoke}

    def log(line):
        print(line, flush=True)
        logfile.write(line + "\n")
        logfile.flush()

    def save():
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=1)

    python = sys.executable
    began = time.perf_counter()

    def limit(reserve=0):  # a stage's time: its own limit, within what the budget leaves
        return min(args.stage_seconds, args.budget - reserve - (time.perf_counter() - began))

    schedule_reserve = args.schedule_seconds + 30
    for stage in ("env", "correctness"):
        log(f"== {stage}")
        cmd = [python, "benchmarks/gpu_check.py", "--stage", stage, "--device", args.device]
        rc, lines, secs = _run(cmd + (["--smoke"] if args.smoke else []), limit(schedule_reserve), log)
        found = [l[len("RESULT "):] for _, l in lines if l.startswith("RESULT ")]
        summary[stage] = json.loads(found[-1]) if found else {"rc": rc, "tail": [l for _, l in lines[-5:]]}
        summary[stage]["seconds"] = round(secs, 1)
        save()
    log("== speed")
    summary["speed"] = []
    _speed(args, log, python, SPEED_RUNS["baseline"], lambda: limit(schedule_reserve), summary["speed"], save)
    log("== schedule")
    left = args.budget - (time.perf_counter() - began)
    summary["schedule"] = _schedule(args, log, python, min(args.schedule_seconds + 20, left - 10))
    save()
    log("== more speed runs, as time allows")
    _speed(args, log, python, SPEED_RUNS["extra"], limit, summary["speed"], save)
    summary["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    summary["seconds"] = round(time.perf_counter() - began, 1)
    failed = [s for s in ("env", "correctness") if "rc" in summary[s]]
    checks = summary["correctness"]
    if checks.get("training_step_host_syncs", "none") != "none":
        failed.append("host syncs in training_step")
    if checks.get("metrics_max_abs_gap", 0) > 1e-9 or checks.get("loss_terms_max_rel_gap", 0) > 1e-4:
        failed.append("device results differ from the CPU's")
    failed += [r["run"] for r in summary["speed"] if r.get("rc") not in (0, None)]
    failed += ["schedule"] * (summary["schedule"]["rc"] not in (0, "timeout"))
    summary["failed"] = failed
    save()
    log(json.dumps(summary, indent=1))
    if failed:
        log(f"FAILED: {', '.join(failed)} (see gpu_check.log)")
        sys.exit(1)


if __name__ == "__main__":
    main()
