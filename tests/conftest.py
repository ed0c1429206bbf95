"""Shared test helpers: paths to ../shared, skips when it is absent, a tiny synthetic set."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
FIXTURES = os.path.join(SHARED, "fixtures")
CELEBA_DDH = os.path.join(SHARED, "data", "celeba299-ddh32")
CELEBA = os.path.join(SHARED, "data", "celeba299")

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

needs_fixtures = pytest.mark.skipif(
    not os.path.isdir(FIXTURES),
    reason=f"{FIXTURES} is absent: the authors' reference values are only in the development checkout's ../shared")
needs_celeba_ddh = pytest.mark.skipif(
    not os.path.isdir(CELEBA_DDH),
    reason=f"{CELEBA_DDH} is absent: real faces are only in the development checkout's ../shared")

needs_celeba = pytest.mark.skipif(
    not os.path.isdir(CELEBA),
    reason=f"{CELEBA} is absent: real faces are only in the development checkout's ../shared")


def run_script(*args, cwd=None, timeout=300):
    """Run a project script with this interpreter; returns CompletedProcess (text)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small DDH-layout set: 8 identities, 16 train + 4 test images each."""
    from data.synthetic import write_synthetic_ddh
    return write_synthetic_ddh(str(tmp_path_factory.mktemp("synthetic")), identities=8,
                               train_per_id=16, test_per_id=4, seed=1)


def reproduce_in_process(capsys, *argv):
    """reproduce.py in this process: (exit status, stdout, stderr)."""
    import reproduce
    capsys.readouterr()
    try:
        code = reproduce.main(reproduce.get_args_parser().parse_args([str(a) for a in argv]))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_refusal(code, err, *needles):
    """A reproduce.py refusal: exit 2, one ``reproduce.py: error:`` line holding every needle."""
    assert code == 2, err
    assert err.startswith("reproduce.py: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def search_cli(*argv):
    """search.py's main in this process (arguments as str); returns what it returns."""
    import search
    return search.main(search.get_args_parser().parse_args([str(a) for a in argv]))


def search_cli_error(capsys, *argv):
    """Run search.main in-process, expect exit 2 and return the one-line message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        search_cli(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("search.py: error: ") and "\n" not in err and "Traceback" not in err
    return err
