"""Read an experiment file (TOML) and check it completely before anything trains.

File format (docs/reproduce.md)::

    name = "celeba299_cpu"          # default: the file name without .toml; the output folder
    description = "..."             # optional, free text
    dataset = "ddh"                 # a --dataset of dcdh_train.py
    data_root = "../shared/data/celeba299-ddh32"   # relative to the current folder
    methods = ["dcdh", "csq"]       # names of methods.METHODS
    bits = [12, 24, 36, 48]
    seeds = [0, 1, 2]
    device = "cpu"                  # optional (default: cuda if available)
    out = "runs"                    # optional: cells go to <out>/<name>/
    figure_bits = 48                # optional: code length of the PR and precision@N figures
    unseen_identities = 60          # optional: hold 60 identities out of training (dcdh_train.py
                                    # --unseen-identities); every cell also reports the unseen protocol

    [train]                         # settings of every cell (default: each method's recipe)
    epochs = 28                     # at most 100000 (MAXIMUM); lr in (0, 10]
    amp = "auto"
    threads = 1                     # torch threads per cell (the default), whatever --jobs is

    [overrides.ddh]                 # one method's settings; they replace [train]'s
    backbone = "ddhnet"
    method_args = { weight_quant = 0.01 }

Every problem is a ``UserInputError`` naming the file and the key (one line, exit 2): the file's
own checks, then dcdh_train.py's (``dcdh_train.check_setup`` on every distinct cell setup), the
batch size against the training set, and this machine's (``check_machine``: the device, the
``DCDH_MEMORY_LIMIT_BYTES`` setting, ``--pretrained`` weights in the local cache), so that no
cell fails on a setting the trainer would refuse.
"""
import os
import re
import tomllib
from dataclasses import dataclass, field

from utils.errors import UserInputError

TOP_KEYS = ("name", "description", "dataset", "data_root", "methods", "bits", "seeds", "device", "out",
            "figure_bits", "unseen_identities", "train", "overrides")

TRAIN_KEYS = {
    # key: (dcdh_train.py flag (None: a setting of the cell process), kind, minimum or choices)
    "epochs": ("--epochs", "int", 1),
    "patience": ("--patience", "int", 0),
    "bs": ("--bs", "int", 1),
    "lr": ("--lr", "float", None),
    "threads": (None, "int", 1),
    "optimizer": ("--optimizer", "choice", "OPTIMIZERS"),
    "backbone": ("--backbone", "choice", "BACKBONES"),
    "image_size": ("--image-size", "int", 1),
    "pretrained": ("--pretrained", "bool", None),
    "amp": ("--amp", "amp", None),
    "compile": ("--compile", "choice", "COMPILE_MODES"),
    "workers": ("--workers", "int", 0),
}
"""Keys of ``[train]`` and ``[overrides.<method>]`` (``method_args`` is overrides-only)."""

MAXIMUM = {"epochs": 100_000, "patience": 100_000, "threads": 1024, "lr": 10.0}
"""Upper bounds of numeric settings: far above any published recipe (the papers train 150-1000
epochs with learning rates up to 0.1), so a larger value is a typo (``epochs = 10**15``)."""

DEFAULT_THREADS = 1
"""Torch threads of each cell (``threads``): fixed, whatever ``--jobs`` and the machine's core
count, because the thread count changes the floating-point reductions and so the trained network
(issue 19: DDH mAP 0.9702 with one thread against 0.9624 with two). ``--jobs`` by default runs as
many cells at once as the cores hold (``default_jobs``)."""

DEFAULT_BS = 256
"""dcdh_train.py's --bs default."""

NOT_COMPARED = ("data_root", "device", "workers")
"""Settings a resumed or finished cell may change (another machine's paths and devices)."""


@dataclass
class Cell:
    """One (method, bits, seed) of a grid: where it writes and how it is trained and evaluated."""
    method: str
    bits: int
    seed: int
    dir: str
    train_flags: list            # dcdh_train.py arguments (absolute paths, no --resume)
    eval_flags: list             # evaluation.py arguments (--load added by the cell)
    settings: dict               # what must not change between attempts (see NOT_COMPARED)
    backbone: str = ""
    epochs: int = 0
    amp: bool = False
    threads: int = DEFAULT_THREADS   # torch threads of the cell's process (``threads`` setting)
    bs: int = DEFAULT_BS
    image_size: int = 0             # the network's input side (0: unknown)

    @property
    def name(self):
        return f"{self.method}-{self.bits}b-s{self.seed}"

    def path(self, *parts):
        return os.path.join(self.dir, *parts)


