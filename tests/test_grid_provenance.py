"""The grid's records and estimates (issues 19 and 21): what each cell records, and where the dry
run's speeds come from.

* a malformed line of a cell's model.log is skipped for the estimate, never fatal;
* experiment-file values that were taken silently (``figure_bits = 12.0``/``true``, ``out = ""``,
  ``epochs = 10**15``, ``lr = 1e308``, ``--dry-run --report``) are one line, exit 2;
* each cell runs with its ``threads`` setting whatever ``--jobs`` is, and records it;
* cell.json / metrics.json name no path of the machine (paths relative to the output folder) and
  the machine as its CPU/GPU model, with the precision actually used;
* the dry-run estimate uses only this machine's speeds: cells that ran here, else a few batches
  timed here (mocked here, except one tiny real timing), never another machine's figures.
"""
import csv
import json
import os
import shlex

import pytest

from conftest import ROOT, run_script
from conftest import reproduce_in_process as _reproduce, assert_one_line_refusal as _one_line
from grid import estimate
from grid.config import default_jobs, load_experiment, portable_flags, portable_spec, relative_path, resolve_flags
from grid.report import write_report
from grid.runner import cell_spec, check_settings, status

TINY = """
dataset = "ddh"
data_root = "{root}"
methods = ["dcdh", "ddh"]
bits = [8, 12]
seeds = [0]
device = "cpu"

[train]
epochs = 1
bs = 32
{train}
[overrides.ddh]
backbone = "ddhnet"
"""


def _exp_file(tmp_path, root, train="", top=""):
    path = tmp_path / "tiny.toml"
    path.write_text(top + TINY.format(root=root, train=train))
    return path


@pytest.fixture
def no_timing(monkeypatch):
    """time_batches replaced by a recorder returning 50 images/s (batches of 32), a fresh cache."""
    calls = []

    def fake(backbone, image_size, bits, bs, precision, threads, dev):
        calls.append((backbone, image_size, precision, threads, dev))
        return 50.0, 3, 32
    monkeypatch.setattr(estimate, "_TIMED", {})
    monkeypatch.setattr(estimate, "time_batches", fake)
    return calls


# --- issue 19 item 4: a malformed log line is skipped -------------------------------------------------

HOSTILE_LOG = """\
2026-12-04 04:31:41 [config] dataset ddh (128 train / 32 test images, 8 identities), device cpu
2026-13-45 99:99:99 [config] method dcdh: a time stamp that is no date
2026-12-04 04:31:51 [epoch 1/3] loss 6.0, lr 0.005, 100 images/s, 10.0 s/epoch
0000-00-00 00:00:00 [epoch 2/3] loss 5.0, lr 0.005, 1.2.3 images/s, 10.0 s/epoch
2026-12-04 04:32:11 [epoch 3/3] loss 4.0, lr 0.005, 0 images/s, 10.0 s/epoch
\x00\xff garbage without a stamp
2026-12-04 04:32:21 [done] 3 epoch(s)
"""


