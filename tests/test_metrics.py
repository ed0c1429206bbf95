"""Tests of utils/metrics.py against a brute-force numpy reference written here.

The reference ranks every query separately with ``np.argsort(kind="stable")`` (ties by database
index) and applies the textbook formulas; the tie-aware AP is checked against an average over all
within-group permutations (tiny cases) and against an exact rational enumeration.
"""
import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from utils.metrics import (binarize, default_curve_ranks, hamming_distance, mean_average_precision,
                           pr_curve_over_radii, precision_at_k, precision_recall_curves,
                           precision_recall_within_radius, retrieval_metrics, tie_aware_map)

# ----------------------------------------------------------------------------------------------
# brute-force reference (one query at a time)
# ----------------------------------------------------------------------------------------------


def ref_distances(q, b):
    q, b = np.asarray(q, dtype=np.int64), np.asarray(b, dtype=np.int64)
    return (q[:, None, :] != b[None, :, :]).sum(-1)          # count of differing bits


def ref_ranked_relevance(d_row, rel_row):
    order = np.argsort(d_row, kind="stable")
    return rel_row[order].astype(np.int64)


def ref_ap(ranked, topk=None):
    """(1/R') sum_k P@k rel_k over the ranking (or its top k, with R' = relevant in the top k)."""
    if topk is not None:
        ranked = ranked[:topk]
    total, hits = 0.0, 0
    for k, r in enumerate(ranked, start=1):
        if r:
            hits += 1
            total += hits / k
    return total / hits if hits else 0.0


def ref_all(q, b, ql, dl, ks=(1, 5, 10), ranks=(1, 2, 3), topk=None):
    q, b, ql, dl = (np.asarray(x) for x in (q, b, ql, dl))
    d = ref_distances(q, b)
    rel = ql[:, None] == dl[None, :]
    n_db, k_bits = b.shape
    out = {"ap": [], "ap_topk": [], "p_at": {k: [] for k in ks}, "curve_p": {n: [] for n in ranks},
           "curve_r": {n: [] for n in ranks}, "rad_p": [[] for _ in range(k_bits + 1)],
           "rad_r": [[] for _ in range(k_bits + 1)], "R": []}
    for i in range(len(q)):
        ranked = ref_ranked_relevance(d[i], rel[i])
        big_r = int(rel[i].sum())
        out["R"].append(big_r)
        out["ap"].append(ref_ap(ranked) if big_r else 0.0)
        out["ap_topk"].append(ref_ap(ranked, topk) if topk else None)
        for k in ks:
            out["p_at"][k].append(ranked[:k].sum() / min(k, n_db))
        for n in ranks:
            out["curve_p"][n].append(ranked[:n].sum() / min(n, n_db))
            out["curve_r"][n].append(ranked[:n].sum() / big_r if big_r else 0.0)
        for r in range(k_bits + 1):
            retrieved = d[i] <= r
            hit = int((retrieved & rel[i]).sum())
            out["rad_p"][r].append(hit / retrieved.sum() if retrieved.any() else 0.0)
            out["rad_r"][r].append(hit / big_r if big_r else 0.0)
    return out


def ref_tie_aware_by_permutations(d_row, rel_row):
    """Average of the AP over every ordering of every equal-distance group (tiny N only)."""
    groups = [np.flatnonzero(d_row == v) for v in np.unique(d_row)]
    total, count = 0.0, 0
    for perms in itertools.product(*(itertools.permutations(g) for g in groups)):
        order = np.concatenate([np.asarray(p, dtype=np.int64) for p in perms])
        total += ref_ap(rel_row[order].astype(np.int64)) if rel_row.any() else 0.0
        count += 1
    return total / count


