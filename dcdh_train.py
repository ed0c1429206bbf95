"""Train a deep hashing model: DCDH (Zhang et al., Pattern Recognition 2021) or any method of the
registry (``methods/``), with one training loop.

    python dcdh_train.py --dataset facescrub --len 48 --save dcdh_facescrub48.tar
    python dcdh_train.py --dataset facescrub --len 48 --method csq --method-args lambda_q=1e-4

The authors' flags and defaults work unchanged (``--save --len --bs --lr --sigma
--inner_param --eta``). Every method trains the same network on the same data with the same
loop; the checkpoint with the lowest epoch training loss is kept (model selection never reads the
test set) in the authors' format (``backbone``, ``centers`` = the method's state) plus optimizer,
epoch and config; a second file ``<name>.last.tar`` holds the latest epoch so ``--resume`` can
continue a killed run.
"""
import math
import os
import sys
import time

import torch

from data import DATASETS, DDHSplit, build_datasets, default_backbone, make_loader, training_view
from data.unseen import choose_unseen, hold_out
from engine.evaluate import evaluate
from engine.loop import NonFiniteLoss, train_one_epoch
from engine.preflight import check_memory, format_bytes, memory_limit
from engine.recipes import OPTIMIZERS, build_optimizer, learning_rate, resolve_recipe
from engine.state import carry_best_model, epoch_state, find_resume, output_paths, restore
from methods import METHODS, build_method, method_class, parse_method_args
from models import BACKBONES, DEFAULT_IMAGE_SIZE, TWO_BRANCH_BACKBONES, build_model, check_image_size, check_pretrained
from utils.checkpoint import DEFAULT_DIR, save_checkpoint
from utils.device import (AMP_CHOICES, COMPILE_MODES, choose_precision, compile_model, cpu_capability, cpu_model,
                          resolve_device)
from utils.distributed import all_reduce_sum_, barrier, cleanup, init_distributed
from utils.errors import OneLineArgumentParser, UserInputError, check_flag, exit_on_user_error
from utils.log import setup_logger

AUTHORS_METHOD_FLAGS = ("sigma", "inner_param", "eta")
"""The authors' hyperparameter flags; they set the method's hyperparameter of the same name."""


