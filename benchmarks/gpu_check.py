"""Every GPU check of the project in one prepared run that fits one device lease.

    python benchmarks/gpu_check.py --out "$OUT"                 # on the GPU machine (at most 8 minutes)
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check  # the same stages, tiny, on the CPU

A device lease is 15 minutes in all, machine start included, so the run is planned for at most
``PLANNED_TOTAL_S`` = 480 s (``PLAN``; ``--budget``): each stage runs in its own process with its
planned time as its limit (a stage that fails or runs out of time is recorded and the next one
starts; the figures are saved after each), the essential figures first:

1. ``env`` (20 s): torch, CUDA, device name, CPU model and capability.
2. ``correctness`` (60 s): ``utils.metrics.retrieval_metrics`` on the device against the CPU (same
   values), the DCDH loss terms on the device against the CPU, and 20 training steps of
   ``engine.loop.training_step`` under ``torch.cuda.set_sync_debug_mode("error")`` (a step that
   waits for the GPU from the host fails this), and the syncs of a whole ``train_one_epoch``.
3. ``speed`` (2 x 70 s): ``benchmarks/train_speed.py`` at batch 256, authors'-style loop against
   the project's trainer, bf16 then fp32.
4. ``schedule`` (the rest: 260 s): the paper's DCDH schedule, ``dcdh_train.py`` with its
   defaults (600 epochs, Adam, evaluation every 100 epochs and after the last) on
   ``--data-root`` (default ``../shared/data/celeba299-ddh32``; a synthetic set of the same size
   when it is absent, recorded as such) at 48 bits, until it ends or the time is up: its final
   mAP when it ends, else the epochs done, the last mAP and the time per epoch extrapolated to 600.
5. more ``speed`` runs (torch.compile, batch 1024) only in time that is left over.

Writes ``gpu_check.log`` (everything printed), ``gpu_check.json`` (the figures) and
``schedule.log`` (the training run's output, each line with seconds since its start) to ``--out``;
exits 1 when a stage failed: the env and correctness stages fail when they error or run out of
time (their figures are missing then); a speed run or the schedule that runs out of time is
recorded with what it printed, not a failure.
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


PLAN = (("env", 20), ("correctness", 60), ("speed bf16", 70), ("speed fp32", 70), ("schedule", 250))
"""(stage, planned seconds on the device): the schedule gets whatever the others leave of the budget."""
PLANNED_TOTAL_S = 480
"""The most device time one run may take (8 minutes of a 15-minute lease that includes the machine's start)."""
SMOKE_PLAN = (("env", 30), ("correctness", 60), ("speed bf16", 45), ("speed fp32", 45), ("schedule", 60))
"""``--smoke`` on a CPU: the same stages at toy sizes (bf16 is emulated, and slow, on AVX2 CPUs)."""
CELEBA = os.path.join(os.path.dirname(ROOT), "shared", "data", "celeba299-ddh32")


def _stage_env(device):
    import torch

    from utils.device import cpu_capability, cpu_model
    out = {"torch": torch.__version__, "python": sys.version.split()[0], "device": str(device),
           "cpu_threads": torch.get_num_threads(), "cpu": cpu_model(), "cpu_capability": cpu_capability()}
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
    nq, nd, bits, classes = (50, 2000, 48, 8) if smoke else (500, 50000, 48, 530)
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

    split = _random_split(128 if smoke else 8192, classes)
    bs = 32 if smoke else 256
    model = build_model("dfhnet", bits).to(device).to(memory_format=torch.channels_last)
    criterion = criterion.to(device)
    opt = build_optimizer("adam", model, criterion, 0.005)
    amp = device.type == "cuda"
    batches = iter(DeviceBatches(split, bs, device, shuffle=True, drop_last=True))
    sums = torch.zeros(4, dtype=torch.float64, device=device)

    def step():
        images, y = next(batches)
        images = images.contiguous(memory_format=torch.channels_last)
        terms = training_step(model, criterion, opt, images, y, amp=amp)
        sums.add_(torch.stack([terms[k] for k in ("total", "pull", "push", "quant")]).double() * bs)

    for _ in range(1 if smoke else 3):  # warm-up: allocations, cuDNN plans
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2 if smoke else 20):
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
    loader = DeviceBatches(split, bs, device, shuffle=True, drop_last=True)
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
    "speed bf16": ("bf16 (project default on CUDA) vs authors' loop, batch 256", []),
    "speed fp32": ("fp32 vs authors' loop, batch 256", ["--no-amp"]),
}
EXTRA_SPEED_RUNS = [("bf16, eager vs torch.compile default, batch 256", ["--no-baseline", "--compile", "default"]),
                    ("bf16, eager vs torch.compile reduce-overhead (CUDA graphs), batch 256",
                     ["--no-baseline", "--compile", "reduce-overhead"]),
                    ("bf16, batch 1024", ["--no-baseline", "--bs", "1024", "--steps", "50"])]