def ref_tie_aware_rational(d_row, rel_row):
    """Exact expected AP as a Fraction: by linearity each group is enumerated on its own, over all
    C(n, r) equally likely placements of its r relevant items among its n positions."""
    big_r = int(rel_row.sum())
    if big_r == 0:
        return Fraction(0)
    total = Fraction(0)
    before_all, before_rel = 0, 0
    for v in np.unique(d_row):
        in_group = d_row == v
        n, r = int(in_group.sum()), int((in_group & rel_row).sum())
        if r:
            placements = list(itertools.combinations(range(1, n + 1), r))
            s = Fraction(0)
            for pos in placements:
                for i, p in enumerate(pos, start=1):
                    s += Fraction(before_rel + i, before_all + p)
            total += s / len(placements)
        before_all += n
        before_rel += r
    return total / big_r


def random_case(seed, q, n, k, classes, extra_query_classes=0):
    g = torch.Generator().manual_seed(seed)
    qc = torch.randint(0, 2, (q, k), generator=g).float() * 2 - 1
    dc = torch.randint(0, 2, (n, k), generator=g).float() * 2 - 1
    ql = torch.randint(0, classes + extra_query_classes, (q,), generator=g)
    dl = torch.randint(0, classes, (n,), generator=g)
    return qc, dc, ql, dl


CASES = [  # (seed, Q, N, K, classes): small K and few classes give many ties
    (0, 40, 300, 4, 3),
    (1, 50, 400, 12, 5),
    (2, 30, 250, 36, 4),
    (3, 25, 1200, 12, 4),    # more than 255 relevant items per class: two-digit segments
    (4, 20, 600, 12, 1),     # a single class: the stable-sort path
    (5, 33, 97, 48, 6),
    (6, 20, 150, 7, 3),      # odd code length
    (7, 12, 60, 300, 3),     # K + 1 > 256: float64 keys
]


# ----------------------------------------------------------------------------------------------
# codes and distances
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_binarize_maps_zero_to_minus_one_and_keeps_dtype(dtype):
    h = torch.tensor([[0.0, -0.0, 0.25, -3.0], [7.0, 1e-3, -1e-3, 0.0]], dtype=dtype)
    b = binarize(h)
    assert b.dtype == dtype and b.shape == h.shape
    assert b.tolist() == [[-1, -1, 1, -1], [1, 1, -1, -1]]
    assert binarize(torch.tensor([float("nan")])).item() == -1


@pytest.mark.parametrize("k", [4, 12, 36, 48])
def test_hamming_distance_counts_differing_bits(k):
    qc, dc, _, _ = random_case(k, 9, 31, k, 2)
    d = hamming_distance(qc, dc)
    assert d.dtype == torch.int64 and d.shape == (9, 31)
    np.testing.assert_array_equal(d.numpy(), ref_distances(qc.numpy(), dc.numpy()))
    np.testing.assert_array_equal(hamming_distance(qc.to(torch.int8), dc.double()).numpy(), d.numpy())


