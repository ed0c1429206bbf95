"""Face search with a DCDH checkpoint: encode a gallery into a faiss binary index, then query it.

    python search.py index --load model.tar --gallery ./faces --out faces.index
    python search.py query --index faces.index q1.jpg q2.jpg --topk 10 --sheet sheet.png
    python search.py query --index faces.index q1.jpg --radius 2 --json hits.json

``index`` encodes every gallery image with the checkpoint's network and its method's encode step
(``evaluation.load_encoder``: b = sign(h), 0 -> -1, or the classifier baseline's codeword of the
predicted class; the same for the queries), packs the bits (bit = b > 0) with ``np.packbits`` in
little bit order into bytes, and stores them in a ``faiss.IndexBinaryFlat`` of
d = 8 * ceil(K / 8) bits. Code lengths that are not multiples of 8 (12, 36) are padded with
zero bits in every code, so padded positions never differ and the faiss Hamming distance
equals the unpacked ``(K - <q, b>) / 2`` (DESIGN.md).

The index folder holds ``index.bin`` (``faiss.write_index_binary``) and ``meta.json``
(code length, backbone, image size, checkpoint path, transform, and per gallery item its
identity and path; DDH rows are named ``file.pkl#row``). It is written in a temporary
folder beside it and renamed into place, so an interrupted run leaves nothing half-written.
``meta.json`` also records ``model_sha256``, a fingerprint of the checkpoint's weights and
method state (``checkpoint_fingerprint``): ``query`` refuses a checkpoint with another
fingerprint (another model, or the recorded file retrained since), whose codes would not be
comparable with the gallery's. An edited ``meta.json`` (another version or bit order, a std
of 0, ...) is refused in one line too (``meta_value_problem``).

Ranking is by ascending Hamming distance with ties in gallery order (DESIGN.md). faiss's
binary k-NN search does not order equal distances stably, so ``rank_topk`` uses it only to
find the k-th smallest distance d_k, then ``range_search`` collects every item with distance
<= d_k and those are sorted by (distance, gallery index) and cut at k. This is exact for any
gallery size; ``rank_within`` does the same for ``--radius``.

Nothing runs at import; ``main(args)`` is the entry point.
"""
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile

import faiss
import numpy as np
import torch
from PIL import Image

from data import DDH_LAYOUT, make_loader
from data.ddh import DDHSplit
from data.folder import FaceFolder, face_transforms, open_image
from data.gallery_images import GalleryImages
from evaluation import encode, load_encoder, load_hashing_model
from models import DEFAULT_IMAGE_SIZE, check_image_size
from utils.binary_index import BIT_ORDER, build_index, pack_codes, rank_topk, rank_within
from utils.checkpoint import atomic_write, resolve_checkpoint
from utils.contact_sheet import write_sheet
from utils.device import resolve_device
from utils.errors import OneLineArgumentParser, UserInputError, check_flag, exit_on_user_error

INDEX_FILE = "index.bin"
META_FILE = "meta.json"
FORMAT = "dcdh-search-index"
FORMAT_VERSION = 1
"""``np.packbits`` bit order of the stored codes (used for the gallery and the queries alike)."""

GALLERY_KINDS = ("folder", "ddh", "vggface2", "facescrub", "youtube")
"""Values of ``--dataset`` for ``index``: image folders (folder, vggface2) or DDH pickles."""

DEFAULT_TOPK = 10


