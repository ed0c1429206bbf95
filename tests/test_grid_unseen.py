"""The grid with identities held out of training (``unseen_identities``): the cells' flags, the
checks before anything trains, results.csv's unseen and real-valued columns, ``table_map_unseen``
with its chance level and the figure of both protocols; one tiny cell end to end."""
import csv
import json
import os

import pytest

from grid.cell import flat_metrics
from grid.config import load_experiment
from grid.report import write_report
from utils.errors import UserInputError

TOML = """
dataset = "ddh"
data_root = "{root}"
methods = ["dcdh", "classifier"]
bits = [8]
seeds = [0]
device = "cpu"
unseen_identities = {k}

[train]
epochs = 1
bs = 32
"""


def _exp(tmp_path, root, k=3, name="u"):
    path = tmp_path / f"{name}.toml"
    path.write_text(TOML.format(root=root, k=k))
    return str(path)


def test_flat_metrics_names_the_protocols():
    m = {"map": 0.5, "chance_map": 0.1, "bits": 8, "curves": {"x": 1}, "real": {"map": 0.6, "precision_at_1": 0.7},
         "unseen": {"map": 0.2, "chance_map": 0.3, "bits": 8, "curves": {}, "real": {"map": 0.25}}}
    assert flat_metrics(m) == {"map": 0.5, "chance_map": 0.1, "bits": 8, "real_map": 0.6, "real_precision_at_1": 0.7,
                               "map_unseen": 0.2, "chance_map_unseen": 0.3, "real_map_unseen": 0.25}
    assert flat_metrics({"map": 0.5, "curves": {}}) == {"map": 0.5}


def test_cells_hold_out_the_identities_and_evaluate_with_real(synthetic_root, tmp_path):
    exp = load_experiment(_exp(tmp_path, synthetic_root), out=str(tmp_path), machine=False)
    assert exp.unseen_identities == 3
    for cell in exp.cells:
        i = cell.train_flags.index("--unseen-identities")
        assert cell.train_flags[i + 1] == "3" and "--real" in cell.eval_flags
        assert cell.settings["unseen_identities"] == 3     # a started cell cannot change it
    plain = _exp(tmp_path, synthetic_root, k=0, name="p")
    for cell in load_experiment(plain, out=str(tmp_path), machine=False).cells:
        assert "--unseen-identities" not in cell.train_flags and "unseen_identities" not in cell.settings


@pytest.mark.parametrize("k,message", [
    ("7", "unseen_identities: 7: expected 1..6 (8 of the 8 training identities"),
    ("-1", "unseen_identities: -1: expected an integer >= 0"),
    ('"all"', "unseen_identities: 'all': expected an integer >= 0"),
    ("true", "unseen_identities: true: expected an integer >= 0"),
])
def test_bad_count_is_refused_before_anything_runs(synthetic_root, tmp_path, k, message):
    path = _exp(tmp_path, synthetic_root, k=k)
    with pytest.raises(UserInputError, match="^" + path.replace(".", r"\.") + ": ") as e:
        load_experiment(path, out=str(tmp_path), machine=False)
    assert message in str(e.value) and not (tmp_path / "u").exists()


def _fake_cell(cell, maps):
    os.makedirs(cell.dir)
    curves = {"pr_over_radius": {"radius": list(range(cell.bits + 1)), "precision": [0.5] * (cell.bits + 1),
                                 "recall": [0.5] * (cell.bits + 1)},
              "precision_at_n": {"ranks": [1, 10], "precision": [1.0, 0.5], "recall": [0.1, 0.5]}}
    metrics = {"map": maps[0], "precision_radius_2": 0.5, "recall_radius_2": 0.5, "chance_map": 0.04,
               "real": {"map": maps[0] + 0.1},
               "unseen": {"map": maps[1], "chance_map": 0.2, "real": {"map": maps[1] + 0.2}}}
    with open(cell.path("metrics.json"), "w") as f:
        json.dump({"metrics": flat_metrics(metrics), "curves": curves, "epochs_run": 1, "best_epoch": 1}, f)


