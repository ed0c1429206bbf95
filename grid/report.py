"""The report of a grid, from the ``metrics.json`` of its finished cells (any shard's):

* ``results.csv``: a row per finished cell, by method (as listed), code length and seed;
* ``table_<metric>.md`` / ``.tex`` for mAP and precision / recall within Hamming radius 2:
  methods x code lengths, mean ± standard deviation over seeds (in %), best of each column in bold;
* figures (PNG): mAP, precision and recall within radius 2 against code length; the PR curve over
  Hamming radii and precision@N over the ranking at one code length (``figure_bits``);
* with ``unseen_identities`` (identities held out of training): ``table_map_unseen`` beside
  ``table_map`` and ``fig_map_protocols_vs_bits.png`` (mAP against code length, both protocols);
  tables of mAP end with a chance-level row when the cells recorded it.

A cell counts as finished only when its ``metrics.json`` parses and holds what a finished cell
writes (``check_metrics``); any other is named in a one-line warning and left out. Every file is
written atomically (a temporary file, then ``os.replace``); the report can be rebuilt at any time
(``reproduce.py --report``).
"""
import csv
import io
import json
import os
import statistics
import textwrap

from utils.checkpoint import atomic_write

MEASURED = ("train_s", "eval_s", "wall_s", "images_per_s", "finished")
"""Columns of results.csv that are measurements (time, speed, date): they differ between two runs
of the same grid. ``MACHINE`` names the machine; every other column is determined by the code,
the data, the settings (``threads`` included) and the machine's kind (``precision`` follows ``amp``
and whether the CPU has native bf16)."""

MACHINE = ("cpu_model", "cpu_capability", "gpu_name")
"""Columns of results.csv naming the machine a cell ran on (empty for cells recorded before
issue 21, which did not record it)."""

METRIC_ORDER = ("map", "map_tie_aware", "chance_map", "real_map", "precision_at_1", "precision_at_5",
                "precision_at_10", "precision_radius_2", "recall_radius_2", "queries_without_relevant",
                "num_queries", "num_database", "map_unseen", "map_tie_aware_unseen", "chance_map_unseen",
                "real_map_unseen")
RUN_COLUMNS = ("epochs", "epochs_run", "best_epoch", "best_loss", "backbone", "image_size", "amp", "precision",
               "threads", "train_s", "eval_s", "wall_s", "images_per_s", "device", *MACHINE, "code_version",
               "finished")
TABLES = (("map", "mAP"), ("precision_radius_2", "precision within Hamming radius 2"),
          ("recall_radius_2", "recall within Hamming radius 2"))
UNSEEN_TABLES = (("map_unseen", "mAP on identities held out of training"),)
"""Tables of the unseen-identities protocol, written when the cells report it (``unseen_identities``)."""
CHANCE = {"map": "chance_map", "map_unseen": "chance_map_unseen"}
"""The chance level (expected mAP of a random ranking) shown under a table of mAP, when recorded."""
DATA_NAMES = {"facescrub": "FaceScrub", "youtube": "YouTube Faces", "vggface2": "VGGFace2"}
METHOD_NAMES = {"orthohash": "OrthoHash", "classifier": "classifier codes"}


def method_name(method):
    return METHOD_NAMES.get(method, method.upper())


def data_label(exp):
    """``FaceScrub`` or ``celeba299-ddh32 (ddh)``."""
    return DATA_NAMES.get(exp.dataset) or f"{os.path.basename(exp.data_root.rstrip(os.sep))} ({exp.dataset})"


REQUIRED_METRICS = tuple(key for key, _ in TABLES)
"""Metrics every finished cell's ``metrics.json`` holds (the tables' and the runner's lines)."""

CURVES = {"pr_over_radius": ("radius", "precision", "recall"), "precision_at_n": ("ranks", "precision", "recall")}
"""The curves of a finished cell's ``metrics.json`` and their lists (one length per curve)."""


