"""The report of a grid, from the ``metrics.json`` of its finished cells (any shard's):

* ``results.csv``: a row per finished cell, by method (as listed), code length and seed;
* ``table_<metric>.md`` / ``.tex`` for mAP and precision / recall within Hamming radius 2:
  methods x code lengths, mean ± standard deviation over seeds (in %), best of each column in bold;
* figures (PNG): mAP, precision and recall within radius 2 against code length; the PR curve over
  Hamming radii and precision@N over the ranking at one code length (``figure_bits``).

Every file is written atomically; the report can be rebuilt at any time (``reproduce.py --report``).
"""
import csv
import io
import json
import os
import statistics

from utils.checkpoint import atomic_write

MEASURED = ("train_s", "eval_s", "wall_s", "images_per_s", "host", "finished")
"""Columns of results.csv that are measurements (time, speed, machine, date): they differ between
two runs of the same grid. Every other column is determined by the code, data and settings."""

METRIC_ORDER = ("map", "map_tie_aware", "precision_at_1", "precision_at_5", "precision_at_10",
                "precision_radius_2", "recall_radius_2", "queries_without_relevant", "num_queries",
                "num_database")
RUN_COLUMNS = ("epochs", "epochs_run", "best_epoch", "best_loss", "backbone", "image_size", "amp", "train_s",
               "eval_s", "wall_s", "images_per_s", "device", "host", "code_version", "finished")
TABLES = (("map", "mAP"), ("precision_radius_2", "precision within Hamming radius 2"),
          ("recall_radius_2", "recall within Hamming radius 2"))
DATA_NAMES = {"facescrub": "FaceScrub", "youtube": "YouTube Faces", "vggface2": "VGGFace2"}
METHOD_NAMES = {"orthohash": "OrthoHash"}


def method_name(method):
    return METHOD_NAMES.get(method, method.upper())


def data_label(exp):
    """``FaceScrub`` or ``celeba299-ddh32 (ddh)``."""
    return DATA_NAMES.get(exp.dataset) or f"{os.path.basename(exp.data_root.rstrip(os.sep))} ({exp.dataset})"


def read_metrics(cell):
    """The cell's metrics.json as a dict, or None when the cell has not finished."""
    try:
        with open(cell.path("metrics.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def collect(exp):
    """(cell, metrics dict) of every finished cell, by method (as listed), code length and seed."""
    order = lambda c: (exp.methods.index(c.method), exp.bits.index(c.bits), exp.seeds.index(c.seed))  # noqa: E731
    return [(c, m) for c in sorted(exp.cells, key=order) for m in [read_metrics(c)] if m is not None]


def _write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_csv(exp, finished, path):
    keys = [k for k in METRIC_ORDER if any(k in m["metrics"] for _, m in finished)]
    keys += sorted({k for _, m in finished for k in m["metrics"]} - set(keys) - {"bits"})
    header = ["experiment", "dataset", "method", "bits", "seed", *keys, *RUN_COLUMNS]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for cell, m in finished:
        row = {"experiment": exp.name, "dataset": exp.dataset, "method": cell.method, "bits": cell.bits,
               "seed": cell.seed, **m["metrics"], **{k: m.get(k) for k in RUN_COLUMNS}}
        w.writerow(["" if row.get(k) is None else row[k] for k in header])
    _write_text(path, buf.getvalue())


def summarize(exp, finished, key):
    """{(method, bits): (mean, std or None, n seeds)} of metric ``key`` in %."""
    values = {}
    for cell, m in finished:
        if key in m["metrics"]:
            values.setdefault((cell.method, cell.bits), []).append(100 * m["metrics"][key])
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None, len(v))
            for k, v in values.items()}


def _cells(exp, stats):
    """Table cells as (text, is best) per (method, bits); best = highest mean shown (2 decimals)."""
    best = {b: max((round(s[0], 2) for (m, bb), s in stats.items() if bb == b), default=None) for b in exp.bits}
    out = {}
    for method in exp.methods:
        for b in exp.bits:
            s = stats.get((method, b))
            if s is None:
                out[method, b] = (None, False)
                continue
            mean, std, n = s
            text = f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")
            if n < len(exp.seeds):
                text += f" ({n}/{len(exp.seeds)} seeds)"
            out[method, b] = (text, round(mean, 2) == best[b])
    return out


def _caption(exp, title):
    seeds = ", ".join(map(str, exp.seeds))
    return (f"{title} (%) on {data_label(exp)}, experiment {exp.name}: mean ± standard deviation over "
            f"seeds {seeds} (n - 1 in the denominator; no deviation with one seed); the best mean of each "
            "code length in bold.")


def markdown_table(exp, finished, key, title):
    cells = _cells(exp, summarize(exp, finished, key))
    lines = [f"# {exp.name}: {title}", "", _caption(exp, title), "",
             "| method | " + " | ".join(f"{b} bits" for b in exp.bits) + " |",
             "| --- |" + " ---: |" * len(exp.bits)]
    for method in exp.methods:
        row = []
        for b in exp.bits:
            text, best = cells[method, b]
            row.append("—" if text is None else (f"**{text}**" if best else text))
        lines.append(f"| {method_name(method)} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _tex(text):
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("±", r"$\pm$")):
        text = text.replace(a, b)
    return text


