"""The real-valued bound: retrieval by cosine similarity of the network outputs before ``sign``.

Ranking the database by the cosine similarity of the real-valued outputs ``u`` (instead of the
Hamming distance of ``sign(u)``) shows what quantization costs a method (Sablayrolles, Douze,
Usunier, Jegou, ICASSP 2017: "the features without coding" as an upper reference). The
conventions are those of ``utils.metrics``: ranking by descending similarity with ties broken
by database index (a stable sort), AP over the full ranking with R = 0 giving AP 0, and
precision@k divided by min(k, N). Similarities are computed in float64; an all-zero output has
similarity 0 to everything.
"""
import torch
import torch.nn.functional as F

from utils.codes import as_tensor

BUDGET_BYTES = 256 << 20
"""Working memory of one chunk of queries (a few (chunk, N) tensors)."""


def _check(features, labels, name):
    x = as_tensor(features, f"{name}_features")
    y = as_tensor(labels, f"{name}_labels")
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}_features must be a non-empty (items, K) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}_features must be a float tensor, got {x.dtype}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name}_labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name}_labels must be integer class indices, got {y.dtype}")
    return x, y


def cosine_retrieval_metrics(query_features, database_features, query_labels, database_labels,
                             topk=(1, 5, 10), chunk_size=None):
    """mAP and precision@k of the ranking by cosine similarity (module docstring).

    Args:
        query_features: float (Q, K) real-valued network outputs; database_features: float (N, K)
            on the same device. query_labels (Q,), database_labels (N,): integer class indices.
        topk: positive ints k of precision@k. chunk_size: queries per chunk (None: from N and
            ``BUDGET_BYTES``).
    Returns:
        dict ``map`` (float, mean AP over all Q queries) and ``precision_at_{k}`` (float) per k.
    Raises:
        ValueError: for empty or mismatched inputs, different feature lengths, non-integer labels
            or a non-positive k.
    """
    q, q_labels = _check(query_features, query_labels, "query")
    db, db_labels = _check(database_features, database_labels, "database")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"feature lengths differ: {q.shape[1]} (queries) and {db.shape[1]} (database)")
    ks = [topk] if isinstance(topk, int) else list(topk)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"topk must hold positive integers, got {topk!r}")
    n = db.shape[0]
    chunk = chunk_size or max(1, BUDGET_BYTES // (n * 8 * 4))
    qn = F.normalize(q.double(), dim=1)
    dbn = F.normalize(db.to(q.device).double(), dim=1)
    db_labels = db_labels.to(q.device)
    ranks = torch.arange(1, n + 1, device=q.device, dtype=torch.float64)
    ap, hits = [], []
    for start in range(0, q.shape[0], chunk):
        sim = qn[start:start + chunk] @ dbn.t()
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices
        rel = (db_labels[order] == q_labels[start:start + chunk].to(q.device)[:, None]).double()
        found = rel.cumsum(1)
        r = rel.sum(1)
        ap.append(torch.where(r > 0, (found / ranks * rel).sum(1) / r.clamp(min=1), torch.zeros_like(r)))
        hits.append(torch.stack([found[:, min(k, n) - 1] / min(k, n) for k in ks], 1))
    ap, hits = torch.cat(ap).cpu(), torch.cat(hits).cpu()
    out = {"map": float(ap.mean())}
    for i, k in enumerate(ks):
        out[f"precision_at_{k}"] = float(hits[:, i].mean())
    return out