def get_args_parser(add_help=True):
    p = OneLineArgumentParser(description="Face search with a DCDH model: build a faiss binary index of a "
                                "gallery, then rank it for query images by Hamming distance.", add_help=add_help)
    sub = p.add_subparsers(dest="command", metavar="{index,query}")
    sub.required = True

    ix = sub.add_parser("index", help="encode a gallery into a binary index folder")
    ix.add_argument("--load", required=True, help="checkpoint: a path, or a name under ./checkpoint")
    ix.add_argument("--gallery", required=True, help="image folder (ROOT with <split>/<identity>/*, or a folder "
                    "of identity subfolders) or DDH-layout folder (ROOT/<split>/*.pkl)")
    ix.add_argument("--dataset", default=None, choices=GALLERY_KINDS,
                    help="gallery layout (default: ddh when <gallery>/<split>/*.pkl exist, else folder)")
    ix.add_argument("--split", default="train", help="split folder inside --gallery (default train; "
                    "an image folder without it is read as a flat folder of identities)")
    ix.add_argument("--out", required=True, help="index folder to write (replaced if it is an existing index)")
    ix.add_argument("--bs", type=int, default=256, help="batch size for encoding (default 256)")
    ix.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda if available)")
    ix.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: the checkpoint's)")
    ix.add_argument("--workers", type=int, default=None,
                    help="data-loading processes (default 0 for DDH, 2 for folders)")

    q = sub.add_parser("query", help="rank the gallery of an index for query images")
    q.add_argument("images", nargs="+", metavar="IMAGE", help="query image files")
    q.add_argument("--index", required=True, help="index folder written by 'search.py index'")
    q.add_argument("--load", default=None, help="checkpoint (default: the one recorded in the index)")
    q.add_argument("--topk", type=int, default=None, help=f"results per query (default {DEFAULT_TOPK}); "
                   "with --radius, an optional cap")
    q.add_argument("--radius", type=int, default=None, help="return every item within this Hamming distance")
    q.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    q.add_argument("--sheet", default=None, metavar="PNG", help="write a contact sheet (one row per query)")
    q.add_argument("--bs", type=int, default=256, help="batch size for encoding (default 256)")
    q.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda if available)")
    return p


# --------------------------------------------------------------------------------------------
# codes, index, ranking


# --------------------------------------------------------------------------------------------
# gallery


def detect_layout(gallery, split, dataset=None):
    """``'ddh'`` or ``'folder'`` for ``--dataset`` (None: ddh when ``gallery/split/*.pkl`` exist).

    Raises: UserInputError if ``gallery`` is not a folder.
    """
    if not os.path.isdir(gallery):
        raise UserInputError(f"--gallery {gallery}: no such folder")
    if dataset is None:
        return "ddh" if glob.glob(os.path.join(gallery, split, "*.pkl")) else "folder"
    return "ddh" if dataset in DDH_LAYOUT else "folder"


def _ddh_names(root):
    """``classes.txt`` of a DDH-layout folder (lines ``label name``) as a dict, or None."""
    path = os.path.join(root, "classes.txt")
    if not os.path.isfile(path):
        return None
    names = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[0].lstrip("-").isdigit():
                names[int(parts[0])] = parts[1].strip()
    return names or None


def load_gallery(gallery, layout, split, image_size):
    """The gallery dataset with one identity and one path per item, in gallery order.

    Args: gallery (str): folder; layout: 'ddh' or 'folder' (``detect_layout``); split (str);
    image_size (int): network input side (image folders; DDH galleries are 32x32).
    Returns: (dataset yielding ``(float32 (3, S, S), label)``, identities list of str,
    paths list of str (absolute; DDH rows as ``/abs/file.pkl#row``), info dict for the metadata:
    ``layout``, ``split`` (None for a flat folder) and ``transform``).
    Image files that PIL cannot open are left out with a warning (``FaceFolder``).
    Raises: UserInputError naming the folder when it is missing, empty or malformed.
    """
    if layout == "ddh":
        if image_size != 32:
            raise UserInputError(f"--image-size {image_size}: DDH-layout galleries are 32x32")
        ds = DDHSplit(gallery, split)
        names = _ddh_names(gallery)
        raw = ds.raw_labels.tolist()
        identities = [names.get(int(y), str(y)) if names else str(y) for y in raw]
        paths = []
        for f, n in zip(ds.files, ds.file_lengths):
            paths += [f"{os.path.abspath(f)}#{r}" for r in range(n)]
        transform = {"kind": "ddh", "mean": float(ds.mean), "std": float(ds.std)}
        return ds, identities, paths, {"layout": "ddh", "split": split, "transform": transform}
    root, sub, flat = gallery, split, not os.path.isdir(os.path.join(gallery, split))
    if flat and any(os.path.isdir(os.path.join(gallery, s)) for s in ("train", "test")):
        raise UserInputError(f"--split {split}: {os.path.join(gallery, split)} does not exist")
    if flat:  # a folder of identity subfolders: read it as the split "<name>" of its parent
        norm = os.path.normpath(os.path.abspath(gallery))
        root, sub = os.path.dirname(norm), os.path.basename(norm)
    ds = FaceFolder(root, sub, image_size)  # skips (with a warning) files PIL cannot open
    paths = [os.path.abspath(p) for p, _ in ds.samples]
    identities = [str(c) for c in ds.raw_labels]
    info = {"layout": "folder", "split": None if flat else split,
            "transform": {"kind": "face_test", "image_size": image_size}}
    return ds, identities, paths, info


