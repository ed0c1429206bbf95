"""Grid faults (issue 19, items 1, 2, 3, 7): bad data contents stop reproduce.py before any folder
is made, with dcdh_train.py's own line; an unusable ``metrics.json`` is not a finished cell (named
in one line, set aside, evaluated again); ``--report`` on valid JSON of the wrong shape warns in
that same line; a truncated or missing checkpoint fails its cell once in one line, is set aside
(renamed, never deleted) and the next run continues from the last whole checkpoint or from scratch.

One cell (dcdh, 8 bits, 2 epochs on the synthetic set) is trained once in this process and copied
per test; the runner's cell processes run in this process too (``_InProcessCell``: the same
``grid.cell.main``, without a new interpreter's start-up for each cell).
"""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import types

import pytest
import torch

import grid.cell
import grid.runner
from grid.config import load_experiment
from grid.report import bad_metrics_line, check_metrics
from grid import estimate
from grid.runner import Runner, cell_spec, display, status
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import UserInputError
from conftest import assert_one_line_refusal
from conftest import reproduce_in_process as _reproduce

TINY = """
dataset = "{dataset}"
data_root = "{root}"
methods = ["dcdh"]
bits = [8]
seeds = [0, 1]
device = "cpu"

[train]
epochs = 2
patience = 5
bs = 32
"""


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A cell run here sets the process's torch thread count (its ``threads``): restore it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _experiment(folder, root, dataset="ddh"):
    path = folder / "exp.toml"
    path.write_text(TINY.format(dataset=dataset, root=root))
    return path


class _InProcessCell:
    """Stands in for ``subprocess.Popen([python, -m, grid.cell, CELL_DIR, VERSION], stdout=out)``:
    runs ``grid.cell.main`` here and appends what it printed to ``out``."""

    def __init__(self, argv, stdout=None, **kwargs):
        text = io.StringIO()
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            try:
                grid.cell.main(argv[-2:])
                self.returncode = 0
            except SystemExit as e:
                self.returncode = e.code if isinstance(e.code, int) else 1
        stdout.write(text.getvalue().encode())
        self.output = text.getvalue()

    def wait(self):
        return self.returncode

    def terminate(self):
        pass


def _run_grid(monkeypatch, exp, cells):
    """Runner(exp, cells).run() with the cells in this process: (failed count, lines said)."""
    in_process = types.SimpleNamespace(**dict(vars(subprocess), Popen=_InProcessCell))
    monkeypatch.setattr(grid.runner, "subprocess", in_process)
    lines = []
    failed = Runner(exp, cells, say=lines.append).run()
    return failed, lines


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    """Cell dcdh-8b-s0 trained and evaluated (``grid.cell.run``): (output root, its metrics)."""
    folder = tmp_path_factory.mktemp("trained")
    exp = load_experiment(str(_experiment(folder, synthetic_root)), out=str(folder / "runs"))
    cell = exp.cells[0]
    os.makedirs(cell.dir)
    with open(cell.path("cell.json"), "w") as f:
        json.dump(cell_spec(exp, cell), f)
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            grid.cell.run(cell.dir, "test")
    finally:
        torch.set_num_threads(threads)
    with open(cell.path("metrics.json")) as f:
        return folder / "runs", json.load(f)


def _copy(trained, synthetic_root, tmp_path):
    """A copy of the trained grid in ``tmp_path``: (experiment file, Experiment, cell dcdh-8b-s0)."""
    shutil.copytree(trained[0], tmp_path / "runs")
    path = _experiment(tmp_path, synthetic_root)
    exp = load_experiment(str(path), out=str(tmp_path / "runs"))
    with open(exp.cells[0].path("cell.json"), "w") as f:  # as the runner writes it before each attempt
        json.dump(cell_spec(exp, exp.cells[0]), f)
    return path, exp, exp.cells[0]


def _finished_twin(exp):
    """Make seed 1 a finished cell: seed 0's files with its own name (a second row of the report)."""
    src, dst = exp.cells[0], exp.cells[1]
    shutil.copytree(src.dir, dst.dir)
    with open(dst.path("metrics.json")) as f:
        m = json.load(f)
    m.update(cell=dst.name, seed=dst.seed)
    with open(dst.path("metrics.json"), "w") as f:
        json.dump(m, f)
    with open(dst.path("cell.json"), "w") as f:
        json.dump(cell_spec(exp, dst), f)
    return dst


