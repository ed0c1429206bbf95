"""The two user commands end to end: train, evaluate, resume, and bad input (exit 2, one line)."""
import json
import os

import pytest
import torch

from conftest import CELEBA_DDH, FIXTURES, needs_celeba_ddh, needs_fixtures, run_script

JSON_KEYS = {"map", "map_tie_aware", "precision_at_1", "precision_at_5", "precision_at_10",
             "precision_radius_2", "recall_radius_2", "num_queries", "num_database", "bits",
             "queries_without_relevant"}


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = run_script("dcdh_train.py", "--dataset", "ddh", "--data-root", synthetic_root, "--len", "12",
                   "--epochs", "2", "--bs", "32", "--save", "m.tar", "--checkpoint-dir", str(out),
                   "--eval-every", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return out, r


def test_train_writes_authors_format_and_log(trained):
    out, r = trained
    assert sorted(os.listdir(out)) == ["m.last.tar", "m.log", "m.tar"]
    ck = torch.load(out / "m.tar", map_location="cpu", weights_only=True)
    assert {"backbone", "centers", "optimizer", "epoch", "config"} <= set(ck)
    assert list(ck["centers"]) == ["centers"] and tuple(ck["centers"]["centers"].shape) == (8, 12)
    assert ck["config"]["label_map"] == list(range(8)) and ck["config"]["backbone"] == "dfhnet"
    last = torch.load(out / "m.last.tar", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2
    log = (out / "m.log").read_text()
    assert "[epoch 1/2] loss" in log and "[epoch 2/2] loss" in log and "mAP" in log


def test_evaluate_json_and_above_chance(trained, synthetic_root, tmp_path):
    out, _ = trained
    js = tmp_path / "r.json"
    r = run_script("evaluation.py", "--load", str(out / "m.tar"), "--dataset", "ddh", "--data-root",
                   synthetic_root, "--json", str(js), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    m = json.loads(js.read_text())
    assert JSON_KEYS <= set(m)
    assert (m["num_queries"], m["num_database"], m["bits"], m["queries_without_relevant"]) == (32, 128, 12, 0)
    assert m["map"] > 1 / 8          # chance level for 8 identities
    assert "mAP:" in r.stdout and "precision@top10" in r.stdout


def test_resume_continues_epoch_count(trained, synthetic_root, tmp_path):
    out, _ = trained
    for f in ("m.tar", "m.last.tar"):
        (tmp_path / f).write_bytes((out / f).read_bytes())
    r = run_script("dcdh_train.py", "--dataset", "ddh", "--data-root", synthetic_root, "--len", "12",
                   "--epochs", "3", "--bs", "32", "--save", "m.tar", "--checkpoint-dir", str(tmp_path),
                   "--eval-every", "0", "--device", "cpu", "--resume")
    assert r.returncode == 0, r.stderr
    assert "[resume]" in r.stdout and "[epoch 3/3]" in r.stdout and "[epoch 1/3]" not in r.stdout
    last = torch.load(tmp_path / "m.last.tar", map_location="cpu", weights_only=True)
    assert last["epoch"] == 3


def test_last_batch_of_one_does_not_crash(synthetic_root, tmp_path):
    # 128 training images, batch 127: the last batch would hold one image
    r = run_script("dcdh_train.py", "--dataset", "ddh", "--data-root", synthetic_root, "--len", "8",
                   "--epochs", "1", "--bs", "127", "--save", "one.tar", "--checkpoint-dir", str(tmp_path),
                   "--eval-every", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("args,needles", [
    (["--data-root", "/nonexistent/faces"], ["/nonexistent/faces", "no such folder"]),
    (["--dataset", "mnist"], ["--dataset 'mnist' is unknown"]),
    (["--len", "0"], ["--len 0"]),
    (["--len", "-5"], ["--len -5"]),
    (["--epochs", "0"], ["--epochs 0"]),
    (["--bs", "100000"], ["--bs 100000", "larger than the training set"]),
    (["--backbone", "vgg"], ["--backbone", "vgg"]),
    (["--len", "1000000000"], ["--len 1000000000", "1..1024"]),
    (["--image-size", "0"], ["--image-size 0"]),
    (["--device", "cuda:7"], ["--device cuda:7"]),
])
def test_train_bad_flags(synthetic_root, tmp_path, args, needles):
    base = {"--dataset": "ddh", "--data-root": synthetic_root, "--epochs": "1", "--len": "8", "--device": "cpu"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    flat = [x for kv in base.items() for x in kv]
    r = run_script("dcdh_train.py", *flat, "--checkpoint-dir", str(tmp_path / "ck"), "--save", "x.tar")
    one_line_error(r, *needles)
    assert not os.path.exists(tmp_path / "ck" / "x.tar")


def test_save_target_that_is_a_folder(synthetic_root, tmp_path):
    os.makedirs(tmp_path / "m.tar")
    r = run_script("dcdh_train.py", "--dataset", "ddh", "--data-root", synthetic_root, "--epochs", "1",
                   "--checkpoint-dir", str(tmp_path), "--save", "m.tar", "--device", "cpu")
    one_line_error(r, "m.tar is a folder")


@needs_fixtures
def test_resume_of_authors_checkpoint_is_refused_clearly(synthetic_root, tmp_path):
    r = run_script("dcdh_train.py", "--dataset", "ddh", "--data-root", synthetic_root, "--epochs", "1",
                   "--len", "12", "--bs", "32", "--checkpoint-dir", str(tmp_path), "--device", "cpu",
                   "--resume", f"{FIXTURES}/seed_format_dfhnet12.tar")
    one_line_error(r, "holds no training state")


def test_unwritable_checkpoint_dir_reported_before_training(synthetic_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = run_script("dcdh_train.py", "--dataset", "ddh", "--data-root", synthetic_root, "--epochs", "1",
                   "--checkpoint-dir", str(blocker / "sub"), "--device", "cpu")
    one_line_error(r, "cannot write checkpoints", f"{blocker} is a file, not a folder")


def test_evaluate_bad_input(trained, synthetic_root, tmp_path):
    out, _ = trained
    base = ["--dataset", "ddh", "--data-root", synthetic_root, "--device", "cpu"]
    one_line_error(run_script("evaluation.py", "--load", str(out / "m.tar"), "--len", "48", *base),
                   "--len 48", "12-bit")
    one_line_error(run_script("evaluation.py", "--load", str(tmp_path / "missing.tar"), *base),
                   "missing.tar", "no such checkpoint")
    bad = tmp_path / "trunc.tar"
    bad.write_bytes((out / "m.tar").read_bytes()[:5000])
    js = tmp_path / "r.json"
    one_line_error(run_script("evaluation.py", "--load", str(bad), *base, "--json", str(js)),
                   "trunc.tar", "truncated or corrupt")
    assert not js.exists()
    os.makedirs(tmp_path / "jdir")
    one_line_error(run_script("evaluation.py", "--load", str(out / "m.tar"), *base, "--json", str(tmp_path / "jdir")),
                   "is a folder")
    one_line_error(run_script("evaluation.py", "--load", str(out / "m.tar"), "--dataset", "youtube",
                              "--data-root", str(tmp_path / "nope"), "--device", "cpu"), "no such folder")


@needs_fixtures
@needs_celeba_ddh
def test_authors_checkpoint_reproduces_reference_metrics(tmp_path):
    ref = json.load(open(f"{FIXTURES}/reference_values.json"))["seed_format_checkpoint"]
    js = tmp_path / "r.json"
    r = run_script("evaluation.py", "--load", f"{FIXTURES}/seed_format_dfhnet12.tar", "--dataset", "facescrub",
                   "--data-root", CELEBA_DDH, "--len", "12", "--json", str(js), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    m = json.loads(js.read_text())
    assert m["map"] == pytest.approx(ref["mAP"], abs=1e-4)
    assert m["map_tie_aware"] == pytest.approx(ref["mAP_tie_aware"], abs=1e-4)
    for k in ("1", "5", "10"):
        assert m[f"precision_at_{k}"] == pytest.approx(ref["precision_at_top"][k], abs=1e-4)
    assert m["precision_radius_2"] == pytest.approx(ref["precision_hamming_radius_2"], abs=1e-4)
    assert m["recall_radius_2"] == pytest.approx(ref["recall_hamming_radius_2"], abs=1e-4)
    assert (m["num_queries"], m["num_database"], m["bits"]) == (1265, 4992, 12)


def _in_process(capsys, main, parser, argv):
    """Run a script's ``main`` in this process; returns (exit status, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(parser().parse_args(argv))
    return e.value.code, capsys.readouterr().err


MALFORMED_CONFIG = [
    ("backbone", lambda c: dict(c, backbone="resnet9000"), "config 'backbone' is 'resnet9000'"),
    ("list", lambda c: list(c), "'config' is a list, expected a dict"),
    ("method_args", lambda c: dict(c, method_args="sigma=1"), "config 'method_args' is 'sigma=1', expected a dict"),
    ("method", lambda c: dict(c, method=3), "config 'method' is 3, expected a method name"),
]


@pytest.mark.parametrize("change,needle", [m[1:] for m in MALFORMED_CONFIG], ids=[m[0] for m in MALFORMED_CONFIG])
def test_malformed_checkpoint_config_is_one_line_exit_2(trained, synthetic_root, tmp_path, capsys, change, needle):
    """A checkpoint whose config was damaged: evaluation.py, search.py index and dcdh_train.py
    --resume each name the file and the entry (exit 2, one line), and the file is left as it was."""
    import dcdh_train
    import evaluation
    import search
    out, _ = trained
    for name in ("m.tar", "m.last.tar"):
        ck = torch.load(out / name, map_location="cpu", weights_only=True)
        ck["config"] = change(ck["config"])
        torch.save(ck, tmp_path / name)
    before = {n: (tmp_path / n).read_bytes() for n in ("m.tar", "m.last.tar")}
    bad = str(tmp_path / "m.tar")
    calls = [
        (evaluation.main, evaluation.get_args_parser,
         ["--load", bad, "--dataset", "ddh", "--data-root", synthetic_root, "--device", "cpu"], bad),
        (search.main, search.get_args_parser,
         ["index", "--load", bad, "--gallery", synthetic_root, "--out", str(tmp_path / "ix"), "--device", "cpu"], bad),
        (dcdh_train.main, dcdh_train.get_args_parser,
         ["--dataset", "ddh", "--data-root", synthetic_root, "--len", "12", "--epochs", "3", "--bs", "32",
          "--save", "m.tar", "--checkpoint-dir", str(tmp_path), "--eval-every", "0", "--device", "cpu",
          "--resume"], str(tmp_path / "m.last.tar")),
    ]
    for main, parser, argv, path in calls:
        code, err = _in_process(capsys, main, parser, argv)
        assert code == 2, (main.__module__, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        # --resume compares the backbone with this run's: its message names the entry its own way
        assert path in err and (needle in err or "its backbone is 'resnet9000'" in err), err
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert not (tmp_path / "ix").exists()


def test_malformed_checkpoint_config_on_the_command_line(trained, synthetic_root, tmp_path):
    out, _ = trained
    ck = torch.load(out / "m.tar", map_location="cpu", weights_only=True)
    torch.save(dict(ck, config=["dcdh"]), tmp_path / "list.tar")
    r = run_script("evaluation.py", "--load", str(tmp_path / "list.tar"), "--dataset", "ddh", "--data-root",
                   synthetic_root, "--device", "cpu")
    one_line_error(r, str(tmp_path / "list.tar"), "malformed checkpoint: 'config' is a list")


def test_checkpoint_of_an_unknown_method_evaluates_but_does_not_resume(trained, synthetic_root, tmp_path, capsys):
    """A method name this code does not know (a newer version's method): evaluation.py needs only
    the network and gives the same figures; --resume refuses it in one line naming the method."""
    import dcdh_train
    import evaluation
    out, _ = trained
    for name in ("m.tar", "m.last.tar"):
        ck = torch.load(out / name, map_location="cpu", weights_only=True)
        torch.save(dict(ck, config=dict(ck["config"], method="future_method")), tmp_path / name)
    figures = []
    for path in (out / "m.tar", tmp_path / "m.tar"):
        evaluation.main(evaluation.get_args_parser().parse_args(
            ["--load", str(path), "--dataset", "ddh", "--data-root", synthetic_root, "--device", "cpu",
             "--json", str(path) + ".json"]))
        with open(str(path) + ".json", encoding="utf-8") as f:
            figures.append(json.load(f)["map"])
    assert figures[0] == figures[1]
    code, err = _in_process(capsys, dcdh_train.main, dcdh_train.get_args_parser,
                            ["--dataset", "ddh", "--data-root", synthetic_root, "--len", "12", "--epochs", "3",
                             "--bs", "32", "--save", "m.tar", "--checkpoint-dir", str(tmp_path), "--eval-every", "0",
                             "--device", "cpu", "--resume"])
    assert code == 2 and err.count("\n") == 1 and "its method is 'future_method', this run's is 'dcdh'" in err, err


def test_repeated_method_args_accumulate_and_a_repeated_key_is_an_error(capsys):
    import dcdh_train
    parse = dcdh_train.get_args_parser().parse_args
    args = parse(["--method", "dsdh", "--method-args", "mu=2", "--method-args", "nu=3", "dcc_iter=4"])
    assert dcdh_train.method_hparams(args) == {"mu": 2.0, "nu": 3.0, "dcc_iter": 4}
    for argv, needle in ((["--method-args", "eta=1", "--method-args", "eta=2"], "--method-args: eta is given twice"),
                         (["--method-args", "help", "eta=1"], "--method-args help lists the method's hyperparameters"),
                         (["--method-args", "eta=1", "--method-args", "help"], "give 'help' alone")):
        code, err = _in_process(capsys, dcdh_train.main, dcdh_train.get_args_parser, ["--method", "dpsh", *argv])
        assert code == 2 and err.count("\n") == 1 and needle in err, err


def test_resume_of_a_file_without_a_newer_hyperparameter_uses_its_default(trained, synthetic_root, tmp_path):
    """A checkpoint written before a hyperparameter was added to its method (here DCDH's
    authors_push_constant, at its default) resumes; the same key at another value is refused."""
    out, _ = trained
    for name in ("m.tar", "m.last.tar"):
        ck = torch.load(out / name, map_location="cpu", weights_only=True)
        args = dict(ck["config"]["method_args"])
        assert args.pop("authors_push_constant") is False
        torch.save(dict(ck, config=dict(ck["config"], method_args=args)), tmp_path / name)
    common = ("dcdh_train.py", "--dataset", "ddh", "--data-root", synthetic_root, "--len", "12", "--epochs", "3",
              "--bs", "32", "--save", "m.tar", "--checkpoint-dir", str(tmp_path), "--eval-every", "0",
              "--device", "cpu", "--resume")
    r = run_script(*common[:-1], "--method-args", "authors_push_constant=true", "--resume")
    one_line_error(r, "authors_push_constant False vs True")
    r = run_script(*common)
    assert r.returncode == 0, r.stderr
    assert "[epoch 3/3]" in r.stdout + r.stderr


def test_eta_line_after_each_epoch_with_output_redirected(trained):
    """With output redirected (no progress bar), every epoch still logs a line with the measured
    seconds per epoch and, before the last epoch, the time left at that pace (seconds per epoch x
    epochs left, to the rounding of the printed figures)."""
    import re
    from dcdh_train import format_duration
    out, r = trained
    text = r.stdout + r.stderr
    lines = [line for line in text.splitlines() if line.startswith("[epoch ")]
    assert [line.split("]")[0] for line in lines] == ["[epoch 1/2", "[epoch 2/2"]
    first = re.search(r"images/s, ([\d.]+) s/epoch, at most (?:(\d+)min )?(\d+)s left \(1 epoch; early stopping "
                      r"may end sooner\)$", lines[0])
    assert first, lines[0]
    per_epoch, left = float(first.group(1)), int(first.group(2) or 0) * 60 + int(first.group(3))
    assert abs(left - per_epoch * 1) <= 1, lines[0]
    assert re.search(r"[\d.]+ s/epoch$", lines[1]) and "left" not in lines[1], lines[1]
    assert (format_duration(42), format_duration(185), format_duration(3725)) == ("42s", "3min 05s", "1h 02min")
    with open(out / "m.log", encoding="utf-8") as f:  # the log file holds the same lines
        assert [line for line in f.read().splitlines() if "[epoch " in line][0].endswith(lines[0].split("] ", 1)[1])
