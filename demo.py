"""The demo behind ``make demo``: train a small DCDH model, evaluate it and search with it, as a user would.

    python demo.py          # drawn synthetic faces: about 2 minutes on 2 idle AVX2 cores
    python demo.py --real   # the real faces of ../shared/data/celeba299-ddh32 (development checkout):
                            # longer, and a weak model after its 3 epochs

By default it draws a synthetic set of faces (``data.synthetic.write_synthetic_faces``: 30
identities, each a face with its own shape, colouring, hair and features, drawn in every image
with another pose, expression, lighting, background and noise) under ``demo_out/``, sized to
finish in minutes on any CPU (``PLANNED_IMAGES_PER_S``). Runs the user commands as subprocesses:
``dcdh_train.py``, ``evaluation.py`` (with plots), ``search.py index`` and ``search.py query``
(with a contact sheet), then prints mAP next to chance level, the training speed it measured,
and says what the figures mean; at the first epoch it says so when this machine trains slower
than planned. Everything it writes is under ``demo_out/``.
"""
import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REAL = os.path.join(os.path.dirname(HERE), "shared", "data", "celeba299-ddh32")
OUT = os.path.join(HERE, "demo_out")
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from utils.errors import OneLineArgumentParser, quiet_broken_pipe  # noqa: E402

BITS = 12
SYNTHETIC = {"identities": 30, "train_per_id": 30, "test_per_id": 5, "epochs": 6, "bs": 64}
"""The synthetic run: 900 database and 150 query faces, 6 epochs = 5,400 training images: about 70 s
of training at the planned speed (``PLANNED_IMAGES_PER_S``)."""
REAL_EPOCHS, REAL_BS = 3, 256
PLANNED_IMAGES_PER_S = 80
"""Training speed the demo is sized for: DFHNet in fp32 on 2 idle AVX2 cores (AMD EPYC Zen 3 measured
about 80 images/s; CPUs with AMX train several times faster in bf16). Slower than ``SLOW_SHARE`` of
it, the demo says so at the first epoch."""
SLOW_SHARE = 2 / 3
"""The first epoch's speed (its warm-up batches included, so a little below the steady speed)
under this share of the planned speed gets the note: the training then takes at least 1.5x the
planned time."""
EPOCH_LINE = re.compile(r"^(?:\S+ \S+ )?\[epoch (\d+)/(\d+)\].*?, ([\d.]+) images/s")
QUERIES = 6
"""Test images searched for in the contact sheet (one per identity)."""


def run(cmd, on_line=None):
    """Run ``python cmd`` in the project folder, echoing its output line by line (``on_line(line)``
    sees each). Raises: subprocess.CalledProcessError when it fails."""
    print("+ python " + " ".join(os.path.relpath(c, HERE) if os.path.isabs(c) else c for c in cmd), flush=True)
    with subprocess.Popen([sys.executable] + cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1, env=dict(os.environ, PYTHONUNBUFFERED="1")) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            if on_line:
                on_line(line.rstrip("\n"))
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


class SpeedWatch:
    """Reads dcdh_train.py's epoch lines: the images/s of each epoch, and a note after the first one
    when training runs slower than the demo was planned for (``PLANNED_IMAGES_PER_S``)."""

    def __init__(self, images_per_epoch, planned=PLANNED_IMAGES_PER_S, say=print):
        self.images_per_epoch, self.planned, self.say, self.speeds = images_per_epoch, planned, say, []

    def __call__(self, line):
        m = EPOCH_LINE.search(line)
        if not m:
            return
        epoch, epochs, speed = int(m.group(1)), int(m.group(2)), float(m.group(3))
        self.speeds.append(speed)
        if epoch == 1 and speed < SLOW_SHARE * self.planned:
            left = self.images_per_epoch * (epochs - 1) / max(speed, 1e-9)
            self.say(f"demo: [note] training runs at {speed:.0f} images/s on this machine, slower than the "
                     f"{self.planned} images/s the demo is planned for (2 idle AVX2 cores, fp32): the "
                     f"{epochs - 1} epochs left take about {left / 60:.1f} min instead of "
                     f"{self.images_per_epoch * (epochs - 1) / self.planned / 60:.1f} (other jobs on the cores? "
                     "the [config] line above names the precision and the CPU capability)")

    def median(self):
        """Median images/s over the epochs seen, or None."""
        return statistics.median(self.speeds) if self.speeds else None


