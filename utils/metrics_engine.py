"""The chunked engine behind ``utils.metrics``: per-query retrieval statistics of +-1 codes.

Private to ``utils.metrics`` (use the public functions there); ``_evaluate`` is the entry point.
It returns, per query, the statistics every metric is a mean of: the AP (full ranking and top k),
the tie-aware AP, the relevant items within the first k / N ranks, and the numbers of all and of
relevant items within every Hamming radius 0..K. Conventions: docs/design.md, "Retrieval metrics".

How it works
------------
Queries are processed in chunks of queries sorted by class (never one query at a time); each
chunk meets the database in blocks (one block up to 2^17 items, else blocks of about 2^16). For a
chunk and a block, one float32 matrix product gives, for every (query, database item) pair, the
integer key ``slot * (m+1)(K+1) + segment * (K+1) + distance``, where ``segment`` counts the items
of the query's class at or before the item inside the block (m = most such items of a class in
the block). The product's operands are the +-1 codes (times -0.5), one row per class holding its
running item count in base-256 digits (selected by a one-hot column per query), and constant rows
carrying each query's offset in signed base-128 digits and K/2. Every operand is exact in
bfloat16 and TF32 and every partial sum stays below 2^23, so the keys are exact integers even when
reduced-precision float32 matmul is enabled (K >= 256 uses float64). One ``bincount`` of the keys
is a per-query histogram over (segment, distance); its cumulative sum over segments, plus the
counts of earlier blocks, gives for every relevant item j the number of items with index < j at
distance d_j, hence its exact stable rank ``#(d < d_j) + #(d == d_j and index < j) + 1``. The AP,
mAP@k, precision@k and precision/recall@N follow from the sorted ranks of the relevant items;
P/R within every radius and the tie-aware AP from per-query histograms of the K+1 distances of all
and of relevant items. On CPU two worker threads process whole chunks (each with half of torch's
threads, restored afterwards). When classes are so large that a block's (segment, distance)
histogram would exceed the block, a stable sort of each chunk is used instead (same results,
slower). Working memory is about ``_MEMORY_BUDGET`` (256 MiB) per worker plus a float copy of the
database codes.

The tuning constants below are module globals read at call time (tests shrink them to reach the
large-database paths on small inputs).
"""
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from utils.codes import as_tensor, check_code_pair

_MEMORY_BUDGET = 256 * 2 ** 20    # bytes of per-chunk working buffers
_TILE_PAIRS = 1 << 22             # (queries x database items) per tile of the key matrix
_MAX_CHUNK = 1024                 # queries per chunk at most
_MIN_CHUNK = 64                   # queries per chunk at least (memory permitting)
_SINGLE_BLOCK_MAX = 1 << 17       # databases up to this size are processed as one block
_BLOCK_SIZE = 1 << 16             # database block size beyond that
_EXACT_LIMIT_F32 = 1 << 23        # float32 partial sums below this are exact integers or halves
_BIAS_ROWS = 5                    # constant rows 1, 128, 128^2, 128^3 (key offsets < 2^28), K/2
_UNION_ELEMS = 1 << 24            # distances to the relevant items of all classes of a chunk at once
_MAX_EXTRA_ROWS = 16              # class-segment rows appended to the database matrix per chunk
_SENTINEL = 1 << 62               # rank of a padding slot (larger than any real rank)
_METHODS = ("auto", "histogram", "sort")


# --------------------------------------------------------------------------------------------
# input checking
# --------------------------------------------------------------------------------------------

def _check_labels(y, name, n, what):
    y = as_tensor(y, name)
    if y.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of class indices (single-label), "
                         f"got shape {tuple(y.shape)}")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"{name} must have an integer dtype (int64 class indices), got {y.dtype}")
    if y.numel() != n:
        raise ValueError(f"{name} has {y.numel()} labels but {what} has {n} codes")
    return y.long()


def _check_inputs(query_codes, database_codes, query_labels, database_labels):
    q, b = check_code_pair(query_codes, database_codes)
    ql = _check_labels(query_labels, "query_labels", q.shape[0], "query_codes").to(q.device)
    dl = _check_labels(database_labels, "database_labels", b.shape[0], "database_codes").to(q.device)
    return q, b, ql, dl


# --------------------------------------------------------------------------------------------
# entry point: chunks of queries -> per-query statistics
# --------------------------------------------------------------------------------------------

