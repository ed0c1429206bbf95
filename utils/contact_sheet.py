"""A contact sheet of search results: one row per query, the query image then its results."""
import io
import os

import numpy as np

from utils.checkpoint import atomic_write
from utils.errors import UserInputError


def _result_image(load_image, path):
    try:
        return load_image(path)
    except UserInputError:
        return np.full((32, 32, 3), 128, np.uint8)  # moved or deleted since indexing


def write_sheet(queries, path, load_image, max_results=None, empty_text="no results"):
    """Write a PNG contact sheet: one row per query, the query image then its results.

    Args:
        queries: list of dicts ``image`` (path), ``identity`` (str or None) and ``results``
            (list of dicts ``path``, ``identity``, ``distance``), as ``search.py query`` makes.
        path: the PNG file to write (atomically).
        load_image: callable ``path -> (H, W, 3)`` RGB image (array or PIL image) for query and
            result paths, raising UserInputError when the file cannot be read (the search
            script passes ``data.gallery_images.GalleryImages()``). A result whose image is
            gone (moved or deleted since indexing) is shown as a gray square.
        max_results: results shown per row at most (default: all); "+n" marks the rest.
        empty_text: written in the row of a query without results (``search.py`` passes
            e.g. "no gallery item within Hamming radius 2").

    Results are titled with identity and distance; green title and border when the identity
    equals the query's (known from its parent folder), neutral otherwise.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or window state
    cols = 1 + max([len(q["results"][:max_results]) for q in queries] + [1])
    fig = Figure(figsize=(1.5 * cols, 1.8 * len(queries)))
    axes = fig.subplots(len(queries), cols, squeeze=False)
    for row, q in zip(axes, queries):
        for ax in row:
            ax.axis("off")
        row[0].imshow(load_image(q["image"]))
        row[0].set_title(f"query\n{q['identity'] if q['identity'] is not None else os.path.basename(q['image'])}",
                         fontsize=8, fontweight="bold")
        shown = q["results"][:max_results]
        if not shown:
            row[1].text(0.0, 0.5, empty_text, transform=row[1].transAxes, fontsize=9, va="center")
        for ax, r in zip(row[1:], shown):
            ax.imshow(_result_image(load_image, r["path"]))
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
