"""The evaluation pass: encode queries and database with the network, then the retrieval metrics.

Used by ``evaluation.py``, ``search.py`` and, every ``--eval-every`` epochs, the training loop.
"""
import torch

from utils.metrics import binarize, chance_map, default_curve_ranks, retrieval_metrics
from utils.metrics_real import cosine_retrieval_metrics


@torch.no_grad()
def encode(model, loader, device, encoder=None, real=False):
    """Binary codes of every image in ``loader``.

    ``encoder``: the method's encode step (``methods.checkpoint_encoder``, ``HashingMethod.encode``),
    float (B, K) outputs -> +-1 codes; None: sign(h) with 0 -> -1 (docs/design.md).
    Returns: (codes float32 (N, K) of +-1 on ``device``, labels int64 (N,) on ``device``), in the
    loader's order; with ``real`` also the network outputs before encoding (float32 (N, K)).
    """
    model.eval()
    encoder = encoder or binarize
    codes, labels, outputs = [], [], []
    for images, y in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        h = model(images).float()
        codes.append(encoder(h))
        labels.append(y.to(device))
        if real:
            outputs.append(h)
    out = (torch.cat(codes), torch.cat(labels))
    return out + (torch.cat(outputs),) if real else out


def evaluate(model, query_loader, database_loader, device, topk=(1, 5, 10), radius=2, curve_ranks=None,
             encoder=None, real=False):
    """Encode queries and database, then compute the retrieval metrics of ``utils.metrics``.

    ``curve_ranks`` (list of int or None): ranks of the precision@N / recall@N curves
    (default 1, 5, 10, 20, 50, ... and the database size). ``encoder``: as ``encode``.
    ``real``: also rank by cosine similarity of the outputs before encoding (the real-valued bound).

    Returns: dict of plain values with keys ``map``, ``map_tie_aware``, ``precision_at_{k}``,
    ``precision_radius_{r}``, ``recall_radius_{r}``, ``num_queries``, ``num_database``, ``bits``,
    ``queries_without_relevant``, ``chance_map`` (the expected mAP of a random ranking) and
    ``curves``; with ``real`` also ``real`` = {``map``, ``precision_at_{k}``} of the cosine ranking.
    """
    q = encode(model, query_loader, device, encoder, real)
    db = encode(model, database_loader, device, encoder, real)
    (q_codes, q_labels), (db_codes, db_labels) = q[:2], db[:2]
    ranks = sorted(set(curve_ranks or default_curve_ranks(len(db_codes))) | set(topk))
    out = retrieval_metrics(q_codes, db_codes, q_labels, db_labels, topk=tuple(topk), radius=radius,
                            curve_ranks=[r for r in ranks if r <= len(db_codes)])
    out["chance_map"] = chance_map(q_labels, db_labels)
    if real:
        out["real"] = cosine_retrieval_metrics(q[2], db[2], q_labels, db_labels, topk=tuple(topk))
    return out
