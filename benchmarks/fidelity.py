"""Training fidelity: the project's DCDH training loop against a loop in the authors' style.

    python benchmarks/fidelity.py --loop project --seed 0 --json out.json
    python benchmarks/fidelity.py --loop authors --seed 0 --json out.json
    python benchmarks/fidelity.py --loop project --pull authors --seed 0    # one difference switched

Trains DFHNet (48 bits by default) with the DCDH loss on a DDH-layout set (default
``../shared/data/celeba299-ddh32``) for ``--epochs`` epochs in float32 on the CPU, with the
authors' defaults (batch 256, Adam lr 0.005, amsgrad on the network, weight decay 1e-4 on the
network and the centers, sigma 0.25, lambda 0.1, eta 0.01), and evaluates at ``--eval-at``
epochs with the project's metric functions (``utils.metrics``): mAP (ties by database index),
tie-aware mAP, and both again on the authors' "center codes" (each item's code replaced by the
sign of its nearest class center in Hamming distance, their ``compute_result(..., centers)``).

``--loop`` sets every switch to one side; each switch then changes one difference alone:

* ``--pull``: ``project`` = ``methods.dcdh.pull_loss`` (log_softmax); ``authors`` = their
  ``exp(-s/2 d) / (sum exp(-s/2 d) + 1e-6)`` then ``-log(p + 1e-6)``.
* ``--regression``: ``mean`` = ``methods.dcdh.regression_codes`` (W = per-class mean of sign(h),
  the pseudo-inverse); ``ridge`` = their ``W = inverse(Y^T Y + I) Y^T sign(h)`` (sum / (count + 1))
  with ``torch.sign`` (sign(0) = 0).
* ``--data``: ``project`` = ``data.make_loader`` over the uint8 ``DDHSplit`` (``DeviceBatches``,
  normalised per batch in float32, generator seeded ``seed * 100003 + epoch`` as in
  ``dcdh_train.py``); ``authors`` = their per-sample Dataset (float64 split normalised once,
  HWC, ``ToTensor``) and ``DataLoader(shuffle=True)`` drawing from the global torch RNG.
* ``--step``: ``project`` = ``engine.loop.train_one_epoch``; ``authors`` = a plain loop
  (zero_grad, forward, loss, backward, step, ``.item()`` per batch).
* ``--layout``: ``channels_last`` (the project's network and inputs) or ``nchw`` (the authors').
  Only the convolutions' rounding differs; NCHW is about 2x slower in float32 on this CPU.
* ``--adam``: ``fused`` = ``engine.recipes.build_optimizer`` (fused Adam); ``plain`` = the same
  groups with the default (for-each) Adam, as the authors.

The push term is always ``methods.dcdh.push_loss`` (the authors' diagonal constant added on the
authors' side only: it shifts the printed loss, not the gradients). Both sides seed torch with
``--seed`` and build the network, then the centers (the authors' order); the authors never seed.

Per epoch it also records two diagnostics of the differences: the fraction of samples whose
true-class probability is below 1e-6 (where ``log(p + 1e-6)`` flattens the authors' gradient)
the fraction of target bits where ridge and mean regression give different B, and the mean
relative difference ``||g_authors - g_project|| / ||g_project||`` of the two pull terms' gradients
(w.r.t. codes and centers) on each batch.

Prints one line per epoch and a table at the end; ``--json`` writes everything.
``--summarize A.json B.json ...`` prints one table of several runs' JSON files (no training).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data import build_datasets, make_loader, training_view  # noqa: E402
from engine.loop import train_one_epoch  # noqa: E402
from engine.recipes import build_optimizer, learning_rate, resolve_recipe  # noqa: E402
from methods.dcdh import DCDH, pull_loss, push_loss, regression_codes, squared_distances  # noqa: E402
from models import build_model  # noqa: E402
from utils.metrics import binarize, mean_average_precision, tie_aware_map  # noqa: E402

SWITCHES = {"pull": ("project", "authors"), "regression": ("mean", "ridge"), "data": ("project", "authors"),
            "step": ("project", "authors"), "adam": ("fused", "plain"), "layout": ("channels_last", "nchw")}
"""Each switch: (project's value, authors' value)."""

EPS = 1e-6
"""The authors' epsilon in the pull term (their ``loss.py``)."""


def authors_pull(codes, labels, centers, sigma):
    """The authors' pull term: ``-mean_i log(p_iy + 1e-6)``, ``p = exp(l) / (sum exp(l) + 1e-6)``,
    ``l = -sigma/2 d`` with their distance arithmetic (no clamp)."""
    b, c = codes.shape[0], centers.shape[0]
    d = codes.pow(2).sum(1, keepdim=True).expand(b, c) + centers.pow(2).sum(1, keepdim=True).expand(c, b).t()
    d = d.addmm(codes, centers.t(), beta=1, alpha=-2)
    e = torch.exp(-0.5 * sigma * d)
    p = e / (e.sum(1, keepdim=True) + EPS)
    mask = labels.view(-1, 1).eq(torch.arange(c, device=codes.device)).float()
    return -(torch.log(p + EPS) * mask).sum() / b