def encode_packed(model, loader, device, encoder=None):
    """Packed binary codes (uint8 (N, ceil(K/8)), see ``pack_codes``) of every image of ``loader``;
    ``encoder``: the method's encode step (None: sign).

    Raises: UserInputError naming a file that cannot be decoded (``data.folder.load_rgb``).
    """
    codes, _ = encode(model, loader, device, encoder)
    return pack_codes(codes)


# --------------------------------------------------------------------------------------------
# index folder


def write_index_dir(out, index, meta):
    """Write ``index.bin`` and ``meta.json`` into a temporary folder beside ``out``, then rename it.

    An existing index folder at ``out`` is replaced (moved aside, then removed once the new one
    is in place). Raises UserInputError when ``out`` exists and is not an index folder, or its
    parent folder does not exist; on any error the temporary folder is removed.
    """
    check_out_dir(out)
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".", suffix=".tmp", dir=parent)
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; give it a normal folder's mode
        faiss.write_index_binary(index, os.path.join(tmp, INDEX_FILE))
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if os.path.isdir(out):
            old = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".", suffix=".old", dir=parent)
            os.rename(out, os.path.join(old, "x"))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(out) and os.path.isdir(os.path.join(old, "x")):
            os.rename(os.path.join(old, "x"), out)  # put the previous index back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_out_dir(out):
    """Raise UserInputError unless ``out`` can be (re)written as an index folder."""
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UserInputError(f"--out {out}: the folder {parent} does not exist")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UserInputError(f"--out {out}: exists and is not a folder")
        if os.listdir(out) and not os.path.isfile(os.path.join(out, META_FILE)):
            raise UserInputError(f"--out {out}: exists and is not a search index (refusing to replace it)")