def test_malformed_log_lines_are_skipped_never_fatal(synthetic_root, tmp_path, capsys, no_timing):
    exp = load_experiment(str(_exp_file(tmp_path, synthetic_root)), out=str(tmp_path / "runs"))
    cell = exp.cells[0]
    os.makedirs(cell.dir)
    with open(cell.path("model.log"), "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(HOSTILE_LOG)
    with open(cell.path("cell.json"), "w") as f:
        json.dump(cell_spec(exp, cell), f)
    # the bad stamps are skipped: 04:31:41 .. 04:32:21 = 40 s; the speeds "1.2.3" and 0 are not speeds;
    # the epoch count still follows the epoch lines (3)
    assert estimate.read_log(cell.path("model.log")) == ([100.0], 3, 40.0)
    assert status(cell) == ("todo", 0)                            # no checkpoint: no progress to resume
    open(cell.path("model.last.tar"), "wb").close()              # (only its presence counts here)
    assert status(cell) == ("partial", 3)
    check_settings(exp.cells)                                     # no ValueError
    code, out, err = _reproduce(capsys, exp.path, "--out", tmp_path / "runs", "--dry-run")
    assert code == 0 and err == "" and "dcdh-8b-s0             to resume (epoch 3)" in out


def test_unreadable_log_counts_what_was_read(tmp_path):
    log = tmp_path / "model.log"
    log.write_text("2026-12-04 04:31:41 [config] dataset ddh\n2026-12-04 04:31:51 [epoch 1/3] loss 1, 50 images/s\n")
    log.chmod(0)
    try:
        if os.access(log, os.R_OK):  # root reads anything
            pytest.skip("running as root")
        assert estimate.read_log(str(log)) == ([], 0, 0.0)
    finally:
        log.chmod(0o644)


# --- issue 19 item 9: values that were taken silently ------------------------------------------------

REFUSED = [
    ("figure_bits-float", "figure_bits = 12.0\n", "", "figure_bits: 12.0: expected an integer, one of bits [8, 12]"),
    ("figure_bits-bool", "figure_bits = true\n", "", "figure_bits: true: expected an integer, one of bits [8, 12]"),
    ("out-empty", 'out = ""\n', "", "out: '': empty; expected a folder name"),
    ("epochs-huge", "", f"epochs = {10 ** 15}", f"train.epochs: {10 ** 15}: expected an integer >= 1 and <= 100000"),
    ("lr-huge", "", "lr = 1e308", "train.lr: 1e+308: expected a number in (0, 10]"),
    ("lr-zero", "", "lr = 0.0", "train.lr: 0.0: expected a number in (0, 10]"),
    ("threads-zero", "", "threads = 0", "train.threads: 0: expected an integer >= 1 and <= 1024"),
    ("threads-bool", "", "threads = true", "train.threads: true: expected an integer >= 1 and <= 1024"),
    # values are named as the file writes them (true, not Python's True)
    ("amp-int", "", "amp = 1", 'train.amp: 1: expected "auto", "on" or "off"'),
    ("bs-bool", "", "bs = false", 'train.bs: false: expected an integer >= 1'),
]


def test_values_are_named_in_toml_syntax():
    from grid.config import toml_value
    assert toml_value([True, 8, "x"]) == "[true, 8, 'x']"
    assert toml_value({"scale": False, "lr": 0.5}) == "{ scale = false, lr = 0.5 }"
    assert (toml_value({}), toml_value(1e308), toml_value(None)) == ("{}", "1e+308", "None")


@pytest.mark.parametrize("top,train,message", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_silently_taken_values_are_refused(synthetic_root, tmp_path, capsys, top, train, message):
    path = _exp_file(tmp_path, synthetic_root, train=train, top=top)
    if train:  # the [train] key replaces the file's own
        key = train.split("=")[0].strip()
        path.write_text("\n".join(ln for ln in path.read_text().splitlines()
                                  if not (ln.startswith(key + " ") and ln != train)) + "\n")
    code, out, err = _reproduce(capsys, path, "--out", tmp_path / "runs")
    _one_line(code, err, message, str(path))
    assert out == "" and not (tmp_path / "runs").exists()


def test_epochs_and_lr_at_their_bounds_are_taken(synthetic_root, tmp_path):
    path = _exp_file(tmp_path, synthetic_root, train="lr = 10.0")
    path.write_text(path.read_text().replace("epochs = 1", "epochs = 100000"))
    exp = load_experiment(str(path), out=str(tmp_path / "runs"))
    flags = exp.cells[0].train_flags
    assert exp.cells[0].epochs == 100000 and flags[flags.index("--epochs") + 1] == "100000"
    assert flags[flags.index("--lr") + 1] == "10.0"


@pytest.mark.parametrize("flag", ["--out", "--data-root", "--device"])
def test_empty_command_line_values_are_refused(synthetic_root, tmp_path, capsys, flag):
    code, out, err = _reproduce(capsys, _exp_file(tmp_path, synthetic_root), flag, "", "--dry-run")
    _one_line(code, err, f"{flag} '': empty")


def test_dry_run_and_report_together_are_refused(synthetic_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["reproduce.py"])          # the program name argparse prints
    code, out, err = _reproduce(capsys, _exp_file(tmp_path, synthetic_root), "--dry-run", "--report")
    _one_line(code, err, "--report: not allowed with argument --dry-run")
    assert out == ""


# --- issue 19 item 10: threads fixed per cell, whatever --jobs ----------------------------------------

def test_threads_is_a_setting_of_each_cell(synthetic_root, tmp_path, monkeypatch):
    default = load_experiment(str(_exp_file(tmp_path, synthetic_root)), out=str(tmp_path / "runs"))
    assert [c.threads for c in default.cells] == [1] * 4 and "threads" not in default.cells[0].settings
    assert cell_spec(default, default.cells[0])["threads"] == 1
    path = _exp_file(tmp_path, synthetic_root, train="threads = 2")
    exp = load_experiment(str(path), out=str(tmp_path / "runs"))
    cell = exp.cells[0]
    assert cell.threads == 2 and cell.settings == dict(default.cells[0].settings, threads=2)
    assert cell.train_flags == default.cells[0].train_flags          # a setting of the cell's process, no flag
    assert cell_spec(exp, cell)["threads"] == 2
    # --jobs default: the cores this process may use, at each cell's threads, at most one per cell
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert default_jobs(exp, exp.cells) == 4                      # 8 cores / 2 threads
    assert default_jobs(exp, exp.cells[:3]) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert default_jobs(exp, exp.cells) == 1
    exp.device = "cuda"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert default_jobs(exp, exp.cells) == 1                      # a GPU: one at a time


def test_paths_round_trip_relative_to_the_output_folder(tmp_path):
    out = str(tmp_path / "runs" / "exp")
    flags = ["--data-root", str(tmp_path / "data"), "--save", os.path.join(out, "c", "model.tar"),
             "--checkpoint-dir", os.path.join(out, "c"), "--bs", "32"]
    rel = portable_flags(flags, out)
    assert rel == ["--data-root", "../../data", "--save", "c/model.tar", "--checkpoint-dir", "c", "--bs", "32"]
    assert resolve_flags(rel, out) == flags and resolve_flags(flags, out) == flags   # absolute kept
    spec = portable_spec({"data_root": str(tmp_path / "data"), "train_flags": flags, "eval_flags": flags[:2]},
                         out, 3)
    assert spec["data_root"] == "../../data" and spec["threads"] == 3 and spec["eval_flags"] == rel[:2]
    assert relative_path(None, out) is None


# --- issue 21 item 1 and issue 19 item 11: what a finished cell records -------------------------------

def _strings(value):
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _no_machine_path(record):
    """No absolute path anywhere in ``record`` (a parsed cell.json / metrics.json), no host name."""
    assert "host" not in record
    for text in _strings(record):
        assert not any(os.path.isabs(token) for token in text.split()), text


def test_cells_record_threads_precision_machine_and_no_paths(synthetic_root, tmp_path):
    """A real 1-cell grid (ddh on DDHNet, 1 epoch) with ``threads = 2`` and ``--jobs 2`` on this
    machine: the cell ran with 2 torch threads (the runner's OMP_NUM_THREADS for 2 jobs would
    give 1), and its records hold no path of this machine."""
    import torch

    from utils.device import choose_precision, cpu_capability, cpu_model
    path = tmp_path / "exp" / "tiny.toml"
    path.parent.mkdir()
    path.write_text(TINY.format(root=synthetic_root, train="threads = 2").replace('"dcdh", ', "")
                    .replace("bits = [8, 12]", "bits = [8]"))
    r = run_script("reproduce.py", str(path), "--out", str(tmp_path / "runs"), "--jobs", "2", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "runs" / "tiny"
    precision = choose_precision("auto", torch.device("cpu"))[1]
    for name in ("ddh-8b-s0",):
        m = json.loads((out / name / "metrics.json").read_text())
        spec = json.loads((out / name / "cell.json").read_text())
        assert m["threads"] == 2 and m["device"] == "cpu (2 threads)" and spec["threads"] == 2
        assert m["precision"] == precision and m["amp"] == (precision == "bf16")
        assert (m["cpu_model"], m["cpu_capability"], m["gpu_name"]) == (cpu_model(), cpu_capability(), None)
        _no_machine_path(m)
        _no_machine_path(spec)
        # every path is relative to the output folder and names the real file from there
        assert os.path.samefile(out / m["data_root"], synthetic_root)
        command = shlex.split(m["train_command"])
        assert os.path.samefile(out / command[1], os.path.join(ROOT, "dcdh_train.py"))
        assert os.path.samefile(out / command[command.index("--save") + 1], out / name / "model.tar")
        assert resolve_flags(spec["train_flags"], str(out))[spec["train_flags"].index("--data-root") + 1] \
            == os.path.normpath(synthetic_root)
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["threads"], r["precision"], r["cpu_capability"], r["gpu_name"]) for r in rows] == \
        [("2", precision, cpu_capability(), "")]
    assert "host" not in rows[0]


def test_precision_of_older_checkpoints_follows_amp(tmp_path):
    from grid.cell import provenance
    from utils.device import cpu_capability
    out = str(tmp_path)
    spec = {"device": "cpu", "train_flags": ["--save", os.path.join(out, "c", "model.tar")]}
    old = provenance(spec, {"amp": True}, out)
    assert old["precision"] == "bf16" and old["cpu_capability"] == cpu_capability() and old["gpu_name"] is None
    assert provenance(spec, {"amp": False}, out)["precision"] == "fp32"
    new = provenance(spec, {"amp": True, "precision": "bf16", "cpu_capability": "AVX512+AMX"}, out)
    assert (new["precision"], new["cpu_capability"]) == ("bf16", "AVX512+AMX")
    assert new["train_command"].endswith("dcdh_train.py --save c/model.tar") and out not in new["train_command"]


def test_report_fills_precision_from_amp_and_leaves_the_machine_empty(synthetic_root, tmp_path):
    exp = load_experiment(str(_exp_file(tmp_path, synthetic_root)), out=str(tmp_path / "runs"))
    curves = {"pr_over_radius": {"radius": [0, 1, 2], "precision": [1, 1, 1], "recall": [0, 0, 0]},
              "precision_at_n": {"ranks": [1], "precision": [1.0], "recall": [0.1]}}
    for cell, amp in zip(exp.cells[:2], (True, False)):
        os.makedirs(cell.dir)
        with open(cell.path("metrics.json"), "w") as f:   # a cell recorded before issue 21
            json.dump({"metrics": {"map": 0.5, "precision_radius_2": 0.5, "recall_radius_2": 0.5}, "curves": curves,
                       "epochs_run": 1, "best_epoch": 1, "amp": amp, "host": "vm"}, f)
    write_report(exp)
    with open(tmp_path / "runs" / "tiny" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["precision"], r["threads"], r["cpu_model"], r["cpu_capability"]) for r in rows] == \
        [("dcdh", "bf16", "", "", ""), ("ddh", "fp32", "", "", "")]