# ----------------------------------------------------------------------------------------------
# against the brute-force reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,q,n,k,classes", CASES)
def test_all_metrics_match_reference(seed, q, n, k, classes):
    qc, dc, ql, dl = random_case(seed, q, n, k, classes, extra_query_classes=1)
    ks, ranks = (1, 5, 10, n + 3), (1, 7, 50, n, n + 10)
    ref = ref_all(qc.numpy(), dc.numpy(), ql.numpy(), dl.numpy(), ks=ks, ranks=ranks, topk=10)
    assert min(ref["R"]) == 0                                   # a query class absent from the database

    m = mean_average_precision(qc, dc, ql, dl)
    np.testing.assert_allclose(m["ap"].numpy(), ref["ap"], rtol=0, atol=1e-12)
    assert m["ap"].dtype == torch.float64 and m["ap"].device.type == "cpu"
    assert m["map"] == pytest.approx(np.mean(ref["ap"]), abs=1e-12)
    assert m["queries_without_relevant"] == sum(r == 0 for r in ref["R"])

    m10 = mean_average_precision(qc, dc, ql, dl, topk=10)
    np.testing.assert_allclose(m10["ap"].numpy(), ref["ap_topk"], rtol=0, atol=1e-12)

    p = precision_at_k(qc, dc, ql, dl, ks=ks)
    assert list(p) == list(ks)
    for kk in ks:
        assert p[kk] == pytest.approx(np.mean(ref["p_at"][kk]), abs=1e-12)

    c = precision_recall_curves(qc, dc, ql, dl, ranks=ranks)
    assert c["ranks"] == list(ranks)
    np.testing.assert_allclose(c["precision"], [np.mean(ref["curve_p"][r]) for r in ranks], atol=1e-12)
    np.testing.assert_allclose(c["recall"], [np.mean(ref["curve_r"][r]) for r in ranks], atol=1e-12)

    pr = pr_curve_over_radii(qc, dc, ql, dl)
    assert pr["radius"] == list(range(k + 1))
    np.testing.assert_allclose(pr["precision"], [np.mean(x) for x in ref["rad_p"]], atol=1e-12)
    np.testing.assert_allclose(pr["recall"], [np.mean(x) for x in ref["rad_r"]], atol=1e-12)
    for radius in (0, 2, k):
        w = precision_recall_within_radius(qc, dc, ql, dl, radius=radius)
        assert w["precision"] == pytest.approx(np.mean(ref["rad_p"][radius]), abs=1e-12)
        assert w["recall"] == pytest.approx(np.mean(ref["rad_r"][radius]), abs=1e-12)
    beyond = precision_recall_within_radius(qc, dc, ql, dl, radius=k + 5)
    assert beyond["recall"] == pytest.approx(np.mean([r > 0 for r in ref["R"]]), abs=1e-12)


