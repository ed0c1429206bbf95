"""Retrieval metrics for +-1 hash codes (docs/design.md, "Retrieval metrics").

One implementation, used by training, evaluation and the benchmarks. Every function takes its
arguments in the same order::

    (query_codes, database_codes, query_labels, database_labels, ...)

This module holds the public functions and their conventions; the per-query statistics they
average come from the chunked engine in ``utils.metrics_engine`` (memory-bounded, exact, no
per-query loop). ``binarize`` and ``hamming_distance`` live in ``utils.codes`` and are re-exported
here.

Conventions
-----------
* Codes are +-1 tensors, ``query_codes`` of shape (Q, K) and ``database_codes`` of shape (N, K),
  any floating dtype or a signed integer dtype (int8 is the compact choice). ``binarize`` turns
  network outputs into codes (sign with 0 -> -1).
* Labels are integer tensors of shape (Q,) / (N,), one class per item; a database item is
  relevant to a query iff their labels are equal.
* Hamming distance ``d = (K - <q, b>) / 2``, an integer in 0..K.
* Ranking: ascending distance, ties broken by database index (a stable sort), so every result is
  deterministic and independent of the hardware.
* AP of a query over the full ranking: ``(1/R) sum_k P@k rel_k`` with R the number of relevant
  database items. A query with R = 0 has AP 0, counts in the mean and is reported as
  ``queries_without_relevant`` (never NaN).
* mAP@k: the same sum restricted to the top k, divided by the number of relevant items within the
  top k (the deep-hashing literature's convention); AP@k = 0 when none is in the top k.
* Tie-aware AP (McFee and Lanckriet, 2010): the expected AP when the order inside each
  equal-distance group is uniformly random; it does not depend on the database order.
* precision@k = (relevant items among the first k) / k; when k > N the divisor is N.
* Within Hamming radius r: retrieved = items with ``d <= r``; precision = relevant retrieved /
  retrieved (0 when nothing is retrieved), recall = relevant retrieved / R (0 when R = 0).
* Means are over all queries, computed in float64.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from utils.codes import as_tensor, binarize, hamming_distance
from utils.metrics_engine import _evaluate   # the engine's entry point (private to utils.metrics)

__all__ = [
    "binarize",
    "hamming_distance",
    "mean_average_precision",
    "tie_aware_map",
    "precision_at_k",
    "precision_recall_within_radius",
    "precision_recall_curves",
    "pr_curve_over_radii",
    "retrieval_metrics",
    "default_curve_ranks",
    "chance_map",
]


# --------------------------------------------------------------------------------------------
# argument checks and reductions over queries
# --------------------------------------------------------------------------------------------

def _check_positive_ints(values, name):
    if isinstance(values, (int, np.integer)):
        values = (values,)
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name} must contain positive integers, got {v!r}")
        out.append(int(v))
    if not out:
        raise ValueError(f"{name} is empty")
    return out


def _check_radius(radius):
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"radius must be a non-negative integer, got {radius!r}")
    return int(radius)


def _mean(x):
    return float(x.double().mean()) if x.numel() else 0.0


def _safe_div(a, b):
    a, b = a.double(), b.double()
    return torch.where(b > 0, a / b.clamp(min=1), torch.zeros_like(a))


# --------------------------------------------------------------------------------------------
# public metrics
# --------------------------------------------------------------------------------------------

def mean_average_precision(query_codes, database_codes, query_labels, database_labels, topk=None,
                           chunk_size=None, *, method="auto") -> Dict:
    """Mean average precision with ties broken by database index.

    Args:
        query_codes: (Q, K) +-1 codes (float or signed integer dtype).
        database_codes: (N, K) +-1 codes, same device.
        query_labels: (Q,) integer class indices. database_labels: (N,) integer class indices.
        topk: None for AP over the whole ranking (divisor R = relevant items in the database), or
            a positive int k for mAP@k (divisor = relevant items within the top k, AP 0 if none;
            k >= N gives the same as None).
        chunk_size: maximum number of queries per chunk (None: chosen from N and a 256 MiB budget).
        method: "auto", "histogram" or "sort" (same results; for tests and benchmarks).
    Returns:
        dict with ``map`` (float, mean over all Q queries), ``ap`` (float64 CPU tensor (Q,), in
        query order) and ``queries_without_relevant`` (int, queries with R = 0; their AP is 0).
    Raises:
        ValueError: for mismatched shapes, lengths or code lengths, empty inputs, non +-1 codes,
            non-integer labels or a non-positive ``topk``.
    """
    if topk is not None:
        topk = _check_positive_ints(topk, "topk")[0]
    r = _evaluate(query_codes, database_codes, query_labels, database_labels, map_topk=topk,
                  chunk_size=chunk_size, method=method)
    ap = r["ap"] if topk is None else r["ap_topk"]
    return {"map": _mean(ap), "ap": ap, "queries_without_relevant": int((r["num_relevant"] == 0).sum())}


def tie_aware_map(query_codes, database_codes, query_labels, database_labels, chunk_size=None) -> Dict:
    """Tie-aware mAP: expected AP when each equal-distance group is in uniformly random order.

    Exact closed form over the K+1 distance groups of each query (McFee and Lanckriet 2010), not
    sampling; invariant to any permutation of the database.

    Args:
        query_codes (Q, K), database_codes (N, K): +-1 codes. query_labels (Q,),
        database_labels (N,): integer class indices. chunk_size: max queries per chunk or None.
    Returns:
        dict with ``map`` (float, mean over all queries; R = 0 gives AP 0), ``ap`` (float64 CPU
        tensor (Q,)) and ``queries_without_relevant`` (int).
    Raises:
        ValueError: as ``mean_average_precision``.
    """
    r = _evaluate(query_codes, database_codes, query_labels, database_labels, need_ranks=False,
                  chunk_size=chunk_size)
    return {"map": _mean(r["ap_tie"]), "ap": r["ap_tie"],
            "queries_without_relevant": int((r["num_relevant"] == 0).sum())}


def precision_at_k(query_codes, database_codes, query_labels, database_labels, ks=(1, 5, 10),
                   chunk_size=None, *, method="auto") -> Dict[int, float]:
    """Mean precision@k over queries, ranking by distance with ties broken by database index.

    Args:
        codes and labels as ``mean_average_precision``; ks: positive int or sequence of them.
    Returns:
        dict {k: float}: mean over queries of (relevant items among the first k) / k; when
        k > N the divisor is N (every item is retrieved).
    Raises:
        ValueError: as ``mean_average_precision``, or for a non-positive k.
    """
    ks = _check_positive_ints(ks, "ks")
    r = _evaluate(query_codes, database_codes, query_labels, database_labels, ks=ks,
                  chunk_size=chunk_size, method=method)
    return {k: _mean(r["hits_at_k"][:, i].double() / min(k, r["N"])) for i, k in enumerate(ks)}


def precision_recall_within_radius(query_codes, database_codes, query_labels, database_labels, radius=2,
                                   chunk_size=None) -> Dict[str, float]:
    """Precision and recall of the items within Hamming radius ``radius`` (distance <= radius).

    Args:
        codes and labels as ``mean_average_precision``; radius: non-negative int (a radius >= K
        retrieves the whole database).
    Returns:
        dict ``precision`` (float: mean over queries of relevant retrieved / retrieved, a query
        retrieving nothing counts as 0) and ``recall`` (float: mean of relevant retrieved / R, 0
        when R = 0).
    Raises:
        ValueError: as ``mean_average_precision``, or for a negative radius.
    """
    radius = _check_radius(radius)
    r = _evaluate(query_codes, database_codes, query_labels, database_labels, need_ranks=False,
                  chunk_size=chunk_size)
    p, rec = _radius_pr(r, radius)
    return {"precision": p, "recall": rec}


def _radius_pr(r, radius):
    col = min(radius, r["K"])
    ret = r["retrieved_within"][:, col]
    rel = r["relevant_within"][:, col]
    return _mean(_safe_div(rel, ret)), _mean(_safe_div(rel, r["num_relevant"]))


def _radius_curve(r):
    ret, rel = r["retrieved_within"], r["relevant_within"]
    prec = _safe_div(rel, ret).mean(0)
    rec = _safe_div(rel, r["num_relevant"][:, None].expand_as(rel)).mean(0)
    return {"radius": list(range(r["K"] + 1)), "precision": prec.tolist(), "recall": rec.tolist()}


def default_curve_ranks(num_database: int) -> List[int]:
    """Ranks of the default precision@N / recall@N curve: 1, 5, 10, 20, 50, 100, 200, 500, ...
    below ``num_database``, then ``num_database`` itself."""
    if num_database < 1:
        raise ValueError(f"num_database must be positive, got {num_database}")
    ranks, base = [], 1
    while True:
        for mult in (1, 2, 5) if base > 1 else (1, 5):
            v = mult * base
            if v >= num_database:
                return ranks + [int(num_database)]
            ranks.append(v)
        base *= 10


def precision_recall_curves(query_codes, database_codes, query_labels, database_labels, ranks,
                            chunk_size=None, *, method="auto") -> Dict[str, list]:
    """Precision@N and recall@N curves at the given ranks (stable ranking by distance, index).

    Args:
        codes and labels as ``mean_average_precision``; ranks: sequence of positive ints N.
    Returns:
        dict ``ranks`` (list of int), ``precision`` (list of float: mean of relevant in top N /
        min(N, database size)) and ``recall`` (list of float: mean of relevant in top N / R, 0
        when R = 0).
    Raises:
        ValueError: as ``mean_average_precision``, or for empty or non-positive ranks.
    """
    ranks = _check_positive_ints(ranks, "ranks")
    r = _evaluate(query_codes, database_codes, query_labels, database_labels, curve_ranks=ranks,
                  chunk_size=chunk_size, method=method)
    return _rank_curve(r, ranks)


def _rank_curve(r, ranks):
    hits = r["hits_at_rank"].double()
    div = torch.tensor([min(n, r["N"]) for n in ranks], dtype=torch.float64)
    prec = (hits / div[None, :]).mean(0)
    rec = _safe_div(hits, r["num_relevant"][:, None].expand_as(hits)).mean(0)
    return {"ranks": list(ranks), "precision": prec.tolist(), "recall": rec.tolist()}


def pr_curve_over_radii(query_codes, database_codes, query_labels, database_labels,
                        chunk_size=None) -> Dict[str, list]:
    """Precision and recall within every Hamming radius 0..K (the hash-lookup PR curve).

    Args: codes and labels as ``mean_average_precision``.
    Returns:
        dict ``radius`` (list 0..K), ``precision`` and ``recall`` (lists of K+1 floats, means over
        queries with the conventions of ``precision_recall_within_radius``).
    Raises:
        ValueError: as ``mean_average_precision``.
    """
    r = _evaluate(query_codes, database_codes, query_labels, database_labels, need_ranks=False,
                  chunk_size=chunk_size)
    return _radius_curve(r)


def chance_map(query_labels, database_labels) -> float:
    """Chance level: the expected mAP of a uniformly random ranking of the database.

    For a query with R relevant items among N the expected AP is
    ``H_N / N + (R - 1) / (N - 1) * (1 - H_N / N)`` (H_N the N-th harmonic number): the sum over
    ranks k of P(rel_k) E[precision@k | rel_k] / R. Slightly above R / N, the share of the query's
    identity; a query whose identity is absent from the database counts 0 (as in mAP).

    Args: query_labels (Q,), database_labels (N,): integer labels (tensors, arrays or lists).
    Returns: float, the mean over queries. Raises: ValueError for empty inputs.
    """
    q = np.asarray(as_tensor(query_labels, "query_labels").cpu()).reshape(-1)
    db = np.asarray(as_tensor(database_labels, "database_labels").cpu()).reshape(-1)
    if q.size == 0 or db.size == 0:
        raise ValueError(f"chance_map needs queries and a database, got {q.size} and {db.size} labels")
    n = db.size
    ids, counts = np.unique(db, return_counts=True)
    r = np.zeros(q.size)
    pos = np.searchsorted(ids, q).clip(max=ids.size - 1)
    found = ids[pos] == q
    r[found] = counts[pos[found]]
    h_n = float(np.sum(1.0 / np.arange(1, n + 1)))
    slope = (r - 1) / (n - 1) if n > 1 else np.zeros_like(r)
    ap = np.where(r > 0, h_n / n + slope * (1 - h_n / n), 0.0)
    return float(ap.mean())


def retrieval_metrics(query_codes, database_codes, query_labels, database_labels, topk=(1, 5, 10),
                      radius=2, curve_ranks=None, chunk_size=None, *, map_topk=None,
                      method="auto") -> Dict:
    """All retrieval metrics in one chunked pass over the queries.

    Args:
        query_codes: (Q, K) +-1 codes (float or signed integer dtype); database_codes: (N, K).
        query_labels: (Q,) and database_labels: (N,) integer class indices.
        topk: ranks k of precision@k (positive ints). radius: Hamming radius of the P/R pair.
        curve_ranks: ranks of the precision@N / recall@N curve (None: ``default_curve_ranks(N)``).
        chunk_size: maximum queries per chunk (None: automatic, from N and a 256 MiB budget).
        map_topk: also report ``map_at_{k}`` (mAP@k, divisor = relevant items in the top k).
        method: "auto", "histogram" or "sort" (same results).
    Returns:
        dict of JSON-serialisable values: ``map``, ``map_tie_aware``, ``precision_at_{k}`` for every
        k, ``precision_radius_{r}``, ``recall_radius_{r}``, ``num_queries``, ``num_database``,
        ``bits``, ``queries_without_relevant``, ``map_at_{k}`` when asked, and ``curves`` =
        {``precision_at_n``: {ranks, precision, recall}, ``pr_over_radius``: {radius, precision,
        recall}}. Conventions in the module docstring.
    Raises:
        ValueError: for mismatched shapes, lengths or code lengths, empty inputs, non +-1 codes,
            non-integer labels, non-positive ranks or a negative radius.
    """
    ks = _check_positive_ints(topk, "topk")
    radius = _check_radius(radius)
    if map_topk is not None:
        map_topk = _check_positive_ints(map_topk, "map_topk")[0]
    if curve_ranks is None:
        n = as_tensor(database_codes, "database_codes")
        curve_ranks = default_curve_ranks(n.shape[0]) if n.dim() == 2 and n.shape[0] > 0 else [1]
    ranks = _check_positive_ints(curve_ranks, "curve_ranks")
    r = _evaluate(query_codes, database_codes, query_labels, database_labels, ks=ks, map_topk=map_topk,
                  curve_ranks=ranks, chunk_size=chunk_size, method=method)
    out = {"map": _mean(r["ap"]), "map_tie_aware": _mean(r["ap_tie"])}
    if map_topk is not None:
        out[f"map_at_{map_topk}"] = _mean(r["ap_topk"])
    for i, k in enumerate(ks):
        out[f"precision_at_{k}"] = _mean(r["hits_at_k"][:, i].double() / min(k, r["N"]))
    p, rec = _radius_pr(r, radius)
    out[f"precision_radius_{radius}"] = p
    out[f"recall_radius_{radius}"] = rec
    out.update(num_queries=int(r["Q"]), num_database=int(r["N"]), bits=int(r["K"]),
               queries_without_relevant=int((r["num_relevant"] == 0).sum()))
    out["curves"] = {"precision_at_n": _rank_curve(r, ranks), "pr_over_radius": _radius_curve(r)}
    return out