def split_labels(root, split):
    """Identity labels of a DDH-layout split, in file order (numpy arrays only, via the safe unpickler)."""
    from data.safe_pickle import load_arrays
    files = sorted(glob.glob(os.path.join(root, split, "*.pkl")))
    return np.concatenate([np.asarray(load_arrays(f)[1]).reshape(-1) for f in files]).astype(np.int64)


def chance_map(query_labels, db_labels):
    """Expected mAP of a uniformly random ranking of the database (``utils.metrics.chance_map``)."""
    from utils.metrics import chance_map as expected_random_map
    return expected_random_map(query_labels, db_labels)


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


def positive_int(text):
    """``--epochs`` value: an integer >= 1 (0 would train nothing; it is not taken as the default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be a positive integer")
    return value


def get_args_parser():
    p = OneLineArgumentParser(description="Train, evaluate and search with a small DCDH model (make demo).")
    p.add_argument("--real", action="store_true",
                   help=f"train on the real faces of {REAL} (a development checkout) instead of drawn ones: "
                   f"{REAL_EPOCHS} epochs of 4,992 images, several minutes on a CPU, a weak model")
    p.add_argument("--synthetic", action="store_true",
                   help="the drawn synthetic faces (the default; kept for older commands)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"training epochs (default {SYNTHETIC['epochs']} synthetic, {REAL_EPOCHS} real)")
    return p


def main(args):
    start = time.time()
    refusal = ("--real and --synthetic exclude each other; give one" if args.real and args.synthetic else
               f"--real: {REAL} not found (real faces are in a development checkout's ../shared); "
               "run without --real for the drawn faces" if args.real and not os.path.isdir(REAL) else None)
    if refusal:
        print(f"demo.py: {refusal}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(OUT, exist_ok=True)
    if args.real:
        root, epochs, bs, what = REAL, REAL_EPOCHS, REAL_BS, "real faces (CelebA, 299 identities, 32x32)"
        print(f"demo: real faces from {REAL} (CelebA, 299 identities, 32x32, DDH layout)")
    else:
        from data.synthetic import write_synthetic_faces
        s = SYNTHETIC
        root = write_synthetic_faces(os.path.join(OUT, "synthetic_faces"), identities=s["identities"],
                                     train_per_id=s["train_per_id"], test_per_id=s["test_per_id"])
        epochs, bs, what = s["epochs"], s["bs"], f"synthetic drawn faces ({s['identities']} identities, 32x32)"
        print(f"demo: drew a SYNTHETIC set of {s['identities']} face identities "
              f"({s['train_per_id']} training + {s['test_per_id']} test images each, 32x32, DDH layout) "
              f"in {os.path.relpath(root, HERE)}; each image shows its identity's face with its own "
              "pose, expression, lighting, background and noise")
    epochs = args.epochs or epochs
    name = f"demo{BITS}"
    model = os.path.join(OUT, f"{name}.tar")
    metrics_json, plots = os.path.join(OUT, f"{name}.json"), os.path.join(OUT, "plots")
    index, sheet, hits = os.path.join(OUT, "gallery.index"), os.path.join(OUT, "search_sheet.png"), \
        os.path.join(OUT, "search.json")

    speed = SpeedWatch(len(split_labels(root, "train")))
    train_start = time.time()
    run(["dcdh_train.py", "--dataset", "ddh", "--data-root", root, "--len", str(BITS), "--epochs", str(epochs),
         "--bs", str(bs), "--lr", "0.005", "--eval-every", "0", "--device", "cpu",
         "--checkpoint-dir", OUT, "--save", f"{name}.tar"], on_line=speed)
    train_s = time.time() - train_start
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
    from utils.device import cpu_capability, cpu_model
    print(f"demo: {what}, {BITS}-bit codes, {epochs} epochs, {time.time() - start:.0f} s in all "
          f"({train_s:.0f} s of it training)")
    ips = speed.median()
    print(f"demo: training speed measured here: "
          + (f"{ips:.0f} images/s (median over epochs)" if ips is not None else "unknown (no epoch line read)")
          + f" on {cpu_model()} (torch CPU capability {cpu_capability()}); the demo is planned for "
          f"{PLANNED_IMAGES_PER_S} images/s (2 idle AVX2 cores, fp32)")
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
        quiet_broken_pipe(main)(get_args_parser().parse_args())
    except subprocess.CalledProcessError as e:
        sys.exit(e.returncode)
