"""Evaluation speed: ``utils.metrics.retrieval_metrics`` against a per-query loop in the authors' style.

    python benchmarks/eval_speed.py --queries 2650 --database 67177 --bits 48 --classes 530
    python benchmarks/eval_speed.py --queries 10000 --database 1000000 --bits 48 --classes 530

Random +-1 codes and labels (seeded) are generated once; then, in the same process,
(a) the baseline loops over the queries: Hamming distances to every database code, a full
    (unstable) ``torch.sort``, AP from cumulative hits / rank positions, precision@1/5/10 and
    P/R within Hamming radius 2, one query at a time; it runs twice, with torch's default thread
    count and with one thread (tiny per-query operations often run no faster, or much slower when
    other processes share the CPU, on several threads), and the faster time is the one compared;
(b) ``retrieval_metrics`` computes all metrics (and more) in one chunked pass.
It prints both wall times, the speed ratio and the peak memory of (b): the increase of the peak
resident set size (Linux ``VmHWM``, reset through /proc/self/clear_refs) and, on CUDA,
``torch.cuda.max_memory_allocated``. For large cases the baseline runs on the first
``--baseline-queries`` queries and its time is extrapolated linearly (printed as such).
Both mAPs are printed: the baseline's sort breaks ties arbitrarily, so the two differ slightly;
on a few queries the baseline is re-run with a stable sort and must then agree exactly.
"""
import argparse
import os
import platform
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--queries", type=int, default=2650)
    p.add_argument("--database", type=int, default=67177)
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--classes", type=int, default=530)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-baseline", action="store_true", help="time only retrieval_metrics")
    p.add_argument("--baseline-queries", type=int, default=None,
                   help="queries the baseline loop runs on (default: all if queries x database <= 3e8, "
                        "else 200); the time is extrapolated linearly to all queries")
    p.add_argument("--baseline-threads", default="both",
                   help="torch threads of the baseline: 'default', a number, or 'both' (default: torch's "
                        "default and 1; the faster of the two is used for the ratio)")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed runs of retrieval_metrics (default 3; the ratio uses their median)")
    p.add_argument("--chunk-size", type=int, default=None, help="forwarded to retrieval_metrics")
    args = p.parse_args(argv)
    for name in ("queries", "database", "bits", "classes", "repeat"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


# ------------------------------------------------------------------------------------------------
# memory measurement (Linux /proc; no psutil)
# ------------------------------------------------------------------------------------------------

def _status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mib():
    v = _status_kib("VmRSS")
    return None if v is None else v / 1024


def peak_rss_mib():
    v = _status_kib("VmHWM")
    if v is None:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return v / 1024


# ------------------------------------------------------------------------------------------------
# data and the baseline
# ------------------------------------------------------------------------------------------------

def make_data(torch, args, device):
    g = torch.Generator().manual_seed(args.seed)
    qc = torch.randint(0, 2, (args.queries, args.bits), generator=g, dtype=torch.int8) * 2 - 1
    dc = torch.randint(0, 2, (args.database, args.bits), generator=g, dtype=torch.int8) * 2 - 1
    ql = torch.randint(0, args.classes, (args.queries,), generator=g)
    dl = torch.randint(0, args.classes, (args.database,), generator=g)
    return qc.float().to(device), dc.float().to(device), ql.to(device), dl.to(device)


def baseline_loop(torch, qc, dc, ql, dl, radius=2, ks=(1, 5, 10), stable=False):
    """Per-query evaluation in the style of the authors' code (one query at a time).

    Returns dict: ``ap`` (list of per-query AP, 0 for a query without relevant items),
    ``map``, ``precision_at_{k}``, ``precision_radius``, ``recall_radius`` (means over queries).
    """
    bits = qc.shape[1]
    aps, prec_k, p_rad, r_rad = [], {k: 0.0 for k in ks}, 0.0, 0.0
    for i in range(qc.shape[0]):
        hamm = 0.5 * (bits - dc @ qc[i])                       # Hamming distances to the database
        gnd = (dl == ql[i]).float()
        tsum = int(gnd.sum())
        _, ind = torch.sort(hamm, stable=stable)               # the authors' full sort
        ranked = gnd[ind]
        if tsum > 0:
            count = torch.arange(1, tsum + 1, dtype=torch.float32, device=qc.device)
            tindex = torch.nonzero(ranked).flatten().float() + 1.0
            aps.append(float(torch.mean(count / tindex)))
        else:
            aps.append(0.0)
        for k in ks:
            prec_k[k] += float(ranked[:k].sum()) / k
        retrieved = hamm <= radius
        n_ret = int(retrieved.sum())
        hits = float((gnd * retrieved).sum())
        p_rad += hits / n_ret if n_ret else 0.0
        r_rad += hits / tsum if tsum else 0.0
    nq = qc.shape[0]
    out = {"ap": aps, "map": sum(aps) / nq, "precision_radius": p_rad / nq, "recall_radius": r_rad / nq}
    out.update({f"precision_at_{k}": v / nq for k, v in prec_k.items()})
    return out


def _load():
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    args = parse_args(argv)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    import torch
    from utils.metrics import mean_average_precision, retrieval_metrics

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("eval_speed.py: --device cuda but CUDA is not available")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {platform.processor() or platform.machine()}, {cores} CPU cores available, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"case: {args.queries} queries x {args.database} database codes, {args.bits} bits, "
          f"{args.classes} classes, seed {args.seed}")
    print(f"load average at start: {_load()} (other processes share the CPU when it is above 0)")
    qc, dc, ql, dl = make_data(torch, args, device)
    total_pairs = args.queries * args.database

    base = None
    if not args.skip_baseline:
        nb = args.baseline_queries or (args.queries if total_pairs <= 3e8 else 200)
        nb = min(nb, args.queries)
        default_threads = torch.get_num_threads()
        settings = [default_threads] + ([1] if default_threads > 1 and args.baseline_threads == "both" else [])
        if args.baseline_threads not in ("both", "default"):
            settings = [int(args.baseline_threads)]
        runs = []
        for threads in settings:
            torch.set_num_threads(threads)
            _sync(torch, device)
            t0 = time.perf_counter()
            base = baseline_loop(torch, qc[:nb], dc, ql[:nb], dl)
            _sync(torch, device)
            t_base = time.perf_counter() - t0
            torch.set_num_threads(default_threads)
            runs.append((t_base, threads))
            label = f"baseline (per-query loop, unstable sort, {threads} torch thread{'s' if threads > 1 else ''})"
            if nb < args.queries:
                print(f"{label}: {t_base:.2f} s on {nb} queries, EXTRAPOLATED linearly to {args.queries} "
                      f"queries: {t_base * args.queries / nb:.1f} s ({1e3 * t_base / nb:.2f} ms per query)")
            else:
                print(f"{label}: {t_base:.2f} s ({1e3 * t_base / nb:.2f} ms per query)")
        t_base, base_threads = min(runs)
        t_base_all = t_base * args.queries / nb

    times, res = [], None
    rss0 = rss_mib()
    hwm_ok = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    for _ in range(args.repeat):
        _sync(torch, device)
        t0 = time.perf_counter()
        res = retrieval_metrics(qc, dc, ql, dl, topk=(1, 5, 10), radius=2, chunk_size=args.chunk_size)
        _sync(torch, device)
        times.append(time.perf_counter() - t0)
    t_fast = statistics.median(times)
    peak = peak_rss_mib()
    print(f"retrieval_metrics: {t_fast:.3f} s" + (f" (median of {len(times)} runs: "
          + ", ".join(f"{t:.3f}" for t in times) + f"; best {min(times):.3f})" if len(times) > 1 else "")
          + f", {1e9 * t_fast / total_pairs:.2f} ns per (query, database) pair")
    if hwm_ok and rss0 is not None:
        print(f"peak memory (CPU): peak RSS {peak:.0f} MiB, increase over the {rss0:.0f} MiB before "
              f"the call: {peak - rss0:.0f} MiB")
    else:
        print(f"peak memory (CPU): process peak RSS {peak:.0f} MiB (could not reset the peak counter)")
    if device.type == "cuda":
        print(f"peak memory (CUDA): max_memory_allocated {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB "
              f"({(torch.cuda.max_memory_allocated(device) - base_alloc) / 2**20:.0f} MiB above the inputs)")

    print(f"mAP (ties by database index) {res['map']:.6f}, tie-aware mAP {res['map_tie_aware']:.6f}, "
          f"P@1/5/10 {res['precision_at_1']:.5f}/{res['precision_at_5']:.5f}/{res['precision_at_10']:.5f}, "
          f"P/R radius 2 {res['precision_radius_2']:.5f}/{res['recall_radius_2']:.5f}, "
          f"{res['queries_without_relevant']} queries without relevant items")
    if base is not None:
        print(f"speed ratio: {t_base_all / t_fast:.1f}x (faster baseline, {base_threads} thread(s): {t_base_all:.2f} s"
              f"{' extrapolated' if nb < args.queries else ''} / retrieval_metrics median {t_fast:.3f} s; "
              f"{t_base_all / min(times):.1f}x with the best run)")
        mine = mean_average_precision(qc[:nb], dc, ql[:nb], dl) if nb < args.queries else None
        mine_map = mine["map"] if mine is not None else res["map"]
        print(f"mAP on the {nb} baseline queries: baseline (unstable sort) {base['map']:.6f}, "
              f"retrieval_metrics (stable) {mine_map:.6f}, difference {base['map'] - mine_map:+.2e} "
              f"(tie order only)")
        if nb == args.queries:
            for key, ref in (("precision_at_1", "precision_at_1"), ("precision_at_10", "precision_at_10"),
                             ("precision_radius_2", "precision_radius"), ("recall_radius_2", "recall_radius")):
                print(f"  {key}: baseline {base[ref]:.6f}, retrieval_metrics {res[key]:.6f}")
        ncheck = min(20, nb)
        stable = baseline_loop(torch, qc[:ncheck], dc, ql[:ncheck], dl, stable=True)
        ours = mean_average_precision(qc[:ncheck], dc, ql[:ncheck], dl)["ap"].tolist()
        worst = max(abs(a - b) for a, b in zip(stable["ap"], ours))
        status = "OK" if worst < 1e-5 else "MISMATCH"
        print(f"check: baseline with a stable sort on {ncheck} queries vs retrieval_metrics: "
              f"max |AP difference| {worst:.1e} (float32 baseline arithmetic) -> {status}")
        print(f"load average at end: {_load()}")
        if status != "OK":
            sys.exit(1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from utils.errors import quiet_broken_pipe
    quiet_broken_pipe(main)()  # '... | head' ends quietly
