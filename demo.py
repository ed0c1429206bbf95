"""The demo behind ``make demo``: train a small DCDH model, evaluate it and search with it, as a user would.

    python demo.py               # real faces of ../shared when present, else drawn synthetic faces
    python demo.py --synthetic   # always the synthetic faces (what a fresh clone gets)

Uses the real faces of ``../shared/data/celeba299-ddh32`` when that folder exists (a
development checkout), else draws a synthetic set of faces (``data.synthetic.write_synthetic_faces``:
30 identities, each a face with its own shape, colouring, hair and features, drawn in every
image with another pose, expression, lighting, background and noise) under ``demo_out/``.
Runs the user commands as subprocesses: ``dcdh_train.py``, ``evaluation.py`` (with plots),
``search.py index`` and ``search.py query`` (with a contact sheet), then prints mAP next to
chance level and says what the figures mean. Everything it writes is under ``demo_out/``.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REAL = os.path.join(os.path.dirname(HERE), "shared", "data", "celeba299-ddh32")
OUT = os.path.join(HERE, "demo_out")
if HERE not in sys.path:
    sys.path.insert(0, HERE)

BITS = 12
SYNTHETIC = {"identities": 30, "train_per_id": 40, "test_per_id": 5, "epochs": 10, "bs": 64}
"""The synthetic run: 1,200 database and 150 query faces, about a minute of training on 2 CPU cores."""
REAL_EPOCHS, REAL_BS = 3, 256
QUERIES = 6
"""Test images searched for in the contact sheet (one per identity)."""


def run(cmd):
    print("+ python " + " ".join(os.path.relpath(c, HERE) if os.path.isabs(c) else c for c in cmd), flush=True)
    subprocess.run([sys.executable] + cmd, cwd=HERE, check=True)


def split_labels(root, split):
    """Identity labels of a DDH-layout split, in file order (numpy arrays only, via the safe unpickler)."""
    from data.safe_pickle import load_arrays
    files = sorted(glob.glob(os.path.join(root, split, "*.pkl")))
    return np.concatenate([np.asarray(load_arrays(f)[1]).reshape(-1) for f in files]).astype(np.int64)


def chance_map(query_labels, db_labels):
    """Expected mAP of a uniformly random ranking of the database.

    For a query with R relevant items among N, the expected AP is
    ``H_N / N + (R - 1) / (N - 1) * (1 - H_N / N)`` (H_N the N-th harmonic number): the sum over
    ranks k of P(rel_k) * E[precision@k | rel_k] / R. Slightly above R / N, the share of the
    identity; a query whose identity is absent from the database counts 0.
    """
    n = len(db_labels)
    ids, counts = np.unique(db_labels, return_counts=True)
    relevant = dict(zip(ids.tolist(), counts.tolist()))
    h_n = float(np.sum(1.0 / np.arange(1, n + 1)))

    def expected_ap(r):
        if r == 0:
            return 0.0
        return h_n / n + ((r - 1) / (n - 1) if n > 1 else 0.0) * (1 - h_n / n)
    return float(np.mean([expected_ap(relevant.get(int(y), 0)) for y in query_labels]))


def class_names(root):
    """``classes.txt`` (lines ``label name``) as a dict; labels themselves when it is absent."""
    path = os.path.join(root, "classes.txt")
    names = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.split(None, 1)
                if len(parts) == 2 and parts[0].lstrip("-").isdigit():
                    names[int(parts[0])] = parts[1].strip()
    return names


def write_queries(root, folder, count):
    """Write the first test image of ``count`` identities as ``folder/<identity>/<n>.png``; returns the paths.

    The parent folder names the identity, so ``search.py query`` marks the matching results.
    """
    from PIL import Image

    from data.safe_pickle import load_arrays
    path = sorted(glob.glob(os.path.join(root, "test", "*.pkl")))[0]
    data, labels = (np.asarray(a) for a in load_arrays(path))
    names = class_names(root)
    out, seen = [], set()
    for row, y in enumerate(labels.reshape(-1).tolist()):
        if y in seen:
            continue
        seen.add(y)
        name = names.get(y, str(y))
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        png = os.path.join(folder, name, f"test_{row}.png")
        Image.fromarray(data[row].reshape(3, 32, 32).transpose(1, 2, 0).astype(np.uint8)).save(png)
        out.append(png)
        if len(out) == count:
            break
    return out


def distinct_codes(index_dir):
    """How many distinct binary codes the indexed gallery has (a collapsed model has few), or None."""
    try:
        import faiss
        index = faiss.read_index_binary(os.path.join(index_dir, "index.bin"))
        codes = faiss.vector_to_array(index.xb).reshape(index.ntotal, -1)
        return len(np.unique(codes, axis=0))
    except Exception:  # only a remark in the summary; never fail the demo for it
        return None


def get_args_parser():
    p = argparse.ArgumentParser(description="Train, evaluate and search with a small DCDH model (make demo).")
    p.add_argument("--synthetic", action="store_true",
                   help=f"use the drawn synthetic faces even when {REAL} exists")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (default {SYNTHETIC['epochs']} synthetic, {REAL_EPOCHS} real)")
    return p


def main(args):
    start = time.time()
    os.makedirs(OUT, exist_ok=True)
    if os.path.isdir(REAL) and not args.synthetic:
        root, epochs, bs, what = REAL, REAL_EPOCHS, REAL_BS, "real faces (CelebA, 299 identities, 32x32)"
        print(f"demo: real faces from {REAL} (CelebA, 299 identities, 32x32, DDH layout)")
    else:
        from data.synthetic import write_synthetic_faces
        s = SYNTHETIC
        root = write_synthetic_faces(os.path.join(OUT, "synthetic_faces"), identities=s["identities"],
                                     train_per_id=s["train_per_id"], test_per_id=s["test_per_id"])
        epochs, bs, what = s["epochs"], s["bs"], f"synthetic drawn faces ({s['identities']} identities, 32x32)"
        why = "--synthetic" if os.path.isdir(REAL) else f"{REAL} not found"
        print(f"demo: {why}; drew a SYNTHETIC set of {s['identities']} face identities "
              f"({s['train_per_id']} training + {s['test_per_id']} test images each, 32x32, DDH layout) "
              f"in {os.path.relpath(root, HERE)}; each image shows its identity's face with its own "
              "pose, expression, lighting, background and noise")
    epochs = args.epochs or epochs
    name = f"demo{BITS}"
    model = os.path.join(OUT, f"{name}.tar")
    metrics_json, plots = os.path.join(OUT, f"{name}.json"), os.path.join(OUT, "plots")
    index, sheet, hits = os.path.join(OUT, "gallery.index"), os.path.join(OUT, "search_sheet.png"), \
        os.path.join(OUT, "search.json")

    run(["dcdh_train.py", "--dataset", "ddh", "--data-root", root, "--len", str(BITS), "--epochs", str(epochs),
         "--bs", str(bs), "--lr", "0.005", "--eval-every", "0", "--device", "cpu",
         "--checkpoint-dir", OUT, "--save", f"{name}.tar"])
    run(["evaluation.py", "--load", model, "--dataset", "ddh", "--data-root", root, "--device", "cpu",
         "--json", metrics_json, "--plot-dir", plots])
    run(["search.py", "index", "--load", model, "--gallery", root, "--split", "train", "--out", index,
         "--device", "cpu"])
    queries = write_queries(root, os.path.join(OUT, "queries"), QUERIES)
    run(["search.py", "query", "--index", index, *queries, "--topk", "8", "--sheet", sheet, "--json", hits,
         "--device", "cpu"])

    with open(metrics_json, encoding="utf-8") as f:
        m = json.load(f)
    q_labels, db_labels = split_labels(root, "test"), split_labels(root, "train")
    chance = chance_map(q_labels, db_labels)
    ids = len(np.unique(db_labels))
    codes = distinct_codes(index)
    print()
    print(f"demo: {what}, {BITS}-bit codes, {epochs} epochs, {time.time() - start:.0f} s in all")
    print(f"demo: mAP {100 * m['map']:.2f}%   chance level {100 * chance:.2f}%   "
          f"({m['map'] / chance:.0f}x chance)   precision@10 {100 * m['precision_at_10']:.2f}%")
    print(f"demo: what this means: each of the {m['num_queries']:,} test faces was used as a query to rank the "
          f"{m['num_database']:,} training faces by the Hamming distance between their {BITS}-bit codes; mAP is "
          "100% when every face of the query's identity comes before every other face, and a random ranking "
          f"gets the chance level, a little above the share of each identity in the database (1/{ids})"
          + (f"; the {m['num_database']:,} training faces got {codes:,} distinct codes "
             f"(a collapsed model gives a handful)" if codes is not None else "") + ".")
    if root == REAL:
        print(f"demo: {epochs} epochs on {ids} real identities give a weak model; the README's results table "
              "shows what longer training gives.")
    print("demo: files to open:")
    for path, about in ((model, "the trained model (checkpoint)"), (metrics_json, "all metrics and curves"),
                        (os.path.join(plots, "precision_at_n.png"), "precision over the ranking"),
                        (os.path.join(plots, "pr_over_radius.png"), "precision/recall within each Hamming radius"),
                        (sheet, f"{len(queries)} test faces and their 8 nearest training faces "
                                "(green: same identity)"),
                        (hits, "the search results as JSON")):
        flag = "" if os.path.exists(path) else "   (MISSING)"
        print(f"  {os.path.relpath(path, HERE)}: {about}{flag}")


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except subprocess.CalledProcessError as e:
        sys.exit(e.returncode)