def test_report_has_unseen_columns_table_and_figure(synthetic_root, tmp_path):
    exp = load_experiment(_exp(tmp_path, synthetic_root), out=str(tmp_path), machine=False)
    for cell, maps in zip(exp.cells, ((0.5, 0.3), (0.9, 0.25))):
        _fake_cell(cell, maps)
    paths = {os.path.basename(p) for p in write_report(exp)}
    assert {"table_map.md", "table_map_unseen.md", "table_map_unseen.tex", "fig_map_protocols_vs_bits.png"} <= paths
    out = tmp_path / "u"
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], float(r["map"]), float(r["map_unseen"]), float(r["chance_map_unseen"])) for r in rows] == [
        ("dcdh", 0.5, 0.3, 0.2), ("classifier", 0.9, 0.25, 0.2)]
    assert [float(r["real_map"]) for r in rows] == [0.6, 1.0] and float(rows[0]["real_map_unseen"]) == 0.5
    table = (out / "table_map_unseen.md").read_text()
    assert "# u: mAP on the 3 identities held out of training" in table
    assert "| DCDH | **30.00** |" in table and "| classifier codes | 25.00 |" in table
    assert "| chance level | 20.00 |" in table
    assert "| chance level | 4.00 |" in (out / "table_map.md").read_text()
    assert "chance level & 20.00" in (out / "table_map_unseen.tex").read_text()
    assert (out / "fig_map_protocols_vs_bits.png").stat().st_size > 0


