"""Train a DCDH hashing model (Zhang et al., Pattern Recognition 2021).

    python dcdh_train.py --dataset facescrub --len 48 --save dcdh_facescrub48.tar

The authors' flags and defaults work unchanged (``--save --len --bs --lr --sigma
--inner_param --eta``). The checkpoint with the lowest epoch training loss is kept in the
authors' format (``backbone``, ``centers``) plus optimizer, epoch and config; a second file
``<name>.last.tar`` holds the latest epoch so ``--resume`` can continue a killed run.
"""
import glob
import math
import os
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from data import DATASETS, DDHSplit, build_datasets, default_backbone, make_loader, training_view
from evaluation import evaluate
from models import BACKBONES, DEFAULT_IMAGE_SIZE, DCDHLoss, build_model, check_image_size
from utils.checkpoint import DEFAULT_DIR, load_checkpoint, save_checkpoint
from utils.device import COMPILE_MODES, compile_model, resolve_device
from utils.distributed import (all_reduce_sum_, average_gradients_, barrier, cleanup, init_distributed)
from utils.errors import OneLineArgumentParser, UserInputError, check_flag, exit_on_user_error
from utils.log import setup_logger


def get_args_parser(add_help=True):
    p = OneLineArgumentParser(description="Train DCDH (Deep Center-Based Dual-Constrained Hashing).",
                                add_help=add_help)
    # the authors' flags
    p.add_argument("--dataset", default="facescrub", help=f"one of {{{', '.join(DATASETS)}}} (default facescrub)")
    p.add_argument("--save", default=None, help="checkpoint name (under --checkpoint-dir) or path "
                   "(default dcdh_<dataset><len>.tar)")
    p.add_argument("--len", type=int, default=48, help="code length K in bits (paper: 12, 24, 36, 48; default 48)")
    p.add_argument("--bs", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--lr", type=float, default=0.005, help="learning rate of network and centers (default 0.005)")
    p.add_argument("--sigma", type=float, default=0.25, help="Gaussian width of the pull term (default 0.25)")
    p.add_argument("--inner_param", type=float, default=0.1, help="lambda, weight of the center push term (default 0.1)")
    p.add_argument("--eta", type=float, default=0.01, help="weight of the quantization term (default 0.01)")
    # ours
    p.add_argument("--data-root", default=None, help="dataset folder with train/ and test/ "
                   "(default ./FaceScrub, ./YouTube, ./vggface2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 600 with Adam, 150 with SGD)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=None, help="data-loading processes (default 0 for DDH, 2 for folders)")
    p.add_argument("--checkpoint-dir", default=DEFAULT_DIR, help="output folder (default ./checkpoint)")
    p.add_argument("--backbone", default=None, choices=BACKBONES,
                   help="network (default dfhnet for 32x32 sets, spherenet20 for image folders)")
    p.add_argument("--pretrained", action="store_true", help="torchvision backbones: ImageNet weights from the local cache")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: the backbone's)")
    p.add_argument("--optimizer", default=None, choices=("adam", "sgd"),
                   help="default adam (amsgrad, wd 1e-4, lr x0.5 every 100 epochs) for dfhnet, "
                   "sgd (momentum 0.9, wd 5e-4, lr x0.1 every 50 epochs) otherwise")
    p.add_argument("--amp", default="auto", choices=("auto", "on", "off"),
                   help="bfloat16 autocast for the network (auto: on with CUDA, off on CPU; "
                   "'on' also speeds up CPUs with AMX/AVX512-BF16)")
    p.add_argument("--compile", default="off", choices=COMPILE_MODES,
                   help="torch.compile the network for training: a torch.compile mode "
                   "(reduce-overhead adds CUDA graphs on a GPU) or off (default); compiling takes "
                   "30-50 s at the start")
    p.add_argument("--eval-every", type=int, default=10, help="print mAP every N epochs and after the last (0: never)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue a run from PATH (default: <checkpoint-dir>/<save>.last.tar)")
    return p


MAX_BITS = 1024
"""Longest code accepted by --len (the hash layer maps 1024 features to K bits)."""

RECIPES = {
    # optimizer: (weight decay, lr step in epochs, lr factor, default epochs) — DESIGN.md
    "adam": (1e-4, 100, 0.5, 600),
    "sgd": (5e-4, 50, 0.1, 150),
}


def build_optimizer(name, model, criterion, lr):
    """The authors' optimizers: Adam (amsgrad on the network group, as in their code) or SGD.

    Both the network and the class centers get weight decay (1e-4 Adam, 5e-4 SGD). The
    fused implementation (one kernel for all parameters) is used; it computes the same update
    as the default one, 3.7x faster for DFHNet's step on the 2-core CPU (1.7 vs 6.3 ms).
    """
    wd = RECIPES[name][0]
    if name == "adam":
        return torch.optim.Adam([
            {"params": model.parameters(), "weight_decay": wd, "lr": lr, "amsgrad": True},
            {"params": criterion.parameters(), "weight_decay": wd, "lr": lr},
        ], fused=True)
    return torch.optim.SGD([
        {"params": model.parameters(), "weight_decay": wd},
        {"params": criterion.parameters(), "weight_decay": wd},
    ], lr=lr, momentum=0.9, fused=True)


def learning_rate(base_lr, epoch, optimizer_name):
    """Step schedule: ``base_lr * factor ** (epoch // step)`` for 0-based ``epoch``."""
    _, step, factor, _ = RECIPES[optimizer_name]
    return base_lr * factor ** (epoch // step)


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


def training_step(model, criterion, optimizer, images, labels, amp=False):
    """One optimisation step on a batch; returns the detached loss terms (dict of scalar tensors).

    ``model`` may be wrapped in DistributedDataParallel; the class centers live outside it, so
    their gradients are averaged over processes here, and the loss's ``all_reduce`` makes the
    regression W a per-class mean over the global batch. ``amp``: bfloat16 autocast for the
    network (the loss runs in float32).
    """
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        codes = model(images)
    terms = criterion.terms(codes.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    average_gradients_(criterion.parameters())
    optimizer.step()
    return {k: v.detach() for k, v in terms.items()}


def train_one_epoch(model, criterion, optimizer, loader, device, epoch, amp=False, progress=True):
    """One pass over ``loader`` minimising the DCDH loss.

    The loss is checked for NaN/inf after every batch on the CPU and every 25 batches on a GPU
    (to avoid a device sync per batch); nothing is saved from inside an epoch, so a stop leaves
    the checkpoints of the last good epoch.

    Returns: dict with the sample-weighted means ``loss``, ``pull``, ``push``, ``quant`` over all
    processes (floats), ``images`` (int, all processes) and ``seconds`` (float).
    Raises: NonFiniteLoss naming the epoch (1-based) and batch when the loss is NaN or infinite.
    """
    model.train()
    criterion.train()
    keys = ("total", "pull", "push", "quant")
    sums = torch.zeros(len(keys), dtype=torch.float64, device=device)  # stays on the device
    local_images = 0
    check_every = 1 if device.type == "cpu" else 25
    pending = []
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=None if progress else True,
               file=sys.stderr, unit="batch")

    def check(batch):
        values = torch.cat([torch.stack(pending).double(), sums[:1]]).tolist()  # one sync
        for i, v in enumerate(values[:-1]):
            if not math.isfinite(v):
                raise NonFiniteLoss(f"the loss became {v} at epoch {epoch + 1}, "
                                    f"batch {batch - len(pending) + i + 2}")
        pending.clear()
        bar.set_postfix(loss=f"{values[-1] / max(local_images, 1):.4f}")

    for batch, (images, labels) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        images = images.contiguous(memory_format=torch.channels_last)  # faster convolutions, CPU and GPU
        terms = training_step(model, criterion, optimizer, images, labels, amp)
        pending.append(terms["total"])
        n = images.shape[0]
        sums += torch.stack([terms[k] for k in keys]).double() * n  # no host-to-device copy
        local_images += n
        if len(pending) >= check_every:
            check(batch)
    if pending:
        check(batch)
    totals = torch.cat([sums, sums.new_tensor([local_images])])
    all_reduce_sum_(totals)
    seen = int(totals[-1].item())
    out = {name: float(v) / max(seen, 1) for name, v in zip(("loss", "pull", "push", "quant"), totals[:-1].tolist())}
    out.update(images=seen, seconds=time.perf_counter() - start)
    return out


def _check_args(args):
    if not 0 < args.len <= MAX_BITS:
        raise UserInputError(f"--len {args.len}: the code length must be an integer in 1..{MAX_BITS} "
                             "(paper: 12, 24, 36, 48)")
    for flag, value in (("--image-size", args.image_size), ("--bs", args.bs), ("--epochs", args.epochs)):
        check_flag(flag, value)
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserInputError(f"--lr {args.lr}: must be a positive number")
    if not (args.sigma > 0 and math.isfinite(args.sigma)):
        raise UserInputError(f"--sigma {args.sigma}: must be a positive number")
    for flag in ("inner_param", "eta"):
        v = getattr(args, flag)
        if not (v >= 0 and math.isfinite(v)):
            raise UserInputError(f"--{flag} {v}: must be a non-negative number")
    check_flag("--workers", args.workers, 0)
    check_flag("--eval-every", args.eval_every, 0)
    if args.dataset not in DATASETS:
        raise UserInputError(f"--dataset {args.dataset!r} is unknown; expected one of {', '.join(DATASETS)}")


def _output_paths(args):
    """(best checkpoint path, last-state path, log path); checks the folder is writable."""
    name = args.save or f"dcdh_{args.dataset}{args.len}.tar"
    path = name if os.path.dirname(name) else os.path.join(args.checkpoint_dir, name)
    folder = os.path.dirname(os.path.abspath(path))
    blocker = folder
    while blocker and not os.path.exists(blocker):
        blocker = os.path.dirname(blocker)
    if blocker and not os.path.isdir(blocker):
        raise UserInputError(f"cannot write checkpoints to {folder}: {blocker} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserInputError(f"cannot write checkpoints to {folder}: {e.strerror or e}") from None
    stem, ext = os.path.splitext(path)
    last = f"{stem}.last{ext or '.tar'}"
    for target in (path, last, f"{stem}.log"):
        if os.path.isdir(target):
            raise UserInputError(f"--save: {target} is a folder; name a checkpoint file")
    for target in (path, last):  # temporary files of a run killed while saving
        for stale in glob.glob(os.path.join(folder, "." + glob.escape(os.path.basename(target)) + ".*.tmp")):
            os.unlink(stale)
    return path, last, f"{stem}.log"


@exit_on_user_error("dcdh_train.py")
def main(args):
    _check_args(args)
    dist_info = init_distributed(resolve_device(args.device))
    try:
        return _train(args, dist_info)
    finally:
        cleanup()


def _train(args, dist_info):
    device, world = dist_info.device, dist_info.world_size
    if args.bs % world:
        raise UserInputError(f"--bs {args.bs} (the global batch) must be divisible by the {world} processes")
    best_path, last_path, log_path = _output_paths(args)
    resume_path = None
    if args.resume is not None:
        resume_path = args.resume
        if args.resume == "auto":  # the latest epoch; the best file if killed before the first last-save
            resume_path = last_path if os.path.isfile(last_path) or not os.path.isfile(best_path) else best_path
        if not os.path.isfile(resume_path):
            raise UserInputError(f"--resume: no such checkpoint {resume_path}")

    backbone = args.backbone or default_backbone(args.dataset, args.image_size)
    image_size = args.image_size or DEFAULT_IMAGE_SIZE[backbone]
    try:
        check_image_size(backbone, image_size)
    except ValueError as e:
        raise UserInputError(str(e)) from None
    optimizer_name = args.optimizer or ("adam" if backbone == "dfhnet" else "sgd")
    epochs = args.epochs or RECIPES[optimizer_name][3]

    database, queries, label_map = build_datasets(args.dataset, args.data_root, image_size)
    train_set = training_view(database)
    num_classes = len(label_map)
    if num_classes < 2:
        raise UserInputError(f"the training split has {num_classes} identity; DCDH needs at least 2")
    if args.bs > len(train_set):
        raise UserInputError(f"--bs {args.bs} is larger than the training set ({len(train_set)} images)")

    torch.manual_seed(args.seed)  # the same initial weights and centers in every process
    amp = args.amp == "on" or (args.amp == "auto" and device.type == "cuda")
    try:
        model = build_model(backbone, args.len, pretrained=args.pretrained).to(device)
    except (ValueError, FileNotFoundError) as e:
        raise UserInputError(str(e)) from None
    model = model.to(memory_format=torch.channels_last)  # 1.4x on CPU (measured), standard on GPU
    criterion = DCDHLoss(num_classes, args.len, args.sigma, args.inner_param, args.eta).to(device)
    optimizer = build_optimizer(optimizer_name, model, criterion, args.lr)
    config = {"backbone": backbone, "bits": args.len, "image_size": image_size, "dataset": args.dataset,
              "num_classes": num_classes, "label_map": label_map, "sigma": args.sigma,
              "inner_param": args.inner_param, "eta": args.eta, "lr": args.lr, "bs": args.bs,
              "epochs": epochs, "optimizer": optimizer_name, "seed": args.seed, "amp": amp,
              "compile": args.compile, "world_size": world}

    start_epoch, best_loss, best_epoch = 0, math.inf, -1
    if resume_path:
        state = load_checkpoint(resume_path)
        old = state.get("config") or {}
        if "epoch" not in state or not old:
            raise UserInputError(f"--resume {resume_path}: holds no training state (epoch, optimizer, config); "
                                 "only checkpoints written by dcdh_train.py can be resumed")
        for key in ("backbone", "bits", "num_classes", "image_size"):
            if old.get(key) != config[key]:
                raise UserInputError(f"--resume {resume_path}: its {key} is {old.get(key)!r}, this run's is {config[key]!r}")
        model.load_state_dict(state["backbone"])
        criterion.load_state_dict(state["centers"])
        if "optimizer" in state:
            saved = state["optimizer"]
            for group in saved.get("param_groups", []):  # the saved flags would win: keep fused
                group["fused"], group["foreach"] = True, None
            optimizer.load_state_dict(saved)
        start_epoch = int(state.get("epoch", 0))
        best_loss = float(state.get("best_loss", math.inf))
        best_epoch = int(state.get("best_epoch", -1))
        if "rng" in state:
            torch.set_rng_state(state["rng"])
        if os.path.isfile(best_path) and os.path.abspath(best_path) != os.path.abspath(resume_path):
            # a kill between saving the best and the last file leaves the best one newer
            best_state = load_checkpoint(best_path)
            if float(best_state.get("best_loss", math.inf)) < best_loss:
                best_loss, best_epoch = float(best_state["best_loss"]), int(best_state["best_epoch"])

    train_model = model
    if dist_info.enabled:
        criterion.all_reduce = all_reduce_sum_   # W over the global batch
        if device.type == "cuda":
            train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model = compile_model(train_model, args.compile, device)  # shares model's weights

    log = setup_logger("dcdh_train", log_path if dist_info.is_main else None)
    if not dist_info.is_main:
        log.disabled = True
    log.info(f"[config] dataset {args.dataset} ({len(train_set)} train / {len(queries)} test images, "
             f"{num_classes} identities), {backbone} at {image_size}x{image_size}, {args.len} bits, "
             f"batch {args.bs}, lr {args.lr}, {optimizer_name}, {epochs} epochs, device {device}"
             + (f" x {world} processes" if world > 1 else "") + (", bf16 autocast" if amp else "")
             + (f", torch.compile mode {args.compile}" if args.compile != "off" else ""))
    log.info(f"[config] sigma {args.sigma}, inner_param {args.inner_param}, eta {args.eta}, seed {args.seed}; "
             f"best checkpoint -> {best_path}, log -> {log_path}")
    if args.compile == "reduce-overhead" and device.type != "cuda":
        log.info("[note] --compile reduce-overhead adds CUDA graphs on a GPU only; on the CPU it compiles "
                 "as --compile default")
    if resume_path:
        log.info(f"[resume] from {resume_path}: {start_epoch} epochs done, best loss {best_loss:.4f} "
                 f"at epoch {best_epoch + 1}")
    elif os.path.isfile(best_path):
        log.info(f"[note] {best_path} exists and will be replaced by this new run "
                 "(add --resume to continue that run instead)")

    workers = args.workers if args.workers is not None else (0 if isinstance(train_set, DDHSplit) else 2)
    local_bs = args.bs // world
    shard = -(-len(train_set) // world)
    # A last batch of one sample would break BatchNorm in training mode: drop it then.
    drop_last = shard % local_bs == 1
    sampler = (torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=dist_info.rank,
                                                   shuffle=True, seed=args.seed)
               if dist_info.enabled else None)
    eval_loaders = (make_loader(queries, args.bs, workers=workers, device=device),
                    make_loader(database, args.bs, workers=workers, device=device))
    patience = epochs // 4
    since = time.time()
    epoch = start_epoch
    for epoch in range(start_epoch, epochs):
        lr = learning_rate(args.lr, epoch, optimizer_name)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = make_loader(train_set, local_bs, shuffle=True, drop_last=drop_last, workers=workers,
                             generator=generator, device=device, sampler=sampler)
        try:
            stats = train_one_epoch(train_model, criterion, optimizer, loader, device, epoch, amp=amp,
                                    progress=dist_info.is_main)
        except NonFiniteLoss as e:
            kept = (f"the last good checkpoint {best_path} (epoch {best_epoch + 1}) is kept"
                    if best_epoch >= 0 else "no checkpoint had been written yet")
            log.info(f"[stopped] {e}; {kept}. Try a smaller --lr.")
            sys.exit(1)
        improved = stats["loss"] < best_loss
        log.info(f"[epoch {epoch + 1}/{epochs}] loss {stats['loss']:.4f} (pull {stats['pull']:.4f}, "
                 f"push {stats['push']:.4f}, quant {stats['quant']:.4f}), lr {lr:g}, "
                 f"{stats['images'] / stats['seconds']:.0f} images/s")
        if improved:
            best_loss, best_epoch = stats["loss"], epoch
        state = {"backbone": model.state_dict(), "centers": criterion.state_dict(),
                 "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "best_loss": best_loss,
                 "best_epoch": best_epoch, "rng": torch.get_rng_state(), "config": config}
        if dist_info.is_main:  # one process writes; the others wait at the barrier below
            if improved:
                save_checkpoint(state, best_path)
                log.info(f"[saved] {best_path} (lowest training loss so far)")
            save_checkpoint(state, last_path)
        last = epoch + 1 == epochs or epoch - best_epoch > patience
        if dist_info.is_main and args.eval_every and ((epoch + 1) % args.eval_every == 0 or last):
            # the whole, unpadded query and database sets, in this process alone
            metrics = evaluate(model, *eval_loaders, device)
            log.info(f"[evaluate epoch {epoch + 1}] mAP {100 * metrics['map']:.2f}%, "
                     f"tie-aware mAP {100 * metrics['map_tie_aware']:.2f}%, "
                     f"precision@10 {100 * metrics['precision_at_10']:.2f}%"
                     + (f"; {metrics['queries_without_relevant']} queries without a relevant database item"
                        if metrics["queries_without_relevant"] else ""))
        barrier()
        if epoch - best_epoch > patience:
            log.info(f"[early stop] no lower training loss for more than {patience} epochs; "
                     f"stopped at epoch {epoch + 1}")
            break
    minutes, seconds = divmod(int(round(time.time() - since)), 60)
    log.info(f"[done] {epoch + 1 - start_epoch} epoch(s) in {minutes}min {seconds}s; "
             f"best loss {best_loss:.4f} at epoch {best_epoch + 1}; model saved as {best_path}")
    return {"best_path": best_path, "best_loss": best_loss, "best_epoch": best_epoch}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