@pytest.mark.parametrize("seed,q,n,k,classes", CASES)
@pytest.mark.parametrize("method", ["histogram", "sort"])
def test_methods_and_chunk_sizes_agree(seed, q, n, k, classes, method):
    qc, dc, ql, dl = random_case(seed, q, n, k, classes, extra_query_classes=1)
    full = retrieval_metrics(qc, dc, ql, dl, topk=(1, 5, 10), radius=2, map_topk=5)
    for chunk in (1, 2, 7):
        part = retrieval_metrics(qc, dc, ql, dl, topk=(1, 5, 10), radius=2, map_topk=5,
                                 chunk_size=chunk, method=method)
        assert part.keys() == full.keys()
        for key, value in full.items():
            if isinstance(value, float):
                assert part[key] == pytest.approx(value, abs=1e-12), key
            elif key != "curves":
                assert part[key] == value, key
        for curve in ("precision_at_n", "pr_over_radius"):
            for field, values in full["curves"][curve].items():
                np.testing.assert_allclose(part["curves"][curve][field], values, atol=1e-12)
    ap = mean_average_precision(qc, dc, ql, dl, chunk_size=3, method=method)["ap"]
    np.testing.assert_allclose(ap.numpy(), mean_average_precision(qc, dc, ql, dl)["ap"].numpy(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("seed,q,n,k,classes", [CASES[1], CASES[2], CASES[3], CASES[5]])
def test_database_blocks_and_key_groups_give_the_same_results(monkeypatch, seed, q, n, k, classes):
    import utils.metrics_engine as um
    qc, dc, ql, dl = random_case(seed, q, n, k, classes, extra_query_classes=1)
    ref = ref_all(qc.numpy(), dc.numpy(), ql.numpy(), dl.numpy(), ks=(1, 5), ranks=(3, 40))
    full = retrieval_metrics(qc, dc, ql, dl, topk=(1, 5), curve_ranks=(3, 40))
    # small database blocks (the path of databases over 2^17 items)
    monkeypatch.setattr(um, "_SINGLE_BLOCK_MAX", 40)
    monkeypatch.setattr(um, "_BLOCK_SIZE", 37)
    # and a small exactness bound, which splits each chunk's keys into many bincount groups
    size = -(-n // -(-n // 37))
    g = k + 1
    counts = np.bincount(dl.numpy())
    block_rel = np.bincount(dl.numpy() * 1000 + np.arange(n) // size).max()
    monkeypatch.setattr(um, "_EXACT_LIMIT_F32", 2 * (counts.max() + 1) * g + k + 1 + 2 * (block_rel + 1) * g)
    monkeypatch.setattr(um, "_UNION_ELEMS", 0)     # per-query distances to the relevant items
    r = um._evaluate(qc, dc, ql, dl, ks=(1, 5), curve_ranks=(3, 40), method="histogram")
    assert r["method"] == "histogram" and r["blocks"] == -(-n // 37)
    np.testing.assert_allclose(r["ap"].numpy(), ref["ap"], rtol=0, atol=1e-12)
    blocked = retrieval_metrics(qc, dc, ql, dl, topk=(1, 5), curve_ranks=(3, 40), chunk_size=9)
    for key, value in full.items():
        if isinstance(value, float):
            assert blocked[key] == pytest.approx(value, abs=1e-12), key
    for curve in ("precision_at_n", "pr_over_radius"):
        for field, values in full["curves"][curve].items():
            np.testing.assert_allclose(blocked["curves"][curve][field], values, atol=1e-12)


def test_code_dtypes_and_label_values_do_not_matter():
    qc, dc, ql, dl = random_case(11, 20, 150, 12, 4)
    ref = retrieval_metrics(qc, dc, ql, dl)
    for q2, d2 in ((qc.to(torch.int8), dc.to(torch.int8)), (qc.half(), dc.double())):
        assert retrieval_metrics(q2, d2, ql, dl) == ref
    # arbitrary (negative, huge) label values: only equality matters
    remap = lambda y: y * 1_000_003 - 7                      # noqa: E731
    other = retrieval_metrics(qc, dc, remap(ql), remap(dl))
    assert other == ref


def test_reduced_precision_matmul_keeps_results_exact():
    qc, dc, ql, dl = random_case(12, 30, 700, 36, 3)
    exact = mean_average_precision(qc, dc, ql, dl)["ap"]
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        fast = mean_average_precision(qc, dc, ql, dl, method="histogram")["ap"]
    finally:
        torch.set_float32_matmul_precision(old)
    np.testing.assert_array_equal(fast.numpy(), exact.numpy())


# ----------------------------------------------------------------------------------------------
# hand-derived small cases
# ----------------------------------------------------------------------------------------------

HAND_DB = torch.tensor([[1, 1, 1, 1],       # 0: d=0, label 1 (not relevant to label 0)
                        [1, 1, 1, -1],      # 1: d=1, label 0
                        [1, 1, 1, 1],       # 2: d=0, label 0
                        [-1, -1, -1, -1],   # 3: d=4, label 0
                        [1, 1, -1, -1]],    # 4: d=2, label 1
                       dtype=torch.float32)
HAND_DB_LABELS = torch.tensor([1, 0, 0, 0, 1])
HAND_Q = torch.tensor([[1, 1, 1, 1]], dtype=torch.float32)


def test_hand_case_values():
    # stable ranking: items 0, 2 (d=0), 1 (d=1), 4 (d=2), 3 (d=4) -> relevance 0 1 1 0 1
    ql = torch.tensor([0])
    m = mean_average_precision(HAND_Q, HAND_DB, ql, HAND_DB_LABELS)
    assert m["map"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)          # 53/90
    assert mean_average_precision(HAND_Q, HAND_DB, ql, HAND_DB_LABELS, topk=2)["map"] == pytest.approx(1 / 2)
    assert mean_average_precision(HAND_Q, HAND_DB, ql, HAND_DB_LABELS, topk=3)["map"] == pytest.approx(7 / 12)
    # groups: d=0 {n=2, r=1} -> (1/2)(1 + 1/2) = 3/4; d=1 -> 2/3; d=4 -> 3/5
    assert tie_aware_map(HAND_Q, HAND_DB, ql, HAND_DB_LABELS)["map"] == pytest.approx((3 / 4 + 2 / 3 + 3 / 5) / 3)
    p = precision_at_k(HAND_Q, HAND_DB, ql, HAND_DB_LABELS, ks=(1, 2, 5, 10))
    assert p == pytest.approx({1: 0.0, 2: 0.5, 5: 0.6, 10: 0.6})           # k > N divides by N
    assert precision_recall_within_radius(HAND_Q, HAND_DB, ql, HAND_DB_LABELS, radius=0) == \
        pytest.approx({"precision": 1 / 2, "recall": 1 / 3})
    assert precision_recall_within_radius(HAND_Q, HAND_DB, ql, HAND_DB_LABELS, radius=1) == \
        pytest.approx({"precision": 2 / 3, "recall": 2 / 3})
    assert precision_recall_within_radius(HAND_Q, HAND_DB, ql, HAND_DB_LABELS, radius=2) == \
        pytest.approx({"precision": 1 / 2, "recall": 2 / 3})
    c = precision_recall_curves(HAND_Q, HAND_DB, ql, HAND_DB_LABELS, ranks=[1, 3, 5])
    assert c["precision"] == pytest.approx([0, 2 / 3, 3 / 5]) and c["recall"] == pytest.approx([0, 2 / 3, 1])


def test_query_without_relevant_item_counts_as_zero_and_is_reported():
    q = torch.cat([HAND_Q, HAND_Q])
    ql = torch.tensor([0, 7])                                  # class 7 is not in the database
    m = mean_average_precision(q, HAND_DB, ql, HAND_DB_LABELS)
    assert m["ap"].tolist() == pytest.approx([53 / 90, 0.0])
    assert m["map"] == pytest.approx(53 / 180) and m["queries_without_relevant"] == 1
    r = retrieval_metrics(q, HAND_DB, ql, HAND_DB_LABELS)
    assert r["queries_without_relevant"] == 1 and r["map"] == pytest.approx(53 / 180)
    assert r["map_tie_aware"] == pytest.approx(121 / 360)
    assert r["recall_radius_2"] == pytest.approx((2 / 3 + 0) / 2)
    assert not any(math.isnan(v) for v in r["curves"]["pr_over_radius"]["recall"])


def test_precision_within_radius_is_zero_when_nothing_is_retrieved():
    far = torch.tensor([[-1, -1, -1, 1]], dtype=torch.float32)   # distances 3 4 3 1 3: none <= 0
    w = precision_recall_within_radius(far, HAND_DB, torch.tensor([0]), HAND_DB_LABELS, radius=0)
    assert w == {"precision": 0.0, "recall": 0.0}
    curve = pr_curve_over_radii(far, HAND_DB, torch.tensor([0]), HAND_DB_LABELS)
    assert curve["precision"][0] == 0.0 and curve["precision"][1] == 1.0   # item 3 at d=1 is relevant


def test_one_query_and_one_item_databases():
    one = torch.ones(1, 12)
    assert mean_average_precision(one, one, torch.tensor([3]), torch.tensor([3]))["map"] == 1.0
    m = mean_average_precision(one, -one, torch.tensor([3]), torch.tensor([4]))
    assert m["map"] == 0.0 and m["queries_without_relevant"] == 1
    r = retrieval_metrics(one, one, torch.tensor([3]), torch.tensor([3]), topk=(1, 5))
    assert r["precision_at_5"] == 1.0 and r["curves"]["precision_at_n"]["ranks"] == [1]
    assert r["num_queries"] == 1 and r["num_database"] == 1 and r["bits"] == 12


def test_topk_equal_to_database_size_is_map_over_everything():
    qc, dc, ql, dl = random_case(21, 15, 60, 12, 3)
    full = mean_average_precision(qc, dc, ql, dl)
    for k in (60, 1000):
        at = mean_average_precision(qc, dc, ql, dl, topk=k)
        np.testing.assert_array_equal(at["ap"].numpy(), full["ap"].numpy())


# ----------------------------------------------------------------------------------------------
# tie-aware mAP
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_tie_aware_matches_average_over_all_tie_permutations(seed):
    qc, dc, ql, dl = random_case(100 + seed, 3, 7, 4 if seed % 2 else 2, 2)
    ap = tie_aware_map(qc, dc, ql, dl)["ap"].numpy()
    d = ref_distances(qc.numpy(), dc.numpy())
    rel = ql.numpy()[:, None] == dl.numpy()[None, :]
    for i in range(3):
        assert ap[i] == pytest.approx(ref_tie_aware_by_permutations(d[i], rel[i]), abs=1e-12)


@pytest.mark.parametrize("seed,k", [(0, 12), (1, 36), (2, 4)])
def test_tie_aware_matches_exact_rational_enumeration(seed, k):
    qc, dc, ql, dl = random_case(200 + seed, 6, 40 if k != 4 else 14, k, 3)
    ap = tie_aware_map(qc, dc, ql, dl)["ap"].numpy()
    d = ref_distances(qc.numpy(), dc.numpy())
    rel = ql.numpy()[:, None] == dl.numpy()[None, :]
    for i in range(len(ap)):
        assert ap[i] == pytest.approx(float(ref_tie_aware_rational(d[i], rel[i])), abs=1e-12)


def test_tie_aware_is_invariant_to_database_order_while_map_is_not():
    qc, dc, ql, dl = random_case(31, 25, 200, 4, 3)
    base = tie_aware_map(qc, dc, ql, dl)
    plain = mean_average_precision(qc, dc, ql, dl)["map"]
    changed = False
    for seed in range(3):
        perm = torch.randperm(200, generator=torch.Generator().manual_seed(seed))
        t = tie_aware_map(qc, dc[perm], ql, dl[perm])
        np.testing.assert_allclose(t["ap"].numpy(), base["ap"].numpy(), rtol=0, atol=1e-12)
        changed |= abs(mean_average_precision(qc, dc[perm], ql, dl[perm])["map"] - plain) > 1e-6
    assert changed


def test_tie_aware_equals_map_when_no_distances_tie():
    k = 8
    db = torch.ones(k + 1, k)
    for i in range(k + 1):
        db[i, :i] = -1                                          # distances 0..K, all different
    dl = torch.tensor([0, 1, 0, 0, 1, 1, 0, 1, 0])
    q, ql = torch.ones(2, k), torch.tensor([0, 1])
    perm = torch.tensor([4, 2, 8, 0, 1, 7, 3, 6, 5])
    m = mean_average_precision(q, db[perm], ql, dl[perm])["ap"]
    t = tie_aware_map(q, db[perm], ql, dl[perm])["ap"]
    np.testing.assert_allclose(t.numpy(), m.numpy(), rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# the combined function and input checking
# ----------------------------------------------------------------------------------------------

def test_retrieval_metrics_keys_types_and_consistency():
    qc, dc, ql, dl = random_case(41, 30, 150, 12, 5, extra_query_classes=1)
    r = retrieval_metrics(qc, dc, ql, dl, topk=(1, 5, 10), radius=2, curve_ranks=[1, 10, 150])
    json.dumps(r)
    for key in ("map", "map_tie_aware", "precision_at_1", "precision_at_5", "precision_at_10",
                "precision_radius_2", "recall_radius_2"):
        assert isinstance(r[key], float) and 0 <= r[key] <= 1
    assert (r["num_queries"], r["num_database"], r["bits"]) == (30, 150, 12)
    assert r["map"] == pytest.approx(mean_average_precision(qc, dc, ql, dl)["map"], abs=1e-15)
    assert r["map_tie_aware"] == pytest.approx(tie_aware_map(qc, dc, ql, dl)["map"], abs=1e-15)
    assert r["queries_without_relevant"] == mean_average_precision(qc, dc, ql, dl)["queries_without_relevant"]
    p = precision_at_k(qc, dc, ql, dl)
    assert [r[f"precision_at_{k}"] for k in (1, 5, 10)] == pytest.approx([p[1], p[5], p[10]], abs=1e-15)
    assert r["curves"]["precision_at_n"] == precision_recall_curves(qc, dc, ql, dl, ranks=[1, 10, 150])
    assert r["curves"]["pr_over_radius"] == pr_curve_over_radii(qc, dc, ql, dl)
    assert r["curves"]["precision_at_n"]["recall"][-1] == pytest.approx(1 - r["queries_without_relevant"] / 30)
    r3 = retrieval_metrics(qc, dc, ql, dl, topk=(3,), radius=0)
    assert "precision_at_3" in r3 and "precision_radius_0" in r3 and "recall_radius_0" in r3
    assert default_curve_ranks(4992) == [1, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 4992]
    assert retrieval_metrics(qc, dc, ql, dl)["curves"]["precision_at_n"]["ranks"] == [1, 5, 10, 20, 50, 100, 150]


def test_torch_thread_count_is_restored():
    qc, dc, ql, dl = random_case(71, 40, 200, 12, 5)
    before = torch.get_num_threads()
    retrieval_metrics(qc, dc, ql, dl, chunk_size=4)          # several chunks: two workers on CPU
    assert torch.get_num_threads() == before


def test_value_errors():
    qc, dc, ql, dl = random_case(51, 5, 20, 12, 3)
    with pytest.raises(ValueError, match="code lengths differ"):
        mean_average_precision(qc, dc[:, :8], ql, dl)
    with pytest.raises(ValueError, match="query_labels has 4 labels"):
        mean_average_precision(qc, dc, ql[:4], dl)
    with pytest.raises(ValueError, match="database_labels has 21 labels"):
        retrieval_metrics(qc, dc, ql, torch.cat([dl, dl[:1]]))
    with pytest.raises(ValueError, match="empty"):
        tie_aware_map(qc[:0], dc, ql[:0], dl)
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(qc, dc[:0], ql, dl[:0])
    with pytest.raises(ValueError, match=r"\+1 and -1"):
        precision_at_k(qc * 0.5, dc, ql, dl)
    with pytest.raises(ValueError, match=r"\+1 and -1"):
        hamming_distance(qc, torch.zeros_like(dc))
    with pytest.raises(ValueError, match="2-D"):
        pr_curve_over_radii(qc[0], dc, ql, dl)
    with pytest.raises(ValueError, match="single-label"):
        mean_average_precision(qc, dc, torch.nn.functional.one_hot(ql), dl)
    with pytest.raises(ValueError, match="integer dtype"):
        mean_average_precision(qc, dc, ql.float(), dl)
    with pytest.raises(ValueError, match="radius"):
        precision_recall_within_radius(qc, dc, ql, dl, radius=-1)
    with pytest.raises(ValueError, match="topk"):
        mean_average_precision(qc, dc, ql, dl, topk=0)
    with pytest.raises(ValueError, match="ranks"):
        precision_recall_curves(qc, dc, ql, dl, ranks=[])
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(qc, dc, ql, dl, chunk_size=0)
    with pytest.raises(ValueError, match="bool"):
        binarize(torch.tensor([True]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    qc, dc, ql, dl = random_case(61, 40, 500, 36, 4, extra_query_classes=1)
    cpu = retrieval_metrics(qc, dc, ql, dl, map_topk=10)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True           # keys must stay exact under TF32
        gpu = retrieval_metrics(qc.cuda(), dc.cuda(), ql.cuda(), dl.cuda(), map_topk=10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert gpu.keys() == cpu.keys()
    for key in ("map", "map_tie_aware", "map_at_10", "precision_at_10", "precision_radius_2"):
        assert gpu[key] == pytest.approx(cpu[key], abs=1e-12)
    assert hamming_distance(qc.cuda(), dc.cuda()).cpu().equal(hamming_distance(qc, dc))