def _json_type(value):
    """The JSON name of a parsed value's type (object, array, string, number, true/false, null)."""
    return {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metrics_problem(m, cell):
    """Why ``m`` (a parsed ``metrics.json``) is not the record of the finished ``cell``, in a few
    words; None when it is one.

    A finished cell's record is a JSON object with ``metrics`` (an object of numbers, nulls or
    nested objects, with the numbers ``REQUIRED_METRICS``), ``curves`` (``CURVES``: non-empty lists of numbers,
    one length per curve), ``epochs_run`` and ``best_epoch`` (integers >= 1); its ``cell``,
    ``method``, ``bits`` and ``seed``, where present, are ``cell``'s (a file copied from another
    cell is refused).
    """
    if not isinstance(m, dict):
        return f"expected a JSON object, got {_json_type(m)}"
    metrics = m.get("metrics")
    if not isinstance(metrics, dict):
        return ("no 'metrics' object" if metrics is None
                else f"'metrics' is {_json_type(metrics)}, expected an object")
    for key in REQUIRED_METRICS:
        if key not in metrics:
            return f"no '{key}' in 'metrics'"
    clash = sorted(set(metrics) & {"experiment", "dataset", "method", "seed", *RUN_COLUMNS})
    if clash:
        return f"'metrics' holds '{clash[0]}', a column of its own in results.csv"
    for key, value in metrics.items():
        if not (_is_number(value) or (key not in REQUIRED_METRICS and (value is None or isinstance(value, dict)))):
            return f"metrics '{key}' is {value!r:.40}, expected a number"
    for key in REQUIRED_METRICS:  # fractions: a NaN or a 5.0 would print as a figure in the tables
        if not 0.0 <= metrics[key] <= 1.0:
            return f"metrics '{key}' is {metrics[key]!r:.40}, expected a fraction in [0, 1]"
    curves = m.get("curves")
    if not isinstance(curves, dict):
        return "no 'curves' object" if curves is None else f"'curves' is {_json_type(curves)}, expected an object"
    for name, keys in CURVES.items():
        curve = curves.get(name)
        if not isinstance(curve, dict):
            return f"no '{name}' object in 'curves'"
        lists = [curve.get(k) for k in keys]
        for key, values in zip(keys, lists):
            if not isinstance(values, list) or not values or not all(_is_number(v) for v in values):
                return f"curves '{name}' '{key}' is not a non-empty list of numbers"
        if len({len(v) for v in lists}) > 1:
            return f"curves '{name}': {', '.join(keys)} differ in length"
    for key in ("epochs_run", "best_epoch"):
        value = m.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return f"'{key}' is {value!r:.40}, expected an integer >= 1" if key in m else f"no '{key}'"
    for key, want in (("cell", cell.name), ("method", cell.method), ("bits", cell.bits), ("seed", cell.seed)):
        if key in m and m[key] != want:
            return f"its {key} is {m[key]!r:.40}, not this cell's {want!r} (another cell's file?)"
    return None


def check_metrics(cell):
    """Read and check the cell's ``metrics.json``.

    Returns: ``(dict, None)`` for a finished cell; ``(None, None)`` when there is no such file
    (the cell has not finished); ``(None, problem)`` when the file is there but does not parse or
    is not a finished cell's record (``metrics_problem``): such a cell is not finished.
    """
    path = cell.path("metrics.json")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    try:
        m = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        return None, f"not valid JSON ({str(e).splitlines()[0][:80]})"
    problem = metrics_problem(m, cell)
    return (None, problem) if problem else (m, None)


def read_metrics(cell):
    """The cell's metrics.json as a dict, or None when the cell has not finished (no file, or a
    file that is not a finished cell's record: ``check_metrics``)."""
    return check_metrics(cell)[0]


def bad_metrics_line(cell, problem):
    """The one-line warning for a cell whose ``metrics.json`` is there but unusable (``problem``:
    ``check_metrics``'s words); the runner and ``reproduce.py --report`` print the same line."""
    return (f"warning: {cell.path('metrics.json')}: {problem}; the cell is not counted as finished "
            "(left out of the report); running the grid sets the file aside and evaluates or trains "
            "the cell again")


def collect(exp, warn=None):
    """(cell, metrics dict) of every finished cell, by method (as listed), code length and seed.

    ``warn``: called with ``bad_metrics_line`` for each cell whose ``metrics.json`` is unusable."""
    order = lambda c: (exp.methods.index(c.method), exp.bits.index(c.bits), exp.seeds.index(c.seed))  # noqa: E731
    finished = []
    for cell in sorted(exp.cells, key=order):
        m, problem = check_metrics(cell)
        if problem and warn:
            warn(bad_metrics_line(cell, problem))
        if m is not None:
            finished.append((cell, m))
    return finished


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
        if row["precision"] is None and isinstance(row["amp"], bool):  # recorded before issue 21
            row["precision"] = "bf16" if row["amp"] else "fp32"
        w.writerow(["" if row.get(k) is None else row[k] for k in header])
    _write_text(path, buf.getvalue())


def summarize(exp, finished, key):
    """{(method, bits): (mean, std or None, n seeds)} of metric ``key`` in %."""
    values = {}
    for cell, m in finished:
        if _is_number(m["metrics"].get(key)):  # an optional metric may be null or absent
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


def _chance_row(exp, finished, key):
    """{bits: text or None} of the chance level under a table of ``key`` (``CHANCE``; mean over the
    finished cells of each code length, in %: it depends on the data split only), or None."""
    values = {}
    for cell, m in finished:
        if CHANCE.get(key) and _is_number(m["metrics"].get(CHANCE[key])):
            values.setdefault(cell.bits, []).append(100 * m["metrics"][CHANCE[key]])
    if not values:
        return None
    return {b: f"{statistics.fmean(values[b]):.2f}" if b in values else None for b in exp.bits}


def markdown_table(exp, finished, key, title):
    cells = _cells(exp, summarize(exp, finished, key))
    chance = _chance_row(exp, finished, key)
    lines = [f"# {exp.name}: {title}", "", _caption(exp, title), "",
             "| method | " + " | ".join(f"{b} bits" for b in exp.bits) + " |",
             "| --- |" + " ---: |" * len(exp.bits)]
    for method in exp.methods:
        row = []
        for b in exp.bits:
            text, best = cells[method, b]
            row.append("—" if text is None else (f"**{text}**" if best else text))
        lines.append(f"| {method_name(method)} | " + " | ".join(row) + " |")
    if chance:
        lines.append("| chance level | " + " | ".join(chance[b] or "—" for b in exp.bits) + " |")
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
    chance = _chance_row(exp, finished, key)
    if chance:
        lines += [r"\midrule", "chance level & " + " & ".join(chance[b] or "--" for b in exp.bits) + r" \\"]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


TITLE_WIDTH = 72
"""Characters per title line of a figure at most (a 6-inch figure at 10 pt); a line still wider
than the figure (wide letters) is wrapped narrower until it fits."""


def wrap_title(title, width=TITLE_WIDTH):
    """``title`` with each of its lines wrapped at ``width`` characters, so that none is wider
    than the figure (matplotlib does not wrap, and centres a long line past both edges)."""
    return "\n".join(textwrap.fill(line, width, break_on_hyphens=False) or line for line in title.split("\n"))


def _figure(path, draw, title, legend_columns=1):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    draw(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8 if legend_columns == 1 else 7, ncol=legend_columns)
    for width in range(TITLE_WIDTH, 20, -6):  # narrower lines until the title fits (wide letters, '_')
        text = ax.set_title(wrap_title(title, width), fontsize=10)
        fig.tight_layout()
        box = text.get_window_extent(fig.canvas.get_renderer())
        if box.x0 >= 0 and box.x1 <= fig.bbox.width:
            break
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


def figure_protocols_vs_bits(exp, finished, path):
    """mAP against code length under both protocols: trained identities (solid line, filled circle)
    and identities held out of training (dashed, open square), one colour per method; chance levels
    in grey. With a single code length, two bars per method instead (``_protocol_bars``): points on
    one vertical line would hide each other."""
    trained, unseen = summarize(exp, finished, "map"), summarize(exp, finished, "map_unseen")
    n = max(s[2] for s in list(trained.values()) + list(unseen.values()))
    held = (f"{exp.unseen_identities} identities held out of training" if exp.unseen_identities
            else "held-out identities")
    if len(exp.bits) == 1:
        _figure(path, lambda ax: _protocol_bars(ax, exp, finished, trained, unseen),
                f"mAP, trained and unseen identities, {exp.bits[0]} bits — {data_label(exp)}\n"
                f"{held}; experiment {exp.name}, {_seeds_text(n)}")
        return

    def draw(ax):
        for i, method in enumerate(exp.methods):
            for stats, style, mark, where in ((trained, "-", "o", "trained identities"),
                                              (unseen, "--", "s", "unseen identities")):
                pts = [(b, stats[method, b]) for b in exp.bits if (method, b) in stats]
                if pts:
                    ax.errorbar([b for b, _ in pts], [s[0] / 100 for _, s in pts],
                                yerr=[(s[1] or 0) / 100 for _, s in pts], marker=mark, ms=5, capsize=3,
                                mfc="none" if mark == "s" else None, linestyle=style, color=f"C{i % 10}",
                                label=f"{method_name(method)}, {where}")
        for key, style, mark in (("map", "-", "o"), ("map_unseen", "--", "s")):
            chance = _chance_row(exp, finished, key)
            pts = [(b, float(chance[b])) for b in exp.bits if chance and chance[b]]
            if pts:
                ax.plot([b for b, _ in pts], [v / 100 for _, v in pts], linestyle=style, marker=mark, ms=4,
                        mfc="none" if mark == "s" else None, color="0.6",
                        label="chance, " + ("trained" if key == "map" else "unseen") + " identities")
        ax.set(xlabel="code length (bits)", ylabel="mAP", xticks=exp.bits, ylim=(0, 1.02))
    _figure(path, draw, f"mAP, trained and unseen identities — {data_label(exp)}\n"
            f"{held}; experiment {exp.name}, {_seeds_text(n)}", legend_columns=2 if len(exp.methods) > 3 else 1)


def _protocol_bars(ax, exp, finished, trained, unseen):
    """Two bars per method at the grid's one code length: trained identities (filled) and unseen
    identities (hatched), mean with the seeds' standard deviation; chance levels as grey lines."""
    bits, width = exp.bits[0], 0.38
    for i, method in enumerate(exp.methods):
        for stats, shift, where in ((trained, -width / 2, "trained"), (unseen, width / 2, "unseen")):
            if (method, bits) in stats:
                mean, std, _ = stats[method, bits]
                ax.bar(i + shift, mean / 100, width, yerr=None if std is None else std / 100, capsize=3,
                       color=f"C{i % 10}", alpha=1.0 if where == "trained" else 0.45,
                       hatch=None if where == "trained" else "//", edgecolor="black", linewidth=0.5)
    from matplotlib.patches import Rectangle
    for where, alpha, hatch in (("trained", 1.0, None), ("unseen", 0.45, "//")):  # the legend's keys, in grey
        ax.add_patch(Rectangle((0, 0), 0, 0, facecolor="0.55", alpha=alpha, hatch=hatch, edgecolor="black",
                               linewidth=0.5, label=f"{where} identities"))
    for key, style, where in (("map", "-", "trained"), ("map_unseen", "--", "unseen")):
        chance = _chance_row(exp, finished, key)
        if chance and chance[bits]:
            ax.axhline(float(chance[bits]) / 100, color="0.4", linestyle=style, linewidth=1,
                       label=f"chance, {where} identities")
    ax.set_xticks(range(len(exp.methods)), [method_name(m) for m in exp.methods], rotation=20, ha="right")
    ax.set(ylabel="mAP", ylim=(0, 1.02), xlim=(-0.6, len(exp.methods) - 0.4))


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


def write_report(exp, warn=None):
    """Rewrite every report file of ``exp`` from its finished cells (each ``metrics.json``
    checked first: ``check_metrics``); returns the written paths. ``warn`` is called with the
    one-line warning of each cell whose ``metrics.json`` is unusable (left out)."""
    finished = collect(exp, warn)
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
    for key, title in UNSEEN_TABLES:
        if any(key in m["metrics"] for _, m in finished):
            if exp.unseen_identities:
                title = f"mAP on the {exp.unseen_identities} identities held out of training"
            _write_text(out(f"table_{key}.md"), markdown_table(exp, finished, key, title))
            _write_text(out(f"table_{key}.tex"), latex_table(exp, finished, key, title))
            paths += [out(f"table_{key}.md"), out(f"table_{key}.tex")]
    for key, title in TABLES:
        if any(key in m["metrics"] for _, m in finished):
            paths.append(out(f"fig_{key}_vs_bits.png"))
            figure_vs_bits(exp, finished, key, title, paths[-1])
    if any("map_unseen" in m["metrics"] for _, m in finished):
        paths.append(out("fig_map_protocols_vs_bits.png"))
        figure_protocols_vs_bits(exp, finished, paths[-1])
    bits = figure_bits(exp)
    if any(c.bits == bits for c, _ in finished):  # drawn once a cell of that code length has finished
        paths += [out(f"fig_pr_curve_{bits}b.png"), out(f"fig_precision_at_n_{bits}b.png")]
        figure_pr_curve(exp, finished, bits, paths[-2])
        figure_precision_at_n(exp, finished, bits, paths[-1])
    return paths
