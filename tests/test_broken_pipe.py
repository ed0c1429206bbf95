"""``script | head``: when the reader of standard output goes away, every script stops quietly.

The reader here closes before the script writes anything (the read end of the pipe is closed
before the script starts), so every write fails: the script must exit with status 141
(128 + SIGPIPE, ``utils.errors.EXIT_BROKEN_PIPE``) and write nothing to stderr (no
BrokenPipeError traceback, no "Exception ignored" at exit).
"""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, needs_celeba_ddh
from utils.errors import EXIT_BROKEN_PIPE


def run_into_closed_pipe(*argv, timeout=120):
    """Run ``python argv...`` in the repository with stdout a pipe whose reader is gone.
    Returns (exit status, stderr text)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        os.close(write_end)
    return proc.returncode, proc.stderr


def assert_quiet(code, err):
    assert (code, err) == (EXIT_BROKEN_PIPE, "")


def test_exit_status_is_128_plus_sigpipe():
    assert EXIT_BROKEN_PIPE == 141


def test_reproduce_dry_run(synthetic_root, tmp_path):
    exp = tmp_path / "tiny.toml"
    exp.write_text(f'dataset = "ddh"\ndata_root = "{synthetic_root}"\nmethods = ["dcdh"]\nbits = [8]\n'
                   f'seeds = [0]\ndevice = "cpu"\nout = "{tmp_path / "runs"}"\n\n[train]\nepochs = 1\nbs = 32\n')
    assert_quiet(*run_into_closed_pipe("reproduce.py", str(exp), "--dry-run"))


def test_dcdh_train_output_before_sys_exit():
    # '--method-args help' prints the list, then sys.exit(0): the flush at exit must not fail either
    assert_quiet(*run_into_closed_pipe("dcdh_train.py", "--method", "csq", "--method-args", "help"))


def tiny_checkpoint(path):
    """An untrained 12-bit dfhnet DCDH checkpoint for the 8 identities of ``synthetic_root``."""
    from methods.dcdh import DCDH
    from models import build_model
    from utils.checkpoint import save_checkpoint
    save_checkpoint({"backbone": build_model("dfhnet", 12).state_dict(), "centers": DCDH(8, 12).state_dict(),
                     "config": {"backbone": "dfhnet", "bits": 12, "image_size": 32}}, str(path))
    return str(path)


def test_evaluation_prints_its_table_at_the_end(synthetic_root, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "m.tar")
    assert_quiet(*run_into_closed_pipe("evaluation.py", "--load", ckpt, "--dataset", "ddh", "--data-root",
                                       synthetic_root, "--device", "cpu"))


def test_search_index_stops_before_writing_anything(synthetic_root, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "m.tar")
    out = tmp_path / "ix"
    assert_quiet(*run_into_closed_pipe("search.py", "index", "--load", ckpt, "--gallery", synthetic_root,
                                       "--out", str(out), "--device", "cpu"))
    assert sorted(os.listdir(tmp_path)) == ["m.tar"]  # stopped at its first line: no index, no temporary folder


@needs_celeba_ddh
def test_demo_stops_at_its_first_line():
    assert_quiet(*run_into_closed_pipe("demo.py"))


@pytest.mark.parametrize("argv", [
    ("benchmarks/class_scale.py", "--classes", "10", "--repeat", "1", "--only", "dcdh"),  # flush=True print
    ("benchmarks/eval_speed.py", "--queries", "4", "--database", "8", "--classes", "2", "--bits", "8",
     "--repeat", "1", "--skip-baseline"),                                                 # output flushed at exit
], ids=["class_scale", "eval_speed"])
def test_benchmarks(argv):
    assert_quiet(*run_into_closed_pipe(*argv))


def test_other_broken_pipes_are_not_hidden():
    """A BrokenPipeError that does not come from standard output (here: raised by the code, with
    a healthy stdout) still ends in its traceback, status 1."""
    code = ("import sys; sys.path.insert(0, '.')\n"
            "from utils.errors import quiet_broken_pipe\n"
            "def main():\n    print('fine')\n    raise BrokenPipeError(32, 'a pipe to a worker')\n"
            "quiet_broken_pipe(main)()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == "fine\n"
    assert proc.stderr.rstrip().splitlines()[-1] == "BrokenPipeError: [Errno 32] a pipe to a worker"

