"""Retrieval curves as CSV files and PNG plots (matplotlib, headless)."""
import csv
import io
import os

from .checkpoint import atomic_write


def _write_csv(path, header, rows):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def write_curves(metrics, out_dir, title):
    """Write ``precision_at_n.csv/.png`` and ``pr_over_radius.csv/.png`` into ``out_dir``.

    Args:
        metrics (dict): ``utils.metrics.retrieval_metrics`` output with ``curves``.
        out_dir (str): created if missing.  title (str): e.g. "celeba299-ddh32, 12 bits".
    Returns: list of the written paths.
    Raises: OSError if ``out_dir`` cannot be written.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    at_n, over_r = metrics["curves"]["precision_at_n"], metrics["curves"]["pr_over_radius"]
    paths = [os.path.join(out_dir, n) for n in
             ("precision_at_n.csv", "precision_at_n.png", "pr_over_radius.csv", "pr_over_radius.png")]
    _write_csv(paths[0], ["rank", "precision", "recall"],
               zip(at_n["ranks"], at_n["precision"], at_n["recall"]))
    _write_csv(paths[2], ["radius", "precision", "recall"],
               zip(over_r["radius"], over_r["precision"], over_r["recall"]))

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(at_n["ranks"], at_n["precision"], marker="o", ms=3)
    ax.set_xscale("log")
    ax.set(xlabel="number of top returned images N", ylabel="precision@N", ylim=(0, 1.02),
           title=f"Precision@N — {title}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(paths[1], lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(over_r["recall"], over_r["precision"], marker="o", ms=3)
    for r, x, y in zip(over_r["radius"], over_r["recall"], over_r["precision"]):
        if r <= 3 or r == over_r["radius"][-1]:
            ax.annotate(f"r={r}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
           title=f"PR over Hamming radius — {title}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(paths[3], lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return paths