# ---- 1: bad data contents ---------------------------------------------------------------------

def _ddh_test_split(root, synthetic_root):
    shutil.copytree(os.path.join(synthetic_root, "test"), root / "test")


def _empty_train(root, synthetic_root):
    _ddh_test_split(root, synthetic_root)
    (root / "train").mkdir()


def _garbage_pkl(root, synthetic_root):
    _empty_train(root, synthetic_root)
    (root / "train" / "data_batch_1.pkl").write_bytes(b"garbage, not a pickle\n")


def _folder_named_pkl(root, synthetic_root):
    _empty_train(root, synthetic_root)
    (root / "train" / "data_batch_1.pkl").mkdir()


def _one_identity(root, synthetic_root):
    from data.synthetic import write_synthetic_ddh
    write_synthetic_ddh(str(root), identities=1, train_per_id=40, test_per_id=4)


def _image_folder(root, train_entries):
    from PIL import Image
    for split, entries in (("train", train_entries), ("test", {"alice": "a.png"})):
        (root / split).mkdir(parents=True)
        for identity, name in entries.items():
            (root / split / identity).mkdir()
            if name.endswith(".png"):
                Image.new("RGB", (8, 8), (200, 100, 50)).save(root / split / identity / name)
            else:
                (root / split / identity / name).write_text("not an image")


BAD_DATA = {
    "ddh-empty-train": ("ddh", _empty_train, "train: no .pkl files"),
    "ddh-garbage-pkl": ("ddh", _garbage_pkl, "data_batch_1.pkl: truncated or corrupt pickle"),
    "ddh-folder-named-pkl": ("ddh", _folder_named_pkl, "train: no .pkl files"),
    "ddh-one-identity": ("ddh", _one_identity, "the training split has 1 identity; hashing needs at least 2"),
    "folder-empty-train": ("folder", lambda root, _: _image_folder(root, {}), "Couldn't find any class folder"),
    "folder-no-images": ("folder", lambda root, _: _image_folder(root, {"bob": "notes.txt"}), "no images found"),
}


def _trainer_message(capsys, dataset, root, tmp_path):
    """What dcdh_train.py says for this data folder (after ``dcdh_train.py: error: ``)."""
    import dcdh_train
    capsys.readouterr()
    args = ["--dataset", dataset, "--data-root", str(root), "--len", "8", "--bs", "32", "--epochs", "1",
            "--device", "cpu", "--save", str(tmp_path / "trainer" / "x.tar")]
    with pytest.raises(SystemExit) as e:
        dcdh_train.main(dcdh_train.get_args_parser().parse_args(args))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("dcdh_train.py: error: ") and err.count("\n") == 1, err
    return err[len("dcdh_train.py: error: "):]


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_contents_stop_the_grid_with_the_trainers_line(synthetic_root, tmp_path, capsys, case):
    """Seen: --dry-run exit 0; the run made every folder, failed every cell, exit 1. Now: the line
    dcdh_train.py prints for that folder, exit 2, for --dry-run and the run, before any folder."""
    dataset, make, needle = BAD_DATA[case]
    root = tmp_path / "data"
    root.mkdir()
    make(root, synthetic_root)
    path = _experiment(tmp_path, root, dataset)
    expected = _trainer_message(capsys, dataset, root, tmp_path)
    assert needle in expected
    for extra in (["--dry-run"], []):
        code, out, err = _reproduce(capsys, path, "--out", tmp_path / "runs", *extra)
        assert (code, out, err) == (2, "", "reproduce.py: error: " + expected), extra
        assert not (tmp_path / "runs").exists()


def test_summary_names_results_csv_only_when_written(synthetic_root, tmp_path):
    path = _experiment(tmp_path, synthetic_root)
    exp = load_experiment(str(path), out=str(tmp_path / "runs"))
    lines = []
    runner = Runner(exp, exp.cells, say=lines.append)
    runner.failed = [(c, "exit status 2: dcdh_train.py: error: ...") for c in exp.cells]
    runner.summary()
    assert "results.csv" not in lines[0] and lines[0].endswith("no report written (no finished cell)")
    os.makedirs(exp.out_dir)
    (tmp_path / "runs" / "exp" / "results.csv").write_text("experiment\n")
    lines.clear()
    runner.summary()
    assert lines[0].endswith(f"results in {tmp_path / 'runs' / 'exp' / 'results.csv'}")


# ---- 2 and 3: an unusable metrics.json ------------------------------------------------------------