def _speed(args, log, python, name, extra, seconds):
    """Run ``benchmarks/train_speed.py`` with ``extra`` for at most ``seconds``; returns its record."""
    sizes = (["--images", "256", "--classes", "8", "--bs", "16", "--steps", "1", "--rounds", "1"] if args.smoke
             else ["--steps", "100", "--rounds", "3"])
    if args.smoke:  # tiny sizes, whatever the run asks for
        extra = [a for i, a in enumerate(extra) if a not in ("--steps", "--bs")
                 and (i == 0 or extra[i - 1] not in ("--steps", "--bs"))]
    if seconds < 10:
        return {"run": name, "skipped": "out of time"}
    cmd = [python, "benchmarks/train_speed.py", "--device", args.device, *sizes, *extra]
    if args.smoke and args.device == "cpu" and "--no-amp" not in extra:
        cmd.append("--amp")  # bf16 on the CPU, as the GPU runs it
    log(f"$ {' '.join(cmd[1:])}")
    rc, lines, secs = _run(cmd, seconds, log)
    median = [l for _, l in lines if l.startswith("median:")]
    return {"run": name, "args": extra, "rc": rc, "seconds": round(secs, 1), "limit_s": round(seconds),
            "median": median[-1] if median else None}


def _schedule(args, log, python, seconds):
    """The paper's DCDH schedule (600 epochs, Adam, 48 bits) for at most ``seconds``; returns its record."""
    from data.synthetic import write_synthetic_ddh
    work = tempfile.mkdtemp(prefix="gpu_check_")
    t = time.perf_counter()
    if args.smoke:
        root, data = write_synthetic_ddh(os.path.join(work, "tiny"), identities=8, train_per_id=16,
                                         test_per_id=2, seed=0), "synthetic, 8 identities x 16 (smoke)"
    elif os.path.isdir(args.data_root):
        root, data = args.data_root, os.path.relpath(args.data_root, ROOT)
    else:  # the same size as celeba299-ddh32: 299 identities, 4,992 train / 1,265 test images
        root = write_synthetic_ddh(os.path.join(work, "celeba299_size"), identities=299, train_per_id=17,
                                   test_per_id=4, seed=0, files=4)
        data = f"SYNTHETIC stand-in ({args.data_root} not found): 299 identities x 17 train / 4 test"
    log(f"schedule data: {data}")
    cmd = [python, "dcdh_train.py", "--dataset", "ddh", "--data-root", root, "--len", "48",
           "--device", args.device, "--checkpoint-dir", work, "--save", "schedule.tar",
           "--eval-every", "2" if args.smoke else "100", "--compile", args.schedule_compile]
    if args.smoke:  # 2 epochs, to the end: the same path as a schedule that finishes on the device
        cmd += ["--bs", "32", "--epochs", "2"]
    seconds -= time.perf_counter() - t
    log(f"$ {' '.join(cmd[1:])}  (stopped after {seconds:.0f} s if not done)")
    try:
        rc, lines, secs = _run(cmd, seconds, log, os.path.join(args.out, "schedule.log"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"data": data, "rc": rc, "seconds": round(secs, 1), "compile": args.schedule_compile}
    out.update(schedule_summary(lines, rc))
    return out


def schedule_summary(lines, rc):
    """Figures of a ``dcdh_train.py`` run from its output ``lines`` ([(seconds since start, line)])
    and exit status ``rc`` (an int, or "timeout"): epochs done and planned, whether it finished,
    the last mAP (percent), and with 3 or more epoch lines the seconds per epoch (checkpoints and
    evaluations included) and the whole schedule extrapolated from them (minutes). Returns: dict."""
    epochs = [(t, int(m.group(1)), int(m.group(2))) for t, l in lines
              if (m := re.match(r"\[epoch (\d+)/(\d+)\]", l))]
    evals = [l for _, l in lines if l.startswith("[evaluate")]
    maps = [float(m.group(1)) for l in evals if (m := re.search(r"\] mAP ([\d.]+)%", l))]
    out = {"epochs_done": epochs[-1][1] if epochs else 0, "epochs_planned": epochs[-1][2] if epochs else None,
           "finished": rc == 0 and any(l.startswith("[done]") for _, l in lines),
           "last_map_percent": maps[-1] if maps else None, "evaluations": evals[-3:]}
    if len(epochs) >= 3:
        (t0, e0, total), (t1, e1, _) = epochs[0], epochs[-1]
        per_epoch = (t1 - t0) / (e1 - e0)
        out.update(first_epoch_done_s=round(t0, 1), seconds_per_epoch=round(per_epoch, 4),
                   extrapolated_all_epochs_min=round((t0 + per_epoch * (total - e0)) / 60, 2))
    return out


def planned(args):
    """[(stage, seconds)] of this run: ``PLAN`` (``SMOKE_PLAN`` with --smoke), the schedule's share
    set to what the others leave of ``--budget``."""
    plan = list(SMOKE_PLAN if args.smoke else PLAN)
    others = sum(sec for name, sec in plan if name != "schedule")
    return [(name, sec if name != "schedule" else max(args.budget - others, 0)) for name, sec in plan]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="results folder (default $OUT)")
    p.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script itself on a CPU")
    p.add_argument("--budget", type=int, default=None,
                   help=f"seconds for the whole run (default {PLANNED_TOTAL_S}; with --smoke the sum of its plan)")
    p.add_argument("--data-root", default=CELEBA, help="DDH-layout set of the schedule stage "
                   "(default ../shared/data/celeba299-ddh32)")
    p.add_argument("--schedule-compile", default="off", choices=("off", "default", "reduce-overhead", "max-autotune"),
                   help="--compile value of the schedule run (default off)")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage in-process
    args = p.parse_args()
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.budget is None:
        args.budget = sum(sec for _, sec in SMOKE_PLAN) if args.smoke else PLANNED_TOTAL_S
    sys.path.insert(0, ROOT)
    minimum = sum(sec for name, sec in (SMOKE_PLAN if args.smoke else PLAN) if name != "schedule") + 30
    if not args.stage and args.budget < minimum:
        p.error(f"--budget {args.budget}: too small; the checks and speed runs need {minimum - 30} s and the "
                "schedule at least 30 s")
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
    plan = planned(args)
    summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": args.smoke,
               "plan_s": dict(plan), "budget_s": args.budget}

    def log(line):
        print(line, flush=True)
        logfile.write(line + "\n")
        logfile.flush()

    def save():
        tmp = summary_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, summary_path)

    python = sys.executable
    began = time.perf_counter()
    log("plan: " + ", ".join(f"{name} {sec} s" for name, sec in plan)
        + f" = {sum(sec for _, sec in plan)} s (budget {args.budget} s)")

    def left():
        return args.budget - (time.perf_counter() - began)

    summary["speed"] = []
    for name, seconds in plan:
        log(f"== {name}")
        if name in ("env", "correctness"):
            cmd = [python, "benchmarks/gpu_check.py", "--stage", name, "--device", args.device]
            rc, lines, secs = _run(cmd + (["--smoke"] if args.smoke else []), min(seconds, left()), log)
            found = [l[len("RESULT "):] for _, l in lines if l.startswith("RESULT ")]
            summary[name] = json.loads(found[-1]) if found else {"rc": rc, "tail": [l for _, l in lines[-5:]]}
            summary[name]["seconds"] = round(secs, 1)
        elif name.startswith("speed"):
            title, extra = SPEED_RUNS[name]
            summary["speed"].append(_speed(args, log, python, title, extra, min(seconds, left())))
        else:  # the schedule: what the budget leaves, less a few seconds to write the summary
            summary["schedule"] = _schedule(args, log, python, left() - 5)
        save()
    if not args.smoke:
        log("== more speed runs, in the time left over")
        for title, extra in EXTRA_SPEED_RUNS:
            if left() > 40:
                summary["speed"].append(_speed(args, log, python, title, extra, left() - 5))
                save()
    summary["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    summary["seconds"] = round(time.perf_counter() - began, 1)
    failed = [s for s in ("env", "correctness") if "rc" in summary[s]]
    checks = summary["correctness"]
    if checks.get("training_step_host_syncs", "none") != "none":
        failed.append("host syncs in training_step")
    if checks.get("metrics_max_abs_gap", 0) > 1e-9 or checks.get("loss_terms_max_rel_gap", 0) > 1e-4:
        failed.append("device results differ from the CPU's")
    failed += [r["run"] for r in summary["speed"] if r.get("rc") not in (0, None, "timeout")]
    failed += ["schedule"] * (summary["schedule"]["rc"] not in (0, "timeout"))
    summary["failed"] = failed
    save()
    log(json.dumps(summary, indent=1))
    if failed:
        log(f"FAILED: {', '.join(failed)} (see gpu_check.log)")
        sys.exit(1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from utils.errors import quiet_broken_pipe
    quiet_broken_pipe(main)()  # '... | head' ends quietly