def latex_table(exp, finished, key, title):
    cells = _cells(exp, summarize(exp, finished, key))
    lines = [f"% {exp.name}: {title}; needs \\usepackage{{booktabs}}", r"\begin{table}[t]", r"\centering",
             f"\\caption{{{_tex(_caption(exp, title))}}}", f"\\label{{tab:{exp.name}-{key}}}".replace("_", "-"),
             r"\begin{tabular}{l" + "r" * len(exp.bits) + "}", r"\toprule",
             "Method & " + " & ".join(f"{b} bits" for b in exp.bits) + r" \\", r"\midrule"]
    for method in exp.methods:
        row = []
        for b in exp.bits:
            text, best = cells[method, b]
            row.append("--" if text is None else (f"\\textbf{{{_tex(text)}}}" if best else _tex(text)))
        lines.append(f"{_tex(method_name(method))} & " + " & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _figure(path, draw, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    draw(ax)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def _seeds_text(n):
    return f"mean of {n} seed{'s' if n > 1 else ''}"


def figure_vs_bits(exp, finished, key, title, path):
    stats = summarize(exp, finished, key)
    n = max(s[2] for s in stats.values())

    def draw(ax):
        for method in exp.methods:
            pts = [(b, stats[method, b]) for b in exp.bits if (method, b) in stats]
            if pts:
                ax.errorbar([b for b, _ in pts], [s[0] / 100 for _, s in pts],
                            yerr=[(s[1] or 0) / 100 for _, s in pts], marker="o", ms=4, capsize=3,
                            label=method_name(method))
        ax.set(xlabel="code length (bits)", ylabel=title, xticks=exp.bits, ylim=(0, 1.02))
    _figure(path, draw, f"{title} — {data_label(exp)}\nexperiment {exp.name}, {_seeds_text(n)}")


def _mean_curves(finished, method, bits, curve, xkey):
    rows = [m["curves"][curve] for c, m in finished if c.method == method and c.bits == bits]
    if not rows:
        return None
    size = min(len(r[xkey]) for r in rows)
    avg = {k: [statistics.fmean(r[k][i] for r in rows) for i in range(size)] for k in ("precision", "recall")}
    return dict(avg, x=rows[0][xkey][:size], n=len(rows))


def figure_pr_curve(exp, finished, bits, path):
    curves = {m: _mean_curves(finished, m, bits, "pr_over_radius", "radius") for m in exp.methods}

    def draw(ax):
        for method, c in curves.items():
            if c:
                line, = ax.plot(c["recall"], c["precision"], marker="o", ms=3, label=method_name(method))
                if len(c["x"]) > 2:  # radius 2, the tables' radius
                    ax.plot([c["recall"][2]], [c["precision"][2]], marker="s", ms=7, mfc="none", color=line.get_color())
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
    n = max(c["n"] for c in curves.values() if c)
    _figure(path, draw, f"PR curve over Hamming radius 0..{bits} — {data_label(exp)}\n"
            f"experiment {exp.name}, {bits} bits, {_seeds_text(n)}; square: radius 2")


def figure_precision_at_n(exp, finished, bits, path):
    curves = {m: _mean_curves(finished, m, bits, "precision_at_n", "ranks") for m in exp.methods}

    def draw(ax):
        for method, c in curves.items():
            if c:
                ax.plot(c["x"], c["precision"], marker="o", ms=3, label=method_name(method))
        ax.set_xscale("log")
        ax.set(xlabel="number of top returned images N", ylabel="precision@N", ylim=(0, 1.02))
    n = max(c["n"] for c in curves.values() if c)
    _figure(path, draw, f"Precision@N over the Hamming ranking — {data_label(exp)}\n"
            f"experiment {exp.name}, {bits} bits, {_seeds_text(n)}")


def figure_bits(exp):
    """The code length of the PR and precision@N figures: ``figure_bits``, else the grid's longest."""
    return exp.figure_bits or max(exp.bits)


def write_report(exp):
    """Rewrite every report file of ``exp`` from its finished cells; returns the written paths."""
    finished = collect(exp)
    if not finished:
        return []
    os.makedirs(exp.out_dir, exist_ok=True)
    out = lambda name: os.path.join(exp.out_dir, name)  # noqa: E731
    paths = [out("results.csv")]
    write_csv(exp, finished, paths[0])
    for key, title in TABLES:
        _write_text(out(f"table_{key}.md"), markdown_table(exp, finished, key, title))
        _write_text(out(f"table_{key}.tex"), latex_table(exp, finished, key, title))
        paths += [out(f"table_{key}.md"), out(f"table_{key}.tex")]
    for key, title in TABLES:
        if any(key in m["metrics"] for _, m in finished):
            paths.append(out(f"fig_{key}_vs_bits.png"))
            figure_vs_bits(exp, finished, key, title, paths[-1])
    bits = figure_bits(exp)
    if any(c.bits == bits for c, _ in finished):  # drawn once a cell of that code length has finished
        paths += [out(f"fig_pr_curve_{bits}b.png"), out(f"fig_precision_at_n_{bits}b.png")]
        figure_pr_curve(exp, finished, bits, paths[-2])
        figure_precision_at_n(exp, finished, bits, paths[-1])
    return paths