def _metrics_of(cell):
    with open(cell.path("metrics.json")) as f:
        return json.load(f)


def _replace(m, **changes):
    m = json.loads(json.dumps(m))
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        target = m
        for p in parents:
            target = target[p]
        if value is KeyError:
            del target[key]
        else:
            target[key] = value
    return m


WRONG_SHAPES = {
    "empty-object": (lambda m: {}, "no 'metrics' object"),
    "array": (lambda m: [], "expected a JSON object, got an array"),
    "null": (lambda m: None, "expected a JSON object, got null"),
    "map-string": (lambda m: _replace(m, metrics__map="abc"), "metrics 'map' is 'abc', expected a number"),
    "map-missing": (lambda m: _replace(m, metrics__map=KeyError), "no 'map' in 'metrics'"),
    "map-nan": (lambda m: _replace(m, metrics__map=float("nan")), "metrics 'map' is nan, expected a fraction in [0, 1]"),
    "map-above-1": (lambda m: _replace(m, metrics__map=5.0), "metrics 'map' is 5.0, expected a fraction in [0, 1]"),
    "no-curves": (lambda m: _replace(m, curves=KeyError), "no 'curves' object"),
    "curve-lengths": (lambda m: _replace(m, curves__pr_over_radius__precision=[0.5]),
                      "curves 'pr_over_radius': radius, precision, recall differ in length"),
    "no-epochs-run": (lambda m: _replace(m, epochs_run=KeyError), "no 'epochs_run'"),
    "another-cells-file": (lambda m: _replace(m, cell="csq-8b-s0", method="csq"),
                           "its cell is 'csq-8b-s0', not this cell's 'dcdh-8b-s0' (another cell's file?)"),
}


@pytest.mark.parametrize("shape", list(WRONG_SHAPES))
def test_wrong_shaped_metrics_is_not_a_finished_cell(trained, synthetic_root, tmp_path, shape):
    make, problem = WRONG_SHAPES[shape]
    _, exp, cell = _copy(trained, synthetic_root, tmp_path)
    (tmp_path / "runs" / "exp" / cell.name / "metrics.json").write_text(json.dumps(make(_metrics_of(cell))))
    assert check_metrics(cell) == (None, problem)
    assert status(cell)[0] == "partial"
    line = bad_metrics_line(cell, problem)
    assert line.startswith(f"warning: {cell.path('metrics.json')}: {problem}; ") and "\n" not in line


def test_report_on_wrong_shaped_metrics_warns_in_the_runners_line(trained, synthetic_root, tmp_path, capsys):
    """Seen: KeyError/TypeError tracebacks after part of the report was rewritten ({}, [], "map":
    "abc", no "curves"). Now --report and --dry-run print the runner's one-line warning, and the
    report holds the checked cells only."""
    path, exp, cell = _copy(trained, synthetic_root, tmp_path)
    twin = _finished_twin(exp)
    for shape in ("empty-object", "array", "map-string", "no-curves"):
        make, problem = WRONG_SHAPES[shape]
        bad = json.dumps(make(_metrics_of(twin)))
        (tmp_path / "runs" / "exp" / cell.name / "metrics.json").write_text(bad)
        line = bad_metrics_line(cell, problem)
        code, out, err = _reproduce(capsys, path, "--out", tmp_path / "runs", "--report")
        assert code == 0 and err == "" and "Traceback" not in out, err
        assert out.splitlines() == [line, f"exp: 12 report files written to {exp.out_dir}"]
        with open(os.path.join(exp.out_dir, "results.csv")) as f:
            rows = f.read().splitlines()
        assert len(rows) == 2 and rows[1].startswith("exp,ddh,dcdh,8,1,")  # the checked twin only
        assert "| DCDH | **" in open(os.path.join(exp.out_dir, "table_map.md")).read()
        assert not [n for n in os.listdir(exp.out_dir) if n.endswith(".tmp")]
        assert (tmp_path / "runs" / "exp" / cell.name / "metrics.json").read_text() == bad  # --report changes no cell
    code, out, _ = _reproduce(capsys, path, "--out", tmp_path / "runs", "--dry-run")
    assert code == 0 and line in out.splitlines() and status(twin)[0] == "finished"


