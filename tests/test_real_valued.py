"""The real-valued bound (``utils.metrics_real``, ``evaluation.py --real``): ranking by cosine
similarity of the outputs before binarization, against a brute-force ranking written from the
definitions."""
import json
import math

import pytest
import torch

from utils.metrics_real import cosine_retrieval_metrics


def brute_force(q, db, q_labels, db_labels, ks):
    """Per query: cosine by loops, order by (-similarity, database index), AP and P@k by hand."""
    aps, precision = [], {k: [] for k in ks}
    for i in range(len(q)):
        sims = []
        for j in range(len(db)):
            nq = math.sqrt(sum(float(v) ** 2 for v in q[i]))
            nd = math.sqrt(sum(float(v) ** 2 for v in db[j]))
            dot = sum(float(a) * float(b) for a, b in zip(q[i], db[j]))
            sims.append(dot / (nq * nd) if nq > 0 and nd > 0 else 0.0)
        order = sorted(range(len(db)), key=lambda j: (-round(sims[j], 12), j))
        rel = [int(db_labels[j]) == int(q_labels[i]) for j in order]
        hits, total = 0, 0.0
        for rank, r in enumerate(rel, 1):
            if r:
                hits += 1
                total += hits / rank
        aps.append(total / sum(rel) if sum(rel) else 0.0)
        for k in ks:
            precision[k].append(sum(rel[:k]) / min(k, len(db)))
    return sum(aps) / len(aps), {k: sum(v) / len(v) for k, v in precision.items()}


def test_against_brute_force_with_ties_zero_rows_and_absent_identities():
    g = torch.Generator().manual_seed(0)
    db = torch.randn(23, 6, generator=g)
    db[5] = db[2] * 4.0          # the same direction (exactly): a tie broken by database index
    db[9] = 0.0                  # an all-zero output: similarity 0 to everything
    db[11] = torch.tensor([1.0, 0, 0, 0, 0, 0])
    db[17] = torch.tensor([1.0, 0, 0, 0, 0, 0])
    db_labels = torch.randint(0, 4, (23,), generator=g)
    q = torch.randn(9, 6, generator=g)
    q[0] = db[2]
    q[1] = torch.tensor([2.0, 0, 0, 0, 0, 0])
    q_labels = torch.randint(0, 5, (9,), generator=g)   # label 4: no relevant item (AP 0)
    ks = (1, 3, 10, 40)
    got = cosine_retrieval_metrics(q, db, q_labels, db_labels, topk=ks, chunk_size=4)
    want_map, want_p = brute_force(q.tolist(), db.tolist(), q_labels, db_labels, ks)
    assert got["map"] == pytest.approx(want_map, abs=1e-12)
    for k in ks:
        assert got[f"precision_at_{k}"] == pytest.approx(want_p[k], abs=1e-12)
    assert cosine_retrieval_metrics(q, db, q_labels, db_labels, topk=ks) == got   # chunking changes nothing


def test_scale_of_the_outputs_does_not_matter_and_errors_name_the_argument():
    g = torch.Generator().manual_seed(1)
    q, db = torch.randn(5, 4, generator=g), torch.randn(12, 4, generator=g)
    ql, dl = torch.arange(5) % 3, torch.arange(12) % 3
    assert cosine_retrieval_metrics(q * 7, db * 0.1, ql, dl) == cosine_retrieval_metrics(q, db, ql, dl)
    with pytest.raises(ValueError, match="feature lengths differ"):
        cosine_retrieval_metrics(q, db[:, :3], ql, dl)
    with pytest.raises(ValueError, match="query_labels must have shape"):
        cosine_retrieval_metrics(q, db, ql[:4], dl)
    with pytest.raises(ValueError, match="database_labels must be integer"):
        cosine_retrieval_metrics(q, db, ql, dl.float())
    with pytest.raises(ValueError, match="topk must hold positive integers"):
        cosine_retrieval_metrics(q, db, ql, dl, topk=(0,))


def test_evaluate_real_uses_the_outputs_before_binarization(synthetic_root):
    from data import build_datasets, make_loader
    from engine.evaluate import encode, evaluate
    from models import build_model
    torch.manual_seed(0)
    model = build_model("dfhnet", 12).eval()
    database, queries, _ = build_datasets("ddh", synthetic_root)
    loaders = make_loader(queries, 64), make_loader(database, 64)
    m = evaluate(model, *loaders, torch.device("cpu"), real=True)
    _, ql, qh = encode(model, loaders[0], torch.device("cpu"), real=True)
    _, dl, dh = encode(model, loaders[1], torch.device("cpu"), real=True)
    want_map, want_p = brute_force(qh[:8].tolist(), dh.tolist(), ql[:8], dl, (1, 5, 10))
    few = cosine_retrieval_metrics(qh[:8], dh, ql[:8], dl)
    assert few["map"] == pytest.approx(want_map, abs=1e-9) and few["precision_at_5"] == pytest.approx(want_p[5])
    assert m["real"] == cosine_retrieval_metrics(qh, dh, ql, dl)
    assert set(m["real"]) == {"map", "precision_at_1", "precision_at_5", "precision_at_10"}
    assert "real" not in evaluate(model, *loaders, torch.device("cpu"))


def test_evaluation_real_flag_prints_and_writes_both(synthetic_root, tmp_path, capsys):
    import evaluation
    from models import build_model
    torch.manual_seed(0)
    torch.save({"backbone": build_model("dfhnet", 12).state_dict(), "centers": {"centers": torch.zeros(8, 12)}},
               tmp_path / "m.tar")
    js = tmp_path / "m.json"
    capsys.readouterr()
    evaluation.main(evaluation.get_args_parser().parse_args(
        ["--load", str(tmp_path / "m.tar"), "--dataset", "ddh", "--data-root", synthetic_root, "--device", "cpu",
         "--real", "--json", str(js)]))
    out = capsys.readouterr().out
    m = json.loads(js.read_text())
    assert 0 < m["real"]["map"] <= 1 and "unseen" not in m
    assert f"real-valued (cosine, before binarization): {100 * m['real']['map']:.2f}%" in out
    assert f"precision@top10: {100 * m['precision_at_10']:.2f}%   real-valued: " \
           f"{100 * m['real']['precision_at_10']:.2f}%" in out
