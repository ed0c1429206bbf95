"""Packed binary codes in a faiss binary index, ranked by Hamming distance with stable ties.

Codes b in {-1, +1}^K are packed with ``np.packbits`` (bit = b > 0, little bit order) into
ceil(K / 8) bytes; the padding bits are 0 in every code, so the faiss Hamming distance equals
the unpacked ``(K - <q, b>) / 2`` also for K = 12 or 36. faiss's k-NN search does not order
equal distances stably, so ``rank_topk`` uses it only to find the k-th smallest distance d_k,
then ``range_search`` collects every item with distance <= d_k, sorted by (distance, index):
equal distances come in database order (docs/design.md), exactly, for any database size.
"""
import faiss
import numpy as np
import torch

BIT_ORDER = "little"


def pack_codes(codes):
    """Pack binary codes into bytes for a faiss binary index.

    Args: codes: (N, K) tensor or array of +-1 codes (or of real outputs: bit = value > 0).
    Returns: uint8 numpy array (N, ceil(K / 8)), C-contiguous; bit j of a code is bit j % 8
    (little order) of byte j // 8; the 8 * ceil(K / 8) - K padding bits are 0 in every code.
    Raises: ValueError if ``codes`` is not 2-d.
    """
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be a 2-d (N, K) array, got shape {codes.shape}")
    return np.ascontiguousarray(np.packbits(codes > 0, axis=1, bitorder=BIT_ORDER))


def build_index(packed):
    """A ``faiss.IndexBinaryFlat`` holding ``packed`` (uint8 (N, B) from ``pack_codes``); d = 8 * B bits."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    index = faiss.IndexBinaryFlat(packed.shape[1] * 8)
    if len(packed):
        index.add(packed)
    return index


def _stable(ids, dists):
    order = np.lexsort((ids, dists))  # by distance, then by gallery index
    return ids[order].astype(np.int64), dists[order].astype(np.int64)


def _within(index, q, limit):
    """Every item at distance < ``limit`` from the single packed query ``q`` (1, B), stably sorted."""
    lims, d, i = index.range_search(np.ascontiguousarray(q), int(limit))
    return _stable(np.asarray(i[lims[0]:lims[1]]), np.rint(np.asarray(d[lims[0]:lims[1]])))


def rank_topk(index, packed_queries, k):
    """The k nearest gallery items of each query, ties in gallery order.

    Args: index: faiss binary index; packed_queries: uint8 (Q, B); k (int > 0), clamped to the
    gallery size.
    Returns: list of Q pairs ``(ids int64 (k,), distances int64 (k,))``, ascending distance,
    equal distances by ascending gallery index. faiss k-NN gives the k-th distance d_k; a
    range search then returns all items with distance <= d_k, which are sorted by
    (distance, index) and cut at k, so the order among ties is exactly the database order.
    Raises: ValueError if k <= 0.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    packed_queries = np.ascontiguousarray(packed_queries, dtype=np.uint8)
    k = min(k, index.ntotal)
    if k == 0:
        return [(np.zeros(0, np.int64), np.zeros(0, np.int64)) for _ in range(len(packed_queries))]
    kth = index.search(packed_queries, k)[0][:, k - 1]
    out = []
    for qi in range(len(packed_queries)):
        ids, dists = _within(index, packed_queries[qi:qi + 1], int(kth[qi]) + 1)
        out.append((ids[:k], dists[:k]))
    return out


def rank_within(index, packed_queries, radius, limit=None):
    """Every gallery item within Hamming distance ``radius`` (inclusive) of each query.

    Args: index: faiss binary index; packed_queries: uint8 (Q, B); radius (int >= 0);
    limit (int or None): keep at most this many per query.
    Returns: list of Q pairs ``(ids int64 (n_q,), distances int64 (n_q,))`` sorted by
    (distance, gallery index). Uses faiss ``range_search`` (strict ``< radius + 1``).
    Raises: ValueError if radius < 0.
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    packed_queries = np.ascontiguousarray(packed_queries, dtype=np.uint8)
    out = []
    for qi in range(len(packed_queries)):
        ids, dists = _within(index, packed_queries[qi:qi + 1], radius + 1)
        out.append((ids[:limit], dists[:limit]) if limit is not None else (ids, dists))
    return out