def test_report_without_a_checked_cell_leaves_the_earlier_report(trained, synthetic_root, tmp_path, capsys):
    path, exp, cell = _copy(trained, synthetic_root, tmp_path)
    csv_path = os.path.join(exp.out_dir, "results.csv")
    with open(csv_path, "w") as f:
        f.write("an earlier report\n")
    (tmp_path / "runs" / "exp" / cell.name / "metrics.json").write_text('{"metrics": {"map": "abc"}}')
    code, out, _ = _reproduce(capsys, path, "--out", tmp_path / "runs", "--report")
    assert code == 0 and out.splitlines()[0].startswith(f"warning: {cell.path('metrics.json')}: ")
    assert out.splitlines()[1] == "exp: no finished cell yet; nothing written"
    assert open(csv_path).read() == "an earlier report\n"


def test_truncated_metrics_is_set_aside_and_the_cell_evaluated_again(trained, synthetic_root, tmp_path, monkeypatch):
    """Seen: ``head -c 1500`` of a finished cell's metrics.json: the cell missing from the report and
    the grid called finished forever. Now the run names it, sets the file aside and evaluates the
    checkpoint again (the log says training had ended: nothing is retrained)."""
    _, exp, cell = _copy(trained, synthetic_root, tmp_path)
    reference = trained[1]
    whole = open(cell.path("metrics.json"), "rb").read()
    with open(cell.path("metrics.json"), "wb") as f:
        f.write(whole[:1500])
    assert status(cell)[0] == "partial"
    failed, lines = _run_grid(monkeypatch, exp, [cell])
    assert failed == 0, lines
    assert lines[0].startswith(f"warning: {cell.path('metrics.json')}: not valid JSON (")
    assert f"{cell.name}: its unusable metrics.json is set aside as metrics.json.bad-1" in lines
    assert open(cell.path("metrics.json.bad-1"), "rb").read() == whole[:1500]  # kept, not deleted
    m = _metrics_of(cell)
    for key in ("metrics", "curves", "epochs_run", "best_epoch", "best_loss", "epochs"):
        assert m[key] == reference[key], key
    assert open(cell.path("model.log")).read().count("[config] dataset") == 1  # evaluated, not retrained
    assert status(cell)[0] == "finished"


# ---- 7: a corrupt or missing checkpoint ---------------------------------------------------------

def _unfinish(cell):
    """The cell as killed during training: no metrics.json, model.log cut after epoch 1."""
    os.unlink(cell.path("metrics.json"))
    log = open(cell.path("model.log")).read().splitlines(keepends=True)
    cut = next(i for i, ln in enumerate(log) if "[epoch 1/2]" in ln) + 1
    with open(cell.path("model.log"), "w") as f:
        f.writelines(log[:cut])


def test_truncated_resume_file_fails_once_in_one_line_then_resumes(trained, synthetic_root, tmp_path, monkeypatch):
    """Seen: a traceback in cell.out and 'rerun to retry', failing the same way forever. Now one
    line naming the file, the file kept as model.last.tar.corrupt-1, and the rerun resumes from
    model.tar (its epoch 1)."""
    _, exp, cell = _copy(trained, synthetic_root, tmp_path)
    _unfinish(cell)
    state = load_checkpoint(cell.path("model.tar"))
    state.update(epoch=1, best_epoch=0)  # model.tar as written after epoch 1
    save_checkpoint(state, cell.path("model.tar"))
    truncated = open(cell.path("model.tar"), "rb").read()[:5000]
    with open(cell.path("model.last.tar"), "wb") as f:
        f.write(truncated)
    failed, lines = _run_grid(monkeypatch, exp, [cell])
    assert failed == 1
    failure = next(ln for ln in lines if " FAILED " in ln)
    assert (f"FAILED {cell.name} (exit status 2: grid.cell: error: {cell.path('model.last.tar')}: not a readable "
            "checkpoint (truncated or corrupt; ") in failure
    assert "set aside as model.last.tar.corrupt-1; the next run resumes from model.tar (epoch 1))" in failure
    assert "Traceback" not in open(cell.path("cell.out")).read()
    assert open(cell.path("model.last.tar.corrupt-1"), "rb").read() == truncated
    failed, lines = _run_grid(monkeypatch, exp, [cell])
    assert failed == 0, lines
    assert f"[resume] from {cell.path('model.tar')}: 1 epochs done" in open(cell.path("model.log")).read()
    m = _metrics_of(cell)
    assert m["epochs_run"] == 2 and check_metrics(cell)[1] is None
    assert os.path.isfile(cell.path("model.last.tar.corrupt-1"))