def _evaluate(query_codes, database_codes, query_labels, database_labels, *, ks=(), map_topk=None,
              curve_ranks=(), need_ranks=True, chunk_size=None, method="auto"):
    """Per-query statistics in the original query order (CPU tensors).

    Inputs as ``utils.metrics.retrieval_metrics`` (checked here: ValueError for bad shapes,
    dtypes, values or ``method``); ``need_ranks=False`` skips the ranks (histograms only).
    Returns dict: ``num_relevant`` (Q,) int64; ``ap``, ``ap_topk`` (or None), ``ap_tie`` (Q,)
    float64; ``hits_at_k`` (Q, len(ks)) and ``hits_at_rank`` (Q, len(curve_ranks)) int64 numbers
    of relevant items in the top k; ``retrieved_within`` / ``relevant_within`` (Q, K+1) int64
    numbers of all / relevant items with distance <= r for r = 0..K; plus ``N``, ``K``, ``Q``.
    """
    q, b, ql, dl = _check_inputs(query_codes, database_codes, query_labels, database_labels)
    with torch.no_grad():
        S = _Setup(q, b, ql, dl, chunk_size, method, need_ranks)
        dev, Q, G = S.device, S.Q, S.G
        ks_t = torch.tensor(list(ks), dtype=torch.long, device=dev)
        cr_t = torch.tensor(list(curve_ranks), dtype=torch.long, device=dev)
        out = {
            "ap": torch.zeros(Q, dtype=torch.float64, device=dev),
            "ap_topk": torch.zeros(Q, dtype=torch.float64, device=dev) if map_topk is not None else None,
            "hits_at_k": torch.zeros(Q, len(ks), dtype=torch.long, device=dev),
            "hits_at_rank": torch.zeros(Q, len(curve_ranks), dtype=torch.long, device=dev),
            "hist_all": torch.zeros(Q, G, dtype=torch.long, device=dev),
            "hist_rel": torch.zeros(Q, G, dtype=torch.long, device=dev),
        }
        qs = q[S.qorder]

        def run(s, e, pool, slot, threads):
            qlab = S.q_sorted_labels[s:e]
            if S.method == "histogram":
                hist_all, hist_rel, ranks = _histogram_chunk(S, qs[s:e], qlab, pool, slot, threads)
            else:
                hist_all, hist_rel, ranks = _sort_chunk(S, qs[s:e], qlab)
            qidx = S.qorder[s:e]
            with lock:
                _chunk_statistics(out, qidx, S.nrel[qidx], hist_all, hist_rel, ranks, ks_t, map_topk, cr_t)

        lock = threading.Lock()
        chunks = list(S.chunks())
        T = S.threads
        if T >= 2 and len(chunks) >= 2:
            _run_two_workers(run, chunks, T)
        else:
            pool = ThreadPoolExecutor(T) if T > 1 and S.method == "histogram" else None
            try:
                for s, e in chunks:
                    run(s, e, pool, 1, T)
            finally:
                if pool is not None:
                    pool.shutdown()
        hist_all, hist_rel = out.pop("hist_all"), out.pop("hist_rel")
        out["ap_tie"] = _tie_aware_ap(hist_all, hist_rel, S.nrel.double())
        out["retrieved_within"] = torch.cumsum(hist_all, 1)
        out["relevant_within"] = torch.cumsum(hist_rel, 1)
        res = {k: (v.cpu() if v is not None else None) for k, v in out.items()}
        res["num_relevant"] = S.nrel.cpu()
        res.update(N=S.N, K=S.K, Q=S.Q, method=S.method, chunk_size=S.chunk, blocks=len(S.blocks))
        return res