@dataclass
class Experiment:
    path: str
    name: str
    dataset: str
    data_root: str
    methods: list
    bits: list
    seeds: list
    out_dir: str
    description: str = ""
    device: str = None
    figure_bits: int = None
    train: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    cells: list = field(default_factory=list)
    device_key: str = "device"   # where the device comes from: the file's key, or --device
    train_images: int = None     # images in the training split (None: not counted)
    unseen_identities: int = 0   # identities held out of training (0: none)


def _err(path, key, message):
    return UserInputError(f"{path}: {key}: {message}")


def toml_value(value):
    """``value`` as the experiment file writes it: ``true``/``false`` (not Python's ``True``),
    strings quoted, lists and tables in TOML's brackets; for messages about the file's values."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)  # single quotes: a TOML literal string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    return repr(value) if isinstance(value, float) else str(value)


def _int_list(path, raw, key, low, high):
    if key not in raw:
        raise _err(path, key, "missing; expected a list of integers")
    value = raw[key]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise _err(path, key, f"expected a list of integers, got {toml_value(value)}")
    if not value:
        raise _err(path, key, "empty list: the grid has no cells")
    for v in value:
        if not low <= v <= high:
            raise _err(path, key, f"{v} is out of range {low}..{high}")
    if len(set(value)) != len(value):
        raise _err(path, key, f"{toml_value(value)} repeats a value")
    return list(value)


def _check_train_value(path, key, value, where):
    """The dcdh_train.py flag(s) for one ``[train]``/``[overrides.M]`` entry."""
    import models
    from engine.recipes import OPTIMIZERS
    from utils.device import COMPILE_MODES
    choices = {"OPTIMIZERS": OPTIMIZERS, "BACKBONES": models.BACKBONES, "COMPILE_MODES": COMPILE_MODES}
    full = f"{where}.{key}"
    if key not in TRAIN_KEYS:
        extra = ", method_args" if where.startswith("overrides") else ""
        raise _err(path, full, f"unknown key; expected one of {', '.join(TRAIN_KEYS)}{extra}")
    flag, kind, arg = TRAIN_KEYS[key]
    high = MAXIMUM.get(key)
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool) or value < arg or (high and value > high):
            raise _err(path, full, f"{toml_value(value)}: expected an integer >= {arg}" + (f" and <= {high}" if high else ""))
        return [flag, str(value)] if flag else []
    if kind == "float":
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf")
                or (high and value > high)):
            raise _err(path, full, f"{toml_value(value)}: expected a number in (0, {high:g}]" if high else
                       f"{toml_value(value)}: expected a positive number")
        return [flag, repr(float(value))]
    if kind == "bool":
        if not isinstance(value, bool):
            raise _err(path, full, f"{toml_value(value)}: expected true or false")
        return [flag] if value else []
    if kind == "amp":
        if isinstance(value, bool):  # true/false: on/off (not 1/0, which equal True/False as dict keys)
            value = "on" if value else "off"
        if value not in ("auto", "on", "off"):
            raise _err(path, full, f"{toml_value(value)}: expected \"auto\", \"on\" or \"off\"")
        return [flag, value]
    if value not in choices[arg]:
        raise _err(path, full, f"{toml_value(value)}: expected one of {', '.join(choices[arg])}")
    return [flag, value]


def _method_args(path, method, table):
    """``method_args`` table -> ``["k=v", ...]``, checked against the method's hyperparameters."""
    from methods import parse_method_args
    key = f"overrides.{method}.method_args"
    if not isinstance(table, dict):
        raise _err(path, key, f"expected a table such as {{ key = value }}, got {toml_value(table)}")
    items = []
    for k, v in table.items():
        if isinstance(v, (dict, list)):
            raise _err(path, f"{key}.{k}", f"{toml_value(v)}: expected a number, a string or true/false")
        items.append(f"{k}={str(v).lower() if isinstance(v, bool) else v}")
    try:
        parse_method_args(method, items)
    except ValueError as e:
        raise _err(path, key, str(e)) from None
    return items


