"""A contact sheet of search results: one row per query, the query image then its results."""
import io
import os

import numpy as np

from data.folder import open_image
from data.safe_pickle import load_arrays
from utils.checkpoint import atomic_write
from utils.errors import UserInputError


def _gallery_image(path, cache):
    """An RGB uint8 (H, W, 3) array for a gallery path (an image file or ``file.pkl#row``)."""
    if "#" in path and path.rsplit("#", 1)[0].endswith(".pkl"):
        file, row = path.rsplit("#", 1)
        if file not in cache:
            cache[file] = np.asarray(load_arrays(file)[0])
        x = cache[file][int(row)].reshape(3, 32, 32).transpose(1, 2, 0)
        if x.dtype != np.uint8:
            x = np.clip((x - x.min()) / max(float(x.max() - x.min()), 1e-12) * 255, 0, 255).astype(np.uint8)
        return x
    try:
        return np.asarray(open_image(path, flag="gallery image"))
    except UserInputError:
        return np.full((32, 32, 3), 128, np.uint8)  # moved or deleted since indexing


def write_sheet(queries, path, max_results=None):
    """Write a PNG contact sheet: one row per query, the query image then its results.

    Results are titled with identity and distance; green title and border when the identity
    equals the query's (known from its parent folder), neutral otherwise. At most
    ``max_results`` (default: all) results per row. Written atomically.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or window state
    cols = 1 + max([len(q["results"][:max_results]) for q in queries] + [1])
    fig = Figure(figsize=(1.5 * cols, 1.8 * len(queries)))
    cache = {}
    axes = fig.subplots(len(queries), cols, squeeze=False)
    for row, q in zip(axes, queries):
        for ax in row:
            ax.axis("off")
        row[0].imshow(np.asarray(open_image(q["image"])))
        row[0].set_title(f"query\n{q['identity'] if q['identity'] is not None else os.path.basename(q['image'])}",
                         fontsize=8, fontweight="bold")
        shown = q["results"][:max_results]
        for ax, r in zip(row[1:], shown):
            ax.imshow(_gallery_image(r["path"], cache))
            same = q["identity"] is not None and r["identity"] == q["identity"]
            color = "green" if same else "black"
            ax.set_title(f"{r['identity']}\nd={r['distance']}", fontsize=8, color=color)
            if same:
                ax.axis("on")
                ax.set_xticks([])
                ax.set_yticks([])
                for s in ax.spines.values():
                    s.set_edgecolor("green")
                    s.set_linewidth(3)
        if len(q["results"]) > len(shown):
            row[-1].text(1.02, 0.5, f"+{len(q['results']) - len(shown)}", transform=row[-1].transAxes, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
