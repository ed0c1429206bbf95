"""reproduce.py and grid/: a tiny experiment end to end (every output file, shards that cover every
cell once, a rerun that trains nothing, kill -9 mid-cell then a rerun equal to an uninterrupted
run) and bad experiment files refused in one line, exit 2, before anything trains.

The tiny experiment: 2 methods x 2 code lengths x 1 seed on the synthetic set, 1 epoch (dcdh 3,
without early stopping, so that a kill can land in the middle of training), batch 32.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_script
from conftest import reproduce_in_process as _reproduce, assert_one_line_refusal as _one_line
from grid.config import load_experiment, parse_shard, select_shard
from grid.report import MEASURED, write_report
from grid.runner import check_settings
from utils.errors import UserInputError

TINY = """
dataset = "ddh"
data_root = "{root}"
methods = ["dcdh", "csq"]
bits = [8, 12]
seeds = [0]
device = "cpu"

[train]
epochs = 1
bs = 32

[overrides.dcdh]
epochs = 3
patience = 3
"""
CELLS = ["dcdh-8b-s0", "csq-8b-s0", "dcdh-12b-s0", "csq-12b-s0"]  # run order: seed, bits, method
REPORT = ["results.csv"] + [f"table_{k}.{e}" for k in ("map", "precision_radius_2", "recall_radius_2")
                            for e in ("md", "tex")] + \
         [f"fig_{k}_vs_bits.png" for k in ("map", "precision_radius_2", "recall_radius_2")] + \
         ["fig_pr_curve_12b.png", "fig_precision_at_n_12b.png"]


def _popen(*args):
    return subprocess.Popen([sys.executable, "reproduce.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.fixture(scope="module")
def tiny(synthetic_root, tmp_path_factory):
    """The tiny experiment, run as two shards at once into one folder: (file, out folder, outputs)."""
    folder = tmp_path_factory.mktemp("reproduce")
    path = folder / "tiny.toml"
    path.write_text(TINY.format(root=synthetic_root))
    out = folder / "runs"
    procs = [_popen(str(path), "--out", str(out), "--shard", s) for s in ("0/2", "1/2")]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    return path, out / "tiny", outputs


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_experiment_writes_every_file(tiny):
    _, out, _ = tiny
    for name in CELLS:
        cell = out / name
        assert (cell / "model.tar").is_file() and (cell / "model.log").is_file()
        assert not (cell / "model.last.tar").exists()  # removed once the cell is finished
        m = json.loads((cell / "metrics.json").read_text())
        assert set(m["curves"]) == {"precision_at_n", "pr_over_radius"}
        assert len(m["curves"]["pr_over_radius"]["radius"]) == m["bits"] + 1
        assert m["epochs_run"] == (3 if name.startswith("dcdh") else 1) and 1 <= m["best_epoch"] <= m["epochs_run"]
    for name in REPORT:
        assert (out / name).stat().st_size > 0, name
    rows = _rows(out / "results.csv")
    assert [(r["method"], r["bits"], r["seed"]) for r in rows] == [
        ("dcdh", "8", "0"), ("dcdh", "12", "0"), ("csq", "8", "0"), ("csq", "12", "0")]
    for key in ("map", "precision_radius_2", "recall_radius_2", "epochs_run", "best_epoch", "wall_s",
                "images_per_s", "device", "code_version"):
        assert all(r[key] != "" for r in rows), key
    table = (out / "table_map.md").read_text()
    assert "| DCDH |" in table and "| CSQ |" in table and "**" in table and "12 bits" in table
    assert r"\textbf{" in (out / "table_map.tex").read_text()


def test_shards_cover_every_cell_once(tiny, capsys):
    path, out, outputs = tiny
    finished = [[c for c in CELLS if f"finished {c} " in o] for o in outputs]
    assert sorted(finished[0] + finished[1]) == sorted(CELLS) and not set(finished[0]) & set(finished[1])
    for name in CELLS:  # each cell trained by exactly one run
        assert (out / name / "model.log").read_text().count("[config] dataset") == 1
    exp = load_experiment(str(path), out=str(out.parent))
    for n in (2, 3, 5):
        shards = [c.name for i in range(n) for c in select_shard(exp.cells, (i, n))]
        assert sorted(shards) == sorted(CELLS)


def test_rerun_trains_nothing(tiny):
    path, out, _ = tiny
    files = [out / c / n for c in CELLS for n in ("model.tar", "metrics.json", "model.log")]
    before = [f.stat().st_mtime_ns for f in files]
    r = run_script("reproduce.py", str(path), "--out", str(out.parent))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing to run: all 4 cells are finished" in r.stdout
    assert [f.stat().st_mtime_ns for f in files] == before


def test_kill_9_mid_cell_then_rerun_equals_uninterrupted(tiny, tmp_path):
    """The shard 0/4 cell (dcdh-8b-s0, 3 epochs), killed with its whole process group once its first
    epoch's checkpoint is saved, then rerun: results.csv equals the uninterrupted run's in every column but the
    measurements (``grid.report.MEASURED``: times, images/s, host, date) and the code version."""
    path, reference, _ = tiny
    log = tmp_path / "tiny" / "dcdh-8b-s0" / "model.log"
    proc = _popen(str(path), "--out", str(tmp_path), "--shard", "0/4")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and "[saved]" in log.read_text():  # epoch 1's checkpoint is on disk
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (tmp_path / "tiny" / "dcdh-8b-s0" / "metrics.json").exists(), "the kill came too late"
    r = run_script("reproduce.py", str(path), "--out", str(tmp_path), "--shard", "0/4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming after epoch" in r.stdout and "finished dcdh-8b-s0" in r.stdout
    rerun = _rows(tmp_path / "tiny" / "results.csv")
    ref = [row for row in _rows(reference / "results.csv") if (row["method"], row["bits"]) == ("dcdh", "8")]
    assert len(rerun) == 1 and rerun[0].keys() == ref[0].keys()
    # code_version too may differ: the checkout can change (an edit, a commit) between the two runs
    same = [k for k in ref[0] if k not in MEASURED + ("code_version",)]
    assert {k: rerun[0][k] for k in same} == {k: ref[0][k] for k in same}
    assert rerun[0]["code_version"]


def test_changed_settings_are_refused(tiny, tmp_path):
    path, out, _ = tiny
    changed = tmp_path / "tiny.toml"
    changed.write_text(path.read_text().replace("epochs = 1", "epochs = 2"))
    exp = load_experiment(str(changed), out=str(out.parent))
    with pytest.raises(UserInputError, match=r"csq-8b-s0: this cell was started with other settings \(epochs 1 -> 2\)"):
        check_settings(exp.cells)


BAD = [
    ('methods = ["dcdh", "nope"]', "methods: unknown method 'nope'"),
    ("methods = []", "methods: empty list"),
    ("bits = []", "bits: empty list"),
    ("seeds = []", "seeds: empty list"),
    ("bits = [0, 12]", "bits: 0 is out of range 1..1024"),
    ("bits = [2000]", "bits: 2000 is out of range 1..1024"),
    ('data_root = "/no/such/folder"', "data_root: /no/such/folder: no such folder"),
    ("epoch = 3", "epoch: unknown key"),
    ("[train]\nlearning_rate = 0.1", "train.learning_rate: unknown key"),
    ("[train]\nepochs = 0", "train.epochs: 0: expected an integer >= 1"),
    ("[overrides.dcdh]\nmethod_args = { gamma = 1 }",
     "overrides.dcdh.method_args: method dcdh has no hyperparameter 'gamma'"),
    ("[overrides.dpsh]\nepochs = 2", "overrides.dpsh: 'dpsh' is not in methods"),
    ('dataset = "mnist"', "dataset: 'mnist' is unknown"),
    ("[overrides.csq]\nbackbone = \"ddahnet\"", "overrides.csq.backbone (cell csq-8b-s0): --backbone ddahnet"),
    ("bits = [8", "not valid TOML"),
]


def _bad_file(tmp_path, root, change):
    """The tiny experiment with the line(s) of ``change`` replacing the same key's (or added)."""
    key = change.split("=")[0].strip()
    lines = [ln for ln in TINY.format(root=root).strip().splitlines()
             if not (ln.split("=")[0].strip() == key and not key.startswith("["))]
    top, rest = lines[:lines.index("[train]")], lines[lines.index("[train]"):]
    if change.startswith("[train]"):
        rest = rest[:1] + change.splitlines()[1:] + [ln for ln in rest[1:] if not ln.startswith("epochs")]
    elif change.startswith("[overrides"):
        rest = rest[:rest.index("[overrides.dcdh]")] + change.splitlines()
    else:
        top.append(change)
    path = tmp_path / "bad.toml"
    path.write_text("\n".join(top + rest) + "\n")
    return path


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_experiment_files_name_the_key(synthetic_root, tmp_path, change, message):
    path = _bad_file(tmp_path, synthetic_root, change)
    with pytest.raises(UserInputError) as e:
        load_experiment(str(path), out=str(tmp_path / "runs"))
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_bad_file_on_the_command_line_is_one_line_exit_2(synthetic_root, tmp_path):
    path = _bad_file(tmp_path, synthetic_root, 'methods = ["dcdh", "nope"]')
    r = run_script("reproduce.py", str(path), "--out", str(tmp_path / "runs"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("reproduce.py: error: ") and r.stderr.count("\n") == 1
    assert "methods: unknown method 'nope'" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_shard_flag():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "a/b", "1"):
        with pytest.raises(UserInputError, match="--shard"):
            parse_shard(bad)


def test_tables_show_mean_and_deviation_over_seeds(synthetic_root, tmp_path):
    """Three seeds: mean ± sample standard deviation, the best of each column in bold; a missing
    cell is a dash; a cell with fewer seeds says how many."""
    path = tmp_path / "three.toml"
    path.write_text(TINY.format(root=synthetic_root).replace("seeds = [0]", "seeds = [0, 1, 2]"))
    exp = load_experiment(str(path), out=str(tmp_path))
    maps = {("dcdh", 8): [0.1, 0.2, 0.3], ("csq", 8): [0.5, 0.5, 0.5], ("dcdh", 12): [0.4, 0.6]}
    for cell in exp.cells:
        values = maps.get((cell.method, cell.bits), [])
        if cell.seed < len(values):
            os.makedirs(cell.dir)
            curves = {"pr_over_radius": {"radius": list(range(cell.bits + 1)), "precision": [0.5] * (cell.bits + 1),
                                         "recall": [0.5] * (cell.bits + 1)},
                      "precision_at_n": {"ranks": [1, 10], "precision": [1.0, 0.5], "recall": [0.1, 0.5]}}
            m = {"metrics": {"map": values[cell.seed], "precision_radius_2": 0.5, "recall_radius_2": 0.5},
                 "curves": curves, "epochs_run": 1, "best_epoch": 1}
            with open(cell.path("metrics.json"), "w") as f:
                json.dump(m, f)
    write_report(exp)
    out = tmp_path / "three"
    table = (out / "table_map.md").read_text()
    assert "| DCDH | 20.00 ± 10.00 | **50.00 ± 14.14 (2/3 seeds)** |" in table
    assert "| CSQ | **50.00 ± 0.00** | — |" in table
    assert r"\textbf{50.00 $\pm$ 0.00}" in (out / "table_map.tex").read_text()
    assert len(_rows(out / "results.csv")) == 3 + 3 + 2


SETUP_REFUSED = [
    ("pretrained", ("bs = 32", "bs = 32\npretrained = true"), None,
     "train.pretrained (cell dcdh-8b-s0): --pretrained is only available for resnet18, resnet50, alexnet, not dfhnet"),
    ("bs", ("bs = 32", "bs = 1000"), None,
     "train.bs (cell dcdh-8b-s0): 1000 is larger than the training set (128 images in"),
    ("device-tpu", ('device = "cpu"', 'device = "tpu"'), None, "device: 'tpu': expected cpu, cuda or cuda:N"),
    ("device-cuda", ('device = "cpu"', 'device = "cuda"'), None,
     "device: 'cuda': no CUDA GPU is available on this machine"),
    ("huge-int", ("patience = 3", f"patience = 3\n[overrides.csq]\nmethod_args = {{ seed = {10 ** 30} }}"), None,
     f"overrides.csq.method_args: seed={10 ** 30}: must be <= 2147483647"),
    ("memory-env", None, "lots",
     "DCDH_MEMORY_LIMIT_BYTES='lots' (environment): expected a number of bytes"),
]


@pytest.mark.parametrize("change,env,message", [c[1:] for c in SETUP_REFUSED], ids=[c[0] for c in SETUP_REFUSED])
def test_settings_the_trainer_refuses_stop_the_grid_before_any_folder(synthetic_root, tmp_path, capsys, monkeypatch,
                                                                      change, env, message):
    """Settings dcdh_train.py would refuse in each cell (exit 1 per cell, and a folder that then
    blocked the corrected file) are one line naming the key, exit 2, before any folder is made."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    if env is not None:
        monkeypatch.setenv("DCDH_MEMORY_LIMIT_BYTES", env)
    text = TINY.format(root=synthetic_root)
    path = tmp_path / "exp.toml"
    path.write_text(text.replace(*change) if change else text)
    code, out, err = _reproduce(capsys, path, "--out", tmp_path / "runs")
    _one_line(code, err, message)
    if env is None:
        assert str(path) in err
    assert out == "" and not (tmp_path / "runs").exists()


def test_dry_run_notes_a_missing_gpu_but_lists_the_cells(synthetic_root, tmp_path, capsys, monkeypatch):
    """A grid may be planned on a machine without its GPU (a cluster's login node)."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "exp.toml"
    path.write_text(TINY.format(root=synthetic_root).replace('device = "cpu"', 'device = "cuda"'))
    code, out, err = _reproduce(capsys, path, "--out", tmp_path / "runs", "--dry-run")
    assert code == 0 and err == "" and "dcdh-8b-s0" in out
    assert "note: this machine cannot run the cells: " in out and "no CUDA GPU" in out
    assert not (tmp_path / "runs").exists()


def test_out_folder_that_cannot_be_made_is_one_line_exit_2(synthetic_root, tmp_path, capsys):
    path = tmp_path / "exp.toml"
    path.write_text(TINY.format(root=synthetic_root))
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    for dry in ([], ["--dry-run"]):  # a dry run refuses what the run would refuse (it exited 0)
        code, out, err = _reproduce(capsys, path, "--out", blocker / "runs", *dry)
        _one_line(code, err, f"--out {blocker / 'runs'}: cannot create the output folder",
                  f"{blocker} is a file, not a folder")
        assert blocker.read_text() == "keep me" and out == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_folder_is_one_line_exit_2(synthetic_root, tmp_path, capsys):
    path = tmp_path / "exp.toml"
    path.write_text(TINY.format(root=synthetic_root))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = _reproduce(capsys, path, "--out", locked)
    finally:
        locked.chmod(0o755)
    _one_line(code, err, f"--out {locked}: cannot", "Permission denied")


def test_cell_folder_without_progress_takes_the_corrected_settings(synthetic_root, tmp_path):
    """A cell that failed during setup left cell.json and cell.out but no epoch or checkpoint:
    a rerun with other settings takes the folder over; once it holds progress it is refused."""
    from grid.runner import Runner
    path = tmp_path / "exp.toml"
    path.write_text(TINY.format(root=synthetic_root))
    exp = load_experiment(str(path), out=str(tmp_path))
    cell = exp.cells[0]
    os.makedirs(cell.dir)
    with open(cell.path("cell.json"), "w") as f:
        json.dump({"settings": dict(cell.settings, bs=100000)}, f)
    with open(cell.path("cell.out"), "w") as f:
        f.write("dcdh_train.py: error: --bs 100000 is larger than the training set (128 images)\n")
    check_settings(exp.cells)  # no progress: nothing to refuse
    with open(cell.path("model.last.tar"), "wb") as f:  # a checkpoint: progress with the old settings
        f.write(b"x")
    with pytest.raises(UserInputError, match=r"started with other settings \(bs 100000 -> 32\)"):
        check_settings(exp.cells)
    # a runner that got past the check (another runner started the cell meanwhile) refuses it too
    outcome = Runner(exp, [cell], say=lambda line: None).run_cell(cell)
    assert outcome[1] == "failed" and "started with other settings" in outcome[3]


def test_negative_shard_names_what_is_expected(tmp_path, capsys):
    code, _, err = _reproduce(capsys, tmp_path / "x.toml", "--shard", "-1/2")
    _one_line(code, err, "--shard -1/2: expected I/N with 0 <= I < N")


def test_cell_with_progress_and_unreadable_settings_is_refused(tmp_path):
    """Progress (an epoch in the log) but a damaged cell.json: the settings it was started with are
    unknown, so the cell is refused rather than resumed with possibly other settings; without
    progress, or without any cell.json, it may run."""
    from grid.config import Cell
    from grid.runner import settings_conflict
    cell = Cell("dcdh", 8, 0, str(tmp_path), [], [], {"epochs": 2})
    (tmp_path / "cell.json").write_text("{not json")
    message = settings_conflict(cell, "partial")
    assert message and "cell.json cannot be read" in message and str(tmp_path) in message
    assert settings_conflict(cell, "todo") is None
    (tmp_path / "cell.json").unlink()
    assert settings_conflict(cell, "partial") is None
    (tmp_path / "cell.json").write_text('{"settings": {"epochs": 3}}')
    assert "epochs 3 -> 2" in settings_conflict(cell, "partial")


def test_lock_probe_does_not_take_a_cell_from_its_runner(tmp_path):
    """status() of another invocation (--dry-run, --report) only probes the lock: a runner that
    asks for the lock at that instant retries and gets it; a cell held by a runner reads as running."""
    import fcntl
    from grid.config import Cell
    from grid.runner import lock, locked_elsewhere, status
    cell = Cell("dcdh", 8, 0, str(tmp_path), [], [], {})
    fd = lock(cell)
    assert fd is not None and locked_elsewhere(cell) and status(cell)[0] == "running"
    os.close(fd)
    assert not locked_elsewhere(cell) and status(cell)[0] == "todo"
    probe = os.open(cell.path(".lock"), os.O_RDONLY)   # a probe holding the lock for a moment
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    import threading
    threading.Timer(0.3, os.close, (probe,)).start()
    fd = lock(cell)                                     # retries until the probe lets go
    assert fd is not None
    os.close(fd)


def test_time_left_counts_only_cells_trained_from_the_start(tmp_path):
    """A resumed cell's time covers only its last epochs: it must not lower the estimate of the
    cells left (seen: 'about 2h 53min left' for 106 cells after a cell resumed 11 epochs before its end)."""
    from grid.config import Cell
    from grid.runner import Runner
    cells = [Cell("dcdh", 8, s, str(tmp_path / f"c{s}"), [], [], {}, epochs=2) for s in range(4)]
    runner = Runner(None, cells, jobs=1, say=lambda line: None)
    runner._pending = list(cells)
    runner.resumed.add(cells[0].name)
    runner.record(cells[0], "finished", 10.0, "")
    assert runner.durations == []
    runner.record(cells[1], "finished", 300.0, "")
    assert runner.durations == [300.0]
    assert "about 10min 00s left" in runner.progress()   # 2 cells left x 300 s


def test_time_left_scales_each_cell_estimate_by_the_measured_ratio(tmp_path):
    """A grid mixing a 1-minute method with 10-minute ones: a quick DDH cell must not make the
    others look short (seen: 'about 4min 24s left' for nine 8-minute cells after a 53 s DDH cell).
    Each cell's estimate is scaled by its own method's measured/estimated ratio, once one of the
    method's cells has finished."""
    from grid.config import Cell
    from grid.runner import Runner
    cells = [Cell("ddh", 8, 0, str(tmp_path / "c0"), [], [], {}, epochs=2)]
    cells += [Cell("dcdh", 8, s, str(tmp_path / f"c{s}"), [], [], {}, epochs=2) for s in range(1, 4)]
    cells += [Cell("ddh", 8, 1, str(tmp_path / "c4"), [], [], {}, epochs=2)]
    runner = Runner(None, cells, jobs=1, say=lambda line: None)
    runner.estimates = {c.name: (60.0 if c.method == "ddh" else 600.0) for c in cells}
    runner._pending = list(cells)
    assert runner.time_left(5) == 1920.0                # nothing measured yet: the estimates as they are
    runner.record(cells[0], "finished", 30.0, "")       # ddh: half its estimate
    assert runner.estimated == [("ddh", 60.0)]
    assert runner.time_left(4) == 3 * 600.0 + 60.0 * 0.5
    assert "about 30min 30s left" in runner.progress()
    runner.active = {cells[1].name}                     # a running cell counts half its estimate
    assert runner.time_left(3) == 0.5 * 600.0 + 2 * 600.0 + 30.0
    runner.jobs = 2                                     # two at once: half the time
    assert runner.time_left(3) == (0.5 * 600.0 + 2 * 600.0 + 30.0) / 2
    runner.active = set()
    runner.record(cells[1], "finished", 1200.0, "")     # dcdh: twice its estimate
    assert runner.time_left(3) == (2 * 600.0 * 2 + 30.0) / 2
    runner._pending = [cells[3]]                        # one cell left, two jobs: it alone sets the end
    assert runner.time_left(1) == 600.0 * 2


def test_code_version_dirty_only_for_tracked_code(tmp_path):
    """``-dirty`` marks an edited tracked file; an untracked file or an edit inside the ignored
    output folder (tables the runner rewrites) leaves the version clean."""
    import shutil

    from grid.runner import code_version

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "train.py").write_text("x = 1\n")
    (tmp_path / "results" / "exp").mkdir(parents=True)
    (tmp_path / "results" / "exp" / "table.md").write_text("| a |\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    out = tmp_path / "results" / "exp"
    assert code_version(ignore=str(out), root=str(tmp_path)) == head
    (tmp_path / "untracked.txt").write_text("new\n")
    (out / "table.md").write_text("| b |\n")
    assert code_version(ignore=str(out), root=str(tmp_path)) == head
    assert code_version(root=str(tmp_path)) == head + "-dirty"  # the table edit counts without ignore
    (tmp_path / "train.py").write_text("x = 2\n")
    assert code_version(ignore=str(out), root=str(tmp_path)) == head + "-dirty"
    assert code_version(root=str(tmp_path / "nowhere")) == "unknown"