def _settings(path, raw, methods):
    """Checked ``[train]`` and ``[overrides.M]`` tables: (train dict, {method: dict})."""
    train = raw.get("train", {})
    if not isinstance(train, dict):
        raise _err(path, "train", "expected a table ([train])")
    if "method_args" in train:
        raise _err(path, "train.method_args", "set a method's hyperparameters in [overrides.<method>]")
    for k, v in train.items():
        _check_train_value(path, k, v, "train")
    overrides = raw.get("overrides", {})
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise _err(path, "overrides", "expected tables [overrides.<method>]")
    for method, table in overrides.items():
        if method not in methods:
            raise _err(path, f"overrides.{method}", f"{toml_value(method)} is not in methods ({', '.join(methods)})")
        for k, v in table.items():
            if k == "method_args":
                _method_args(path, method, v)
            else:
                _check_train_value(path, k, v, f"overrides.{method}")
    return dict(train), {m: dict(t) for m, t in overrides.items()}


def _data_root(path, raw, dataset, override, check=True):
    from data import DEFAULT_ROOTS, expected_layout
    root = override or raw.get("data_root") or DEFAULT_ROOTS.get(dataset)
    key = "--data-root" if override else "data_root"
    if root is None:
        raise _err(path, key, f"missing: --dataset {dataset} needs a folder holding {expected_layout(dataset)}")
    if not isinstance(root, str):
        raise _err(path, key, f"expected a folder name, got {toml_value(root)}")
    full = os.path.abspath(os.path.expanduser(root))
    if not check:
        return full
    if not os.path.isdir(full):
        raise _err(path, key, f"{root}: no such folder (relative paths are taken from the current folder, "
                   f"{os.getcwd()}); expected {expected_layout(dataset)}; pass another with --data-root")
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(full, split)):
            raise _err(path, key, f"{root}: has no {split}/ folder; expected {expected_layout(dataset)}")
    return full


