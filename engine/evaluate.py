"""The evaluation pass: encode queries and database with the network, then the retrieval metrics.

Used by ``evaluation.py``, ``search.py`` and, every ``--eval-every`` epochs, the training loop.
"""
import torch

from utils.metrics import binarize, default_curve_ranks, retrieval_metrics


@torch.no_grad()
def encode(model, loader, device):
    """Binary codes of every image in ``loader``.

    Returns: (codes float32 (N, K) of +-1 on ``device``, labels int64 (N,) on ``device``),
    in the loader's order; codes = sign(h) with 0 -> -1 (docs/design.md).
    """
    model.eval()
    codes, labels = [], []
    for images, y in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        h = model(images)
        codes.append(binarize(h.float()))
        labels.append(y.to(device))
    return torch.cat(codes), torch.cat(labels)


def evaluate(model, query_loader, database_loader, device, topk=(1, 5, 10), radius=2, curve_ranks=None):
    """Encode queries and database, then compute the retrieval metrics of ``utils.metrics``.

    ``curve_ranks`` (list of int or None): ranks of the precision@N / recall@N curves
    (default 1, 5, 10, 20, 50, ... and the database size).

    Returns: dict of plain values with keys ``map``, ``map_tie_aware``, ``precision_at_{k}``,
    ``precision_radius_{r}``, ``recall_radius_{r}``, ``num_queries``, ``num_database``, ``bits``,
    ``queries_without_relevant`` and ``curves``.
    """
    q_codes, q_labels = encode(model, query_loader, device)
    db_codes, db_labels = encode(model, database_loader, device)
    ranks = sorted(set(curve_ranks or default_curve_ranks(len(db_codes))) | set(topk))
    return retrieval_metrics(q_codes, db_codes, q_labels, db_labels, topk=tuple(topk), radius=radius,
                             curve_ranks=[r for r in ranks if r <= len(db_codes)])