def get_args_parser(add_help=True):
    p = OneLineArgumentParser(description="Train a deep hashing model (default DCDH, Deep Center-Based "
                              "Dual-Constrained Hashing).", add_help=add_help)
    # the authors' flags
    p.add_argument("--dataset", default="facescrub", help=f"one of {{{', '.join(DATASETS)}}} (default facescrub)")
    p.add_argument("--save", default=None, help="checkpoint name (under --checkpoint-dir) or path "
                   "(default <method>_<dataset><len>.tar, e.g. dcdh_facescrub48.tar)")
    p.add_argument("--len", type=int, default=48, help="code length K in bits (paper: 12, 24, 36, 48; default 48)")
    p.add_argument("--bs", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of network and method parameters (default 0.005, or the method's recipe)")
    p.add_argument("--sigma", type=float, default=None, help="DCDH: Gaussian width of the pull term (default 0.25)")
    p.add_argument("--inner_param", type=float, default=None,
                   help="DCDH: lambda, weight of the center push term (default 0.1)")
    p.add_argument("--eta", type=float, default=None, help="DCDH: weight of the quantization term (default 0.01)")
    # ours
    p.add_argument("--method", default="dcdh", help=f"hashing method, one of {{{', '.join(METHODS)}}} (default dcdh)")
    p.add_argument("--method-args", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="the method's hyperparameters (see docs/methods.md; 'help' alone lists them); the flag "
                   "may be repeated; an unknown or repeated key is an error")
    p.add_argument("--data-root", default=None, help="dataset folder with train/ and test/ "
                   "(default ./FaceScrub, ./YouTube, ./vggface2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 600 with Adam, 150 with SGD, "
                   "or the method's recipe)")
    p.add_argument("--patience", type=int, default=None, help="stop when the training loss has not improved "
                   "for more than N epochs (default epochs/4, the authors' rule, or the method's recipe)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=None, help="data-loading processes (default 0 for DDH, 2 for folders)")
    p.add_argument("--checkpoint-dir", default=DEFAULT_DIR, help="output folder (default ./checkpoint)")
    p.add_argument("--backbone", default=None, choices=BACKBONES,
                   help="network (default: the method's own if it requires one (ddah: ddahnet), else dfhnet "
                   "for 32x32 sets, spherenet20 for image folders)")
    p.add_argument("--pretrained", action="store_true", help="torchvision backbones: ImageNet weights from the local cache")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: the backbone's)")
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                   help="default adam (amsgrad, wd 1e-4, lr x0.5 every 100 epochs) for the 32x32 networks (dfhnet, "
                   "ddhnet, ddahnet), sgd (momentum 0.9, wd 5e-4, lr x0.1 every 50 epochs) otherwise, unless "
                   "the method's recipe says; another optimizer than the method's drops its whole recipe "
                   "but the epochs and patience")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="bfloat16 autocast for the network (auto, the default: bf16 on GPUs of compute "
                   "capability 8.0 or newer and on CPUs with native bf16 (AMX or AVX512-BF16), fp32 elsewhere, "
                   "e.g. AVX2-only CPUs or older GPUs, where bf16 is emulated and slower; on: bf16 everywhere; off: fp32)")
    p.add_argument("--compile", default="off", choices=COMPILE_MODES,
                   help="torch.compile the network for training: a torch.compile mode "
                   "(reduce-overhead adds CUDA graphs on a GPU) or off (default); compiling takes "
                   "30-50 s at the start")
    p.add_argument("--eval-every", type=int, default=10, help="print mAP every N epochs and after the last (0: never)")
    p.add_argument("--unseen-identities", type=int, default=0, metavar="K",
                   help="hold K identities out of training entirely (drawn from --seed among those with test "
                   "images; listed in the checkpoint) for evaluation.py's unseen-identities protocol (default 0)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue a run from PATH (default: <checkpoint-dir>/<save>.last.tar)")
    return p


MAX_BITS = 1024
"""Longest code accepted by --len (the hash layer maps 1024 features to K bits)."""


def describe_method(cls):
    """The method's first docstring line and its hyperparameters with defaults (for --method-args help)."""
    import inspect
    doc = (inspect.getmodule(cls).__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    lines = [f"{cls.name}: {doc}", "hyperparameters (--method-args key=value):"]
    for key, spec in cls.hyperparameters.items():
        lines.append(f"  {key} (default {spec.default!r}): {spec.help}")
    if not cls.hyperparameters:
        lines.append("  none")
    for feature, reason in cls.unsupported.items():
        lines.append(f"not supported: {feature} ({reason})")
    return "\n".join(lines)


def method_hparams(args):
    """The method's hyperparameters from ``--method-args`` and the authors' flags (typed dict).

    Raises: UserInputError for an unknown method or key, a bad value, a key given twice (in one
    or several ``--method-args`` flags), ``help`` mixed with values, or an authors' flag the
    method does not have.
    """
    try:
        cls = method_class(args.method)
        if "help" in args.method_args:
            if len(args.method_args) > 1:
                raise UserInputError("--method-args help lists the method's hyperparameters and takes no "
                                     "key=value items: give 'help' alone, or only key=value items")
            print(describe_method(cls))
            sys.exit(0)
        hparams = parse_method_args(args.method, args.method_args)
    except ValueError as e:
        flag = "--method" if args.method not in METHODS else "--method-args"
        raise UserInputError(f"{flag}: {e}") from None
    for flag in AUTHORS_METHOD_FLAGS:
        value = getattr(args, flag)
        if value is None:
            continue
        if flag not in cls.hyperparameters:
            raise UserInputError(f"--{flag}: method {args.method} has no hyperparameter {flag} "
                                 f"(it has: {', '.join(cls.hyperparameters) or 'none'})")
        if flag in hparams:
            raise UserInputError(f"--{flag} and --method-args {flag}=... both given; use one")
        try:
            hparams[flag] = cls.hyperparameters[flag].parse(flag, value)
        except ValueError as e:
            raise UserInputError(f"--{flag} {value}: {str(e).split(': ', 1)[-1]}") from None
    return hparams


def _check_args(args):
    if not 0 < args.len <= MAX_BITS:
        raise UserInputError(f"--len {args.len}: the code length must be an integer in 1..{MAX_BITS} "
                             "(paper: 12, 24, 36, 48)")
    for flag, value in (("--image-size", args.image_size), ("--bs", args.bs), ("--epochs", args.epochs),
                        ("--patience", args.patience)):
        check_flag(flag, value, 0 if flag == "--patience" else 1)
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserInputError(f"--lr {args.lr}: must be a positive number")
    check_flag("--workers", args.workers, 0)
    check_flag("--eval-every", args.eval_every, 0)
    check_flag("--unseen-identities", args.unseen_identities, 0)
    if args.dataset not in DATASETS:
        raise UserInputError(f"--dataset {args.dataset!r} is unknown; expected one of {', '.join(DATASETS)}")
    return method_hparams(args)


def check_features(method_cls, world, amp_flag, compile_mode):
    """Refuse, in one line, a training feature the method declares unsupported.

    Returns: (amp allowed (bool), notes (list of str) to log at start-up).
    Raises: UserInputError for ``--amp on``, ``--compile`` or several processes when unsupported.
    """
    notes, amp_ok = [], True
    for feature, reason in method_cls.unsupported.items():
        asked = {"ddp": world > 1, "amp": amp_flag == "on", "compile": compile_mode != "off"}.get(feature, False)
        if asked:
            flag = {"ddp": "torchrun with several processes", "amp": "--amp on", "compile": "--compile"}[feature]
            raise UserInputError(f"--method {method_cls.name} does not support {flag}: {reason}")
        if feature == "amp":
            amp_ok = False
        notes.append(f"{feature} ({reason})")
    return amp_ok, notes


def check_setup(args, machine=True):
    """Every check made before data or files are touched (flags, method and its hyperparameters,
    backbone, ``--pretrained`` on it, image size, recipe, feature support), as for a single
    process; with ``machine`` also this machine's (``check_machine``).

    The checks that need the data (``check_train_size``: the batch against the training set) are
    separate. Returns: the method's typed hyperparameters. Raises: UserInputError naming the flag.
    """
    hparams = _check_args(args)
    backbone = _setup(args, hparams, 1)[0]
    if machine:
        check_machine(args, backbone)
    return hparams


def check_machine(args, backbone):
    """What this machine must offer the run: the ``--device`` (a CUDA GPU for cuda), a valid
    ``DCDH_MEMORY_LIMIT_BYTES`` when set, and the ImageNet weights in the local cache for
    ``--pretrained``. Returns the torch.device. Raises: UserInputError naming the flag or variable."""
    device = resolve_device(args.device)
    memory_limit()
    if args.pretrained:
        try:
            check_pretrained(backbone, cache=True)
        except (ValueError, FileNotFoundError) as e:
            raise UserInputError(str(e)) from None
    return device


def check_train_size(bs, num_train):
    """Raise UserInputError when the batch ``bs`` is larger than the training set."""
    if bs > num_train:
        raise UserInputError(f"--bs {bs} is larger than the training set ({num_train} images)")


@exit_on_user_error("dcdh_train.py")
def main(args):
    hparams = _check_args(args)
    device = resolve_device(args.device)
    memory_limit()  # before any file is written
    dist_info = init_distributed(device)
    try:
        return _train(args, hparams, dist_info)
    finally:
        cleanup()


def _setup(args, hparams, world):
    """Resolve the run's network, input size, recipe and feature support (no I/O)."""
    method_cls = METHODS[args.method]
    backbone = args.backbone or method_cls.requires_backbone or default_backbone(args.dataset, args.image_size)
    check_backbone(method_cls, backbone)
    image_size = args.image_size or DEFAULT_IMAGE_SIZE[backbone]
    try:
        if args.pretrained:
            check_pretrained(backbone)
        check_image_size(backbone, image_size)
        recipe = resolve_recipe(backbone, method_cls.recipe, optimizer=args.optimizer, lr=args.lr,
                                epochs=args.epochs, patience=args.patience)
    except ValueError as e:
        raise UserInputError(str(e)) from None
    if args.bs % world:
        raise UserInputError(f"--bs {args.bs} (the global batch) must be divisible by the {world} processes")
    amp_ok, notes = check_features(method_cls, world, args.amp, args.compile)
    return backbone, image_size, recipe, amp_ok, notes


def check_backbone(method_cls, backbone):
    """Refuse, in one line, a network the method cannot train: a method that requires its own
    network (``requires_backbone``) on another one, or a two-branch network
    (``models.TWO_BRANCH_BACKBONES``) under a method not built for it."""
    required = method_cls.requires_backbone
    if required and backbone != required:
        raise UserInputError(f"--method {method_cls.name} trains its own network: use --backbone {required} "
                             f"(or leave --backbone out), not {backbone}")
    if backbone in TWO_BRANCH_BACKBONES and backbone != required:
        owners = [name for name, cls in METHODS.items() if cls.requires_backbone == backbone]
        raise UserInputError(f"--backbone {backbone} returns two branches' codes while training; only "
                             f"--method {' or '.join(owners) or '(none)'} trains it, not {method_cls.name}")


def _load_data(args, image_size):
    """(database, queries, label_map, training view of the database, held-out identities); checks
    sizes. With ``--unseen-identities K`` the K identities drawn by ``data.unseen.choose_unseen``
    are taken out of both splits: the returned splits and label_map hold the trained ones only."""
    database, queries, label_map = build_datasets(args.dataset, args.data_root, image_size)
    unseen = []
    if args.unseen_identities:
        unseen = choose_unseen(database, queries, args.unseen_identities, args.seed)
        split = hold_out(database, queries, unseen)
        database, queries, label_map = split["database"], split["queries"], split["label_map"]
    train_set = training_view(database)
    if len(label_map) < 2:
        raise UserInputError(f"the training split has {len(label_map)} identity; hashing needs at least 2")
    check_train_size(args.bs, len(train_set))
    return database, queries, label_map, train_set, unseen


def _wrap_for_training(model, method, dist_info, compile_mode):
    """The module the loop trains: DDP-wrapped across processes (SyncBatchNorm on GPUs), compiled
    if asked; it shares ``model``'s weights, so checkpoints are written from ``model``."""
    train_model = model
    if dist_info.enabled:
        method.all_reduce = all_reduce_sum_   # batch statistics over the global batch
        if dist_info.device.type == "cuda":
            train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None)
    return compile_model(train_model, compile_mode, dist_info.device)


def format_duration(seconds):
    """``1h 02min``, ``3min 05s`` or ``42s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}min"
    return f"{minutes}min {secs:02d}s" if minutes else f"{secs}s"


def _train(args, hparams, dist_info):
    device, world = dist_info.device, dist_info.world_size
    backbone, image_size, recipe, amp_ok, unsupported = _setup(args, hparams, world)
    best_path, last_path, log_path = output_paths(args.save or f"{args.method}_{args.dataset}{args.len}.tar",
                                                  args.checkpoint_dir)
    resume_path = find_resume(args.resume, best_path, last_path)
    database, queries, label_map, train_set, unseen = _load_data(args, image_size)
    num_classes, epochs, patience = len(label_map), recipe["epochs"], recipe["patience"]
    # before the model is built and before any file is written: will the method fit the device?
    # (CPU processes of one machine share its memory; each GPU process has its own device)
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if device.type == "cpu" else 1
    mem_estimate, mem_free = check_memory(METHODS[args.method], num_classes, args.len, len(train_set),
                                          args.bs // world, device, hparams, processes=sharing)

    torch.manual_seed(args.seed)  # the same initial weights and method state in every process
    amp, precision, precision_note = choose_precision(args.amp, device, amp_ok)
    try:
        model = build_model(backbone, args.len, pretrained=args.pretrained).to(device)
        method = build_method(args.method, num_classes, args.len, train_labels=database.labels, **hparams)
    except (ValueError, FileNotFoundError) as e:
        raise UserInputError(str(e)) from None
    model = model.to(memory_format=torch.channels_last)  # 1.4x on CPU (measured), standard on GPU
    method = method.to(device)
    optimizer = build_optimizer(recipe, model, method)
    config = {"method": args.method, "method_args": dict(method.hparams), "backbone": backbone,
              "bits": args.len, "image_size": image_size, "dataset": args.dataset, "num_classes": num_classes,
              "label_map": label_map, "unseen_identities": unseen,
              "recipe": recipe, "lr": recipe["lr"], "bs": args.bs, "epochs": epochs,
              "optimizer": recipe["optimizer"], "seed": args.seed, "amp": amp, "precision": precision,
              "compile": args.compile, "world_size": world, "device_type": device.type,
              "cpu_capability": cpu_capability(), "cpu_model": cpu_model(), "threads": torch.get_num_threads(),
              "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    config.update({k: v for k, v in method.hparams.items() if k in AUTHORS_METHOD_FLAGS})

    start_epoch, best_loss, best_epoch = 0, math.inf, -1
    if resume_path:
        start_epoch, best_loss, best_epoch = restore(resume_path, model, method, optimizer, config, best_path)
    train_model = _wrap_for_training(model, method, dist_info, args.compile)

    log = setup_logger("dcdh_train", log_path if dist_info.is_main else None)
    if not dist_info.is_main:
        log.disabled = True
    log.info(f"[config] dataset {args.dataset} ({len(train_set)} train / {len(queries)} test images, "
             f"{num_classes} identities), {backbone} at {image_size}x{image_size}, {args.len} bits, "
             f"batch {args.bs}, lr {recipe['lr']}, {recipe['optimizer']}, {epochs} epoch{'s' if epochs > 1 else ''} "
             f"(early stop after {patience + 1} epoch{'s' if patience else ''} in a row without a lower loss), "
             f"device {device}"
             + (f" x {world} processes" if world > 1 else "")
             + (", bf16 autocast" if amp else ", fp32") + f" (--amp {args.amp}" + (f"; CPU capability {cpu_capability()}" if device.type == "cpu" else "") + ")"
             + (f", torch.compile mode {args.compile}" if args.compile != "off" else ""))
    log.info(f"[config] method {args.method}: " + (", ".join(f"{k} {v}" for k, v in method.hparams.items())
                                                     or "no hyperparameters")
             + f"; run seed {args.seed}; best checkpoint -> {best_path}, log -> {log_path}")
    log.info(f"[config] memory of method {args.method} (its state and one step, network excluded): "
             f"about {format_bytes(mem_estimate)} for {num_classes:,} identities, "
             + (f"{format_bytes(mem_free)} available on {device}" if mem_free is not None
                else f"available memory on {device} unknown"))
    if precision_note:
        log.info(precision_note)
    if unsupported:
        log.info(f"[note] method {args.method} does not support: " + "; ".join(unsupported))
    if unseen:
        log.info(f"[config] {len(unseen)} identities held out of training (--unseen-identities, seed {args.seed}; "
                 "no image of them is trained on or evaluated here; evaluation.py reports them apart): "
                 + ", ".join(map(str, unseen[:12])) + (" ..." if len(unseen) > 12 else ""))
    if args.compile == "reduce-overhead" and device.type != "cuda":
        log.info("[note] --compile reduce-overhead adds CUDA graphs on a GPU only; on the CPU it compiles "
                 "as --compile default")
    best_held = True  # False: no file holds the resumed run's best model
    if resume_path:
        log.info(f"[resume] from {resume_path}: {start_epoch} epochs done, best loss {best_loss:.4f} "
                 f"at epoch {best_epoch + 1}")
        if dist_info.is_main:  # --save under another name than the resumed run's: the model goes there too
            holder, copied = carry_best_model(best_path, resume_path, best_loss, best_epoch)
            best_held = holder is not None or best_epoch < 0
            if copied:
                log.info(f"[resume] best model so far (epoch {best_epoch + 1}) copied from {holder} to {best_path}")
        if dist_info.enabled:  # every process takes process 0's answer: all stop (exit 2) or all go on
            held = [best_held]
            torch.distributed.broadcast_object_list(held, src=0)
            best_held = held[0]
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
    since = time.time()
    if start_epoch >= epochs or start_epoch - 1 - best_epoch > patience:
        why = (f"all {epochs} epochs are done" if start_epoch >= epochs
               else f"it had stopped early (no lower training loss for more than {patience} epochs)")
        if not best_held:
            raise UserInputError(f"--resume {resume_path}: training had already ended ({why}), and no file holds its "
                                 f"best model (epoch {best_epoch + 1}; not {best_path}); nothing was written")
        log.info(f"[done] nothing to train: {resume_path} has {start_epoch} epochs and {why}; "
                 f"best loss {best_loss:.4f} at epoch {best_epoch + 1}, model in {best_path} "
                 "(a larger --epochs or --patience continues it)")
        return {"best_path": best_path, "best_loss": best_loss, "best_epoch": best_epoch}
    if not best_held:
        log.info(f"[note] no file holds the resumed run's best model (epoch {best_epoch + 1}); {best_path} is "
                 "written at this run's next lower training loss")
    epoch = start_epoch
    for epoch in range(start_epoch, epochs):
        lr = learning_rate(recipe, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = make_loader(train_set, local_bs, shuffle=True, drop_last=drop_last, workers=workers,
                             generator=generator, device=device, sampler=sampler, with_index=True)
        try:
            stats = train_one_epoch(train_model, method, optimizer, loader, device, epoch, amp=amp,
                                    progress=dist_info.is_main)
        except NonFiniteLoss as e:
            kept = (f"the last good checkpoint {best_path} (epoch {best_epoch + 1}) is kept"
                    if best_epoch >= 0 else "no checkpoint had been written yet")
            log.info(f"[stopped] {e}; {kept}. Try a smaller --lr.")
            sys.exit(1)
        improved = stats["loss"] < best_loss
        if improved:
            best_loss, best_epoch = stats["loss"], epoch
        terms = ", ".join(f"{k} {v:.4f}" for k, v in stats.items() if k not in ("loss", "images", "seconds"))
        per_epoch = (time.time() - since) / (epoch + 1 - start_epoch)  # evaluations included
        left = epochs - epoch - 1
        log.info(f"[epoch {epoch + 1}/{epochs}] loss {stats['loss']:.4f}" + (f" ({terms})" if terms else "")
                 + f", lr {lr:g}, {stats['images'] / stats['seconds']:.0f} images/s, {per_epoch:.1f} s/epoch"
                 + (f", at most {format_duration(per_epoch * left)} left ({left} epoch{'s' if left > 1 else ''}; early stopping "
                    "may end sooner)" if left else ""))
        state = epoch_state(model, method, optimizer, epoch + 1, best_loss, best_epoch, config)
        if dist_info.is_main:  # one process writes; the others wait at the barrier below
            if improved:
                save_checkpoint(state, best_path)
                log.info(f"[saved] {best_path} (lowest training loss so far)")
            save_checkpoint(state, last_path)
        last = epoch + 1 == epochs or epoch - best_epoch > patience
        if dist_info.is_main and args.eval_every and ((epoch + 1) % args.eval_every == 0 or last):
            # the whole, unpadded query and database sets, in this process alone
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                # evaluation must not move the random state the next epochs (and a resume) use
                metrics = evaluate(model, *eval_loaders, device, encoder=method.encode)
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
    log.info(f"[done] {epoch + 1 - start_epoch} epoch(s) in {format_duration(time.time() - since)}; "
             f"best loss {best_loss:.4f} at epoch {best_epoch + 1}; "
             + (f"model saved as {best_path}" if best_held or os.path.isfile(best_path)
                else f"no file holds that model (the resumed run's best file is missing; {best_path} not written)"))
    return {"best_path": best_path, "best_loss": best_loss, "best_epoch": best_epoch}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