def test_one_cell_end_to_end(synthetic_root, tmp_path, capsys):
    """A real cell: trained with 3 identities held out, evaluated under both protocols with --real."""
    import reproduce
    path = tmp_path / "one.toml"
    path.write_text(TOML.format(root=synthetic_root, k=3).replace('["dcdh", "classifier"]', '["classifier"]'))
    assert reproduce.main(reproduce.get_args_parser().parse_args([str(path), "--out", str(tmp_path)])) == 0
    m = json.loads((tmp_path / "one" / "classifier-8b-s0" / "metrics.json").read_text())["metrics"]
    assert (m["num_queries"], m["num_database"]) == (20, 80)               # 5 trained identities
    assert (m["num_queries_unseen"], m["num_database_unseen"]) == (12, 48)  # 3 held out: 4 test, 16 train each
    assert 0 < m["chance_map_unseen"] < 1 and 0 < m["real_map_unseen"] <= 1
    with open(tmp_path / "one" / "results.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert float(row["map_unseen"]) == m["map_unseen"] and row["real_map"] != ""


def test_long_figure_titles_are_wrapped_inside_the_figure(synthetic_root, tmp_path, monkeypatch):
    """The protocols figure's title once ran past both edges of the figure (matplotlib centres a
    long line without wrapping): every figure the report draws for an experiment with a long name
    now has its title inside the figure, its words kept in order."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from grid.report import TITLE_WIDTH, wrap_title
    title = "mAP — celeba299-ddh32-with-a-longer-folder-name (ddh)\n" + "seeds " * 20
    assert wrap_title(title).split() == title.split()
    assert max(len(line) for line in wrap_title(title).split("\n")) <= TITLE_WIDTH
    seen, save = [], Figure.savefig

    bars = {}

    def checked_save(fig, *args, **kwargs):
        text = fig.axes[0].title
        box = text.get_window_extent(fig.canvas.get_renderer())
        seen.append((text.get_text(), 0 <= box.x0 and box.x1 <= fig.bbox.width))
        bars[text.get_text()] = [round(p.get_height(), 6) for p in fig.axes[0].patches if p.get_width() > 0]
        return save(fig, *args, **kwargs)
    monkeypatch.setattr(Figure, "savefig", checked_save)
    exp = load_experiment(_exp(tmp_path, synthetic_root, name="celeba299_unseen_cpu_with_a_much_longer_name"),
                          out=str(tmp_path), machine=False)
    for cell, maps in zip(exp.cells, ((0.5, 0.3), (0.9, 0.25))):
        _fake_cell(cell, maps)
    write_report(exp)
    assert len(seen) == 6 and any("trained and unseen identities" in t for t, _ in seen)
    assert all(inside for _, inside in seen), [t for t, inside in seen if not inside]
    # one code length: the protocols figure is two bars per method (trained, unseen), not 8 points on one line
    protocols = next(t for t in bars if t.startswith("mAP, trained and unseen identities, 8 bits"))
    assert bars[protocols] == [0.5, 0.3, 0.9, 0.25]


def test_estimate_counts_only_the_trained_identities_images(synthetic_root, tmp_path, monkeypatch):
    """8 identities x 16 training images; 3 held out leave 5 x 16 = 80 to train on (the trainer's
    own count: test_one_cell_end_to_end's num_database), and a cell's estimate is made from 80, not 128."""
    from grid import estimate
    from grid.runner import plan
    monkeypatch.setattr(estimate, "measured", lambda exp: {})
    monkeypatch.setattr(estimate, "cell_speed", lambda cell, speeds, dev: (10.0, "test"))
    exp = load_experiment(_exp(tmp_path, synthetic_root), out=str(tmp_path), machine=False)
    assert estimate.count_trained_images(exp) == {0: 80}
    lines, estimates = plan(exp, exp.cells)
    assert "128 training images (80 once the 3 held-out identities are left out)" in lines[1]
    assert estimates == {c.name: 80 * 1 / 10.0 + estimate.OVERHEAD_S for c in exp.cells}   # 1 epoch
    exp.unseen_identities = 0
    assert estimate.count_trained_images(exp) == {}
    lines, estimates = plan(exp, exp.cells)
    assert "128 training images;" in lines[1]
    assert estimates == {c.name: 128 * 1 / 10.0 + estimate.OVERHEAD_S for c in exp.cells}


def test_estimate_count_of_an_image_folder_decodes_nothing(tmp_path, monkeypatch):
    """An image folder (4 identities, 5..8 training images each): the count equals the trainer's
    (its datasets with the held-out identity's images left out), and no image is decoded for it."""
    from PIL import Image

    import data.folder
    from data import build_datasets
    from data.unseen import choose_unseen, hold_out
    from grid import estimate
    for i, ident in enumerate("abcd"):
        for split, n in (("train", 5 + i), ("test", 2)):
            os.makedirs(tmp_path / "faces" / split / ident)
            for j in range(n):
                Image.new("RGB", (8, 8), (40 * i, 10 * j, 0)).save(tmp_path / "faces" / split / ident / f"{j}.png")
    path = tmp_path / "f.toml"
    path.write_text(TOML.format(root=tmp_path / "faces", k=1).replace('"ddh"', '"folder"').replace("seeds = [0]",
                                                                                                     "seeds = [0, 1]").replace("bs = 32", "bs = 4"))
    exp = load_experiment(str(path), out=str(tmp_path), machine=False)

    def no_decode(p):
        raise AssertionError(f"decoded {p}")
    monkeypatch.setattr(data.folder, "decodable", no_decode)
    counts = estimate.count_trained_images(exp)
    monkeypatch.undo()
    database, queries, _ = build_datasets("folder", str(tmp_path / "faces"))
    expected = {}
    for seed in (0, 1):
        unseen = choose_unseen(database, queries, 1, seed)
        expected[seed] = len(hold_out(database, queries, unseen)["database"])
    assert counts == expected and set(expected.values()) <= {26 - n for n in (5, 6, 7, 8)}


def test_protocols_figure_over_several_code_lengths_is_lines(synthetic_root, tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    drawn, save = {}, Figure.savefig

    def record(fig, *args, **kwargs):
        ax = fig.axes[0]
        drawn[ax.get_title()] = sorted((tuple(c.lines[0].get_xdata()), tuple(round(y, 6) for y in c.lines[0].get_ydata()))
                                       for c in ax.containers if c.get_label().startswith("DCDH"))
        return save(fig, *args, **kwargs)
    monkeypatch.setattr(Figure, "savefig", record)
    path = tmp_path / "two.toml"
    path.write_text(TOML.format(root=synthetic_root, k=3).replace("bits = [8]", "bits = [8, 12]"))
    exp = load_experiment(str(path), out=str(tmp_path), machine=False)
    for cell in exp.cells:
        _fake_cell(cell, (0.5, 0.3) if cell.bits == 8 else (0.6, 0.2))
    write_report(exp)
    title = next(t for t in drawn if t.startswith("mAP, trained and unseen identities —"))
    assert drawn[title] == [((8, 12), (0.3, 0.2)), ((8, 12), (0.5, 0.6))]   # DCDH unseen and trained lines
