"""Evaluate a DCDH checkpoint: mAP, tie-aware mAP, precision@top-k, P/R within Hamming radius 2.

    python evaluation.py --load model.tar --dataset facescrub --len 48

The test split is the query set and the train split the database (docs/design.md, retrieval
protocol). Binary codes are the method's encode step (``methods.checkpoint_encoder``: sign of the
network output with 0 -> -1, or the classifier baseline's codeword of the predicted class);
ranking ties are broken by database index. ``evaluate(...)`` returns the metrics as a dict;
nothing runs at import.

A checkpoint trained with identities held out (``dcdh_train.py --unseen-identities K``; its
config lists them) is evaluated under both protocols: the paper's on the trained identities (the
top-level keys of ``--json``) and the unseen one under ``"unseen"`` with the same keys (the
held-out identities' test images query their training-split images; ``data.unseen``). ``--real``
adds the ranking by cosine similarity of the outputs before binarization (``"real"``).
"""
import json
import os
import sys

import torch

from engine.evaluate import encode, evaluate  # noqa: F401 (search.py imports encode from here)
from data import DATASETS, DDHSplit, build_datasets, make_loader
from data.unseen import hold_out
from methods import METHODS, checkpoint_encoder
from models import BACKBONES, DEFAULT_IMAGE_SIZE, build_model, check_image_size, infer_backbone
from utils.checkpoint import atomic_write, load_checkpoint, resolve_checkpoint
from utils.device import resolve_device
from utils.errors import OneLineArgumentParser, UserInputError, check_flag, exit_on_user_error
from utils.plots import write_curves


def get_args_parser(add_help=True):
    p = OneLineArgumentParser(description="Evaluate a DCDH hashing model (mAP, precision@k, "
                                "P/R within Hamming radius 2).", add_help=add_help)
    p.add_argument("--load", required=True, help="checkpoint: a path, or a name under ./checkpoint")
    p.add_argument("--dataset", default="facescrub", help=f"one of {{{', '.join(DATASETS)}}} (default facescrub)")
    p.add_argument("--data-root", default=None, help="dataset folder with train/ and test/ "
                   "(default ./FaceScrub, ./YouTube, ./vggface2)")
    p.add_argument("--len", type=int, default=None, help="code length; checked against the checkpoint "
                   "(default: read from the checkpoint)")
    p.add_argument("--bs", type=int, default=256, help="batch size for encoding (default 256)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda if available)")
    p.add_argument("--backbone", default=None, choices=BACKBONES, help="override the backbone inferred from the checkpoint")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: the checkpoint's)")
    p.add_argument("--workers", type=int, default=None, help="data-loading processes (default 0 for DDH, 2 for folders)")
    p.add_argument("--topk", type=int, nargs="+", default=[1, 5, 10], help="precision@k ranks (default 1 5 10)")
    p.add_argument("--radius", type=int, default=2, help="Hamming radius for P/R (default 2)")
    p.add_argument("--real", action="store_true", help="also rank by cosine similarity of the network "
                   "outputs before binarization (mAP and precision@k: the real-valued bound)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the metrics (and curves) as JSON to PATH")
    p.add_argument("--plot-dir", default=None, metavar="DIR",
                   help="write precision@N and PR-over-radius plots (PNG) and their CSV files to DIR")
    return p


def load_hashing_model(path, device, bits=None, backbone=None):
    """Build the network stored in checkpoint ``path`` and load its weights.

    Args: path (str); device (torch.device); bits (int or None): expected code length;
    backbone (str or None): override the inferred backbone.
    Returns: (model in eval mode on ``device``, checkpoint dict, config dict).
    Raises: UserInputError for an unreadable or malformed checkpoint, an unknown network, or a
    code length that disagrees with ``bits``.
    """
    ckpt = load_checkpoint(path)
    config = dict(ckpt.get("config") or {})
    try:
        inferred, inferred_bits = infer_backbone(ckpt["backbone"])
    except ValueError as e:
        raise UserInputError(f"{path}: {e}") from None
    if backbone is None and config.get("backbone") is not None and config["backbone"] not in BACKBONES:
        raise UserInputError(f"{path}: malformed checkpoint: config 'backbone' is {config['backbone']!r}, "
                             f"expected one of {', '.join(BACKBONES)}")
    backbone = backbone or config.get("backbone") or inferred
    if bits is not None and bits != inferred_bits:
        raise UserInputError(f"--len {bits} disagrees with {path}, which holds a {inferred_bits}-bit model")
    model = build_model(backbone, inferred_bits)
    try:
        model.load_state_dict(ckpt["backbone"])
    except RuntimeError as e:
        raise UserInputError(f"{path}: weights do not fit a {backbone} network ({str(e).splitlines()[0]})") from None
    config.setdefault("backbone", backbone)
    config["bits"] = inferred_bits
    return model.to(device, memory_format=torch.channels_last).eval(), ckpt, config


def load_encoder(ckpt, config, path, device):
    """The checkpoint's encode step (``methods.checkpoint_encoder``), a callable outputs -> codes.

    A method this version does not know gets sign(output), with a warning on stderr.
    Raises: UserInputError naming ``path`` when the method's config or saved state does not fit it.
    """
    method = config.get("method") or "dcdh"
    if method not in METHODS:
        print(f"evaluation.py: warning: {path}: method {method!r} is unknown to this version; its codes are "
              "taken as sign(network output)", file=sys.stderr)
    try:
        return checkpoint_encoder(config, ckpt.get("centers"), device)
    except (ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"{path}: cannot rebuild the encode step of method "
                             f"{config.get('method') or 'dcdh'!r}: {e}") from None