def load_experiment(path, data_root=None, device=None, out=None, check_data=True, machine=True):
    """Read and check ``path``; returns an ``Experiment`` with its cells in run order (seed by
    seed, then code length, then method as listed).

    ``data_root``, ``device``, ``out``: command-line values that replace the file's.
    ``check_data`` False: the data folder need not exist (to rebuild a report elsewhere); True:
    it must, and every cell's batch must fit its training split.
    ``machine`` False: skip ``check_machine`` (a dry run or a report on a machine without the
    experiment's GPU); the device name is checked either way.
    Raises: UserInputError naming the file and the key, before anything is written.
    """
    from data import DATASETS
    from methods import METHODS
    if not os.path.isfile(path):
        raise UserInputError(f"{path}: no such experiment file")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserInputError(f"{path}: not valid TOML ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: cannot read ({e})") from None
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise _err(path, unknown[0], f"unknown key; expected one of {', '.join(TOP_KEYS)}")
    name = raw.get("name", os.path.splitext(os.path.basename(path))[0])
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise _err(path, "name", f"{toml_value(name)}: expected letters, digits, '.', '_' or '-' (it names a folder)")
    dataset = raw.get("dataset")
    if dataset not in DATASETS:
        raise _err(path, "dataset", ("missing" if dataset is None else f"{toml_value(dataset)} is unknown")
                   + f"; expected one of {', '.join(DATASETS)}")
    methods = raw.get("methods")
    if methods is None or not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise _err(path, "methods", f"expected a list of method names, got {toml_value(methods)}")
    if not methods:
        raise _err(path, "methods", "empty list: the grid has no cells")
    for m in methods:
        if m not in METHODS:
            raise _err(path, "methods", f"unknown method {toml_value(m)}; expected some of {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise _err(path, "methods", f"{toml_value(methods)} repeats a method")
    from dcdh_train import MAX_BITS
    bits = _int_list(path, raw, "bits", 1, MAX_BITS)
    seeds = _int_list(path, raw, "seeds", 0, 2**31 - 1)
    for key in ("description", "device", "out"):
        if key in raw and not isinstance(raw[key], str):
            raise _err(path, key, f"expected a string, got {toml_value(raw[key])}")
    for key in ("device", "out", "data_root"):  # "" would silently mean the default (out: ./<name>)
        if isinstance(raw.get(key), str) and not raw[key].strip():
            raise _err(path, key, f"{toml_value(raw[key])}: empty; expected a {'device' if key == 'device' else 'folder'} "
                       "name, or leave the key out for the default")
    for flag, value in (("--data-root", data_root), ("--device", device), ("--out", out)):
        if value is not None and not value.strip():
            raise UserInputError(f"{flag} {value!r}: empty; expected a {'device' if flag == '--device' else 'folder'}")
    figure_bits = raw.get("figure_bits")
    if figure_bits is not None and (not isinstance(figure_bits, int) or isinstance(figure_bits, bool)
                                    or figure_bits not in bits):
        raise _err(path, "figure_bits", f"{toml_value(figure_bits)}: expected an integer, one of bits {bits}")
    unseen = raw.get("unseen_identities", 0)
    if not isinstance(unseen, int) or isinstance(unseen, bool) or unseen < 0:
        raise _err(path, "unseen_identities", f"{toml_value(unseen)}: expected an integer >= 0 (identities held out of "
                   "training; 0 or absent: none)")
    train, overrides = _settings(path, raw, methods)
    exp = Experiment(path=path, name=name, dataset=dataset, methods=methods, bits=bits, seeds=seeds,
                     data_root=_data_root(path, raw, dataset, data_root, check_data),
                     out_dir=os.path.abspath(os.path.join(out or raw.get("out", "runs"), name)),
                     description=raw.get("description", ""), device=device or raw.get("device"),
                     figure_bits=figure_bits, train=train, overrides=overrides, unseen_identities=unseen,
                     device_key="--device" if device else "device")
    if exp.device:
        from utils.device import parse_device
        _device_error(exp, parse_device)
    # run order: seed by seed, so that a grid stopped part-way holds whole tables of the first seeds
    exp.cells = [make_cell(exp, m, b, s) for s in seeds for b in bits for m in methods]
    check_with_trainer(exp)
    if check_data:
        check_train_size(exp)
        check_unseen(exp)
    if machine:
        check_machine(exp)
    return exp


def _device_error(exp, check):
    """Run ``check(exp.device)``; its UserInputError names the file's ``device`` key (or is
    passed on as it is when the device came from ``--device``)."""
    try:
        return check(exp.device)
    except UserInputError as e:
        if exp.device_key == "--device":
            raise
        message = re.sub(r"^--device '?" + re.escape(exp.device) + r"'?: ", "", str(e))
        raise _err(exp.path, "device", f"{toml_value(exp.device)}: {message}") from None


def check_machine(exp):
    """This machine's checks (``dcdh_train.check_machine``): the device exists (a CUDA GPU for
    cuda), ``DCDH_MEMORY_LIMIT_BYTES`` is valid when set, and the ``--pretrained`` weights of every
    cell that asks for them are in the local cache. Raises: UserInputError naming the key."""
    from engine.preflight import memory_limit
    from utils.device import resolve_device
    if exp.device:
        _device_error(exp, resolve_device)
    memory_limit()
    check_with_trainer(exp, machine=True)


def check_unseen(exp):
    """Refuse an ``unseen_identities`` the data cannot hold out (``data.unseen.max_count``: all
    identities with test images but one, and 2 left in training), as dcdh_train.py would."""
    if not exp.unseen_identities:
        return
    from data.unseen import max_count, split_identities
    train, test = (split_identities(exp.dataset, exp.data_root, s) for s in ("train", "test"))
    if not train:
        return  # no identities to count: the trainer reports the data itself
    top = max_count(train, test)
    if exp.unseen_identities > top:
        raise _err(exp.path, "unseen_identities",
                   f"{exp.unseen_identities}: expected 1..{top} ({len(train & test)} of the {len(train)} training "
                   f"identities in {exp.data_root} have test images; one of them and at least 2 identities in "
                   "all must stay in training)")


def check_train_size(exp):
    """Refuse a batch size larger than the training split (as dcdh_train.py does once it has
    loaded the data); sets ``exp.train_images`` (None when the images cannot be counted: the
    trainer then reports the data itself)."""
    import dcdh_train
    from grid.estimate import count_train_images
    exp.train_images = count_train_images(exp.dataset, exp.data_root)
    if not exp.train_images:
        return
    for cell in exp.cells:
        opts = cell_options(exp, cell.method)
        bs = opts.get("bs", DEFAULT_BS)
        try:
            dcdh_train.check_train_size(bs, exp.train_images)
        except UserInputError:
            key = _table_of(exp, cell.method, "bs") + ".bs"
            raise _err(exp.path, f"{key} (cell {cell.name})",
                       f"{bs}{'' if 'bs' in opts else ' (the default)'} is larger than the training set "
                       f"({exp.train_images} images in {exp.data_root}); expected at most {exp.train_images}") from None


def _table_of(exp, method, key):
    """``overrides.<method>`` when that table sets ``key``, else ``train``."""
    return f"overrides.{method}" if key in exp.overrides.get(method, {}) else "train"


def _key_of(exp, method, message):
    """The experiment-file key a dcdh_train.py message is about: the first setting whose flag it
    names and the file sets (``overrides.M.key`` or ``train.key``); else the first it names;
    else the table of the method's settings."""
    flags = dict({key: spec[0] for key, spec in TRAIN_KEYS.items() if spec[0]}, method_args="--method-args")
    named = sorted((m.start(), key) for key, flag in flags.items()
                   for m in [re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", message)] if m)
    opts = cell_options(exp, method)
    chosen = next((key for _, key in named if key in opts), named[0][1] if named else None)
    if chosen is None:
        return f"overrides.{method}" if method in exp.overrides else "train"
    if chosen == "method_args":
        return f"overrides.{method}.method_args"
    return f"{_table_of(exp, method, chosen)}.{chosen}"


def cell_options(exp, method):
    """The method's settings: ``[train]`` with its ``[overrides.<method>]`` on top."""
    return {**exp.train, **exp.overrides.get(method, {})}


def make_cell(exp, method, bits, seed):
    """The Cell of (method, bits, seed): its folder, its dcdh_train.py and evaluation.py flags."""
    from data import default_backbone
    from engine.recipes import resolve_recipe
    from methods import METHODS
    opts = cell_options(exp, method)
    cell_dir = os.path.join(exp.out_dir, f"{method}-{bits}b-s{seed}")
    flags = ["--method", method, "--len", str(bits), "--seed", str(seed), "--dataset", exp.dataset,
             "--data-root", exp.data_root, "--save", os.path.join(cell_dir, "model.tar"),
             "--checkpoint-dir", cell_dir, "--eval-every", "0"]
    if exp.device:
        flags += ["--device", exp.device]
    where = f"overrides.{method}" if method in exp.overrides else "train"
    for key, value in opts.items():
        if key != "method_args":
            flags += _check_train_value(exp.path, key, value, where)
    if opts.get("method_args"):
        flags += ["--method-args", *_method_args(exp.path, method, opts["method_args"])]
    cls = METHODS[method]
    backbone = opts.get("backbone") or cls.requires_backbone or default_backbone(exp.dataset, opts.get("image_size"))
    try:
        recipe = resolve_recipe(backbone, cls.recipe, optimizer=opts.get("optimizer"), lr=opts.get("lr"),
                                epochs=opts.get("epochs"), patience=opts.get("patience"))
    except ValueError as e:
        raise _err(exp.path, where, str(e)) from None
    amp = {True: "on", False: "off"}.get(opts.get("amp"), opts.get("amp", "auto"))
    eval_flags = ["--dataset", exp.dataset, "--data-root", exp.data_root, "--bs", str(opts.get("bs", DEFAULT_BS))]
    if exp.device:
        eval_flags += ["--device", exp.device]
    if "workers" in opts:
        eval_flags += ["--workers", str(opts["workers"])]
    eval_flags += ["--real"]  # the real-valued bound beside the binary figures (results.csv real_* columns)
    settings = {"dataset": exp.dataset, "method": method, "bits": bits, "seed": seed,
                **{k: v for k, v in sorted(opts.items()) if k not in NOT_COMPARED}}
    if exp.unseen_identities:
        flags += ["--unseen-identities", str(exp.unseen_identities)]
        settings["unseen_identities"] = exp.unseen_identities
    from models import DEFAULT_IMAGE_SIZE
    return Cell(method=method, bits=bits, seed=seed, dir=cell_dir, train_flags=flags, eval_flags=eval_flags,
                settings=settings, backbone=backbone, epochs=recipe["epochs"], amp=amp,
                threads=opts.get("threads", DEFAULT_THREADS), bs=opts.get("bs", DEFAULT_BS),
                image_size=opts.get("image_size") or DEFAULT_IMAGE_SIZE.get(backbone, 0))


PATH_FLAGS = ("--data-root", "--save", "--checkpoint-dir", "--load")
"""Flags of dcdh_train.py / evaluation.py whose value is a path."""


def relative_path(path, base):
    """``path`` relative to the folder ``base`` (both taken from the current folder when relative),
    so that a record names no folder of the machine that wrote it; None stays None."""
    return None if path is None else os.path.relpath(os.path.abspath(path), os.path.abspath(base))


def portable_flags(flags, base):
    """``flags`` with the value of every ``PATH_FLAGS`` flag relative to ``base`` (a list of str)."""
    out = list(flags)
    for i, flag in enumerate(out[:-1]):
        if flag in PATH_FLAGS:
            out[i + 1] = relative_path(out[i + 1], base)
    return out


def resolve_flags(flags, base):
    """Inverse of ``portable_flags``: relative ``PATH_FLAGS`` values joined to ``base`` (absolute
    ones, as in cell.json files written before paths were relative, are kept)."""
    out = list(flags)
    for i, flag in enumerate(out[:-1]):
        if flag in PATH_FLAGS and not os.path.isabs(out[i + 1]):
            out[i + 1] = os.path.normpath(os.path.join(base, out[i + 1]))
    return out


def portable_spec(spec, out_dir, threads):
    """A cell's ``cell.json`` record without machine paths: ``data_root`` and the path flags
    relative to the experiment's output folder ``out_dir`` (the folder of results.csv; the cell
    resolves them from its folder's parent), plus the cell's torch ``threads``."""
    return dict(spec, data_root=relative_path(spec.get("data_root"), out_dir),
                train_flags=portable_flags(spec["train_flags"], out_dir),
                eval_flags=portable_flags(spec["eval_flags"], out_dir), threads=threads,
                paths="relative to the experiment's output folder (the folder of results.csv)")


def default_jobs(exp, cells):
    """Cells at once when ``--jobs`` is not given: on the CPU as many as the cores this process may
    use hold at ``threads`` each (``os.sched_getaffinity``: a Slurm allocation, not the whole
    node), at most one per cell; on a GPU 1. Returns: int >= 1."""
    from grid.estimate import device_type
    if not cells or device_type(exp) != "cpu":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(len(cells), cores // max(c.threads for c in cells)))


def check_with_trainer(exp, machine=False):
    """Run dcdh_train.py's own checks (``dcdh_train.check_setup``: flags, method, network,
    --pretrained, recipe, features; with ``machine`` this machine's too) on every distinct cell
    setup, so a combination it would refuse stops the grid before it starts. The message names
    the file's key (``_key_of``)."""
    import contextlib
    import io

    import dcdh_train
    seen = set()
    for cell in exp.cells:
        key = (cell.method, cell.bits)
        if key in seen:
            continue
        seen.add(key)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args = dcdh_train.get_args_parser().parse_args(cell.train_flags)
            # dcdh_train.py's argument checks and run setup (no I/O); see docs/reproduce.md
            dcdh_train.check_setup(args, machine=machine)
        except SystemExit:
            message = err.getvalue().strip().split("error: ", 1)[-1]
            raise UserInputError(f"{exp.path}: cell {cell.name}: {message}") from None
        except UserInputError as e:
            raise UserInputError(f"{exp.path}: {_key_of(exp, cell.method, str(e))} (cell {cell.name}): "
                                 f"{e}") from None


def select_shard(cells, shard):
    """Every N-th cell from the I-th (``shard`` = (I, N)), in run order."""
    if shard is None:
        return list(cells)
    i, n = shard
    return [c for k, c in enumerate(cells) if k % n == i]


def parse_shard(text):
    """``"I/N"`` -> (I, N) with 0 <= I < N. Raises: UserInputError."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise UserInputError(f"--shard {text}: expected I/N with 0 <= I < N (e.g. 0/4; "
                             "in a Slurm array: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(m.group(1)), int(m.group(2))