def _ended_without_metrics(cell):
    """The cell after training ended, before evaluation: model.last.tar of the last epoch.
    Returns (its bytes, the log's text)."""
    os.unlink(cell.path("metrics.json"))
    state = load_checkpoint(cell.path("model.tar"))
    state.update(epoch=2)  # the last epoch's state: training had ended
    save_checkpoint(state, cell.path("model.last.tar"))
    return open(cell.path("model.last.tar"), "rb").read(), open(cell.path("model.log")).read()


def test_missing_best_checkpoint_after_training_trains_the_cell_again(trained, synthetic_root, tmp_path):
    """model.tar missing while model.last.tar says training had ended: the best epoch's weights are
    gone, so the cell fails once naming the file, its files are set aside (renamed), and the next
    run trains it from scratch, to the same result (same seed, data and threads)."""
    _, exp, cell = _copy(trained, synthetic_root, tmp_path)
    last_bytes, log_text = _ended_without_metrics(cell)
    os.unlink(cell.path("model.tar"))
    with pytest.raises(UserInputError) as e:
        grid.cell.run(cell.dir, "test")
    assert str(e.value) == (f"{cell.path('model.tar')}: missing, but model.last.tar holds training progress (the "
                            "best epoch's weights are lost); set aside as model.last.tar.orphan-1, model.log.old-1; "
                            "the next run trains the cell from scratch")
    assert open(cell.path("model.last.tar.orphan-1"), "rb").read() == last_bytes
    assert open(cell.path("model.log.old-1")).read() == log_text
    with contextlib.redirect_stdout(io.StringIO()):
        grid.cell.run(cell.dir, "test")
    m = _metrics_of(cell)
    for key in ("metrics", "epochs_run", "best_epoch", "best_loss"):
        assert m[key] == trained[1][key], key
    assert open(cell.path("model.log")).read().count("[config] dataset") == 1  # a fresh log


def test_no_checkpoint_left_trains_from_scratch_and_says_so(trained, synthetic_root, tmp_path, monkeypatch):
    """Seen (7b): metrics.json and both checkpoints gone, the log of 2 epochs kept: the runner said
    "resuming after epoch 2/2" and the cell then trained from scratch, appending to the old log. Now
    the cell is to train (no progress without a checkpoint), the runner says why it starts over,
    the old log is kept under another name, and the result is the trained one."""
    _, exp, cell = _copy(trained, synthetic_root, tmp_path)
    log_text = open(cell.path("model.log")).read()
    for name in ("metrics.json", "model.tar"):
        os.unlink(cell.path(name))
    assert not os.path.exists(cell.path("model.last.tar"))
    assert estimate.read_log(cell.path("model.log"))[1] == 2 and status(cell) == ("todo", 0)
    failed, lines = _run_grid(monkeypatch, exp, [cell])
    assert failed == 0, lines
    start = next(line for line in lines if f"start {cell.name}" in line)
    assert start.endswith(f"start {cell.name} (2 epochs, from scratch: no checkpoint is left of the 2 epoch(s) its "
                          f"model.log records); output in {display(cell.path('cell.out'))}")
    assert open(cell.path("model.log.old-1")).read() == log_text
    assert open(cell.path("model.log")).read().count("[config] dataset") == 1  # a fresh log
    m = _metrics_of(cell)
    for key in ("metrics", "epochs_run", "best_epoch", "best_loss"):
        assert m[key] == trained[1][key], key


@pytest.mark.parametrize("cut", ["mid-line", "garbage"])
def test_a_cut_or_garbled_log_without_checkpoints_is_set_aside_not_appended_to(trained, synthetic_root, tmp_path,
                                                                               monkeypatch, cut):
    """Seen: a log cut inside its epoch line (no epoch counted, no newline at its end) was appended
    to, the new [config] line merging with the old line, and train_s read 112 s for a 2 s run."""
    _, exp, cell = _copy(trained, synthetic_root, tmp_path)
    whole = open(cell.path("model.log"), "rb").read()
    whole = re.sub(rb"(?m)^\d{4}-\d\d-\d\d", b"2020-01-01", whole)  # an attempt of long ago
    old = whole[:whole.index(b"[epoch 1/2]") + 30] if cut == "mid-line" else bytes(range(256)) * 8
    with open(cell.path("model.log"), "wb") as f:
        f.write(old)
    for name in ("metrics.json", "model.tar"):
        os.unlink(cell.path(name))
    failed, lines = _run_grid(monkeypatch, exp, [cell])
    assert failed == 0, lines
    assert open(cell.path("model.log.old-1"), "rb").read() == old
    assert open(cell.path("model.log")).read().count("[config] dataset") == 1
    assert _metrics_of(cell)["train_s"] <= trained[1]["train_s"] + 30   # this run's time, not the old log's