def read_index_dir(path):
    """Load an index folder. Returns (faiss binary index, metadata dict).

    Raises: UserInputError when the folder or its files are missing, unreadable or inconsistent.
    """
    if not os.path.isdir(path):
        raise UserInputError(f"--index {path}: no such index folder (make one with 'search.py index')")
    meta_path, index_path = os.path.join(path, META_FILE), os.path.join(path, INDEX_FILE)
    for p in (meta_path, index_path):
        if not os.path.isfile(p):
            raise UserInputError(f"--index {path}: {os.path.basename(p)} is missing (not a search index)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserInputError(f"{meta_path}: unreadable metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserInputError(f"{meta_path}: not a search-index metadata file")
    missing = [k for k in ("bits", "backbone", "image_size", "transform", "identities", "paths") if k not in meta]
    if missing:
        raise UserInputError(f"{meta_path}: incomplete metadata (no {', '.join(missing)})")
    try:
        problem = meta_value_problem(meta)
    except (KeyError, TypeError, ValueError) as e:
        problem = f"malformed metadata ({type(e).__name__}: {e})"
    if problem:
        raise UserInputError(f"{meta_path}: {problem}; rebuild the index with 'search.py index'")
    try:
        index = faiss.read_index_binary(index_path)
    except RuntimeError as e:
        raise UserInputError(f"{index_path}: unreadable faiss index ({str(e).strip().splitlines()[0][:200]})") from None
    n, bits = len(meta["identities"]), meta["bits"]
    counts = {"num_items": meta.get("num_items", n), "identities": n, "paths": len(meta["paths"])}
    if any(v != index.ntotal for v in counts.values()) or index.d != 8 * ((bits + 7) // 8):
        listed = ", ".join(f"{v!r} {k}" for k, v in counts.items())
        raise UserInputError(f"--index {path}: {INDEX_FILE} ({index.ntotal} codes of {index.d} bits) does not "
                             f"match {META_FILE} ({listed}, {bits} bits); rebuild the index with 'search.py index'")
    return index, meta


def meta_value_problem(meta):
    """What is wrong with the values of index metadata (a str), or None when they are what
    ``search.py index`` writes: this ``FORMAT_VERSION`` and ``BIT_ORDER`` (the queries are
    packed in it), positive integer ``bits`` and ``image_size``, ``identities`` and ``paths`` lists of
    strings, an integer ``num_items`` (when present), a ``face_test`` transform of that
    size or a ``ddh`` one at 32 with a finite mean and a positive finite std (a std of 0 would
    scale the queries by 1e4). Raises KeyError/TypeError/ValueError on a missing or untyped entry.
    """
    if meta.get("version") != FORMAT_VERSION:
        return f"format version {meta.get('version')!r}, this search.py reads version {FORMAT_VERSION}"
    if meta.get("bit_order") != BIT_ORDER:
        return f"bit_order {meta.get('bit_order')!r}, expected {BIT_ORDER!r} (the order queries are packed in)"
    for key in ("bits", "image_size"):
        if type(meta[key]) is not int or meta[key] < 1:
            return f"{key} {meta[key]!r}: expected a positive integer"
    for key in ("identities", "paths"):
        if not isinstance(meta[key], list) or not all(isinstance(v, str) for v in meta[key]):
            return f"{key}: expected a list of strings, one per indexed image"
    if "num_items" in meta and (type(meta["num_items"]) is not int or meta["num_items"] < 0):
        return f"num_items {meta['num_items']!r}: expected a count of images"
    t, size = meta["transform"], meta["image_size"]
    if t["kind"] == "face_test":
        if t["image_size"] != size:
            return f"transform image_size {t['image_size']!r} differs from image_size {size}"
    elif t["kind"] == "ddh":
        if not all(type(t[k]) in (int, float) for k in ("mean", "std")):  # not true, "126.6" or null
            return f"transform mean {t['mean']!r}, std {t['std']!r}: expected numbers"
        mean, std = float(t["mean"]), float(t["std"])
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            return f"transform mean {t['mean']!r}, std {t['std']!r}: expected finite numbers, std > 0"
        if size != 32:
            return f"image_size {size}: DDH-layout galleries are 32x32"
    else:
        return f"transform kind {t['kind']!r}: expected 'face_test' or 'ddh'"
    return None


def checkpoint_fingerprint(ckpt):
    """SHA-256 (hex) of what encodes a checkpoint's codes: the network weights (``backbone``), the
    method's state (``centers``) and the method's name, entry by entry in name order (name, dtype,
    shape, bytes). Files with the same weights and state (the best and last files of one epoch)
    share it; a retrained or another model does not."""
    digest = hashlib.sha256()

    def feed(name, value):
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                feed(f"{name}.{key}", value[key])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                feed(f"{name}.{i}", v)
        else:
            digest.update(f"{name}={value!r}|".encode())
    feed("backbone", ckpt["backbone"])
    feed("centers", ckpt.get("centers"))
    feed("method", (ckpt.get("config") or {}).get("method") or "dcdh")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# queries


def query_transform(meta):
    """The gallery's test transform from index metadata: PIL RGB image -> float32 (3, S, S).

    Image folders: ``face_transforms(S, train=False)``. DDH galleries: resize to 32x32
    (bicubic), then the gallery split's normalisation ``clip((x - mean) / (std + 1e-5) * 0.1, -1, 1)``
    on 0..255 values (as ``DDHSplit.normalize``).
    """
    t = meta["transform"]
    if t["kind"] == "ddh":
        mean, scale = float(t["mean"]), 0.1 / (float(t["std"]) + 1e-5)

        def ddh(img):
            x = torch.from_numpy(np.asarray(img.resize((32, 32), Image.BICUBIC), dtype=np.float32).copy())
            return ((x.permute(2, 0, 1) - mean) * scale).clamp_(-1.0, 1.0)
        return ddh
    return face_transforms(int(t["image_size"]), train=False)


def query_identity(path, known):
    """The identity of a query image: its parent folder's name when that is a gallery identity, else None."""
    name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return name if name in known else None


def _batches(tensors, bs):
    for i in range(0, len(tensors), bs):
        chunk = torch.stack(tensors[i:i + bs])
        yield chunk, torch.zeros(len(chunk), dtype=torch.long)


def load_query_model(meta, load, device, index_path):
    """The hashing network for querying an index: ``load`` or the checkpoint in ``meta``.

    Returns: (model, checkpoint path, the method's encode step).
    Raises: UserInputError when the checkpoint is missing or its code length differs from the index's.
    """
    if load is not None:
        path = resolve_checkpoint(load)
    else:
        path = meta.get("checkpoint")
        if not path or not os.path.isfile(path):
            raise UserInputError(f"--index {index_path}: the checkpoint it was built with ({path}) is missing; "
                                 "pass --load CHECKPOINT")
    model, ckpt, config = load_hashing_model(path, device)
    if config["bits"] != meta["bits"]:
        raise UserInputError(f"{path} holds a {config['bits']}-bit model but --index {index_path} was built "
                             f"with {meta['bits']}-bit codes")
    try:
        check_image_size(config["backbone"], meta["image_size"])
    except ValueError as e:
        raise UserInputError(f"{path} cannot encode the {meta['image_size']}x{meta['image_size']} inputs of "
                             f"--index {index_path} ({e})") from None
    check_same_model(meta, ckpt, path, load is not None, index_path)
    if config["backbone"] != meta["backbone"]:
        print(f"search.py: warning: {path} is a {config['backbone']} network, the index was built with "
              f"{meta.get('backbone')}", file=sys.stderr)
    return model, path, load_encoder(ckpt, config, path, device)


def check_same_model(meta, ckpt, path, loaded, index_path):
    """Refuse a checkpoint whose codes are not comparable with the index's: its
    ``checkpoint_fingerprint`` differs from the ``model_sha256`` the index recorded (another model,
    even of the same network and code length, or the recorded file retrained since). An index
    without the entry (built before it existed) gets a one-line warning that this is unchecked.

    Args: loaded (bool): ``path`` came from ``--load`` (else from the index's metadata).
    Raises: UserInputError naming the checkpoint and the index.
    """
    expected = meta.get("model_sha256")
    if expected is None:
        print(f"search.py: warning: --index {index_path} records no model fingerprint (built by an older "
              f"search.py): cannot check that {path} is the model it was built with", file=sys.stderr)
        return
    if checkpoint_fingerprint(ckpt) == expected:
        return
    if loaded:
        raise UserInputError(f"--load {path}: not the model --index {index_path} was built with (its weights "
                             f"differ from those of {meta.get('checkpoint')}); its codes would not be comparable "
                             "with the gallery's: query with that model or rebuild the index with this one")
    raise UserInputError(f"--index {index_path}: its checkpoint {path} has changed since the index was built "
                         "(other weights); rebuild the index with 'search.py index'")


def search(meta, index, packed_queries, topk=None, radius=None):
    """Rank the gallery for packed queries; returns per query a list of result dicts.

    Each result: ``rank`` (1-based), ``distance`` (int), ``index`` (gallery position),
    ``identity`` (str), ``path`` (str). ``radius`` None: the ``topk`` (default 10) nearest;
    else every item within ``radius``, at most ``topk`` when given.
    """
    if radius is None:
        ranked = rank_topk(index, packed_queries, topk or DEFAULT_TOPK)
    else:
        ranked = rank_within(index, packed_queries, radius, limit=topk)
    out = []
    for ids, dists in ranked:
        out.append([{"rank": r + 1, "distance": int(d), "index": int(i), "identity": meta["identities"][i],
                     "path": meta["paths"][i]} for r, (i, d) in enumerate(zip(ids.tolist(), dists.tolist()))])
    return out


def no_results_text(radius, sep=" "):
    """What the table (``sep`` " ") and the contact sheet (``sep`` newline) say for a query with no results."""
    return "no gallery item" if radius is None else f"no gallery item{sep}within Hamming{sep}radius {radius}"


def format_results(queries, radius=None):
    """Plain-text table of query results (list of dicts with ``image``, ``identity``, ``results``).

    A query without results (possible with ``radius``, the ``--radius`` of the search) gets a
    line saying so instead of an empty table.
    """
    lines = []
    for n, q in enumerate(queries, 1):
        who = f"identity {q['identity']}" if q["identity"] is not None else "identity unknown"
        lines.append(f"query {n}/{len(queries)}: {q['image']} ({who}), {len(q['results'])} results")
        if not q["results"]:
            lines.append(f"  ({no_results_text(radius)})")
            continue
        lines.append(f"  {'rank':>4}  {'dist':>4}  {'identity':<12}  path")
        for r in q["results"]:
            mark = " *" if q["identity"] is not None and r["identity"] == q["identity"] else ""
            lines.append(f"  {r['rank']:>4}  {r['distance']:>4}  {r['identity']:<12}  {r['path']}{mark}")
    known = [q for q in queries if q["identity"] is not None]
    if known:
        top1 = sum(1 for q in known if q["results"] and q["results"][0]["identity"] == q["identity"])
        anyk = sum(1 for q in known if any(r["identity"] == q["identity"] for r in q["results"]))
        lines.append(f"(* = same identity as the query) query identity ranked first for {top1}/{len(known)} "
                     f"queries, among the listed results for {anyk}/{len(known)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# commands


def _check_out_file(flag, path):
    """Refuse, in one line, an output file whose folder is missing or that is a folder itself."""
    if path and os.path.isdir(path):
        raise UserInputError(f"{flag} {path}: is a folder; name a file")
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UserInputError(f"{flag} {path}: the folder does not exist")


def cmd_index(args):
    """``search.py index``: encode the gallery and write the index folder. Returns the metadata dict."""
    check_flag("--bs", args.bs)
    check_flag("--image-size", args.image_size)
    check_flag("--workers", args.workers, 0)
    layout = detect_layout(args.gallery, args.split, args.dataset)
    check_out_dir(args.out)
    device = resolve_device(args.device)
    path = resolve_checkpoint(args.load)
    model, ckpt, config = load_hashing_model(path, device)
    encoder = load_encoder(ckpt, config, path, device)
    backbone = config["backbone"]
    image_size = args.image_size or config.get("image_size") or DEFAULT_IMAGE_SIZE[backbone]
    try:
        check_image_size(backbone, image_size)
    except ValueError as e:
        raise UserInputError(str(e)) from None
    ds, identities, paths, info = load_gallery(args.gallery, layout, args.split, image_size)
    workers = args.workers if args.workers is not None else (0 if layout == "ddh" else 2)
    print(f"indexing {len(ds)} gallery items of {args.gallery} ({info['layout']}) with {path}: "
          f"{backbone}, {config['bits']} bits, {image_size}x{image_size}, on {device}")
    packed = encode_packed(model, make_loader(ds, args.bs, workers=workers, device=device), device, encoder)
    index = build_index(packed)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "bits": int(config["bits"]), "index_bits": int(index.d),
            "bit_order": BIT_ORDER, "backbone": backbone, "image_size": int(image_size),
            "checkpoint": os.path.abspath(path), "model_sha256": checkpoint_fingerprint(ckpt),
            "gallery": os.path.abspath(args.gallery), "layout": info["layout"], "split": info["split"],
            "transform": info["transform"], "num_items": len(identities), "identities": identities, "paths": paths}
    write_index_dir(args.out, index, meta)
    print(f"index written to {args.out} ({len(identities)} items, {len(set(identities))} identities, "
          f"{packed.shape[1]} bytes per code)")
    return meta


def cmd_query(args):
    """``search.py query``: encode the query images and rank the index. Returns the JSON-able result dict."""
    check_flag("--topk", args.topk)
    check_flag("--bs", args.bs)
    check_flag("--radius", args.radius, 0)
    _check_out_file("--json", args.json)
    _check_out_file("--sheet", args.sheet)
    index, meta = read_index_dir(args.index)
    images = [open_image(p) for p in args.images]  # every query checked before any work
    device = resolve_device(args.device)
    model, ckpt_path, encoder = load_query_model(meta, args.load, device, args.index)
    transform = query_transform(meta)
    packed = encode_packed(model, _batches([transform(im) for im in images], args.bs), device, encoder)
    known = set(meta["identities"])
    results = search(meta, index, packed, topk=args.topk, radius=args.radius)
    queries = [{"image": os.path.abspath(p), "identity": query_identity(p, known), "results": r}
               for p, r in zip(args.images, results)]
    out = {"index": os.path.abspath(args.index), "checkpoint": os.path.abspath(ckpt_path), "bits": meta["bits"],
           "mode": "radius" if args.radius is not None else "topk",
           "topk": args.topk if args.radius is not None else (args.topk or DEFAULT_TOPK),
           "radius": args.radius, "queries": queries}
    print(format_results(queries, args.radius))
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(out, indent=2).encode()))
        print(f"results written to {args.json}")
    if args.sheet:
        write_sheet(queries, args.sheet, GalleryImages(), max_results=args.topk or DEFAULT_TOPK,
                    empty_text=no_results_text(args.radius, sep="\n"))
        print(f"contact sheet written to {args.sheet}")
    return out


@exit_on_user_error("search.py")
def main(args):
    if args.command == "index":
        return cmd_index(args)
    return cmd_query(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