@torch.no_grad()
def ridge_codes(codes, labels, num_classes, eta):
    """The authors' regression: ``W = inverse(Y^T Y + I) Y^T sign(h)``, ``B = sign(Y W + eta h)``."""
    y = torch.zeros(codes.shape[0], num_classes, dtype=codes.dtype).scatter_(1, labels.view(-1, 1), 1.0)
    w = torch.linalg.inv(y.t() @ y + torch.eye(num_classes, dtype=codes.dtype)) @ (y.t() @ torch.sign(codes))
    return w, torch.sign(y @ w + eta * codes)


class SwitchedDCDH(DCDH):
    """``methods.dcdh.DCDH`` whose pull term and regression can be the authors'. With the project's
    choices ``forward`` is ``DCDH.forward`` itself. Also accumulates the diagnostics."""

    def __init__(self, num_classes, bits, pull="project", regression="mean", **hparams):
        super().__init__(num_classes, bits, **hparams)
        self.pull_kind, self.regression_kind = pull, regression
        self.reset_diagnostics()

    def reset_diagnostics(self):
        self.diag = {"samples": 0, "p_below_eps": 0, "bits": 0, "ridge_vs_mean_bits": 0, "batches": 0,
                     "pull_grad_rel_diff": 0.0}

    @torch.no_grad()
    def _diagnose(self, codes, labels):
        logp = F.log_softmax(-0.5 * self.sigma * squared_distances(codes, self.centers), 1)
        logp_y = logp.gather(1, labels.view(-1, 1))
        self.diag["samples"] += codes.shape[0]
        self.diag["p_below_eps"] += int((logp_y < np.log(EPS)).sum())
        _, b_mean = regression_codes(codes, labels, self.num_classes, self.eta)
        _, b_ridge = ridge_codes(codes, labels, self.num_classes, self.eta)
        self.diag["bits"] += codes.numel()
        self.diag["ridge_vs_mean_bits"] += int((b_mean != b_ridge).sum())
        # relative difference of the two pull terms' gradients (w.r.t. codes and centers) on this batch
        grads = []
        for fn in (pull_loss, authors_pull):
            with torch.enable_grad():
                h = codes.detach().clone().requires_grad_(True)
                m = self.centers.detach().clone().requires_grad_(True)
                grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(fn(h, labels, m, self.sigma), (h, m))]))
        self.diag["pull_grad_rel_diff"] += float((grads[1] - grads[0]).norm() / grads[0].norm())
        self.diag["batches"] += 1

    def forward(self, codes, labels, index=None):
        self._diagnose(codes.detach(), labels)
        if self.pull_kind == "project" and self.regression_kind == "mean":
            return super().forward(codes, labels, index)
        pull = (pull_loss if self.pull_kind == "project" else authors_pull)(codes, labels, self.centers, self.sigma)
        push = push_loss(self.centers, self.authors_push_constant)
        if self.regression_kind == "mean":
            _, target = regression_codes(codes, labels, self.num_classes, self.eta)
        else:
            _, target = ridge_codes(codes, labels, self.num_classes, self.eta)
        quant = (codes - target).pow(2).sum() / codes.shape[0]
        total = pull + self.inner_param * push + self.eta * quant
        return {"pull": pull, "push": push, "quant": quant, "total": total}