def _run_two_workers(run, chunks, threads):
    """Process the chunks on two Python threads, each with ``threads // 2`` torch threads.

    Two independent workers keep both cores busy with whole chunks, which scales better than
    splitting every operation across OpenMP threads (no barrier per operation). The torch thread
    count is set inside the workers and restored afterwards.
    """
    per_worker = max(1, threads // 2)
    original = torch.get_num_threads()
    slots = itertools.count()
    local = threading.local()

    def init():
        local.slot = next(slots) % 2
        torch.set_num_threads(per_worker)

    def task(s, e):
        run(s, e, pool, local.slot, per_worker)

    pool = ThreadPoolExecutor(threads) if per_worker > 1 else None
    try:
        with ThreadPoolExecutor(2, initializer=init) as workers:
            for f in [workers.submit(task, s, e) for s, e in chunks]:
                f.result()
    finally:
        torch.set_num_threads(original)
        if pool is not None:
            pool.shutdown()


def _chunk_statistics(out, qidx, m, hist_all, hist_rel, ranks, ks_t, map_topk, cr_t):
    """Turn one chunk's histograms and sorted relevant ranks into per-query statistics."""
    out["hist_all"][qidx] = hist_all
    out["hist_rel"][qidx] = hist_rel
    if ranks is None:
        return
    c, M = ranks.shape
    if M == 0:
        return                                          # no relevant item anywhere: all zeros
    valid = ranks < _SENTINEL
    i = torch.arange(1, M + 1, dtype=torch.float64, device=ranks.device)
    prec = torch.where(valid, i[None, :] / ranks.double(), torch.zeros((), dtype=torch.float64, device=ranks.device))
    out["ap"][qidx] = prec.sum(1) / m.double().clamp(min=1)
    if map_topk is not None:
        inside = valid & (ranks <= map_topk)
        out["ap_topk"][qidx] = (prec * inside).sum(1) / inside.sum(1).clamp(min=1).double()
    ranks = ranks.contiguous()
    if ks_t.numel():
        out["hits_at_k"][qidx] = torch.searchsorted(ranks, ks_t.expand(c, -1).contiguous(), right=True)
    if cr_t.numel():
        out["hits_at_rank"][qidx] = torch.searchsorted(ranks, cr_t.expand(c, -1).contiguous(), right=True)


def _tie_aware_ap(hist_all, hist_rel, m):
    """Expected AP under uniformly random order inside each equal-distance group.

    For a group of n items, r of them relevant, preceded by N0 items of which R0 relevant, the
    relevant items contribute (r/n) sum_{p=1..n} [R0 + 1 + (p-1)(r-1)/(n-1)] / (N0 + p)
    = (r/n) [(R0 + 1) dH + (r-1)/(n-1) (n - (N0 + 1) dH)], dH = H(N0 + n) - H(N0),
    with H the harmonic numbers (McFee and Lanckriet 2010). AP = sum over groups / R.
    """
    n = hist_all.double()
    r = hist_rel.double()
    n0 = torch.cumsum(n, 1) - n
    r0 = torch.cumsum(r, 1) - r
    dh = torch.special.digamma(n0 + n + 1) - torch.special.digamma(n0 + 1)
    frac = torch.where(n > 1, (r - 1) / (n - 1).clamp(min=1), torch.zeros_like(n))
    term = (r / n.clamp(min=1)) * ((r0 + 1) * dh + frac * (n - (n0 + 1) * dh))
    term = torch.where(r > 0, term, torch.zeros_like(term))
    return term.sum(1) / m.clamp(min=1)


# --------------------------------------------------------------------------------------------
# call setup: class structure, chunk and block sizes, the database matrix
# --------------------------------------------------------------------------------------------

class _Setup:
    """Query order, class structure, chunk/block sizes and reusable buffers of one call."""

    def __init__(self, q, b, ql, dl, chunk_size, method, need_ranks):
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
                                       or chunk_size <= 0):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.device = q.device
        self.Q, self.K = q.shape
        self.N = b.shape[0]
        self.G = G = self.K + 1
        self.b = b
        self.need_ranks = need_ranks
        # float64 only when K+1 would not be exact in bfloat16 (see module docstring)
        self.dtype = torch.float32 if G <= 256 else torch.float64
        # every partial sum of the key matrix product stays below this bound, hence exact
        self.exact_limit = _EXACT_LIMIT_F32 if self.dtype == torch.float32 else (1 << 31)
        both = torch.cat([ql, dl])
        lo, hi = int(both.min()), int(both.max())
        if lo >= 0 and hi < 2 * (self.Q + self.N) + 1024:
            num_classes, inv = hi + 1, both          # small non-negative labels: use them as ids
        else:
            uniq, inv = torch.unique(both, return_inverse=True)
            num_classes = uniq.numel()
        self.ql = inv[:self.Q]
        self.dl = inv[self.Q:]
        self.counts = torch.bincount(self.dl, minlength=num_classes)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.perm = _stable_argsort(self.dl)                 # database indices grouped by class
        self.qorder = _stable_argsort(self.ql)               # queries grouped by class
        self.q_sorted_labels = self.ql[self.qorder]
        self.nrel = self.counts[self.ql]                     # R of every query
        self.max_rel = max_rel = int(self.nrel.max())

        # database blocks: one block up to _SINGLE_BLOCK_MAX items, else about _BLOCK_SIZE each
        nblocks = 1 if self.N <= _SINGLE_BLOCK_MAX else -(-self.N // _BLOCK_SIZE)
        size = -(-self.N // nblocks)
        if nblocks == 1:
            block_rel = max_rel
        else:   # most items of one class inside one block
            key = self.dl[self.perm] * nblocks + self.perm // size      # non-decreasing
            block_rel = int(torch.unique_consecutive(key, return_counts=True)[1].max())
        bins_per_query = (block_rel + 1) * G             # (segment, distance) bins of one block
        if method == "auto":
            method = "histogram" if bins_per_query <= size + 4096 else "sort"
        if need_ranks and method == "histogram" and bins_per_query + 2 * (max_rel + 1) * G + self.K >= self.exact_limit:
            method = "sort"                                  # keys would not be exact
        self.method = method if need_ranks else "histogram"
        self.threads = 1 if self.device.type != "cpu" else max(1, min(torch.get_num_threads(), 8))

        if self.method == "histogram":
            self.blocks = [(s, min(s + size, self.N)) for s in range(0, self.N, size)]
            self.block_size = size
            bpq = bins_per_query if need_ranks else G
            per_query = 4 * size + 16 * bpq + (max_rel + 1) * (4 * self.K + 96)
            limit = _MEMORY_BUDGET // per_query
            limit = min(limit, max(_MIN_CHUNK, _TILE_PAIRS // size), _MAX_CHUNK)
        else:
            self.blocks = [(0, self.N)]
            size = self.N
            limit = _MEMORY_BUDGET // (32 * self.N + (max_rel + 1) * 96)
        if chunk_size is not None:
            limit = min(limit, int(chunk_size))
        self.chunk = max(1, min(limit, self.Q))

        # the database as a (rows, N) matrix [E rows | K code rows | _BIAS_ROWS constant rows |
        # E rows]: each of the two workers writes its chunk's class-segment rows into the E rows
        # on its side, next to the shared code and constant rows (constant row k is 128^k, which
        # adds a per-query offset through the matrix product)
        E = self.E = _MAX_EXTRA_ROWS if (self.method == "histogram" and need_ranks) else 0
        self.B = torch.empty(2 * E + self.K + _BIAS_ROWS, self.N, dtype=self.dtype, device=self.device)
        self.codes = self.B[E:E + self.K]
        self.codes.copy_(b.t())
        for k in range(_BIAS_ROWS - 1):
            self.B[E + self.K + k].fill_(float(128 ** k))
        self.B[E + self.K + _BIAS_ROWS - 1].fill_(self.K / 2.0)
        self.key_elems = self.chunk * size if self.method == "histogram" else 0
        self.keys = {}

    def key_buffer(self, slot):
        """The key matrix buffer of worker ``slot`` (each worker only touches its own)."""
        if slot not in self.keys:
            self.keys[slot] = torch.empty(self.key_elems, dtype=self.dtype, device=self.device)
        return self.keys[slot]

    def chunks(self):
        """Yield (start, stop) ranges of the class-sorted query order.

        A chunk holds at most ``self.chunk`` queries; on the histogram path its classes and their
        digit rows must also fit in the ``_MAX_EXTRA_ROWS`` extra database rows.
        """
        if not (self.method == "histogram" and self.need_ranks):
            for s in range(0, self.Q, self.chunk):
                yield s, min(s + self.chunk, self.Q)
            return
        labels = self.q_sorted_labels
        change = (torch.nonzero(labels[1:] != labels[:-1]).flatten() + 1).tolist()
        run_starts = [0] + change
        run_ends = change + [self.Q]
        run_counts = self.counts[labels[torch.tensor(run_starts, device=labels.device)]].tolist()
        s, classes, most = 0, 0, 0           # a loop over classes (runs of queries), not queries
        for start, end, cnt in zip(run_starts, run_ends, run_counts):
            while start < end:
                most2 = max(most, cnt)
                fits = (classes + 1) * _num_digits(most2) <= _MAX_EXTRA_ROWS
                if classes and (not fits or start - s >= self.chunk):
                    yield s, start
                    s, classes, most = start, 0, 0
                    continue
                take = min(end, s + self.chunk)
                classes, most = classes + 1, most2
                if take < end:               # a class with more queries than a chunk: split it
                    yield s, take
                    s, classes, most = take, 0, 0
                start = take
        if s < self.Q:
            yield s, self.Q


def _stable_argsort(x):
    """Stable argsort of a 1-D integer tensor (numpy on CPU: much faster than torch there)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.argsort(x.numpy(), kind="stable"))
    return torch.argsort(x, stable=True)


def _sort_rows(x):
    """Each row of a 2-D integer tensor sorted ascending (numpy on CPU: much faster there)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return torch.sort(x, dim=1).values


def _bias_digits(bias):
    """(c, _BIAS_ROWS) coefficients of the constant rows [1, 128, 128^2, 128^3, K/2] that add
    ``bias + K/2`` to each query's keys: signed base-128 digits of ``bias`` (|digit| <= 127, exact
    in bfloat16 and TF32), then 1."""
    powers = torch.tensor([128 ** k for k in range(_BIAS_ROWS - 1)] + [0], device=bias.device)
    digits = (bias.abs()[:, None] // powers.clamp(min=1)) % 128 * bias.sign()[:, None]
    digits[:, -1] = 1
    return digits


def _num_digits(m):
    """Base-256 digits needed for segment numbers 0..m."""
    n = 1
    while m >= 256 ** n:
        n += 1
    return n


def _row_groups(rows, threads, max_rows):
    """Split ``rows`` into at least ``threads`` contiguous groups of at most ``max_rows``."""
    n = max(1, min(rows, max(threads, -(-rows // max(1, max_rows)))))
    edges = [round(i * rows / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n) if edges[i + 1] > edges[i]]


def _bincount_groups(keys2d, bins_per_row, groups, pool):
    """Per-row histograms (rows, bins_per_row) of an int32 key matrix whose row r holds keys
    offset by ``(r - group_start) * bins_per_row`` inside each group; groups run in parallel."""
    if len(groups) == 1 or pool is None:
        parts = [torch.bincount(keys2d[a:z].reshape(-1), minlength=(z - a) * bins_per_row) for a, z in groups]
    else:
        futures = [pool.submit(torch.bincount, keys2d[a:z].reshape(-1), None, (z - a) * bins_per_row)
                   for a, z in groups]
        parts = [f.result() for f in futures]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.view(keys2d.shape[0], bins_per_row)


# --------------------------------------------------------------------------------------------
# one chunk: histogram path and stable-sort path
# --------------------------------------------------------------------------------------------

def _relevant_positions(S, qlab):
    """Database positions of the relevant items of a chunk's queries (class-sorted labels).

    Returns ((classes, counts, valid_u, pos_u), cls, U, M, pos, valid): the U classes of the chunk
    with their item counts, their (U, M) padded positions in index order and validity mask, each
    query's class slot ``cls`` (c,), and the (c, M) positions / mask of each query's items.
    """
    classes, cls = torch.unique_consecutive(qlab, return_inverse=True)
    cnt = S.counts[classes]
    M = int(cnt.max())
    t = torch.arange(M, device=S.device)
    valid_u = t[None, :] < cnt[:, None]
    pos_u = torch.where(valid_u, S.perm[(S.starts[classes][:, None] + t[None, :]).clamp(max=S.N - 1)],
                        torch.zeros((), dtype=torch.long, device=S.device))
    return (classes, cnt, valid_u, pos_u), cls, classes.numel(), M, pos_u[cls], valid_u[cls]


def _histogram_chunk(S, qc, qlab, pool, slot=1, threads=None):
    """Histogram path for one chunk of queries (class-sorted), run by worker ``slot`` (0 or 1)
    with ``threads`` bincount groups submitted to ``pool``.

    Returns: hist_all (c, G) int64, hist_rel (c, G) int64, and ranks (c, M) int64: the stable ranks
    of each query's relevant items sorted ascending, padded with _SENTINEL (None when ranks are
    not needed).
    """
    dev, K, G, N = S.device, S.K, S.G, S.N
    c = qc.shape[0]
    threads = S.threads if threads is None else threads
    (classes, cnt, valid_u, pos_u), cls, U, M, pos, valid = _relevant_positions(S, qlab)
    zero = torch.zeros((), dtype=torch.long, device=dev)
    qd = qc.to(S.dtype)
    # distances to the relevant items: exact sums of +-1 products
    if U * M * (K + c) <= _UNION_ELEMS:
        # products with the relevant items of every class of the chunk, then each query's own
        rel_codes = S.b.index_select(0, pos_u.reshape(-1)).to(S.dtype)          # (U*M, K)
        ip = (qd @ rel_codes.t()).view(c, U, M).gather(1, cls.view(c, 1, 1).expand(c, 1, M)).view(c, M)
    else:
        rel_codes = S.b.index_select(0, pos.reshape(-1)).to(S.dtype).view(c, M, K)
        ip = torch.bmm(rel_codes, qd[:, :, None]).view(c, M)
    d = torch.where(valid, torch.round((K - ip) * 0.5).long(), zero)
    del rel_codes, ip
    hist_rel = torch.zeros(c, G + 1, dtype=torch.long, device=dev)
    hist_rel.scatter_add_(1, torch.where(valid, d, torch.full_like(d, G)), torch.ones_like(d))
    hist_rel = hist_rel[:, :G]

    if S.need_ranks:
        # class-segment rows: seg_u(j) = #(items of class u with index <= j), in base-256 digits
        nd = _num_digits(M)
        w, E = U * nd, S.E
        C = _BIAS_ROWS
        if slot == 0:     # rows [E - w, E + K + C): segment rows, codes, constants
            lo, hi, code_col, seg_col, ext = E - w, E + K + C, w, 0, S.B[E - w:E]
        else:             # rows [E, E + K + C + w): codes, constants, segment rows
            lo, hi, code_col, seg_col, ext = E, E + K + C + w, 0, K + C, S.B[E + K + C:E + K + C + w]
        member = torch.zeros(U, N, dtype=torch.uint8, device=dev)
        member[torch.arange(U, device=dev)[:, None].expand(U, M)[valid_u], pos_u[valid_u]] = 1
        extra = ext.view(U, nd, N)
        torch.cumsum(member, dim=1, dtype=S.dtype, out=extra[:, 0])     # exact: below 2^24
        del member
        for k in range(1, nd):                   # split into base-256 digits, lowest first
            torch.mul(extra[:, k - 1], 1.0 / 256, out=extra[:, k]).floor_()   # exact: power of 2
            extra[:, k - 1].sub_(extra[:, k], alpha=256)
        A = torch.zeros(c, K + C + w, dtype=S.dtype, device=dev)
        A[:, code_col:code_col + K] = qd * -0.5
        r = torch.arange(c, device=dev)
        for k in range(nd):
            A[r, seg_col + cls * nd + k] = float(G * 256 ** k)
        Bm = S.B[lo:hi]
    else:
        code_col = 0
        A = torch.zeros(c, K + _BIAS_ROWS, dtype=S.dtype, device=dev)
        A[:, :K] = qd * -0.5
        Bm = S.B[S.E:S.E + K + _BIAS_ROWS]

    # per block: keys -> per-(segment, distance) histogram -> counts for the relevant items
    hist_all = torch.zeros(c, G, dtype=torch.long, device=dev)          # items of earlier blocks
    before_same = torch.zeros(c, M + 1, dtype=torch.long, device=dev)   # #(index < j, d == d_j)
    nblocks = len(S.blocks)
    if S.need_ranks:
        # relevant items of class u inside block b: t in [base_ub[u, b], base_ub[u, b] + cnt_ub[u, b])
        if nblocks == 1:
            cnt_ub = cnt[:, None]
        else:
            blk = torch.where(valid_u, pos_u // S.block_size, torch.full_like(pos_u, nblocks))
            cnt_ub = torch.zeros(U, nblocks + 1, dtype=torch.long, device=dev)
            cnt_ub.scatter_add_(1, blk, torch.ones_like(blk))
            cnt_ub = cnt_ub[:, :nblocks]
        base_ub = torch.cumsum(cnt_ub, 1) - cnt_ub
        mbs = cnt_ub.max(0).values.tolist()
        ar = torch.arange(M, device=dev)
    for bi, (j0, j1) in enumerate(S.blocks):
        nb = j1 - j0
        if S.need_ranks:
            mb = mbs[bi]
            base, n_in = base_ub[cls, bi], cnt_ub[cls, bi]
            bpq = (mb + 1) * G
            headroom = S.exact_limit - 2 * G * (M + 1) - K - 1
        else:
            base, mb, bpq = None, 0, G
            headroom = S.exact_limit - K - 1
        groups = _row_groups(c, threads, headroom // bpq)
        off = torch.empty(c, dtype=torch.long)
        for a, z in groups:
            off[a:z] = torch.arange(z - a) * bpq
        off = off.to(dev)
        bias = off if base is None else off - G * base
        A[:, code_col + K:code_col + K + _BIAS_ROWS] = _bias_digits(bias)
        keyf = S.key_buffer(slot)[:c * nb].view(c, nb)
        torch.mm(A, Bm[:, j0:j1], out=keyf)               # exact integer keys
        if S.dtype == torch.float32:
            keyi = keyf.view(torch.int32)
            keyi.copy_(keyf)                              # in-place float -> int32
        else:
            keyi = keyf.to(torch.int32)
        tile = _bincount_groups(keyi, bpq, groups, pool).view(c, mb + 1, G)
        del keyi, keyf
        if S.need_ranks and mb > 0:
            # the i-th relevant item of the block (t = base + i) is the last item of local segment
            # i + 1, so the block's items before it are those of local segments <= i
            tcum = tile.cumsum_(1)
            i = ar[:mb]
            inside = i[None, :] < n_in[:, None]
            tt = torch.where(inside, base[:, None] + i[None, :], torch.full_like(inside, M, dtype=torch.long))
            dd = d.gather(1, tt.clamp(max=max(M - 1, 0)))
            here = tcum.view(c, -1).gather(1, i[None, :] * G + dd) + hist_all.gather(1, dd)
            before_same.scatter_(1, tt, here)             # column M collects the padding
            hist_all += tcum[:, mb, :]
        else:
            hist_all += tile.sum(1)
        del tile

    if not S.need_ranks:
        return hist_all, hist_rel, None
    less = (torch.cumsum(hist_all, 1) - hist_all).gather(1, d)       # #(d < d_j)
    ranks = torch.where(valid, less + before_same[:, :M] + 1, torch.full_like(d, _SENTINEL))
    return hist_all, hist_rel, _sort_rows(ranks)


def _sort_chunk(S, qc, qlab):
    """Stable-sort path for one chunk (used when classes are very large). Same outputs as
    ``_histogram_chunk``: the rank of a relevant item is its position in the stable argsort."""
    dev, K, G, N = S.device, S.K, S.G, S.N
    c = qc.shape[0]
    _, cls, _, M, pos, valid = _relevant_positions(S, qlab)
    dist = (qc.to(S.dtype) @ S.codes).mul_(-0.5).add_(K / 2.0).round_()   # exact distances
    small = dist.to(torch.uint8 if K < 256 else torch.int32)
    del dist
    off = (torch.arange(c, device=dev, dtype=torch.int32) * G)[:, None]
    hist_all = torch.bincount((small.to(torch.int32) + off).view(-1), minlength=c * G).view(c, G)
    zero = torch.zeros((), dtype=torch.long, device=dev)
    d = torch.where(valid, small.gather(1, pos).long(), zero)
    hist_rel = torch.zeros(c, G + 1, dtype=torch.long, device=dev)
    hist_rel.scatter_add_(1, torch.where(valid, d, torch.full_like(d, G)), torch.ones_like(d))
    if dev.type == "cpu":     # numpy's stable sort of small integers is a radix sort
        order = torch.from_numpy(np.argsort(small.numpy(), axis=1, kind="stable"))
    else:
        order = torch.sort(small, dim=1, stable=True).indices
    del small
    position = torch.empty(c, N, dtype=torch.int32, device=dev)
    position.scatter_(1, order, torch.arange(N, dtype=torch.int32, device=dev).expand(c, N))
    del order
    ranks = torch.where(valid, position.gather(1, pos).long() + 1, torch.full_like(d, _SENTINEL))
    return hist_all, hist_rel[:, :G], _sort_rows(ranks)