def test_old_log_that_cannot_be_set_aside_is_one_line(trained, synthetic_root, tmp_path, monkeypatch):
    _, exp, cell = _copy(trained, synthetic_root, tmp_path)
    for name in ("metrics.json", "model.tar"):
        os.unlink(cell.path(name))

    def refuse(path, why):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(grid.cell, "set_aside", refuse)
    with pytest.raises(UserInputError) as e:
        grid.cell.run(cell.dir, "test")
    assert str(e.value) == (f"{cell.path('model.log')}: no checkpoint is left of the run it records, and it cannot "
                            "be set aside (Permission denied): rename or remove it")
    assert sorted(os.listdir(cell.dir)) == ["cell.json", "model.log"]  # nothing trained or written


def test_corrupt_best_checkpoint_is_set_aside_with_the_progress_it_served(trained, synthetic_root, tmp_path):
    _, exp, cell = _copy(trained, synthetic_root, tmp_path)
    last_bytes, _ = _ended_without_metrics(cell)
    with open(cell.path("model.tar"), "wb") as f:
        f.write(b"\x80\x02garbage")
    with pytest.raises(UserInputError) as e:
        grid.cell.recover_checkpoints(cell.path("model.tar"), cell.path("model.last.tar"), cell.path("model.log"))
    assert str(e.value).startswith(f"{cell.path('model.tar')}: not a ") and "\n" not in str(e.value)
    assert str(e.value).endswith("; set aside as model.tar.corrupt-1, model.last.tar.orphan-1, model.log.old-1; "
                                 "the next run trains the cell from scratch")
    assert open(cell.path("model.tar.corrupt-1"), "rb").read() == b"\x80\x02garbage"
    assert open(cell.path("model.last.tar.orphan-1"), "rb").read() == last_bytes
    assert sorted(n for n in os.listdir(cell.dir) if n.startswith("model")) == [
        "model.last.tar.orphan-1", "model.log.old-1", "model.tar.corrupt-1"]
    # nothing left to set aside: the next attempt starts from scratch
    paths = (cell.path("model.tar"), cell.path("model.last.tar"), cell.path("model.log"))
    assert grid.cell.recover_checkpoints(*paths) is None


def test_image_folder_that_cannot_be_decoded_stops_the_grid_first(tmp_path, capsys, monkeypatch):
    """Seen: an image-folder set whose files only look like images (2 identities, '.jpg' files of text)
    passed the check before the grid, and each cell then failed alone. Now a split of which no image
    decodes stops the grid in one line, before any folder is made; one good image among bad ones,
    wherever it is, is enough (the trainer skips a bad image with a warning)."""
    from PIL import Image
    monkeypatch.setattr(estimate, "time_batches", lambda *a: (50.0, 3, 32))  # the dry run times no network
    for split, n in (("train", 16), ("test", 3)):  # 32 training images: the batch of 32 fits
        for ident in ("ann", "ben"):
            os.makedirs(tmp_path / "faces" / split / ident)
            for i in range(n):
                (tmp_path / "faces" / split / ident / f"{i}.jpg").write_text("not an image")
    path = _experiment(tmp_path, tmp_path / "faces", dataset="folder")
    code, out, err = _reproduce(capsys, path, "--out", tmp_path / "runs", "--dry-run")
    first = tmp_path / "faces" / "train" / "ann" / "0.jpg"
    assert_one_line_refusal(code, err, f"{tmp_path / 'faces' / 'train'}: none of its 32 image files can be decoded "
                            f"(e.g. {first}); expected JPEG, PNG, PGM ... images")
    assert out == "" and not (tmp_path / "runs").exists()
    for split, last in (("train", "9.jpg"), ("test", "2.jpg")):  # the last file of each split listed
        Image.new("RGB", (40, 40), "white").save(tmp_path / "faces" / split / "ben" / last, format="JPEG")
    code, out, err = _reproduce(capsys, path, "--out", tmp_path / "runs", "--dry-run")
    assert code == 0 and err == "" and "dcdh-8b-s0" in out