class AuthorsDataset(torch.utils.data.Dataset):
    """Their ``MyDataset``: the split as float64, normalised once over the whole split
    (``deprocess_image``), HWC rows, ``ToTensor`` and ``.float()`` per item; labels (1,) -> (B, 1)."""

    def __init__(self, split):
        x = split.images.numpy().astype(np.float64)
        x = x - x.mean()
        x = x / (x.std() + 1e-5)
        x = np.clip(x * 0.1, -1, 1)
        self.x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        self.y = split.labels.numpy().reshape(-1, 1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        # ToTensor: HWC float64 -> CHW (no scaling for non-uint8), then .type(FloatTensor)
        return torch.from_numpy(self.x[i].transpose(2, 0, 1).copy()).float(), torch.from_numpy(self.y[i])

    def all_images(self):
        return torch.from_numpy(self.x.transpose(0, 3, 1, 2).copy()).float()


@torch.no_grad()
def encode(model, images, channels_last, batch=256):
    """Real-valued outputs of ``model`` (eval mode) on float32 images (N, 3, 32, 32)."""
    model.eval()
    out = []
    for s in range(0, len(images), batch):
        x = images[s:s + batch]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(model(x).float())
    return torch.cat(out)


def center_codes(h, centers):
    """The authors' ``compute_result(..., centers)``: the sign of the class center nearest in
    Hamming distance to sign(h) (first on ties)."""
    signs = torch.sign(centers)
    dist = 0.5 * (h.shape[1] - binarize(h) @ signs.t())
    return binarize(signs[dist.argmin(1)])


def evaluate(model, q_images, db_images, q_labels, db_labels, centers, channels_last):
    hq, hd = encode(model, q_images, channels_last), encode(model, db_images, channels_last)
    out = {}
    for name, (q, d) in {"": (binarize(hq), binarize(hd)),
                         "center_": (center_codes(hq, centers), center_codes(hd, centers))}.items():
        out[f"{name}map"] = mean_average_precision(q, d, q_labels, db_labels)["map"]
        out[f"{name}map_tie_aware"] = tie_aware_map(q, d, q_labels, db_labels)["map"]
    return out


def authors_epoch(model, method, optimizer, loader, channels_last):
    """The authors' loop body: zero_grad, forward, loss, backward, step; mean loss per sample."""
    model.train()
    method.train()
    total, pull, n = 0.0, 0.0, 0
    start = time.perf_counter()
    for imgs, labels in loader:
        labels = labels.view(-1)
        if channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad()
        terms = method(model(imgs), labels)
        terms["total"].backward()
        optimizer.step()
        total += terms["total"].item() * len(imgs)
        pull += terms["pull"].item() * len(imgs)
        n += len(imgs)
    return {"loss": total / n, "pull": pull / n, "images": n, "seconds": time.perf_counter() - start}


def plain_adam(recipe, model, method):
    """``engine.recipes.build_optimizer``'s groups with the default (unfused) Adam, as the authors."""
    wd, lr = recipe["weight_decay"], recipe["lr"]
    return torch.optim.Adam([{"params": list(model.parameters()), "weight_decay": wd, "lr": lr, "amsgrad": True},
                             {"params": list(method.parameters()), "weight_decay": wd, "lr": lr}], lr=lr)


def describe(run):
    """Short name of a run's settings: the loop, then the switches that differ from it."""
    side = 0 if run["loop"] == "project" else 1
    changed = [f"{k} {v}" for k, v in run["switches"].items() if v != SWITCHES[k][side]]
    return run["loop"] + (" + " + ", ".join(changed) if changed else "")


def summarize(paths):
    """Markdown table: one row per run, mAP (tie-aware in brackets) at each evaluated epoch."""
    runs = [json.load(open(path)) for path in paths]
    epochs = sorted({ev["epoch"] for run in runs for ev in run["evaluations"]})
    print("| loop | seed | " + " | ".join(f"epoch {e}" for e in epochs) + " | lowest loss (epoch) |")
    print("| --- | --- | " + " | ".join("---" for _ in epochs) + " | --- |")
    for run in runs:
        at = {ev["epoch"]: ev for ev in run["evaluations"]}
        cells = [f"{100 * at[e]['map']:.2f} ({100 * at[e]['map_tie_aware']:.2f})" if e in at else "-" for e in epochs]
        done = "" if run.get("epochs_done", run["epochs"]) == run["epochs"] else f", {run['epochs_done']} epochs done"
        print(f"| {describe(run)} | {run['seed']} | " + " | ".join(cells)
              + f" | {run['lowest_loss']:.4f} ({run['lowest_loss_epoch']}{done}) |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                        "..", "shared", "data", "celeba299-ddh32"))
    p.add_argument("--loop", choices=("project", "authors"), default="project",
                   help="default side of every switch")
    for name, (ours, theirs) in SWITCHES.items():
        p.add_argument(f"--{name}", choices=(ours, theirs), default=None,
                       help=f"{ours} (project) or {theirs} (authors); default: --loop's side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--eval-at", default="5,10,15,20", help="comma-separated epochs to evaluate at")
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--bs", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the settings, per-epoch log and evaluations here")
    p.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                   help="print a table of these runs' JSON files and exit")
    args = p.parse_args()
    if args.summarize:
        return summarize(args.summarize)
    side = 0 if args.loop == "project" else 1
    sw = {name: getattr(args, name) or values[side] for name, values in SWITCHES.items()}
    if args.threads:
        torch.set_num_threads(args.threads)
    eval_at = sorted({int(e) for e in args.eval_at.split(",") if e})
    device = torch.device("cpu")

    database, queries, label_map = build_datasets("ddh", args.data_root)
    train_set = training_view(database)
    num_classes = len(label_map)
    recipe = resolve_recipe("dfhnet", epochs=args.epochs)
    channels_last = sw["layout"] == "channels_last"

    torch.manual_seed(args.seed)
    model = build_model("dfhnet", args.bits)
    method = SwitchedDCDH(num_classes, args.bits, pull=sw["pull"], regression=sw["regression"],
                          authors_push_constant=args.loop == "authors")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(recipe, model, method) if sw["adam"] == "fused" else plain_adam(recipe, model, method)

    if sw["data"] == "authors":
        train_ds, query_ds = AuthorsDataset(database), AuthorsDataset(queries)
        db_images, q_images = train_ds.all_images(), query_ds.all_images()
        authors_loader = torch.utils.data.DataLoader(train_ds, batch_size=args.bs, shuffle=True)
    else:
        db_images, q_images = database.normalize(database.images), queries.normalize(queries.images)
    drop_last = len(train_set) % args.bs == 1  # as dcdh_train.py (never true on celeba299-ddh32)

    print(f"fidelity: {args.loop} loop, switches {sw}, seed {args.seed}, {args.epochs} epochs, "
          f"{len(train_set)} train / {len(queries)} query images, {num_classes} classes, {args.bits} bits, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    log, evals = [], []
    since = time.perf_counter()

    def write_json():  # after every evaluation and at the end, so a stopped run keeps its figures
        if not args.json:
            return
        best = min(log, key=lambda r: r["loss"])
        with open(args.json, "w") as f:
            json.dump({"loop": args.loop, "switches": sw, "seed": args.seed, "epochs": args.epochs,
                       "epochs_done": len(log), "bits": args.bits, "bs": args.bs,
                       "data_root": os.path.abspath(args.data_root), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "lowest_loss": best["loss"],
                       "lowest_loss_epoch": best["epoch"], "log": log, "evaluations": evals}, f, indent=1)

    for epoch in range(args.epochs):
        lr = learning_rate(recipe, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if sw["data"] == "authors":
            loader = authors_loader
        else:
            loader = make_loader(train_set, args.bs, shuffle=True, drop_last=drop_last,
                                 generator=torch.Generator().manual_seed(args.seed * 100003 + epoch),
                                 device=device, with_index=True)
        method.reset_diagnostics()
        if sw["step"] == "project":
            if sw["data"] == "authors":  # train_one_epoch wants (B,) labels; theirs are (B, 1)
                loader = ((x, y.view(-1)) for x, y in loader)
            stats = train_one_epoch(model, method, optimizer, loader, device, epoch, progress=False)
        else:
            if sw["data"] == "project":
                loader = ((x, y) for x, y, _ in loader)
            stats = authors_epoch(model, method, optimizer, loader, channels_last)
        d = method.diag
        row = {"epoch": epoch + 1, "loss": stats["loss"], "pull": stats.get("pull"), "seconds": stats["seconds"],
               "p_below_1e-6": d["p_below_eps"] / max(d["samples"], 1),
               "ridge_vs_mean_bits": d["ridge_vs_mean_bits"] / max(d["bits"], 1),
               "pull_grad_rel_diff": d["pull_grad_rel_diff"] / max(d["batches"], 1)}
        log.append(row)
        msg = (f"[epoch {epoch + 1}] loss {row['loss']:.4f} pull {row['pull']:.4f}, {row['seconds']:.1f} s, "
               f"p<1e-6 {100 * row['p_below_1e-6']:.2f}% of samples, ridge!=mean {100 * row['ridge_vs_mean_bits']:.4f}% of bits, "
               f"pull gradient authors vs project {row['pull_grad_rel_diff']:.1e} (relative)")
        if epoch + 1 in eval_at:
            ev = evaluate(model, q_images, db_images, queries.labels, database.labels, method.centers.detach(),
                          channels_last)
            ev["epoch"] = epoch + 1
            evals.append(ev)
            msg += (f" | mAP {100 * ev['map']:.2f}% tie-aware {100 * ev['map_tie_aware']:.2f}%, center codes "
                    f"{100 * ev['center_map']:.2f}% / {100 * ev['center_map_tie_aware']:.2f}%")
        print(msg, flush=True)
        if epoch + 1 in eval_at:
            write_json()
    best = min(log, key=lambda r: r["loss"])
    print(f"done in {time.perf_counter() - since:.0f} s; lowest loss {best['loss']:.4f} at epoch {best['epoch']}")
    print("| epoch | mAP % | tie-aware mAP % | center-code mAP % | center-code tie-aware % |")
    print("| --- | --- | --- | --- | --- |")
    for ev in evals:
        print(f"| {ev['epoch']} | {100 * ev['map']:.2f} | {100 * ev['map_tie_aware']:.2f} | "
              f"{100 * ev['center_map']:.2f} | {100 * ev['center_map_tie_aware']:.2f} |")
    write_json()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from utils.errors import quiet_broken_pipe
    quiet_broken_pipe(main)()  # '... | head' ends quietly