# --- issue 21 item 2: the estimate uses this machine's speed only -------------------------------------

HERE = {"cpu_model": "Test CPU 9000", "cpu_capability": "AVX2", "gpu_name": None}


def _finish(cell, speeds, **record):
    """A finished cell: its model.log with ``speeds`` and a metrics.json with ``record``."""
    os.makedirs(cell.dir, exist_ok=True)
    with open(cell.path("model.log"), "w") as f:
        f.write("2026-12-04 04:31:41 [config] dataset ddh\n")
        for i, s in enumerate(speeds):
            f.write(f"2026-12-04 04:3{2 + i}:00 [epoch {i + 1}/{len(speeds)}] loss 1.0, {s} images/s, 1 s/epoch\n")
    with open(cell.path("metrics.json"), "w") as f:
        json.dump(dict({"eval_s": 7.0, "images_per_s": speeds[len(speeds) // 2]}, **record), f)


def test_estimate_uses_only_cells_that_ran_here(synthetic_root, tmp_path, monkeypatch, no_timing):
    import utils.device
    monkeypatch.setattr(estimate, "this_machine", lambda dev: HERE)
    monkeypatch.setattr(utils.device, "cpu_has_native_bf16", lambda: False)        # auto -> fp32
    path = _exp_file(tmp_path, synthetic_root, top='methods = ["dcdh", "dcwh", "ddh"]\n')
    path.write_text(path.read_text().replace('methods = ["dcdh", "ddh"]\n', ""))
    exp = load_experiment(str(path), out=str(tmp_path / "runs"))
    cells = {c.name: c for c in exp.cells}
    here = dict(HERE, precision="fp32", threads=1)
    _finish(cells["dcdh-8b-s0"], [100, 140, 120], **here)
    _finish(cells["ddh-8b-s0"], [9000], **dict(here, cpu_model="Other CPU"))      # another machine
    _finish(cells["dcwh-8b-s0"], [5000], amp=True, host="vm")                     # recorded before issue 21
    speeds = estimate.measured(exp)
    assert (speeds["ran_here"], speeds["elsewhere"], speeds["eval_s"]) == (1, 2, 7.0)
    # the same method here: median of its logged epochs; another method on the same network: the network's
    assert estimate.cell_speed(cells["dcdh-12b-s0"], speeds, "cpu") == (120, "dcdh here")
    assert estimate.cell_speed(cells["dcwh-12b-s0"], speeds, "cpu") == (120, "dfhnet here")
    # ddh's network ran only elsewhere: timed here, once for both of its cells
    assert estimate.cell_speed(cells["ddh-12b-s0"], speeds, "cpu") == (50.0, "timed here")
    seconds, _ = estimate.cell_estimate(cells["ddh-12b-s0"], 128, speeds, "cpu")
    assert seconds == pytest.approx(128 * 1 / 50.0 + 7.0)
    assert no_timing == [("ddhnet", 32, "fp32", 1, "cpu")]
    # finished cells show what they recorded
    assert estimate.cell_speed(cells["ddh-8b-s0"], speeds, "cpu") == (9000, "recorded")
    note = estimate.speed_note(speeds)
    assert "Test CPU 9000 (AVX2)" in note and "1 finished cell(s) ran here; 2 ran on another machine" in note
    assert "ddhnet fp32 1 thread 50 images/s (3 batches of 32)" in note


def test_timing_uses_the_precision_and_threads_the_cell_would_use(synthetic_root, tmp_path, monkeypatch, no_timing):
    import utils.device
    monkeypatch.setattr(estimate, "this_machine", lambda dev: HERE)
    exp = load_experiment(str(_exp_file(tmp_path, synthetic_root, train="threads = 2")), out=str(tmp_path / "runs"))
    speeds = estimate.measured(exp)
    for native, precision in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(utils.device, "cpu_has_native_bf16", lambda native=native: native)
        for cell in exp.cells:
            estimate.cell_speed(cell, speeds, "cpu")
    assert sorted(no_timing) == sorted((net, 32, p, 2, "cpu") for net in ("dfhnet", "ddhnet") for p in ("bf16", "fp32"))
    # a cell that ran here in bf16 does not give the speed of an fp32 cell
    _finish(exp.cells[0], [300], **dict(HERE, precision="bf16", threads=2))
    speeds = estimate.measured(exp)
    assert estimate.cell_speed(exp.cells[2], speeds, "cpu") == (50.0, "timed here")


def test_no_estimate_for_a_device_this_machine_lacks(synthetic_root, tmp_path, monkeypatch, no_timing):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(estimate, "_this_machine", estimate._this_machine.__wrapped__)
    exp = load_experiment(str(_exp_file(tmp_path, synthetic_root)), out=str(tmp_path / "runs"), machine=False)
    exp.device = "cuda"
    speeds = estimate.measured(exp)
    assert speeds["here"] is None
    assert estimate.cell_speed(exp.cells[0], speeds, "cuda") == (None, "unknown") and no_timing == []
    assert "speeds: unknown" in estimate.speed_note(speeds)


def test_timing_a_network_here(monkeypatch):
    """The real timing, tiny: DDHNet, batch 4, the thread count restored afterwards."""
    import torch
    before = torch.get_num_threads()
    monkeypatch.setattr(estimate, "TIMING_BUDGET_S", 0.0)          # one timed batch after the warm-up
    ips, batches, batch = estimate.time_batches("ddhnet", 32, 8, 4, "fp32", 1, "cpu")
    assert ips > 0 and batches == 1 and batch == 4 and torch.get_num_threads() == before
    monkeypatch.setattr(estimate, "TIMING_BUDGET_S", 60.0)
    assert estimate.time_batches("ddhnet", 32, 8, 100, "fp32", 1, "cpu")[1:] == (3, 32)   # CPU batch capped


# --- the committed record -----------------------------------------------------------------------------

COMMITTED = os.path.join(ROOT, "results", "celeba299_cpu")


@pytest.mark.skipif(not os.path.isdir(COMMITTED), reason="no committed results")
def test_committed_records_name_no_machine_path():
    cells = sorted(d for d in os.listdir(COMMITTED) if os.path.isdir(os.path.join(COMMITTED, d)))
    assert len(cells) == 108
    for name in cells:
        for file in ("cell.json", "metrics.json"):
            with open(os.path.join(COMMITTED, name, file)) as f:
                text = f.read()
            record = json.loads(text)
            assert "/work/" not in text and '"host"' not in text, (name, file)
            assert record["data_root"] == "../../../shared/data/celeba299-ddh32" and record["threads"] == 1
        assert record["precision"] == "bf16" and record["cpu_model"] is None   # recorded before issue 21
        assert record["train_command"].startswith("python ../../dcdh_train.py --method ")
    with open(os.path.join(COMMITTED, "results.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 108 and {(r["precision"], r["threads"], r["cpu_model"]) for r in rows} == {("bf16", "1", "")}