def format_metrics(m, radius=2):
    """The paper's table lines for a metrics dict (percentages, two decimals); with ``real``
    (``--real``) the cosine ranking's figures beside the binary ones."""
    real = m.get("real") or {}
    line = f"mAP: {100 * m['map']:.2f}%   (tie-aware mAP: {100 * m['map_tie_aware']:.2f}%"
    if "chance_map" in m:
        line += f"; chance level {100 * m['chance_map']:.2f}%"
    lines = [line + ")" + (f"   real-valued (cosine, before binarization): {100 * real['map']:.2f}%"
                           if "map" in real else "")]
    for k in sorted(int(key.rsplit('_', 1)[1]) for key in m if key.startswith("precision_at_")):
        lines.append(f"precision@top{k}: {100 * m[f'precision_at_{k}']:.2f}%"
                     + (f"   real-valued: {100 * real[f'precision_at_{k}']:.2f}%"
                        if f"precision_at_{k}" in real else ""))
    lines.append(f"precision within Hamming radius {radius}: {100 * m[f'precision_radius_{radius}']:.2f}%")
    lines.append(f"recall within Hamming radius {radius}: {100 * m[f'recall_radius_{radius}']:.2f}%")
    lines.append(f"{m['num_queries']} queries, {m['num_database']} database items, {m['bits']} bits; "
                 f"{m['queries_without_relevant']} queries without a relevant database item")
    return "\n".join(lines)


def write_json(obj, path):
    """Atomically write ``obj`` as indented JSON to ``path``."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


@exit_on_user_error("evaluation.py")
def main(args):
    for flag, value in (("--len", args.len), ("--bs", args.bs), ("--image-size", args.image_size),
                        ("--topk", min(args.topk)), ("--workers", args.workers)):
        check_flag(flag, value, 0 if flag == "--workers" else 1)
    check_flag("--radius", args.radius, 0)
    if args.json and os.path.isdir(args.json):
        raise UserInputError(f"--json {args.json}: is a folder; name a file")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise UserInputError(f"--json {args.json}: the folder does not exist")
    if args.plot_dir and os.path.exists(args.plot_dir) and not os.path.isdir(args.plot_dir):
        raise UserInputError(f"--plot-dir {args.plot_dir}: is a file; name a folder")
    device = resolve_device(args.device)
    path = resolve_checkpoint(args.load)
    model, ckpt, config = load_hashing_model(path, device, bits=args.len, backbone=args.backbone)
    image_size = args.image_size or config.get("image_size") or DEFAULT_IMAGE_SIZE[config["backbone"]]
    try:
        check_image_size(config["backbone"], image_size)
    except ValueError as e:
        raise UserInputError(str(e)) from None
    encoder = load_encoder(ckpt, config, path, device)
    database, queries, _ = build_datasets(args.dataset, args.data_root, image_size)
    unseen = list(config.get("unseen_identities") or [])
    if unseen:
        split = hold_out(database, queries, unseen, where=f"{path} on {args.data_root or args.dataset}")
        database, queries = split["database"], split["queries"]
    workers = args.workers if args.workers is not None else (0 if isinstance(database, DDHSplit) else 2)

    def run(q_set, db_set):
        return evaluate(model, make_loader(q_set, args.bs, workers=workers, device=device),
                        make_loader(db_set, args.bs, workers=workers, device=device), device,
                        topk=args.topk, radius=args.radius, encoder=encoder, real=args.real)
    print(f"evaluating {path}: {config['backbone']}, {config['bits']} bits, method "
          f"{config.get('method') or 'dcdh'}, on {args.dataset} ({len(queries)} queries, {len(database)} database images) on {device}")
    if unseen:
        print(f"the paper's protocol, on the {len(split['label_map'])} identities trained on:")
    metrics = run(queries, database)
    print(format_metrics(metrics, args.radius))
    if unseen:
        print(f"unseen identities: the {len(unseen)} held out of training ({len(split['unseen_queries'])} test "
              f"images query their {len(split['unseen_database'])} training-split images):")
        metrics["unseen"] = run(split["unseen_queries"], split["unseen_database"])
        print(format_metrics(metrics["unseen"], args.radius))
    if args.json:
        write_json(dict(metrics, checkpoint=path, dataset=args.dataset), args.json)
        print(f"metrics written to {args.json}")
    if args.plot_dir:
        try:
            paths = write_curves(metrics, args.plot_dir, f"{args.dataset}, {config['bits']} bits")
            if unseen:
                paths += write_curves(metrics["unseen"], os.path.join(args.plot_dir, "unseen"),
                                      f"{args.dataset}, {config['bits']} bits, unseen identities")
        except OSError as e:
            raise UserInputError(f"--plot-dir {args.plot_dir}: cannot write ({e.strerror or e})") from None
        print(f"plots and CSV files written to {args.plot_dir}: "
              + ", ".join(os.path.relpath(p, args.plot_dir) for p in paths))
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
